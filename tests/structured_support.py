"""Helpers for the structured-output tests.

The generation twins' vocabularies (about 2,300 pieces, no byte fallback) cannot spell `{`, `}`
or `\\`, so no JSON at all. `with_byte_fallback` gives a twin's artifact a vocabulary that can: its
256 rarest pieces become the byte pieces `<0x00>`..`<0xFF>` (as in the real rinna vocabularies),
the graph and ids stay as they are, so transformers' twin still runs the same weights.

`ReferenceMask` is the test's own llguidance logits processor, built from sentencepiece
directly (not from jaonnx's vocabulary code), for comparing with transformers' greedy search.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "名前": {"type": "string", "minLength": 1, "maxLength": 6},
        "都市": {"enum": ["東京", "大阪", "名古屋"]},
        "年齢": {"type": "integer", "minimum": 0, "maximum": 120},
        "住所": {
            "type": "object",
            "properties": {"県": {"type": "string", "maxLength": 4}, "番号": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["県", "番号"],
            "additionalProperties": False,
        },
        "タグ": {"type": "array", "items": {"enum": ["はい", "いいえ"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["名前", "都市", "年齢", "住所", "タグ"],
    "additionalProperties": False,
}


def with_byte_fallback(artifact: Path, out: Path) -> Path:
    """A copy of `artifact` whose sentencepiece model has byte fallback (cached at `out`)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    if (out / "jaonnx.json").is_file():
        return out
    scratch = out.with_name(f".{out.name}-tmp")
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(artifact, scratch)
    proto = model_pb2.ModelProto()
    proto.ParseFromString((scratch / "spiece.model").read_bytes())
    normal = [p for p in proto.pieces if p.type == model_pb2.ModelProto.SentencePiece.NORMAL and p.piece != "▁"]
    for byte, piece in zip(range(256), normal[-256:]):
        piece.piece, piece.type, piece.score = f"<0x{byte:02X}>", model_pb2.ModelProto.SentencePiece.BYTE, 0.0
    proto.trainer_spec.byte_fallback = True
    (scratch / "spiece.model").write_bytes(proto.SerializeToString())
    if out.exists():
        shutil.rmtree(out)
    scratch.rename(out)
    return out


def spm_token_bytes(spm_path: Path, special: set[int]) -> tuple[list[bytes], list[int]]:
    """Each piece's bytes, straight from sentencepiece (control/unknown and `special` ids marked)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    tokens, specials = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or i in special:
            specials.append(i)
            tokens.append(piece.encode())
        elif sp.is_byte(i):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("▁", " ").encode())
    return tokens, specials


class ReferenceMask:
    """A transformers LogitsProcessor: llguidance's mask for a schema, built in the test."""

    def __init__(self, spm_path: Path, special: set[int], eos: int, schema: dict[str, Any], prompt_len: int) -> None:
        import llguidance
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        tokens, specials = spm_token_bytes(spm_path, special)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(Path(spm_path).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.remove_extra_whitespaces = False
        plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        class Wrapper:
            eos_token_id, bos_token_id, special_token_ids = eos, None, specials

            def __call__(self, text: Any) -> list[int]:
                return list(plain.encode(text.decode() if isinstance(text, bytes) else text))

        Wrapper.tokens = tokens  # type: ignore[attr-defined]
        tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.size, self.prompt_len, self.seen = len(tokens), prompt_len, 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import llguidance.numpy as lln
        import torch

        new = input_ids[0, self.prompt_len + self.seen :].tolist()
        for token in new:
            assert self.matcher.consume_token(token)
        self.seen += len(new)
        bits = lln.allocate_token_bitmask(1, self.size)
        lln.fill_next_token_bitmask(self.matcher, bits)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.size].astype(bool)
        mask = torch.full_like(scores, float("-inf"))
        mask[:, : self.size][:, torch.from_numpy(allowed)] = 0
        return scores + mask
