"""Torch modules that give each task the graph interface the runtime expects.

The quirks are fixed here, once: masked-LM positions are computed inside the graph from the
attention mask and start at the recipe's `position_start` (0), so no caller can reproduce
transformers' RoBERTa `padding_idx + 1` offset; the decoder takes and returns its KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class MaskedLMWithPositions(nn.Module):
    """(input_ids, attention_mask, mask_positions) -> logits [batch, masks, vocab].

    Positions come from the mask and start at `position_start`; segment ids are all 0. Only
    the rows named in `mask_positions` go through the LM head: fill-mask reads one or two
    positions, and the vocabulary projection of every other token was ~20% of the work at
    sequence length 128. Passing every position gives the full logits (parity checks do).

    The last layer is computed at those rows only too (BERT, RoBERTa and ALBERT layouts: see
    `encoder_plan`): its keys and values need every token, but its queries, attention output,
    output projection and feed-forward block only the rows the head reads (10/12 of the last
    layer's products, ~7% of the forward's at sequence length 128; measured -5% CPU time).
    """

    def __init__(self, model: nn.Module, head: str, position_start: int, token_type_ids: bool) -> None:
        super().__init__()
        self.encoder = model.base_model
        self.head = getattr(model, head)
        self.position_start = position_start
        self.token_type_ids = token_type_ids
        self.plan = encoder_plan(self.encoder)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor
    ) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + self.position_start
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_type_ids else {}
        if self.plan is None:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **extra
            ).last_hidden_state
            index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            return self.head(torch.gather(hidden, 1, index))
        hidden = self.encoder.embeddings(input_ids=input_ids, position_ids=positions, **extra)
        if self.plan.stem is not None:
            hidden = self.plan.stem(hidden)
        additive = additive_mask(attention_mask, hidden.dtype)
        for layer in self.plan.layers[:-1]:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.head(self.plan.at_rows(self.plan.layers[-1], hidden, additive, index))


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, 1, keys]: 0 for tokens, the dtype's minimum for padding, as transformers'
    eager attention adds. Written as transformers 4 built it for SDPA (Unsqueeze, Expand, Cast,
    Sub, Where), a mask ORT's Attention fusion matches; a `Mul` by the minimum would not (the
    fusion would take the score scaling's `Mul` for it)."""
    expanded = attention_mask.unsqueeze(1).unsqueeze(2).expand(-1, 1, 1, -1).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


class EncoderPlan(NamedTuple):
    """How to run an encoder layer by layer: `stem` after the embeddings (ALBERT's projection
    to the hidden size, else None), the layers in execution order (ALBERT's shared layers
    repeated), and the function computing the last one at given rows."""

    stem: nn.Module | None
    layers: list[nn.Module]
    at_rows: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_ATTENTION = ("query", "key", "value", "num_attention_heads", "attention_head_size")


