"""Which bytes of an artifact's data file ONNX Runtime reads only while it loads the graph.

Why: on x86-64, ORT's CPU MatMulNBits kernel at accuracy_level 4 (int8 compute) copies each
product's block scales and zero points into its own packed weight buffer when the session is
built, yet ORT keeps the original initializers, which stay mapped from the data file: 162 MiB
of resident file pages for the japanese-gpt-1b int4 shape, never read again (measured: released
after loading, they stayed out through 24 generated tokens, and the tokens were the same). The
exporter records their byte ranges in the manifest (`load_only_data`); the runtime drops those
pages once the session exists (runtime/jaonnx/page_release.py). Were ORT to read them after
all, the kernel would fault them back in from the file: the release can cost a page fault,
never a wrong number.
"""

from __future__ import annotations

from pathlib import Path

MS_DOMAIN = "com.microsoft"
PACKED_INPUTS = (2, 3)  # MatMulNBits: A, B, scales, zero_points, g_idx, bias
PACKING_LEVEL = 4  # accuracy_level of the int8-compute kernel (SQNBIT_CompInt8) that packs them
PAGE = 4096


def load_only_ranges(model_path: Path) -> list[list[int]]:
    """[offset, length] pairs (sorted; neighbours merged across alignment padding) of the
    external data that only ORT's weight packing reads: the scales and zero points of every
    MatMulNBits at accuracy_level 4 whose initializers live in the data file."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    names: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if level == PACKING_LEVEL:
            names.update(node.input[i] for i in PACKED_INPUTS if i < len(node.input) and node.input[i])
    used_elsewhere = {i for node in model.graph.node if node.op_type != "MatMulNBits" for i in node.input}
    spans = []  # (offset, length, load-only?) of every external tensor, in file order
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if "offset" in info and "length" in info:
            only = tensor.name in names and tensor.name not in used_elsewhere
            spans.append((int(info["offset"]), int(info["length"]), only))
    merged: list[list[int]] = []
    previous_only = False
    for offset, length, only in sorted(spans):
        if only and previous_only and offset - (merged[-1][0] + merged[-1][1]) < PAGE:
            merged[-1][1] = offset + length - merged[-1][0]  # neighbours in the file: one range
        elif only:
            merged.append([offset, length])
        previous_only = only
    return merged
