"""BatchDecoder over a preallocated KV cache written in place (manifest kv_layout "static").

The graph (jaonnx_export.decoder_graph) runs GroupQueryAttention over one buffer per layer
and k/v, shaped [slots, heads, capacity, head_dim]. Active rows occupy slots 0..rows-1, so the
running batch is a prefix of the buffer and is bound to both `past_key_values.*` and
`present.*` by address: ORT then shares past and present and writes only the new tokens'
keys/values, at each row's own length (`seqlens_k`). Nothing is copied per step, rows of
different lengths need no padding, and positions are each row's own token count.

Copies happen only when the layout changes: `keep` moves the surviving rows that sit above a
freed slot, and a batch or context beyond the allocation reallocates once (doubling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError
from .cuda_graphs import CudaGraphs

PAST = "past_key_values."
MIN_CAPACITY = 64


class StaticBatchDecoder:
    """The running batch of a static-layout decoder artifact (see module docstring)."""

    def __init__(self, session: Any, manifest: Manifest, cuda_graphs: CudaGraphs | bool | None = None) -> None:
        """`cuda_graphs`: None captures one-token decode steps when the session has
        `enable_cuda_graph` on (see cuda_graphs.py), False never, or the CudaGraphs to use."""
        import onnxruntime as ort

        shape = manifest.decoder
        if shape is None or shape.kv_layout != "static":
            raise JaonnxError("StaticBatchDecoder needs an artifact exported with --kv-cache static")
        self._ort = ort
        self.session = session
        self.shape = shape
        self.max_positions = manifest.max_positions
        self.past_names = [n for n in manifest.inputs if n.startswith(PAST)]
        self.present_names = ["present." + n[len(PAST):] for n in self.past_names]
        self.dtype = np.float16 if manifest.inputs[self.past_names[0]] == "float16" else np.float32
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens held by each active row
        self.slots = 0
        self.capacity = 0
        self._buffers: list[Any] = []  # numpy arrays (CPU) or OrtValues (CUDA), one per past name
        self._generation = 0  # bumped on reallocation: cached bindings hold the old addresses
        self._cached: tuple[tuple[int, ...], Any] | None = None
        if cuda_graphs is None or cuda_graphs is True:
            cuda_graphs = CudaGraphs.for_session(session, manifest)
        self.graphs: CudaGraphs | None = cuda_graphs or None
        self._run_options = self.graphs.uncaptured if self.graphs else None

    # ---- BatchDecoder -------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, prompts: Sequence[Sequence[int]], reserve: int) -> np.ndarray:
        """Prefill the prompts into the next free slots, right-padded to the longest one; the
        padding's keys land beyond each row's length, where nothing reads them."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise JaonnxError("add() needs at least one prompt, each with at least one token")
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        self._ensure(self.rows + len(prompts), width, hint=reserve)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape)
        keep = width - int(lengths.min()) + 1
        logits = self._run(ids, positions, lengths - 1, width, keep, first=self.rows)
        self.lengths = np.concatenate([self.lengths, lengths])
        return np.ascontiguousarray(logits[np.arange(len(prompts)), lengths - width + keep - 1])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[0] != self.rows or self.rows == 0:
            raise JaonnxError(f"step() needs tokens shaped [rows={self.rows}, k], got {list(tokens.shape)}")
        k = tokens.shape[1]
        total = self.lengths + k
        self._ensure(self.rows, int(total.max()))
        positions = self.lengths[:, None] + np.arange(k, dtype=np.int64)
        size = self.graphs.bucket(self.rows) if self.graphs is not None and k == 1 else None
        if size is not None:
            self._ensure(size, int(total.max()))  # the bucket's extra rows are free slots
            logits = self.graphs.step(tokens, self.lengths, self._generation, self.capacity, self.bind_cache)
        elif k == 1 or self.rows == 1:
            logits = self._run(tokens, positions, total - 1, int(total.max()), k, first=0)
        else:
            # GroupQueryAttention takes several new tokens against a past only for one row.
            logits = np.concatenate([
                self._run(tokens[r : r + 1], positions[r : r + 1], total[r : r + 1] - 1, int(total[r]), k, first=r)
                for r in range(self.rows)
            ])
        self.lengths = total
        return logits

    def discard(self, n: int) -> None:
        if n < 0 or (self.rows and n >= int(self.lengths.min())):
            raise JaonnxError(f"discard({n}) must leave every row at least one token")
        self.lengths = self.lengths - n

    def keep(self, rows: Sequence[int]) -> None:
        order = [int(r) for r in rows]
        if len(set(order)) != len(order) or any(not 0 <= r < self.rows for r in order):
            raise JaonnxError(f"keep() takes distinct row numbers below {self.rows}, got {order}")
        moves = [(dst, src) for dst, src in enumerate(order) if dst != src]
        if moves:
            dst, src = (list(t) for t in zip(*moves))
            used = int(self.lengths[src].max())
            self._move(dst, src, used)
        self.lengths = self.lengths[order]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """One text against its own empty cache (ORT allocates it), outside the running batch."""
        ids = list(ids)
        n = len(ids)
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "seqlens_k": np.array([n - 1], dtype=np.int32),
            "total_sequence_length": np.array(n, dtype=np.int32),
            "logits_to_keep": np.array([n], dtype=np.int64),
        }
        empty = np.zeros((1, self.shape.num_heads, 0, self.shape.head_dim), dtype=self.dtype)
        feed |= {name: empty for name in self.past_names}
        return self.session.run(["logits"], feed, self._run_options)[0][0].astype(np.float32, copy=False)

    # ---- the buffer ---------------------------------------------------------------------

    def _run(self, ids: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray, total: int, keep: int,
             first: int) -> np.ndarray:
        """Run rows first..first+len(ids)-1 of the buffer; their cache is read and written in place."""
        binding = self._binding(first, len(ids))
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        binding.bind_output("logits", "cpu")  # rebound: the last run's logits have another shape
        self.session.run_with_iobinding(binding, self._run_options)
        return binding.get_outputs()[0].numpy()

    def _binding(self, first: int, rows: int) -> Any:
        """An IO binding with the cache of rows first..first+rows-1 bound as past and present.
        Binding ~50 buffers costs ~0.4 ms, so the decode step's binding is kept until the
        batch or the allocation changes."""
        key = (first, rows, self.capacity, self._generation)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        self.bind_cache(binding, first, rows)
        self._cached = (key, binding)
        return binding

    def bind_cache(self, binding: Any, first: int, rows: int) -> None:
        """Bind the cache of rows first..first+rows-1 as both past and present (by address)."""
        shape = [rows, self.shape.num_heads, self.capacity, self.shape.head_dim]
        row_bytes = self.shape.num_heads * self.capacity * self.shape.head_dim * np.dtype(self.dtype).itemsize
        for past, present, buffer in zip(self.past_names, self.present_names, self._buffers):
            address = self._address(buffer) + first * row_bytes
            binding.bind_input(past, self.device, 0, self.dtype, shape, address)
            binding.bind_output(present, self.device, 0, self.dtype, shape, address)

    def _address(self, buffer: Any) -> int:
        return buffer.ctypes.data if isinstance(buffer, np.ndarray) else buffer.data_ptr()

    def _ensure(self, slots: int, capacity: int, hint: int = 0) -> None:
        """Grow the allocation (doubling) so `slots` rows of `capacity` positions fit; `hint`
        (the caller's reserve, capped at the model's positions) sizes it once for the whole run."""
        if capacity > self.max_positions:
            raise JaonnxError(f"{capacity} positions exceed the model's {self.max_positions}: shorten the prompt "
                              "or max_new_tokens")
        capacity = max(capacity, min(hint, self.max_positions))
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots = max(slots, 2 * self.slots if slots > self.slots else self.slots, 1)
        new_capacity = self.capacity
        if capacity > self.capacity:
            new_capacity = min(self.max_positions, max(capacity, 2 * self.capacity, MIN_CAPACITY))
        used = int(self.lengths.max()) if self.rows else 0
        shape = (new_slots, self.shape.num_heads, new_capacity, self.shape.head_dim)
        old = [self._host(b) for b in self._buffers] if self.rows else []
        fresh = []
        for i in range(len(self.past_names)):
            array = np.zeros(shape, dtype=self.dtype)
            if old:
                array[: self.rows, :, :used] = old[i][: self.rows, :, :used]
            fresh.append(self._device(array))
        self._buffers, self.slots, self.capacity = fresh, new_slots, new_capacity
        self._generation += 1
        self._cached = None

    def _move(self, dst: list[int], src: list[int], used: int) -> None:
        if self.device == "cpu":
            for buffer in self._buffers:
                buffer[dst, :, :used] = buffer[src, :, :used]  # the right side is gathered first
            return
        # CUDA: ORT's Python API has no device-to-device copy; a row move goes through the host.
        for buffer in self._buffers:
            array = buffer.numpy()
            array[dst, :, :used] = array[src, :, :used]
            buffer.update_inplace(array)

    def _host(self, buffer: Any) -> np.ndarray:
        return buffer if isinstance(buffer, np.ndarray) else buffer.numpy()

    def _device(self, array: np.ndarray) -> Any:
        if self.device == "cpu":
            return array
        return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
