"""Load test and concurrency benchmark for `jaonnx serve`, on loopback.

1. Mixed load: N concurrent clients send fill-mask, generate and completions requests (greedy)
   for a bounded time and count; every answer must be a 200 equal to the same request's answer
   when sent alone. Reports requests, p50/p99 latency, 5xx and mismatches.
2. Generation throughput: generated tokens/s with 1, 8 and 32 concurrent clients, against the
   batching server and against one-at-a-time serving (`--max-batch-size 1`).

    python benchmarks/serving_load.py [ART ...] [--duration 60]
    # default artifacts: $JAONNX_TEST_CACHE/artifacts/* (the test twins)

Writes benchmarks/results/serving.md and benchmarks/results/serving.json. The CI test
(tests/test_serving_load.py) runs `run_load` from here with a short duration.

3. `--ops-overhead`: the mixed load against two servers, one with an API key and /metrics
   (scraped every second, as a busy Prometheus would) and one with neither, in interleaved
   segments (ABBA order, so drift on a shared machine falls on both); writes the comparison
   into the "Auth + metrics overhead" section of serving.md and `ops_overhead` in serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["近年の機械学習は", "東京は日本の", "今日は天気が良いので", "大学で", "日本の首都は", "4年に1度"]
MASKED = ["東京は日本の{}です。", "大学で{}の研究をしています。", "4年に1度{}は開かれる。", "{}は美しい。"]

Request = tuple[str, dict[str, Any]]


def mixed_requests(models: list[dict[str, Any]], max_new_tokens: int = 12) -> list[Request]:
    """A deterministic (greedy) mix over every served model; `models` is GET /v1/models' data."""
    requests: list[Request] = []
    for m in models:
        if m["task"] == "fill-mask":
            for i, template in enumerate(MASKED):
                text = template.format(m["mask_token"])
                inputs: Any = text if i % 2 else [text, MASKED[(i + 1) % len(MASKED)].format(m["mask_token"])]
                requests.append(("/v1/fill-mask", {"model": m["id"], "inputs": inputs, "top_k": 3 + i % 3}))
        else:
            for i, prompt in enumerate(PROMPTS):
                n = max_new_tokens - i % 4
                requests.append(("/v1/generate", {"model": m["id"], "prompt": prompt, "max_new_tokens": n,
                                                  "do_sample": False}))
            for prompt in PROMPTS[:2]:
                requests.append(("/v1/completions", {"model": m["id"], "prompt": prompt,
                                                     "max_tokens": max_new_tokens, "temperature": 0}))
    return requests


def comparable(path: str, body: dict[str, Any]) -> Any:
    """What must not change with load: tokens, texts, and scores (see `same`)."""
    if path == "/v1/fill-mask":
        def strip(x: Any) -> Any:
            if isinstance(x, dict):
                return [x["token"], x["sequence"], x["score"]]
            return [strip(y) for y in x]
        return strip(body["results"])
    if path == "/v1/generate":
        return [r["generated_ids"] for r in body["results"]]
    return [c["text"] for c in body["choices"]]


def same(got: Any, want: Any, tol: float = 1e-4) -> bool:
    """Equal, except that floats (fill-mask scores) may differ by padding noise up to `tol`."""
    if isinstance(want, float):
        return isinstance(got, float) and abs(got - want) <= tol
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w, tol) for g, w in zip(got, want))
    return bool(got == want)


def generated_tokens(path: str, body: dict[str, Any]) -> int:
    if path == "/v1/generate":
        return sum(len(r["generated_ids"]) for r in body["results"])
    if path == "/v1/completions":
        return int(body["usage"]["completion_tokens"])
    return 0


def solo_answers(url: str, requests: list[Request], headers: dict[str, str] | None = None) -> list[Any]:
    """Each request alone, one after another: the reference answers."""
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        answers = []
        for path, body in requests:
            r = client.post(path, json=body)
            r.raise_for_status()
            answers.append(comparable(path, r.json()))
        return answers


@dataclass
class LoadReport:
    clients: int
    requests: int = 0
    ok: int = 0
    server_errors: int = 0  # 5xx
    other_errors: int = 0  # 4xx, transport errors
    mismatches: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests_per_s: float = 0.0
    tokens: int = 0
    tokens_per_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def run_load(url: str, requests: list[Request], clients: int, duration_s: float, max_requests: int,
             expected: list[Any] | None = None, headers: dict[str, str] | None = None) -> LoadReport:
    """`clients` threads, each with its own connection, send requests round-robin until
    `max_requests` were sent or `duration_s` passed; answers are checked against `expected`."""
    lock = threading.Lock()
    report = LoadReport(clients=clients)
    latencies: list[float] = []
    counter = iter(range(max_requests))
    stop_at = time.monotonic() + duration_s

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                path, body = requests[i % len(requests)]
                start = time.monotonic()
                try:
                    r = client.post(path, json=body)
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    r, status = None, type(exc).__name__
                elapsed = time.monotonic() - start
                with lock:
                    report.requests += 1
                    report.statuses[status] = report.statuses.get(status, 0) + 1
                    latencies.append(elapsed)
                    if r is not None and r.status_code == 200:
                        data = r.json()
                        report.tokens += generated_tokens(path, data)
                        if expected is not None and not same(comparable(path, data), expected[i % len(requests)]):
                            report.mismatches += 1
                            report.examples.append(f"mismatch: {path} {json.dumps(body, ensure_ascii=False)}")
                        else:
                            report.ok += 1
                    elif r is not None and r.status_code >= 500:
                        report.server_errors += 1
                        report.examples.append(f"{status}: {r.text[:200]}")
                    else:
                        report.other_errors += 1
                        report.examples.append(f"{status}: {r.text[:200] if r is not None else ''}")

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 180)
    report.seconds = time.monotonic() - started
    if latencies:
        ordered = sorted(latencies)
        report.p50_ms = 1000 * statistics.median(ordered)
        report.p99_ms = 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    report.requests_per_s = report.requests / report.seconds
    report.tokens_per_s = report.tokens / report.seconds
    report.examples = report.examples[:10]
    return report


