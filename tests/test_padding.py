"""Padded batches (runtime.padding): every row computed as that row alone, through the same kernels.

The oracle is the row alone: each row's real tokens cut out and run through attention_reference on their
own (padding.attention_rows, itself checked here against plain per-row calls of the op)."""
import pytest
import torch

import attnforge as af
from attnforge import codegen
from attnforge.runtime import kernels
from attnforge.runtime import padding as P
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, SinkWindow, forms_to_json

from conftest import assert_closer

interpreted = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")

MIXES = {
    "dense": (),
    "window+elastic": (SinkWindow(2, 40), ElasticWindow(1, 20, 0.3)),
    "block_sparse+dense": (BlockSparse(64, (0,), (0, 1)), Dense()),
}


def _key(**spec):
    return kernels.register_source(codegen.render_attention(codegen.KernelSpec(**spec)).source)


def _data(b=3, h=4, g=2, s=150, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, s, d, generator=gen).to(dtype) for x in (h, g, g))
    padding = torch.ones(b, s, dtype=torch.long)
    padding[1, :70] = 0                 # left padding (generation)
    padding[2, 100:] = 0                # right padding, and a hole
    padding[2, 3] = 0
    return q, k, v, padding


def test_rows_alone_is_the_op_on_each_row():
    """The oracle itself: row by row it equals the op called on that row's real tokens alone (any causal,
    forms at the row's own positions and length), zeros at padding queries, for N = S and N < S."""
    q, k, v, padding = _data(s=40, dtype=torch.float64)
    for forms in ((), (SinkWindow(2, 7), ElasticWindow(1, 3, 0.25))):
        for causal in ((True, False) if not forms else (True,)):
            for n in (40, 6):
                got = P.attention_rows(q[:, :, -n:], k, v, padding, causal, 0.3, forms)
                for r in range(3):
                    slots = padding[r].nonzero().squeeze(1)
                    qs = slots[slots >= 40 - n]
                    alone = torch.ops.attnforge.attention(q[r:r + 1, :, qs], k[r:r + 1, :, slots],
                                                          v[r:r + 1, :, slots], None, False, 0, 0.3, "reference", "",
                                                          forms_to_json(forms or ((Dense(),) * 2 if causal else ())))
                    assert torch.allclose(got[r:r + 1, :, qs - (40 - n)], alone, atol=1e-12)
                    pads = torch.ones(n, dtype=torch.bool)
                    pads[qs - (40 - n)] = False
                    assert not got[r, :, pads].any()


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_reference_equals_the_rows_alone(mix):
    forms = MIXES[mix]
    q, k, v, padding = _data(dtype=torch.float64)
    for causal in ((True, False) if not forms else (True,)):
        for n in (150, 20):
            want = P.attention_rows(q[:, :, -n:], k, v, padding, causal, 0.25, forms)
            got = torch.ops.attnforge.attention(q[:, :, -n:], k, v, None, causal, 0, 0.25, "reference", "",
                                                forms_to_json(forms), padding)
            assert torch.allclose(got, want, atol=1e-12)
    assert af.runtime.counters["padded"] == af.runtime.counters["reference"] > 0


@interpreted
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_kernels_match_float64(mix, dtype):
    forms = MIXES[mix]
    q, k, v, padding = _data(dtype=dtype)
    for causal in ((True, False) if not forms else (True,)):
        af.runtime.reset_counters()
        key = _key(causal=causal, plan=bool(forms))
        out = torch.ops.attnforge.attention(q, k, v, None, causal, 0, 0.25, "triton", key, forms_to_json(forms),
                                            padding)
        assert dict(af.runtime.counters) == {"padded": 1, "triton_interpreter": 1, **(
            {"triton_plan_blocks": af.runtime.counters["triton_plan_blocks"],
             "triton_plan_whole_blocks": af.runtime.counters["triton_plan_whole_blocks"]} if forms else {})}
        ref = P.attention_rows(q.double(), k.double(), v.double(), padding, causal, 0.25, forms)
        theirs = P.reference(q, k, v, padding, causal, 0.25, forms)          # PyTorch in q's precision
        assert_closer(out, theirs, ref)
        assert not out[1, :, :70].any() and not out[2, :, 100:].any() and not out[2, :, 3].any()


@interpreted
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_padded_backward_matches_float64(mix):
    """attention_train + backward through the plan kernel's backward (compacted like the forward): gradients
    of the rows alone; padding slots get none."""
    forms = MIXES[mix]
    q, k, v, padding = _data(seed=1)
    key = _key(causal=True, plan=bool(forms))
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.attnforge.attention_train(*ours, None, True, 0, 0.25, "triton", key, forms_to_json(forms),
                                                   padding)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert af.runtime.counters["triton_backward"] == 1 and af.runtime.counters["reference"] == 0
    assert af.runtime.counters.get("triton_backward_recomputed", 0) == 0        # the forward's lse was read
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    P.attention_rows(*ref_in, padding, True, 0.25, forms).backward(grad.double())
    theirs_in = [t.clone().requires_grad_() for t in (q, k, v)]
    P.reference(*theirs_in, padding, True, 0.25, forms).backward(grad)
    for a, b, c in zip(ours, theirs_in, ref_in):
        assert_closer(a.grad, b.grad, c.grad, slack=8.0)
    assert not ours[1].grad[1, :, :70].any() and not ours[2].grad[2, :, 100:].any()
    # the log-sum-exp has +inf at padding queries, each row's own value elsewhere
    assert torch.isinf(lse[1, :, :70]).all() and torch.isfinite(lse[1, :, 70:]).all()


def test_reference_backward_is_the_autograd_of_the_rows_alone():
    forms = MIXES["window+elastic"]
    q, k, v, padding = _data(s=48, dtype=torch.float64, seed=2)
    padding[1, :30] = 0
    grad = torch.randn(q.shape, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    P.attention_rows(*ref_in, padding, True, 0.25, forms).backward(grad)
    got = P.reference_backward(grad, q, k, v, padding, True, 0.25, forms)
    for a, b in zip(got, ref_in):
        assert torch.allclose(a, b.grad, atol=1e-12)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.ops.attnforge.attention(*ours, None, True, 0, 0.25, "reference", "", forms_to_json(forms),
                                  padding).backward(grad)
    for a, b in zip(ours, ref_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


@interpreted
def test_rows_of_nothing_and_of_everything():
    """A row with no token gives zeros (no NaN), a row with no padding the plain causal result."""
    q, k, v, padding = _data(s=70, seed=3)
    padding[0] = 0
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "triton", _key(causal=True), "", padding)
    assert not out[0].any() and torch.isfinite(out).all()
    padding[:] = 1
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "triton", _key(causal=True), "", padding)
    plain = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "triton", _key(causal=True), "")
    assert torch.equal(out, plain)


def test_bad_padding_says_what_is_wrong():
    q, k, v, padding = _data(s=20)
    call = lambda pad, mask=None: torch.ops.attnforge.attention(q, k, v, mask, True, 0, 0.25, "reference", "",  # noqa: E731
                                                                "", pad)
    with pytest.raises(ValueError, match=r"padding must be \[B, S\] = \[3, 20\]"):
        call(padding[:, :10])
    with pytest.raises(ValueError, match="bool or integer"):
        call(padding.float())
    with pytest.raises(ValueError, match="not both"):
        call(padding, torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(af.KernelUnavailable, match="fewer queries than keys"):
        torch.ops.attnforge.attention(q[:, :, -1:], k, v, None, True, 0, 0.25, "triton", _key(causal=True), "",
                                      padding)
