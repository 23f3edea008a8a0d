"""Twins: small, briefly trained checkpoints with each real model's class, config quirks,
tokenizer class and special-token layout, built offline and deterministically.

One `TwinSpec` per recipe. `build_twin` trains the tokenizer on the shipped corpus, writes the
tokenizer files the real repository has, builds the model from its config, trains it for a few
hundred steps (so greedy decoding is not degenerate and int8 quality can be judged) and saves.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaonnx.recipes import get_recipe
from jaonnx.tokenization.normalize import to_fullwidth

from ..corpus import corpus_lines, heldout_lines, train_lines  # noqa: F401  (re-exported)
from .tokenizers import SpmLayout, spm_to_tokenizer_json, train_spm, write_json

@dataclass(frozen=True)
class TwinSpec:
    recipe: str
    layout: SpmLayout
    vocab_size: int
    config: Callable[[int, dict[str, int]], Any]  # (vocab size, special ids) -> transformers config
    objective: str  # "mlm" or "clm"
    tokenizer_config: dict[str, Any]
    fullwidth_corpus: bool = False
    tokenizer_json_only: bool = False
    steps: int = 200
    # Train this many layers, then spread them over the configured depth (see `_deepen`).
    train_layers: int | None = None
    # Directory name when it differs from the recipe id (a second twin of one recipe).
    name: str | None = None
    # Lines added (repeated) to the model's training text only, not the tokenizer's: a test
    # prompts with a line's start and gets the rest back verbatim under greedy decoding.
    memorize: tuple[str, ...] = ()

    @property
    def dirname(self) -> str:
        return self.name or self.recipe


def _rinna_roberta_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=ids["[PAD]"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )


def _albert_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import AlbertConfig

    return AlbertConfig(
        vocab_size=vocab, embedding_size=32, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
        pad_token_id=ids["<pad>"], bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"],
    )


def _jmed_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, pad_token_id=ids["[PAD]"],
    )


def _gpt_1b_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import GPT2Config

    # The real model: 24 layers, 2048 wide, 16 heads, n_inner 8192. Same depth, heads and
    # n_inner/n_embd ratio at 1/32 of the width.
    return GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=24, n_head=16, n_inner=256,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )


def _gpt2_tiny_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )


def _gpt2_small_config(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=4, n_head=4,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )


TWINS: dict[str, TwinSpec] = {
    spec.recipe: spec
    for spec in [
        TwinSpec(
            recipe="rinna-roberta",
            layout=SpmLayout(unk=("<unk>", 0), bos=("<s>", 1), eos=("</s>", 2), pad=("[PAD]", 3),
                             user_symbols=("[CLS]", "[SEP]", "[MASK]")),
            vocab_size=3000,
            config=_rinna_roberta_config,
            objective="mlm",
            tokenizer_config={
                "tokenizer_class": "T5Tokenizer", "do_lower_case": True, "extra_ids": 0,
                "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                "additional_special_tokens": [], "model_max_length": 512,
            },
        ),
        TwinSpec(
            recipe="ken11-albert",
            layout=SpmLayout(unk=("<unk>", 1), bos=("[CLS]", 2), eos=("[SEP]", 3), pad=("<pad>", 0),
                             user_symbols=("[MASK]",)),
            vocab_size=3000,
            config=_albert_config,
            objective="mlm",
            tokenizer_config={
                "tokenizer_class": "AlbertTokenizerFast", "do_lower_case": False, "keep_accents": True,
                "unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "[CLS]", "eos_token": "[SEP]",
                "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                "model_max_length": 512,
            },
        ),
        TwinSpec(
            recipe="jmedroberta",
            layout=SpmLayout(unk=("[UNK]", 1), bos=("[CLS]", 2), eos=("[SEP]", 3), pad=("[PAD]", 0),
                             user_symbols=("[MASK]",), normalization="identity"),
            vocab_size=3000,
            config=_jmed_config,
            objective="mlm",
            fullwidth_corpus=True,
            tokenizer_json_only=True,
            tokenizer_config={
                "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                "model_max_length": 512,
            },
        ),
        TwinSpec(
            recipe="rinna-gpt-1b",
            layout=SpmLayout(unk=("<unk>", 1), bos=("<s>", 2), eos=("</s>", 3), pad=("[PAD]", 0),
                             user_symbols=("[CLS]", "[SEP]", "[MASK]")),
            vocab_size=3000,
            config=_gpt_1b_config,
            objective="clm",
            steps=600,
            train_layers=4,
            tokenizer_config={
                "tokenizer_class": "T5Tokenizer", "extra_ids": 0,
                "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]",
                "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
                "additional_special_tokens": [], "model_max_length": 1024,
            },
        ),
        TwinSpec(
            recipe="gpt2-small-ja",
            layout=SpmLayout(unk=("<unk>", 1), bos=("<s>", 2), eos=("</s>", 3), pad=("<pad>", 0)),
            vocab_size=3000,
            config=_gpt2_small_config,
            objective="clm",
            steps=600,
            tokenizer_config={
                "tokenizer_class": "BertGenerationTokenizer", "unk_token": "<unk>", "bos_token": "<s>",
                "eos_token": "</s>", "pad_token": "<pad>", "sep_token": "<::::>",
                "model_max_length": 1024,
            },
        ),
    ]
}


# Twins that no real model has, for tests only (not built by `jaonnx twins`):
# "gpt2-bytes" is gpt2-small-ja's recipe with a byte-fallback sentencepiece model whose
# rare characters are <0xNN> byte pieces, so a generated character can span several tokens
# and the streaming detokenizer's hold-back for incomplete characters actually runs. Its
# model memorizes BYTE_LINES, whose characters are not in the corpus (3- and 4-byte UTF-8),
# so greedy decoding writes them out byte by byte, deterministically.
BYTE_LINES = (
    "今日の夕食は🍣と鱚の天ぷらで、𠮷野さんも来た。",
    "鰯と鯖と鱚を🐟の市場で買った。",
)

TEST_TWINS: dict[str, TwinSpec] = {
    "gpt2-bytes": TwinSpec(
        recipe="gpt2-small-ja",
        name="gpt2-bytes",
        layout=SpmLayout(unk=("<unk>", 1), bos=("<s>", 2), eos=("</s>", 3), pad=("<pad>", 0),
                         byte_fallback=True, character_coverage=0.98),
        vocab_size=1600,
        config=_gpt2_tiny_config,
        objective="clm",
        steps=400,
        memorize=BYTE_LINES,
        tokenizer_config=TWINS["gpt2-small-ja"].tokenizer_config,
    ),
}


def twin_spec(name: str) -> TwinSpec:
    """The spec of a twin by directory name: one of the five recipes' twins or a test twin."""
    return TWINS[name] if name in TWINS else TEST_TWINS[name]


