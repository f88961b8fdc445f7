"""The reference oracle against SDPA in float64, and its hand-written backward against autograd."""
import pytest
import torch
import torch.nn.functional as F

from attnforge.runtime import attention_reference, attention_reference_backward


def _qkv(b, h, hk, n, s, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, hk, s, d, generator=g, dtype=dtype),
            torch.randn(b, hk, s, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("h,hk", [(9, 3), (4, 4), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,s", [(7, 7), (5, 9)])
def test_matches_sdpa_fp64(h, hk, causal, n, s):
    q, k, v = _qkv(2, h, hk, n, s, 16)
    ours = attention_reference(q, k, v, None, causal, 0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_match_sdpa(kind):
    q, k, v = _qkv(2, 4, 2, 6, 8, 8)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 6, 8, generator=g) > 0.3 if kind == "bool" else torch.randn(1, 4, 6, 8, generator=g,
                                                                                           dtype=torch.float64)
    if kind == "bool":
        mask[..., 0] = True                     # no fully masked row here (SDPA's own convention differs)
    ours = attention_reference(q, k, v, mask, False, None)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = attention_reference(q, k, v, mask, False, None)
    assert torch.isfinite(out).all()
    assert (out[:, :, 1] == 0).all() and (out[:, :, 0] != 0).any()


@pytest.mark.parametrize("mask_kind", [None, "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_autograd(mask_kind, causal):
    q, k, v = _qkv(2, 6, 2, 5, 5, 8)
    mask = torch.randn(1, 1, 5, 5, dtype=torch.float64) if mask_kind else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([mask.clone().requires_grad_()] if mask_kind else [])
    out = attention_reference(*leaves[:3], leaves[3] if mask_kind else None, causal, 0.4)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad_out)
    got = attention_reference_backward(grad_out, q, k, v, mask, causal, 0.4)
    for e, g_ in zip(expected, got):
        torch.testing.assert_close(g_, e, rtol=1e-10, atol=1e-10)
    if not mask_kind:
        assert got[3] is None


def test_op_autograd_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 3, 4, 4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.5, "reference", ""), (q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_window_matches_an_explicit_mask(causal):
    q, k, v = _qkv(1, 4, 2, 9, 9, 8)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    keep = (j > i - 3) & ((j <= i) if causal else True)
    ours = attention_reference(q, k, v, None, causal, 0.3, window=3)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
