"""The linear hybrid's backward (runtime.linear.linear_group_chunked, the op attnforge::linear_backward):
gradients against autograd through the quadratic float64 reference, the op's own path checked by its
counter, next to plan-kernel groups, in padded and packed batches, and in a compiled training step."""
import itertools

import pytest
import torch
from attnforge.runtime import kernels, ops
from attnforge.runtime.forms import Dense, ElasticWindow, Linear, SinkWindow, forms_to_json
from attnforge.runtime.linear import FeatureMaps, linear_group_chunked, linear_group_reference, register_maps
from attnforge.runtime.padding import reference as padded_reference
from attnforge.runtime.reference import attention_reference

import attnforge as af

needs_interpreter = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def _maps(d, seed=3, gain=1.3):
    g = torch.Generator().manual_seed(seed)
    return register_maps(FeatureMaps(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g),
                                     torch.eye(d) + 0.3 * torch.randn(d, d, generator=g), gain))[0]


def _grads(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("feature_map", ["taylor2", "hedgehog"])
def test_chunked_form_and_its_gradients_equal_the_reference(feature_map):
    # every alignment of the sink, the window and the chunk: N below, at, and past chunk multiples; windows
    # shorter than a chunk, spanning several, longer than N; sinks inside the first chunk and past it
    d = 8
    key = _maps(d) if feature_map == "hedgehog" else ""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, window, sink, chunk in itertools.product([1, 9, 16, 37], [1, 5, 16, 50], [0, 3, 20], [8, 16]):
        form = Linear(feature_map, window, sink, key)
        q = torch.randn(2, 3, n, d, generator=g, dtype=torch.float64)
        k = torch.randn(2, n, d, generator=g, dtype=torch.float64)
        v = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
        grad = torch.randn(2, 3, n, 6, generator=g, dtype=torch.float64)
        ref, ref_grads = _grads(lambda a, b, c, f=form: linear_group_reference(a, b, c, f, 0.4), (q, k, v), grad)
        out, grads = _grads(lambda a, b, c, f=form, ch=chunk: linear_group_chunked(a, b, c, f, 0.4, chunk=ch),
                            (q, k, v), grad)
        for x, y in zip((out, *grads), (ref, *ref_grads)):
            worst = max(worst, float((x - y).abs().max().detach()))
    assert worst < 1e-10, worst


def _site(n=40, d=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, n, d, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 4, n, d, generator=g, dtype=dtype) for _ in range(2))
    forms = (Linear("taylor2", 6, 2), Dense(), Linear("hedgehog", 9, 0, _maps(d, seed=5)), SinkWindow(2, 7))
    return q, k, v, forms


def _op(impl, forms, padding=None):
    return lambda q, k, v: torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, impl, ops._plan_key() or "",
                                                         forms_to_json(forms), padding)


def test_op_backward_runs_the_chunked_form_and_matches_the_reference():
    q, k, v, forms = _site()
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, ref = _grads(lambda a, b, c: attention_reference(a, b, c, None, True, 0.3, 0, forms), (q, k, v), grad)
    before = ops.counters["linear_backward"]
    _, got = _grads(_op("auto", forms), (q, k, v), grad)
    assert ops.counters["linear_backward"] == before + 1
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)
    # impl='reference' keeps the oracle's own backward
    _grads(_op("reference", forms), (q, k, v), grad)
    assert ops.counters["linear_backward"] == before + 1


