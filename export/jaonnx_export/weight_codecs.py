"""Weight codecs: fp32 [K, N] weights to the integer layouts ORT's kernels read, and back.

Pure numpy, one weight at a time (callers stream the graph), in column slices so the float
temporaries of a big LM head stay bounded."""

from __future__ import annotations

import numpy as np

COLUMNS = 4096  # output columns coded at a time: bounds the float temporaries of a big LM head


def quantize_weight(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (int8 weight, fp32 scale [N]).
    `reduce_range`: 7-bit values (|q| <= 63), exact in MLAS's u8s8 kernel on every x86 CPU."""
    if weight.shape[1] > COLUMNS:
        parts = [quantize_weight(weight[:, i : i + COLUMNS], reduce_range) for i in range(0, weight.shape[1], COLUMNS)]
        return np.concatenate([q for q, _ in parts], axis=1), np.concatenate([s for _, s in parts])
    limit = 63.0 if reduce_range else 127.0
    peak = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(peak > 0, peak / limit, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -limit, limit).astype(np.int8)
    return q, scale


def pack_blocks(weight: np.ndarray, block: int, bits: int = 4, symmetric: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`bits`-bit (4 or 8) blocks along K of a [K, N] weight, in MatMulNBits' layout: (uint8
    [N, K/block, block * bits / 8], 4-bit values packed low nibble first; fp32 scales
    [N, K/block]; uint8 zero points [N, K/block] for 8 bits or packed [N, ceil(K/block / 2)]
    for 4, or None when `symmetric`: ORT then takes 2**(bits-1) as every zero point)."""
    k, n = weight.shape
    if n > COLUMNS:
        parts = [pack_blocks(weight[:, i : i + COLUMNS], block, bits, symmetric) for i in range(0, n, COLUMNS)]
        zeros = None if symmetric else np.concatenate([p[2] for p in parts])  # type: ignore[misc]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), zeros
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), dtype=np.float32)
    padded[:k] = weight
    w = padded.T.reshape(n, blocks, block)  # [N, blocks, block]
    if symmetric:
        # The block's largest-magnitude value maps to -mid exactly (llama.cpp's Q4_0 trick, and
        # ORT's own quantizer): the scale is signed, so the extreme never clips at mid - 1.
        extreme = np.take_along_axis(w, np.abs(w).argmax(axis=2)[..., None], axis=2)[..., 0]
        scale = (extreme / -mid).astype(np.float32)
        scale = np.where(scale != 0, scale, 1.0).astype(np.float32)
        zero = np.full((n, blocks), mid, dtype=np.uint8)
    else:
        low = np.minimum(w.min(axis=2), 0.0)
        high = np.maximum(w.max(axis=2), 0.0)
        scale = ((high - low) / top).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-low / scale), 0, top).astype(np.uint8)  # [N, blocks]
    q = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    if bits == 8:
        return q, scale, None if symmetric else zero
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if symmetric:
        return packed, scale, None
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    zero_packed = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale, zero_packed


def pack_int4(weight: np.ndarray, block: int, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """4-bit MatMulNBits blocks (pack_blocks with bits=4)."""
    return pack_blocks(weight, block, 4, symmetric)


def unpack_blocks(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, k: int, bits: int = 4) -> np.ndarray:
    """The fp32 [K, N] weight a MatMulNBits node computes with (for tests and reports)."""
    if bits == 8:
        n, blocks, _ = packed.shape
        z = np.full((n, blocks), 128.0, dtype=np.float32) if zero is None else zero.astype(np.float32)
        w = (packed.astype(np.float32) - z[..., None]) * scale[..., None]
        return w.reshape(n, -1)[:, :k].T
    return unpack_int4(packed, scale, zero, k)


def unpack_int4(packed: np.ndarray, scale: np.ndarray, zero_packed: np.ndarray | None, k: int) -> np.ndarray:
    """The fp32 [K, N] weight a 4-bit MatMulNBits node computes with (for tests and reports)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, half * 2), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    if zero_packed is None:
        zero = np.full((n, blocks), 8.0, dtype=np.float32)
    else:
        zero = np.empty((n, zero_packed.shape[1] * 2), dtype=np.float32)
        zero[:, 0::2] = zero_packed & 0x0F
        zero[:, 1::2] = zero_packed >> 4
    w = (q - zero[:, :blocks, None]) * scale[..., None]
    return w.reshape(n, -1)[:, :k].T


def quantize_table(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric `bits`-bit blocks of `block` values along the hidden axis of an embedding
    table [V, H], in GatherBlockQuantized's layout: (uint8 data [V, H] for 8 bits or packed
    low nibble first [V, H/2] for 4, fp32 scales [V, H/block], uint8 zero points [V, H/block],
    packed two per byte for 4 bits)."""
    v, h = table.shape
    if h % block:
        raise ValueError(f"table width {h} is not a multiple of the block size {block}")
    top = (1 << bits) - 1
    rows = max(1, (COLUMNS * 64) // h)  # bound the float temporaries of a big table
    data, scales, zeros = [], [], []
    for start in range(0, v, rows):
        w = table[start : start + rows].astype(np.float32).reshape(-1, h // block, block)
        low = np.minimum(w.min(axis=2), 0.0)
        high = np.maximum(w.max(axis=2), 0.0)
        scale = ((high - low) / top).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-low / scale), 0, top).astype(np.uint8)
        q = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8).reshape(len(w), h)
        if bits == 4:
            q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
            if zero.shape[1] % 2:
                zero = np.concatenate([zero, np.zeros((len(zero), 1), dtype=np.uint8)], axis=1)
            zero = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
        data.append(q)
        scales.append(scale)
        zeros.append(zero)
    return np.concatenate(data), np.concatenate(scales), np.concatenate(zeros)


def dequantize_table(data: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> np.ndarray:
    """The fp32 table a GatherBlockQuantized node reads rows of (for tests and reports)."""
    if bits == 4:
        q = np.empty((data.shape[0], data.shape[1] * 2), dtype=np.float32)
        q[:, 0::2], q[:, 1::2] = data & 0x0F, data >> 4
        z = np.empty((zeros.shape[0], zeros.shape[1] * 2), dtype=np.float32)
        z[:, 0::2], z[:, 1::2] = zeros & 0x0F, zeros >> 4
        z = z[:, : scales.shape[1]]
    else:
        q, z = data.astype(np.float32), zeros.astype(np.float32)
    v, h = q.shape
    return ((q.reshape(v, -1, block) - z[..., None]) * scales[..., None]).reshape(v, h)
