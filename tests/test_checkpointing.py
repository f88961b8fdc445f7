"""Activation checkpointing (passes.regions): Dynamo captures each checkpointed layer as a higher-order op
with a sub-graph; the passes rewrite the attention inside it, and a padded or packed batch's mask is
rebuilt there from the padding vector, so a checkpointed training step runs the plan exactly as an
unchecked one does."""
import copy

import pytest
import torch

import attnforge as af
from attnforge.compiler import hf
from attnforge.compiler.capture import tracing_config
from attnforge.passes import regions

from test_padding import _llama, _plan

transformers = pytest.importorskip("transformers")


def _packed_batch():
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(1, 256, (n,), generator=g).tolist()} for n in (30, 17, 24)]
    return DataCollatorWithFlattening()(features)          # input_ids, labels, position_ids: one packed row


def _step(checkpointing: bool, batch, plan_forms=None):
    torch._dynamo.reset()
    model = _llama()
    # checkpointed: the config's use_cache=True, which Hugging Face drops for checkpointed training (and so
    # reads the packing); unchecked, use_cache=True would keep a cache and read no packing: give False
    model.config.use_cache = checkpointing
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    af.optimize(model, _plan(model, plan_forms) if plan_forms else _plan(model), impl="reference",
                compiler="eager" if not checkpointing else "inductor")
    af.runtime.reset_counters()
    loss = model(**batch).loss
    loss.backward()
    return model, loss, dict(af.runtime.counters)


@pytest.mark.parametrize("layout", ["packed", "plain"])
def test_a_checkpointed_training_step_runs_the_plan_as_an_unchecked_one(layout):
    """Gradient checkpointing on, Inductor: the sites inside the checkpointed layers are found (one graph, the
    model's own site ids), planned, packed where the batch is; loss and every weight's gradient equal the
    same plan without checkpointing, and the attention ran twice per layer (the region's recomputation)."""
    batch = _packed_batch()
    if layout == "plain":
        batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    ours, loss, calls = _step(True, batch)
    (record,) = ours.attnforge_backend.records
    assert [s.id for s in record.sites] == ["model.layers.0.self_attn#0", "model.layers.1.self_attn#0"]
    assert [s.mask for s in record.sites] == (["padding"] * 2 if layout == "packed" else ["causal"] * 2)
    assert record.planned == tuple(s.id for s in record.sites) and not record.unplanned
    assert "# region 0" in record.code and record.code.count("attnforge.attention") == 2
    assert calls["reference"] == 4 and calls.get("padded", 0) == (4 if layout == "packed" else 0)
    plain, want, _ = _step(False, batch)
    assert abs(loss.item() - want.item()) < 1e-5
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name
    dense, dense_loss, _ = _step(False, batch, ((af.Dense(), af.Dense()),) * 2)
    assert abs(dense_loss.item() - loss.item()) > 1e-4               # the plan's forms really ran


def test_the_padding_vector_goes_into_the_region_instead_of_the_mask():
    """lift_padding: each region takes the [B, S] vector (one more operand) and builds the mask inside; the
    N x S mask is no longer an operand, so the outer mask op is gone; find_attention sees the sites too."""
    model = _llama()
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    hf.uses_padding_masks(model)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    torch._dynamo.reset()
    with tracing_config():          # as attnforge traces (Hugging Face's hub-kernel wrapper; see compiler.capture)
        torch.compile(model, backend=keep)(ids, attention_mask=mask, labels=ids)
    (gm,) = graphs
    ops = (torch.ops.attnforge.padding_mask, torch.ops.attnforge.padding_mask.default)
    assert sum(n.target in ops for n in gm.graph.nodes) == 1 and len(regions.bodies(gm)) == 2
    assert regions.lift_padding(gm) == 2
    assert not any(n.target in ops for n in gm.graph.nodes)
    found = regions.detect_regions(gm)[1]
    assert [[s.mask for s in sites] for sites, _ in found] == [[], ["padding"], ["padding"]]
    sites = af.find_attention(model, (ids, mask))
    assert [s.mask for s in sites] == ["padding", "padding"]


def test_a_plan_never_lands_on_a_site_whose_causality_is_an_exact_mask():
    """Sites named relative to a submodule (a graph resumed after a break is not checked against the plan's
    fingerprint) that carry an opaque mask run dense, with the reason, instead of taking the forms on top."""
    import dataclasses
    import warnings

    model = _llama()
    plan = _plan(model)
    sites = af.find_attention(model, (torch.ones(1, 8, dtype=torch.long),))
    resumed = [dataclasses.replace(s, id=s.id.removeprefix("model."), mask="boolean", causal=False) for s in sites]
    backend = af.Backend(plan=plan, impl="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries, unplanned = backend._plan_entries(resumed)
    assert not entries and [sid for sid, _ in unplanned] == [s.id for s in resumed]
    assert any("runs dense" in str(w.message) for w in caught)


def test_inside_a_region_the_backward_kernels_read_the_recomputed_log_sum_exp():
    """The plan kernel's backward inside a checkpointed region: the region's recomputation keeps each site's
    log-sum-exp (attention_train), so no extra forward runs for it (`triton_backward_recomputed` stays 0; a
    second read of the saved tensors, which a non-reentrant checkpoint refuses, is not made); gradients
    equal the reference's."""
    from attnforge.runtime import kernels

    if not kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    grads = {}
    for impl in ("triton", "reference"):
        torch._dynamo.reset()
        model = _llama()
        model.config.use_cache = True
        model.gradient_checkpointing_enable()
        model.train()
        af.optimize(model, _plan(model), impl=impl, compiler="eager")
        af.runtime.reset_counters()
        model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad for p in model.parameters()]
        if impl == "triton":
            assert af.runtime.counters["triton_backward"] == 2 and af.runtime.counters["triton_interpreter"] == 4
            assert af.runtime.counters.get("triton_backward_recomputed", 0) == 0
    for a, b in zip(*grads.values()):
        assert (a - b).abs().max() < 1e-4
