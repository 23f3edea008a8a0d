"""Carry a large artifact's graph without its weights: the graph proto (weights as external
references), plus the exact bytes of integer tensors (shapes, positions, masks). `fill`
recreates the data file with random weights of the same dtypes and shapes, for timing only.

    python skeleton.py make ARTIFACT_DIR OUT_DIR     # here
    python skeleton.py fill OUT_DIR                  # on the timing machine (numpy only)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

RANDOM = {1: np.float32, 10: np.float16, 3: np.int8, 2: np.uint8}  # onnx elem types filled at random
NUMPY = {1: np.float32, 10: np.float16, 3: np.int8, 2: np.uint8, 7: np.int64, 6: np.int32, 9: np.bool_, 11: np.float64}


def make(artifact: Path, out: Path) -> None:
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    for f in artifact.iterdir():
        if f.suffix == ".onnx":
            model = onnx.load(str(f))
            data = f.name + ".data"
            onnx.save_model(model, str(out / f.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
            layout, exact = [], {}
            for t in onnx.load(str(out / f.name), load_external_data=False).graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                entry = {"name": t.name, "type": t.data_type, "offset": int(info.get("offset", 0)),
                         "length": int(info["length"])}
                layout.append(entry)
                if t.data_type not in RANDOM:
                    raw = (out / data).read_bytes()[entry["offset"]: entry["offset"] + entry["length"]]
                    exact[t.name] = np.frombuffer(raw, dtype=np.uint8)
            (out / data).unlink()
            (out / (f.name + ".layout.json")).write_text(json.dumps(layout))
            np.savez_compressed(out / (f.name + ".exact.npz"), **exact)
        elif f.name.endswith(".json") or f.suffix == ".model":
            shutil.copy(f, out / f.name)


def fill(out: Path) -> None:
    rng = np.random.default_rng(0)
    for layout_file in out.glob("*.onnx.layout.json"):
        name = layout_file.name[: -len(".layout.json")]
        layout = json.loads(layout_file.read_text())
        exact = np.load(out / (name + ".exact.npz"))
        size = max((e["offset"] + e["length"] for e in layout), default=0)
        buf = np.zeros(size, dtype=np.uint8)
        for e in layout:
            if e["name"] in exact.files:
                raw = exact[e["name"]]
            else:
                dtype = RANDOM[e["type"]]
                n = e["length"] // np.dtype(dtype).itemsize
                if np.issubdtype(dtype, np.floating):
                    raw = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtype).view(np.uint8)
                else:
                    raw = rng.integers(0, 256, n, dtype=np.uint8) if dtype == np.uint8 else \
                        rng.integers(-63, 64, n, dtype=np.int8).view(np.uint8)
            buf[e["offset"]: e["offset"] + e["length"]] = raw
        buf.tofile(out / (name + ".data"))


if __name__ == "__main__":
    {"make": lambda: make(Path(sys.argv[2]), Path(sys.argv[3])), "fill": lambda: fill(Path(sys.argv[2]))}[sys.argv[1]]()
