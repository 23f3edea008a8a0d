"""Timing on one machine, side by side (numpy + onnxruntime [+ onnxruntime_genai] only):
decode ms/token at context 64 (bare IO-binding loop, the same as jaonnx's DecoderSession),
fill-mask ms at seq 32/128, cold start (new process -> first result) with and without the
cached ORT-optimized graph, and onnxruntime-genai's decode loop on the same graph.

    python bench.py ROOT THREADS ROUNDS   # ROOT holds one directory per configuration
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT, THREADS, ROUNDS = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CONTEXT, STEPS = 64, int(os.environ.get("STEPS", "32"))


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Decoder:
    def __init__(self, path: Path) -> None:
        self.s = session(path)
        self.past = [i for i in self.s.get_inputs() if i.name.startswith("past_key_values.")]
        self.present = [o.name for o in self.s.get_outputs() if o.name.startswith("present.")]
        heads, dim = self.past[0].shape[1], self.past[0].shape[3]
        self.dtype = np.float16 if "float16" in self.past[0].type else np.float32
        self.empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, 0, dim), self.dtype))

    def step(self, ids: np.ndarray, mask_len: int, start: int, cache: list) -> tuple[np.ndarray, list]:
        b = self.s.io_binding()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", np.ones((1, mask_len), np.int64))
        b.bind_cpu_input("position_ids", np.arange(start, start + ids.shape[1], dtype=np.int64)[None])
        b.bind_cpu_input("logits_to_keep", np.array([1], np.int64))
        for i, v in zip(self.past, cache):
            b.bind_ortvalue_input(i.name, v)
        b.bind_output("logits", "cpu")
        for n in self.present:
            b.bind_output(n, "cpu")
        self.s.run_with_iobinding(b)
        out = b.get_outputs()
        return out[0].numpy(), list(out[1:])

    def ms_per_token(self) -> float:
        ids = np.arange(10, 10 + CONTEXT, dtype=np.int64)[None]
        logits, cache = self.step(ids, CONTEXT, 0, [self.empty] * len(self.past))
        start = time.perf_counter()
        for k in range(STEPS):
            nxt = np.array([[int(logits[0, -1].argmax()) % 3000]], np.int64)
            logits, cache = self.step(nxt, CONTEXT + k + 1, CONTEXT + k, cache)
        return (time.perf_counter() - start) * 1000 / STEPS


def genai_ms_per_token(directory: Path) -> float:
    import onnxruntime_genai as og

    path = directory / "genai_config.json"
    settings = json.loads(path.read_text())
    settings["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS  # same threads as ours
    settings["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
    path.write_text(json.dumps(settings))
    config = og.Config(str(directory))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=CONTEXT + STEPS + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.arange(10, 10 + CONTEXT, dtype=np.int32)[None])
    gen.generate_next_token()
    start = time.perf_counter()
    for _ in range(STEPS):
        gen.generate_next_token()
    return (time.perf_counter() - start) * 1000 / STEPS


def fill_mask_ms(s: ort.InferenceSession, seq: int) -> float:
    feed = {"input_ids": (np.arange(seq, dtype=np.int64)[None] % 3000) + 5, "attention_mask": np.ones((1, seq), np.int64),
            "mask_positions": np.array([[seq // 2]], np.int64)}
    s.run(None, feed)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def interleaved(fns: dict, rounds: int) -> dict:
    results = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            results[k].append(fns[k]())
    return {k: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))} for k, v in results.items()}


COLD = """
import sys, time, numpy as np
sys.path.insert(0, "runtime")
from jaonnx.session import create_session
s = create_session(sys.argv[1], providers="cpu", intra_op_threads=%d)
feed = %s
s.run(None, feed)
"""


def cold_start(model: Path, decoder: bool, cache_dir: str) -> float:
    if decoder:
        s = session(model)
        past = {i.name: (1, i.shape[1], 0, i.shape[3]) for i in s.get_inputs() if i.name.startswith("past")}
        feed = ("{'input_ids': np.array([[5, 6, 7]]), 'attention_mask': np.ones((1, 3), np.int64), "
                "'position_ids': np.arange(3)[None], 'logits_to_keep': np.array([1]), "
                + ", ".join(f"'{k}': np.zeros({v}, np.float32)" for k, v in past.items()) + "}")
    else:
        feed = "{'input_ids': np.array([[5, 6, 7, 8]]), 'attention_mask': np.ones((1, 4), np.int64), 'mask_positions': np.array([[1]])}"
    env = {**os.environ, "JAONNX_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", COLD % (THREADS, feed), str(model)], check=True, env=env)
    return time.perf_counter() - start


out: dict = {"threads": THREADS, "rounds": ROUNDS, "ort": ort.__version__, "cpu": os.cpu_count()}
decoders = {d.name: d for d in sorted(ROOT.iterdir()) if d.name.startswith("gpt2")}
encoders = {d.name: d for d in sorted(ROOT.iterdir()) if d.name.startswith("bert")}
if decoders:
    models = {k: Decoder(d / "model.onnx") for k, d in decoders.items()}
    for m in models.values():
        m.ms_per_token()
    fns = {k: m.ms_per_token for k, m in models.items()}
    genai_dirs = {f"genai:{k}": d for k, d in decoders.items() if (d / "genai_config.json").exists()}
    try:
        import onnxruntime_genai  # noqa: F401

        fns |= {k: (lambda d=d: genai_ms_per_token(d)) for k, d in genai_dirs.items()}
    except ImportError as exc:
        out["genai_error"] = str(exc)
    out["decode_ms_per_token@64"] = interleaved(fns, ROUNDS)
    print(json.dumps(out["decode_ms_per_token@64"]), flush=True)
if encoders:
    sessions = {k: session(d / "model.onnx") for k, d in encoders.items()}
    for seq in (32, 128):
        out[f"fill_mask_ms@{seq}"] = interleaved({k: (lambda s=s: fill_mask_ms(s, seq)) for k, s in sessions.items()}, ROUNDS)
        print(json.dumps(out[f"fill_mask_ms@{seq}"]), flush=True)
cold = {}
for key, d in list(decoders.items())[:3] + list(encoders.items())[:1]:
    cache = f"/tmp/ortcache-{key}"
    first = cold_start(d / "model.onnx", key.startswith("gpt2"), "off")
    fill = cold_start(d / "model.onnx", key.startswith("gpt2"), cache)  # writes the cache
    runs = {"uncached": [], "cached": []}
    for _ in range(3):
        runs["uncached"].append(cold_start(d / "model.onnx", key.startswith("gpt2"), "off"))
        runs["cached"].append(cold_start(d / "model.onnx", key.startswith("gpt2"), cache))
    cold[key] = {k: float(np.median(v)) for k, v in runs.items()} | {"first_ever": first, "cache_fill": fill}
    print(key, cold[key], flush=True)
out["cold_start_s"] = cold
Path(os.environ.get("OUT", "/tmp")).joinpath(f"bench-t{THREADS}.json").write_text(json.dumps(out, indent=1))
