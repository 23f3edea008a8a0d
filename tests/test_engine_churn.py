"""Rows joining, leaving, aborting and reordering in a running batch, on both KV-cache layouts.

Each test asserts the artifact's `manifest.decoder.kv_layout`, so losing one layout's coverage
fails loudly. Every greedy row must equal transformers' `generate` run on its prompt alone;
every seeded sampled row must equal the same request run alone in the engine.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_via_cli
from helpers import hf_model

import jaonnx
from jaonnx.generation import GenerationEngine, RequestOutput

RECIPE = "gpt2-small-ja"
PROMPTS = ["西田幾多郎は、", "近年の機械学習は急速に進歩しているが、その一方で", "4年に1度オリンピックは開かれる。", "大学で"]
LOOKUP_PROMPT = "東京は日本の首都です。東京は日本の首都です。東京は日本の首都です。東京は"
N = 10
JOIN_AT = 10  # the twin starts copying the repeated prompt (drafts accepted) by this step


def greedy(n: int = N) -> dict:
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n)


def sampled(seed: int, n: int = N) -> dict:
    return dict(do_sample=True, top_k=40, temperature=1.3, seed=seed, max_new_tokens=n, num_return_sequences=1)


@pytest.fixture(scope="module", params=["static", "concat"])
def layout_gen(request, twins_dir: Path, cache_dir: Path):
    """The same twin exported with each KV layout (the paths and flags test_static_cache and
    test_genai use, so the cache holds them once)."""
    if request.param == "static":
        path = export_via_cli(twins_dir / RECIPE, cache_dir / "static-kv" / f"{RECIPE}-fp32", "--kv-cache", "static")
    else:
        path = export_via_cli(twins_dir / RECIPE, cache_dir / "concat" / RECIPE, "--kv-cache", "concat")
    gen = jaonnx.load(path)
    assert gen.manifest.decoder.kv_layout == request.param
    return request.param, gen


@pytest.fixture(scope="module")
def reference(twins_dir: Path):
    """transformers greedy continuation of one prompt alone: (prompt ids, n) -> ids."""
    model = hf_model(twins_dir / RECIPE)

    @functools.lru_cache(maxsize=None)
    def run(prompt_ids: tuple[int, ...], n: int) -> list[int]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny steps: a second, spinning thread only slows them down
        try:
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), do_sample=False, pad_token_id=0,
                                     max_new_tokens=n, min_new_tokens=n)
        finally:
            torch.set_num_threads(threads)
        return out[0, len(prompt_ids):].tolist()

    return run


def drain(engine: GenerationEngine, joins: dict[int, list[tuple[str, str, dict]]] | None = None,
          aborts: dict[int, list[str]] | None = None) -> dict[str, RequestOutput]:
    """Step until done: before step i, add `joins[i]` (prompt, id, options) and abort
    `aborts[i]`. Returns each finished request's final output."""
    joins, aborts = dict(joins or {}), dict(aborts or {})
    finals: dict[str, RequestOutput] = {}
    step = 0
    while engine.has_unfinished_requests() or joins:
        for prompt, rid, options in joins.pop(step, []):
            engine.add_request(prompt, request_id=rid, **options)
        for rid in aborts.pop(step, []):
            assert engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
    assert not aborts, "an abort was scheduled after the engine drained"
    assert engine.num_running_rows == 0 and engine.batch.rows == 0
    return finals


def solo(gen, prompt: str, options: dict) -> list[int]:
    engine = gen.engine(max_batch_size=1)
    engine.add_request(prompt, request_id="solo", **options)
    return drain(engine)["solo"].token_ids


def check_greedy(gen, reference, finals, greedy_rows: dict[str, tuple[str, int]]) -> None:
    for rid, (prompt, n) in greedy_rows.items():
        assert finals[rid].token_ids == reference(tuple(gen.encode(prompt)), n), rid


def test_a_middle_row_leaves(layout_gen, reference):
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    joins = {0: [(PROMPTS[0], "a", greedy()), (PROMPTS[1], "mid", greedy(3)),
                 (PROMPTS[2], "s", sampled(7)), (PROMPTS[3], "d", greedy())]}
    finals = drain(engine, joins)
    assert len(finals["mid"].token_ids) == 3 and len(finals["a"].token_ids) == N
    check_greedy(gen, reference, finals, {"a": (PROMPTS[0], N), "mid": (PROMPTS[1], 3), "d": (PROMPTS[3], N)})
    assert finals["s"].token_ids == solo(gen, PROMPTS[2], sampled(7)), layout


