"""The torch.compile backend: by object and by name, through Inductor, backward, records."""
import pytest
import torch

import attnforge as af
from attnforge.compiler.backend import named_backend
from attnforge.compiler.models import tiny


def test_backend_by_name_with_options_goes_through_inductor():
    model, inputs = tiny(40, sdpa=True)
    out = torch.compile(model, backend="attnforge", options={"impl": "reference"})(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    be = named_backend({"impl": "reference"})
    assert be.records and len(be.records[-1].rewritten) == 2
    assert be.records[-1].kernels == ()            # impl='reference' emits no kernel
    assert af.runtime.counters["reference"] == 2


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("attnforge") == "attnforge.compiler.backend:attnforge_backend"


def test_training_step_gradients_match_eager():
    model, inputs = tiny(24)
    model.train()
    compiled = torch.compile(model, backend=af.Backend())
    loss_c = compiled(*inputs).logsumexp(-1).mean()
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_e = model(*inputs).logsumexp(-1).mean()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert af.runtime.counters["reference"] >= 2


def test_explicit_triton_on_cpu_runs_the_interpreter_kernel():
    if not af.runtime.kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    model, inputs = tiny(20, sdpa=True)
    be = af.Backend(impl="triton", compiler="eager")
    out = torch.compile(model, backend=be)(*inputs)
    torch.testing.assert_close(out, model(*inputs), rtol=1e-4, atol=1e-4)
    assert af.runtime.counters["triton_interpreter"] == 2 and af.runtime.counters["reference"] == 0
    (k,) = {kr.name for kr in be.records[-1].kernels}
    assert k == "attnforge_fwd_dense_causal"


def test_explicit_triton_never_falls_back():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(af.KernelUnavailable, match="impl='triton'"):
        torch.ops.attnforge.attention(q, q, q, None, False, 0, 0.3, "triton", "")
    # the automatic choice on CPU takes the reference
    out = torch.ops.attnforge.attention(q, q, q, None, False, 0, 0.3, "auto", "")
    assert af.runtime.counters["reference"] == 1 and out.dtype == torch.float64


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="impl must be one of"):
        af.Backend(impl="fast")
    with pytest.raises(ValueError, match="compiler must be one of"):
        af.Backend(compiler="tvm")


def test_fake_impl_under_dynamic_shapes_does_not_recompile_per_length():
    model, _ = tiny(16, sdpa=True)
    be = af.Backend(compiler="eager")
    compiled = torch.compile(model, backend=be, dynamic=True)
    for n in (9, 13, 21, 30):
        ids = torch.randint(0, 256, (1, n))
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert len(be.records) == 1 and len(be.records[0].rewritten) == 2
