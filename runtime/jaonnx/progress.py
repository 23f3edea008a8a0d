"""One rich display of a command's steps on stderr: a spinner on the current step, a tick and
its duration on each finished one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Column


@contextmanager
def steps(console: Console) -> Iterator[Callable[[str], None]]:
    """`with steps(err) as step: step("loading"); ...` -- each call finishes the previous step."""
    progress = Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("[dim]{task.fields[took]:>7}", table_column=Column(width=7, no_wrap=True)),
        TextColumn("{task.description}", table_column=Column(overflow="fold")),
        console=console,
    )
    current: list[tuple[int, float]] = []

    def finish(failed: bool = False) -> None:
        if current:
            task, started = current.pop()
            took = f"{time.perf_counter() - started:.1f} s"
            if failed:
                description = progress.tasks[task].description
                progress.update(task, description=f"[red]failed:[/red] {description}", took=took)
            else:
                progress.update(task, total=1, completed=1, took=took)

    def step(message: str) -> None:
        finish()
        current.append((progress.add_task(message, total=None, took=""), time.perf_counter()))

    with progress:
        try:
            yield step
        except BaseException:
            finish(failed=True)
            raise
        finish()
