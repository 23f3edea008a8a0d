"""jaonnx benchmark suite: PyTorch eager vs jaonnx fp32/int8/int4 vs the peers (Optimum ORTModel,
optimum-intel OpenVINO, CTranslate2, onnxruntime-genai) on CPU, in one run.

`python -m benchmarks [--quick] [--only fill_mask,generation,gpt1b,coldstart,size] [--no-peers]`.
Every measurement runs in its own subprocess (one at a time, peers with their own venv's python
from benchmarks/.venv-<peer>/), in `--rounds` interleaved rounds with a machine-speed probe around
each; the measuring core (timing, bandwidth/floor, RSS, ORT profile, bare ORT loop) is
`jaonnx.bench`, shared with `jaonnx bench`. Results go to benchmarks/results/.

Side-by-side scripts: `benchmarks.llamacpp` (llama.cpp from a source build, GGUF files written
by `benchmarks.gguf_writer`), `benchmarks.gemm_floor` and `benchmarks.fill_mask_floor` (fill-mask
against ORT's GEMM peaks), `benchmarks.fp32_decode` (CTranslate2, CPU time at 1 thread).
"""
