"""jaonnx benchmark suite: PyTorch eager vs jaonnx fp32 vs jaonnx int8 on CPU, in one run.

`python -m benchmarks [--quick] [--only fill_mask,generation,gpt1b,coldstart,size]`. Every
measurement runs in its own subprocess (one at a time) so peak RSS is per engine and engines
never share threads or allocators; results go to benchmarks/results/.
"""
