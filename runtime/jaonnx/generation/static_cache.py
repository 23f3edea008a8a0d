"""BatchDecoder over a preallocated KV cache written in place (manifest kv_layout "static").

The graph (jaonnx_export.decoder_graph) runs GroupQueryAttention over one buffer per layer
and k/v, shaped [slots, heads, capacity, head_dim]. Active rows occupy slots 0..rows-1, so the
running batch is a prefix of the buffer and is bound to both `past_key_values.*` and
`present.*` by address: ORT then shares past and present and writes only the new tokens'
keys/values, at each row's own length (`seqlens_k`). Nothing is copied per step, rows of
different lengths need no padding, and positions are each row's own token count.

Copies happen only when the layout changes: `keep` moves the surviving rows that sit above a
freed slot, a batch or context beyond the allocation reallocates once (doubling), and a prompt
prefilled in chunks (`open` / `fill`) is written straight into the slot above the running rows
(outside their binding), so `join` copies nothing unless it makes n > 1 sequences.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError
from .batch import JoiningRow
from .graph_io import GraphIO
from .cuda_graphs import CudaGraphs

MIN_CAPACITY = 64
BOUND_RUNS = 4  # bindings kept (decode step, joining chunk, and a spare of each after a change)
HELD_LOGITS_BYTES = 1 << 22  # a binding keeps its logits buffer up to 4 MiB (decode: rows x vocab x 4 B)


class StaticBatchDecoder:
    """The running batch of a static-layout decoder artifact (see module docstring)."""

    def __init__(self, session: Any, manifest: Manifest, cuda_graphs: CudaGraphs | bool | None = None) -> None:
        """`cuda_graphs`: None captures one-token decode steps when the session has
        `enable_cuda_graph` on (see cuda_graphs.py), False never, or the CudaGraphs to use."""
        import onnxruntime as ort

        if manifest.decoder is None or manifest.decoder.kv_layout != "static":
            raise JaonnxError("StaticBatchDecoder needs an artifact exported with --kv-cache static")
        self._ort = ort
        self.io = GraphIO(session, manifest)
        self.session = session
        self.shape = self.io.shape
        self.max_positions = self.io.max_positions
        self.past_names = self.io.past_names
        self.present_names = self.io.present_names
        self.dtype = self.io.dtype
        self.device = self.io.device
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens held by each active row
        self.slots = 0
        self.capacity = 0
        self._buffers: list[Any] = []  # numpy arrays (CPU) or OrtValues (CUDA), one per past name
        self._generation = 0  # bumped on reallocation: cached bindings hold the old addresses
        self._bound: dict[tuple[int, ...], BoundRun] = {}  # recent bindings, least recently used first
        self._joining: JoiningRow | None = None  # a prompt being prefilled into slot `rows`
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
        self._joining = None  # its slot is where these rows go
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
        if size is not None and size > self.rows and self._joining is not None:
            size = None  # the bucket's spare rows would write over the prompt being prefilled in slot `rows`
        if size is not None:
            self._ensure(size, int(total.max()))  # the bucket's extra rows are free slots
            logits = self.io.logits(
                self.graphs.step(tokens, self.lengths, self._generation, self.capacity, self.bind_cache))
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

    # ---- the joining row (chunked prefill): slot `rows`, just above the running rows ----------
    # It is written in place, chunk by chunk, outside the running rows' binding, and becomes a
    # running row by a change of `lengths`: no copy. One at a time (the engine prefills in
    # order); opening another drops an unjoined one (its request was aborted).
    def open(self, reserve: int, prefix: Sequence[np.ndarray] = ()) -> JoiningRow:
        length = sum(block.shape[2] for block in prefix)
        self._joining = None
        self._ensure(self.rows + 1, max(length, 1), hint=reserve)
        if self.device != "cpu" and prefix:  # each write is a host round trip there: one
            prefix = [np.concatenate(list(prefix), axis=2)]
        start = 0
        for block in prefix:  # straight into the slot: one copy
            self._write(self.rows, start, block)
            start += block.shape[2]
        row = JoiningRow(length, reserve, None)
        self._joining = row
        return row

    def fill(self, row: JoiningRow, tokens: Sequence[int], every: bool = False) -> np.ndarray:
        self._check_joining(row)
        k, total = len(tokens), row.length + len(tokens)
        self._ensure(self.rows + 1, total)
        logits = self._run(np.array([tokens], dtype=np.int64), np.arange(row.length, total, dtype=np.int64)[None],
                           np.array([total - 1]), total, k if every else 1, first=self.rows)
        row.length = total
        return logits[0] if every else logits[0, -1]

    def read(self, row: JoiningRow, start: int, end: int) -> np.ndarray:
        self._check_joining(row)
        return np.stack([self._host(b)[self.rows, :, start:end] for b in self._buffers])

    def join(self, row: JoiningRow, copies: int = 1) -> None:
        self._check_joining(row)
        first = self.rows
        self._ensure(first + copies, row.length, hint=row.reserve)
        if copies > 1:
            self._move(list(range(first + 1, first + copies)), [first] * (copies - 1), row.length)
        self._joining = None
        self.lengths = np.concatenate([self.lengths, np.full(copies, row.length, dtype=np.int64)])

    def _check_joining(self, row: JoiningRow) -> None:
        if row is not self._joining:
            raise JaonnxError("this joining row was dropped (another was opened) or has joined already")

    def _write(self, slot: int, start: int, kv: np.ndarray) -> None:
        """Host KV [past names, heads, n, head_dim] into positions start..start+n-1 of one slot."""
        end = start + kv.shape[2]
        for buffer, values in zip(self._buffers, kv):
            if isinstance(buffer, np.ndarray):
                buffer[slot, :, start:end] = values
            else:  # CUDA: through the host, as `_move`
                array = buffer.numpy()
                array[slot, :, start:end] = values
                buffer.update_inplace(array)

    def discard(self, n: int) -> None:
        if n < 0 or (self.rows and n >= int(self.lengths.min())):
            raise JaonnxError(f"discard({n}) must leave every row at least one token")
        self.lengths = self.lengths - n

    def keep(self, rows: Sequence[int]) -> None:
        order = [int(r) for r in rows]
        if len(set(order)) != len(order) or any(not 0 <= r < self.rows for r in order):
            raise JaonnxError(f"keep() takes distinct row numbers below {self.rows}, got {order}")
        moves = [(dst, src) for dst, src in enumerate(order) if dst != src]
        lengths = [int(self.lengths[src]) for _, src in moves]
        if self._joining is not None and len(order) != self.rows:  # it stays just above the running rows
            moves.append((len(order), self.rows))
            lengths.append(self._joining.length)
        if moves:
            dst, src = (list(t) for t in zip(*moves))
            self._move(dst, src, max(lengths))
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
        return self.io.logits(self.session.run(["logits"], feed, self._run_options)[0][0])

    # ---- the buffer ---------------------------------------------------------------------

    def _run(self, ids: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray, total: int, keep: int,
             first: int) -> np.ndarray:
        """Run rows first..first+len(ids)-1 of the buffer; their cache is read and written in place."""
        return self._feed(self._binding(first, len(ids)), ids, positions, seqlens_k, total, keep)

    def _feed(self, run: BoundRun, ids: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray, total: int,
              keep: int) -> np.ndarray:
        run.set("input_ids", ids, np.int64)
        run.set("position_ids", positions, np.int64)
        run.set("seqlens_k", seqlens_k, np.int32)
        run.set("total_sequence_length", total, np.int32)
        run.set("logits_to_keep", [keep], np.int64)
        return self.io.logits(run.run(self.session, (len(ids), keep), self._run_options))

    @property
    def held_logits_bytes(self) -> int:
        """Bytes of logits buffers the kept bindings hold between runs (at most BOUND_RUNS x
        HELD_LOGITS_BYTES)."""
        return sum(run.held_bytes for run in self._bound.values())

    def _binding(self, first: int, rows: int) -> BoundRun:
        """The binding of rows first..first+rows-1. Binding ~50 buffers costs ~0.4 ms, so the
        last BOUND_RUNS bindings are kept until the allocation changes: the decode step's and
        a joining prompt's chunks alternate every step while a long prompt is prefilled."""
        key = (first, rows, self.capacity, self._generation)
        run = self._bound.pop(key, None)
        if run is None:
            run = BoundRun(self._bind(self._buffers, self.capacity, first, rows), self.io.logits_spec,
                           by_address=self.device == "cpu")
            while len(self._bound) >= BOUND_RUNS:
                self._bound.pop(next(iter(self._bound)))  # the least recently used
        self._bound[key] = run
        return run

    def _bind(self, buffers: list[Any], capacity: int, first: int, rows: int) -> Any:
        """An IO binding with the cache of slots first..first+rows-1 of `buffers` bound as
        both past and present (by address: ORT writes the new positions in place)."""
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows binding order (BoundRun)
        self._bind_buffers(binding, buffers, capacity, first, rows)
        return binding

    def bind_cache(self, binding: Any, first: int, rows: int) -> None:
        """Bind the running cache of rows first..first+rows-1 as both past and present (by
        address): the public operation cuda_graphs.py binds its fixed per-bucket inputs with."""
        self._bind_buffers(binding, self._buffers, self.capacity, first, rows)

    def _bind_buffers(self, binding: Any, buffers: list[Any], capacity: int, first: int, rows: int) -> None:
        heads, head_dim = self.io.row_shape
        shape = [rows, heads, capacity, head_dim]
        row_bytes = heads * capacity * head_dim * np.dtype(self.dtype).itemsize
        for past, present, buffer in zip(self.past_names, self.present_names, buffers):
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
        held = self.rows + (self._joining is not None)  # the joining row's slot moves along
        used = int(self.lengths.max()) if self.rows else 0
        if self._joining is not None:
            used = max(used, self._joining.length)
        shape = (new_slots, self.shape.num_heads, new_capacity, self.shape.head_dim)
        old = [self._host(b) for b in self._buffers] if held else []
        fresh = []
        for i in range(len(self.past_names)):
            array = zeroed(shape, self.dtype)
            if old and used:
                array[:held, :, :used] = old[i][:held, :, :used]
            fresh.append(self._device(array))
        self._buffers, self.slots, self.capacity = fresh, new_slots, new_capacity
        self._generation += 1
        self._bound.clear()

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