def test_a_middle_row_is_aborted(layout_gen, reference):
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    joins = {0: [(PROMPTS[0], "a", greedy()), (PROMPTS[1], "mid", greedy()),
                 (PROMPTS[2], "s", sampled(8)), (PROMPTS[3], "d", greedy())]}
    finals = drain(engine, joins, aborts={4: ["mid"]})
    assert "mid" not in finals
    check_greedy(gen, reference, finals, {"a": (PROMPTS[0], N), "d": (PROMPTS[3], N)})
    assert finals["s"].token_ids == solo(gen, PROMPTS[2], sampled(8)), layout


def test_two_requests_join_in_one_step(layout_gen, reference):
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    joins = {0: [(PROMPTS[0], "first", greedy(N + 4))],
             3: [(PROMPTS[1], "b", greedy()), (PROMPTS[3], "s", sampled(9))]}
    finals = drain(engine, joins)
    check_greedy(gen, reference, finals, {"first": (PROMPTS[0], N + 4), "b": (PROMPTS[1], N)})
    assert finals["s"].token_ids == solo(gen, PROMPTS[3], sampled(9)), layout


def test_the_two_joiners_were_prefilled_together(layout_gen):
    """The case above really puts two prompts of different lengths into one prefill."""
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    engine.add_request(PROMPTS[0], request_id="first", **greedy())
    engine.step()
    engine.add_request(PROMPTS[1], request_id="b", **greedy())
    engine.add_request(PROMPTS[3], request_id="s", **sampled(9))
    outs = engine.step()
    assert {o.request_id for o in outs} == {"first", "b", "s"} and engine.num_running_rows == 3
    assert len(gen.encode(PROMPTS[1])) != len(gen.encode(PROMPTS[3]))


def test_a_prompt_lookup_request_gains_a_neighbour(layout_gen, reference):
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    n = 24
    joins = {0: [(LOOKUP_PROMPT, "lookup", dict(greedy(n), prompt_lookup=5))],
             JOIN_AT: [(PROMPTS[1], "b", greedy())], JOIN_AT + 2: [(PROMPTS[2], "s", sampled(10))]}
    finals = drain(engine, joins)
    check_greedy(gen, reference, finals, {"lookup": (LOOKUP_PROMPT, n), "b": (PROMPTS[1], N)})
    assert finals["s"].token_ids == solo(gen, PROMPTS[2], sampled(10)), layout


def test_the_lookup_request_was_drafting_when_the_neighbour_came(layout_gen):
    """Prompt lookup accepted drafted tokens before the join (else the case above would
    test nothing but plain decoding)."""
    layout, gen = layout_gen
    engine = gen.engine(max_batch_size=8)
    engine.add_request(LOOKUP_PROMPT, request_id="lookup", prompt_lookup=5, **greedy(24))
    produced = sum(len(o.new_token_ids) for _ in range(JOIN_AT) for o in engine.step())
    assert produced > JOIN_AT, layout


def test_rows_of_different_lengths_reorder_through_keep(layout_gen, reference):
    """`BatchDecoder.keep` with rows in a new order (and one dropped): every row continues
    exactly as transformers alone."""
    layout, gen = layout_gen
    prompts = [gen.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    batch = gen.new_batch()
    steps = 8
    logits = batch.add(prompts, max(map(len, prompts)) + steps)
    order = list(range(len(prompts)))
    tokens: list[list[int]] = [[] for _ in prompts]
    for i in range(steps):
        picked = logits.reshape(len(order), -1).argmax(-1)
        for row, t in zip(order, picked):
            tokens[row].append(int(t))
        if i == 2:
            new = [3, 0, 2]  # reorder, dropping row 1
            batch.keep([order.index(r) for r in new])
            order = new
        if i == 5:
            new = [2, 3]
            batch.keep([order.index(r) for r in new])
            order = new
        logits = batch.step(np.array([[tokens[r][-1]] for r in order], dtype=np.int64))[:, 0]
    assert batch.rows == 2
    for row, prompt in enumerate(prompts):
        expected = reference(tuple(prompt), steps)
        assert tokens[row] == expected[: len(tokens[row])], (layout, row)
    batch.keep([])
    assert batch.rows == 0
