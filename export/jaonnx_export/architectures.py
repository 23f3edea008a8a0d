"""One export adapter per transformers architecture, registered by class name.

As CTranslate2 registers its loaders (`@register_loader("BertConfig")`), each adapter class
registers itself for the transformers classes it exports (`@register("GPT2LMHeadModel")`);
`adapter_for` finds it. An adapter knows how its model becomes a graph: the wrapper module,
the graph's inputs/outputs and dynamic axes, example inputs for tracing, the KV-cache layouts
it can build, and the facts the runtime needs (usable positions, KV-cache shape). It knows
nothing of parity or quality: those are per task (parity.py, quality.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from jaonnx.artifact import DecoderShape
from jaonnx.errors import JaonnxError
from jaonnx.recipes import Recipe

from . import decoder_graph
from .onnx_files import trace
from .wrappers import CausalLMWithPast, MaskedLMWithPositions, conv1d_as_linear

KV_LAYOUTS = ("static", "concat")  # see decoder_graph.py (static) and wrappers.py (concat)


@dataclass(frozen=True)
class GraphIO:
    """What the graph an adapter writes takes and gives, as the manifest records it."""

    inputs: dict[str, str]  # name -> element type, in graph order
    outputs: dict[str, str]
    decoder: DecoderShape | None = None
    fusable: bool = True  # ORT's offline transformer fusions apply (traced graphs only)


class Architecture(ABC):
    """Base of the adapters. The defaults describe a traced graph without a KV cache."""

    task: ClassVar[str]
    kv_layouts: ClassVar[tuple[str, ...]] = ()  # the KV-cache layouts it can build; () = no cache

    @abstractmethod
    def wrap(self, model: nn.Module, recipe: Recipe | None) -> nn.Module:
        """The torch module that is traced: the model with the graph's inputs and outputs."""

    @abstractmethod
    def names(self, config: Any) -> tuple[list[str], list[str]]:
        """Input and output names of the traced graph."""

    @abstractmethod
    def dynamic_axes(self, config: Any) -> dict[str, dict[int, str]]: ...

    @abstractmethod
    def example_inputs(self, config: Any) -> tuple[torch.Tensor, ...]: ...

    @abstractmethod
    def max_positions(self, config: Any) -> int:
        """Positions the runtime may use."""

    def decoder_shape(self, config: Any) -> DecoderShape | None:
        return None

    def input_dtypes(self, config: Any) -> dict[str, str]:
        return {name: "int64" for name in self.names(config)[0]}

    def kv_layout(self, config: Any, requested: str | None, step: Callable[[str], None]) -> str | None:
        """The KV-cache layout to build (`requested` is already one of KV_LAYOUTS or None)."""
        if requested is not None:
            raise JaonnxError(f"--kv-cache applies to text-generation models, not {self.task}: leave it out")
        return None

    def graph_io(self, config: Any, layout: str | None) -> GraphIO:
        inputs, outputs = self.names(config)
        return GraphIO(self.input_dtypes(config), {name: "float32" for name in outputs}, self.decoder_shape(config))

    def pads_rows(self, layout: str | None) -> bool:
        """Whether write_graph can pad the weight products' rows to an even count."""
        return False

    def write_graph(self, model: nn.Module, recipe: Recipe, layout: str | None, target: Path,
                    *, quantized: bool = False, cuda: bool = False, even_rows: bool = False) -> None:
        """Write the graph to `target` (model.onnx in a scratch directory); `cuda`: the artifact
        targets CUDA (fp16), where a built graph may prefer other ops than on the CPU;
        `even_rows`: pad the weight products' rows to an even count where this graph can
        (decoder_graph.py; the graph records it in its metadata)."""
        trace(self.wrap(model, recipe), self, model.config, target)


ARCHITECTURES: dict[str, Architecture] = {}
A = TypeVar("A", bound=type[Architecture])


def register(*architectures: str) -> Callable[[A], A]:
    """Class decorator: one instance of the class exports each named transformers class."""

    def add(cls: A) -> A:
        for name in architectures:
            if name in ARCHITECTURES:
                raise ValueError(f"{name} already has an adapter: {type(ARCHITECTURES[name]).__name__}")
            ARCHITECTURES[name] = cls()
        return cls

    return add


def adapter_for(architecture: str) -> Architecture:
    adapter = ARCHITECTURES.get(architecture)
    if adapter is None:
        raise JaonnxError(f"no exporter for {architecture}: add one to jaonnx_export.architectures")
    return adapter


class MaskedLM(Architecture):
    """Encoders with an MLM head: logits at the requested mask positions only."""

    task = "fill-mask"
    head: ClassVar[str]  # the MLM head module of the transformers class
    position_margin: ClassVar[int] = 0  # rows of the position table the model never uses

    def wrap(self, model: nn.Module, recipe: Recipe | None) -> nn.Module:
        if recipe is None:
            raise ValueError("a masked LM needs its recipe (position_start, token_type_ids)")
        return MaskedLMWithPositions(model, self.head, recipe.position_start, recipe.token_type_ids).eval()

    def names(self, config: Any) -> tuple[list[str], list[str]]:
        return ["input_ids", "attention_mask", "mask_positions"], ["logits"]

    def dynamic_axes(self, config: Any) -> dict[str, dict[int, str]]:
        axes = {0: "batch", 1: "sequence"}
        masks = {0: "batch", 1: "masks"}
        return {"input_ids": axes, "attention_mask": axes, "mask_positions": masks, "logits": masks}

    def example_inputs(self, config: Any) -> tuple[torch.Tensor, ...]:
        ids = torch.full((2, 8), 5, dtype=torch.long)
        return ids, torch.ones_like(ids), torch.tensor([[1, 3], [2, 0]])

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings) - self.position_margin


