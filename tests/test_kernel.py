"""The generated Triton kernel under TRITON_INTERPRET=1 against the float64 reference."""
import pytest
import torch

from attnforge import codegen, runtime
from attnforge.runtime import attention_reference, kernels
from conftest import assert_closer

pytestmark = pytest.mark.skipif(not kernels.interpreter_enabled(),
                                reason="needs Triton with TRITON_INTERPRET=1 set before import")


def _key(causal=False, mask=None, window=False):
    spec = codegen.KernelSpec(causal=causal, mask=mask, window=window)
    return kernels.register_source(codegen.render_attention(spec).source)


def _qkv(h, hk, n, d, s=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = n if s is None else s
    return (torch.randn(1, h, n, d, generator=g).to(dtype), torch.randn(1, hk, s, d, generator=g).to(dtype),
            torch.randn(1, hk, s, d, generator=g).to(dtype))


def _check(q, k, v, mask, causal, scale, key, window=0):
    before = runtime.counters["triton_interpreter"]
    out = torch.ops.attnforge.attention(q, k, v, mask, causal, window, scale, "triton", key)
    assert runtime.counters["triton_interpreter"] == before + 1, "the Triton kernel did not run"
    m64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    ref64 = attention_reference(q.double(), k.double(), v.double(), m64, causal, scale, window)
    eager = attention_reference(q, k, v, mask, causal, scale, window)  # PyTorch in the input precision
    assert out.dtype == q.dtype and out.shape == ref64.shape
    return out, eager, ref64


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 17, 64, 130])
@pytest.mark.parametrize("h,hk", [(9, 3), (8, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_fp64(causal, h, hk, n, d):
    q, k, v = _qkv(h, hk, n, d)
    out, _eager, ref64 = _check(q, k, v, None, causal, d ** -0.5, _key(causal))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert_closer(out, sdpa, ref64)


@pytest.mark.parametrize("d", [16, 40, 256])
def test_other_head_dims(d):
    q, k, v = _qkv(2, 1, 33, d)
    out, eager, ref64 = _check(q, k, v, None, True, 0.1, _key(True))
    assert_closer(out, eager, ref64)


def test_query_and_key_lengths_differ():
    q, k, v = _qkv(4, 2, 20, 32, s=75)
    for causal in (False, True):
        out, eager, ref64 = _check(q, k, v, None, causal, 0.2, _key(causal))
        assert_closer(out, eager, ref64)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_with_broadcast_and_fully_masked_rows(kind):
    q, k, v = _qkv(6, 2, 70, 32)
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(1, 1, 70, 70, generator=g) > 0.5
        mask[:, :, 5] = False                                   # a row that sees nothing
    else:
        mask = torch.randn(70, 70, generator=g)
        mask[7] = float("-inf")
    out, eager, ref64 = _check(q, k, v, mask, False, 0.2, _key(False, kind))
    assert torch.isfinite(out).all()
    dead = 5 if kind == "bool" else 7
    assert (out[:, :, dead] == 0).all()
    assert_closer(out, eager, ref64)


@pytest.mark.parametrize("dtype,slack", [(torch.float16, 2.0), (torch.bfloat16, 4.0)])
def test_half_precision(dtype, slack):
    """Half inputs and outputs; P is rounded to the value dtype before P @ V, as on the GPU (the reference
    keeps it in float32: bf16's 8-bit mantissa needs the larger slack). Under the interpreter a bfloat16
    tl.dot runs in float32 (Triton's interpreter multiplies bfloat16 tiles wrongly); the bf16 tensor-core
    product itself is checked by tests/test_gpu.py and compiled for sm_90 in test_codegen_cuda."""
    q, k, v = _qkv(9, 3, 50, 64, dtype=dtype)
    out, eager, ref64 = _check(q, k, v, None, True, 0.125, _key(True))
    assert_closer(out, eager, ref64, slack=slack, floor=1e-3)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 3 * 4, 32, generator=g)              # [B, N, 3*H, D] -> views [B, H, N, D]
    q, k, v = (t.transpose(1, 2) for t in x.split(4, dim=2))
    assert not q.is_contiguous()
    out, eager, ref64 = _check(q, k, v, None, True, 0.2, _key(True))
    assert_closer(out, eager, ref64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,window", [(130, 1), (130, 17), (130, 64), (200, 100), (40, 500)])
def test_sliding_window_matches_fp64(causal, n, window):
    q, k, v = _qkv(4, 2, n, 32, seed=window)
    out, eager, ref64 = _check(q, k, v, None, causal, 0.2, _key(causal, window=True), window=window)
    assert_closer(out, eager, ref64)


def test_window_kernel_refuses_a_missing_window():
    q, k, v = _qkv(2, 2, 8, 16)
    with pytest.raises(Exception, match="sliding window"):
        torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _key(True, window=True))


@pytest.mark.parametrize("spec", [dict(causal=True), dict(causal=False, mask="bool"), dict(causal=True, window=True)],
                         ids=["causal", "bool_mask", "causal_window"])
def test_every_autotune_config_computes_the_same_attention(spec):
    """On a GPU the autotuner launches every entry of CONFIGS (tile sizes included); the interpreter runs
    each of them here, N and S not multiples of any tile."""
    loaded = kernels.load_kernel(_key(**spec), torch.device("cpu"))
    q, k, v = _qkv(4, 2, 150, 32, s=190, seed=3)
    mask = torch.rand(1, 1, 150, 190, generator=torch.Generator().manual_seed(1)) > 0.3 if spec.get("mask") else None
    window = 45 if spec.get("window") else 0
    ref64 = attention_reference(q.double(), k.double(), v.double(), mask, spec["causal"], 0.2, window)
    eager = attention_reference(q, k, v, mask, spec["causal"], 0.2, window)
    assert len(loaded.module.CONFIGS) >= 4
    for config in loaded.module.CONFIGS:
        out = torch.empty_like(q)
        loaded.launch(q, k, v, mask, out, 0.2, window, config=config)
        assert_closer(out, eager, ref64)
