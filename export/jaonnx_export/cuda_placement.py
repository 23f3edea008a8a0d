"""A static check that ONNX Runtime's CUDA execution provider can capture a graph whole.

`enable_cuda_graph` is refused when a node falls to another provider, or when the partitioned
graph needs a Memcpy node (inference_session.cc: AreAllComputeNodesAssignedToCudaEp: "CPU nodes
are allowed as long as there is no Memcpy"). Without a GPU this module predicts both from the
graph alone, with the rules ORT applies when it partitions:

1. an op with no CUDA kernel runs on the CPU (CUDA_KERNELS: the ops our decoder graphs use,
   checked against ORT's CUDA op registry, docs/OperatorKernels.md);
2. ORT's GetCpuPreferredNodes (fallback_cpu_capability.cc) moves to the CPU every node that
   consumes a host-side output (Shape, Size) and whose other inputs are small initializers,
   graph inputs or host values: the "shape subgraph" (the old logits Shape -> Concat);
3. a value made on the GPU that feeds a kernel input read on the host (CPU_INPUTS, e.g. Slice's
   starts) needs a MemcpyToHost node, and a value made on the CPU that feeds a device input
   needs a MemcpyFromHost node (the old logits_to_keep -> Neg -> Slice).

The jaonnx static decoder graph must come out clean: `problems(model) == []`. The rules follow
ORT 1.31's sources; a real GPU run (benchmarks/gpu_check.sh) is the final word.
"""

from __future__ import annotations

from typing import Any

MS = "com.microsoft"
# (domain, op) with a CUDA kernel in ONNX Runtime (docs/OperatorKernels.md, CUDAExecutionProvider).
CUDA_KERNELS = {
    *(("", op) for op in (
        "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Gelu", "Erf", "Tanh", "Sqrt", "Pow", "Exp", "Cast",
        "MatMul", "Gemm", "Gather", "GatherElements", "Transpose", "Slice", "Reshape", "Shape", "Size",
        "Concat", "Unsqueeze", "Squeeze", "Expand", "Where", "Equal", "Less", "Greater", "Softmax",
        "LayerNormalization", "ReduceMean", "ReduceSum", "Range", "ConstantOfShape", "Identity", "Split",
        "Tile", "Trilu", "CumSum", "ArgMax", "TopK",
    )),
    *((MS, op) for op in (
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "Gelu",
        "GroupQueryAttention", "MultiHeadAttention", "Attention", "MatMulNBits", "FusedMatMul",
        "RotaryEmbedding", "SimplifiedLayerNormalization",
    )),
}
# (domain, op) -> inputs the CUDA kernel reads from host memory (ORT kernel defs, InputMemoryType).
CPU_INPUTS = {
    ("", "Slice"): {1, 2, 3, 4}, ("", "Reshape"): {1}, ("", "Expand"): {1}, ("", "Tile"): {1},
    ("", "Unsqueeze"): {1}, ("", "Squeeze"): {1}, ("", "Split"): {1}, ("", "Range"): {0, 1, 2},
    ("", "ConstantOfShape"): {0}, ("", "TopK"): {1}, ("", "ReduceMean"): {1}, ("", "ReduceSum"): {1},
    ("", "Trilu"): {1}, ("", "CumSum"): {1},
    (MS, "GroupQueryAttention"): {6},  # total_sequence_length
}
CPU_OUTPUTS = {("", "Shape"): {0}, ("", "Size"): {0}}  # kernels that write their output to host memory
SMALL_INITIALIZER = 100  # elements (fallback_cpu_capability.cc: kSmallInitializerThreshold)


def _key(node: Any) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def cpu_nodes(model: Any) -> dict[str, str]:
    """node name -> why ORT would run it on the CPU (rules 1 and 2 of the module docstring)."""
    graph = model.graph
    small = {t.name for t in graph.initializer if _count(t.dims) <= SMALL_INITIALIZER}
    inputs = {i.name for i in graph.input}
    out: dict[str, str] = {}
    host: set[str] = set()  # values that live in host memory
    for node in graph.node:  # ONNX graphs are topologically sorted
        key = _key(node)
        name = node.name or node.output[0]
        if key not in CUDA_KERNELS:
            out[name] = f"{key[1]} has no CUDA kernel"
            host.update(o for o in node.output if o)
            continue
        host.update(node.output[i] for i in CPU_OUTPUTS.get(key, ()) if i < len(node.output))
        values = [v for v in node.input if v]
        if key in CPU_OUTPUTS or not any(v in host for v in values):
            continue
        reads_host = CPU_INPUTS.get(key, set())
        if all(v in small or v in inputs or (v in host and i not in reads_host) for i, v in enumerate(node.input) if v):
            out[name] = f"{key[1]} computes on host values (a shape subgraph)"
            host.update(o for o in node.output if o)
    return out


def copies(model: Any) -> list[str]:
    """The Memcpy nodes ORT would insert (rule 3), as 'value: direction (consumer)'."""
    graph = model.graph
    on_cpu = cpu_nodes(model)
    inits = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    made_on_host: set[str] = set()
    made_on_device: set[str] = set()
    for node in graph.node:
        key = _key(node)
        host_outputs = CPU_OUTPUTS.get(key, set())
        for i, value in enumerate(node.output):
            if not value:
                continue
            ((made_on_host if (node.name or node.output[0]) in on_cpu or i in host_outputs else made_on_device)
             .add(value))
    found = []
    for node in graph.node:
        name = node.name or node.output[0]
        reads_host = set(range(len(node.input))) if name in on_cpu else CPU_INPUTS.get(_key(node), set())
        for i, value in enumerate(node.input):
            if not value or value in inits or value in inputs:
                continue  # initializers and feeds are placed where they are consumed
            if i in reads_host and value in made_on_device:
                found.append(f"{value}: MemcpyToHost (into {node.op_type} {name} input {i})")
            elif i not in reads_host and value in made_on_host:
                found.append(f"{value}: MemcpyFromHost (into {node.op_type} {name} input {i})")
    return found


def problems(model: Any) -> list[str]:
    """Everything that would stop ORT from capturing `model` as one CUDA graph; [] when clean."""
    return [f"{name}: {why}" for name, why in cpu_nodes(model).items()] + copies(model)


def _count(dims: Any) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total
