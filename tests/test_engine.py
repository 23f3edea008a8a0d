"""The generation engine (add_request / step / abort_request): continuous batching checked
against transformers' generate run on each prompt alone, and against solo engine runs."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch
from helpers import hf_model

import jaonnx
from jaonnx.errors import JaonnxError
from jaonnx.generation import GenerationEngine, RequestOutput

PROMPTS = ["西田幾多郎は、", "近年の機械学習は", "4年に1度オリンピックは開かれる。"]
GREEDY = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12)


@pytest.fixture(scope="module", params=["gpt2-small-ja", "rinna-gpt-1b"])
def gen_and_model(request, artifacts, twins_dir):
    return jaonnx.load(artifacts[request.param]), hf_model(twins_dir / request.param)


@pytest.fixture(scope="module")
def gen(artifacts):
    return jaonnx.load(artifacts["gpt2-small-ja"])


def hf_alone(model, prompt_ids: list[int], **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt_ids) :].tolist()


def drain(engine: GenerationEngine, joins: dict[int, list[tuple]] | None = None) -> dict[tuple[str, int], RequestOutput]:
    """Step until done, adding `joins[step]` requests before that step; the final outputs."""
    joins = dict(joins or {})
    finals: dict[tuple[str, int], RequestOutput] = {}
    step = 0
    while engine.has_unfinished_requests() or joins:
        for args, kwargs in joins.pop(step, []):
            engine.add_request(*args, **kwargs)
        for out in engine.step():
            if out.finished:
                finals[(out.request_id, out.index)] = out
        step += 1
    return finals


def test_requests_joining_at_different_steps_equal_transformers_alone(gen_and_model):
    gen, model = gen_and_model
    engine = gen.engine(max_batch_size=8)
    joins = {step: [((p,), dict(request_id=p, **GREEDY))] for step, p in zip((0, 2, 5), PROMPTS)}
    finals = drain(engine, joins)
    assert len({len(gen.encode(p)) for p in PROMPTS}) == 3  # three lengths: real padding
    seen: set[int] = set()
    for p in PROMPTS:
        out = finals[(p, 0)]
        expected = hf_alone(model, gen.encode(p), max_new_tokens=12, min_new_tokens=12)
        seen.update(expected)
        assert out.token_ids == expected, p
        assert out.finish_reason == "length"
    assert len(seen) >= 8, "degenerate twin output could hide a cache bug"


def test_seeded_sample_is_the_same_alone_and_in_a_batch_of_nine(gen):
    options = dict(do_sample=True, top_k=20, seed=11, max_new_tokens=16, num_return_sequences=1)
    alone = gen.engine(max_batch_size=1)
    alone.add_request(PROMPTS[0], request_id="me", **options)
    solo = drain(alone)[("me", 0)].token_ids
    crowd = gen.engine(max_batch_size=9)
    crowd.add_request(PROMPTS[1], request_id="first", do_sample=True, seed=1, max_new_tokens=3, num_return_sequences=1)
    crowd.step()  # "me" joins a batch already running
    crowd.add_request(PROMPTS[0], request_id="me", **options)
    for i in range(7):
        crowd.add_request(PROMPTS[i % 3] * (i + 1), request_id=f"other{i}", do_sample=True, seed=100 + i,
                          max_new_tokens=4 + 2 * i, num_return_sequences=1)
    assert drain(crowd)[("me", 0)].token_ids == solo


def test_abort_frees_the_rows_and_the_others_continue_unchanged(gen):
    plain = gen.engine(max_batch_size=4)
    plain.add_request(PROMPTS[2], request_id="keep", **GREEDY)
    expected = drain(plain)[("keep", 0)].token_ids

    engine = gen.engine(max_batch_size=4)
    engine.add_request(PROMPTS[0], request_id="drop", **GREEDY)
    engine.add_request(PROMPTS[2], request_id="keep", **GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.num_running_rows == 2
    assert engine.abort_request("drop") is True
    assert engine.num_running_rows == 1  # its row left the batch at once
    assert engine.abort_request("drop") is False  # already gone
    finals = drain(engine)
    assert ("drop", 0) not in finals
    assert finals[("keep", 0)].token_ids == expected


def test_abort_of_a_waiting_request(gen):
    engine = gen.engine(max_batch_size=1)
    engine.add_request(PROMPTS[0], request_id="a", **GREEDY)
    engine.add_request(PROMPTS[1], request_id="b", **GREEDY)
    engine.step()
    assert engine.num_waiting_requests == 1 and engine.abort_request("b")
    assert set(drain(engine)) == {("a", 0)}


def test_stop_strings_through_the_engine(gen):
    engine = gen.engine()
    engine.add_request(PROMPTS[2], request_id="full", **GREEDY)
    full = drain(engine)[("full", 0)].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    engine.add_request(PROMPTS[2], request_id="cut", stop=[stop], **GREEDY)
    pieces: list[str] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert final.finished and final.finish_reason == "stop"
    assert final.text == full[: full.index(stop)]
    assert "".join(pieces) == final.text  # streamed pieces never showed the stop string


def test_num_return_sequences_are_told_apart_by_index(gen):
    engine = gen.engine(max_batch_size=8)
    rid = engine.add_request(PROMPTS[0], do_sample=True, seed=3, num_return_sequences=3, max_new_tokens=10)
    finals = drain(engine)
    assert sorted(finals) == [(rid, 0), (rid, 1), (rid, 2)]
    texts = [finals[(rid, i)].text for i in range(3)]
    assert len(set(texts)) > 1
    assert gen.generate(PROMPTS[0], do_sample=True, seed=3, num_return_sequences=3, max_new_tokens=10) == texts


def test_streamed_new_text_joins_to_the_final_text(gen):
    engine = gen.engine()
    engine.add_request(PROMPTS[1], request_id="s", do_sample=True, seed=5, max_new_tokens=24, num_return_sequences=1)
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert final is not None and "".join(pieces) == final.text


def test_prompt_lookup_is_exact_and_takes_fewer_steps(gen):
    """A prompt that repeats itself: drafted n-grams get accepted, and the tokens are
    exactly plain greedy's."""
    prompt = "東京は日本の首都です。東京は日本の首都です。東京は日本の首都です。東京は"
    options = dict(do_sample=False, max_new_tokens=24, min_new_tokens=24)
    plain = gen.engine(1)
    plain.add_request(prompt, request_id="p", **options)
    lookup = gen.engine(1)
    lookup.add_request(prompt, request_id="p", prompt_lookup=5, **options)
    steps = 0
    finals: dict = {}
    while lookup.has_unfinished_requests():
        steps += 1
        for out in lookup.step():
            if out.finished:
                finals[out.request_id] = out
    expected = drain(plain)[("p", 0)].token_ids
    assert finals["p"].token_ids == expected
    assert steps < len(expected), "no drafted token was ever accepted"
    assert gen.generate(prompt, prompt_lookup=5, **options) == gen.generate(prompt, **options)


