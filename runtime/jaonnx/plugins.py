"""Commands other packages add to `jaonnx`, found through an entry point group.

A package declares `[project.entry-points."jaonnx.commands"] NAME = "module:register"`, where
`register(app: typer.Typer)` adds its commands; `jaonnx_export` registers `export`, `twins`
and `demo` this way. The runtime never imports a plugin by name except in one fallback: an
editable install made before the group existed has no entry point metadata, so when the
group is empty the exporter shipped in this repository is tried directly.

Plugins load lazily (`PluginGroup`): only when a command the runtime lacks is looked up, or
when the commands are listed for `--help`. A command no plugin provides (a runtime-only
install) still exists, and says in one line which extra installs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

import typer
from typer.core import TyperGroup

from .errors import JaonnxError

GROUP = "jaonnx.commands"
FALLBACK = {"export": "jaonnx_export.commands:register"}  # used only when GROUP is empty
# Commands a plugin is expected to provide -> the install line shown where none does.
EXPECTED = {name: "pip install 'jaonnx[cpu,export]'" for name in ("export", "twins", "demo")}

_loaded: dict[str, Any] | None = None  # command name -> click command, once per process


def _registrars() -> list[tuple[str, Callable[[], Callable[[typer.Typer], None]]]]:
    """(name, loader of the register function) for each plugin, entry points first."""
    found = [(ep.name, ep.load) for ep in metadata.entry_points(group=GROUP)]
    if found:
        return found

    def fallback(target: str) -> Callable[[], Callable[[typer.Typer], None]]:
        module, _, attr = target.partition(":")
        return lambda: getattr(importlib.import_module(module), attr)

    return [(name, fallback(target)) for name, target in FALLBACK.items()]


def _missing(name: str, install: str) -> Callable[..., None]:
    def command(ctx: typer.Context) -> None:
        raise JaonnxError(f"`jaonnx {name}` needs the export extra, which is not installed: {install}")

    command.__doc__ = "Not installed: needs the export extra (run it to see how to install it)."
    return command


def plugin_commands() -> dict[str, Any]:
    """Every plugin's commands (click objects), plus a one-line stub for each expected command
    no plugin provides. A plugin that cannot be imported is treated as not installed."""
    global _loaded
    if _loaded is None:
        app = typer.Typer()
        for _name, load in _registrars():
            try:
                register = load()
            except ImportError:
                continue
            register(app)
        provided = {info.name or info.callback.__name__ for info in app.registered_commands if info.callback}
        for name, install in EXPECTED.items():
            if name not in provided:
                settings = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
                app.command(name, context_settings=settings)(_missing(name, install))
        group = typer.main.get_group(app)
        _loaded = dict(group.commands)
    return _loaded


class PluginGroup(TyperGroup):
    """The `jaonnx` group: the runtime's own commands, plus the plugins' on first need."""

    def _add_plugins(self) -> None:
        for name, command in plugin_commands().items():
            self.commands.setdefault(name, command)

    def list_commands(self, ctx: Any) -> list[str]:
        self._add_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            self._add_plugins()
        return super().get_command(ctx, cmd_name)
