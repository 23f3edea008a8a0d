"""The `jaonnx` command. Export-side commands import `jaonnx_export` lazily, inside the command,
so the runtime commands never load torch or transformers."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from .errors import JaonnxError
from .progress import steps

app = typer.Typer(
    help="Fast, torch-free ONNX inference for Japanese sentencepiece transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
VERBOSE = typer.Option("--verbose", "-v", help="Show third-party warnings and progress bars.")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"jaonnx {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Fast, torch-free ONNX inference for Japanese sentencepiece transformer models."""


def _json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _need_export() -> Any:
    try:
        import jaonnx_export.export as export_module
    except ImportError as exc:
        raise JaonnxError(
            f"export needs the export extra ({exc.name} is missing): pip install 'jaonnx[cpu,export]'"
        ) from None
    return export_module


@app.command()
def recipes(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the supported models (recipes) and their quirks."""
    from .recipes import RECIPES

    rows = [{"id": r.id, "hub_id": r.hub_id, "task": r.task, "architecture": r.architecture, "notes": r.notes}
            for r in RECIPES.values()]
    if as_json:
        _json(rows)
        return
    for row in rows:
        out.print(f"[bold]{row['id']}[/bold]  {row['hub_id']}  ({row['task']}, {row['architecture']})")
        out.print(f"    {row['notes']}")


@app.command()
def twins(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write one checkpoint per model into.")],
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="Only these recipes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Build the offline twins: small trained checkpoints shaped like the five real models."""
    try:
        from jaonnx_export.twins import TWINS, build_twins
    except ImportError as exc:
        raise JaonnxError(f"twins need the export extra ({exc.name} is missing): pip install 'jaonnx[cpu,export]'") from None
    from jaonnx_export.quiet import quiet_third_party

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


@app.command()
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
    int4_block: Annotated[Optional[int], typer.Option(help="int4 block size along K (default 32).")] = None,
    lm_head: Annotated[str, typer.Option(help="int4 artifacts: the LM head as int4 | int8 | fp32.")] = "int8",
    kv_cache: Annotated[Optional[str], typer.Option(
        "--kv-cache", help="Decoders: static (preallocated, written in place) | concat (copied every step).")] = None,
    parity_atol: Annotated[Optional[float], typer.Option("--parity-atol", help="Accept a larger max |logit diff| (recorded in the manifest).")] = None,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """Export a checkpoint to an ONNX artifact and check it against PyTorch.

    The artifact is built next to OUTPUT and moved into place only when every check passes."""
    if external_data not in ("auto", "always", "never"):
        raise JaonnxError(f"--external-data must be auto, always or never, not {external_data!r}")
    export_module = _need_export()
    from jaonnx_export.quiet import quiet_third_party

    with quiet_third_party(verbose), steps(err) as step:
        manifest = export_module.export(
            src, output, recipe_id=recipe, external_data=external_data,  # type: ignore[arg-type]
            quantize=quantize, dtype=dtype, optimize=optimize, force=force, kv_cache=kv_cache,
            int4_block=int4_block, lm_head=lm_head, parity_atol=parity_atol, progress=step,
        )
    if as_json:
        sys.stdout.write(manifest.to_json() + "\n")
        return
    parity = manifest.parity
    out.print(
        f"wrote {output} ({manifest.recipe}, {manifest.task}); parity: max |logit diff| "
        f"{parity['max_abs_logit_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.3f}"
    )


@app.command("fill-mask")
def fill_mask(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory from `jaonnx export`.")],
    texts: Annotated[list[str], typer.Argument(help="Text(s) with [MASK].")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Predictions per mask.")] = 5,
    providers: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Predict the [MASK] tokens in TEXTS."""
    from . import load

    model = load(artifact, providers=providers)
    if model.task != "fill-mask":
        raise JaonnxError(f"{artifact} is a {model.task} artifact: use `jaonnx generate`")
    results = model(list(texts), top_k=top_k)
    if as_json:
        _json(results if len(texts) > 1 else results[0])
        return
    for text, result in zip(texts, results):
        out.print(f"[bold]{text}[/bold]")
        per_mask = result if result and isinstance(result[0], list) else [result]
        for m, preds in enumerate(per_mask):
            if len(per_mask) > 1:
                out.print(f"  mask {m + 1}")
            for p in preds:
                out.print(f"  {p['score']:.4f}  {p['token_str']:<12} {p['sequence']}")


def _load_generator(artifact: Path, providers: str) -> Any:
    from . import load

    model = load(artifact, providers=providers)
    if model.task != "text-generation":
        raise JaonnxError(f"{artifact} is a {model.task} artifact: use `jaonnx fill-mask`")
    return model


CLI_FLAGS = {"max_new_tokens": ("--max-new-tokens", "-n"), "do_sample": ("--sample/--greedy",)}


def _option_parameters() -> list[inspect.Parameter]:
    """`jaonnx generate`'s options, one per row of GENERATION_OPTIONS that the CLI offers."""
    from .generation.options import GENERATION_OPTIONS

    params = []
    for option in GENERATION_OPTIONS:
        if not option.cli:
            continue
        flags = CLI_FLAGS.get(option.name, ("--" + option.name.replace("_", "-"),))
        help_text = option.help if option.name != "do_sample" else "Sample, or decode greedily (default: the card's)."
        annotation = Annotated[Optional[option.type], typer.Option(*flags, help=help_text)]
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


def generate(
    artifact: Path,
    prompt: str,
    stream: bool = False,
    providers: str = "auto",
    as_json: bool = False,
    **options: Any,
) -> None:
    """Continue PROMPT with the model's card decoding settings (or the ones given)."""
    gen = _load_generator(artifact, providers)
    options = {k: v for k, v in options.items() if v is not None}
    if stream and not as_json:
        sys.stdout.write(prompt)
        for piece in gen.stream(prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    results = gen.generate([prompt], return_ids=True, **options)
    if as_json:
        _json([r.to_dict() for r in results] if len(results) > 1 else results[0].to_dict())
        return
    for r in results:
        out.print(r.full_text, markup=False, highlight=False)


def _register_generate() -> None:
    """The signature typer reads is built from the options table, so a new option needs no edit here."""
    fixed = [
        inspect.Parameter("artifact", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[Path, typer.Argument(help="Generation artifact directory.")]),
        inspect.Parameter("prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          annotation=Annotated[str, typer.Argument(help="Text to continue.")]),
        inspect.Parameter("stream", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--stream", help="Print tokens as they are generated.")]),
        inspect.Parameter("providers", inspect.Parameter.KEYWORD_ONLY, default="auto",
                          annotation=Annotated[str, typer.Option(help="auto | cpu | cuda")]),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--json", help="Print prompt ids, generated ids and text as JSON.")]),
    ]
    params = fixed + _option_parameters()

    def command(**kwargs: Any) -> None:
        generate(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = generate.__doc__
    app.command("generate")(command)


_register_generate()


@app.command()
def score(
    artifact: Annotated[Path, typer.Argument(help="Generation artifact directory.")],
    texts: Annotated[list[str], typer.Argument(help="Texts to score.")],
    providers: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Log-likelihood and perplexity of each text."""
    results = _load_generator(artifact, providers).score(list(texts))
    if as_json:
        _json([{k: v for k, v in r.to_dict().items() if k != "token_logprobs"} for r in results])
        return
    for r in results:
        out.print(f"{r.perplexity:10.2f}  {r.log_likelihood:10.3f}  {r.text}", markup=False, highlight=False)


DEMO_FILL_MASK = {
    "rinna-roberta": "[CLS]4年に1度[MASK]は開かれる。",
    "ken11-albert": "大学で[MASK]の研究をしています",
    "jmedroberta": "この患者は[MASK]と診断された。",
}
DEMO_PROMPTS = {"rinna-gpt-1b": "西田幾多郎は、", "gpt2-small-ja": "近年の機械学習は"}


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where twins/ and artifacts/ go.")] = Path("."),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 32,
    verbose: Annotated[bool, VERBOSE] = False,
) -> None:
    """The whole pipeline offline: build the twins, export them, fill masks, generate."""
    from . import load

    try:
        from jaonnx_export.quiet import quiet_third_party
        from jaonnx_export.twins import TWINS, build_twins
    except ImportError as exc:
        raise JaonnxError(f"the demo needs the export extra ({exc.name} is missing): bash scripts/setup.sh") from None
    export_module = _need_export()
    twins_dir, artifacts_dir = work_dir / "twins", work_dir / "artifacts"
    with quiet_third_party(verbose), steps(err) as step:
        built = {}
        for recipe_id in TWINS:  # small checkpoints trained on the shipped corpus
            step(f"1. building the {recipe_id} twin in {twins_dir}")
            built |= build_twins(twins_dir, [recipe_id])
        for recipe_id, src in built.items():
            manifest = export_module.export(
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


def _register_serve() -> None:
    """`jaonnx serve` lives in serving/; its heavy imports happen inside the command."""
    from .serving.command import serve

    app.command()(serve)


_register_serve()


def _register_bench() -> None:
    """`jaonnx bench` lives in bench/ with the measuring core the benchmark suite shares."""
    from .bench.command import bench

    app.command()(bench)


_register_bench()


def _register_cache() -> None:
    """`jaonnx cache` (list / prune / clear the ORT optimized-graph cache) lives in cache_command.py."""
    from .cache_command import cache_app

    app.add_typer(cache_app, name="cache")


_register_cache()


def main() -> None:
    """Entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except JaonnxError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
