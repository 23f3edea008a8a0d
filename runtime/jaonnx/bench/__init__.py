"""Measuring core shared by `jaonnx bench` and the benchmark suite (benchmarks/ imports it).

- timing: repeats, interleaved rounds, median and spread (`timing`);
- the machine: memory read bandwidth, a speed probe for noisy windows, peak RSS (`machine`);
- the decode floor: weight bytes read per token / bandwidth (`floor`);
- ORT's per-operator profile, summarised (`profile`);
- a bare ORT decode loop over an artifact's graph, the yardstick for per-token overhead (`bare`);
- the `jaonnx bench ART` measurement itself (`artifact`).
Only numpy and onnxruntime (psutil is used when present)."""

from .floor import weight_bytes
from .machine import Calibrator, peak_rss_mib, read_bandwidth_gbs
from .profile import summarize_profile
from .timing import Stats, interleave, ratio_stats, stats, time_calls

__all__ = ["Calibrator", "Stats", "interleave", "peak_rss_mib", "ratio_stats", "read_bandwidth_gbs", "stats",
           "summarize_profile", "time_calls", "weight_bytes"]
