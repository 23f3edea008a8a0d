"""Structured output: the constraint options, compiled once per schema, matched per row.

The five options (`json_schema`, `json_object`, `regex`, `choice`, `grammar`) become one
`ConstraintSpec` on the settings (`constraint_spec`, no library needed). `Constraints` turns a
spec into a grammar for one model's vocabulary (cached by spec) and gives every sequence its
own `RowMatcher`. The engine asks a matcher for the mask before sampling, feeds it the chosen
token after, and ends the sequence when it is done.

The matching is llguidance's (chosen by measurement: benchmarks/structured.py and the README's
"Structured output" section). It is an optional extra; without it, asking for a constraint is a
one-line error naming `jaonnx[structured]`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import JaonnxError
from ..tokenization.token_bytes import TokenVocabulary
from .spec import OptionSpec

# The five spellings of a constraint, as options (at most one per request). They resolve into
# one `SamplingSettings.constraint` (`constraint_spec`), which is why they are declared here
# and not as settings fields.
CONSTRAINT_OPTION_SPECS: dict[str, OptionSpec] = {
    "json_schema": OptionSpec(str, "Output JSON valid under this JSON schema (JSON text; a dict in Python/HTTP)."),
    "json_object": OptionSpec(bool, "Output one JSON object.", flags=("--json-object",)),
    "regex": OptionSpec(str, "Output a full match of this regular expression."),
    "choice": OptionSpec(list[str], "Output exactly one of these strings."),
    "grammar": OptionSpec(str, "Output a sentence of this grammar (Lark, or llama.cpp's GBNF)."),
}
CONSTRAINT_OPTIONS = tuple(CONSTRAINT_OPTION_SPECS)
MAX_CHOICES = 1024
CACHE_SIZE = 64  # compiled grammars kept per model
INSTALL = "structured output needs llguidance: pip install 'jaonnx[structured]'"


@dataclass(frozen=True)
class ConstraintSpec:
    """One request's constraint: the option that gave it and its canonical text (the schema or
    the choices as JSON, the regex, the grammar). Hashable: the compile cache's key."""

    kind: str
    text: str


def constraint_spec(options: dict[str, Any]) -> ConstraintSpec | None:
    """The one constraint among the caller's options (None values and `json_object=False` are
    "not given"), checked for shape; two at once is an error naming the second."""
    given = [k for k in CONSTRAINT_OPTIONS if options.get(k) is not None and options.get(k) is not False]
    if not given:
        return None
    if len(given) > 1:
        raise JaonnxError(f"give one constraint at a time, not {given[0]} and {given[1]}", given[1])
    kind = given[0]
    value = options[kind]
    if kind == "json_object":
        if value is not True:
            raise JaonnxError(f"json_object must be true or false, got {value!r}", kind)
        return ConstraintSpec(kind, '{"type": "object"}')
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise JaonnxError(f"json_schema is not valid JSON ({exc.msg} at {exc.pos})", kind) from None
        if not isinstance(value, dict):
            raise JaonnxError(f"json_schema must be a JSON object (a schema), got {type(value).__name__}", kind)
        return ConstraintSpec(kind, json.dumps(value, ensure_ascii=False))  # key order is output order
    if kind == "choice":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise JaonnxError("choice must be a non-empty list of strings", kind)
        if len(value) > MAX_CHOICES or not all(isinstance(c, str) and c for c in value):
            raise JaonnxError(f"choice must be 1 to {MAX_CHOICES} non-empty strings, got {list(value)[:4]!r}", kind)
        return ConstraintSpec(kind, json.dumps(list(value), ensure_ascii=False))
    if not isinstance(value, str) or not value:
        raise JaonnxError(f"{kind} must be a non-empty string, got {value!r}", kind)
    return ConstraintSpec(kind, value)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise JaonnxError(INSTALL) from None
    return llguidance


