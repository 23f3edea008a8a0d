"""CUDA graph capture of the static decoder's one-token decode step (issue 19).

A decode step of the japanese-gpt-1b shape launches ~350 kernels; at batch 1 the GPU waits on
launches, not on memory (benchmarks/results/gpu.md). ONNX Runtime's CUDA execution provider
captures a run into a CUDA graph (provider option `enable_cuda_graph`) and replays it (run
option `gpu_graph_id`), provided every bound input and output has the address and shape it had
at capture. So a captured step needs fixed buffers, and a batch whose size changes needs one
graph per size. This module holds that machinery, apart from the decoder's cache logic:

- Batch sizes map onto buckets: 1, 2, 4, then multiples of 8 (vLLM's capture sizes). A step with
  `rows` active rows replays the smallest bucket >= rows; the extra rows are free cache slots,
  run with length 0 and ignored. Rows joining or leaving only change the bucket chosen.
- Each bucket owns fixed device buffers for input_ids, position_ids, seqlens_k and logits,
  written in place before each replay. GroupQueryAttention reads total_sequence_length on the
  host: it is the cache capacity, fixed per capture (each row's own length is in seqlens_k).
  logits_to_keep is 1 (the graph feeds it to Slice's host-side `ends` directly).
- The KV cache is the decoder's own buffer (rows 0..bucket-1). A reallocation moves it, so
  graphs are keyed by the allocation: a new allocation captures anew under fresh graph ids (ORT
  keeps captured graphs for the session's lifetime; the decoder grows by doubling, so rarely).
- Prefill, multi-token steps and batches beyond the largest bucket run uncaptured
  (`gpu_graph_id` -1): with `enable_cuda_graph` on, a run without an id would be captured as 0.

Everything device-specific goes through the session and `ort.OrtValue`, so the same code runs
on the CPU execution provider (where capture is a no-op): the tests check the bucket logic and
the fixed-buffer binding there, token for token against the uncaptured decoder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError

DEFAULT_MAX_BATCH = 32  # the largest bucket captured; bigger batches run uncaptured
UNCAPTURED = "-1"
# Graph ids are unique in the process: several decoders (each its own cache) may share one
# session, and a run under an id the session has seen replays that graph's addresses. 0 is
# ORT's default id and never used, so a run that forgets its id cannot replay a bucket.
_GRAPH_IDS = itertools.count(1)
CUDA = "CUDAExecutionProvider"

# cache binder: (binding, first row, rows) -> binds past/present of those rows of the cache
BindCache = Callable[[Any, int, int], None]


def buckets(max_batch: int = DEFAULT_MAX_BATCH) -> tuple[int, ...]:
    """The batch sizes captured: 1, 2, 4, then every multiple of 8 up to `max_batch`, as vLLM
    does (a batch pads to at most 7 free rows, and few graphs are captured)."""
    if max_batch < 1:
        raise JaonnxError(f"cuda_graph_max_batch must be at least 1, not {max_batch}")
    sizes = [b for b in (1, 2, 4) if b <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket holding `rows`, or None when the batch is bigger than all of them."""
    return next((b for b in sizes if b >= rows), None)


def wanted(manifest: Manifest) -> bool:
    """Where capture is on by default: a static-layout fp16 decoder (the CUDA artifact)."""
    return manifest.decoder is not None and manifest.decoder.kv_layout == "static" and manifest.dtype == "fp16"


def check_option(cuda_graph: bool | None, manifest: Manifest) -> bool:
    """The `cuda_graph` load option resolved against the artifact: None means `wanted`; an
    explicit True on an artifact that cannot be captured is an error naming the option."""
    if cuda_graph is None:
        return wanted(manifest)
    if cuda_graph and (manifest.decoder is None or manifest.decoder.kv_layout != "static"):
        raise JaonnxError("cuda_graph=True needs a decoder exported with --kv-cache static")
    return bool(cuda_graph)


def enabled(session: Any) -> bool:
    """Whether this session runs on CUDA with `enable_cuda_graph` on."""
    if not session.get_providers() or session.get_providers()[0] != CUDA:
        return False
    options = session.get_provider_options().get(CUDA, {})
    return str(options.get("enable_cuda_graph", "0")) == "1"


def run_options(ort: Any, graph_id: str) -> Any:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    return options