class BoundRun:
    """One IO binding whose small inputs (ids, positions, lengths) and logits are bound, on the
    CPU, by address to arrays it owns. A run whose shapes repeat (every decode step) writes the
    new values into them and runs: no OrtValue is made, bound or read back (measured on the
    GPT-2-small int4 step: the work outside ORT 189 -> 96 µs). Elsewhere (CUDA: its logits come
    back through the host) inputs are bound as copies and the logits read with get_outputs."""

    def __init__(self, binding: Any, logits: tuple[int | None, Any], by_address: bool) -> None:
        self.binding = binding
        self.vocab, self.logits_dtype = logits
        self.by_address = by_address
        self._inputs: dict[str, np.ndarray] = {}
        self._logits: np.ndarray | None = None

    def set(self, name: str, values: Any, dtype: Any) -> None:
        values = np.asarray(values, dtype=dtype)
        if not self.by_address:
            self.binding.bind_cpu_input(name, np.ascontiguousarray(values))
            return
        held = self._inputs.get(name)
        if held is None or held.shape != values.shape:
            held = np.array(values, dtype=dtype, order="C")
            self.binding.bind_input(name, "cpu", 0, held.dtype.type, list(held.shape), held.ctypes.data)
            self._inputs[name] = held
        else:
            held[...] = values

    @property
    def held_bytes(self) -> int:
        """Bytes of the logits buffer this binding keeps between runs."""
        return 0 if self._logits is None else self._logits.nbytes

    def run(self, session: Any, kept: tuple[int, int], run_options: Any) -> np.ndarray:
        """Run; a fresh array of the logits [rows, kept, vocab] (the held one is the next run's).
        Logits over HELD_LOGITS_BYTES (a chunk's prompt log-probabilities, a wide prefill) are
        left to ORT to allocate per run: a kept binding would otherwise pin them."""
        shape = (*kept, self.vocab or 0)
        wide = int(np.prod(shape)) * np.dtype(self.logits_dtype).itemsize > HELD_LOGITS_BYTES
        if not self.by_address or self.vocab is None or wide:
            self._logits = None
            self.binding.bind_output("logits", "cpu")  # rebound: the last run's logits have another shape
            session.run_with_iobinding(self.binding, run_options)
            return self.binding.get_outputs()[0].numpy()
        if self._logits is None or self._logits.shape != shape:
            self._logits = np.empty(shape, dtype=self.logits_dtype)
            self.binding.bind_output("logits", "cpu", 0, self._logits.dtype.type, list(shape), self._logits.ctypes.data)
        session.run_with_iobinding(self.binding, run_options)
        return self._logits.copy()


def zeroed(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled array in its own anonymous mapping, faulted in 4 KiB pages as it is
    written. numpy asks for transparent huge pages on large arrays, and on a busy machine the
    kernel then compacts memory synchronously on first touch: measured, a batch's buffers took
    3 s to grow that way against 50 ms here, a stall every running stream would see."""
    count = int(np.prod(shape))
    mapping = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
