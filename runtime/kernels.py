"""Kernel cache and loading for generated Triton sources.

A generated source is a small Python module (rendered by attnforge.codegen) that defines one Triton
kernel function, undecorated, named by `KERNEL`, and a `launch(kernel, ...)` function that knows its
grid and block sizes. The runtime never imports the code generator: sources are handed to it as text
(`register_source`) or found again on disk by their key.

Keys:
    source key  = sha256(source text)[:32]            names the source; carried in the graph as a string
    handle key  = (source key, Triton version, device) the loaded kernel, jitted for CUDA or wrapped for
                                                       Triton's CPU interpreter

On disk, each source is `<cache_dir>/sources/<source key>.py`, written atomically (temporary file +
rename) with user-only permissions. A file is trusted only if its content hashes to its name; anything
else is removed and reported missing, so that the compiler renders it again. A cache directory that
cannot be written degrades to memory-only with a warning. Triton keeps its own compiled binaries.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import re
import tempfile
import threading
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KernelUnavailable", "source_key", "register_source", "get_source", "load_kernel",
    "set_cache_dir", "cache_dir", "triton_version", "interpreter_enabled",
]


class KernelUnavailable(RuntimeError):
    """A Triton kernel was asked for and cannot run; the message says why and what to do."""


_lock = threading.Lock()
_sources: dict[str, str] = {}
_handles: dict[tuple[str, str, str], "LoadedKernel"] = {}
_cache_dir: Path | None = None
_disk_ok: bool | None = None


def _default_cache_dir() -> Path:
    # Read once, here, at the edge: the one environment knob of the runtime.
    env = os.environ.get("ATTNFORGE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnforge"


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Use `path` for the on-disk kernel cache (None: the default, ~/.cache/attnforge)."""
    global _cache_dir, _disk_ok
    with _lock:
        _cache_dir = Path(path) if path is not None else None
        _disk_ok = None


def cache_dir() -> Path:
    return _cache_dir if _cache_dir is not None else _default_cache_dir()


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def _sources_dir() -> Path | None:
    """The sources folder, created with user-only permissions; None once it proved unwritable."""
    global _disk_ok
    if _disk_ok is False:
        return None
    d = cache_dir() / "sources"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(d, os.W_OK):
            raise PermissionError(f"{d} is not writable")
    except OSError as e:
        _disk_ok = False
        warnings.warn(f"attnforge: kernel cache directory {d} cannot be used ({e}); "
                      "kernels are cached in memory only. Set ATTNFORGE_CACHE_DIR to a writable folder.",
                      RuntimeWarning, stacklevel=3)
        return None
    _disk_ok = True
    return d


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)           # atomic: readers see the old file or the whole new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def _entry_lock(path: Path):
    """An exclusive lock on `path`.lock across processes (POSIX flock; a no-op where there is none), so that
    checking an entry and replacing a corrupted one is one step for every process sharing the cache."""
    try:
        import fcntl
    except ImportError:                 # not POSIX: the atomic replace alone still keeps entries whole
        yield
        return
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                    # closing releases the lock


def register_source(source: str) -> str:
    """Keep `source` in memory and on disk; return its key."""
    key = source_key(source)
    with _lock:
        _sources[key] = source
        d = _sources_dir()
        if d is not None:
            path = d / f"{key}.py"
            try:
                with _entry_lock(path):
                    if _read_verified(path, key) is None:
                        _write_atomic(path, source)
            except OSError as e:
                warnings.warn(f"attnforge: could not write kernel {path} ({e}); keeping it in memory",
                              RuntimeWarning, stacklevel=2)
    return key


def _read_verified(path: Path, key: str) -> str | None:
    """The file's text if it hashes to `key`; a corrupted file is removed and None returned."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None and source_key(text) == key:
        return text
    if path.exists():
        warnings.warn(f"attnforge: kernel cache entry {path} does not match its key and was discarded; "
                      "it will be generated again", RuntimeWarning, stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass
    return None


def get_source(key: str) -> str | None:
    """The source registered under `key`, from memory or a verified disk entry; None if unknown."""
    with _lock:
        src = _sources.get(key)
        if src is not None:
            return src
        d = _sources_dir()
        if d is None:
            return None
        path = d / f"{key}.py"
        with _entry_lock(path):
            src = _read_verified(path, key)
        if src is not None:
            _sources[key] = src
        return src


@dataclass(frozen=True)
class LoadedKernel:
    key: str
    module: types.ModuleType
    kernel: object          # a triton JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
    interpreted: bool

    def launch(self, *args, **kwargs):
        return self.module.launch(self.kernel, *args, interpreted=self.interpreted, **kwargs)


def _device_tag(device) -> str:
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm{major}{minor}"
    return "interpreter"


def _module_from_source(key: str, source: str) -> types.ModuleType:
    # Triton reads the kernel's source with `inspect`; a linecache entry (never invalidated, mtime None)
    # makes that work without a file on disk.
    filename = f"<attnforge-kernel-{key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(f"attnforge_kernel_{key}")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


_NO_INTERPRETER = ("Triton runs kernels on the CPU only through its interpreter, which must be switched on "
                   "before Triton is imported: start Python with TRITON_INTERPRET=1, or use impl='reference'")


class KernelFactory:
    """A generated kernel's source key, rendered and registered on first use by a factory that the
    compiler installs (the runtime never imports the code generator)."""

    def __init__(self):
        self._factory, self._key = None, None

    def install(self, factory) -> None:
        """`factory()` renders and registers the source and returns its key; called once, on first use."""
        self._factory, self._key = factory, None

    def key(self) -> str | None:
        if self._key is None and self._factory is not None:
            self._key = self._factory()
        return self._key


def interpreter_enabled() -> bool:
    """Whether Triton was imported in interpreter mode (TRITON_INTERPRET=1); False without Triton."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels in this environment, or None. Triton <= 3.6's
    interpreter turns 1-element arrays into Python ints with int(), which NumPy >= 2.4 refuses (every
    kernel with a loop bound computed in the kernel fails inside Triton); Triton 3.7 fixed it."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} (it calls "
                "int() on 1-element arrays, which NumPy 2.4 refuses): install 'numpy<2.4' or 'triton>=3.7'")
    return None


NO_TRITON = "Triton is not installed; install it (`pip install triton`) or use impl='reference'"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_kernel(key: str, device) -> LoadedKernel:
    """The kernel for source `key` on `device`: compiled for CUDA, or Triton's interpreter when on."""
    try:
        import triton
    except ImportError as e:
        raise KernelUnavailable(NO_TRITON) from e
    handle_key = (key, triton.__version__, _device_tag(device))
    h = _handles.get(handle_key)
    if h is not None:
        return h
    source = get_source(key)
    if source is None:
        raise KernelUnavailable(f"no kernel source with key {key} in memory or in {cache_dir()}; "
                                "compile the model again so that attnforge generates it")
    if device.type == "cpu" and not interpreter_enabled():
        raise KernelUnavailable(_NO_INTERPRETER)
    if device.type == "cpu" and (problem := interpreter_problem()):
        raise KernelUnavailable(problem + ", or use impl='reference'")
    if device.type not in ("cuda", "cpu"):
        raise KernelUnavailable(f"Triton kernels run on CUDA devices (or on the CPU through Triton's "
                                f"interpreter), not on {device.type}; use impl='reference'")
    module = _module_from_source(key, source)
    kernel = triton.jit(getattr(module, module.KERNEL))
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    h = LoadedKernel(key, module, kernel, interpreted)
    with _lock:
        _handles[handle_key] = h
    return h
