"""Per-row (batch-invariant) int8 against the per-tensor DynamicQuantizeMatMul it replaced,
and int4 configurations, on a real-shape decoder (random weights): decode ms/token and
prefill ms at 128 tokens, CPU time at 1 intra-op thread (time.process_time), interleaved
rounds in one process, through the runtime's own engine. Also: greedy ids alone vs in a
batch of 8 (batch invariance) and top-1 agreement of the last-position logits with fp32.

    python row_quant.py ROUNDS NAME=ARTIFACT_DIR ...    # first one is the fp32 reference
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import jaonnx

ROUNDS = int(sys.argv[1])
named = dict(a.split("=", 1) for a in sys.argv[2:])
models = {name: jaonnx.load(path, providers="cpu", intra_op_threads=1) for name, path in named.items()}
rng = np.random.default_rng(0)
vocab = next(iter(models.values())).manifest.tokenizer_size or 32000
PROMPT = rng.integers(100, vocab - 100, 128).tolist()
PROMPTS8 = [rng.integers(100, vocab - 100, n).tolist() for n in (3, 7, 12, 20, 33, 50, 64, 90)]


def prefill_ms(gen) -> float:
    """One engine step that prefills 128 tokens and picks the first new one (last-position logits)."""
    engine = gen.engine(max_batch_size=1)
    engine.add_request(PROMPT, do_sample=False, max_new_tokens=1)
    t = time.process_time()
    engine.step()
    return (time.process_time() - t) * 1e3


def decode_ms(gen, steps: int = 24) -> float:
    engine = gen.engine(max_batch_size=1)
    engine.add_request(PROMPT[:32], do_sample=False, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
    engine.step()  # prefill + first token
    t = time.process_time()
    while engine.has_unfinished_requests():
        engine.step()
    return (time.process_time() - t) * 1e3 / steps


def invariant(gen) -> str:
    options = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    solo = []
    for p in PROMPTS8:
        e = gen.engine(max_batch_size=1)
        e.add_request(p, request_id="x", **options)
        while e.has_unfinished_requests():
            out = [o for o in e.step() if o.finished]
        solo.append(out[0].token_ids)
    e = gen.engine(max_batch_size=8)
    for i, p in enumerate(PROMPTS8):
        e.add_request(p, request_id=str(i), **options)
    together = {}
    while e.has_unfinished_requests():
        together |= {o.request_id: o.token_ids for o in e.step() if o.finished}
    return f"{sum(together[str(i)] != s for i, s in enumerate(solo))}/8 differ"


results: dict[str, dict] = {n: {"prefill128_ms": [], "decode_ms": []} for n in models}
for _ in range(ROUNDS):
    for name, gen in models.items():
        results[name]["prefill128_ms"].append(prefill_ms(gen))
        results[name]["decode_ms"].append(decode_ms(gen))
reference = next(iter(models.values())).new_batch().logits(PROMPT)
for name, gen in models.items():
    logits = gen.new_batch().logits(PROMPT)
    r = results[name]
    r["prefill128_ms"] = float(np.median(r["prefill128_ms"]))
    r["decode_ms"] = float(np.median(r["decode_ms"]))
    r["top1_vs_first"] = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    r["batch_vs_solo"] = invariant(gen)
    print(json.dumps({name: r}), flush=True)
