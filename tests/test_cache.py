"""Kernel source cache: content-addressed, atomic, verified on load, user-only, degrades to memory."""
import os
import stat

import pytest

from attnforge import codegen
from attnforge.runtime import kernels


@pytest.fixture
def cache(tmp_path):
    kernels.set_cache_dir(tmp_path)
    kernels._sources.clear()
    kernels._handles.clear()
    yield tmp_path
    kernels._sources.clear()
    kernels._handles.clear()


def _source():
    return codegen.render_attention(codegen.KernelSpec(causal=True)).source


def test_entry_is_written_verified_and_user_only(cache):
    key = kernels.register_source(_source())
    path = cache / "sources" / f"{key}.py"
    assert path.read_text() == _source()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((cache / "sources").stat().st_mode) == 0o700
    kernels._sources.clear()                      # a new process: only the disk knows it
    assert kernels.get_source(key) == _source()


def test_corrupted_entry_is_discarded_then_rebuilt(cache):
    key = kernels.register_source(_source())
    path = cache / "sources" / f"{key}.py"
    path.write_text(_source()[:100])              # truncated
    kernels._sources.clear()
    with pytest.warns(RuntimeWarning, match="does not match its key"):
        assert kernels.get_source(key) is None
    assert not path.exists()
    with pytest.raises(kernels.KernelUnavailable, match="compile the model again"):
        kernels.load_kernel(key, __import__("torch").device("cpu"))
    assert kernels.register_source(_source()) == key   # rendering again rebuilds the entry
    assert path.read_text() == _source()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_cache_degrades_to_memory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    kernels.set_cache_dir(ro / "cache")
    with pytest.warns(RuntimeWarning, match="memory only"):
        key = kernels.register_source(_source())
    assert kernels.get_source(key) == _source()


def test_unwritable_cache_path_degrades_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    kernels.set_cache_dir(blocker / "cache")      # a path under a regular file can never be created
    kernels._sources.clear()
    with pytest.warns(RuntimeWarning, match="memory only"):
        key = kernels.register_source(_source())
    assert kernels.get_source(key) == _source()


def _register_in_child(cache_dir, source, start):
    kernels.set_cache_dir(cache_dir)
    start.wait()
    return kernels.register_source(source)


def test_processes_compiling_one_kernel_at_once_leave_one_valid_entry(tmp_path):
    """Several processes register the same kernel into one cache at the same moment, while its entry is
    corrupted: one whole, verified file remains, no temporary files, every process gets the same key."""
    import multiprocessing as mp

    source = _source()
    key = kernels.source_key(source)
    (tmp_path / "sources").mkdir(mode=0o700)
    (tmp_path / "sources" / f"{key}.py").write_text(source[:-50])     # a torn entry from an earlier crash
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(4) as pool:
            pending = [pool.apply_async(_register_in_child, (tmp_path, source, start)) for _ in range(8)]
            start.set()
            keys = {r.get(timeout=120) for r in pending}
    assert keys == {key}
    entries = sorted(p.name for p in (tmp_path / "sources").iterdir() if not p.name.endswith(".lock"))
    assert entries == [f"{key}.py"]
    assert (tmp_path / "sources" / f"{key}.py").read_text() == source


def test_key_depends_on_source_only():
    a = codegen.render_attention(codegen.KernelSpec(causal=True)).source
    b = codegen.render_attention(codegen.KernelSpec(causal=False)).source
    assert kernels.source_key(a) == kernels.source_key(a) != kernels.source_key(b)
