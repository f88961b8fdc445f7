"""Detection and rewriting on small handwritten models, positive and negative."""
import math

import pytest
import torch
from torch import nn

import attnforge as af
from attnforge.compiler.capture import capture_dynamo, capture_symbolic
from attnforge.compiler.models import tiny
from attnforge.passes import ATTENTION_OP, canonicalize, detect


class Eager(nn.Module):
    """Configurable eager attention over given q, k, v (the spellings a test needs)."""

    def __init__(self, return_probs=False, softmax_dim=-1, dropout=0.0, kv_heads=None, const_scale=None):
        super().__init__()
        self.return_probs, self.softmax_dim, self.kv_heads = return_probs, softmax_dim, kv_heads
        self.drop = nn.Dropout(dropout)
        self.const_scale = const_scale

    def forward(self, q, k, v):
        if self.kv_heads:
            rep = q.shape[1] // k.shape[1]
            b, hk, s, d = k.shape
            k = k[:, :, None, :, :].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)
            v = v[:, :, None, :, :].expand(b, hk, rep, s, d).reshape(b, hk * rep, s, d)
        scores = q @ k.transpose(-2, -1)
        if self.const_scale:
            scores = scores * self.const_scale
        else:
            scores = scores / math.sqrt(q.shape[-1])   # a constant once Dynamo specializes the shape
        p = torch.softmax(scores, dim=self.softmax_dim)
        p = self.drop(p)
        out = p @ v
        return (out, p) if self.return_probs else out


def _inputs(h=4, hk=4, n=8, d=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, h, n, d, generator=g), torch.randn(2, hk, n, d, generator=g), torch.randn(2, hk, n, d,
                                                                                                   generator=g)


@pytest.mark.parametrize("capture", [capture_dynamo, capture_symbolic])
def test_eager_gqa_found_with_unexpanded_kv(capture):
    q, k, v = _inputs(h=6, hk=2)
    (gm,) = capture(Eager(kv_heads=2, const_scale=0.25).eval(), (q, k, v))
    sites, declined = detect(gm)
    assert len(sites) == 1 and not declined
    s = sites[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.causal, s.mask) == (6, 2, 16, False, "none")
    assert s.scale == pytest.approx(1 / 4)
    gm, changed = canonicalize(gm, sites, impl="reference")
    assert changed
    ops = [n for n in gm.graph.nodes if n.target is ATTENTION_OP]
    assert len(ops) == 1
    assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes), "repeat_kv kept"
    out = gm(q, k, v)
    out = out[0] if isinstance(out, tuple) else out         # Dynamo graphs return a tuple
    torch.testing.assert_close(out, Eager(kv_heads=2)(q, k, v))


def test_scale_computed_in_a_symbolic_graph_is_moved_onto_q():
    q, k, v = _inputs()
    (gm,) = capture_symbolic(Eager(), (q, k, v))      # math.sqrt(q.shape[-1]) stays a graph value
    (site,), declined = detect(gm)
    assert not declined and site.scale == 1.0 and site.q.ops == (("div", "%sqrt"),)
    gm, changed = canonicalize(gm, [site], impl="reference")
    assert changed
    torch.testing.assert_close(gm(q, k, v), Eager()(q, k, v))


def test_tiny_models_rewrite_and_match():
    for sdpa in (False, True):
        af.runtime.reset_counters()
        model, inputs = tiny(48, sdpa=sdpa)
        be = af.Backend(compiler="eager")
        out = torch.compile(model, backend=be)(*inputs)
        torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
        (rec,) = be.records
        assert len(rec.rewritten) == 2 and rec.kernels
        assert "torch.ops.attnforge.attention" in rec.code
        assert af.runtime.counters["reference"] == 2
        # sdpa: is_causal; eager: the -inf triu buffer is lifted to the same structure
        assert {(s.mask, s.causal, s.mask_operand) for s in rec.sites} == {("causal", True, None)}


