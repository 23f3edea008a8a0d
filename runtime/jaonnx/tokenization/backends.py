"""Two tokenizer backends behind one small interface.

Both can encode a text as the *start* of a sequence (sentencepiece's dummy-prefix `▁`) or as
the *continuation* of one (no prefix). Encoding the text after a typed `[MASK]` as a
continuation is what removes the spurious `▁` token the ALBERT and JMedRoBERTa cards show.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from ..errors import JaonnxError


class Backend(Protocol):
    vocab_size: int

    def encode(self, text: str, *, continuation: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def token_bytes(self, token_id: int) -> bytes | None: ...
    def encode_exact(self, text: str) -> list[int]: ...


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece


def _piece_bytes(piece: str) -> bytes:
    """The bytes a sentencepiece-style piece adds to the decoded text: `▁` is a space."""
    return piece.replace("\u2581", " ").encode("utf-8")


class SentencePieceBackend:
    """A `spiece.model` read with sentencepiece; a second processor has the dummy prefix off.

    The variants (no dummy prefix; unnormalized) are built on first use: they need the model's
    protobuf classes (importing them is ~20-40 ms) and a plain generate or fill-mask never calls
    them, so a cold start does not pay for them."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self._data = Path(path).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._data)
        self.vocab_size = self._sp.get_piece_size()

    def _variant(self, exact: bool) -> Any:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto()
        proto.ParseFromString(self._data)
        proto.normalizer_spec.add_dummy_prefix = False
        if exact:  # structured output: the pieces of a text exactly as written (no NFKC, no space folding)
            proto.normalizer_spec.name = "identity"
            proto.normalizer_spec.precompiled_charsmap = b""
            proto.normalizer_spec.remove_extra_whitespaces = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @cached_property
    def _sp_cont(self) -> Any:
        return self._variant(exact=False)

    @cached_property
    def _sp_exact(self) -> Any:
        return self._variant(exact=True)

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        sp = self._sp_cont if continuation and not text[:1].isspace() else self._sp
        return list(sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes the token adds to a decoded text; None for control and unknown pieces."""
        sp, i = self._sp, int(token_id)
        if sp.is_control(i) or sp.is_unknown(i):
            return None
        if sp.is_byte(i):
            return bytes([int(BYTE_PIECE.fullmatch(sp.id_to_piece(i)).group(1), 16)])  # type: ignore[union-attr]
        return _piece_bytes(sp.id_to_piece(i))

    def encode_exact(self, text: str) -> list[int]:
        """Ids of `text` as a continuation, unnormalized: their bytes join to the text's (when
        the vocabulary can spell it)."""
        return list(self._sp_exact.encode(text))


def _without_prefix(node: Any) -> Any:
    """Copy of a tokenizer.json component tree with every Metaspace prefix switched off."""
    if isinstance(node, list):
        return [_without_prefix(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
    if isinstance(node, dict):
        node = {k: _without_prefix(v) for k, v in node.items()}
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node["add_prefix_space"] = False
        return node
    return node


class TokenizersBackend:
    """A `tokenizer.json` read with Hugging Face tokenizers (no transformers)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        config = json.loads(Path(path).read_text(encoding="utf-8"))
        self._tok = Tokenizer.from_str(json.dumps(config))
        cont = dict(config)
        for key in ("normalizer", "pre_tokenizer"):
            if cont.get(key) is not None:
                node = cont[key]
                if isinstance(node, dict) and node.get("type") == "Prepend":
                    cont[key] = None
                else:
                    cont[key] = _without_prefix(node)
        try:
            self._tok_cont = Tokenizer.from_str(json.dumps(cont))
        except Exception as exc:  # pragma: no cover - depends on exotic tokenizer.json files
            raise JaonnxError(f"cannot build a continuation tokenizer from {path}: {exc.__class__.__name__}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        exact = dict(cont, normalizer=None)
        self._tok_exact = Tokenizer.from_str(json.dumps(exact))
        self._special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        unk = (config.get("model") or {}).get("unk_id")
        if isinstance(unk, int):
            self._special.add(unk)
        self._byte_fallback = bool((config.get("model") or {}).get("byte_fallback"))

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        tok = self._tok_cont if continuation and not text[:1].isspace() else self._tok
        return tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes the token adds to a decoded text; None for special (added) tokens."""
        i = int(token_id)
        if i in self._special:
            return None
        piece = self.id_to_piece(i)
        match = BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        return bytes([int(match.group(1), 16)]) if match else _piece_bytes(piece)

    def encode_exact(self, text: str) -> list[int]:
        """Ids of `text` as a continuation, unnormalized (see SentencePieceBackend)."""
        return self._tok_exact.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


BACKENDS: dict[str, type] = {"sentencepiece": SentencePieceBackend, "tokenizers": TokenizersBackend}


def load_backend(kind: str, path: Path) -> Backend:
    """The tokenizer file at `path`; a missing or corrupt file is a one-line JaonnxError."""
    if kind not in BACKENDS:
        raise JaonnxError(f"unknown tokenizer backend {kind!r}: re-export the artifact with this jaonnx")
    try:
        return BACKENDS[kind](Path(path))
    except JaonnxError:
        raise
    except Exception as exc:  # sentencepiece RuntimeError, protobuf DecodeError, JSON/tokenizers errors
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise JaonnxError(
            f"cannot read the tokenizer {path} ({exc.__class__.__name__}{': ' + first if first else ''}): "
            "re-run `jaonnx export`"
        ) from None
