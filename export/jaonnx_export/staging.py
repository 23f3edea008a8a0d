"""Atomic artifact writes: build in a scratch directory next to the output, swap it in last.

Until `commit()` nothing in the output directory changes, so a failed, interrupted or killed
export leaves the previous artifact exactly as it was, and still loadable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from jaonnx.artifact import MANIFEST_NAME
from jaonnx.errors import JaonnxError


class Staging:
    """`with Staging(out) as work: ...write into work...; stage.commit()`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise JaonnxError(f"{self.out} is a file: pass a directory for the artifact")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST_NAME).is_file():
            raise JaonnxError(
                f"{self.out} exists and is not a jaonnx artifact: choose an empty or new directory"
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the artifact private
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def commit(self) -> None:
        """Put the finished scratch directory in place of the output (two renames)."""
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            old.rmdir()
            self.out.rename(old)
        self.work.rename(self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.work, ignore_errors=True)