def test_no_rows():
    q = torch.randn(1, 2, 0, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 0, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = _op("auto", (Linear("taylor2", 4, 1),))(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_then_chunked_and_plan_kernel_backward(dtype):
    # the forward through the linear and plan kernels (impl='triton'), its log-sum-exp feeding the plan
    # kernel's backward for the Dense / SinkWindow groups; gradients against the float64 reference
    q, k, v, forms = _site(n=37, d=16, dtype=torch.float32, seed=4)
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(3))
    _, ref = _grads(lambda a, b, c: attention_reference(a, b, c, None, True, 0.3, 0, forms),
                    (q.double(), k.double(), v.double()), grad.double())
    counts = {c: ops.counters[c] for c in ("linear_backward", "triton_backward", "triton_linear")}

    def step(a, b, c):
        out, _ = torch.ops.attnforge.attention_train(a, b, c, None, True, 0, 0.3, "triton", ops._plan_key(),
                                                        forms_to_json(forms))
        return out

    _, got = _grads(step, (q.to(dtype), k.to(dtype), v.to(dtype)), grad.to(dtype))
    assert {c: ops.counters[c] - counts[c] for c in counts} == {"linear_backward": 1, "triton_backward": 1,
                                                                "triton_linear": 1}
    tol = 2e-4 if dtype == torch.float32 else 6e-2
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_padded_and_packed_batches_take_each_sequence_alone(layout):
    q, k, v, forms = _site(n=30)
    forms = (forms[0], ElasticWindow(2, 4, 0.5), forms[2], forms[3])
    if layout == "padded":
        padding = torch.ones(2, 30, dtype=torch.bool)
        padding[0, :9] = False                                          # left padding
    else:
        padding = torch.tensor([[1] * 12 + [2] * 13 + [0] * 5, [3] * 30])
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, ref = _grads(lambda a, b, c: padded_reference(a, b, c, padding, True, 0.3, forms), (q, k, v), grad)
    before = ops.counters["linear_backward"]
    _, got = _grads(_op("auto", forms, padding), (q, k, v), grad)
    assert ops.counters["linear_backward"] == before + 1
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_training_step_keeps_the_op(packed):
    # packed: the compaction reads the sequence count on the host, which a traced backward cannot (the op
    # runs it at run time)
    q, k, v, forms = _site(n=24)
    text = forms_to_json(forms)
    padding = torch.tensor([[1] * 10 + [2] * 14, [5] * 20 + [0] * 4]) if packed else None

    def loss(a, b, c):
        return torch.ops.attnforge.attention(a, b, c, None, True, 0, 0.3, "auto", "", text, padding).square().sum()

    if packed:
        ref_fn = lambda a, b, c: padded_reference(a, b, c, padding, True, 0.3, forms)
    else:
        ref_fn = lambda a, b, c: attention_reference(a, b, c, None, True, 0.3, 0, forms)
    one = torch.tensor(1.0, dtype=torch.float64)
    _, ref = _grads(lambda a, b, c: ref_fn(a, b, c).square().sum(), (q, k, v), one)
    before = ops.counters["linear_backward"]
    _, got = _grads(torch.compile(loss, backend="aot_eager", fullgraph=True), (q, k, v), one)
    assert ops.counters["linear_backward"] == before + 1
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("padded", [False, True])
def test_inductor_training_step_of_a_model_with_linear_groups(padded):
    """af.optimize on a Llama whose plan mixes Linear groups with a window, Inductor: the backward of every
    layer ran the chunked op, and loss and every weight's gradient equal the same plan's oracle
    (impl='reference', eager), a left-padded batch included."""
    from test_padding import _batch, _llama, _plan

    forms = ((Linear("taylor2", 5, 2), SinkWindow(1, 6)),
             (Linear("hedgehog", 4, 1, _maps(16, seed=8)), Dense()))
    if padded:
        _, ids, mask = _batch([30, 19])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    else:
        ids = torch.randint(1, 256, (2, 27), generator=torch.Generator().manual_seed(5))
        batch = {"input_ids": ids, "labels": ids}

    def step(impl, compiler):
        torch._dynamo.reset()
        model = _llama()
        model.config.use_cache = False
        model.train()
        af.optimize(model, _plan(model, forms), impl=impl, compiler=compiler)
        af.runtime.reset_counters()
        loss = model(**batch).loss
        loss.backward()
        return model, loss, dict(af.runtime.counters)

    ours, loss, calls = step("auto", "inductor")
    assert calls.get("linear_backward") == 2 and calls.get("padded", 0) == (2 if padded else 0)
    oracle, want, _ = step("reference", "eager")
    assert abs(loss.item() - want.item()) < 1e-5
    for (name, a), b in zip(ours.named_parameters(), oracle.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name


def test_checkpointed_packed_inductor_step_with_linear_groups():
    """Gradient checkpointing, a packed batch (Hugging Face's flattening collator) and Linear groups under
    Inductor — the traced backward used to stop at the packed sequence count: loss and every weight's
    gradient equal the same plan's oracle without checkpointing (impl='reference', eager)."""
    from test_checkpointing import _packed_batch
    from test_padding import _llama, _plan

    forms = ((Linear("taylor2", 5, 2), SinkWindow(1, 6)), (Dense(), Linear("taylor2", 4, 1)))

    def step(checkpointing, impl, compiler):
        torch._dynamo.reset()
        model = _llama()
        model.config.use_cache = checkpointing     # HF drops the cache for checkpointed training (see there)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        af.optimize(model, _plan(model, forms), impl=impl, compiler=compiler)
        af.runtime.reset_counters()
        loss = model(**_packed_batch()).loss
        loss.backward()
        return model, loss, dict(af.runtime.counters)

    ours, loss, calls = step(True, "auto", "inductor")
    assert calls.get("linear_backward") == 2 and calls.get("padded") == 4      # the forward ran twice (recompute)
    oracle, want, _ = step(False, "reference", "eager")
    assert abs(loss.item() - want.item()) < 1e-5
    for (name, a), b in zip(ours.named_parameters(), oracle.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name
