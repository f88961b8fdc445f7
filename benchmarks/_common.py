"""What the GPU benchmarks share: results written as they come, a failed row recorded instead of ending
the run, and Dynamo allowed to compile FlexAttention once per shape.

A benchmark run on a borrowed GPU may be cut off at its time limit; every finished row is already on
disk then (the JSON file is rewritten, atomically, after each row), and a row whose check or timing
fails is kept with its error so that one bad shape does not cost the others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

# This folder holds kernels.py, which is also the name of Hugging Face's `kernels` package (a dependency of
# transformers 5), and transformers imports it: with the folder first on the import path (as it is for any
# script run from it) transformers got the benchmark instead ("cannot import name 'CUDAProperties' from
# 'kernels'"). Every script imports _common first and nothing else from here, so the folder leaves the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every GPU benchmark takes: --json (results file), --dtype, --device (cpu: a smoke test)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: smoke-test this script through Triton's interpreter (tiny shapes; no figures)")
    return ap


class Results:
    """`header` (device, versions, ...) plus `rows`, saved to `path` (if any) after every change."""

    def __init__(self, path: str | None, **header):
        self.path = path
        self.data = {**header, "rows": [], "errors": []}
        self.save()

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value
        self.save()

    def add(self, row: dict, key: str = "rows") -> dict:
        self.data.setdefault(key, []).append(row)
        self.save()
        return row

    def error(self, where: dict, exc: BaseException) -> None:
        """Record a failed row (and print it) and carry on with the next."""
        text = f"{type(exc).__name__}: {exc}"
        print(f"FAILED {where}: {text}", flush=True)
        traceback.print_exc()
        self.add({**where, "error": text}, key="errors")

    def save(self) -> None:
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def allow_recompiles(limit: int = 64) -> None:
    """FlexAttention compiled with dynamic=False recompiles for each shape; Dynamo's default limit (8)
    would silently drop later shapes to the uncompiled path, which materializes the scores."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, limit)


class Device:
    """Where a benchmark runs. "cuda" gives every figure we report; "cpu" (Triton's interpreter, tiny
    shapes) only smoke-tests the script itself, so that a GPU lease is not spent finding a typo: its
    times mean nothing and it does not print ratios as results."""

    def __init__(self, kind: str):
        import torch

        self.kind = kind
        self.torch = torch
        self.cuda = kind == "cuda"

    def require(self, script: str) -> None:
        import sys

        if self.cuda and not self.torch.cuda.is_available():
            sys.exit(f"{script} needs a CUDA GPU; no speed is measured on the CPU (--device cpu smoke-tests the script)")
        if not self.cuda:
            from attnforge.runtime import kernels

            if not kernels.interpreter_enabled():
                sys.exit(f"{script} --device cpu runs Triton's interpreter: start it with TRITON_INTERPRET=1")

    def name(self) -> str:
        return self.torch.cuda.get_device_name() if self.cuda else "cpu (smoke test: times mean nothing)"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def bench(self, fn, warmup: int = 25, rep: int = 100) -> float:
        """Milliseconds per call: triton.testing.do_bench on CUDA (warm-up and repetitions in ms, median);
        on the CPU one untimed and one timed call."""
        if self.cuda:
            import triton

            return triton.testing.do_bench(fn, warmup=warmup, rep=rep)
        import time

        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def empty_cache(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()

    def flex(self):
        """FlexAttention as it is benchmarked: compiled (static shapes) on CUDA; eager on the CPU smoke run."""
        from torch.nn.attention.flex_attention import flex_attention

        if not self.cuda:
            return flex_attention
        allow_recompiles()
        return self.torch.compile(flex_attention, dynamic=False)

    def block_mask(self, mask_mod, b, h, n, s):
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, b, h, n, s, device=self.kind, _compile=self.cuda)
