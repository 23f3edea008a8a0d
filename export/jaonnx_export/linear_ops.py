"""The quantized kernels one weight product (or embedding lookup) becomes: ONNX nodes +
initializers per layer.

Both kinds quantize activations **per row** (per token), never per tensor, so a request's
numbers do not depend on the other rows of its batch (greedy tokens are identical alone and
in a crowd):

- `Int8PerRow`: symmetric int8 weights per output column, activations quantized per row with
  their own scale (absmax / 127, zero point 128) by four small nodes, and the product
  in `com.microsoft.MatMulIntegerToFloat` (MLAS's packed u8s8 GEMM, as fast as
  `DynamicQuantizeMatMul`, measured). Integer sums are exact, so every row's result is the
  same whatever M or kernel path; `DynamicQuantizeMatMul`, which we used before, takes one
  scale over the whole input and is not batch-invariant.
- `NBitBlocks` (`Int4Blocks`): `com.microsoft.MatMulNBits` (4- or 8-bit blocks along K, bias
  inside the node; accuracy_level 4 quantizes activations to int8 per row block). Measured on
  ORT 1.32 (tests/test_batch_invariance.py): batch-invariant for blocks of 16 and 32 at
  accuracy_level 4; blocks of 64+ compute rows in pairs (each row independent of its
  partner) but a lone row with another kernel, so they are invariant only in a graph that
  pads every product's rows to an even count (`even_rows`, decoder_graph.py); accuracy_level
  0/1 (fp32 compute) is not invariant. One node per product where Int8PerRow needs six,
  which is what an 8-bit decoder step gains (the kernel is slower than MLAS's u8s8 GEMM for
  M > 1, see README "CPU precision").

Embedding tables (`QuantizedTable`) become `com.microsoft.GatherBlockQuantized`: a lookup
reads one row per token, so only the table's size changes (and rows stay independent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .weight_codecs import pack_blocks, quantize_table, quantize_weight

MS_DOMAIN = "com.microsoft"
INT4_INVARIANT_BLOCKS = (16, 32)  # MatMulNBits block sizes measured batch-invariant (see above)
INVARIANT_ACCURACY_LEVEL = 4  # ... and only with int8 compute: levels 0/1 measured to differ between M == 1 and M > 1


class Linear(Protocol):
    """Builds the nodes replacing `x @ weight (+ bias) -> output`."""

    batch_invariant: bool

    def __call__(self, x: str, weight: np.ndarray, bias: str, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        ...


@dataclass
class Int8PerRow:
    """int8 weights (per column) x int8 activations (per row), see the module docstring.
    The row quantization of one input is built once and shared by every product reading it
    (e.g. separate Q, K and V projections)."""

    reduce_range: bool
    opset: int = 18
    batch_invariant: bool = True
    _rows: dict[str, tuple[str, str]] = field(default_factory=dict)
    _constants_made: bool = False

    def _row_quantize(self, x: str) -> tuple[list[Any], list[Any], str, str]:
        """Nodes computing (uint8 x, fp32 per-row peak [..., 1]) from x, once per x:
        q = QuantizeLinear(x / peak, 1/127, 128) = round(127 x / peak) + 128, in [1, 255]. The
        1/127 of the row scale (peak / 127) is folded into the weight scales. An all-zero row
        needs no guard: its q is whatever 0/0 quantizes to, and its product is scaled by its
        peak, 0, so it is exactly 0 (tests/test_quantized_decode.py); dropping the guard's Max
        saves one node per product input at every decode step."""
        from onnx import helper, numpy_helper

        if x in self._rows:
            return [], [], *self._rows[x]
        stem = f"rowq{len(self._rows)}"
        c = "jaonnx_rowq_"
        inits = []
        if not self._constants_made:
            self._constants_made = True
            inits = [numpy_helper.from_array(np.array(v, dtype=t), c + name) for name, v, t in (
                ("step", 1.0 / 127.0, np.float32), ("zp", 128, np.uint8),
                ("axes", [-1], np.int64))]
        peak, q = f"{stem}_peak", f"{stem}_u8"
        if self.opset >= 18:
            reduce = helper.make_node("ReduceMax", [f"{stem}_abs", c + "axes"], [peak], keepdims=1)
        else:
            reduce = helper.make_node("ReduceMax", [f"{stem}_abs"], [peak], axes=[-1], keepdims=1)
        nodes = [
            helper.make_node("Abs", [x], [f"{stem}_abs"]),
            reduce,
            helper.make_node("Div", [x, peak], [f"{stem}_unit"]),  # in [-1, 1]
            helper.make_node("QuantizeLinear", [f"{stem}_unit", c + "step", c + "zp"], [q]),
        ]
        self._rows[x] = (q, peak)
        return nodes, inits, q, peak

    def __call__(self, x: str, weight: np.ndarray, bias: str, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        from onnx import helper, numpy_helper

        nodes, inits, q, peak = self._row_quantize(x)
        w, w_scale = quantize_weight(weight, self.reduce_range)
        w_scale = (w_scale / np.float32(127.0)).astype(np.float32)  # the row scale is peak / 127
        w_name, s_name = f"{stem}_int8", f"{stem}_scale"
        product = f"{stem}_product" if bias else output
        # A non-scalar a_scale broadcasts over the output; ORT then scales a fused bias too,
        # so the bias is its own Add.
        nodes.append(helper.make_node("MatMulIntegerToFloat", [q, w_name, peak, s_name, "jaonnx_rowq_zp"],
                                      [product], name=f"{stem}_quant", domain=MS_DOMAIN))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [output], name=f"{stem}_bias"))
        return nodes, [*inits, numpy_helper.from_array(w, w_name), numpy_helper.from_array(w_scale, s_name)]


@dataclass
class NBitBlocks:
    """Weight-only `bits`-bit (4 or 8) blocks in MatMulNBits: `block` values along K per scale,
    asymmetric (zero points) or symmetric, int8 compute at accuracy_level 4."""

    block: int
    accuracy_level: int = 4
    symmetric: bool = False
    bits: int = 4
    even_rows: bool = False  # the graph pads every product's rows to an even count

    @property
    def batch_invariant(self) -> bool:
        return self.accuracy_level == INVARIANT_ACCURACY_LEVEL and (self.block in INT4_INVARIANT_BLOCKS or self.even_rows)

    def __call__(self, x: str, weight: np.ndarray, bias: str, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        from onnx import helper, numpy_helper

        k, n = weight.shape
        packed, scale, zero = pack_blocks(weight, self.block, self.bits, self.symmetric)
        tag = f"{stem}_int{self.bits}"
        arrays = {tag: packed, f"{tag}_scale": scale}
        if zero is not None:
            arrays[f"{tag}_zero"] = zero
        names = list(arrays)
        if bias:
            names += [""] * (4 - len(names)) + [bias]  # inputs: A, B, scales, zero_points, g_idx, bias
        node = helper.make_node(
            "MatMulNBits", [x, *names], [output], name=f"{stem}_nbits", domain=MS_DOMAIN,
            K=k, N=n, bits=self.bits, block_size=self.block, accuracy_level=self.accuracy_level,
        )
        return [node], [numpy_helper.from_array(a, name) for name, a in arrays.items()]


Int4Blocks = NBitBlocks  # the 4-bit default's historical name


@dataclass
class QuantizedTable:
    """An embedding Gather over a [V, H] table -> GatherBlockQuantized with `bits`-bit blocks of
    `block` values along H (asymmetric, zero points)."""

    bits: int = 8
    block: int = 32
    batch_invariant: bool = True

    def fits(self, width: int) -> bool:
        return width % self.block == 0

    def __call__(self, ids: str, table: np.ndarray, output: str, stem: str) -> tuple[list[Any], list[Any]]:
        from onnx import helper, numpy_helper

        data, scales, zeros = quantize_table(table, self.bits, self.block)
        names = [f"{stem}_q{self.bits}", f"{stem}_q{self.bits}_scale", f"{stem}_q{self.bits}_zero"]
        node = helper.make_node("GatherBlockQuantized", [names[0], ids, names[1], names[2]], [output],
                                name=f"{stem}_gather", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                block_size=self.block, bits=self.bits)
        return [node], [numpy_helper.from_array(a, n) for a, n in zip((data, scales, zeros), names)]
