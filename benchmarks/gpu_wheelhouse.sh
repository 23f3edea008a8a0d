#!/usr/bin/env bash
# Prepare, on a machine with package access, what benchmarks/gpu_check.sh needs carried to the
# lent GPU machine (which cannot download): onnxruntime-gpu split into 45 MB parts in
# .ortgpu/1..6 (shared/gpu.md) and the runtime/serving/export Python deps (no numpy, no torch:
# the machine's PyTorch environment has them) as wheels in .gpudeps (about 26 MB). Both are
# ignored by git and carried with `device` calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if ! ls .ortgpu/*/part-* >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d .ortgpu/dl onnxruntime-gpu==1.31.1
  for i in 1 2 3 4 5 6; do mkdir -p .ortgpu/$i; done
  (cd .ortgpu && split -b 45M -d -a 1 dl/onnxruntime_gpu-*.whl part- \
    && for f in part-*; do n=$(( ${f#part-} + 1 )); mv "$f" "$n/"; done && rm -rf dl)
fi
rm -rf .gpudeps
"$PY" -m pip download -q "${TARGET[@]}" -d .gpudeps sentencepiece tokenizers typer rich fastapi uvicorn \
  prometheus-client httpx onnx protobuf
rm -f .gpudeps/numpy-*.whl
du -sh .ortgpu .gpudeps
