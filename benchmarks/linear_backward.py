"""Linear-hybrid groups in training: forward + backward of one KV group through attnforge's op with the
chunked backward (impl="auto": runtime.linear.linear_group_chunked inside attnforge::linear_backward), the
same op with the quadratic reference's autograd (impl="reference": what the backward was before), and SDPA
dense causal for scale, in one run.

    python benchmarks/linear_backward.py [--device cpu] [--lengths 2048 8192] [--json out.json]

Each variant runs in a fresh subprocess, so its peak memory is its own: on the CPU the peak of the
process's resident size during the step (sampled every millisecond from /proc) over its size once the
inputs exist, on a GPU torch.cuda.max_memory_allocated over the inputs. The gradients of the two attnforge paths are compared first (float32, a 512-token prefix).
Prints ms and peak MB per variant and the chunked path's ratios to the reference path. On the CPU both
attnforge paths run the reference forward (only the backward differs); on a GPU the chunked path's forward
is the Triton kernel.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

from _common import Results

VARIANTS = ("sdpa", "reference", "chunked")


def _form(fmap, window, sink, d):
    from attnforge.runtime.forms import Linear
    from attnforge.runtime.linear import FeatureMaps, register_maps

    if fmap == "taylor2":
        return Linear("taylor2", window, sink)
    g = torch.Generator().manual_seed(d)
    maps = FeatureMaps(torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), torch.eye(d), 1.0)
    return Linear("hedgehog", window, sink, register_maps(maps)[0])


def _step(variant, form, scale):
    from attnforge.runtime.forms import forms_to_json

    if variant == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    impl = "reference" if variant == "reference" else "auto"
    fj = forms_to_json((form,))
    return lambda q, k, v: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, impl, "", fj)


def _inputs(g, hk, n, d, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=gen).to(device, dtype).requires_grad_() for h in (g, hk, hk))
    return q, k, v, torch.randn(1, g, n, d, generator=gen).to(device, dtype)


class _PeakRSS:
    """The largest resident set size of this process while the block runs (CPU memory has no allocator peak)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args):
    """A single variant in this process: {"ms", "peak_mb"}."""
    import attnforge  # noqa: F401

    g, hk, d = (int(x) for x in args.shape.split("x"))
    dtype = torch.float32 if args.device == "cpu" else getattr(torch, args.dtype)
    form, scale = _form(args.fmap, args.window, args.sink, d), 1 / math.sqrt(d)
    fn = _step(args.variant, form, scale)
    warm = _inputs(g, hk, 128, d, args.device, dtype, seed=1)             # loads kernels, not timed
    torch.autograd.grad(fn(*warm[:3]), warm[:3], warm[3])
    q, k, v, grad = _inputs(g, hk, args.n, d, args.device, dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
        torch.cuda.synchronize()
        ms, peak = (time.perf_counter() - t) * 1e3, torch.cuda.max_memory_allocated() - base
    else:
        with _PeakRSS() as rss:
            t = time.perf_counter()
            torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            ms = (time.perf_counter() - t) * 1e3
        peak = rss.peak - rss.start
    print(json.dumps({"ms": ms, "peak_mb": peak / 2 ** 20}))


def check(args, g, hk, d, fmap):
    """The two attnforge paths' gradients agree on a prefix (float32)."""
    form, scale = _form(fmap, args.window, args.sink, d), 1 / math.sqrt(d)
    q, k, v, grad = _inputs(g, hk, min(512, args.lengths[0]), d, args.device, torch.float32, seed=2)
    a = torch.autograd.grad(_step("reference", form, scale)(q, k, v), (q, k, v), grad)
    b = torch.autograd.grad(_step("chunked", form, scale)(q, k, v), (q, k, v), grad)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--shapes", nargs="+", default=["3x1x64"], help="KV groups as GxHKVxD")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--maps", nargs="+", default=["taylor2", "hedgehog"])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)      # internal: one subprocess
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fmap", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return one(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/linear_backward.py: no CUDA device; --device cpu runs it on the CPU")
    import attnforge  # noqa: F401

    res = Results(args.json, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__, dtype="float32" if args.device == "cpu" else args.dtype)
    print(f"{'group':>14} {'map':>9} {'N':>6} " + " ".join(f"{v + ' ms':>13} {v + ' MB':>13}" for v in VARIANTS) +
          f" {'time ratio':>10} {'memory ratio':>12}")
    for shape in args.shapes:
        g, hk, d = (int(x) for x in shape.split("x"))
        for fmap in args.maps:
            check(args, g, hk, d, fmap)
            for n in args.lengths:
                row = {"shape": shape, "map": fmap, "n": n, "window": args.window, "sink": args.sink}
                try:
                    for variant in VARIANTS:
                        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--shape", shape,
                                              "--n", str(n), "--fmap", fmap, "--device", args.device,
                                              "--dtype", args.dtype, "--window", str(args.window),
                                              "--sink", str(args.sink)],
                                             capture_output=True, text=True, check=True)
                        got = json.loads(out.stdout.strip().splitlines()[-1])
                        row[f"{variant}_ms"], row[f"{variant}_peak_mb"] = got["ms"], got["peak_mb"]
                    row["chunked_time_vs_reference"] = row["chunked_ms"] / row["reference_ms"]
                    row["chunked_memory_vs_reference"] = row["chunked_peak_mb"] / max(row["reference_peak_mb"], 1e-9)
                    res.add(row)
                    print(f"{shape:>14} {fmap:>9} {n:>6} " +
                          " ".join(f"{row[v + '_ms']:13.1f} {row[v + '_peak_mb']:13.1f}" for v in VARIANTS) +
                          f" {row['chunked_time_vs_reference']:10.2f} {row['chunked_memory_vs_reference']:12.2f}",
                          flush=True)
                except subprocess.CalledProcessError as e:
                    res.error(row, RuntimeError(e.stderr.strip().splitlines()[-1] if e.stderr else str(e)))


if __name__ == "__main__":
    main()
