"""The concat-layout decoder graph and the running batch built on it.

The graph takes `past_key_values.*` [rows, heads, past, head_dim] and returns `present.*` with
the new positions appended. Each step's `present.*` OrtValues are bound to the next step's
`past_key_values.*` through IO binding, so the cache never passes through numpy; on CUDA it
never leaves the device. Rows of different lengths are left-padded and masked, with positions
counted from each row's first real token, exactly as transformers' GPT-2 does.

Joining and leaving the batch (`ConcatBatchDecoder.add` / `keep` / `discard`) run the small
`kv_ops` graphs in ONNX Runtime, on the cache's device, instead of copying it through numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from ..artifact import Manifest
from .batch import JoiningRow
from .graph_io import GraphIO


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prefill batch: ids left-padded with `pad_id`, the attention mask, and positions
    counted from each row's first real token (pads get 1, as transformers' GPT-2 does)."""
    rows, width = len(prompts), max(map(len, prompts))
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    return ids, mask, positions


class DecoderSession:
    """One forward of the decoder graph over OrtValue caches (stateless: the caller owns the cache)."""

    def __init__(self, session: Any, manifest: Manifest) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.io = GraphIO(session, manifest)
        self.session = session
        self.shape = self.io.shape
        self.past_names = self.io.past_names
        self.present_names = self.io.present_names
        self.past_dtype = self.io.dtype  # fp16 artifacts take and return an fp16 cache; logits stay fp32
        self.device = self.io.device

    def empty(self, rows: int) -> list[Any]:
        """A zero-length cache for `rows` rows."""
        heads, head_dim = self.io.row_shape
        return self.cache(np.zeros((len(self.past_names), rows, heads, 0, head_dim), dtype=self.past_dtype))

    def cache(self, kv: np.ndarray) -> list[Any]:
        """OrtValues on the cache's device from a host array [names, rows, heads, length, head_dim]."""
        return [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, dtype=self.past_dtype), self.device, 0)
                for x in kv]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[Any], keep: int = 1
    ) -> tuple[np.ndarray, list[Any]]:
        """New tokens against `past`: logits float32 [rows, keep, vocab] and the grown cache."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return self.io.logits(outputs[0].numpy()), list(outputs[1:])


class KVOps:
    """`merge` and `select` over every layer's cache, run by ONNX Runtime on the cache's device."""

    def __init__(self, decoder: DecoderSession) -> None:
        dtype = np.dtype(decoder.past_dtype).name
        providers = decoder.session.get_providers()
        folder = resources.files("jaonnx.generation") / "kv_ops"
        options = decoder.ort.SessionOptions()
        options.intra_op_num_threads = 1  # pure copies: one thread, no spinning pool per model
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._merge = decoder.ort.InferenceSession(
            (folder / f"merge_{dtype}.onnx").read_bytes(), options, providers=providers
        )
        self._select = decoder.ort.InferenceSession(
            (folder / f"select_{dtype}.onnx").read_bytes(), options, providers=providers
        )
        self.device = decoder.device

    def _run(self, session: Any, inputs: dict[str, Any], output: str) -> Any:
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(output, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        """Rows of `a` then rows of `b`, both left-padded to the longer length."""
        return [self._run(self._merge, {"a": x, "b": y}, "merged") for x, y in zip(a, b)]

    def select(self, past: list[Any], rows: np.ndarray, start: int, end: int) -> list[Any]:
        """`past[rows][:, :, start:end]` for every layer."""
        index = {"rows": np.ascontiguousarray(rows, dtype=np.int64),
                 "start": np.array([start], dtype=np.int64), "end": np.array([end], dtype=np.int64)}
        return [self._run(self._select, {"x": x, **index}, "selected") for x in past]


class ConcatBatchDecoder:
    """`BatchDecoder` over the concat-layout graph: a left-padded, masked batch whose cache
    grows by one column per step. Joining prefills the new rows alone, then merges caches."""

    def __init__(self, decoder: DecoderSession, ops: KVOps, pad_id: int) -> None:
        self.decoder = decoder
        self.io = decoder.io
        self.ops = ops
        self.pad_id = pad_id
        self.past: list[Any] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.next_positions = np.zeros(0, dtype=np.int64)

    @property
    def rows(self) -> int:
        return len(self.mask)

    @property
    def width(self) -> int:
        """Cache length, padding included."""
        return self.mask.shape[1]

    def add(self, prompts: Sequence[Sequence[int]], reserve: int) -> np.ndarray:
        ids, mask, positions = left_padded(prompts, self.pad_id)
        logits, past = self.decoder.forward(ids, mask, positions, self.decoder.empty(len(prompts)), keep=1)
        if self.rows:
            width = max(self.width, mask.shape[1])
            self.past = self.ops.merge(self.past, past)
            self.mask = np.concatenate([_left_pad(self.mask, width), _left_pad(mask, width)])
        else:
            self.past, self.mask = past, mask
        self.next_positions = np.concatenate([self.next_positions, positions[:, -1] + 1])
        return logits[:, -1]

    # ---- joining rows (chunked prefill): a one-row cache of its own, merged in by `join` ----
    def open(self, reserve: int, prefix: Sequence[np.ndarray] = ()) -> JoiningRow:
        if not prefix:
            return JoiningRow(0, reserve, self.decoder.empty(1))
        kv = np.concatenate(list(prefix), axis=2)
        return JoiningRow(kv.shape[2], reserve, self.decoder.cache(kv[:, None]))

    def fill(self, row: JoiningRow, tokens: Sequence[int], every: bool = False) -> np.ndarray:
        k = len(tokens)
        total = row.length + k
        logits, row.cache = self.decoder.forward(
            np.array([tokens], dtype=np.int64), np.ones((1, total), dtype=np.int64),
            np.arange(row.length, total, dtype=np.int64)[None], row.cache, keep=k if every else 1,
        )
        row.length = total
        return logits[0] if every else logits[0, -1]

    def read(self, row: JoiningRow, start: int, end: int) -> np.ndarray:
        return np.stack([value.numpy()[0, :, start:end] for value in row.cache])

    def join(self, row: JoiningRow, copies: int = 1) -> None:
        past = row.cache if copies == 1 else self.ops.select(row.cache, np.zeros(copies, dtype=np.int64), 0, row.length)
        mask = np.ones((copies, row.length), dtype=np.int64)
        if self.rows:
            width = max(self.width, row.length)
            self.past = self.ops.merge(self.past, past)
            self.mask = np.concatenate([_left_pad(self.mask, width), _left_pad(mask, width)])
        else:
            self.past, self.mask = past, mask
        self.next_positions = np.concatenate([self.next_positions, np.full(copies, row.length, dtype=np.int64)])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.rows, -1)
        k = tokens.shape[1]
        self.mask = np.concatenate([self.mask, np.ones((self.rows, k), dtype=np.int64)], axis=1)
        positions = self.next_positions[:, None] + np.arange(k)
        logits, self.past = self.decoder.forward(tokens, self.mask, positions, self.past, keep=k)
        self.next_positions = self.next_positions + k
        return logits

    def discard(self, n: int) -> None:
        if n <= 0:
            return
        end = self.width - n
        self.past = self.ops.select(self.past, np.arange(self.rows), 0, end)
        self.mask = self.mask[:, :end]
        self.next_positions = self.next_positions - n

    def keep(self, rows: Sequence[int]) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == self.rows and (rows == np.arange(self.rows)).all():
            return
        if not len(rows):
            self.past, self.mask, self.next_positions = [], np.zeros((0, 0), dtype=np.int64), rows
            return
        mask = self.mask[rows]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if len(used) else mask.shape[1]  # trim all-padding columns on the left
        self.past = self.ops.select(self.past, rows, start, self.width)
        self.mask = mask[:, start:]
        self.next_positions = self.next_positions[rows]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        n = len(ids)
        logits, _ = self.decoder.forward(
            np.array([ids]), np.ones((1, n), dtype=np.int64), np.arange(n)[None], self.decoder.empty(1), keep=n
        )
        return logits[0]


def _left_pad(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, [(0, 0), (width - mask.shape[1], 0)])
