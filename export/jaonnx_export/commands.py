"""The export half's `jaonnx` commands: `export`, `twins` and `demo`.

The runtime's CLI does not import these: it discovers `register` through the `jaonnx.commands`
entry point group (pyproject.toml) the first time a command it lacks is looked up. This module
stays cheap to import (no torch, no transformers): the heavy imports happen inside each
command, and a runtime-only install gets one line naming the extra to install."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from jaonnx.errors import JaonnxError
from jaonnx.progress import steps

EXTRA = "pip install 'jaonnx[cpu,export]'"
err = Console(stderr=True)
out = Console()
VERBOSE = typer.Option("--verbose", "-v", help="Show third-party warnings and progress bars.")


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def need_export_extra(command: str) -> None:
    """One line naming the extra when the export dependencies are not installed."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as exc:
        raise JaonnxError(f"`jaonnx {command}` needs the export extra ({exc.name} is missing): {EXTRA}") from None


def twins(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write one checkpoint per model into.")],
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="Only these recipes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Build the offline twins: small trained checkpoints shaped like the five real models."""
    need_export_extra("twins")
    from .quiet import quiet_third_party
    from .twins import TWINS, build_twins

    for r in recipe or []:
        if r not in TWINS:
            raise JaonnxError(f"no twin for recipe {r!r}: use one of {', '.join(TWINS)}")
    with quiet_third_party(verbose), steps(err) as step:
        built = {}
        for recipe_id in recipe or list(TWINS):
            step(f"building the {recipe_id} twin")
            built |= build_twins(out_dir, [recipe_id])
    if as_json:
        _json({k: str(v) for k, v in built.items()})
    else:
        for k, v in built.items():
            out.print(f"{k}\t{v}")


def export(
    src: Annotated[str, typer.Argument(help="Hub id (e.g. rinna/japanese-roberta-base) or checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to write.")],
    recipe: Annotated[Optional[str], typer.Option(help="Recipe id; detected from the checkpoint when omitted.")] = None,
    external_data: Annotated[str, typer.Option(help="auto | always | never: weights in model.onnx.data.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="int8 | int4: quantized weights, for CPU.")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 is for CUDA).")] = "fp32",
    optimize: Annotated[Optional[bool], typer.Option(
        "--optimize/--no-optimize", help="ORT transformer fusions: on / off (default: kept only where measured faster).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Keep a converted artifact below the quality gate.")] = False,
    int4_block: Annotated[Optional[int], typer.Option(help="int4 block size along K (default: the recipe's, 32; 128 for rinna-gpt-1b).")] = None,
    lm_head: Annotated[str, typer.Option(help="int4 artifacts: the LM head as int4 | int8 | fp32.")] = "int8",
    embedding: Annotated[Optional[str], typer.Option(
        help="int8/int4 artifacts: the token embedding table as int8 | int4 | fp32 (default: int8 for decoders, fp32 for encoders).")] = None,
    kv_cache: Annotated[Optional[str], typer.Option(
        "--kv-cache", help="Decoders: static (preallocated, written in place) | concat (copied every step).")] = None,
    parity_atol: Annotated[Optional[float], typer.Option("--parity-atol", help="Accept a larger max |logit diff| (recorded in the manifest).")] = None,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Export a checkpoint to an ONNX artifact and check it against PyTorch.

    The artifact is built next to OUTPUT and moved into place only when every check passes."""
    if external_data not in ("auto", "always", "never"):
        raise JaonnxError(f"--external-data must be auto, always or never, not {external_data!r}")
    need_export_extra("export")
    from .export import export as run_export
    from .quiet import quiet_third_party

    with quiet_third_party(verbose), steps(err) as step:
        manifest = run_export(
            src, output, recipe_id=recipe, external_data=external_data,  # type: ignore[arg-type]
            quantize=quantize, dtype=dtype, optimize=optimize, force=force, kv_cache=kv_cache,
            int4_block=int4_block, lm_head=lm_head, embedding=embedding, parity_atol=parity_atol, progress=step,
        )
    if as_json:
        sys.stdout.write(manifest.to_json() + "\n")
        return
    parity = manifest.parity
    out.print(
        f"wrote {output} ({manifest.recipe}, {manifest.task}); parity: max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
    )


DEMO_FILL_MASK = {
    "rinna-roberta": "[CLS]4年に1度[MASK]は開かれる。",
    "ken11-albert": "大学で[MASK]の研究をしています",
    "jmedroberta": "この患者は[MASK]と診断された。",
}
DEMO_PROMPTS = {"rinna-gpt-1b": "西田幾多郎は、", "gpt2-small-ja": "近年の機械学習は"}


def demo(
    work_dir: Annotated[Path, typer.Option(help="Where twins/ and artifacts/ go.")] = Path("."),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 32,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """The whole pipeline offline: build the twins, export them, fill masks, generate."""
    need_export_extra("demo")
    from jaonnx import load

    from .export import export as run_export
    from .quiet import quiet_third_party
    from .twins import TWINS, build_twins

    twins_dir, artifacts_dir = work_dir / "twins", work_dir / "artifacts"
    with quiet_third_party(verbose), steps(err) as step:
        built = {}
        for recipe_id in TWINS:  # small checkpoints trained on the shipped corpus
            step(f"1. building the {recipe_id} twin in {twins_dir}")
            built |= build_twins(twins_dir, [recipe_id])
        for recipe_id, src in built.items():
            manifest = run_export(
                str(src), artifacts_dir / recipe_id, progress=lambda msg, r=recipe_id: step(f"2. export {r}: {msg}")
            )
            step(f"2. exported {recipe_id}: parity max |logit diff| {manifest.parity['max_abs_logit_diff']:.1e}")
    out.print("\n[bold]3. fill-mask[/bold]")
    for recipe_id, text in DEMO_FILL_MASK.items():
        out.print(f"[cyan]{recipe_id}[/cyan]  {text}", markup=True, highlight=False)
        for p in load(artifacts_dir / recipe_id, providers="cpu")(text, top_k=5):
            out.print(f"   {p['score']:.4f}  {p['token_str']}", markup=False, highlight=False)
    out.print("\n[bold]4. generation[/bold] (twins are tiny: expect fluent-ish nonsense)")
    for recipe_id, prompt in DEMO_PROMPTS.items():
        gen = load(artifacts_dir / recipe_id, providers="cpu")
        for label, options in (("greedy", {"do_sample": False}), ("sampled, seed 0", {"seed": 0})):
            out.print(f"[cyan]{recipe_id}[/cyan] ({label})")
            sys.stdout.write("   " + prompt)
            for piece in gen.stream(prompt, max_new_tokens=max_new_tokens, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")


def register(app: typer.Typer) -> None:
    """The `jaonnx.commands` entry point: add this package's commands to `app`."""
    app.command()(twins)
    app.command()(export)
    app.command()(demo)
