"""KIVI-style quantized KV groups: quantizer, packing, the incremental store, and the Triton decode
kernel (TRITON_INTERPRET=1 on CPU) against dequantize-then-attend in float64."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnforge import codegen, runtime
from attnforge.runtime.kvquant import (KVQuantError, QuantKV, dequantize, fake_quant, pack, quant_bytes, quantize,
                                       quantized_tokens, unpack)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pack_round_trips(bits, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-2, -1])
def test_quantization_error_is_half_a_step(bits, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 96, 64, generator=g) * 3
    codes, scale, lo = quantize(x, bits, 32, axis)
    assert int(codes.max()) <= (1 << bits) - 1
    back = dequantize(codes, scale, lo, 32, axis)
    step = scale.float().repeat_interleave(32, axis % 3)
    # half a step, plus float16 rounding of the minimum and the scale
    slack = 1e-3 * x.abs().max() + step * 1e-3 * (1 << bits)
    assert ((back - x).abs() <= step / 2 + slack).all()
    # keys (axis -2) share statistics over 32 tokens per channel, values over 32 channels per token
    assert scale.shape == ((2, 3, 64) if axis == -2 else (2, 96, 2))


def test_error_falls_with_bits():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 200, 64, generator=g), torch.randn(1, 200, 64, generator=g)
    errs = [(fake_quant(k, v, b, 32, 40)[0] - k).abs().max().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    kt, vt = fake_quant(k, v, 4, 32, 40)
    nq = quantized_tokens(200, 32, 40)
    assert nq == 160 and torch.equal(kt[:, nq:], k[:, nq:]) and torch.equal(vt[:, nq:], v[:, nq:])


def _store(groups, prompt, steps, seed=0, b=1, d=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ng = len(groups)
    n = prompt + steps
    k = torch.randn(b, ng, n, d, generator=g).to(dtype)
    v = torch.randn(b, ng, n, d, generator=g).to(dtype)
    qkv = QuantKV(groups, 32, 48, n + 5)
    qkv.append(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, n):
        qkv.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return qkv, k, v


def test_store_holds_what_fake_quant_says_prompt_then_steps():
    """Prompt then one token per step: key groups are quantized as they complete, and what the store
    holds equals quantizing the whole sequence at once."""
    qkv, k, v = _store([(0, 2), (1, 4), (2, 8)], 70, 45)
    assert qkv.length == 115 and qkv.nq == quantized_tokens(115, 32, 48) == 64
    for gi, (_, bits) in enumerate(qkv.groups):
        got_k, got_v = qkv.dequantized(gi)
        want_k, want_v = fake_quant(k[:, gi], v[:, gi], bits, 32, 48)
        torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)


def test_store_memory_is_what_the_accounting_says():
    qkv, *_ = _store([(0, 4), (1, 4)], 400, 1, d=64, dtype=torch.float16)
    n = 401
    assert qkv.held_bytes() == 2 * quant_bytes(n, 4, 32, 48, 64)
    fp16 = 2 * n * 64 * 2                        # one group's K and V in float16
    assert quant_bytes(n, 4, 32, 48, 64) < 0.4 * fp16
    assert quant_bytes(n, 2, 32, 48, 64) < quant_bytes(n, 4, 32, 48, 64) < quant_bytes(n, 8, 32, 48, 64) < fp16
    assert qkv.nbytes() < 2 * fp16               # buffers sized for max_length, still under float16


def test_store_rejects_what_it_cannot_hold():
    qkv = QuantKV([(0, 4)], 32, 48, 100)
    with pytest.raises(KVQuantError, match="max_length"):
        qkv.append(torch.zeros(1, 1, 101, 64), torch.zeros(1, 1, 101, 64))
    with pytest.raises(KVQuantError, match="bits"):
        QuantKV([(0, 3)], 32, 48, 100)
    with pytest.raises(KVQuantError, match="quantized groups"):
        qkv.append(torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 64))


@pytest.fixture(scope="module")
def quant_kernel():
    key = runtime.kernels.register_source(codegen.render_decode_quant().source)
    return runtime.kernels.load_kernel(key, torch.device("cpu"))


@pytest.mark.parametrize("prompt,steps,splits", [(150, 20, None), (150, 20, 3), (30, 3, None), (64, 0, 2)])
def test_decode_kernel_matches_dequantized_attention(quant_kernel, prompt, steps, splits):
    """Groups of 2, 4 and 8 bits in one launch, 3 query heads per group, batch 2; the residual alone
    (30 + 3 tokens: nothing quantized yet) and tiles straddling codes and residual."""
    qkv, *_ = _store([(0, 2), (1, 4), (2, 8)], prompt, steps, b=2)
    q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    out, used = qkv.decode(q, 0.125, quant_kernel, splits=splits)
    if splits:
        assert used == splits
    want = qkv.decode_reference(q.double(), 0.125)            # float64 over the same dequantized values
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_half_precision(quant_kernel, dtype):
    qkv, *_ = _store([(0, 4), (1, 8)], 130, 4, b=1, dtype=dtype)
    q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    out, _ = qkv.decode(q, 0.125, quant_kernel)
    assert out.dtype == dtype
    want = qkv.decode_reference(q.double(), 0.125)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_kv_quant_form_counts_its_bytes_and_prefills_dense():
    from attnforge.runtime.forms import (Dense, FormError, KVQuant, form_from_dict, keep_mask, kept_pairs, kv_tokens,
                                         prefill_form)
    from attnforge.runtime.kvcache import KVCacheError, layout_for

    f = KVQuant(4)
    assert form_from_dict(f.to_dict()) == f and prefill_form(f) == Dense()
    assert kept_pairs(f, 300) == kept_pairs(Dense(), 300)
    assert torch.equal(keep_mask([f], 300, 300), keep_mask([Dense()], 300, 300))
    n = 4096
    assert kv_tokens(f, n) * 4 * 64 >= quant_bytes(n, 4, 32, 128, 64) > (kv_tokens(f, n) - 1) * 4 * 64
    assert kv_tokens(KVQuant(2), n) < kv_tokens(f, n) < kv_tokens(KVQuant(8), n) < kv_tokens(Dense(), n)
    assert kv_tokens(f, 100) == 100                     # all in the residual: no saving yet
    with pytest.raises(FormError, match="bits"):
        KVQuant(3)
    lay = layout_for(f, 100)                            # held by the site's QuantKV, not the flat buffer
    assert lay.kind == "quant" and lay.capacity(100) == 0
    with pytest.raises(KVCacheError):
        layout_for("not a form", 100)


def test_decode_kernel_with_the_gpu_key_tile(quant_kernel):
    """The interpreter runs 16-token tiles for speed; a GPU runs 64 (tiles straddle code groups and the
    residual differently): the same attention at that tile too."""
    import functools

    qkv, *_ = _store([(0, 2), (1, 4), (2, 8)], 300, 7, b=1)
    q = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(8))
    gpu_tile = type("Tiles", (), {"launch": staticmethod(functools.partial(
        quant_kernel.module.launch, quant_kernel.kernel, interpreted=True, block_n=64))})
    for splits in (None, 2):
        out, _ = qkv.decode(q, 0.125, gpu_tile, splits=splits)
        torch.testing.assert_close(out.double(), qkv.decode_reference(q.double(), 0.125), rtol=2e-5, atol=2e-5)
