"""Pick each generated kernel's launch configuration by timing it on the GPU, once, and remember it.

A kernel module lists `CONFIGS` and a `default_config`. The first launch on a CUDA device for a given
(device name, kernel source key, head dim, dtype) times every config on that call's inputs
(`triton.testing.do_bench`), skips configs that fail (too much shared memory, say), and keeps the fastest
in memory and in `<cache dir>/autotune.json` (atomic writes under a file lock, user-only permissions),
so later processes start tuned. Elsewhere (the CPU interpreter) the default config runs untimed.
A cache file that cannot be read is replaced, with a warning; tuning never changes results, only speed.
ATTNFORGE_AUTOTUNE=0 (read at import) skips tuning: every launch runs the kernel's default config (a
correctness run that should not spend minutes compiling every config).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from typing import Callable

from . import kernels

__all__ = ["tuned_config", "clear", "chosen", "ENABLED"]

ENABLED = os.environ.get("ATTNFORGE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")

_memory: dict[str, object] = {}
_lock = threading.Lock()
FILE = "autotune.json"


def clear() -> None:
    with _lock:
        _memory.clear()


def chosen() -> dict[str, tuple]:
    """Every config chosen in this process so far: key (device|kernel|head dim|dtype[|shape key]) -> config."""
    with _lock:
        return dict(_memory)


def _key(device_name: str, kernel_key: str, head_dim: int, dtype, shape_key: str = "") -> str:
    key = f"{device_name}|{kernel_key}|d{head_dim}|{str(dtype).replace('torch.', '')}"
    return f"{key}|{shape_key}" if shape_key else key


def _read(path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
        raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"attnforge: autotune cache {path} is unreadable ({e}); it will be rebuilt", RuntimeWarning,
                      stacklevel=4)
        return {}


def tuned_config(module, kernel_key: str, device_name: str, head_dim: int, dtype,
                 run: Callable[[object], None], bench: Callable[[Callable[[], None]], float] | None = None,
                 shape_key: str = ""):
    """The fastest of `module.CONFIGS` for this key (timing them now if nobody has), as a tuple.
    run(config) launches the kernel once with that config; bench(fn) returns its time in ms; shape_key:
    anything else the best config depends on (the caller's length bucket, a plan's forms)."""
    key = _key(device_name, kernel_key, head_dim, dtype, shape_key)
    with _lock:
        if key in _memory:
            return _memory[key]
    d = kernels.cache_dir()
    path = d / FILE
    stored = _read(path) if path.exists() else {}
    if key in stored:
        config = tuple(stored[key]["config"])
        with _lock:
            _memory[key] = config
        return config
    if bench is None:
        import triton

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=30)
    times = {}
    for config in module.CONFIGS:
        try:
            times[tuple(config)] = float(bench(lambda c=config: run(c)))
        except Exception as e:        # a config the device cannot run is skipped, never fatal
            times[tuple(config)] = None
            warnings.warn(f"attnforge: autotune skipped config {config} of {kernel_key}: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)
    ok = {c: t for c, t in times.items() if t is not None}
    if not ok:
        raise RuntimeError(f"no launch configuration of kernel {kernel_key} runs on {device_name}")
    best = min(ok, key=ok.get)
    with _lock:
        _memory[key] = best
    _store(d, path, key, best, ok)
    return best


def _store(d, path, key, best, times) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        with kernels._entry_lock(path):
            data = _read(path) if path.exists() else {}
            data[key] = {"config": list(best), "ms": {json.dumps(list(c)): round(t, 5) for c, t in times.items()}}
            kernels._write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:
        warnings.warn(f"attnforge: could not write the autotune cache {path} ({e}); tuned in memory only",
                      RuntimeWarning, stacklevel=3)
