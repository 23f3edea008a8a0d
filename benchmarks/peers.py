"""Peer engines, each in its own venv under benchmarks/.venv-<peer>/ (gitignored).

Why own venvs: Optimum and optimum-intel pin transformers < 4.58, CTranslate2's converter follows
them, and onnxruntime-genai ships its own ONNX Runtime. The torch-based peers reuse the running
interpreter's torch through a `.pth` line (a CPU torch wheel is large; PyPI's default is CUDA), and
install their own transformers on top, which shadows the base one inside that venv only.

`python -m benchmarks.peers [PEER ...]` creates the venvs ahead of a run (minutes, network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENVS = Path(os.environ.get("JAONNX_BENCH_VENVS", ROOT))  # where .venv-<peer>/ live (--venvs)


@dataclass(frozen=True)
class Peer:
    key: str
    label: str
    packages: tuple[str, ...]
    share_torch: bool  # see the module docstring
    module: str  # imported once to check the venv works
    build_env: tuple[tuple[str, str], ...] = ()  # extra environment for pip (source builds)
    pip_args: tuple[str, ...] = ()


PEERS = {
    "optimum": Peer("optimum", "Optimum ORTModel", ("optimum-onnx[onnxruntime]", "transformers<4.58", "sentencepiece"),
                    True, "optimum.onnxruntime"),
    "openvino": Peer("openvino", "optimum-intel OpenVINO", ("optimum-intel[openvino]", "transformers<4.58", "sentencepiece"),
                     True, "optimum.intel"),
    "ctranslate2": Peer("ctranslate2", "CTranslate2", ("ctranslate2", "transformers<4.58", "sentencepiece"),
                        True, "ctranslate2"),
    "genai": Peer("genai", "onnxruntime-genai", ("onnxruntime-genai", "numpy", "onnx"), False, "onnxruntime_genai"),
    # llama.cpp: built from source with this machine's native flags (AVX-512/VNNI), as its users would
    # build it; nice'd and at most 2 compile jobs because the machine is shared. `gguf` writes the
    # GGUF files (benchmarks/gguf_writer.py) from the same random-weight checkpoints.
    "llamacpp": Peer("llamacpp", "llama.cpp (llama-cpp-python)",
                     ("llama-cpp-python", "gguf", "numpy", "safetensors", "sentencepiece", "protobuf"), False,
                     "llama_cpp",
                     build_env=(("CMAKE_ARGS", "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF"),
                                ("CMAKE_BUILD_PARALLEL_LEVEL", "2"), ("MAKEFLAGS", "-j2")),
                     pip_args=("--no-binary", "llama-cpp-python", "--no-cache-dir")),
}


def venv_dir(key: str) -> Path:
    return VENVS / f".venv-{key}"


def python_of(key: str) -> Path:
    return venv_dir(key) / "bin" / "python"


def ensure(key: str, log=print) -> tuple[str | None, str | None]:
    """(python path, None) when the peer's venv works, else (None, why): failures are recorded, not hidden."""
    peer = PEERS[key]
    python = python_of(key)
    ok_marker = venv_dir(key) / ".jaonnx-ok"
    if ok_marker.is_file() and python.is_file():
        return str(python), None
    try:
        if not python.is_file():
            log(f"creating {venv_dir(key)} ({', '.join(peer.packages)})")
            subprocess.run([sys.executable, "-m", "venv", str(venv_dir(key))], check=True, timeout=300,
                           capture_output=True)
        if peer.share_torch:
            purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip()
            Path(purelib, "_jaonnx_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        env = {**os.environ, **dict(peer.build_env)}
        nice = ["nice", "-n", "15"] if peer.build_env else []
        proc = subprocess.run([*nice, str(python), "-m", "pip", "install", "-q", *peer.pip_args, *peer.packages],
                              capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode != 0:
            return None, f"pip install {' '.join(peer.packages)} failed: {_tail(proc.stderr)}"
        proc = subprocess.run([str(python), "-c", f"import {peer.module}"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return None, f"import {peer.module} failed in its venv: {_tail(proc.stderr)}"
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not create its venv: {exc.__class__.__name__}: {exc}"
    ok_marker.write_text("ok\n")
    return str(python), None


def _tail(text: str) -> str:
    return " | ".join(text.strip().splitlines()[-3:])[:400]


if __name__ == "__main__":
    for name in sys.argv[1:] or list(PEERS):
        path, why = ensure(name)
        print(f"{name}: {path or 'FAILED: ' + str(why)}", flush=True)