def throughput(url: str, model: str, clients: int, requests_per_client: int, new_tokens: int) -> LoadReport:
    """Generated tokens/s with `clients` concurrent generation clients (fixed-length outputs)."""
    body = {"model": model, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    requests = [("/v1/generate", {**body, "prompt": p}) for p in PROMPTS]
    return run_load(url, requests, clients, 600, max(16, clients * requests_per_client))


@contextmanager
def server_process(artifacts: list[Path], **options: Any) -> Iterator[str]:
    """`jaonnx serve` (the command function) in a subprocess on a free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(a) for a in artifacts] + ["--port", str(port), "--log-level", "warning"]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    code = "import typer; from jaonnx.serving.command import serve; typer.run(serve)"
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


OPS_KEY = "load-test-key"
OPS_MARK = "## Auth + metrics overhead"


@contextmanager
def scraping(url: str, every_s: float, headers: dict[str, str]) -> Iterator[list[int]]:
    """Scrape /metrics every `every_s` seconds while the block runs; yields the scrape count."""
    done, count = threading.Event(), [0]

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            while not done.wait(every_s):
                client.get("/metrics").raise_for_status()
                count[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        done.set()
        thread.join(30)


def ops_overhead(artifacts: list[Path], duration_s: float, clients: int, segments: int = 4) -> dict[str, Any]:
    """Mixed-load throughput with auth + metrics on against off, in ABBA-interleaved segments
    of `duration_s / segments` seconds each, `duration_s` in total per configuration."""
    auth = {"Authorization": f"Bearer {OPS_KEY}"}
    with server_process(artifacts, metrics=False) as off_url, \
            server_process(artifacts, api_key=OPS_KEY, metrics=True) as on_url:
        models = httpx.get(off_url + "/v1/models").json()["data"]
        requests = mixed_requests(models)
        expected = solo_answers(off_url, requests)
        order = ["off", "on", "on", "off"] * ((segments + 1) // 2)
        runs: dict[str, list[LoadReport]] = {"off": [], "on": []}
        scrapes = 0
        for which in order[: 2 * segments]:
            if which == "on":
                with scraping(on_url, 1.0, auth) as count:
                    report = run_load(on_url, requests, clients, duration_s / segments, 1_000_000, expected, auth)
                scrapes += count[0]
            else:
                report = run_load(off_url, requests, clients, duration_s / segments, 1_000_000, expected)
            print(which, f"{report.requests_per_s:.1f} req/s", f"{report.tokens_per_s:.0f} tok/s", flush=True)
            runs[which].append(report)
        metrics_text = httpx.get(on_url + "/metrics", headers=auth).text
    def total(reports: list[LoadReport]) -> dict[str, Any]:
        seconds = sum(r.seconds for r in reports)
        return {
            "segments": len(reports), "seconds": seconds, "requests": sum(r.requests for r in reports),
            "ok": sum(r.ok for r in reports), "server_errors": sum(r.server_errors for r in reports),
            "other_errors": sum(r.other_errors for r in reports), "mismatches": sum(r.mismatches for r in reports),
            "requests_per_s": sum(r.requests for r in reports) / seconds,
            "tokens_per_s": sum(r.tokens for r in reports) / seconds,
            "p50_ms_median": statistics.median(r.p50_ms for r in reports),
            "p99_ms_max": max(r.p99_ms for r in reports),
            "segment_requests_per_s": [round(r.requests_per_s, 2) for r in reports],
        }
    off, on = total(runs["off"]), total(runs["on"])
    return {"clients": clients, "duration_s_per_config": duration_s, "order": order[: 2 * segments],
            "off": off, "on": on, "scrapes": scrapes,
            "throughput_change": on["requests_per_s"] / off["requests_per_s"] - 1,
            "token_throughput_change": on["tokens_per_s"] / off["tokens_per_s"] - 1,
            "metrics_bytes": len(metrics_text)}


def ops_markdown(result: dict[str, Any], machine: str) -> str:
    off, on = result["off"], result["on"]
    rows = [("off: no key, no /metrics", off), (f"on: API key + /metrics scraped every 1 s ({result['scrapes']} scrapes)", on)]
    lines = [
        OPS_MARK, "",
        f"{machine}; busy machine (2 cores shared with other work): compare the ratio, not the absolute numbers. "
        f"Mixed load, {result['clients']} clients, {result['duration_s_per_config']:.0f} s per configuration in "
        f"{off['segments']} + {on['segments']} interleaved segments ({' '.join(result['order'])}).", "",
        "| configuration | requests | ok (equal to solo) | 5xx | mismatches | req/s | gen tokens/s | median p50 ms | max p99 ms | req/s per segment |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['ok']} | {r['server_errors']} | {r['mismatches']} | "
                     f"{r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms_median']:.0f} | "
                     f"{r['p99_ms_max']:.0f} | {', '.join(map(str, r['segment_requests_per_s']))} |")
    lines += ["", f"Throughput change with auth + metrics on: **{100 * result['throughput_change']:+.1f}%** requests/s, "
                  f"{100 * result['token_throughput_change']:+.1f}% generated tokens/s (target: within ±5%).", ""]
    return "\n".join(lines)


def write_ops(result: dict[str, Any], machine: str) -> None:
    """Put the overhead section into serving.md (replacing an older one) and serving.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / "serving.md", RESULTS / "serving.json"
    text = md.read_text() if md.exists() else ""
    text = text.split(OPS_MARK)[0].rstrip("\n")
    md.write_text((text + "\n\n" if text else "") + ops_markdown(result, machine))
    data = json.loads(js.read_text()) if js.exists() else {}
    data["ops_overhead"] = result
    js.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def markdown(load: LoadReport, levels: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Serving benchmark (`benchmarks/serving_load.py`)", "",
        f"{meta['machine']}; models: {', '.join(meta['models'])}; generation model for tokens/s: "
        f"`{meta['generation_model']}`, {meta['new_tokens']} new tokens per request, greedy.", "",
        f"## Mixed load: {load.clients} concurrent clients, {meta['duration_s']:.0f} s", "",
        "| requests | ok (equal to solo) | 5xx | other errors | mismatches | p50 ms | p99 ms | req/s | gen tokens/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {load.requests} | {load.ok} | {load.server_errors} | {load.other_errors} | {load.mismatches} | "
        f"{load.p50_ms:.0f} | {load.p99_ms:.0f} | {load.requests_per_s:.1f} | {load.tokens_per_s:.0f} |", "",
        "## Generation tokens/s by concurrency", "",
        "| clients | batched tokens/s | one-at-a-time tokens/s | speed-up | batched p50 / p99 ms | one-at-a-time p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in levels:
        b, s = row["batched"], row["serial"]
        lines.append(
            f"| {row['clients']} | {b['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | "
            f"{b['tokens_per_s'] / max(s['tokens_per_s'], 1e-9):.2f}x | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | "
            f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--duration", type=float, default=60.0, help="mixed-load seconds")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--generation-model", default="rinna-gpt-1b")
    parser.add_argument("--ops-overhead", action="store_true",
                        help="only compare auth + metrics on against off (interleaved), --duration s each")
    parser.add_argument("--segments", type=int, default=6, help="--ops-overhead: segments per configuration (even)")
    args = parser.parse_args()
    artifacts = args.artifacts or sorted((Path(os.environ.get("JAONNX_TEST_CACHE", "")) / "artifacts").iterdir())
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    if args.ops_overhead:
        result = ops_overhead(artifacts, args.duration, args.clients, args.segments)
        write_ops(result, machine)
        print(ops_markdown(result, machine))
        return

    with server_process(artifacts) as url:
        models = httpx.get(url + "/v1/models").json()["data"]
        requests = mixed_requests(models)
        expected = solo_answers(url, requests)
        load = run_load(url, requests, args.clients, args.duration, 1_000_000, expected)
        print(json.dumps(asdict(load), indent=1), flush=True)
        batched = {c: throughput(url, args.generation_model, c, args.requests_per_client, args.new_tokens)
                   for c in (1, 8, 32)}
    with server_process(artifacts, max_batch_size=1, max_queue=256) as url:
        serial = {c: throughput(url, args.generation_model, c, args.requests_per_client, args.new_tokens)
                  for c in (1, 8, 32)}
    levels = [{"clients": c, "batched": asdict(batched[c]), "serial": asdict(serial[c])} for c in (1, 8, 32)]
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "models": [m["id"] for m in models], "generation_model": args.generation_model,
        "new_tokens": args.new_tokens, "duration_s": args.duration,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / "serving.md", RESULTS / "serving.json"
    kept = md.read_text().partition(OPS_MARK) if md.exists() else ("", "", "")
    old = json.loads(js.read_text()) if js.exists() else {}
    data = {"meta": meta, "load": asdict(load), "levels": levels}
    if "ops_overhead" in old:  # the overhead comparison is run separately (--ops-overhead): keep it
        data["ops_overhead"] = old["ops_overhead"]
    js.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    md.write_text(markdown(load, levels, meta) + ("\n" + kept[1] + kept[2] if kept[1] else ""))
    print(markdown(load, levels, meta))


if __name__ == "__main__":
    main()
