"""The decoder graph driven step by step, with the KV cache kept in ONNX Runtime values.

Each step's `present.*` outputs are bound, as OrtValues, to the next step's `past_key_values.*`
inputs through IO binding: the cache never passes through numpy, and on CUDA it never leaves
the device. Only the input ids go in and the last-position logits come out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..artifact import Manifest


class DecoderSession:
    def __init__(self, session: Any, manifest: Manifest) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.shape = manifest.decoder
        self.past_names = [n for n in manifest.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in manifest.outputs if n.startswith("present.")]
        self.output_names = ["logits", *self.present_names]
        # fp16 artifacts take and return an fp16 cache; logits stay fp32.
        self.past_dtype = np.float16 if manifest.inputs.get(self.past_names[0]) == "float16" else np.float32
        on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = "cuda" if on_cuda else "cpu"
        self.past: list[Any] = []

    def reset(self, batch: int) -> None:
        """An empty (zero-length) cache for `batch` rows."""
        empty = np.zeros((batch, self.shape.num_heads, 0, self.shape.head_dim), dtype=self.past_dtype)
        value = self._ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
        self.past = [value] * len(self.past_names)

    @property
    def past_length(self) -> int:
        return self.past[0].shape()[2] if self.past else 0

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, keep: int = 1
    ) -> np.ndarray:
        """Run new tokens against the cache; returns logits [batch, keep, vocab] and updates the cache."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        return outputs[0].numpy()
