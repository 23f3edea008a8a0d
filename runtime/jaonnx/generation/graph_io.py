"""What both batch decoders need to know about a decoder graph's inputs and outputs.

The concat and the static layout bind the same things: one `past_key_values.*` input and one
`present.*` output per layer and k/v, in the cache dtype the export chose (fp16 artifacts keep
an fp16 cache), on the session's device. Reading that once here keeps the two layouts from
drifting apart. Logits leave the graph only through `GraphIO.logits`, which masks the ids an
embedding table has past its tokenizer: the one place that happens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifact import Manifest
from ..errors import JaonnxError

PAST = "past_key_values."
PRESENT = "present."


class GraphIO:
    """Cache names, dtype, device and shape of one decoder session, and the logits mask."""

    def __init__(self, session: Any, manifest: Manifest) -> None:
        if manifest.decoder is None:
            raise JaonnxError("a decoder needs an artifact with a `decoder` section in jaonnx.json")
        self.session = session
        self.shape = manifest.decoder
        self.max_positions = manifest.max_positions
        self.past_names = [n for n in manifest.inputs if n.startswith(PAST)]
        self.present_names = [PRESENT + n[len(PAST):] for n in self.past_names]
        self.dtype = np.float16 if manifest.inputs.get(self.past_names[0]) == "float16" else np.float32
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.vocab_limit = manifest.tokenizer_size  # ids from here on are embedding padding
        # (vocab width, numpy dtype) of the graph's `logits` output, read once; width None when
        # symbolic (or absent): the static decoder then reads logits back from ORT instead
        output = next((o for o in session.get_outputs() if o.name == "logits"), None)
        shape = output.shape if output is not None else None
        width = shape[-1] if shape and isinstance(shape[-1], int) else None
        dtype = np.float16 if output is not None and output.type == "tensor(float16)" else np.float32
        self.logits_spec: tuple[int | None, Any] = (width, dtype)

    @property
    def row_shape(self) -> tuple[int, int]:
        """(heads, head_dim) of one row's cache per layer and k/v."""
        return self.shape.num_heads, self.shape.head_dim

    def token_bytes(self) -> int:
        """Cache bytes one token of one row takes over all layers."""
        heads, head_dim = self.row_shape
        return len(self.past_names) * heads * head_dim * np.dtype(self.dtype).itemsize

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """Graph logits as the engine may use them: float32, ids past the tokenizer at -inf."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits = np.array(logits, copy=True) if not logits.flags.writeable else logits
            logits[..., self.vocab_limit:] = -np.inf
        return logits
