"""af.varlen_attention: FlashAttention's variable-length convention (tokens end to end, cu_seqlens) over the
packed path; each sequence against plain SDPA on that sequence alone (float64), forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import attnforge as af
from attnforge.runtime import kernels
from attnforge.runtime import padding as P
from attnforge.runtime.forms import ElasticWindow, SinkWindow

LENGTHS = (37, 1, 0, 90, 22)                 # a one-token and an empty sequence among them


def _data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, 16, generator=g).to(dtype) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _alone(q, k, v, causal, scale=0.25):
    """Each sequence through SDPA on its own, end to end again."""
    outs, at = [], 0
    for n in LENGTHS:
        if n:
            one = (x[at:at + n].transpose(0, 1)[None] for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(*one, is_causal=causal, scale=scale, enable_gqa=True)[0]
                        .transpose(0, 1))
        at += n
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [True, False])
def test_each_sequence_is_sdpa_on_it_alone(causal):
    q, k, v, cu = _data()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = af.varlen_attention(*leaves, cu, causal=causal, scale=0.25, impl="reference")
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    want = _alone(*mine, causal)
    assert out.shape == (q.shape[0], 4, 16) and torch.allclose(out, want, atol=1e-12)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    want.backward(grad)
    for a, b in zip(leaves, mine):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)
    merged = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), is_causal=causal,
                                            scale=0.25, enable_gqa=True)[0].transpose(0, 1)
    assert (merged - want).abs().max() > 0.1                # the bounds are what separates the sequences


def test_forms_act_at_each_sequences_own_positions():
    q, k, v, cu = _data()
    forms = (SinkWindow(2, 8), ElasticWindow(1, 3, 0.2))
    out = af.varlen_attention(q, k, v, cu, scale=0.25, forms=forms, impl="reference")
    labels = torch.repeat_interleave(torch.arange(1, len(LENGTHS) + 1), torch.tensor(LENGTHS))[None]
    rows = P.attention_rows(*(x.transpose(0, 1)[None] for x in (q, k, v)), labels, True, 0.25, forms)
    assert torch.allclose(out, rows[0].transpose(0, 1), atol=1e-12)


@pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
def test_the_kernels_run_one_compacted_row_per_sequence():
    q, k, v, cu = _data(torch.float32)
    af.runtime.reset_counters()
    out = af.varlen_attention(q, k, v, cu, scale=0.25, forms=(SinkWindow(2, 8), ElasticWindow(1, 3, 0.2)),
                              impl="triton")
    assert af.runtime.counters["packed"] == af.runtime.counters["triton_interpreter"] == 1
    want = af.varlen_attention(q.double(), k.double(), v.double(), cu, scale=0.25,
                               forms=(SinkWindow(2, 8), ElasticWindow(1, 3, 0.2)), impl="reference")
    assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
def test_soft_capped_sequences_through_the_kernels():
    """softcap (as flash_attn_varlen_func takes it): each sequence = the capped formula on it alone, float64."""
    q, k, v, cu = _data(torch.float32)
    q = q * 4                                  # scores large enough that the cap bends them
    af.runtime.reset_counters()
    out = af.varlen_attention(q, k, v, cu, scale=0.25, impl="triton", softcap=1.5)
    assert af.runtime.counters["packed"] == af.runtime.counters["triton_interpreter"] == 1
    outs, at = [], 0
    for n in LENGTHS:
        if n:
            qs, ks, vs = (x[at:at + n].double().transpose(0, 1) for x in (q, k, v))
            s = 1.5 * torch.tanh(qs @ ks.repeat_interleave(2, 0).transpose(-1, -2) * 0.25 / 1.5)
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).tril().logical_not(), float("-inf"))
            outs.append((s.softmax(-1) @ vs.repeat_interleave(2, 0)).transpose(0, 1))
        at += n
    want = torch.cat(outs)
    assert (out.double() - want).abs().max() < 1e-5
    assert (af.varlen_attention(q.double(), k.double(), v.double(), cu, scale=0.25, impl="reference") - want
            ).abs().max() > 0.05


def test_bad_bounds_say_what_is_wrong():
    q, k, v, cu = _data()
    for bad in (cu[1:], torch.tensor([0, 5, 3, 150]), cu[None], torch.tensor([0, 10])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            af.varlen_attention(q, k, v, bad, impl="reference")
    with pytest.raises(ValueError, match="q \\[T, Hq, D\\]"):
        af.varlen_attention(q[None], k, v, cu)
    with pytest.raises(ValueError, match="causal=True"):
        af.varlen_attention(q, k, v, cu, causal=False, forms=(SinkWindow(2, 8), af.Dense()))


def test_linear_groups_train_each_sequence_alone():
    """Linear-hybrid groups over variable-length sequences: the backward runs the chunked op per compacted
    sequence (counted), and the gradients are those of each sequence through the float64 reference alone."""
    from attnforge.runtime.forms import Linear
    from attnforge.runtime.reference import attention_reference

    q, k, v, cu = _data()
    forms = (Linear("taylor2", 6, 2), SinkWindow(1, 5))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    af.runtime.reset_counters()
    out = af.varlen_attention(*leaves, cu, scale=0.25, forms=forms)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    assert af.runtime.counters["linear_backward"] == 1
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    outs, at = [], 0
    for n in LENGTHS:
        if n:
            one = [x[at:at + n].transpose(0, 1)[None] for x in mine]
            outs.append(attention_reference(*one, None, True, 0.25, 0, forms)[0].transpose(0, 1))
        at += n
    want = torch.cat(outs)
    assert (out - want).abs().max() < 1e-10
    want.backward(grad)
    for a, b in zip(leaves, mine):
        assert (a.grad - b.grad).abs().max() < 1e-10
