"""Top-1 agreement with transformers fp32 of quantized variants of a trained twin, on the
held-out sentences the export's quality report uses (the same gate: >= 0.95).

    python twin_quality.py TWIN_CHECKPOINT NAME=ARTIFACT_DIR ...
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import jaonnx
from jaonnx_export.precision import QUALITY_TEXTS
from jaonnx_export.twins import heldout_lines

reference = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
for spec in sys.argv[2:]:
    name, path = spec.split("=", 1)
    gen = jaonnx.load(path, providers="cpu")
    cut = gen.manifest.tokenizer_size
    agree = total = 0
    for text in heldout_lines()[:QUALITY_TEXTS]:
        ids = gen.encode(text)[: gen.manifest.max_positions]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            want = reference(input_ids=torch.tensor([ids])).logits[0].numpy()[:, :cut]
        got = gen.new_batch().logits(ids)[:, :cut]
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    print(json.dumps({name: {"top1": agree / total, "tokens": total}}), flush=True)
