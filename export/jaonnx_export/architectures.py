"""One export adapter per transformers architecture, registered by class name.

An adapter knows the wrapper module, the graph's input/output names and dynamic axes, example
inputs for tracing, and the facts the runtime needs (usable positions, KV-cache shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from jaonnx.artifact import DecoderShape
from jaonnx.recipes import Recipe

from .wrappers import CausalLMWithPast, MaskedLMWithPositions, conv1d_as_linear


@dataclass(frozen=True)
class MaskedLMAdapter:
    head: str = "lm_head"  # the MLM head module of the transformers class
    task: str = "fill-mask"
    position_margin: int = 0  # rows of the position table the model never uses

    def wrap(self, model: nn.Module, recipe: Recipe) -> nn.Module:
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

    def decoder_shape(self, config: Any) -> DecoderShape | None:
        return None

    def input_dtypes(self, config: Any) -> dict[str, str]:
        return {name: "int64" for name in self.names(config)[0]}

    def parity_reference(self, model: nn.Module, tokenizer: Any, texts: list[str] | None) -> Any:
        from .references import fill_mask_reference

        return fill_mask_reference(model, tokenizer, texts)

    def runtime_logits(self, directory: Any, manifest: Any, reference: Any) -> list[Any]:
        from .parity import fill_mask_logits

        return fill_mask_logits(directory, manifest, reference)


@dataclass(frozen=True)
class CausalLMAdapter:
    task: str = "text-generation"

    def wrap(self, model: nn.Module, recipe: Recipe) -> nn.Module:
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

    def parity_reference(self, model: nn.Module, tokenizer: Any, texts: list[str] | None) -> Any:
        from .references import generation_reference

        return generation_reference(model, tokenizer, texts)

    def runtime_logits(self, directory: Any, manifest: Any, reference: Any) -> list[Any]:
        from .parity import generation_logits

        return generation_logits(directory, manifest, reference)


Adapter = MaskedLMAdapter | CausalLMAdapter

ARCHITECTURES: dict[str, Adapter] = {
    # RoBERTa reserves rows 0..padding_idx of its table for transformers' offset scheme; with
    # positions from 0 the usable length is still max_position_embeddings - 2 (512).
    "RobertaForMaskedLM": MaskedLMAdapter(head="lm_head", position_margin=2),
    "BertForMaskedLM": MaskedLMAdapter(head="cls"),
    "AlbertForMaskedLM": MaskedLMAdapter(head="predictions"),
    "GPT2LMHeadModel": CausalLMAdapter(),
}
