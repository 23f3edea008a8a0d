"""The fill-mask floor benchmark's arithmetic, against hand-computed values (no timing)."""

from __future__ import annotations

import pytest

from benchmarks.fill_mask_floor import ratio_table
from benchmarks.gemm_floor import bert_fill_mask_flops


def test_flops_by_hand():
    # seq 2, hidden 4, 1 layer, FFN 8, vocab 10, one mask: per token 4*4*4 + 2*4*8 = 128 MACs
    f = bert_fill_mask_flops(2, hidden=4, layers=1, inter=8, vocab=10)
    assert f == {"linear": 2 * 2 * 128, "attention": 2 * 2 * 2 * 2 * 4, "head": 2 * (16 + 40)}
    # the last layer at the mask only: K, V at both tokens (2*2*32), Q, O, FFN at one (2*1*96);
    # one query against two keys in both attention products
    rows = bert_fill_mask_flops(2, hidden=4, layers=1, inter=8, vocab=10, last_layer_at_masks=True)
    assert rows == {"linear": 2 * 2 * 32 + 2 * 96, "attention": 2 * 2 * 1 * 2 * 4, "head": 2 * (16 + 40)}


def _round(ms: float, graph_ms: float, torch_ms: float) -> dict:
    peaks = {"fp32": {"median": 100.0}, "dynamic_int8": {"median": 500.0}, "integer_u8s8": {"median": 1000.0}}
    slower = {k: {"median": v["median"] / 2} for k, v in peaks.items()}  # the after-probe: busier
    return {"peaks": slower, "peaks_after": peaks, "ms": {"a-int8 seq 32": ms, "pytorch seq 32": torch_ms},
            "graph_ms": {"a-int8 seq 32": graph_ms}}


def test_ratio_table_by_hand():
    # seq 32: 5,435,817,984 linear FLOPs at 500 GFLOP/s = 10.8716 ms; 88,080,384 attention + head
    # FLOPs at 100 = 0.8808 ms; floor 11.7524 ms. The bare floor: linear at 1000 -> 6.3166 ms.
    floor, bare = 10.871635968 + 0.88080384, 5.435817984 + 0.88080384
    table = ratio_table([_round(2 * floor, floor, 8 * floor), _round(4 * floor, 3 * floor, 8 * floor)], seqs=(32,))
    row = table["a-int8 seq 32"]
    assert row["floor_ms"]["median"] == pytest.approx(floor)
    assert row["x_floor"] == pytest.approx({"median": 3.0, "min": 2.0, "max": 4.0})
    assert row["graph_x_floor"]["median"] == pytest.approx(2.0)
    assert row["x_bare"]["median"] == pytest.approx(3 * floor / bare)
    assert row["x_pytorch"] == pytest.approx({"median": 3.0, "min": 2.0, "max": 4.0})
    assert set(table["pytorch seq 32"]) == {"ms"}
