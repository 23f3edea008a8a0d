"""int8 and int4 for CPU: which kernel each weight product becomes, and the report of it.

The weight math lives in weight_codecs.py, the nodes in linear_ops.py, the streaming graph
walk in weight_rewrite.py; this module only chooses per layer. Every choice quantizes
activations per row, so artifacts are batch-invariant (linear_ops.py says why and where not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .decoder_graph import has_even_rows
from .linear_ops import Int8PerRow, Linear, NBitBlocks, QuantizedTable
from .weight_codecs import pack_int4, quantize_weight, unpack_int4  # noqa: F401  (public names)
from .weight_rewrite import default_opset, rewrite_weight_products

# int4 block size along K when the recipe says nothing else (Recipe.int4_block chooses per shape:
# README "Which precision per task"). 32 is batch-invariant in any graph; blocks of 64+ only in one
# that pads its rows to an even count (linear_ops.py, decoder_graph.EvenRows).
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations x int4 weights (MLAS sqnbitgemm CompInt8)
# int8 reduce_range: 7-bit weights. MLAS's u8s8 kernel on x86 without VNNI (vpmaddubsw) can
# saturate int16 sums of two 8-bit products; 7 bits cannot. Measured: same speed, and the twins'
# top-1 agreement stays >= 0.99, so every artifact uses the setting that is exact on every CPU.
PORTABLE_REDUCE_RANGE = True
INT8_METHOD = "MatMulIntegerToFloat, int8 per-column weights, int8 per-row activations"
# int8 kernels: "rows" = Int8PerRow (MLAS u8s8 GEMM, fastest for M > 1: fill-mask, prefill);
# "blocks" = 8-bit MatMulNBits in blocks of 32 (one node per product: fastest decode step).
INT8_KERNELS = ("rows", "blocks")
INT8_BLOCK = 32  # 8-bit MatMulNBits block along K: 16/32 are the batch-invariant sizes


def int8_linear(kernel: str, reduce_range: bool, opset: int) -> Linear:
    """The Linear an int8 weight product becomes (see INT8_KERNELS)."""
    if kernel not in INT8_KERNELS:
        from jaonnx.errors import JaonnxError

        raise JaonnxError(f"the int8 kernel must be rows or blocks, not {kernel!r}")
    if kernel == "blocks":
        return NBitBlocks(INT8_BLOCK, INT4_ACCURACY_LEVEL, symmetric=False, bits=8)
    return Int8PerRow(reduce_range, opset)


def int8_method(kernel: str) -> str:
    return INT8_METHOD if kernel == "rows" else (
        f"MatMulNBits, 8-bit blocks of {INT8_BLOCK}, accuracy_level={INT4_ACCURACY_LEVEL}")
EMBEDDINGS = {"int8": (8, 32), "int4": (4, 32)}  # token embedding table: (bits, block along H)


def _tables(embedding: str | None, vocab_size: int | None, report: dict[str, Any]) -> Any:
    """The choose_table of the walk: the token embedding ([vocab_size, H]) as `embedding` says
    (None / "fp32": left as it is); records what it did in `report`."""
    if embedding in (None, "fp32") or vocab_size is None:
        return None
    if embedding not in EMBEDDINGS:
        from jaonnx.errors import JaonnxError

        raise JaonnxError(f"the embedding must be int8, int4 or fp32, not {embedding!r}")
    bits, block = EMBEDDINGS[embedding]
    table = QuantizedTable(bits, block)

    def choose(v: int, h: int) -> QuantizedTable | None:
        if v != vocab_size or not table.fits(h):
            return None
        report["embedding"] = {"method": f"GatherBlockQuantized, {bits}-bit blocks of {block}", "bits": bits,
                               "block_size": block}
        return table

    return choose


def quantize_int8(src: Path, dst: Path, data_file: str | None, reduce_range: bool | None = None,
                  vocab_size: int | None = None, embedding: str | None = None, kernel: str = "rows") -> dict[str, Any]:
    """Every MatMul/Gemm with a constant 2-D weight -> int8 weights x per-row int8 activations
    in the `kernel` INT8_KERNELS names; the token embedding table ([vocab_size, H]) as
    `embedding` says (None: fp32)."""
    reduce_range = PORTABLE_REDUCE_RANGE if reduce_range is None else reduce_range
    int8 = int8_linear(kernel, reduce_range, default_opset(src))
    report: dict[str, Any] = {"method": int8_method(kernel), "kernel": kernel}
    if kernel == "rows":
        report["reduce_range"] = reduce_range
    tables = _tables(embedding, vocab_size, report)
    report["matmuls_quantized"] = rewrite_weight_products(src, dst, data_file, lambda k, n: int8, tables)
    return report | {"batch_invariant": int8.batch_invariant}


def quantize_int4(src: Path, dst: Path, data_file: str | None, vocab_size: int, lm_head: str = "int8",
                  block: int = INT4_BLOCK, reduce_range: bool | None = None, symmetric: bool = False,
                  accuracy_level: int = INT4_ACCURACY_LEVEL, embedding: str | None = None,
                  head_kernel: str = "rows") -> dict[str, Any]:
    """Weight-only int4 (MatMulNBits, blocks of `block` along K) for every weight product; the
    LM head (the product with N == vocab_size) is int4, int8 (in the `head_kernel`
    INT8_KERNELS names, as quantize_int8) or fp32 as `lm_head` says; the token embedding
    table as `embedding` says (None: fp32)."""
    if lm_head not in ("int4", "int8", "fp32"):
        from jaonnx.errors import JaonnxError

        raise JaonnxError(f"the int4 LM head must be int4, int8 or fp32, not {lm_head!r}")
    reduce_range = PORTABLE_REDUCE_RANGE if reduce_range is None else reduce_range
    even_rows = has_even_rows(src)
    int4 = NBitBlocks(block, accuracy_level, symmetric, even_rows=even_rows)
    int8 = int8_linear(head_kernel, reduce_range, default_opset(src))
    used: list[Linear] = []
    heads: list[int] = []

    def choose(k: int, n: int) -> Linear | None:
        chosen: Linear | None = int4
        if n == vocab_size:
            heads.append(n)
            chosen = {"int4": int4, "int8": int8, "fp32": None}[lm_head]
        if chosen is not None:
            used.append(chosen)
        return chosen

    tabled: dict[str, Any] = {}
    count = rewrite_weight_products(src, dst, data_file, choose, _tables(embedding, vocab_size, tabled))
    method = f"MatMulNBits, int4 blocks of {block}{' symmetric' if symmetric else ''}, accuracy_level={accuracy_level}"
    report: dict[str, Any] = {"method": method, "matmuls_quantized": count, "block_size": block,
                              "symmetric": symmetric, "accuracy_level": accuracy_level,
                              "lm_head": lm_head if heads else None,
                              "even_rows": even_rows,
                              "batch_invariant": all(linear.batch_invariant for linear in used)}
    if heads and lm_head == "int8":
        report["head_kernel"] = head_kernel
        if head_kernel == "rows":
            report["reduce_range"] = reduce_range
    return report | tabled
