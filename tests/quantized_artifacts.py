"""The GPT-2 twin exported at each precision and KV layout, shared by the batch-invariance and
quantized-decode tests. Paths match tests/test_precision.py's and test_static_cache.py's
exports where the flags are the same, so a session exports each artifact once."""

from __future__ import annotations

from pathlib import Path

from conftest import export_via_cli

RECIPE = "gpt2-small-ja"
PRECISION_FLAGS = {"fp32": (), "fp16": ("--dtype", "fp16"), "int8": ("--quantize", "int8"), "int4": ("--quantize", "int4"),
                   # blocks of 128 are batch-invariant only through the static graph's even rows
                   "int4-b128": ("--quantize", "int4", "--int4-block", "128")}
# (layout, fused-or-not) -> export flags. The static graph is built from fused ops and never
# re-optimized, so it has one form; concat has the default (fusions kept where measured faster)
# and --no-optimize.
VARIANTS = {
    "static": ("--kv-cache", "static"),
    "concat": ("--kv-cache", "concat", "--no-optimize"),
    "concat-default": ("--kv-cache", "concat"),
}


def export(twins_dir: Path, cache_dir: Path, precision: str, variant: str) -> Path:
    """The twin exported with `precision` and `variant`'s flags (once per cache directory)."""
    if variant == "static" and precision == "fp32":
        target = cache_dir / "artifacts" / RECIPE  # conftest's default export: static, fp32
        return export_via_cli(twins_dir / RECIPE, target)
    target = cache_dir / "precision" / f"{RECIPE}-{precision}-{variant}"
    return export_via_cli(twins_dir / RECIPE, target, *PRECISION_FLAGS[precision], *VARIANTS[variant])
