"""Reliability (a): a bounded load test on loopback, 32 concurrent clients mixing fill-mask and
generation (greedy). Zero 5xx, and every answer equals the same request's answer alone. The
minute-long run with throughput figures is `benchmarks/serving_load.py`; this is its short form."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_support import need, running_server

need("fastapi", "serve")


def load_benchmark() -> Any:
    path = Path(__file__).parent.parent / "benchmarks" / "serving_load.py"
    spec = importlib.util.spec_from_file_location("serving_load", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_32_clients_mixed_load_matches_solo_answers(artifacts: dict[str, Path]) -> None:
    bench = load_benchmark()
    with running_server(list(artifacts.values()), max_batch_size=16, max_queue=64) as (url, app):
        models = httpx.get(url + "/v1/models").json()["data"]
        requests = bench.mixed_requests(models, max_new_tokens=8)
        assert {p for p, _ in requests} == {"/v1/fill-mask", "/v1/generate", "/v1/completions"}
        expected = bench.solo_answers(url, requests)
        report = bench.run_load(url, requests, clients=32, duration_s=10, max_requests=480, expected=expected)
        stats = {name: m.worker.stats for name, m in app.state.served.items()}
    print(f"\nload: {report.requests} requests in {report.seconds:.1f} s, p50 {report.p50_ms:.0f} ms, "
          f"p99 {report.p99_ms:.0f} ms, {report.tokens_per_s:.0f} generated tokens/s, statuses {report.statuses}")
    assert report.requests >= 64, report  # enough traffic to mean something, even on a slow box
    assert report.server_errors == 0 and report.other_errors == 0, report.examples
    assert report.mismatches == 0, report.examples
    assert report.ok == report.requests
    assert max(s.max_requests_seen for s in stats.values()) > 1  # requests really shared a step


def test_the_load_check_can_tell_answers_apart() -> None:
    bench = load_benchmark()
    assert bench.same([[5, "東京", 0.25]], [[5, "東京", 0.25 + 1e-6]])
    assert not bench.same([[5, "東京", 0.25]], [[5, "東京", 0.26]])
    assert not bench.same([[1, 2, 3]], [[1, 2, 4]])
    assert not bench.same([[1, 2]], [[1, 2, 3]])
