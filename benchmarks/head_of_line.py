"""Head of line: what a long prompt does to the streams already running (issue 15, item 4).

Scenario, against `jaonnx serve` (2 threads) on one artifact (GPT-2-small shape int8 by default):
4 clients stream greedy generations; after `--warm-s` a ~900-token prompt arrives (one new
token); a second after its answer, an `echo` + `logprobs` completion of a ~300-token prompt
(apart, so each one's effect on the streams is seen on its own). Reported per
`--max-prefill-tokens` setting (0 = whole prompts, as before chunked prefill), settings taking
turns round by round (A B C A B C ...) so a slow minute on the shared machine hits them all:

- the streams' median / p99 / max gap between SSE events before, during and after the long
  prefill (during = from the long request's send to its answer), and during the echo request;
- the long request's time to first token (its whole answer: it asks for one token);
- the streams' total tokens/s over the run.

    python -m benchmarks.head_of_line ART [--budgets 0,16,32,64,128] [--rounds 2]

Writes benchmarks/results/head_of_line.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .common import machine
from .serving_load import server_process

RESULTS = Path(__file__).parent / "results"
SENTENCES = ["近年の機械学習は急速に進歩している。", "東京は日本の首都であり、多くの人が住んでいる。",
             "大学で自然言語処理の研究をしています。", "4年に1度オリンピックは開かれる。", "今日は天気が良いので散歩に出かけた。"]
STREAM_PROMPTS = ["近年の機械学習は", "東京は日本の", "今日は天気が良いので", "大学で"]


def prompt_of(artifact: Path, tokens: int, start: int = 0) -> str:
    """Text that encodes to about `tokens` tokens with the artifact's own tokenizer; `start`
    rotates the sentences, so prompts of different starts share no cached prefix."""
    import jaonnx

    gen = jaonnx.load(artifact)
    text, i = "", start
    while len(gen.encode(text or "。")) < tokens:
        text += SENTENCES[i % len(SENTENCES)]
        i += 1
    ids = gen.encode(text)[:tokens]
    return gen.decode(ids)


def stream(url: str, model: str, prompt: str, new: int, arrivals: list[float]) -> None:
    body = {"model": model, "prompt": prompt, "max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
            "stream": True}
    with httpx.stream("POST", url + "/v1/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter())


def bursts(times: list[float], within_s: float = 0.001) -> list[float]:
    """Event times with those that arrived together (one network read) merged: a gap inside a
    burst is an artifact of buffering, not a token rate."""
    out: list[float] = []
    for t in times:
        if not out or t - out[-1] > within_s:
            out.append(t)
    return out


def gaps_in(arrivals: list[list[float]], start: float, end: float) -> list[float]:
    """Gaps (ms) between consecutive bursts of each stream whose later burst falls in [start, end)."""
    merged = [bursts(times) for times in arrivals]
    return [(b - a) * 1000 for times in merged for a, b in zip(times, times[1:]) if start <= b < end]


def summary(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"n": 0}
    gaps = sorted(gaps)
    return {"n": len(gaps), "median_ms": statistics.median(gaps), "p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "max_ms": gaps[-1]}


def scenario(artifact: Path, budget: int, long_prompt: str, echo_prompt: str, warm_prompt: str, new: int,
             warm_s: float, threads: int, echo_after_s: float = 1.0) -> dict[str, Any]:
    model = artifact.name
    with server_process([artifact], threads=threads, max_prefill_tokens=budget, max_batch_size=8) as url:
        # warm-up: a long prompt once, so the KV buffer has grown to the model's positions, as on
        # any server that has seen one (that one-time growth is a stall with or without chunks)
        httpx.post(url + "/v1/generate", json={"model": model, "prompt": warm_prompt, "max_new_tokens": 2,
                                               "do_sample": False}, timeout=600)
        arrivals: list[list[float]] = [[] for _ in STREAM_PROMPTS]
        threads_ = [threading.Thread(target=stream, args=(url, model, p, new, arrivals[i]))
                    for i, p in enumerate(STREAM_PROMPTS)]
        begin = time.perf_counter()
        for t in threads_:
            t.start()
        time.sleep(warm_s)
        echo_times: dict[str, float] = {}

        def echo() -> None:
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": echo_prompt, "max_tokens": 1,
                                                          "echo": True, "logprobs": 1, "temperature": 0}, timeout=600)
            echo_times.update(start=t0, end=time.perf_counter(), status=r.status_code)

        sent = time.perf_counter()
        r = httpx.post(url + "/v1/generate", json={"model": model, "prompt": long_prompt, "max_new_tokens": 1,
                                                   "do_sample": False}, timeout=600)
        done = time.perf_counter()
        assert r.status_code == 200, r.text
        time.sleep(echo_after_s)  # the echo request's own window, apart from the long prefill's
        echo()
        for t in threads_:
            t.join()
        end = max(times[-1] for times in arrivals)
    tokens = sum(len(times) for times in arrivals)
    return {
        "max_prefill_tokens": budget,
        "before": summary(gaps_in(arrivals, begin + warm_s / 2, sent)),  # every stream is decoding by then
        "during": summary(gaps_in(arrivals, sent, done)),
        "during_echo": summary(gaps_in(arrivals, echo_times.get("start", sent), echo_times.get("end", sent))),
        "after": summary(gaps_in(arrivals, echo_times.get("end", done), float("inf"))),
        "long_ttft_s": done - sent,
        "echo_s": echo_times.get("end", 0) - echo_times.get("start", 0),
        "stream_events_per_s": tokens / (end - begin),
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Head of line: a long prompt joins 4 running streams", "",
        f"{meta['artifact']}, {meta['threads']} threads, {meta['rounds']} interleaved rounds (medians over rounds), "
        f"long prompt {meta['long_tokens']} tokens (1 new token), echo+logprobs prompt {meta['echo_tokens']} tokens, "
        f"streams of {meta['new']} tokens. Machine: {meta['machine']}. Gaps are between SSE events of the 4 streams.",
        "",
        "| max_prefill_tokens | gap median before (ms) | during: median / p99 / max (ms) | max / median | "
        "max during echo (ms) | after median (ms) | long TTFT (s) | stream events/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["during"]
        med = r["before"].get("median_ms") or float("nan")
        lines.append(
            f"| {r['max_prefill_tokens'] or 'whole prompt'} | {med:.1f} | {d.get('median_ms', 0):.1f} / "
            f"{d.get('p99_ms', 0):.1f} / {d.get('max_ms', 0):.0f} | {d.get('max_ms', 0) / med:.1f}x | "
            f"{r['during_echo'].get('max_ms', 0):.0f} | {r['after'].get('median_ms', 0):.1f} | {r['long_ttft_s']:.2f} | "
            f"{r['stream_events_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over rounds."""
    def med(path: list[str]) -> float:
        values = []
        for r in runs:
            v: Any = r
            for p in path:
                v = v.get(p, {}) if isinstance(v, dict) else {}
            if isinstance(v, (int, float)):
                values.append(float(v))
        return statistics.median(values) if values else 0.0

    out: dict[str, Any] = {"max_prefill_tokens": runs[0]["max_prefill_tokens"], "rounds": runs}
    for window in ("before", "during", "during_echo", "after"):
        out[window] = {k: med([window, k]) for k in ("median_ms", "p99_ms", "max_ms")}
    for key in ("long_ttft_s", "echo_s", "stream_events_per_s"):
        out[key] = med([key])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--budgets", default="0,16,32,64,128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=900)
    parser.add_argument("--echo-tokens", type=int, default=300)
    parser.add_argument("--new", type=int, default=400)
    parser.add_argument("--warm-s", type=float, default=3.0)
    parser.add_argument("--out", default="head_of_line")
    parser.add_argument("--in-process", action="store_true", help="CPU time per engine step at 1 thread instead")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.in_process:
        rows = engine_steps(args.artifact, budgets, args.rounds, args.long_tokens)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}_steps.json").write_text(json.dumps(rows, indent=1))
        (RESULTS / f"{args.out}_steps.md").write_text(steps_markdown(rows, args.artifact.name, args.rounds))
        print(steps_markdown(rows, args.artifact.name, args.rounds))
        return
    long_prompt, echo_prompt = prompt_of(args.artifact, args.long_tokens), prompt_of(args.artifact, args.echo_tokens, 2)
    warm_prompt = prompt_of(args.artifact, args.long_tokens + 8, 1)
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in budgets}
    for round_ in range(args.rounds):
        for b in budgets:
            r = scenario(args.artifact, b, long_prompt, echo_prompt, warm_prompt, args.new, args.warm_s, args.threads)
            print(json.dumps({k: v for k, v in r.items()}), flush=True)
            runs[b].append(r)
    rows = [combine(runs[b]) for b in budgets]
    meta = {"artifact": args.artifact.name, "threads": args.threads, "rounds": args.rounds, "new": args.new,
            "long_tokens": args.long_tokens, "echo_tokens": args.echo_tokens, "machine": machine().get("cpu", "")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))



