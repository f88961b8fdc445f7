"""Injected faults and awkward inputs: each must end in an exact answer or a clear error, never a wrong one.

Complements test_cache (corrupted / concurrent / unwritable kernel cache), test_plan (malformed plans,
fuzzed loader) and test_cli (no attention, unreadable model spec).
"""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnforge as af
from attnforge.compiler.models import tiny
from attnforge.compiler.profile import Profile, ProfileError
from attnforge.runtime import ops
from attnforge.runtime.reference import attention_reference

from conftest import assert_closer


def _compiled(model, **options):
    be = af.Backend(compiler="eager", **options)
    return torch.compile(model, backend=be), be


# ------------------------------------------------------------------ Triton missing, kernel failures
@pytest.fixture
def on_gpu(monkeypatch):
    """Make the automatic choice try the compiled kernel as it does on CUDA (the CPU has no such path);
    everything after that decision is the real code."""
    monkeypatch.setattr(ops, "_accelerated", lambda q: True)


def _without_triton(monkeypatch, compiled, inputs):
    """Compile first (Dynamo itself imports Triton), then make `import triton` raise ImportError."""
    compiled(*inputs)
    af.runtime.reset_counters()
    monkeypatch.setitem(sys.modules, "triton", None)


def test_triton_missing_auto_falls_back_with_a_recorded_warning(monkeypatch):
    model, inputs = tiny(24, sdpa=True)
    compiled, be = _compiled(model)
    _without_triton(monkeypatch, compiled, inputs)
    monkeypatch.setattr(ops, "_accelerated", lambda q: True)    # as on CUDA (see on_gpu)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        out = compiled(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert af.runtime.counters["reference"] == 2 and af.runtime.counters["triton"] == 0
    assert len(be.records) == 1
    (reason,) = be.fallbacks
    assert "Triton is not installed" in reason and be.fallbacks[reason] == 2
    assert be.records[0].to_dict()["fallbacks"] == be.fallbacks


def test_triton_missing_explicit_triton_raises(monkeypatch):
    if not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU path of impl='triton')")
    model, inputs = tiny(24, sdpa=True)
    compiled, _ = _compiled(model, impl="triton")
    _without_triton(monkeypatch, compiled, inputs)
    monkeypatch.setattr(af.runtime.kernels, "_handles", {})     # a fresh process: nothing loaded yet
    with pytest.raises(af.KernelUnavailable, match="Triton is not installed"):
        compiled(*inputs)


@pytest.mark.parametrize("triton_v,numpy_v,broken", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                    ("3.9.0", "2.4.6", False), ("3.7.1", "2.5.0", False)])
def test_interpreter_that_cannot_run_under_this_numpy_is_named(monkeypatch, triton_v, numpy_v, broken):
    """Triton <= 3.6's interpreter fails inside Triton under NumPy >= 2.4; the op says so, with the fix."""
    import triton

    if not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU path of impl='triton')")
    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(np, "__version__", numpy_v)
    monkeypatch.setattr(af.runtime.kernels, "_handles", {})     # a fresh process: nothing loaded yet
    problem = af.runtime.kernels.interpreter_problem()
    assert (problem is not None) == broken
    q = torch.randn(1, 2, 8, 16)
    key = af.runtime.kernels.register_source(af.codegen.render_attention(af.codegen.KernelSpec(causal=True)).source)
    if broken:
        assert "numpy<2.4" in problem and "triton>=3.7" in problem
        with pytest.raises(af.KernelUnavailable, match=r"install 'numpy<2\.4' or 'triton>=3\.7'"):
            torch.ops.attnforge.attention(q, q, q, None, True, 0, 0.25, "triton", key)
        with pytest.raises(af.KernelUnavailable, match="NumPy 2.4"):
            af.runtime.kernels.load_kernel(key, q.device)
    else:
        torch.ops.attnforge.attention(q, q, q, None, True, 0, 0.25, "triton", key)
        assert af.runtime.counters["triton_interpreter"] == 1


