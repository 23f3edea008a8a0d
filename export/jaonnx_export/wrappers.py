"""Torch modules that give each task the graph interface the runtime expects.

The quirks are fixed here, once: masked-LM positions are computed inside the graph from the
attention mask and start at the recipe's `position_start` (0), so no caller can reproduce
transformers' RoBERTa `padding_idx + 1` offset; the decoder takes and returns its KV cache.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedLMWithPositions(nn.Module):
    """(input_ids, attention_mask, mask_positions) -> logits [batch, masks, vocab].

    Positions come from the mask and start at `position_start`; segment ids are all 0. Only
    the rows named in `mask_positions` go through the LM head: fill-mask reads one or two
    positions, and the vocabulary projection of every other token was ~20% of the work at
    sequence length 128. Passing every position gives the full logits (parity checks do).

    For BERT-layout encoders (BERT, RoBERTa: see `rows_only_layers`) the last layer is computed
    at those rows only too: its keys and values need every token, but its queries, attention
    output, output projection and feed-forward block only the rows the head reads (10/12 of
    the last layer's products, ~7% of the forward's at sequence length 128).
    """

    def __init__(self, model: nn.Module, head: str, position_start: int, token_type_ids: bool) -> None:
        super().__init__()
        self.encoder = model.base_model
        self.head = getattr(model, head)
        self.position_start = position_start
        self.token_type_ids = token_type_ids
        self.layers = rows_only_layers(self.encoder)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_positions: torch.Tensor
    ) -> torch.Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + self.position_start
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_type_ids else {}
        if self.layers is None:
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **extra
            ).last_hidden_state
            index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            return self.head(torch.gather(hidden, 1, index))
        hidden = self.encoder.embeddings(input_ids=input_ids, position_ids=positions, **extra)
        additive = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers[:-1]:
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.head(bert_layer_at_rows(self.layers[-1], hidden, additive, index))


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, 1, keys]: 0 for tokens, the dtype's minimum for padding, as transformers'
    eager attention adds. Written as transformers 4 built it for SDPA (Unsqueeze, Expand, Cast,
    Sub, Where), a mask ORT's Attention fusion matches; a `Mul` by the minimum would not (the
    fusion would take the score scaling's `Mul` for it)."""
    expanded = attention_mask.unsqueeze(1).unsqueeze(2).expand(-1, 1, 1, -1).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


def rows_only_layers(encoder: nn.Module) -> nn.ModuleList | None:
    """The encoder's layer list when every layer has the BERT layout `bert_layer_at_rows`
    reads (attention.self.query/key/value, attention.output, intermediate, output) and the
    encoder is plain embeddings + layers; None otherwise (ALBERT's shared layer groups), and
    then the wrapper runs the encoder whole."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(encoder, "embeddings") or len(layers) < 1:
        return None
    for layer in layers:
        attention = getattr(layer, "attention", None)
        self_attention = getattr(attention, "self", None)
        if not all(hasattr(self_attention, n) for n in ("query", "key", "value", "num_attention_heads",
                                                       "attention_head_size")):
            return None
        if not (hasattr(attention, "output") and hasattr(layer, "intermediate") and hasattr(layer, "output")):
            return None
        if getattr(layer, "is_decoder", False) or getattr(layer, "chunk_size_feed_forward", 0):
            return None
    return layers


def bert_layer_at_rows(layer: nn.Module, hidden: torch.Tensor, additive: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One BERT-layout layer's output at the rows `index` ([batch, m, hidden], gathered along
    the sequence) only: queries from those rows, keys and values from every token; the same
    products and order as transformers' eager attention, so the rows equal the full layer's."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    scaling = getattr(attention, "scaling", size**-0.5)
    batch = hidden.shape[0]
    rows = torch.gather(hidden, 1, index)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, size).transpose(1, 2)

    query, key, value = split(attention.query(rows)), split(attention.key(hidden)), split(attention.value(hidden))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + additive
    context = torch.matmul(torch.softmax(scores, dim=-1), value).transpose(1, 2).reshape(batch, -1, heads * size)
    attended = layer.attention.output(context, rows)
    return layer.output(layer.intermediate(attended), attended)


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
