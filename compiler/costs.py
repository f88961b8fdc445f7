"""Analytic cost of a plan on a GPU, from the same block metadata the plan kernel runs on.

Per site and length n (square prefill, bf16/fp16 elements unless told otherwise):
    flops           useful work: 4 * head_dim per kept (query, key) pair and query head
    executed_flops  what the kernel computes: every visited BLOCK_M x BLOCK_N tile in full (masked
                    elements included), from attnforge.runtime.blockmeta
    bytes           HBM traffic: each query head's program reads the K and V tiles it visits, plus Q in
                    and O out once
    estimated_ms    roofline: max(executed_flops / peak FLOP/s, bytes / peak bandwidth)
Datasheet peaks (not measurements) stand in for a device until the benchmark measures it; every figure
made here is labelled "estimated". Measured latencies come from benchmarks/kernels.py on a GPU.
"""
from __future__ import annotations

from attnforge.runtime.blockmeta import block_meta
from attnforge.runtime.forms import Dense, Linear, SinkWindow, forms_to_json, kept_pairs

__all__ = ["DEVICES", "site_cost", "plan_cost"]

DEVICES = {  # dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s), vendor datasheets
    "H100-SXM": {"tflops": 989.0, "tbs": 3.35},
    "H200-SXM": {"tflops": 989.0, "tbs": 4.8},
}
TILE = 64


def site_cost(forms, num_heads: int, head_dim: int, n: int, *, dtype_bytes: int = 2,
              device: str = "H100-SXM") -> dict:
    group = num_heads // len(forms)
    meta = block_meta(forms_to_json(forms), group, n, n, TILE, TILE, "cpu")
    visited = meta.visited_blocks                                    # summed over groups and query blocks
    flops = sum(kept_pairs(f, n, head_dim) for f in forms) * group * 4 * head_dim
    # linear forms: their exact part's tiles (in `visited`) plus the band and state work, in pair-equivalents
    linear_extra = sum(kept_pairs(f, n, head_dim) - kept_pairs(SinkWindow(f.sink, f.window), n)
                       for f in forms if isinstance(f, Linear))
    executed = visited * group * TILE * TILE * 4 * head_dim + linear_extra * group * 4 * head_dim
    bytes_ = visited * group * TILE * 2 * head_dim * dtype_bytes + num_heads * n * 2 * head_dim * dtype_bytes
    peak = DEVICES[device]
    ms = max(executed / (peak["tflops"] * 1e12), bytes_ / (peak["tbs"] * 1e12)) * 1e3
    return {"flops": float(flops), "executed_flops": float(executed), "bytes": float(bytes_), "estimated_ms": ms}


def plan_cost(sites: list[dict], forms_per_site: list[tuple] | None, n: int, *, device: str = "H100-SXM") -> dict:
    """Totals over sites (dicts with num_heads, num_kv_heads, head_dim); forms None: all dense."""
    total = {"flops": 0.0, "executed_flops": 0.0, "bytes": 0.0, "estimated_ms": 0.0}
    for i, s in enumerate(sites):
        forms = forms_per_site[i] if forms_per_site is not None else (Dense(),) * s["num_kv_heads"]
        for key, value in site_cost(forms, s["num_heads"], s["head_dim"], n, device=device).items():
            total[key] += value
    total["device"] = f"{device} (datasheet peaks, roofline estimate)"
    return total
