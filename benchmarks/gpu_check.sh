#!/usr/bin/env bash
# The GPU check of issue 19 in one call: benchmarks/gpu_check.py's sections (build the
# japanese-gpt-1b-shape fp16 artifact, greedy vs transformers, capture vs no capture, decode ms,
# batch-8 tokens/s, `jaonnx bench --providers cuda`, serving at 1/8/32 clients, cold start),
# written to $OUT/gpu_check.json (./gpu_check.json without $OUT).
#
# On a lent GPU machine (see shared/gpu.md), prepared here beforehand:
#   benchmarks/gpu_wheelhouse.sh          # onnxruntime-gpu in .ortgpu/1..6, python deps in .gpudeps
# then, back to back in one lease:
#   six `device` runs, carry [".ortgpu/N"]:  mkdir -p /tmp/ortgpu && cp .ortgpu/N/part-* /tmp/ortgpu/
#   one `device` run, carry [".gpudeps"], timeout 540:  benchmarks/gpu_check.sh
# The check itself takes about 5 minutes on an H200.
#
# Dry run anywhere (no GPU, tiny shape, all sections): benchmarks/gpu_check.sh --providers cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${JAONNX_GPU_SITE:-/tmp/site}
PARTS=${JAONNX_GPU_PARTS:-/tmp/ortgpu}
WHEEL=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
on_gpu=1
for arg in "$@"; do [ "$arg" = "cpu" ] && on_gpu=0; done

if [ "$on_gpu" = 1 ]; then
  if [ ! -d "$SITE/onnxruntime" ]; then
    if ! ls "$PARTS"/part-* >/dev/null 2>&1; then
      echo "error: onnxruntime-gpu is not installed in $SITE and no wheel parts are in $PARTS (see shared/gpu.md)" >&2
      exit 2
    fi
    cat "$PARTS"/part-* > "$WHEEL"
    "$PY" -m pip install -q --no-deps --target "$SITE" "$WHEEL"
  fi
  if [ -d .gpudeps ] && [ ! -f "$SITE/.gpudeps-installed" ]; then
    # Only what the machine's own environment lacks (its numpy and torch stay in charge).
    missing=()
    for whl in .gpudeps/*.whl; do
      module=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
      case "$module" in
        pyyaml) module=yaml ;; protobuf) module=google.protobuf ;;
        markdown_it_py) module=markdown_it ;; opentelemetry_api) module=opentelemetry ;;
      esac
      "$PY" -c "import $module" 2>/dev/null || missing+=("$whl")
    done
    [ ${#missing[@]} -eq 0 ] || "$PY" -m pip install -q --no-deps --target "$SITE" "${missing[@]}"
    touch "$SITE/.gpudeps-installed"
  fi
  # Every Python process (the server and the cold-start one included) must find the CUDA and
  # cuDNN libraries of the machine's PyTorch environment: ORT's preload_dlls() at start-up.
  HOOK="$SITE-hook"
  mkdir -p "$HOOK"
  cat > "$HOOK/sitecustomize.py" <<'PY'
try:
    import onnxruntime

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
except Exception:  # the check reports a missing CUDA provider itself
    pass
PY
  export PYTHONPATH="$HOOK:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTHONPATH="$PWD/runtime:$PWD/export${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-.}/gpu_check.json" "$@"
