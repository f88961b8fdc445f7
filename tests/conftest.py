import os

# Triton kernels run on the CPU only through Triton's interpreter, which must be on before Triton is
# imported. The README's test command sets it; this default covers a bare `pytest`.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import attnforge  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory):
    """Fresh Dynamo caches and op counters for every test; kernels cached in a per-session folder."""
    from attnforge.runtime import kernels, reset_counters

    torch._dynamo.reset()
    reset_counters()
    kernels.set_cache_dir(tmp_path_factory.getbasetemp() / "kernel-cache")
    yield
    torch._dynamo.reset()


def fp64_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item()


def assert_closer(ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor, slack: float = 4.0,
                  floor: float = 1e-6):
    """Our result must be about as close to the float64 reference as PyTorch's own (thunder style)."""
    e_ours, e_theirs = fp64_error(ours, ref64), fp64_error(theirs, ref64)
    assert e_ours <= slack * e_theirs + floor, f"error vs fp64: ours {e_ours:.3g}, torch {e_theirs:.3g}"
