"""ORT's offline transformer fusions, and the timing that decides whether to keep them.

The decision times the candidate graphs interleaved (A/B/A/B, order alternating each round),
so a slow minute on a shared machine slows every candidate alike; a candidate is kept only
when its median speed-up over the plain graph beats a margin above the rounds' own spread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaonnx.artifact import Manifest
from jaonnx.session import create_session

MIN_GAIN = 0.02  # a fused graph must be at least 2% faster, and more than the measured spread
ROUNDS = 7
RUNS_PER_ROUND = 8


def model_type(manifest: Manifest) -> str:
    return "gpt2" if manifest.task == "text-generation" else "bert"


def optimize_graph(src: Path, dst: Path, manifest: Manifest, config: Any, attention: bool = True) -> dict[str, Any]:
    """Run ORT's offline transformer optimizer (Python fusions only, opt_level=0: the session
    applies its own graph passes at load) into `dst`; return the fusions it applied.
    `attention=False` keeps the Q/K/V products as MatMuls, so int8/int4 can quantize them."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = model_type(manifest)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    options = FusionOptions(kind)
    options.enable_attention = attention
    optimized = optimize_model(str(src), model_type=kind, num_heads=int(heads), hidden_size=int(hidden),
                               opt_level=0, optimization_options=options)
    fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    external = src.with_suffix(".onnx.data").exists()
    optimized.save_model_to_file(str(dst), use_external_data_format=external, all_tensors_to_one_file=True)
    return {"model_type": kind, "attention_fusion": attention, "fusions": fusions}


def timing_feed(manifest: Manifest, session: Any, batch: int = 1, seq: int = 64) -> dict[str, np.ndarray]:
    """Synthetic inputs of a realistic shape: one decode step after 64 cached tokens, or a
    64-token fill-mask text with one mask."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, min(manifest.vocab_size, 3000), (batch, seq), dtype=np.int64)
    if manifest.task != "text-generation":
        return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
                "mask_positions": np.full((batch, 1), seq // 2, dtype=np.int64)}
    shape = manifest.decoder
    feed = {"input_ids": ids[:, :1], "attention_mask": np.ones((batch, seq + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), seq, dtype=np.int64), "logits_to_keep": np.array([1], dtype=np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = rng.standard_normal((batch, shape.num_heads, seq, shape.head_dim)).astype(dtype)
    return feed


@dataclass
class Decision:
    chosen: str
    ms: dict[str, float]  # median ms of one run per candidate
    gain: dict[str, float]  # median over rounds of 1 - candidate/plain
    spread: dict[str, float]  # half the range of that ratio over the rounds
    margin: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "cpu_ms": self.ms, "gain_vs_plain": self.gain, "spread": self.spread,
                "required_gain": self.margin, "rounds": ROUNDS, "runs_per_round": RUNS_PER_ROUND,
                "rule": "interleaved A/B rounds; kept only when the median gain beats max(2%, the spread)"}


def choose_fastest(candidates: dict[str, Path], manifest: Manifest, rounds: int = ROUNDS,
                   runs: int = RUNS_PER_ROUND) -> Decision:
    """Time every candidate (one must be "plain") in interleaved rounds; pick the fastest one
    whose gain over plain clears its margin, else plain."""
    sessions = {name: create_session(path, providers="cpu", cache=False) for name, path in candidates.items()}
    feeds = {name: timing_feed(manifest, s) for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(3):
            session.run(None, feeds[name])
    names = list(sessions)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times.append(time.perf_counter() - start)
            per_round[name].append(float(np.median(times)) * 1000)
    plain = np.array(per_round["plain"])
    ms = {n: float(np.median(v)) for n, v in per_round.items()}
    gain, spread, margin = {}, {}, {}
    for name in names:
        if name == "plain":
            continue
        ratio = np.array(per_round[name]) / plain
        gain[name] = float(1 - np.median(ratio))
        spread[name] = float((ratio.max() - ratio.min()) / 2)
        margin[name] = max(MIN_GAIN, spread[name])
    passing = [n for n in gain if gain[n] > margin[n]]
    chosen = max(passing, key=lambda n: gain[n]) if passing else "plain"
    return Decision(chosen, ms, gain, spread, margin)
