"""The benchmark suite and `jaonnx bench`: a smoke run of the suite on twin-sized shapes, the
command on the twin artifacts (JSON fields, the profile summary), and the measuring core's logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, jaonnx_cli

from benchmarks import report
from benchmarks.__main__ import main
from jaonnx.bench import Calibrator, interleave, ratio_stats, stats, summarize_profile, weight_bytes
from jaonnx.bench.floor import floor_ms


def test_smoke_run_writes_table_json_and_plots(twins_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    main(["--tiny", "--quick", "--only", "fill_mask,size", "--twins", str(twins_dir), "--no-peers",
          "--rounds", "1", "--slow-tolerance", "0", "--cache", str(cache_dir / "bench"), "--out", str(out),
          "--threads", "1"])
    results = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    runs = results["runs"]["fill_mask"]
    assert {"torch", "jaonnx-fp32", "jaonnx-int8"} <= set(runs)
    # int4 is measured once the export offers it, and recorded as unavailable until then
    assert "jaonnx-int4" in runs or "jaonnx-int4" in results["unavailable"]
    for engine, rounds in runs.items():
        assert len(rounds) == 1 and "error" not in rounds[0], (engine, rounds)
        assert rounds[0]["latency"]["16"]["median"] > 0 and rounds[0]["peak_rss_mib"] > 0
    sanity = runs["torch"][0]["sanity"]
    assert sanity["pipeline_ms"]["median"] > 0 and sanity["plain_forward_ms"]["median"] > 0
    assert results["sizes"]["bert-base"]["jaonnx-int8"] < results["sizes"]["bert-base"]["jaonnx-fp32"]
    assert results["machine"]["versions"]["onnxruntime"] and results["machine"]["read_bandwidth_gbs"] > 0
    table = (out / "latest.md").read_text(encoding="utf-8")
    assert "| fill-mask BERT-base, batch 1, seq 128 |" in table and "PyTorch eager" in table
    assert "Baseline sanity" in table
    assert (out / "fill_mask_latency.png").stat().st_size > 1000


def _results(**runs: object) -> dict:
    return {"mode": "test", "started": "now", "seconds": 1,
            "params": {"threads": 2, "seqs": [32], "fm_batches": [], "decode": [64], "gen_batches": [], "rounds": 3},
            "machine": {"cpu": "x", "isa": [], "logical_cores": 2, "memory_mib": 1, "versions": {}, "python": "3",
                        "read_bandwidth_gbs": 10.0},
            "weight_bytes": {"gpt2-small": {"fp32": 200_000_000, "int8": 50_000_000}},
            "kv_bytes_per_context_token": {"gpt2-small": 0}, "runs": runs,
            "unavailable": {"jaonnx-int4": "export failed: no int4"}}


def test_cells_are_median_of_rounds_with_spread_and_per_round_ratios() -> None:
    lat = lambda *ms: [{"latency": {"32": {"median": m}}} for m in ms]  # noqa: E731
    results = _results(fill_mask={"torch": lat(120.0, 100.0, 140.0), "jaonnx-fp32": lat(60.0, 50.0, 20.0),
                                  "jaonnx-int8": lat(30.0, 25.0, 35.0)})
    line = next(l for l in report.markdown(results).splitlines() if "seq 32 |" in l)
    # torch median 120 (spread 40/120 -> ±17%); fp32 per-round ratios 2, 2, 7 -> 2.00×
    assert "120.0 ms ±17%" in line and "(2.00×, 2.00–7.00)" in line and "(4.00×" in line
    assert "unavailable" in line  # the int4 column is shown as unavailable, not dropped


def test_decode_rows_show_the_floor_multiple() -> None:
    dec = lambda ms: [{"decode": {"64": {"median": ms}}, "bare_decode": {"64": {"median": ms - 1}}}]  # noqa: E731
    table = report.markdown(_results(generation={"torch": dec(40.0), "jaonnx-fp32": dec(25.0), "jaonnx-int8": dec(10.0)}))
    line = next(l for l in table.splitlines() if "decode per token, context 64" in l)
    # floors: fp32 200 MB / 10 GB/s = 20 ms, int8 5 ms
    assert "25.0 ms · 1.25× floor (1.60×)" in line and "10.0 ms · 2.00× floor (4.00×)" in line
    outside = next(l for l in table.splitlines() if "work outside the graph" in l)
    assert "1.00 ms" in outside


def test_failed_runs_and_missing_rows_are_recorded_not_hidden() -> None:
    lat = [{"latency": {"32": {"median": 10.0}}}]
    gen = [{"decode": {"64": {"median": 5.0}}, "prompt_lookup": {"error": "unavailable: no prompt_lookup yet"}}]
    table = report.markdown(_results(fill_mask={"torch": lat, "optimum": [{"error": "fill_mask exited 1: boom"}]},
                                     generation={"jaonnx-fp32": gen}))
    assert "| failed |" in table
    assert "boom" in table.split("## Failed runs")[1]
    missing = table.split("## Unavailable columns and rows")[1]
    assert "jaonnx int4: export failed" in missing and "prompt-lookup row (jaonnx fp32): unavailable" in missing


def test_timing_helpers() -> None:
    calls: list[str] = []
    samples = interleave({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b"] * 3 and samples == {"a": [1.0] * 3, "b": [2.0] * 3}
    s = stats([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3) and s.spread == 1.0
    assert ratio_stats([100.0, 90.0, 120.0], [50.0, 30.0, 60.0]).median == 2.0
    with pytest.raises(ValueError):
        stats([])
    assert floor_ms(500_000_000, 25.0) == pytest.approx(20.0)


def test_calibrator_flags_a_slow_window() -> None:
    c = Calibrator(tolerance=1.15, probes=1)
    c.measure()
    best = c.best
    assert c.ok(best * 1.1) and not c.ok(best * 1.5)
    assert c.slowdown(best * 2) == pytest.approx(2.0)


def test_profile_summary_ranks_operator_types() -> None:
    events = [{"cat": "Node", "name": "a_kernel_time", "dur": 3000, "args": {"op_name": "Concat"}},
              {"cat": "Node", "name": "b_kernel_time", "dur": 1000, "args": {"op_name": "MatMul"}},
              {"cat": "Node", "name": "c_kernel_time", "dur": 2000, "args": {"op_name": "Concat"}},
              {"cat": "Node", "name": "a_fence_before", "dur": 9000, "args": {"op_name": "Concat"}},
              {"cat": "Session", "name": "model_run", "dur": 99000}]
    rows = summarize_profile(events)
    assert [r["op"] for r in rows] == ["Concat", "MatMul"]
    assert rows[0]["ms"] == 5.0 and rows[0]["calls"] == 2 and rows[0]["share"] == pytest.approx(5 / 6)


def test_weight_bytes_skips_embedding_lookups(artifacts: dict[str, Path]) -> None:
    art = artifacts["gpt2-small-ja"]
    read, how = weight_bytes(art / "model.onnx")
    size = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    assert 0 < read < size and "lookup" in how


def test_weight_bytes_skips_quantized_lookups_but_not_products(tmp_path: Path) -> None:
    """A hand-built graph: an fp32 table read by Gather, an int8 table (+ scales, zero points) read
    by GatherBlockQuantized, and a [16, 8] fp32 weight read by MatMul: a decode step reads only the
    weight's 16 * 8 * 4 bytes."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((100, 16), np.float32), "table"),
             numpy_helper.from_array(np.zeros((100, 16), np.uint8), "qtable"),
             numpy_helper.from_array(np.ones((100, 1), np.float32), "qscale"),
             numpy_helper.from_array(np.zeros((100, 1), np.uint8), "qzero"),
             numpy_helper.from_array(np.zeros((16, 8), np.float32), "weight")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["a"]),
             helper.make_node("GatherBlockQuantized", ["qtable", "ids", "qscale", "qzero"], ["b"], domain="com.microsoft",
                              gather_axis=0, quantize_axis=1, block_size=16, bits=8),
             helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("MatMul", ["c", "weight"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8])], inits)
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    read, how = weight_bytes(tmp_path / "model.onnx")
    assert read == 16 * 8 * 4 and "lookup" in how