@register("RobertaForMaskedLM")
class Roberta(MaskedLM):
    # RoBERTa reserves rows 0..padding_idx of its table for transformers' offset scheme; with
    # positions from 0 the usable length is still max_position_embeddings - 2 (512).
    head = "lm_head"
    position_margin = 2


@register("BertForMaskedLM")
class Bert(MaskedLM):
    head = "cls"


@register("AlbertForMaskedLM")
class Albert(MaskedLM):
    head = "predictions"


@register("GPT2LMHeadModel")
class GPT2(Architecture):
    """GPT-2 decoders, in either KV-cache layout: "static" is built node by node
    (decoder_graph.py, preallocated cache written in place), "concat" is traced (wrappers.py,
    a new cache every step). Static is the default where the config allows it."""

    task = "text-generation"
    kv_layouts = KV_LAYOUTS
    default_layout: ClassVar[str] = "static"

    def wrap(self, model: nn.Module, recipe: Recipe | None) -> nn.Module:
        traced = conv1d_as_linear(model)  # a copy: parity compares against the untouched model
        return CausalLMWithPast(traced, self.decoder_shape(model.config).num_layers).eval()

    def names(self, config: Any) -> tuple[list[str], list[str]]:
        layers = range(self.decoder_shape(config).num_layers)
        past = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", "logits_to_keep", *past], ["logits", *present]

    def dynamic_axes(self, config: Any) -> dict[str, dict[int, str]]:
        inputs, outputs = self.names(config)
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "kept_sequence"},
        }
        axes |= {name: {0: "batch", 2: "past_sequence"} for name in inputs[4:]}
        axes |= {name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]}
        return axes

    def example_inputs(self, config: Any) -> tuple[torch.Tensor, ...]:
        # A non-empty past (4) so the cache concatenation is traced; a zero-length past runs fine.
        shape = self.decoder_shape(config)
        batch, new, past = 2, 3, 4
        cache = [torch.zeros(batch, shape.num_heads, past, shape.head_dim) for _ in range(2 * shape.num_layers)]
        return (
            torch.full((batch, new), 5, dtype=torch.long),
            torch.ones(batch, past + new, dtype=torch.long),
            torch.arange(past, past + new).expand(batch, new).contiguous(),
            torch.tensor([1], dtype=torch.long),
            *cache,
        )

    def max_positions(self, config: Any) -> int:
        return int(config.n_positions)

    def decoder_shape(self, config: Any) -> DecoderShape:
        return DecoderShape(
            num_layers=int(config.n_layer),
            num_heads=int(config.n_head),
            head_dim=int(config.n_embd) // int(config.n_head),
        )

    def input_dtypes(self, config: Any) -> dict[str, str]:
        return {name: ("float32" if name.startswith("past") else "int64") for name in self.names(config)[0]}

    def kv_layout(self, config: Any, requested: str | None, step: Callable[[str], None]) -> str:
        """Static where GroupQueryAttention takes this config; asked-for static that cannot be
        built is an error, the default falls back to concat with a progress line."""
        layout = requested or self.default_layout
        if layout == "static" and (reason := decoder_graph.supported(config)):
            if requested == "static":
                raise JaonnxError(f"{reason}: export with --kv-cache concat")
            step(f"{reason}: using the concat KV cache")
            return "concat"
        return layout

    def graph_io(self, config: Any, layout: str | None) -> GraphIO:
        if layout != "static":
            return super().graph_io(config, layout)
        inputs, outputs = decoder_graph.names(self.decoder_shape(config).num_layers)
        # Built as its target wants it (write_graph); the fusion timing feeds are concat-style.
        return GraphIO(inputs, outputs, decoder_graph.decoder_shape(config), fusable=False)

    def pads_rows(self, layout: str | None) -> bool:
        return layout == "static"  # decoder_graph.build(even_rows=True)

    def write_graph(self, model: nn.Module, recipe: Recipe, layout: str | None, target: Path,
                    *, quantized: bool = False, cuda: bool = False, even_rows: bool = False) -> None:
        if quantized:  # the head gets its own quantized copy either way; untied, the token
            untie_lm_head(model)  # lookup stays a Gather on [vocab, hidden] that --embedding can quantize
        if layout == "static":
            # Fused SkipLayerNormalization/FastGelu for CUDA (fewer launches); plain Add +
            # LayerNormalization on the CPU, where ORT 1.32's SkipLayerNormalization is ~8x slower
            # for a 128-token prefill (benchmarks/results/fused_vs_plain_prefill_1thread.json).
            decoder_graph.build(model, target, fused=cuda, even_rows=even_rows and not cuda)
            return
        super().write_graph(model, recipe, layout, target)


def untie_lm_head(model: Any) -> None:
    """Give the LM head its own copy of a tied embedding: a head that reads the shared table
    (through a Transpose) is left fp32 by int8 quantization, which halves int8 decode speed."""
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