def test_probabilities_used_elsewhere_block_the_rewrite():
    q, k, v = _inputs()
    be = af.Backend(compiler="eager")
    out, p = torch.compile(Eager(return_probs=True), backend=be)(q, k, v)
    (rec,) = be.records
    assert rec.sites == () and rec.rewritten == ()
    assert len(rec.declined) == 1 and "used by 2 nodes" in rec.declined[0].reason
    assert "attnforge" not in rec.code
    ref_out, ref_p = Eager(return_probs=True)(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(p, ref_p)
    assert af.runtime.counters.total() == 0


def test_softmax_over_other_dim_is_declined():
    q, k, v = _inputs()
    be = af.Backend(compiler="eager")
    torch.compile(Eager(softmax_dim=-2), backend=be)(q, k, v)
    (rec,) = be.records
    assert rec.rewritten == () and "not the last (key) dim" in rec.declined[0].reason


def test_training_dropout_is_declined_eval_dropout_is_not():
    q, k, v = _inputs()
    m = Eager(dropout=0.1)
    be = af.Backend(compiler="eager")
    torch.compile(m.train(), backend=be)(q, k, v)
    assert be.records[-1].rewritten == () and "dropout" in be.records[-1].declined[0].reason
    torch._dynamo.reset()
    be = af.Backend(compiler="eager")
    torch.compile(m.eval(), backend=be)(q, k, v)
    assert len(be.records[-1].rewritten) == 1


def test_sdpa_with_dropout_is_declined():
    q, k, v = _inputs()
    f = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)  # noqa: E731
    be = af.Backend(compiler="eager")
    torch.compile(f, backend=be)(q, k, v)
    assert be.records[-1].rewritten == () and "dropout_p" in be.records[-1].declined[0].reason


def test_detection_does_not_change_the_model():
    model, inputs = tiny(32)
    before = model(*inputs)
    sites = af.find_attention(model, inputs)
    assert len(sites) == 2
    torch.testing.assert_close(model(*inputs), before)
    assert af.runtime.counters.total() == 0


def test_constant_causal_mask_is_lifted_only_when_exact():
    q, k, v = _inputs(n=8)

    def causal_from_arange(q, k, v):
        n = q.shape[2]
        keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def window_from_arange(q, k, v):
        n = q.shape[2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = (j <= i) & (j > i - 3)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    def strided_from_arange(q, k, v):
        n = q.shape[2]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & ((i + j) % 3 != 1))

    cases = ((causal_from_arange, "causal", True, 0), (window_from_arange, "window", True, 3),
             (strided_from_arange, "boolean", False, 0))
    for fn, kind, causal, window in cases:
        torch._dynamo.reset()
        be = af.Backend(compiler="eager")
        out = torch.compile(fn, backend=be)(q, k, v)
        (site,) = be.records[-1].sites
        assert (site.mask, site.causal, site.window) == (kind, causal, window)
        assert (site.mask_operand is None) == (kind != "boolean")
        torch.testing.assert_close(out, fn(q, k, v))


class ScaledAfterMask(nn.Module):
    """softmax((scores + bias) * 0.5): the factor after the add scales the bias too (soft-capped or not)."""

    def __init__(self, cap=None, tensor_factor=False):
        super().__init__()
        self.cap, self.tensor_factor = cap, tensor_factor

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-1, -2) * 0.25
        if self.cap:
            s = self.cap * torch.tanh(s / self.cap)
        factor = q.abs().sum(-1, keepdim=True) if self.tensor_factor else 0.5
        return torch.softmax((s + bias) * factor, -1) @ v


@pytest.mark.parametrize("cap", [None, 3.0])
def test_a_factor_after_an_additive_mask_scales_the_mask_too(cap):
    """It used to be folded into the scale of q alone, leaving the mask unscaled (max error ~1.2)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) * 3 for _ in range(3))
    bias = torch.randn(1, 1, 7, 7, generator=g) * 4
    model = ScaledAfterMask(cap)
    torch._dynamo.reset()
    be = af.Backend(impl="reference", compiler="eager")
    got = torch.compile(model, backend=be)(q, k, v, bias)
    assert be.records[-1].rewritten == ("#0",)
    assert (got - model(q, k, v, bias)).abs().max() < 1e-5
    (site,) = af.find_attention(model, (q, k, v, bias))
    assert site.scale == pytest.approx(0.125) and site.softcap == (1.5 if cap else 0.0)
    torch._dynamo.reset()
    be = af.Backend(impl="reference", compiler="eager")
    tensor_scaled = ScaledAfterMask(cap, tensor_factor=True)
    torch.compile(tensor_scaled, backend=be)(q, k, v, bias)
    assert be.records[-1].rewritten == () and "scaled together by a tensor" in be.records[-1].declined[0].reason
