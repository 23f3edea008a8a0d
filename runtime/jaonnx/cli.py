"""The `jaonnx` command: the runtime's commands, plus those other packages register.

The export half's `export`, `twins` and `demo` come from `jaonnx_export` through the
`jaonnx.commands` entry point group (see `PluginGroup`): this module never imports the
exporter, and the plugins load only when a command the runtime lacks is looked up or the
commands are listed, so `jaonnx generate` never loads them."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from .errors import JaonnxError
from .plugins import PluginGroup

app = typer.Typer(
    cls=PluginGroup,
    help="Fast, torch-free ONNX inference for Japanese sentencepiece transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()


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


def _option_parameters() -> list[inspect.Parameter]:
    """`jaonnx generate`'s options, one per row of GENERATION_OPTIONS that the CLI offers."""
    from .generation.options import GENERATION_OPTIONS

    params = []
    for option in GENERATION_OPTIONS:
        if not option.cli:
            continue
        annotation = Annotated[Optional[option.type], typer.Option(*option.flags, help=option.help)]
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
