"""Pages ORT reads only while loading are dropped after the session is built (manifest
`load_only_data`, jaonnx_export/load_only.py, runtime/jaonnx/page_release.py)."""

from __future__ import annotations

import mmap
import platform
from pathlib import Path

import numpy as np
import pytest

import jaonnx
from jaonnx.page_release import PACKING_MACHINES, mapped_ranges, release_load_only_pages, resident_bytes
from quantized_artifacts import export

PAGE = mmap.PAGESIZE
x86 = pytest.mark.skipif(platform.machine() not in PACKING_MACHINES,
                         reason="ORT packs MatMulNBits' scales only on x86-64: nothing is released elsewhere")


def _resident(mappings, address: int) -> int:
    (found,) = [m for m in mappings if m.address == address]
    return resident_bytes(found)


def _address(view: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@x86
def test_release_drops_exactly_the_mappings_inside_the_ranges(tmp_path: Path) -> None:
    """Mapped the way ORT maps tensors (private, one mapping per tensor): a mapping inside the
    load-only range loses its pages; one reaching past it, one elsewhere, and one whose page
    was written keep theirs, and the written bytes stay as written."""
    data = tmp_path / "model.onnx.data"
    data.write_bytes(np.arange(32 * PAGE // 4, dtype=np.uint32).tobytes())
    with open(data, "r+b") as f:
        inside = mmap.mmap(f.fileno(), 4 * PAGE, offset=0, access=mmap.ACCESS_COPY)
        across = mmap.mmap(f.fileno(), 4 * PAGE, offset=2 * PAGE, access=mmap.ACCESS_COPY)
        elsewhere = mmap.mmap(f.fileno(), 4 * PAGE, offset=16 * PAGE, access=mmap.ACCESS_COPY)
        written = mmap.mmap(f.fileno(), 2 * PAGE, offset=0, access=mmap.ACCESS_COPY)
    views = (inside, across, elsewhere, written)
    for view in views:
        sum(view[i] for i in range(0, len(view), PAGE))  # fault every page in
    written[0:4] = b"jaon"
    addresses = [_address(v) for v in views]
    before = mapped_ranges(data)
    assert all(_resident(before, a) > 0 for a in addresses)

    released = release_load_only_pages(data, [[100, 4 * PAGE - 200]])  # pages 0-3, unaligned ends

    after = mapped_ranges(data)
    assert released == 4 * PAGE
    assert _resident(after, addresses[0]) == 0
    assert [_resident(after, a) > 0 for a in addresses[1:]] == [True, True, True]
    assert written[0:4] == b"jaon" and inside[4:8] == np.uint32(1).tobytes()  # re-read from the file
    for view in views:
        view.close()


def test_release_with_nothing_to_do_releases_nothing(tmp_path: Path) -> None:
    never_mapped = tmp_path / "model.onnx.data"
    never_mapped.write_bytes(b"\0" * PAGE)
    assert release_load_only_pages(never_mapped, [[0, PAGE]]) == 0
    assert release_load_only_pages(never_mapped, []) == 0


@pytest.fixture(scope="module")
def int4(twins_dir: Path, cache_dir: Path) -> Path:
    return export(twins_dir, cache_dir, "int4", "static")


def test_export_records_the_packed_scales_and_zero_points(int4: Path, twins_dir: Path, cache_dir: Path) -> None:
    """load_only_data covers exactly the external scales and zero points of the int4 products,
    nothing else; an int8 artifact (whose kernel frees its packed weights itself) has none."""
    import onnx

    manifest = jaonnx.read_manifest(int4)
    model = onnx.load(str(int4 / "model.onnx"), load_external_data=False)
    packed = {n.input[i] for n in model.graph.node if n.op_type == "MatMulNBits" for i in (2, 3) if len(n.input) > i}
    spans = {t.name: {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
             for t in model.graph.initializer if t.external_data}
    covered = {name for name, s in spans.items()
               if any(start <= s["offset"] and s["offset"] + s["length"] <= start + length
                      for start, length in manifest.load_only_data)}
    assert covered == packed & set(spans) and covered
    assert jaonnx.read_manifest(export(twins_dir, cache_dir, "int8", "static")).load_only_data == ()


@x86
def test_loaded_int4_model_holds_none_of_those_pages_and_generates_the_same(int4: Path, monkeypatch) -> None:
    """A model loaded with the release turned off keeps the scales' pages resident (so this
    check can fail); jaonnx.load drops them, generating does not fault them back in, and both
    models give the same greedy tokens and logits."""
    import jaonnx.model

    manifest = jaonnx.read_manifest(int4)
    data = int4 / str(manifest.external_data)
    extents = [(s - s % PAGE, s + n + -(s + n) % PAGE) for s, n in manifest.load_only_data]

    def load_only(mappings):
        return [m for m in mappings if any(low <= m.offset and m.offset + m.size <= high for low, high in extents)]

    earlier = {m.address for m in mapped_ranges(data)}  # other tests' sessions of this artifact
    with monkeypatch.context() as patch:
        patch.setattr(jaonnx.model, "release_load_only_pages", lambda *args: 0)
        kept = jaonnx.load(int4, providers="cpu")
    held = [m for m in load_only(mapped_ranges(data)) if m.address not in earlier]
    assert held and all(resident_bytes(m) > 0 for m in held)

    gen = jaonnx.load(int4, providers="cpu")
    ours = {m.address for m in load_only(mapped_ranges(data))} - {m.address for m in held} - earlier
    assert ours
    prompt = "近年の機械学習は"
    tokens = gen.generate(prompt, max_new_tokens=12, do_sample=False, return_ids=True)
    assert all(resident_bytes(m) == 0 for m in mapped_ranges(data) if m.address in ours)
    assert tokens == kept.generate(prompt, max_new_tokens=12, do_sample=False, return_ids=True)
    ids = gen.encode(prompt)
    np.testing.assert_array_equal(gen.new_batch().logits(ids), kept.new_batch().logits(ids))