def test_jaonnx_bench_json_for_a_decoder_with_profile(artifacts: dict[str, Path]) -> None:
    proc = jaonnx_cli("bench", str(artifacts["gpt2-small-ja"]), "--json", "--profile", "--threads", "1",
                      "--rounds", "2", "-n", "4", "--context", "16", "--batches", "1,2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["task"] == "text-generation" and r["rounds"] == 2
    assert r["decode_ms_per_token"]["n"] == 2 and r["bare_loop_ms_per_token"]["median"] > 0
    assert set(r["tokens_per_s"]) == {"1", "2"} and all(v["median"] > 0 for v in r["tokens_per_s"].values())
    # decode ms/token is a difference of two timed runs (it can be ~0 on a tiny twin): check the
    # ratio's arithmetic, not its sign
    assert r["floor_ms_per_token"] > 0 and r["bandwidth_gbs"] > 0
    assert r["floor_ratio"] == pytest.approx(r["decode_ms_per_token"]["median"] / r["floor_ms_per_token"])
    assert r["peak_rss_mib"] > 0 and "overhead_ms_per_token" in r
    ops = {row["op"] for row in r["profile"]}
    assert r["profile"] and "MatMul" in ops and all(row["ms"] >= 0 for row in r["profile"])


def test_jaonnx_bench_table_for_fill_mask(artifacts: dict[str, Path]) -> None:
    proc = jaonnx_cli("bench", str(artifacts["rinna-roberta"]), "--threads", "1", "--rounds", "1",
                      "--batches", "1,2", env={"COLUMNS": "200"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fill-mask latency, batch 1, 32 tokens" in proc.stdout and "texts/s, batch 2" in proc.stdout
    assert "peak RSS" in proc.stdout


def test_jaonnx_bench_errors(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    assert_one_line_error(jaonnx_cli("bench", str(tmp_path)), "not an artifact directory")
    assert_one_line_error(jaonnx_cli("bench", str(artifacts["gpt2-small-ja"]), "--batches", "1,x"), "--batches")
    assert_one_line_error(jaonnx_cli("bench", str(artifacts["gpt2-small-ja"]), "--rounds", "0"), "--rounds")
    assert_one_line_error(jaonnx_cli("bench", str(artifacts["gpt2-small-ja"]), "--threads", "-1"), "--threads")
