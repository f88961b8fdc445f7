"""Golden tests: the emitted Triton source changes only on purpose (python tests/golden/regen.py)."""
import importlib.util
from pathlib import Path

import pytest

from attnforge.codegen import KernelSpec, render_attention, render_decode, render_linear

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("regen", GOLDEN / "regen.py")
regen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regen)


@pytest.mark.parametrize("spec", regen.SPECS, ids=lambda s: s.name)
def test_source_matches_golden(spec):
    expected = (GOLDEN / f"{spec.name}.py.txt").read_text()
    assert render_attention(spec).source == expected, "emitted kernel changed: run tests/golden/regen.py"


def test_decode_source_matches_golden():
    expected = (GOLDEN / "attnforge_decode_splitkv.py.txt").read_text()
    assert render_decode().source == expected, "emitted kernel changed: run tests/golden/regen.py"


def test_decode_quant_source_matches_golden():
    from attnforge.codegen import render_decode_quant

    expected = (GOLDEN / "attnforge_decode_quant.py.txt").read_text()
    assert render_decode_quant().source == expected, "emitted kernel changed: run tests/golden/regen.py"


def test_linear_source_matches_golden():
    expected = (GOLDEN / "attnforge_linear_hybrid.py.txt").read_text()
    assert render_linear().source == expected, "emitted kernel changed: run tests/golden/regen.py"


def test_source_is_valid_python_with_kernel_and_launcher():
    src = render_attention(KernelSpec(causal=True, mask="additive")).source
    ns = {}
    exec(compile(src, "<kernel>", "exec"), ns)
    assert callable(ns[ns["KERNEL"]]) and callable(ns["launch"])


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="mask style"):
        KernelSpec(mask="sliding")
