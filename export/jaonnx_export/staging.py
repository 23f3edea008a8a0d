"""Atomic artifact writes: build in a scratch directory next to the output, swap it in last.

Until `commit()` nothing in the output directory changes, so a failed, interrupted or killed
export leaves the previous artifact exactly as it was, and still loadable.

The swap itself is one system call where the OS has one: Linux `renameat2(RENAME_EXCHANGE)`
and macOS `renamex_np(RENAME_SWAP)` exchange the two directories atomically, so at every
instant the output path holds one complete artifact, the old one or the new one. A crash
after the exchange leaves the old artifact in the scratch directory, which the next export of
the same output removes.

Fallback (Windows, a filesystem without the exchange, such as some network mounts): two
renames, the old artifact to `.NAME.old-*`, then the new one in. A crash between them leaves
no artifact at the output path for a moment; the next export of that output (or
`recover(out)`) first renames the `.old-*` artifact back, so nothing is ever lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from jaonnx.artifact import MANIFEST_NAME
from jaonnx.errors import JaonnxError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
# errno values meaning "this OS or filesystem cannot exchange": use the two-rename fallback.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _libc_exchange() -> Callable[[bytes, bytes], int] | None:
    """The OS's atomic exchange of two paths, or None where libc has none."""
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except (OSError, TypeError):
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):  # glibc >= 2.28, musl >= 1.2.4
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, _RENAME_SWAP)
    return None


_EXCHANGE = _libc_exchange()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise JaonnxError(f"cannot swap {b} into place: {os.strerror(code)}")


def _owner_alive(path: Path) -> bool:
    """Whether the export that made a scratch directory (pid in its name) is still running."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def leftovers(out: Path) -> list[Path]:
    """Scratch and old-artifact directories an earlier export of `out` left next to it."""
    parent = out.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{out.name}.partial-", f".{out.name}.old-")
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


def recover(out: Path) -> None:
    """Undo what a killed export left: put back an old artifact the fallback's two renames
    had moved away (the output path is then empty), and delete every other leftover that no
    running export owns."""
    found = [p for p in leftovers(out) if not _owner_alive(p)]
    if not out.exists():
        old = [p for p in found if ".old-" in p.name and (p / MANIFEST_NAME).is_file()]
        if old:
            old[0].rename(out)
            found.remove(old[0])
    for path in found:
        shutil.rmtree(path, ignore_errors=True)


class Staging:
    """`with Staging(out) as work: ...write into work...; stage.commit()`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise JaonnxError(f"{self.out} is a file: pass a directory for the artifact")
        recover(self.out)
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MANIFEST_NAME).is_file():
            raise JaonnxError(
                f"{self.out} exists and is not a jaonnx artifact: choose an empty or new directory"
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the artifact private
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def commit(self) -> None:
        """Put the finished scratch directory in place of the output: one atomic exchange where
        the OS has it, else two renames (see the module docstring)."""
        if not self.out.exists():
            self.work.rename(self.out)
        elif exchange(self.work, self.out):
            pass  # self.work now holds the old artifact
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
            old.rmdir()
            self.out.rename(old)
            self.work.rename(self.out)
            self.work = old
        self.committed = True
        shutil.rmtree(self.work, ignore_errors=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.committed:
            shutil.rmtree(self.work, ignore_errors=True)
