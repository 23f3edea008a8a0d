"""Output processing (vLLM v1's third part): the tokens the engine core picked become text,
stop strings, log-probabilities and typed `RequestOutput`s.

The core only decides tokens and finish reasons "eos" / "length"; everything a caller reads
is made here, so a stream and a final result are shaped by one piece of code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..numeric import log_softmax
from .constraints import RowMatcher
from .sampling import SamplingSettings
from .streaming import IncrementalText

Decode = Callable[[list[int]], str]


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before sampling processors) and
    the `top` most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one sequence of a request produced in one `step()`.

    A request with `num_return_sequences = n` has n sequences, told apart by `index`
    (0..n-1); each reports its own `finished`. `new_text` is stream-safe: text that could
    still change (an incomplete character, a possible stop string) is held back until final.
    `token_ids` and `text` are everything generated so far (text cut at a stop string).
    """

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" once finished
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # for new_token_ids, when the request asked
    # prompt_ids[1:] scored given the tokens before each (settings.prompt_logprobs); on a
    # sequence's first output only
    prompt_logprobs: list[TokenLogprob] | None = None
    # Structured output, once finished: "satisfied", "incomplete" (it ran out of tokens or hit a
    # stop string first) or "failed" (the vocabulary cannot spell what must come next: `error`).
    constraint: str | None = None
    error: str | None = None


@dataclass
class SequenceState:
    """One sequence of a request: its tokens (core) and its text (output processing)."""

    detok: IncrementalText
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the text so far, cut at a stop string
    emitted: str = ""  # the part of it already reported as final
    finish_reason: str | None = None
    matcher: RowMatcher | None = None  # structured output
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    """Detokenization, stop strings and logprobs for the engine's requests."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode

    def sequences(self, prompt_ids: list[int], n: int) -> list[SequenceState]:
        return [SequenceState(IncrementalText(self._decode, prompt_ids)) for _ in range(n)]

    def outputs(
        self, request_id: str, prompt: str, prompt_ids: list[int], settings: SamplingSettings,
        sequences: Sequence[SequenceState], new: Sequence[list[int]], new_logits: Sequence[list[np.ndarray]],
        was_done: Sequence[bool], prompt_lps: list[TokenLogprob] | None = None,
    ) -> list[RequestOutput]:
        """The `RequestOutput`s of one step: `new[i]` are sequence i's new tokens (already in
        its `generated`), `new_logits[i]` their logits when the request asked for logprobs; a
        sequence that finished this step without a token (a constraint ended it) reports too."""
        outputs = []
        for i, seq in enumerate(sequences):
            if not new[i] and not (seq.done and not was_done[i]):
                continue
            logprobs = None
            if settings.logprobs is not None:
                logprobs = [token_logprob(lg, t, settings.logprobs) for t, lg in zip(new[i], new_logits[i])]
            piece = self.update_text(settings.stop, seq, new[i])
            first = len(seq.generated) == len(new[i])
            outputs.append(RequestOutput(
                request_id, i, new[i], piece, seq.done, seq.finish_reason, prompt, prompt_ids,
                list(seq.generated), seq.text, logprobs, prompt_lps if first else None, *constraint_state(seq),
            ))
        return outputs

    @staticmethod
    def update_text(stops: Sequence[str], seq: SequenceState, new: list[int]) -> str:
        """Extend the sequence's text by its new tokens (cut at a stop string, which finishes
        it with "stop") and return the part that is now final."""
        if seq.finish_reason == "stop" and not new:
            return ""
        seq.detok.push(new)
        if seq.done:
            seq.detok.finish()
        text = seq.detok.text
        if stops:
            look = max(0, len(seq.text) - max(map(len, stops)))  # a stop may straddle the old end
            cut = min((i for i in (text.find(s, look) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                seq.finish_reason = "stop"  # also when the last token allowed completed the stop
        seq.text = text
        if seq.done:
            ready = text
        else:
            hold = max(map(len, stops), default=1) - 1  # a stop string may be starting
            ready = text[: max(0, len(text) - hold)]
        if not ready.startswith(seq.emitted) or len(ready) <= len(seq.emitted):
            return ""
        piece, seq.emitted = ready[len(seq.emitted) :], ready
        return piece


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log-softmax under `logits` and the `top` likeliest ids (stable order)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64).reshape(-1))
    best = np.argsort(-lp, kind="stable")[:top] if top else []
    return TokenLogprob(token, float(lp[token]), [(int(t), float(lp[t])) for t in best])


def prompt_logprobs(logits: np.ndarray, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """`TokenLogprob`s of `targets` under logits [len(targets), vocab] (row i predicts
    targets[i]), each with the `top` likeliest alternatives, most likely first."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64))
    rows = np.arange(len(targets))
    chosen = lp[rows, np.asarray(targets, dtype=np.int64)]
    if not top:
        return [TokenLogprob(int(t), float(v)) for t, v in zip(targets, chosen)]
    part = np.argpartition(-lp, top - 1, axis=-1)[:, :top]
    order = np.argsort(-np.take_along_axis(lp, part, axis=-1), axis=-1, kind="stable")
    best = np.take_along_axis(part, order, axis=-1)
    return [TokenLogprob(int(t), float(chosen[i]), [(int(b), float(lp[i, b])) for b in best[i]])
            for i, t in enumerate(targets)]


def constraint_state(seq: SequenceState) -> tuple[str | None, str | None]:
    """RequestOutput's (constraint, error) for a sequence: set once a constrained one is done."""
    if seq.matcher is None or not seq.done:
        return None, None
    if seq.error is not None:
        return "failed", seq.error
    cut = seq.finish_reason == "stop" and seq.matcher.satisfied and not seq.matcher.stopped
    return ("satisfied" if seq.matcher.satisfied and not cut else "incomplete"), None
