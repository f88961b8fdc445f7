"""Launch-config tuning: the fastest config is kept in memory and on disk, failing configs are skipped,
a broken cache file is rebuilt. Timings are injected (the real ones need a GPU); the logic is the real one."""
import json
import types

import pytest

from attnforge.runtime import autotune, kernels


@pytest.fixture
def module():
    autotune.clear()
    yield types.SimpleNamespace(CONFIGS=[(4, 3), (8, 2), (4, 2), (16, 1)])
    autotune.clear()


def _bench(times, calls):
    def bench(fn):
        fn()
        return times[calls[-1]]
    return bench


def test_fastest_config_is_kept_and_failing_ones_skipped(module, tmp_path):
    kernels.set_cache_dir(tmp_path)
    calls = []

    def run(config):
        calls.append(tuple(config))
        if config == (16, 1):
            raise RuntimeError("out of resources: shared memory")

    times = {(4, 3): 0.9, (8, 2): 0.5, (4, 2): 0.7}
    with pytest.warns(RuntimeWarning, match="skipped config \\(16, 1\\)"):
        best = autotune.tuned_config(module, "k1", "H100", 64, "torch.bfloat16", run, _bench(times, calls))
    assert best == (8, 2)
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data["H100|k1|d64|bfloat16"]["config"] == [8, 2] and len(data["H100|k1|d64|bfloat16"]["ms"]) == 3
    calls.clear()
    assert autotune.tuned_config(module, "k1", "H100", 64, "torch.bfloat16", run, _bench(times, calls)) == (8, 2)
    assert calls == []                                             # remembered: nothing timed again
    autotune.clear()                                               # a new process reads the file
    assert autotune.tuned_config(module, "k1", "H100", 64, "torch.bfloat16", run, _bench(times, calls)) == (8, 2)
    assert calls == []
    # another head dim is tuned separately
    autotune.tuned_config(module, "k1", "H100", 128, "torch.bfloat16", lambda c: calls.append(tuple(c)),
                          _bench({**times, (16, 1): 0.1}, calls))
    assert json.loads((tmp_path / "autotune.json").read_text())["H100|k1|d128|bfloat16"]["config"] == [16, 1]


def test_broken_cache_file_is_rebuilt(module, tmp_path):
    kernels.set_cache_dir(tmp_path)
    (tmp_path / "autotune.json").write_text("{not json")
    calls = []
    with pytest.warns(RuntimeWarning, match="unreadable"):
        best = autotune.tuned_config(module, "k2", "H200", 64, "torch.float16", lambda c: calls.append(tuple(c)),
                                     _bench({(4, 3): 0.2, (8, 2): 0.5, (4, 2): 0.7, (16, 1): 0.3}, calls))
    assert best == (4, 3)
    assert json.loads((tmp_path / "autotune.json").read_text())["H200|k2|d64|float16"]["config"] == [4, 3]


def test_nothing_runs_is_an_error(module, tmp_path):
    kernels.set_cache_dir(tmp_path)

    def run(config):
        raise RuntimeError("no")

    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no launch configuration"):
        autotune.tuned_config(module, "k3", "H100", 64, "torch.float16", run, lambda fn: fn() or 1.0)


def test_tuning_can_be_switched_off(monkeypatch):
    """ATTNFORGE_AUTOTUNE=0: the default config runs, nothing is timed (the GPU test run uses it)."""
    import os
    import subprocess
    import sys

    from attnforge.runtime import ops

    monkeypatch.setattr(autotune, "ENABLED", False)
    loaded = types.SimpleNamespace(interpreted=False, module=types.SimpleNamespace(CONFIGS=[(4, 3), (8, 2)]))
    q = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    assert ops._config(loaded, "k", q, None, lambda c: pytest.fail("a config was launched for timing")) is None
    read = "from attnforge.runtime import autotune; print(autotune.ENABLED)"
    for value, want in (("0", "False"), ("off", "False"), ("1", "True")):
        proc = subprocess.run([sys.executable, "-c", read], env={**os.environ, "ATTNFORGE_AUTOTUNE": value},
                              capture_output=True, text=True, timeout=120, check=True)
        assert proc.stdout.strip() == want


def test_each_length_bucket_and_plan_is_tuned_on_its_own(module, tmp_path):
    """shape_key (the op passes a power-of-two length bucket, and the forms for the plan kernel): a window plan
    at 32k and a dense-heavy one at 4k may want different tiles, so neither inherits the other's choice."""
    from attnforge.runtime import ops

    kernels.set_cache_dir(tmp_path)
    calls = []
    fast = {"n4k": (8, 2), "n64k": (4, 2)}
    for bucket, best in fast.items():
        times = {c: 0.1 if c == best else 1.0 for c in module.CONFIGS}
        got = autotune.tuned_config(module, "k4", "H100", 64, "torch.bfloat16", lambda c: calls.append(tuple(c)),
                                    _bench(times, calls), shape_key=f"{bucket}|forms-abc")
        assert got == best
    assert len(calls) == 2 * len(module.CONFIGS)
    assert autotune.chosen() == {"H100|k4|d64|bfloat16|n4k|forms-abc": (8, 2),
                                 "H100|k4|d64|bfloat16|n64k|forms-abc": (4, 2)}
    assert [ops._length_bucket(n) for n in (1, 1024, 1025, 4096, 5003, 16384, 32768)] == \
        ["n1k", "n1k", "n4k", "n4k", "n16k", "n16k", "n64k"]
