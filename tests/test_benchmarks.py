"""The GPU benchmark scripts, smoke-tested on the CPU (Triton's interpreter, tiny shapes): every script
runs end to end, checks its kernels against references before timing, and writes its JSON rows, so a GPU
lease is never spent finding a broken script. No time measured here means anything; nothing is asserted
about speed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnforge.runtime import kernels

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def _run(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "ATTNFORGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--device", "cpu",
                           "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == [], data["errors"]
    return data


def test_kernels_benchmark(tmp_path):
    data = _run("kernels", tmp_path, "--dtype", "float16", "--shapes", "4x2x200x32", "--new-lengths", "130",
                "--backward")
    rows = {r["plan"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "window", "mixed"}
    assert all(r["attnforge_train_ms"] > 0 and r["sdpa_causal_train_ms"] > 0 for r in rows.values())
    assert rows["dense"]["kernel"] == "dense" and rows["mixed"]["kernel"] == "plan"
    assert rows["mixed"]["kept_fraction"] == pytest.approx(1.0)          # every window covers N = 200 here
    assert [r["n"] for r in data["new_lengths"]] == [130]


def test_padded_benchmark(tmp_path):
    data = _run("padded", tmp_path, "--dtype", "float16", "--shapes", "4x2x130x16", "--batch", "3")
    rows = {(r["layout"], r["plan"]): r for r in data["rows"]}
    assert set(rows) == {(lay, plan) for lay in ("padded", "packed") for plan in ("dense", "mixed")}, data["errors"]
    assert rows["padded", "dense"]["lengths"] == [32, 81, 130]
    assert rows["packed", "dense"]["lengths"] == [65, 32, 16, 17, 32, 16, 17, 65, 16, 17, 65, 32]
    assert all(r["ideal_speedup"] > 1 for r in rows.values())


def test_dense_benchmark(tmp_path):
    data = _run("dense", tmp_path, "--dtype", "float16", "--shapes", "4x2x200x32")
    assert [(r["heads"], r["n"]) for r in data["rows"]] == [(4, 200)]


def test_decode_benchmark(tmp_path):
    data = _run("decode", tmp_path, "--shapes", "tiny", "--contexts", "300", "--steps", "2", "--dtype", "float32",
                "--continuation", "20")
    assert {k["kernel"] for k in data["kernel"]} == {"dense", "quant4", "quant2"}
    assert all(k["max_error_vs_float64"] < 1e-5 for k in data["kernel"])
    (row,) = data["rows"]
    assert row["dense_first_step_logits_max_diff_vs_hf"] < 1e-4            # all-dense cache = HF's cache
    assert all(row[f"{c}_decode_kernel_calls"] == 2 * 3 for c in ("dense", "kv50", "kivi4", "kivi2"))  # layers x steps
    assert row["kv50_cache_bytes"] < row["dense_cache_bytes"]
    assert row["dense_continue_logits_max_diff_vs_hf"] < 1e-4             # a 20-token continuation, as HF's
    assert row["kv50_continue_tokens_per_s"] > 0 and 0 <= row["kv50_continue_logits_max_diff_vs_hf"] < 1


def test_linear_kernel_benchmark(tmp_path):
    data = _run("linear_kernel", tmp_path, "--dtype", "float16", "--shapes", "2x1x16", "--lengths", "100",
                "--backward")
    (row,) = data["rows"]
    assert row["n"] == 100 and row["window"] == 64
    assert row["hedgehog_train_ms"] > 0 and row["sdpa_train_ms"] > 0     # the training row ran (and was checked)


def test_linear_backward_benchmark(tmp_path):
    data = _run("linear_backward", tmp_path, "--shapes", "2x1x16", "--lengths", "100", "--maps", "taylor2")
    (row,) = data["rows"]
    assert row["n"] == 100 and all(row[f"{v}_ms"] > 0 for v in ("sdpa", "reference", "chunked"))


def test_softcap_benchmark(tmp_path):
    data = _run("softcap", tmp_path, "--dtype", "float16", "--shapes", "4x2x130x32", "--window", "40", "--cap", "2")
    rows = {r["layer"]: r for r in data["rows"]}
    assert set(rows) == {"global", "local"} and all(r["checked_against"] == "eager" for r in rows.values())
    assert rows["local"]["window"] == 40 and all(r["attnforge_ms"] > 0 and r["flex_ms"] > 0 for r in rows.values())


def test_dynamic_benchmark(tmp_path):
    data = _run("dynamic", tmp_path, "--dtype", "float16", "--shapes", "4x2x320x32", "--budgets", "1x1")
    (row,) = data["rows"]
    assert row["checked_against"] == "sdpa" and 0 < row["kept_block_fraction"] < 1
    assert row["attnforge_ms"] > 0 and row["attnforge_kernel_ms"] > 0 and row["estimate_ms"] > 0


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