def test_logprobs_equal_transformers_log_softmax(gen_and_model):
    gen, model = gen_and_model
    engine = gen.engine()
    engine.add_request(PROMPTS[0], request_id="lp", logprobs=3, **GREEDY)
    logprobs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            logprobs.extend(out.logprobs or [])
            final = out
    ids = final.prompt_ids + final.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    start = len(final.prompt_ids) - 1
    assert [lp.token_id for lp in logprobs] == final.token_ids
    for j, lp in enumerate(logprobs):
        row = reference[start + j]
        assert lp.logprob == pytest.approx(row[lp.token_id], rel=1e-4, abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row, kind="stable")[:3])
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely


def test_join_and_leave_cycles_keep_memory_bounded(gen, twins_dir):
    """1,000 requests join and leave a running batch; RSS after the first 100 is the baseline,
    and tracemalloc counts the Python objects still alive that were allocated after it. The
    anchor that lived through the churn equals transformers alone; the engine ends empty."""
    import tracemalloc

    engine = gen.engine(max_batch_size=4)
    engine.add_request(PROMPTS[2], request_id="anchor", do_sample=False, max_new_tokens=600)
    process = psutil.Process()
    baseline = 0
    finals: dict[str, RequestOutput] = {}
    try:
        for i in range(1000):
            engine.add_request(PROMPTS[i % 3], request_id=f"r{i}", do_sample=False, max_new_tokens=1 + i % 3)
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
            if i % 7 == 0:
                engine.abort_request(f"r{i}")
            if i == 100:
                gc.collect()
                baseline = process.memory_info().rss
                tracemalloc.start()
            if not engine.has_unfinished_requests() or engine.num_running_rows == 0:
                engine.add_request(PROMPTS[2], request_id=f"anchor{i}", do_sample=False, max_new_tokens=200)
        while engine.has_unfinished_requests():
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
        anchor = finals.pop("anchor")  # the one that saw every join and leave
        finals.clear()
        gc.collect()
        python_grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = process.memory_info().rss - baseline  # before transformers loads anything
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 900 join/leave cycles"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 600 tiny steps: one thread is 19x faster than two on a busy machine
    try:
        expected = hf_alone(hf_model(twins_dir / "gpt2-small-ja"), gen.encode(PROMPTS[2]), max_new_tokens=600)
    finally:
        torch.set_num_threads(threads)
    assert len(anchor.token_ids) == 600 and anchor.token_ids == expected
    assert python_grown < 2 * 2**20, f"{python_grown / 2**20:.1f} MiB of Python objects outlived the churn"
    assert not engine.has_unfinished_requests()
    assert engine.num_running_rows == 0 and engine.num_waiting_requests == 0 and engine.batch.rows == 0


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda e: e.add_request(""), "prompt"),
        (lambda e: e.add_request([]), "prompt"),
        (lambda e: e.add_request(["x"]), "prompt"),
        (lambda e: e.add_request(PROMPTS[0], top_p=2.0), "top_p"),
        (lambda e: e.add_request(PROMPTS[0], bogus=1), "bogus"),
        (lambda e: e.add_request(PROMPTS[0], do_sample=True, num_return_sequences=5), "num_return_sequences"),
        (lambda e: e.add_request(PROMPTS[0], do_sample=True, prompt_lookup=3), "prompt_lookup"),
        (lambda e: e.add_request(PROMPTS[0], max_new_tokens=10**6), "max_new_tokens"),
        (lambda e: [e.add_request(PROMPTS[0], request_id="x"), e.add_request(PROMPTS[1], request_id="x")], "request_id"),
    ],
)
def test_bad_requests_are_clear_errors_with_a_field(gen, call, field):
    engine = gen.engine(max_batch_size=4)
    with pytest.raises(JaonnxError) as info:
        call(engine)
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_bad_max_batch_size(gen):
    with pytest.raises(JaonnxError, match="max_batch_size"):
        gen.engine(max_batch_size=0)