def encoder_plan(encoder: nn.Module) -> EncoderPlan | None:
    """The plan of a BERT/RoBERTa layout (encoder.layer: attention.self, attention.output,
    intermediate, output) or an ALBERT one (embedding_hidden_mapping_in, albert_layer_groups);
    None for anything else, and then the wrapper runs the encoder whole."""
    inner = getattr(encoder, "encoder", None)
    if not hasattr(encoder, "embeddings") or inner is None:
        return None
    layers = getattr(inner, "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and all(_bert_layout(layer) for layer in layers):
        return EncoderPlan(None, list(layers), bert_layer_at_rows)
    groups, config = getattr(inner, "albert_layer_groups", None), getattr(inner, "config", None)
    if isinstance(groups, nn.ModuleList) and hasattr(inner, "embedding_hidden_mapping_in") and config is not None:
        count, shared = int(config.num_hidden_layers), int(config.num_hidden_groups)
        order = [layer for i in range(count) for layer in groups[int(i / (count / shared))].albert_layers]
        if order and all(_albert_layout(layer) for layer in order):
            return EncoderPlan(inner.embedding_hidden_mapping_in, order, albert_layer_at_rows)
    return None


def _bert_layout(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    return (all(hasattr(getattr(attention, "self", None), n) for n in _ATTENTION) and hasattr(attention, "output")
            and hasattr(layer, "intermediate") and hasattr(layer, "output")
            and not getattr(layer, "is_decoder", False) and not getattr(layer, "chunk_size_feed_forward", 0))


def _albert_layout(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    return (all(hasattr(attention, n) for n in (*_ATTENTION, "dense", "LayerNorm"))
            and hasattr(layer, "ff_chunk") and hasattr(layer, "full_layer_layer_norm")
            and not getattr(layer, "chunk_size_feed_forward", 0))


def _attend(attention: nn.Module, rows: torch.Tensor, hidden: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
    """Attention's context at `rows` [batch, m, hidden]: queries from those rows, keys and
    values from every token; the same products and order as transformers' eager attention."""
    heads, size = attention.num_attention_heads, attention.attention_head_size
    scaling = getattr(attention, "scaling", size**-0.5)
    batch = hidden.shape[0]

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, size).transpose(1, 2)

    query, key, value = split(attention.query(rows)), split(attention.key(hidden)), split(attention.value(hidden))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + additive
    return torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).reshape(batch, -1, heads * size)


def bert_layer_at_rows(
    layer: nn.Module, hidden: torch.Tensor, additive: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """One BERT-layout layer's output at the rows `index` ([batch, m, hidden], gathered along
    the sequence) only; the rows equal the full layer's."""
    rows = torch.gather(hidden, 1, index)
    attended = layer.attention.output(_attend(layer.attention.self, rows, hidden, additive), rows)
    return layer.output(layer.intermediate(attended), attended)


def albert_layer_at_rows(
    layer: nn.Module, hidden: torch.Tensor, additive: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """One ALBERT layer's output at the rows `index` only (AlbertAttention then AlbertLayer's
    feed-forward block and norm)."""
    rows = torch.gather(hidden, 1, index)
    attention = layer.attention
    attended = attention.LayerNorm(rows + attention.dense(_attend(attention, rows, hidden, additive)))
    return layer.full_layer_layer_norm(layer.ff_chunk(attended) + attended)


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` whose GPT-2 Conv1D layers are nn.Linear ones sharing the same tensors.

    Conv1D reshapes through `x.size()` on every call, which the tracer records as a
    Shape/Gather/Unsqueeze/Concat chain around each of the four projections of every layer
    (half the nodes of the decoder graph); nn.Linear exports as a bare MatMul + Add. The
    copy shares every parameter (the Linear weight is a transposed view), so a 1.3B model
    costs no extra memory, and the original stays untouched for the parity check."""
    import copy

    from transformers.pytorch_utils import Conv1D

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], device="meta")
                linear.weight = nn.Parameter(child.weight.t(), requires_grad=False)
                linear.bias = child.bias
                setattr(parent, name, linear)
    return clone


class CausalLMWithPast(nn.Module):
    """(input_ids, attention_mask, position_ids, logits_to_keep, *past) -> (logits, *present).

    `attention_mask` covers past + new tokens; `logits_to_keep` (a 1-element int64 tensor)
    says how many trailing positions get logits: 1 when generating, all when scoring, so the
    vocabulary projection is not paid for prompt tokens nobody reads.
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    @staticmethod
    def additive_mask(attention_mask: torch.Tensor, new: torch.Tensor | int) -> torch.Tensor:
        """The 4D causal + padding mask [batch, 1, new, total], built with a handful of ops.

        transformers returns a 4D mask as-is; left to build it from the 2D mask, its masking
        utilities trace into ~1000 Shape/Gather/Unsqueeze/Concat nodes that cost more per
        decode step than the int8 matmuls save. Masked entries get the dtype's minimum, not
        -inf, so a fully padded query row stays finite (as transformers does)."""
        total = attention_mask.shape[1]
        keys = torch.arange(total, device=attention_mask.device)
        queries = keys[total - new :]
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.full((), torch.finfo(torch.float32).min))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model.transformer(
            input_ids=input_ids,
            attention_mask=self.additive_mask(attention_mask, input_ids.shape[1]),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state
        keep = hidden[:, hidden.shape[1] - logits_to_keep[0] :, :]
        logits = self.model.lm_head(keep)
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)