def _first_line(message: str) -> str:
    """The library's (multi-line) message on one line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and line.strip() != "^"]
    return (" ".join(lines) or "rejected")[:240]


class Constraints:
    """A model's constraint compiler: its vocabulary for llguidance and the grammars compiled
    from specs (LRU-cached by spec). Built lazily: nothing is imported until a constraint is."""

    def __init__(self, vocabulary: Callable[[], TokenVocabulary], encode_exact: Callable[[str], list[int]]) -> None:
        self._vocabulary_factory = vocabulary
        self._encode_exact = encode_exact
        self._vocab: TokenVocabulary | None = None
        self._tokenizer: Any = None
        self._cache: OrderedDict[ConstraintSpec, Any] = OrderedDict()
        self._lock = threading.RLock()  # the server resolves settings on one thread, steps on another

    @property
    def vocabulary(self) -> TokenVocabulary:
        if self._vocab is None:
            self._vocab = self._vocabulary_factory()
        return self._vocab

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            llg = _llguidance()
            vocab = self.vocabulary

            class Wrapper:  # llguidance's TokenizerWrapper protocol
                eos_token_id = vocab.eos_id
                bos_token_id = None
                tokens = vocab.tokens
                special_token_ids = list(vocab.special_ids)

                def __call__(wrapper, text: str | bytes) -> list[int]:  # noqa: N805
                    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
                    try:
                        encoded = self._encode_exact(data.decode("utf-8"))
                    except UnicodeDecodeError:
                        encoded = []
                    return vocab.spell(data, encoded)

            self._tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Wrapper()))
        return self._tokenizer

    def compile(self, spec: ConstraintSpec) -> Any:
        """A ready matcher for `spec` (to copy per row); errors are one line naming the option."""
        with self._lock:
            return self._compile(spec)

    def _compile(self, spec: ConstraintSpec) -> Any:
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        llg = _llguidance()
        tokenizer = self._llg_tokenizer()
        try:
            grammar = self._grammar(llg, spec)
        except (ValueError, TypeError) as exc:
            raise JaonnxError(f"{spec.kind} cannot be compiled: {_first_line(str(exc))}", spec.kind) from None
        if spec.kind == "choice":
            self._check_spellable(spec)
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise JaonnxError(f"{spec.kind} cannot be compiled: {_first_line(matcher.get_error())}", spec.kind)
        self._cache[spec] = matcher
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return matcher

    @staticmethod
    def _grammar(llg: Any, spec: ConstraintSpec) -> str:
        if spec.kind in ("json_schema", "json_object"):
            # Compact JSON (no free whitespace): a model cannot wander off into blank space.
            return llg.LLMatcher.grammar_from_json_schema(spec.text, defaults={"whitespace_flexible": False})
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "choice":
            return llg.grammar_from("choice", spec.text)
        return llg.grammar_from("grammar", spec.text)  # Lark, or GBNF converted to Lark

    def _check_spellable(self, spec: ConstraintSpec) -> None:
        for choice in json.loads(spec.text):
            if not self.vocabulary.can_spell(choice.encode("utf-8")):
                raise JaonnxError(f"choice {choice!r} cannot be spelled with this model's vocabulary", "choice")

    def matcher(self, spec: ConstraintSpec, eos_id: int | None) -> RowMatcher:
        """A fresh matcher for one sequence; `eos_id` is the request's end-of-text id (None: the
        sequence can only end by the constraint finishing)."""
        with self._lock:
            return RowMatcher(self._compile(spec).deep_copy(), self.vocabulary, eos_id)


class RowMatcher:
    """One sequence's constraint state: which tokens may come next, and the tokens so far."""

    def __init__(self, matcher: Any, vocab: TokenVocabulary, eos_id: int | None) -> None:
        self._m = matcher
        self._vocab = vocab
        self._eos_ok = eos_id is not None and eos_id == vocab.eos_id
        self._bits = np.full((1, (len(vocab.tokens) + 31) // 32), -1, dtype=np.int32)

    def allowed(self, width: int) -> np.ndarray:
        """bool[width]: the model's tokens the constraint allows next (EOS where it can end)."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, self._bits)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        real = min(width, self._vocab.size)
        out = np.zeros(width, dtype=bool)
        out[:real] = bits[:real]
        if self._vocab.eos_id < self._vocab.size:
            out[self._vocab.eos_id] = bool(bits[self._vocab.eos_id]) and self._eos_ok
        return out

    def advance(self, token: int) -> None:
        """Consume the chosen token (EOS included)."""
        if not self._m.consume_token(int(token)):
            raise JaonnxError(f"internal: token {token} broke the constraint ({_first_line(self._m.get_error())})")

    @property
    def stopped(self) -> bool:
        """Nothing but the end may follow: the constraint is finished."""
        return bool(self._m.is_stopped())

    @property
    def satisfied(self) -> bool:
        """The text so far is a complete match."""
        return bool(self._m.is_accepting())


def constrain_logits(logits: np.ndarray, matchers: Sequence[RowMatcher | None]) -> tuple[np.ndarray, list[str | None]]:
    """A copy of `logits` [rows, vocab] with each constrained row's forbidden tokens at -inf
    (the caller keeps the originals, for logprobs), and per row: None, "stop" (the constraint
    is finished: end the row) or "error" (no token the model can produce fits)."""
    masked = np.array(logits, dtype=np.float32, copy=True)
    verdicts: list[str | None] = []
    for row, matcher in enumerate(matchers):
        if matcher is None:
            verdicts.append(None)
            continue
        if matcher.stopped:
            verdicts.append("stop")
            continue
        allowed = matcher.allowed(masked.shape[-1])
        if not allowed.any():
            verdicts.append("error")
            continue
        masked[row, ~allowed] = -np.inf
        verdicts.append(None)
    return masked, verdicts