def test_kernel_that_fails_to_compile_falls_back_or_raises(on_gpu, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")            # what a Triton compile error looks like

    monkeypatch.setattr(ops, "_run_triton", broken)
    model, inputs = tiny(24, sdpa=True)
    compiled, be = _compiled(model)
    with pytest.warns(RuntimeWarning, match="Triton kernel failed: RuntimeError: PassManager"):
        out = compiled(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    assert list(be.fallbacks) == ["Triton kernel failed: RuntimeError: PassManager::run failed"]
    torch._dynamo.reset()
    compiled, _ = _compiled(model, impl="triton")
    if af.runtime.kernels.interpreter_enabled():
        with pytest.raises(RuntimeError, match="PassManager"):
            compiled(*inputs)


# ------------------------------------------------------------------------------------ inputs
def _qkv(b, hq, hkv, n, s, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=g, dtype=dtype), torch.randn(b, hkv, s, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, s, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_nan_and_inf_stay_in_the_rows_they_touch(impl):
    if impl == "triton" and not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v = _qkv(1, 2, 2, 40, 40, 16, torch.float32)
    q[0, 0, 7, 3] = float("nan")
    q[0, 1, 9, 0] = float("inf")
    kernel = af.runtime.kernels.register_source(
        af.codegen.render_attention(af.codegen.KernelSpec(causal=True)).source)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, impl, kernel)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[0, 0, 7], bad[0, 1, 9] = True, True
    assert torch.isnan(out[bad]).all() and torch.isnan(sdpa[bad]).all()       # as PyTorch: NaN, not a number
    torch.testing.assert_close(out[~bad], sdpa[~bad], rtol=1e-4, atol=1e-4)      # every other row is exact


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("n,s", [(0, 5), (3, 0), (1, 1), (1, 37)])
def test_zero_length_and_length_one(impl, n, s):
    if impl == "triton" and not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v = _qkv(2, 4, 2, n, s, 16, torch.float32)
    kernel = af.runtime.kernels.register_source(
        af.codegen.render_attention(af.codegen.KernelSpec(causal=False)).source)
    out = torch.ops.attnforge.attention(q, k, v, None, False, 0, 0.25, impl, kernel)
    assert out.shape == (2, 4, n, 16)
    expected = attention_reference(q.double(), k.double(), v.double(), None, False, 0.25)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if s == 0:
        assert (out == 0).all()                                 # no key to attend to: zeros, not NaN


class PaddedAttention(nn.Module):
    """A batch of different lengths: keys past each sequence's length are masked out (a mask computed in
    the graph from an input), one sequence entirely padding."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, lengths):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        keep = torch.arange(n, device=x.device)[None, :] < lengths[:, None]          # [B, S]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def test_batch_with_padding_and_an_all_padding_row():
    torch.manual_seed(0)
    model = PaddedAttention().double()
    x, lengths = torch.randn(3, 12, 32, dtype=torch.float64), torch.tensor([12, 5, 0])
    compiled, be = _compiled(model)
    out = compiled(x, lengths)
    assert be.sites_rewritten == 1 and af.runtime.counters["reference"] == 1
    torch.testing.assert_close(out, model(x, lengths), rtol=1e-12, atol=1e-12)
    assert (out[2] == 0).all()                        # rows with no visible key are zeros, never NaN


def test_very_long_sequence_matches_float64():
    q, k, v = _qkv(1, 2, 1, 8192, 8192, 16, torch.float32, seed=3)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "auto", "")
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, 0.25)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert_closer(out, sdpa, ref)


def test_dtype_mixture_is_named_or_computed_exactly():
    q, k, v = _qkv(1, 2, 2, 10, 10, 16, torch.float32)
    with pytest.raises(af.KernelUnavailable, match="dtypes differ"):
        torch.ops.attnforge.attention(q.half(), k, v, None, True, 0, 0.25, "triton", "x")
    out = torch.ops.attnforge.attention(q.half(), k, v, None, True, 0, 0.25, "auto", "x")
    assert out.dtype == torch.float16
    ref = attention_reference(q.half().double(), k.double(), v.double(), None, True, 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


def test_non_contiguous_inputs_through_the_reference():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 4, 2, 33, 33, 16))
    qs = q[..., ::2]                                               # strided last dim too
    ks, vs = k[..., ::2], v[..., ::2]
    assert not qs.is_contiguous()
    out = torch.ops.attnforge.attention(qs, ks, vs, None, True, 0, 0.3, "reference", "")
    torch.testing.assert_close(out, attention_reference(qs.contiguous(), ks.contiguous(), vs.contiguous(),
                                                        None, True, 0.3), rtol=0, atol=0)


class TwoBlocksWithABreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 48), nn.Linear(16, 48)

    @staticmethod
    def attend(proj, x):
        q, k, v = proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)

    def forward(self, x):
        x = x + self.attend(self.a, x)
        print("", end="")                       # not traceable: Dynamo breaks the graph here
        return x + self.attend(self.b, x)


def test_graph_break_between_attention_layers():
    torch.manual_seed(0)
    model = TwoBlocksWithABreak()
    compiled, be = _compiled(model)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(be.records) == 2 and [len(r.rewritten) for r in be.records] == [1, 1]
    assert af.runtime.counters["reference"] == 2


def test_fifty_lengths_do_not_cause_a_recompile_storm():
    model, _ = tiny(64, sdpa=True)
    compiled, be = _compiled(model)
    torch.manual_seed(0)
    for n in range(3, 53):
        ids = torch.randint(0, 256, (1, n))
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
    # one static graph for the first length, then one with a symbolic length (Dynamo's automatic dynamic)
    assert len(be.records) <= 2, f"{len(be.records)} compilations for 50 lengths"
    assert all(len(r.rewritten) == 2 for r in be.records)
    assert af.runtime.counters["reference"] == 100


@pytest.mark.parametrize("mode", ["no_grad", "train"])
def test_no_grad_and_training_mode(mode):
    model, (ids,) = tiny(20, sdpa=True)
    model.train(mode == "train")
    compiled, be = _compiled(model)
    with torch.set_grad_enabled(mode == "train"):
        out = compiled(ids)
        expected = model(ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert be.sites_rewritten == 2 and out.requires_grad == (mode == "train")
    if mode == "train":
        (g,) = torch.autograd.grad(out.square().sum(), [model.attn[0].q.weight])
        (e,) = torch.autograd.grad(expected.square().sum(), [model.attn[0].q.weight])
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- security
def test_profile_files_are_never_unpickled(tmp_path):
    """A profile whose arrays hold Python objects is refused rather than unpickled."""
    path = tmp_path / "evil.npz"
    meta = {"version": 2, "model": "m", "fingerprint": "f", "block": 16, "sites": [], "samples": {}}
    np.savez(path, meta=np.array(json.dumps(meta)), **{"0/16/influence": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ProfileError, match="not a readable attnforge profile"):
        Profile.load(path)


def test_plans_are_json_only(tmp_path):
    import pickle

    path = tmp_path / "plan.json"
    path.write_bytes(pickle.dumps({"schema": "attnforge.plan"}))
    with pytest.raises(af.PlanError, match="not valid JSON"):
        af.Plan.load(path)


# ------------------------------------------------------------------------- plans against models
def _tiny_plan(model, inputs, keep):
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    sites = af.find_attention(model, inputs)
    entries = tuple(SitePlan(s.id, s.num_heads, s.num_kv_heads, (af.SinkWindow(2, 4),) * s.num_kv_heads)
                    for s in sites[:keep])
    return Plan(fingerprint(sites), "tiny", entries, {"density": 0.5}, (24,))


def test_plan_missing_a_site_is_refused_not_run_dense():
    model, inputs = tiny(24, sdpa=True)
    compiled, _ = _compiled(model, plan=_tiny_plan(model, inputs, keep=1))
    with pytest.raises(Exception, match=r"the plan has no entry for site\(s\) \['attn.1") as info:
        compiled(*inputs)
    assert isinstance(getattr(info.value, "inner_exception", info.value), af.PlanError)   # Dynamo wraps it
    assert af.runtime.counters["reference"] == 0                   # nothing ran half-planned


def test_complete_plan_runs_every_site_planned():
    model, inputs = tiny(24, sdpa=True)
    compiled, be = _compiled(model, plan=_tiny_plan(model, inputs, keep=2))
    compiled(*inputs)
    assert len(be.records[0].planned) == 2 and af.runtime.counters["reference"] == 2


def test_backward_kernel_that_fails_falls_back_or_raises(on_gpu, monkeypatch):
    """A Triton backward that breaks (compile error, out of resources) must not lose a training step under
    impl='auto': the reference's gradients, a warning and a recorded fallback; impl='triton' raises."""
    if not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU path of the kernels)")
    from attnforge import codegen

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(ops, "_triton_backward", broken)
    key = af.runtime.kernels.register_source(af.codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    out = torch.ops.attnforge.attention(q, q, q, None, True, 0, 0.25, "auto", key)
    with pytest.warns(RuntimeWarning, match="reference backward because Triton backward failed: RuntimeError"):
        (grad,) = torch.autograd.grad(out.sum(), q)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(attention_reference(q64, q64, q64, None, True, 0.25).sum(), q64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    assert any("Triton backward failed" in r for _, r in ops.fallbacks)
    out = torch.ops.attnforge.attention(q, q, q, None, True, 0, 0.25, "triton", key)
    with pytest.raises(RuntimeError, match="out of resources"):
        torch.autograd.grad(out.sum(), q)


def test_forward_kernel_failure_in_training_still_hands_an_exact_lse_to_the_backward(on_gpu, monkeypatch):
    """attention_train under impl='auto' whose forward kernel fails at run time: the reference runs the
    forward (warned, recorded) and fills the log-sum-exp exactly, because the backward's checks pass and its
    Triton kernels will read it; their gradients equal the float64 reference's."""
    if not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU path of the kernels)")
    from attnforge import codegen
    from attnforge.runtime.reference import reference_lse

    real = ops._run_triton

    def forward_fails(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(ops, "_run_triton", forward_fails)
    key = af.runtime.kernels.register_source(af.codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    q = torch.randn(1, 2, 70, 16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="reference attention because Triton kernel failed"):
        out, lse = torch.ops.attnforge.attention_train(q, q, q, None, True, 0, 0.25, "auto", key)
    torch.testing.assert_close(lse, reference_lse(q.detach(), q.detach(), None, True, 0.25))
    monkeypatch.setattr(ops, "_run_triton", real)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert af.runtime.counters["triton_backward"] == 1 and af.runtime.counters["triton_backward_recomputed"] == 0
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(attention_reference(q64, q64, q64, None, True, 0.25).sum(), q64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    # where the kernel cannot run at all (float64 here), nothing will read the lse: it is not computed
    with pytest.warns(RuntimeWarning, match="float64 is not supported"):
        out, lse = torch.ops.attnforge.attention_train(q64, q64, q64, None, True, 0, 0.25, "auto", key)
    assert torch.isnan(lse).all()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_dynamic_true_with_a_float_scale_attribute(compiler):
    """torch.compile(dynamic=True) passes a module's float `scaling` as a graph input (a symbolic float read
    by .item()); SDPA's scale is then no constant and every site used to be declined ("scale is not a
    constant"). The backend has Dynamo specialize those floats and trace again: the sites are rewritten, in
    a graph whose length stays symbolic (a second length does not recompile), and the outputs are the model's."""
    pytest.importorskip("transformers")
    from test_padding import _llama

    model = _llama()
    torch._dynamo.reset()
    be = af.Backend(compiler=compiler)
    compiled = torch.compile(model, backend=be, dynamic=True)
    af.runtime.reset_counters()
    with torch.no_grad():
        for n in (9, 17):
            ids = torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert be.records and not any(r.declined for r in be.records)
    assert all(len(r.rewritten) == 2 and r.sites[0].q_len.startswith("s") for r in be.records)
    # Inductor's own scalar pass restarts once more for the other floats (an eps, an exponent): its record
    # is the same graph again, not a recompile per length
    assert len(be.records) == (1 if compiler == "eager" else 2)
    assert af.runtime.counters["reference"] == 4
