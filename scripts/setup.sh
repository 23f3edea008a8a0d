#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install jaonnx with every extra, CPU flavour.
# torch is pinned to the 2.13.0 CPU wheel *before* anything that depends on it, so pip never
# pulls a multi-GB CUDA build. Usage: bash scripts/setup.sh [VENV_DIR]  (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VENV:-.venv}}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[cpu,export,serve,structured,dev]"
echo "jaonnx installed in $VENV"