def test_shipped_kv_ops_graphs_are_what_the_builder_makes():
    """The runtime ships the KV-cache surgery graphs as package data (it does not depend on
    `onnx`); they must be exactly what `jaonnx_export.kv_ops` builds today."""
    from importlib import resources

    from jaonnx_export.kv_ops import build_all

    folder = resources.files("jaonnx.generation") / "kv_ops"
    built = build_all()
    assert sorted(built) == sorted(p.name for p in folder.iterdir() if p.name.endswith(".onnx"))
    for name, data in built.items():
        assert (folder / name).read_bytes() == data, f"{name} is stale: run python -m jaonnx_export.kv_ops"


def test_kv_ops_merge_and_select_equal_numpy(gen):
    """Join and leave in ONNX Runtime against the same surgery in numpy."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
    b = rng.standard_normal((2, 2, 7, 4)).astype(np.float32)
    value = lambda x: ort.OrtValue.ortvalue_from_numpy(x)  # noqa: E731
    merged = gen.kv_ops.merge([value(a)], [value(b)])[0].numpy()
    expected = np.concatenate([np.pad(a, [(0, 0), (0, 0), (2, 0), (0, 0)]), b])
    np.testing.assert_array_equal(merged, expected)
    picked = gen.kv_ops.select([value(expected)], np.array([4, 0]), 2, 6)[0].numpy()
    np.testing.assert_array_equal(picked, expected[[4, 0]][:, :, 2:6])


def test_ids_past_the_tokenizer_are_never_generated(twins_dir, tmp_path):
    """A checkpoint whose embedding table is padded past its tokenizer, with padded rows that
    win every argmax in transformers: jaonnx never generates, samples or scores those ids."""
    import shutil

    import transformers

    from jaonnx_export.export import export

    twin = tmp_path / "gpt2-small-ja"  # the twin's name: helpers load its tokenizer the card's way
    shutil.copytree(twins_dir / "gpt2-small-ja", twin)
    model = transformers.GPT2LMHeadModel.from_pretrained(twin)
    size = model.config.vocab_size
    prompt_ids = hf_tokenized(twin, PROMPTS[1])
    first = hf_alone(model, prompt_ids, max_new_tokens=1)[0]
    model.resize_token_embeddings(size + 8)
    with torch.no_grad():
        model.transformer.wte.weight[size:] = 20 * model.transformer.wte.weight[first]
    model.save_pretrained(twin)
    assert max(hf_alone(model, prompt_ids, max_new_tokens=4)) >= size  # unmasked, padding wins
    manifest = export(str(twin), tmp_path / "art")
    assert (manifest.vocab_size, manifest.tokenizer_size) == (size + 8, size)
    gen = jaonnx.load(tmp_path / "art")
    greedy = gen.generate(PROMPTS[1], do_sample=False, max_new_tokens=12, return_ids=True)
    assert greedy.prompt_ids == prompt_ids and max(greedy.generated_ids) < size
    sampled = gen.generate([PROMPTS[1]] * 4, do_sample=True, top_k=0, seed=0, max_new_tokens=16, return_ids=True)
    assert all(t < size for r in sampled for t in r.generated_ids)
    engine = gen.engine()
    engine.add_request(PROMPTS[1], request_id="lp", logprobs=5, do_sample=False, max_new_tokens=4)
    outs = drain_outputs(engine)
    tops = [lp for out in outs for lp in (out.logprobs or [])]
    assert tops and all(t < size for lp in tops for t, _ in lp.top)
    # Values: transformers' log-softmax over the ids the tokenizer has (the padded ids are
    # not in the distribution at all, not merely never picked).
    generated = outs[-1].token_ids
    ids = prompt_ids + generated
    with torch.no_grad():
        known = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, :size].double(), -1).numpy()
    start = len(prompt_ids) - 1
    assert [lp.token_id for lp in tops] == generated
    for j, lp in enumerate(tops):
        row = known[start + j]
        assert lp.token_id == int(row.argmax())  # greedy over the tokenizer's ids
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
        for t, value in lp.top:
            assert value == pytest.approx(row[t], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row, kind="stable")[:5])
    scored = gen.score(PROMPTS[1])
    expected = known[np.arange(len(prompt_ids) - 1), prompt_ids[1:]]
    np.testing.assert_allclose(scored.token_logprobs, expected, atol=1e-4)
    assert scored.log_likelihood == pytest.approx(float(expected.sum()), abs=1e-3)


def hf_tokenized(twin, text: str) -> list[int]:
    from helpers import hf_tokenizer

    return hf_tokenizer(twin).encode(text, add_special_tokens=False)


def drain_outputs(engine: GenerationEngine) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    return outs
