"""Prompt lookup (n-gram speculation from the context, exact for greedy) against plain greedy,
interleaved, on the suite's GPT-2 small artifacts and on the trained gpt2-small-ja twin.

    python -m benchmarks.prompt_lookup ART [ART ...] [--rounds 5] [--new 32] [--lookup 10]

Random weights rarely continue by copying the prompt, so there the row shows the cost of
verifying rejected drafts; a trained model on input-grounded text shows the gain. Writes
benchmarks/results/prompt_lookup.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GROUNDED = "東京は日本の首都であり、政治と経済の中心です。大阪は西日本の中心です。" * 3 + "東京は日本の"


def measure(artifact: Path, rounds: int, new: int, lookup: int) -> dict[str, object]:
    import jaonnx

    gen = jaonnx.load(artifact, providers="cpu")
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    same = gen.generate(GROUNDED, prompt_lookup=lookup, **options) == gen.generate(GROUNDED, **options)
    times: dict[str, list[float]] = {"plain": [], "lookup": []}
    for _ in range(rounds):
        for name, extra in (("plain", {}), ("lookup", {"prompt_lookup": lookup})):
            start = time.perf_counter()
            gen.generate(GROUNDED, **options, **extra)
            times[name].append(new / (time.perf_counter() - start))
    engine = gen.engine(1)
    engine.add_request(GROUNDED, prompt_lookup=lookup, **options)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"artifact": artifact.name, "identical_tokens": same, "steps_for_new_tokens": f"{steps} for {new}",
            "plain_tok_s": med["plain"], "lookup_tok_s": med["lookup"], "speedup": med["lookup"] / med["plain"],
            "spread_plain": (min(times["plain"]), max(times["plain"])),
            "spread_lookup": (min(times["lookup"]), max(times["lookup"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--lookup", type=int, default=10)
    args = parser.parse_args()
    rows = [measure(a, args.rounds, args.new, args.lookup) for a in args.artifacts]
    lines = ["# Prompt lookup vs plain greedy (`benchmarks/prompt_lookup.py`)", "",
             f"{args.new} new tokens on an input-grounded prompt, prompt_lookup={args.lookup}, median of "
             f"{args.rounds} interleaved rounds (min-max).", "",
             "| artifact | identical tokens | engine steps | plain tok/s | lookup tok/s | speed-up |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['identical_tokens']} | {r['steps_for_new_tokens']} | "
                     f"{r['plain_tok_s']:.1f} ({r['spread_plain'][0]:.1f}-{r['spread_plain'][1]:.1f}) | "
                     f"{r['lookup_tok_s']:.1f} ({r['spread_lookup'][0]:.1f}-{r['spread_lookup'][1]:.1f}) | "
                     f"{r['speedup']:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt_lookup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
