"""Sentencepiece models for the twins, trained on the shipped corpus, with each real model's
special-token layout (ids in the same slots as the real vocabulary)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpmLayout:
    """Where the special pieces live; ids follow sentencepiece's fixed slots then user symbols."""

    unk: tuple[str, int]
    bos: tuple[str, int] | None
    eos: tuple[str, int] | None
    pad: tuple[str, int] | None
    user_symbols: tuple[str, ...] = ()
    normalization: str = "nmt_nfkc"
    # A character seen too rarely to get a piece of its own: <unk> (False, the real models'
    # tokenizers) or its UTF-8 bytes as <0xNN> pieces (True: rinna's newer models do this).
    byte_fallback: bool = False
    character_coverage: float = 1.0


def train_spm(lines: list[str], layout: SpmLayout, vocab_size: int) -> bytes:
    """Train a unigram sentencepiece model deterministically (one thread) and return its bytes."""
    import sentencepiece as spm

    def slot(name: str, value: tuple[str, int] | None) -> dict[str, object]:
        if value is None:
            return {f"{name}_id": -1}
        return {f"{name}_id": value[1], f"{name}_piece": value[0]}

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=layout.character_coverage,
        num_threads=1,
        normalization_rule_name=layout.normalization,
        user_defined_symbols=list(layout.user_symbols),
        minloglevel=2,
        **({"byte_fallback": True} if layout.byte_fallback else {}),
        **slot("unk", layout.unk),
        **slot("bos", layout.bos),
        **slot("eos", layout.eos),
        **slot("pad", layout.pad),
    )
    return buffer.getvalue()


def spm_to_tokenizer_json(model: bytes, specials: list[str], unk: str, cls: str, sep: str) -> str:
    """A `tokenizer.json` (tokenizers Unigram + Metaspace) holding the same vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    vocab = [(p.piece, p.score) for p in proto.pieces]
    pieces = [p for p, _ in vocab]
    tok = Tokenizer(models.Unigram(vocab, unk_id=pieces.index(unk), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, pieces.index(cls)), (sep, pieces.index(sep))],
    )
    return tok.to_str(pretty=True)


def write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