def engine_steps(artifact: Path, budgets: list[int], rounds: int, long_tokens: int = 900) -> list[dict[str, Any]]:
    """The same scenario in one process at 1 thread, timed in CPU seconds per `step()` (robust
    on a shared machine, where wall-clock gaps mostly measure the other tenants): 4 greedy rows
    decode, a `long_tokens` prompt joins; per budget, the median decode step before it, the
    longest step while it is prefilled, and its time to first token (the steps' CPU sum)."""
    import jaonnx

    gen = jaonnx.load(artifact, intra_op_threads=1)
    long_prompt, warm_prompt = prompt_of(artifact, long_tokens), prompt_of(artifact, long_tokens + 8, 1)
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in budgets}
    for _ in range(rounds):
        for b in budgets:
            engine = gen.engine(max_batch_size=8, max_prefill_tokens=b or None, prefix_cache=False)
            engine.add_request(warm_prompt, max_new_tokens=1)  # grows the KV buffer once (see scenario)
            while engine.has_unfinished_requests():
                engine.step()
            for p in STREAM_PROMPTS:
                engine.add_request(p, max_new_tokens=200, min_new_tokens=200, do_sample=False)
            decode = []
            for i in range(12):
                t = time.process_time()
                engine.step()
                if i >= 4:
                    decode.append(time.process_time() - t)
            engine.add_request(long_prompt, request_id="long", max_new_tokens=1, do_sample=False)
            during = []
            while True:
                t = time.process_time()
                outs = engine.step()
                during.append(time.process_time() - t)
                if any(o.request_id == "long" for o in outs):
                    break
            med = statistics.median(decode)
            runs[b].append({"decode_median_ms": med * 1000, "during_max_ms": max(during) * 1000,
                            "max_over_median": max(during) / med, "long_ttft_cpu_s": sum(during), "steps": len(during)})
            print(json.dumps({"max_prefill_tokens": b, **runs[b][-1]}), flush=True)
    return [{"max_prefill_tokens": b, **{k: statistics.median(r[k] for r in runs[b]) for k in runs[b][0]}}
            for b in budgets]


def steps_markdown(rows: list[dict[str, Any]], artifact: str, rounds: int) -> str:
    lines = [
        "## In process, CPU time per step (1 thread)", "",
        f"{artifact}: 4 greedy rows decoding, a 900-token prompt joins; CPU seconds per `engine.step()` "
        f"(median of {rounds} interleaved rounds), so the other tenants of a shared machine do not count.", "",
        "| max_prefill_tokens | decode step median (ms) | longest step during the prefill (ms) | longest / median | "
        "long TTFT (CPU s) | TTFT vs whole prompt |",
        "|---|---|---|---|---|---|",
    ]
    base = next((r["long_ttft_cpu_s"] for r in rows if not r["max_prefill_tokens"]), None)
    for r in rows:
        ratio = f"{r['long_ttft_cpu_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['max_prefill_tokens'] or 'whole prompt'} | {r['decode_median_ms']:.1f} | "
                     f"{r['during_max_ms']:.0f} | {r['max_over_median']:.1f}x | {r['long_ttft_cpu_s']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
