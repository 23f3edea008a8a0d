"""The CUDA path's CPU-side checks (issue 19): the fused static decoder graph against
transformers (fp32 and fp16, on the CPU), the static placement rule that predicts whether ORT
can capture the graph as one CUDA graph, and the capture machinery's batch-size buckets run
with a fake device (the CPU execution provider), token for token against the uncaptured decoder."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.decoder_loops import join_leave
from conftest import export_via_cli
from helpers import batch_greedy, hf_greedy, hf_logits, hf_model

RECIPE = "gpt2-small-ja"
PROMPTS = [[5, 17, 200, 33, 9, 41, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


# ---- the graph builder against transformers -----------------------------------------------------


def _random_gpt2(activation: str, tied: bool):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64,
                                     activation_function=activation, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).eval()


def _build(model, directory: Path, fused: bool = True, fp16: bool = False) -> Path:
    from jaonnx_export import decoder_graph
    from jaonnx_export.fp16 import convert_fp16

    path = directory / "fp32" / "model.onnx"
    path.parent.mkdir(parents=True)
    decoder_graph.build(model, path, fused=fused)
    if not fp16:
        return path
    half = directory / "fp16" / "model.onnx"
    half.parent.mkdir()
    convert_fp16(path, half, "model.onnx.data")
    return half


def _manifest(model, path: Path):
    from jaonnx.artifact import Manifest
    from jaonnx_export import decoder_graph
    from jaonnx_export.graph_info import io_dtypes

    inputs, outputs = io_dtypes(path)
    return Manifest(recipe=RECIPE, task="text-generation", model_file=path.name, tokenizer_file="spiece.model",
                    special_ids={}, vocab_size=int(model.config.vocab_size), max_positions=int(model.config.n_positions),
                    inputs=inputs, outputs=outputs, dtype="fp16" if inputs["past_key_values.0.key"] == "float16" else "fp32",
                    decoder=decoder_graph.decoder_shape(model.config))


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _prefill_logits(session, model, ids: list[int], keep: int, dtype=np.float32) -> np.ndarray:
    n, heads = len(ids), int(model.config.n_head)
    feed = {"input_ids": np.array([ids]), "position_ids": np.arange(n)[None], "seqlens_k": np.array([n - 1], np.int32),
            "total_sequence_length": np.array(n, np.int32), "logits_to_keep": np.array([keep])}
    empty = np.zeros((1, heads, 0, int(model.config.n_embd) // heads), dtype)
    feed |= {f"past_key_values.{i}.{kv}": empty for i in range(model.config.n_layer) for kv in ("key", "value")}
    return session.run(["logits"], feed)[0][0]


@pytest.fixture(scope="module")
def twin(twins_dir: Path):
    return hf_model(twins_dir / RECIPE)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_fp32_graph_logits_and_greedy_match_transformers(twin, tmp_path: Path, fused: bool) -> None:
    from jaonnx.generation.static_cache import StaticBatchDecoder

    path = _build(twin, tmp_path, fused=fused)
    session = _session(path)
    ids = PROMPTS[0]
    want = hf_logits(twin, ids)
    np.testing.assert_allclose(_prefill_logits(session, twin, ids, 1 << 30), want, atol=1e-4)
    np.testing.assert_allclose(_prefill_logits(session, twin, ids, 3), want[-3:], atol=1e-4)  # logits_to_keep
    decoder = StaticBatchDecoder(session, _manifest(twin, path))
    assert batch_greedy(decoder, PROMPTS, 8) == [hf_greedy(twin, p, 8) for p in PROMPTS]


@pytest.mark.parametrize(("activation", "tied"), [("gelu_new", False), ("gelu", True), ("relu", True)])
def test_every_activation_and_an_untied_head_match_transformers(tmp_path: Path, activation: str, tied: bool) -> None:
    import onnx

    model = _random_gpt2(activation, tied)
    path = _build(model, tmp_path)
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert {"gelu_new": "FastGelu", "gelu": "BiasGelu", "relu": "Relu"}[activation] in ops
    ids = [3, 50, 7, 99, 12]
    np.testing.assert_allclose(_prefill_logits(_session(path), model, ids, 1 << 30), hf_logits(model, ids), atol=1e-4)


def test_fp16_graph_on_cpu_matches_transformers_loosely(twin, tmp_path: Path) -> None:
    """fp16 runs on the CPU too (slowly): logits within fp16 tolerance, greedy tokens equal."""
    from jaonnx.generation.static_cache import StaticBatchDecoder

    path = _build(twin, tmp_path, fp16=True)
    session = _session(path)
    for ids in PROMPTS:
        want = hf_logits(twin, ids)
        got = _prefill_logits(session, twin, ids, 1 << 30, np.float16)
        assert got.dtype == np.float32  # logits stay fp32 for the caller's softmax
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()
    decoder = StaticBatchDecoder(session, _manifest(twin, path))
    assert decoder.dtype == np.float16
    assert batch_greedy(decoder, PROMPTS, 8) == [hf_greedy(twin, p, 8) for p in PROMPTS]


def test_fused_fp16_graph_keeps_layer_norm_in_fp16(twin, tmp_path: Path) -> None:
    """No LayerNormalization, so no Cast pair around one: the only Cast makes the fp32 logits."""
    import onnx

    graph = onnx.load(str(_build(twin, tmp_path, fp16=True)), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    layers = int(twin.config.n_layer)
    assert ops["SkipLayerNormalization"] == 2 * layers + 1 and ops["FastGelu"] == layers
    assert ops["LayerNormalization"] == 0 and ops["Cast"] == 1
    plain = onnx.load(str(_build(twin, tmp_path / "plain", fused=False, fp16=True)), load_external_data=False).graph
    assert collections.Counter(n.op_type for n in plain.node)["Cast"] > 2 * layers  # what the fusion removes


# ---- placement: can ORT capture the graph? ------------------------------------------------------


def test_static_fp16_graph_has_no_cpu_node_and_no_host_copy(twin, tmp_path: Path) -> None:
    import onnx

    from jaonnx_export import cuda_placement

    for fused in (True, False):
        path = _build(twin, tmp_path / str(fused), fused=fused, fp16=True)
        assert cuda_placement.problems(onnx.load(str(path), load_external_data=False)) == []


def test_placement_rule_finds_shape_subgraphs_host_copies_and_missing_kernels() -> None:
    """The old logits tail (Shape -> Concat -> Reshape, logits_to_keep -> Neg -> Slice) and an
    op without a CUDA kernel (its input copied to the host, its consumer pulled to the CPU too,
    as ORT's fallback does): each is reported."""
    from onnx import TensorProto, helper, numpy_helper

    from jaonnx_export import cuda_placement

    def const(name: str, values: list[int]):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    nodes = [
        helper.make_node("Neg", ["keep"], ["start"], name="neg"),
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["kept"], name="slice"),
        helper.make_node("Reshape", ["kept", "flat"], ["kept2d"], name="flatten"),
        helper.make_node("Shape", ["kept"], ["lead"], name="shape", end=2),
        helper.make_node("Concat", ["lead", "vocab"], ["shape3d"], name="concat", axis=0),
        helper.make_node("Reshape", ["kept2d", "shape3d"], ["y"], name="reshape"),
        helper.make_node("Mystery", ["y"], ["z"], name="mystery", domain="example.org"),
        helper.make_node("Relu", ["z"], ["out"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "old_tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4]),
         helper.make_tensor_value_info("keep", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [const("end", [1 << 40]), const("axis", [1]), const("flat", [-1, 4]), const("vocab", [4])],
    )
    found = cuda_placement.problems(helper.make_model(graph))
    assert any(p.startswith("concat:") and "shape subgraph" in p for p in found), found
    assert any(p.startswith("start: MemcpyToHost") for p in found), found
    assert any(p.startswith("mystery:") and "no CUDA kernel" for p in found), found
    assert any(p.startswith("y: MemcpyToHost") for p in found), found  # to the CPU for Mystery
    assert any(p.startswith("relu:") for p in found), found  # ORT keeps Mystery's consumer on the CPU
    assert len(found) == 5, found


# ---- the capture machinery, on a fake device ----------------------------------------------------


def test_buckets_are_vllm_sizes_and_bad_sizes_are_one_line_errors() -> None:
    from jaonnx.errors import JaonnxError
    from jaonnx.generation.cuda_graphs import bucket_for, buckets

    assert buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert buckets(5) == (1, 2, 4, 5) and buckets(1) == (1,)
    assert [bucket_for(r, buckets(32)) for r in (1, 2, 3, 5, 8, 9, 25, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 32, None]
    with pytest.raises(JaonnxError) as err:
        buckets(0)
    assert "cuda_graph_max_batch" in str(err.value) and "\n" not in str(err.value)


def test_cuda_graph_option_defaults_to_static_fp16_and_rejects_concat(twin, tmp_path: Path) -> None:
    import dataclasses

    from jaonnx.errors import JaonnxError
    from jaonnx.generation.cuda_graphs import check_option, enabled

    manifest = _manifest(twin, _build(twin, tmp_path))
    assert check_option(None, manifest) is False  # fp32: CPU artifact
    assert check_option(None, dataclasses.replace(manifest, dtype="fp16")) is True
    assert check_option(False, dataclasses.replace(manifest, dtype="fp16")) is False
    concat = dataclasses.replace(manifest, decoder=dataclasses.replace(manifest.decoder, kv_layout="concat"))
    with pytest.raises(JaonnxError, match="cuda_graph=True needs"):
        check_option(True, concat)

    def fake(providers: list[str], options: dict) -> SimpleNamespace:
        return SimpleNamespace(get_providers=lambda: providers, get_provider_options=lambda: options)

    cuda = "CUDAExecutionProvider"
    assert enabled(fake([cuda, "CPUExecutionProvider"], {cuda: {"enable_cuda_graph": "1"}}))
    assert not enabled(fake([cuda], {cuda: {"enable_cuda_graph": "0"}}))
    assert not enabled(fake(["CPUExecutionProvider"], {}))


class _Recording:
    """A CPU session that records each run's gpu_graph_id and the addresses bound for it."""

    def __init__(self, session) -> None:
        self.session = session
        self.runs: list[str | None] = []

    def __getattr__(self, name: str):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding, options=None) -> None:
        self.runs.append(options.get_run_config_entry("gpu_graph_id") if options is not None else None)
        self.session.run_with_iobinding(binding, options)

    def run(self, names, feed, options=None):
        self.runs.append(options.get_run_config_entry("gpu_graph_id") if options is not None else None)
        return self.session.run(names, feed, options)


def _join_leave(decoder) -> list[list[int]]:
    """Two rows, a third joins after 4 tokens, the middle one leaves after 8: greedy tokens."""
    return join_leave(decoder, PROMPTS, 12, 4, 20)


def test_fake_device_capture_gives_the_uncaptured_tokens_as_rows_join_and_leave(twin, tmp_path: Path) -> None:
    from jaonnx.generation.cuda_graphs import CudaGraphs
    from jaonnx.generation.static_cache import StaticBatchDecoder

    path = _build(twin, tmp_path)
    manifest = _manifest(twin, path)
    plain = _join_leave(StaticBatchDecoder(_session(path), manifest, cuda_graphs=False))
    session = _Recording(_session(path))
    graphs = CudaGraphs(session, "cpu", manifest.vocab_size)
    decoder = StaticBatchDecoder(session, manifest, cuda_graphs=graphs)
    assert _join_leave(decoder) == plain
    # 2 rows -> bucket 2; 3 rows -> bucket 4 (the cache grows to 4 slots: a new allocation);
    # back to 2 rows -> bucket 2 again, captured anew under the new allocation.
    assert [size for _, size in graphs.captured] == [2, 4, 2]
    assert len({key for key, _ in graphs.captured}) == 2
    decode = [r for r in session.runs if r != "-1"]
    ids = [graph.graph_id for graph in graphs.graphs]
    assert len(decode) == 12 and set(decode) == set(ids) and len(set(ids)) == 3  # each step replayed a bucket
    assert session.runs.count("-1") == 2 and None not in session.runs  # the two prefills: uncaptured
    other = CudaGraphs(session, "cpu", manifest.vocab_size)  # a second decoder on the same session
    assert _join_leave(StaticBatchDecoder(session, manifest, cuda_graphs=other)) == plain
    assert not {g.graph_id for g in other.graphs} & set(ids)  # never replays another cache's graph


def test_batches_beyond_the_largest_bucket_and_blocks_run_uncaptured(twin, tmp_path: Path) -> None:
    from jaonnx.generation.cuda_graphs import CudaGraphs, buckets
    from jaonnx.generation.static_cache import StaticBatchDecoder

    path = _build(twin, tmp_path)
    manifest = _manifest(twin, path)
    session = _Recording(_session(path))
    graphs = CudaGraphs(session, "cpu", manifest.vocab_size, buckets(2))
    decoder = StaticBatchDecoder(session, manifest, cuda_graphs=graphs)
    assert batch_greedy(decoder, PROMPTS, 4) == [hf_greedy(twin, p, 4) for p in PROMPTS]
    assert graphs.captured == [] and set(session.runs) == {"-1"}  # 3 rows > 2: never captured
    decoder = StaticBatchDecoder(session, manifest, cuda_graphs=graphs)
    logits = decoder.add([PROMPTS[0]], reserve=8)
    decoder.step(np.array([[int(logits[0].argmax()), 5]]))  # a 2-token block: uncaptured
    assert graphs.captured == []


# ---- the exported fp16 artifact --------------------------------------------------------------


def test_fp16_static_export_passes_its_quality_report_and_is_capturable(twins_dir: Path, cache_dir: Path) -> None:
    """`jaonnx export --dtype fp16` of a static-layout decoder: the fused graph, a quality report
    against PyTorch that passes, and nothing that would stop CUDA graph capture."""
    import onnx

    from jaonnx_export import cuda_placement

    out = export_via_cli(twins_dir / RECIPE, cache_dir / "precision" / f"{RECIPE}-fp16", "--dtype", "fp16",
                         "--no-optimize")
    manifest = json.loads((out / "jaonnx.json").read_text(encoding="utf-8"))
    assert manifest["decoder"]["kv_layout"] == "static" and manifest["dtype"] == "fp16"
    quality = manifest["quality"]
    assert quality["precision"] == "fp16" and quality["texts"] > 10
    assert quality["top1_agreement"] >= 0.95, quality
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert cuda_placement.problems(model) == []


def test_fp16_static_artifact_generates_on_cpu_with_capture_on_by_default(twins_dir: Path, cache_dir: Path,
                                                                          twin) -> None:
    """The default (cuda_graph on for static fp16) is harmless where there is no CUDA: the CPU
    session runs uncaptured and greedy decoding equals transformers."""
    import jaonnx
    from jaonnx.session import _provider_options

    out = export_via_cli(twins_dir / RECIPE, cache_dir / "precision" / f"{RECIPE}-fp16", "--dtype", "fp16",
                         "--no-optimize")
    model = jaonnx.load(out, providers="cpu")
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    text = "近年の機械学習は"
    got = model.generate(text, max_new_tokens=6, do_sample=False, min_new_tokens=6, return_ids=True)
    assert got.generated_ids == hf_greedy(twin, got.prompt_ids, 6)
    cuda = _provider_options("CUDAExecutionProvider", cuda_graph=True)
    assert cuda["enable_cuda_graph"] == "1" and cuda["enable_skip_layer_norm_strict_mode"] == "1"
    assert _provider_options("CUDAExecutionProvider")["enable_cuda_graph"] == "0"


# ---- the one-call GPU check, dry run on the CPU -------------------------------------------------


def _gpu_check(tmp_path: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "JAONNX_GPU_SITE": str(tmp_path / "site"),
           "JAONNX_GPU_PARTS": str(tmp_path / "parts")}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=600, env=env)


def _number(value: object) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_gpu_check_dry_run_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --providers cpu: the tiny shape through every section the GPU
    run reports (the capture machinery on the fake device), all of them passing."""
    proc = _gpu_check(tmp_path, "--providers", "cpu", "--quick", "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    failed = {k: v for k, v in r.items() if isinstance(v, dict) and "failed" in v}
    assert not failed, failed
    assert r["greedy"]["ok"] and r["greedy"]["equal_captured"] and r["greedy"]["reference"] == "transformers"
    assert r["capture"] == {"identical": True, "graphs": [2, 4, 2]}
    decode = r["decode"]
    # timings are differences of two timed runs: on a tiny twin they can be ~0 or negative; the dry
    # run checks that every section ran and reported a number, not how fast
    assert all(_number(decode[f"{m}_b1_ctx{c}_ms"]) for m in ("captured", "uncaptured") for c in (64, 512))
    assert _number(decode["captured_b8_tokens_per_s"])
    assert r["bench"]["providers"] == "CPUExecutionProvider" and _number(r["bench"]["decode_ms_per_token"]["median"])
    assert set(r["serving"]) == {"1", "8"}
    assert all(v["tokens_per_s"] > 0 and v["ttft_ms_p50"] > 0 and v["per_token_ms_p99"] is not None
               for v in r["serving"].values())
    assert r["cold_start_s"] > 0 and r["targets"]["measured_on"] == "cpu"


def test_gpu_check_without_onnxruntime_gpu_says_what_is_missing(tmp_path: Path) -> None:
    proc = _gpu_check(tmp_path, "--quick")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: onnxruntime-gpu is not installed"), proc.stderr


def test_bench_providers_option_and_its_errors(twins_dir: Path, cache_dir: Path) -> None:
    """`jaonnx bench --providers`: bad values and an absent CUDA are one-line errors; a CUDA
    result (no host-bandwidth floor, no RSS) renders without the CPU-only rows."""
    from rich.console import Console

    from helpers import assert_one_line_error, jaonnx_cli
    from jaonnx.bench.command import table

    out = export_via_cli(twins_dir / RECIPE, cache_dir / "precision" / f"{RECIPE}-fp16", "--dtype", "fp16",
                         "--no-optimize")
    assert_one_line_error(jaonnx_cli("bench", str(out), "--providers", "tpu"), "--providers")
    assert_one_line_error(jaonnx_cli("bench", str(out), "--providers", "cuda"), "CUDAExecutionProvider")
    stat = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1, "spread": 0.0}
    result = {"artifact": str(out), "recipe": RECIPE, "precision": "fp16", "threads": 1, "task": "text-generation",
              "providers": "CUDAExecutionProvider", "context": 64, "ttft_ms": stat, "decode_ms_per_token": stat,
              "bare_loop_ms_per_token": stat, "overhead_ms_per_token": stat, "tokens_per_s": {"8": stat},
              "floor_ms_per_token": None, "floor_ratio": None, "bandwidth_gbs": None, "peak_rss_mib": None}
    console = Console(record=True, width=200)
    console.print(table(result))
    text = console.export_text()
    assert "CUDAExecutionProvider" in text and "greedy tokens/s, batch 8" in text
    assert "floor" not in text


def test_cuda_graph_true_on_a_concat_decoder_is_a_one_line_error(twins_dir: Path, cache_dir: Path) -> None:
    import jaonnx
    from jaonnx.errors import JaonnxError

    # rinna-gpt-1b's twin has head_dim 4, which GroupQueryAttention cannot take: a concat layout
    concat = export_via_cli(twins_dir / "rinna-gpt-1b", cache_dir / "artifacts" / "rinna-gpt-1b")
    assert jaonnx.load(concat, providers="cpu").manifest.decoder.kv_layout == "concat"
    with pytest.raises(JaonnxError) as err:
        jaonnx.load(concat, providers="cpu", cuda_graph=True)
    assert "cuda_graph=True" in str(err.value) and "\n" not in str(err.value)


def test_gpu_check_on_a_machine_without_cuda_stops_before_building(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--providers", "cuda", "--out", str(tmp_path / "r.json"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == 1 and "CUDAExecutionProvider is not available" in proc.stderr
    assert "CUDAExecutionProvider is not available" in json.loads((tmp_path / "r.json").read_text())["error"]
    assert not (tmp_path / "work").exists()  # nothing built at the 1.3B shape
