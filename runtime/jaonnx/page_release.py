"""Drop the resident pages of weights that ONNX Runtime read only while loading.

ORT maps each external tensor of the artifact's data file into memory. Some of them it reads
only while building the session: on x86-64, MatMulNBits copies its scales and zero points into
its packed weights (the exporter records their byte ranges as `load_only_data`, see
jaonnx_export/load_only.py), but keeps the mappings, so their pages stay resident: 162 MiB for
the japanese-gpt-1b int4 shape. `madvise(MADV_DONTNEED)` on a clean file-backed mapping drops
those pages from this process; a later read would fault them back in from the file. So the
release can cost a page fault, never a wrong number, and on any failure (not Linux, no
/proc/self/maps) it releases nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

MADV_DONTNEED = 4  # Linux, every architecture
PACKING_MACHINES = ("x86_64", "AMD64")  # where ORT's MatMulNBits packs its scales (load_only.py)


class Mapping(NamedTuple):
    address: int
    size: int
    offset: int  # in the file


def mapped_ranges(path: Path) -> list[Mapping]:
    """This process's mappings of `path`, from /proc/self/maps (~1 ms; /proc/self/smaps would
    walk every mapping's pages: 21 ms at the japanese-gpt-1b shape)."""
    target = os.path.realpath(path)
    found = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                found.append(Mapping(start, end - start, int(parts[2], 16)))
    return found


def page_flags(mapping: Mapping) -> np.ndarray:
    """/proc/self/pagemap's entry of each page of `mapping` (bit 63: in memory; bit 61: a
    file page, so a present page without it was written since it was mapped)."""
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(mapping.address // page * 8)
        return np.frombuffer(pagemap.read(mapping.size // page * 8), dtype="<u8")


def resident_bytes(mapping: Mapping) -> int:
    return int(((page_flags(mapping) >> np.uint64(63)) & np.uint64(1)).sum()) * mmap.PAGESIZE


def written(mapping: Mapping) -> bool:
    flags = page_flags(mapping)
    present, file_page = (flags >> np.uint64(63)) & np.uint64(1), (flags >> np.uint64(61)) & np.uint64(1)
    return bool((present & (np.uint64(1) - file_page)).any())


def release_load_only_pages(data_file: Path, ranges: Sequence[Sequence[int]]) -> int:
    """Drop the pages of every mapping of `data_file` that lies wholly within the pages of one
    of `ranges` ([offset, length] in the file): ORT maps each external tensor on its own, from
    the page its data starts in, so such a mapping was made for load-only data (a neighbour's
    reaches beyond it; a small one sharing only the first or last page may go too, and faults
    back in). A mapping with a page written since it was made is kept. Returns the bytes
    released (0 where nothing applies)."""
    if not ranges or platform.machine() not in PACKING_MACHINES:
        return 0
    try:
        mappings = mapped_ranges(data_file)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    extents = sorted((start - start % page, start + length + -(start + length) % page) for start, length in ranges)
    starts = [low for low, _ in extents]
    released = 0
    for mapping in mappings:
        i = bisect.bisect_right(starts, mapping.offset) - 1  # the last extent starting at or before it
        if i < 0 or mapping.offset + mapping.size > extents[i][1]:
            continue
        try:
            if written(mapping):  # such a page would come back from the file as it was: keep it
                continue
        except OSError:
            return released
        if madvise(mapping.address, mapping.size, MADV_DONTNEED) == 0:
            released += mapping.size
    return released
