"""The benchmark suite: a smoke run on twin-sized shapes writes its table, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report
from benchmarks.__main__ import main


def test_smoke_run_writes_table_json_and_plots(twins_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    main(["--tiny", "--quick", "--only", "fill_mask,size", "--twins", str(twins_dir),
          "--cache", str(cache_dir / "bench"), "--out", str(out), "--threads", "1"])
    results = json.loads((out / "latest.json").read_text(encoding="utf-8"))
    runs = results["runs"]["fill_mask"]
    assert set(runs) == {"torch", "jaonnx-fp32", "jaonnx-int8"}
    for engine, run in runs.items():
        assert "error" not in run, (engine, run)
        assert run["latency"]["16"]["p50"] > 0 and run["peak_rss_mib"] > 0
    assert results["sizes"]["bert-base"]["jaonnx-int8"] < results["sizes"]["bert-base"]["jaonnx-fp32"]
    assert results["machine"]["versions"]["onnxruntime"]
    table = (out / "latest.md").read_text(encoding="utf-8")
    assert "| fill-mask BERT-base, batch 1, seq 128, p50 |" in table and "PyTorch eager" in table
    assert (out / "fill_mask_latency.png").stat().st_size > 1000


def test_ratios_are_against_pytorch() -> None:
    results = {
        "mode": "test", "started": "now", "seconds": 1, "params": {"threads": 2, "seqs": [32], "fm_batches": []},
        "machine": {"cpu": "x", "isa": [], "logical_cores": 2, "memory_mib": 1, "versions": {}, "python": "3"},
        "runs": {"fill_mask": {"torch": {"latency": {"32": {"p50": 120.0, "p90": 130.0}}},
                               "jaonnx-fp32": {"latency": {"32": {"p50": 60.0, "p90": 65.0}}},
                               "jaonnx-int8": {"latency": {"32": {"p50": 30.0, "p90": 40.0}}}}},
    }
    table = report.markdown(results)
    line = next(l for l in table.splitlines() if "seq 32, p50" in l)
    assert "(2.00×)" in line and "(4.00×)" in line
