"""Chunked prefill and automatic prefix caching in the generation engine, on both KV layouts
(asserted from the manifest, so losing one fails loudly), checked against transformers' greedy
run on each prompt alone and against the engine's own unchunked / cold runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hf_model

import jaonnx
from jaonnx.errors import JaonnxError
from jaonnx.generation.prefix_cache import PrefixCache

LAYOUTS = {"static": "gpt2-small-ja", "concat": "rinna-gpt-1b"}
SHORT = ["西田幾多郎は、", "4年に1度オリンピックは開かれる。"]
PREFIX = "近年の機械学習は急速に進歩しているが、その一方で大学の研究者は" * 4
SUFFIXES = ["東京の天気は", "西田幾多郎は、", "オリンピックは"]
GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, artifacts, twins_dir):
    recipe = LAYOUTS[request.param]
    gen = jaonnx.load(artifacts[recipe])
    assert gen.manifest.decoder.kv_layout == request.param  # coverage of both layouts cannot vanish
    return gen, hf_model(twins_dir / recipe)


@pytest.fixture(scope="module")
def gen(artifacts):
    return jaonnx.load(artifacts["gpt2-small-ja"])


def hf_greedy(model, ids: list[int], new: int = 10) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def run(engine, requests: list[tuple[int, str, str, dict]]) -> tuple[dict, dict]:
    """Add each (step, request id, prompt, options) before that step; step until done.
    Returns the final outputs and, per request id, the steps at which it produced tokens.
    Final outputs carry every logprob of their sequence (not just the last step's)."""
    finals, seen, logprobs, step = {}, {}, {}, 0
    pending = sorted(requests, key=lambda r: r[0])
    while engine.has_unfinished_requests() or pending:
        while pending and pending[0][0] == step:
            _, rid, prompt, options = pending.pop(0)
            engine.add_request(prompt, request_id=rid, **options)
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(step)
            logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
            if out.finished:
                finals[out.request_id] = out
                out.logprobs = logprobs[out.request_id] if out.logprobs is not None else None
        step += 1
    return finals, seen


def test_chunked_prefill_equals_unchunked_and_transformers_while_rows_run(layout):
    gen, model = layout
    long_prompt = PREFIX + SUFFIXES[0]
    n_long = len(gen.encode(long_prompt))
    chunk = 8
    assert n_long > 5 * chunk  # several chunks
    requests = [(0, "a", SHORT[0], dict(GREEDY, max_new_tokens=20, min_new_tokens=20)),
                (0, "b", SHORT[1], dict(GREEDY, max_new_tokens=20, min_new_tokens=20)),
                (0, "c", SHORT[0] + "大学で", dict(GREEDY, max_new_tokens=4, min_new_tokens=4)),  # leaves mid-prefill
                (2, "long", long_prompt, GREEDY)]
    chunked, seen = run(gen.engine(max_prefill_tokens=chunk, prefix_cache=False), requests)
    whole, _ = run(gen.engine(max_prefill_tokens=None, prefix_cache=False), requests)
    for rid, prompt in (("a", SHORT[0]), ("b", SHORT[1]), ("c", SHORT[0] + "大学で"), ("long", long_prompt)):
        expected = hf_greedy(model, gen.encode(prompt), len(chunked[rid].token_ids))
        assert chunked[rid].token_ids == whole[rid].token_ids == expected, rid
    # "c" left while the long prompt was being prefilled (its slot / cache moved under it) ...
    first_long, last_c = seen["long"][0], seen["c"][-1]
    assert 2 < last_c < first_long
    # ... the running rows got a token in every step of the long prefill ...
    assert all(s in seen["a"] for s in range(2, first_long + 1))
    # ... which took as many steps as its chunks (after "c"'s own prompt), and its first token
    # came in the step its last chunk ran
    chunks = -(-n_long // chunk)
    assert chunks <= first_long - 2 + 1 <= chunks + 2


def test_seeded_sampling_is_identical_with_and_without_chunking(gen):
    options = dict(do_sample=True, top_k=20, temperature=0.9, seed=7, max_new_tokens=12)
    requests = [(0, "run", SHORT[0], dict(options, seed=3)), (1, "long", PREFIX + SUFFIXES[1], options)]
    chunked, _ = run(gen.engine(max_prefill_tokens=5, prefix_cache=False), requests)
    whole, _ = run(gen.engine(max_prefill_tokens=None, prefix_cache=False), requests)
    assert {k: v.token_ids for k, v in chunked.items()} == {k: v.token_ids for k, v in whole.items()}


def test_a_warm_prefix_gives_the_cold_ids_and_logprobs_equal_to_transformers(layout):
    gen, model = layout
    options = dict(GREEDY, logprobs=3)
    target = PREFIX + SUFFIXES[2]
    cold_engine = gen.engine(prefix_cache=False)
    cold, _ = run(cold_engine, [(0, "t", target, options)])
    assert cold_engine.prefix_cache is None
    engine = gen.engine()
    run(engine, [(0, "first", PREFIX + SUFFIXES[1], GREEDY)])
    computed = engine.prompt_tokens_computed
    warm, _ = run(engine, [(0, "t", target, options)])
    cache = engine.prefix_cache
    assert cache.hits >= len(gen.encode(PREFIX)) - 2 * cache.block_size  # most of the prefix came from the cache
    assert engine.prompt_tokens_computed - computed == len(gen.encode(target)) - cache.hits
    assert warm["t"].token_ids == cold["t"].token_ids == hf_greedy(model, gen.encode(target))
    assert len(warm["t"].logprobs) == len(cold["t"].logprobs) == 10
    for w, c in zip(warm["t"].logprobs, cold["t"].logprobs):
        assert w.token_id == c.token_id and [t for t, _ in w.top] == [t for t, _ in c.top]
        np.testing.assert_allclose([w.logprob] + [v for _, v in w.top], [c.logprob] + [v for _, v in c.top],
                                   atol=2e-4)
    # against transformers' log-softmax at the first generated token
    ids = gen.encode(target)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    first = warm["t"].logprobs[0]
    assert abs(first.logprob - float(ref[first.token_id])) < 2e-3


def test_eviction_under_a_tiny_bound_keeps_results_correct(layout):
    gen, model = layout
    block_bytes = gen.new_batch().io.token_bytes() * 16
    engine = gen.engine(prefix_cache_mb=3.5 * block_bytes / (1 << 20))  # three blocks fit
    prompts = [PREFIX + s for s in SUFFIXES] + [SUFFIXES[0] + PREFIX]
    finals, _ = run(engine, [(i * 3, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    cache = engine.prefix_cache
    assert cache.evictions > 0 and cache.bytes <= cache.max_bytes and cache.blocks <= 3
    for i, p in enumerate(prompts):
        assert finals[f"r{i}"].token_ids == hf_greedy(model, gen.encode(p)), p


def test_a_prefix_cached_from_an_aborted_row_is_still_correct(layout):
    gen, model = layout
    engine = gen.engine(max_prefill_tokens=16)
    engine.add_request(SHORT[0], request_id="other", **dict(GREEDY, max_new_tokens=60, min_new_tokens=60))
    engine.step()  # a running row: prompts are prefilled in chunks from now on
    engine.add_request(PREFIX + SUFFIXES[0], request_id="gone", **GREEDY)
    while engine.num_running_rows == 1:
        engine.step()  # its prompt is prefilled (and cached); it is running
    engine.step()
    assert engine.abort_request("gone")
    engine.add_request(PREFIX + SUFFIXES[1], request_id="mid", **GREEDY)
    engine.step()
    assert engine.num_waiting_requests == 1  # half-way through its prefill
    assert engine.abort_request("mid")
    hits = engine.prefix_cache.hits
    target = PREFIX + SUFFIXES[2]
    finals, _ = run(engine, [(0, "t", target, GREEDY)])
    assert engine.prefix_cache.hits > hits
    assert "other" in finals
    assert finals["t"].token_ids == hf_greedy(model, gen.encode(target))
    assert not engine.has_unfinished_requests() and engine.batch.rows == 0
    assert finals["other"].token_ids == hf_greedy(model, gen.encode(SHORT[0]), 60)


def test_several_sequences_share_one_prefill(layout):
    gen, _ = layout
    options = dict(do_sample=True, top_k=20, seed=5, max_new_tokens=8, num_return_sequences=3)
    busy = (0, "busy", SHORT[0], dict(GREEDY, max_new_tokens=30, min_new_tokens=30))  # so prefill is chunked
    chunked, _ = run(gen.engine(max_prefill_tokens=6), [busy, (1, "n", PREFIX, options)])
    whole, _ = run(gen.engine(max_prefill_tokens=None, prefix_cache=False), [(0, "n", PREFIX, options)])
    assert chunked["n"].token_ids == whole["n"].token_ids  # (the last index's final output)
    engine = gen.engine(max_prefill_tokens=6)
    engine.add_request(PREFIX, request_id="n", **options)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.index] = out.token_ids
    alone = gen.generate(PREFIX, return_ids=True, **options)
    assert [outs[i] for i in range(3)] == [r.generated_ids for r in alone]


@pytest.mark.parametrize("options, field", [
    (dict(max_prefill_tokens=0), "max_prefill_tokens"),
    (dict(max_prefill_tokens=2.5), "max_prefill_tokens"),
    (dict(prefix_cache_mb=-1), "prefix_cache_mb"),
    (dict(prefix_cache_mb="big"), "prefix_cache_mb"),
])
def test_bad_engine_options_are_one_line_errors_naming_the_field(gen, options, field):
    with pytest.raises(JaonnxError) as info:
        gen.engine(**options)
    assert info.value.field == field and "\n" not in str(info.value)


def test_prefix_cache_blocks_are_shared_and_leaves_are_evicted_first():
    """Hand-built KV (position p holds the value p) so every returned value is checkable."""
    def read_of(ids):
        kv = np.arange(len(ids), dtype=np.float32)[None, None, :, None] * np.ones((2, 1, 1, 1), np.float32)
        return lambda start, end: kv[:, :, start:end]

    block_bytes = 2 * 4 * 4  # 2 names x 1 head x 4 positions x 1 dim x float32
    cache = PrefixCache(max_bytes=4 * block_bytes, block_size=4)
    a = list(range(10))  # two whole blocks (0-3, 4-7)
    cache.store(a, read_of(a))
    b = list(range(8)) + [50, 51, 52, 53, 54]  # shares both blocks, adds one (50-53)
    cache.store(b, read_of(b))
    assert cache.blocks == 3 and cache.bytes == 3 * block_bytes
    n, blocks = cache.lookup(b + [60])
    kv = np.concatenate(blocks, axis=2)
    assert n == 12 and kv.shape == (2, 1, 12, 1) and kv[0, 0, :, 0].tolist() == list(range(12))
    assert cache.lookup(b)[0] == 8  # the last two tokens are always left to compute (no lone token)
    assert cache.lookup(list(range(6)))[0] == 4 and cache.lookup(list(range(5)))[0] == 0
    assert cache.lookup([9, 9, 9, 9, 9])[0] == 0
    c = [7, 7, 7, 7, 8, 8, 8, 8, 1]
    cache.store(c, read_of(c))  # needs two blocks: room for one -> the LRU leaf (50-53) goes
    assert cache.evictions == 1 and cache.bytes <= cache.max_bytes
    assert cache.lookup(b)[0] == 8 and cache.lookup(a)[0] == 8
    assert (cache.queries, cache.hits) == (14 + 13 + 6 + 5 + 5 + 13 + 10, 12 + 8 + 4 + 0 + 0 + 8 + 8)


def test_head_of_line_gap_bookkeeping_by_hand():
    """The benchmark's gap windows: events read together count as one; hand-computed gaps."""
    from benchmarks.head_of_line import gaps_in, summary

    arrivals = [[0.0, 0.010, 0.0102, 0.030, 0.100], [0.005, 0.020]]
    assert [round(g, 3) for g in gaps_in(arrivals, 0.0, 1.0)] == [10.0, 20.0, 70.0, 15.0]
    assert [round(g, 3) for g in gaps_in(arrivals, 0.025, 0.2)] == [20.0, 70.0]
    s = summary([10.0, 20.0, 70.0, 15.0])
    assert (s["median_ms"], s["max_ms"], s["n"]) == (17.5, 70.0, 4)


def test_seeded_sampling_and_logprobs_are_the_same_with_a_warm_prefix(layout):
    gen, _ = layout
    options = dict(do_sample=True, top_k=30, temperature=0.8, seed=17, max_new_tokens=10, logprobs=2)
    target = PREFIX + SUFFIXES[0]
    cold, _ = run(gen.engine(prefix_cache=False), [(0, "s", target, options)])
    engine = gen.engine()
    run(engine, [(0, "fill", PREFIX + SUFFIXES[2], dict(GREEDY, max_new_tokens=1))])
    hits = engine.prefix_cache.hits
    warm, _ = run(engine, [(0, "s", target, options)])
    assert engine.prefix_cache.hits - hits >= 16  # it did start from cached blocks
    assert warm["s"].token_ids == cold["s"].token_ids
    np.testing.assert_allclose([lp.logprob for lp in warm["s"].logprobs], [lp.logprob for lp in cold["s"].logprobs],
                               atol=2e-4)


def test_prompt_logprobs_in_chunks_while_rows_run_equal_transformers(layout):
    """A scoring request (echo + logprobs) joining running rows is prefilled in chunks like any
    prompt (its logprobs gathered chunk by chunk, no prefix reuse) instead of one long forward."""
    gen, model = layout
    text = PREFIX + SUFFIXES[1]
    ids = gen.encode(text)
    engine = gen.engine(max_prefill_tokens=8)
    run(engine, [(0, "warm", PREFIX + SUFFIXES[0], dict(GREEDY, max_new_tokens=1))])  # cached blocks to ignore
    hits = engine.prefix_cache.hits
    finals, seen = run(engine, [(0, "busy", SHORT[0], dict(GREEDY, max_new_tokens=20, min_new_tokens=20)),
                                (1, "score", text, dict(prompt_logprobs=2, max_new_tokens=1, do_sample=False))])
    assert engine.prefix_cache.hits == hits  # not reused: every position's logits are needed
    assert seen["score"][0] >= 1 + len(ids) // 8 - 1  # it took several steps: chunks
    lps = finals["score"].prompt_logprobs
    assert [lp.token_id for lp in lps] == ids[1:]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    np.testing.assert_allclose([lp.logprob for lp in lps], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert [[t for t, _ in lp.top] for lp in lps] == [list(np.argsort(-r, kind="stable")[:2]) for r in ref[:-1]]


# ---- no lone prompt token: a prompt's KV is the same however it is chunked ---------------------

def test_prefill_chunk_never_leaves_or_takes_a_lone_token() -> None:
    from jaonnx.generation.engine import prefill_chunk

    for remaining in range(1, 70):
        for budget in range(1, 70):
            n = prefill_chunk(remaining, budget)
            assert 1 <= n <= remaining and n <= max(budget, 2) + 1, (remaining, budget, n)
            if remaining > 1:
                assert n >= 2 and remaining - n != 1, (remaining, budget, n)
            if budget >= remaining:
                assert n == remaining


def _logprobs(engine, joins: dict[int, list[tuple[str, list[int]]]], want: str) -> list[float]:
    """Drive `engine`, adding `joins[step]` before that step; the logprobs request `want` got."""
    options = dict(GREEDY, logprobs=1)
    got: list[float] = []
    step = 0
    while engine.has_unfinished_requests() or joins:
        for rid, ids in joins.pop(step, []):
            engine.add_request(ids, request_id=rid, **options)
        for out in engine.step():
            if out.request_id == want:
                got += [t.logprob for t in out.logprobs or []]
        step += 1
    return got


def test_a_prompt_gives_the_same_bits_whatever_splits_it(gen) -> None:
    """A joining prompt's budget split and a warm prefix both leave no lone token to prefill:
    the twin's fp32 logits from a one-token chunk differ in the last bits (1e-6) from the whole
    prompt's, and quantized artifacts amplify that. The generated tokens' log-probabilities
    must equal the solo run's bit for bit: with a budget that would leave one token for a
    second chunk, and with a cached prefix that would leave one token to compute."""
    rng = np.random.default_rng(3)
    vocab = gen.manifest.tokenizer_size
    prompt = rng.integers(5, vocab, 81).tolist()  # 5 blocks of 16 + 1
    other = rng.integers(5, vocab, 6).tolist()
    solo = _logprobs(gen.engine(max_batch_size=4, prefix_cache=False), {0: [("p", prompt)]}, "p")
    assert len(solo) == GREEDY["max_new_tokens"]
    # rows running, a budget of 80: without the rule the prompt would be prefilled as 80 + 1
    crowd = gen.engine(max_batch_size=4, prefix_cache=False, max_prefill_tokens=80)
    assert _logprobs(crowd, {0: [("o", other)], 1: [("p", prompt)]}, "p") == solo
    # the first 80 tokens cached by another request: without the rule 1 token would be left
    warm = gen.engine(max_batch_size=4)
    assert _logprobs(warm, {0: [("o", prompt[:80] + other)]}, "o") and warm.prefix_cache.hits == 0
    assert _logprobs(warm, {0: [("p", prompt)]}, "p") == solo
    assert warm.prefix_cache.hits == 64  # 4 blocks: the 5th would have left one token

