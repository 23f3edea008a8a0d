"""Automatic prefix caching (after vLLM's hashed blocks): the KV of prompt prefixes already
computed, kept in host memory so a new prompt that starts the same way prefills only the rest.

A prompt is cut into blocks of `block_size` tokens. Block i is keyed by (the id of block i-1,
its tokens), so a key names a whole prefix exactly (no hash collisions) and prompts that share
a prefix share its blocks: 20 few-shot prompts with one 800-token prefix hold it once, where
llama.cpp-style slot reuse would hold it once per slot. Memory is bounded by `max_bytes`;
the least recently used block goes first, and a lookup touches a chain's blocks from the last
to the first, so a parent is always more recent than its children and leaves go first (a
prompt longer than the bound keeps only its first blocks).

Blocks are copies, so a row that later leaves, finishes or is aborted never changes them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import JaonnxError

BLOCK_SIZE = 16
DEFAULT_MB = 512

Read = Callable[[int, int], np.ndarray]  # (start, end) -> KV [past names, heads, end - start, head_dim]
Blocks = list[np.ndarray]  # consecutive KV pieces [past names, heads, positions, head_dim], in order


@dataclass
class _Block:
    id: int
    kv: np.ndarray


class PrefixCache:
    """Blocks of prompt KV, keyed by prefix; see the module docstring."""

    def __init__(self, max_bytes: int = DEFAULT_MB << 20, block_size: int = BLOCK_SIZE) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise JaonnxError(f"the prefix cache size must be >= 0 bytes, got {max_bytes!r}", "prefix_cache_mb")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count(1)  # 0 is the empty prefix
        self.bytes = 0
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vLLM's prefix_cache_hits)
        self.evictions = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def _chain(self, ids: Sequence[int], blocks: int) -> list[tuple[tuple[int, tuple[int, ...]], _Block]]:
        """The cached blocks that start `ids`, at most `blocks` of them, first to last."""
        found, parent, b = [], 0, self.block_size
        for i in range(blocks):
            key = (parent, tuple(ids[i * b : (i + 1) * b]))
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
            parent = block.id
        return found

    def lookup(self, ids: Sequence[int]) -> tuple[int, list[np.ndarray]]:
        """How many leading tokens of `ids` have cached KV (whole blocks, leaving at least the
        last two tokens to compute: the last one's logits are needed, and a lone token would take
        attention's one-token kernel, whose sums differ in the last bits from the prompt kernel's
        (see engine.prefill_chunk): a warm prompt would not equal a cold one) and those blocks'
        KV, in order (not concatenated: the batch decoder writes them where they go, one copy)."""
        self.queries += len(ids)
        chain = self._chain(ids, max(0, len(ids) - 2) // self.block_size)
        for key, _ in reversed(chain):  # children first: parents end up more recent
            self._blocks.move_to_end(key)
        n = len(chain) * self.block_size
        self.hits += n
        return n, [block.kv for _, block in chain]

    def store(self, ids: Sequence[int], read: Read) -> None:
        """Cache the whole blocks of `ids` not cached yet; `read(start, end)` copies their KV
        out of the row that just computed it."""
        full = len(ids) // self.block_size
        chain = self._chain(ids, full)
        if len(chain) == full or self.max_bytes == 0:
            return
        b = self.block_size
        start = len(chain) * b
        kv = read(start, start + b)  # one block first: its size tells how many fit the bound
        fit = self.max_bytes // max(1, kv.nbytes)
        full = min(full, fit)  # a chain longer than the bound keeps its head: a tail alone is never reached
        if full <= len(chain):
            return
        if full * b > start + b:
            kv = read(start, full * b)
        parent = chain[-1][1].id if chain else 0
        for key, _ in reversed(chain):
            self._blocks.move_to_end(key)
        for i in range(len(chain), full):
            block = _Block(next(self._ids), np.ascontiguousarray(kv[:, :, (i * b - start) : ((i + 1) * b - start)]))
            self._evict(self.max_bytes - block.kv.nbytes)
            key = (parent, tuple(ids[i * b : (i + 1) * b]))
            self._blocks[key] = block
            self.bytes += block.kv.nbytes
            parent = block.id

    def _evict(self, room: int) -> None:
        while self._blocks and self.bytes > room:
            _, block = self._blocks.popitem(last=False)
            self.bytes -= block.kv.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