def _piece_ids(model: bytes) -> dict[str, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def _train(model: Any, ids: list[list[int]], spec: TwinSpec, special: dict[str, int]) -> float:
    """A few hundred AdamW steps on the corpus; returns the last loss."""
    import torch

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    seq, batch = 32, 8
    stream = torch.tensor([t for sentence in ids for t in sentence], dtype=torch.long)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    never_masked = torch.tensor(sorted(special.values()))
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(spec.steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([stream[s : s + seq] for s in starts])
        if spec.objective == "clm":
            loss = model(input_ids=chunk, labels=chunk).loss
        else:
            inputs = chunk.clone()
            chosen = torch.rand(chunk.shape, generator=generator) < 0.15
            chosen &= ~torch.isin(chunk, never_masked)
            labels = torch.where(chosen, chunk, torch.full_like(chunk, -100))
            inputs[chosen] = special["mask"]
            positions = torch.arange(seq).expand(batch, seq)  # from 0, as every recipe asks
            loss = model(input_ids=inputs, position_ids=positions, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    return float(loss.detach())


def build_twin(recipe_id: str, out_dir: Path, steps: int | None = None) -> Path:
    """Build one twin (a recipe id, or a TEST_TWINS name) into `out_dir/<name>` and return
    that directory."""
    import torch
    import transformers

    spec = twin_spec(recipe_id)
    recipe = get_recipe(spec.recipe)
    final = Path(out_dir) / spec.dirname
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build in a scratch directory and rename at the end: a reader never sees half a twin.
    target = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}-", dir=final.parent))

    lines = train_lines()
    if spec.fullwidth_corpus:
        lines = [to_fullwidth(line) for line in lines]
    if "lowercase" in recipe.normalizers:
        lines = [line.lower() for line in lines]
    sp_model = train_spm(lines, spec.layout, spec.vocab_size)
    pieces = _piece_ids(sp_model)
    special = {role: pieces[token] for role, token in recipe.special.items()}

    tok_config = dict(spec.tokenizer_config)
    if spec.tokenizer_json_only:
        specials = [t for t, _ in sorted(((t, pieces[t]) for _, t in recipe.special.items()), key=lambda x: x[1])]
        (target / "tokenizer.json").write_text(
            spm_to_tokenizer_json(sp_model, specials, recipe.special.unk, recipe.special.cls, recipe.special.sep),
            encoding="utf-8",
        )
    else:
        (target / "spiece.model").write_bytes(sp_model)
    write_json(target / "tokenizer_config.json", tok_config)
    write_json(
        target / "special_tokens_map.json",
        {f"{role}_token": token for role, token in recipe.special.items()},
    )

    torch.manual_seed(0)
    config = spec.config(len(pieces), pieces)
    config.architectures = [recipe.architecture]
    model_class = getattr(transformers, recipe.architecture)
    ids = _encode_all(sp_model, lines)
    if spec.memorize:  # about half as many tokens as the corpus itself
        ids += _encode_all(sp_model, list(spec.memorize)) * (len(lines) // len(spec.memorize) // 3)
    spec = spec if steps is None else _with_steps(spec, steps)
    if spec.train_layers:
        shallow = model_class(_with_layers(config, spec.train_layers))
        _train(shallow, ids, spec, special)
        model = _deepen(shallow, model_class(config))
    else:
        model = model_class(config)
        _train(model, ids, spec, special)
    model.save_pretrained(target)
    if final.exists():
        shutil.rmtree(final)
    target.rename(final)
    return final


def _with_layers(config: Any, layers: int) -> Any:
    copy = config.__class__.from_dict(config.to_dict())
    copy.n_layer = layers
    return copy


def _deepen(shallow: Any, deep: Any, damping: float = 0.1) -> Any:
    """A deep GPT-2 whose every k-th block is a trained block and the rest random blocks with
    damped output projections: 24 real layers (each one's KV cache changes the logits) that
    decode like the trained shallow model. Training 24 layers to that point takes minutes."""
    import torch

    n_shallow, n_deep = len(shallow.transformer.h), len(deep.transformer.h)
    stride = n_deep // n_shallow
    with torch.no_grad():
        deep.transformer.wte.load_state_dict(shallow.transformer.wte.state_dict())
        deep.transformer.wpe.load_state_dict(shallow.transformer.wpe.state_dict())
        deep.transformer.ln_f.load_state_dict(shallow.transformer.ln_f.state_dict())
        for i, block in enumerate(deep.transformer.h):
            if i % stride == 0 and i // stride < n_shallow:
                block.load_state_dict(shallow.transformer.h[i // stride].state_dict())
            else:
                for proj in (block.attn.c_proj, block.mlp.c_proj):
                    proj.weight.mul_(damping)
                    proj.bias.zero_()
    deep.tie_weights()
    return deep.eval()


def _with_steps(spec: TwinSpec, steps: int) -> TwinSpec:
    from dataclasses import replace

    return replace(spec, steps=steps)


def _encode_all(sp_model: bytes, lines: list[str]) -> list[list[int]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    return [sp.encode(line) for line in lines]


def build_twins(
    out_dir: str | Path,
    recipes: list[str] | None = None,
    steps: int | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Path]:
    """Build the twins (all five by default) and return recipe id -> checkpoint directory.

    Training runs on one thread: the models are too small to gain from two, and on a busy
    machine torch's spinning OpenMP threads made a step 25x slower (3.6 s vs 0.15 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = {}
    try:
        for recipe_id in recipes or list(TWINS):
            start = time.perf_counter()
            built[recipe_id] = build_twin(recipe_id, Path(out_dir), steps=steps)
            if progress:
                progress(recipe_id, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return built