@dataclass
class CapturedGraph:
    """One captured batch size under one cache allocation: its graph id, binding and buffers."""

    size: int
    graph_id: str
    binding: Any
    ids: Any
    positions: Any
    seqlens: Any
    logits: Any
    options: Any = None  # the RunOptions carrying graph_id
    runs: int = 0


@dataclass
class CudaGraphs:
    """Captured decode steps of one StaticBatchDecoder (see module docstring).

    `device` is where the fixed buffers live ("cuda", or "cpu" to run this logic on the CPU
    execution provider); `vocab` sizes the logits buffer."""

    session: Any
    device: str
    vocab: int
    sizes: tuple[int, ...] = field(default_factory=buckets)
    ort: Any = None
    _graphs: dict[tuple[Any, int], CapturedGraph] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ort is None:
            import onnxruntime

            self.ort = onnxruntime
        self.uncaptured = run_options(self.ort, UNCAPTURED)

    @classmethod
    def for_session(cls, session: Any, manifest: Manifest, max_batch: int = DEFAULT_MAX_BATCH) -> CudaGraphs | None:
        """The capture machinery for a CUDA session with `enable_cuda_graph` on, else None."""
        if not enabled(session):
            return None
        return cls(session, "cuda", manifest.vocab_size, buckets(max_batch))

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def bucket(self, rows: int) -> int | None:
        return bucket_for(rows, self.sizes)

    @property
    def captured(self) -> list[tuple[Any, int]]:
        """(allocation key, bucket size) of every graph captured so far, in capture order."""
        return list(self._graphs)

    @property
    def graphs(self) -> list[CapturedGraph]:
        """Every captured graph (its id, bucket size, buffers and replay count), in capture order."""
        return list(self._graphs.values())

    def step(self, tokens: np.ndarray, lengths: np.ndarray, allocation: Any, capacity: int,
             bind_cache: BindCache) -> np.ndarray | None:
        """Logits [rows, 1, vocab] of one decode token per row, replayed from the bucket's graph
        (captured on first use); None when the batch is bigger than every bucket. `lengths`
        are the rows' lengths before this token; the cache must have at least bucket-many
        slots under `allocation` (a key that changes whenever the cache moves)."""
        rows = len(lengths)
        size = self.bucket(rows)
        if size is None or tokens.shape != (rows, 1):
            return None
        graph = self._graphs.get((allocation, size))
        if graph is None:
            graph = self._capture(allocation, size, capacity, bind_cache)
        ids = np.zeros((size, 1), dtype=np.int64)
        ids[:rows] = tokens
        positions = np.zeros((size, 1), dtype=np.int64)
        positions[:rows, 0] = lengths
        seqlens = np.zeros(size, dtype=np.int32)  # free rows: length 0, written at slot position 0
        seqlens[:rows] = lengths  # the new token's index = the past length
        graph.ids.update_inplace(ids)
        graph.positions.update_inplace(positions)
        graph.seqlens.update_inplace(seqlens)
        self.session.run_with_iobinding(graph.binding, graph.options)
        graph.runs += 1
        return graph.logits.numpy()[:rows]

    def _capture(self, allocation: Any, size: int, capacity: int, bind_cache: BindCache) -> CapturedGraph:
        value = lambda array: self.ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)  # noqa: E731
        graph = CapturedGraph(
            size=size, graph_id=str(next(_GRAPH_IDS)), binding=self.session.io_binding(),
            ids=value(np.zeros((size, 1), dtype=np.int64)), positions=value(np.zeros((size, 1), dtype=np.int64)),
            seqlens=value(np.zeros(size, dtype=np.int32)), logits=value(np.zeros((size, 1, self.vocab), np.float32)),
        )
        graph.options = run_options(self.ort, graph.graph_id)
        binding = graph.binding
        binding.bind_ortvalue_output("logits", graph.logits)
        binding.bind_ortvalue_input("input_ids", graph.ids)
        binding.bind_ortvalue_input("position_ids", graph.positions)
        binding.bind_ortvalue_input("seqlens_k", graph.seqlens)
        # Read on the host by GroupQueryAttention and Slice: fixed for the graph's lifetime.
        binding.bind_cpu_input("total_sequence_length", np.array(capacity, dtype=np.int32))
        binding.bind_cpu_input("logits_to_keep", np.array([1], dtype=np.int64))
        bind_cache(binding, 0, size)
        self._graphs[(allocation, size)] = graph
        return graph
