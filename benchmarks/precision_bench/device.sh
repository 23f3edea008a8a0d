#!/bin/bash
# One call on the lent machine: install the carried wheels, rebuild random weights, time.
set -e
python3 -m pip install -q --no-deps --target /tmp/site .bench/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site
python3 -c "import onnxruntime, numpy; print('ort', onnxruntime.__version__, 'numpy', numpy.__version__)"
lscpu | grep -E "Model name|^CPU\(s\)" | cut -c1-200
lscpu | grep -o -E "avx512_vnni|avx_vnni|avx512f |amx_int8" | sort -u | tr '\n' ' '; echo
for d in .bench/skel/*/; do python3 benchmarks/precision_bench/skeleton.py fill "$d"; done
du -sh .bench/skel
python3 benchmarks/precision_bench/bench.py .bench/skel 2 "${ROUNDS:-5}"
python3 benchmarks/precision_bench/bench.py .bench/skel 8 3 || true
