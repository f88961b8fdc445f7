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


def backward_against_alone(q, k, v, padding, forms):
    """attention_train + backward through the plan kernel's backward (causal): the gradients within PyTorch's
    own error of each sequence alone in float64, the forward's log-sum-exp read. Returns (q, k, v leaves, lse)."""
    af.runtime.reset_counters()
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.attnforge.attention_train(*ours, None, True, 0, 0.25, "triton",
                                                   _key(causal=True, plan=bool(forms)), forms_to_json(forms), padding)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    assert af.runtime.counters["triton_backward"] == 1 and af.runtime.counters["reference"] == 0
    assert af.runtime.counters.get("triton_backward_recomputed", 0) == 0        # the forward's lse was read
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    P.attention_rows(*ref_in, padding, True, 0.25, forms).backward(grad.double())
    theirs_in = [t.clone().requires_grad_() for t in (q, k, v)]
    P.reference(*theirs_in, padding, True, 0.25, forms).backward(grad)
    for a, b, c in zip(ours, theirs_in, ref_in):
        assert_closer(a.grad, b.grad, c.grad, slack=8.0)
    return ours, lse


@interpreted
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_padded_backward_matches_float64(mix):
    """attention_train + backward through the plan kernel's backward (compacted like the forward): gradients
    of the rows alone; padding slots get none."""
    q, k, v, padding = _data(seed=1)
    ours, lse = backward_against_alone(q, k, v, padding, MIXES[mix])
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


@interpreted
def test_decoding_steps_of_a_padded_batch():
    """Fewer queries than keys (a decoding step over a padded cache, in a compiled forward): dense, the
    padding's own mask through the masked kernel; with a plan, the reference (impl='triton' says so)."""
    q, k, v, padding = _data(s=90, seed=4)
    out = torch.ops.attnforge.attention(q[:, :, -3:], k, v, None, True, 0, 0.25, "triton", _key(causal=True), "",
                                        padding)
    assert af.runtime.counters["triton_interpreter"] == 1
    ref = P.attention_rows(q[:, :, -3:].double(), k.double(), v.double(), padding, True, 0.25)
    assert_closer(out, P.reference(q[:, :, -3:], k, v, padding, True, 0.25), ref)
    forms = forms_to_json(MIXES["window+elastic"])
    with pytest.raises(af.KernelUnavailable, match="planned padded call with fewer queries than keys"):
        torch.ops.attnforge.attention(q[:, :, -3:], k, v, None, True, 0, 0.25, "triton", _key(causal=True, plan=True),
                                      forms, padding)


# ------------------------------------------------------------------------------ Hugging Face models
transformers = pytest.importorskip("transformers")

from attnforge.compiler import hf  # noqa: E402
from attnforge.compiler.decode import KVCacheError  # noqa: E402
from attnforge.compiler.plan import Plan, SitePlan, fingerprint  # noqa: E402
from attnforge.runtime.forms import KVEvict, KVQuant, Linear  # noqa: E402

PLAN_FORMS = ((SinkWindow(2, 8), ElasticWindow(1, 3, 0.2)), (Dense(), BlockSparse(64, (0,), (0,))))


def _llama(layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _plan(model, forms=PLAN_FORMS):
    sites = af.find_attention(model, (torch.ones(1, 8, dtype=torch.long),))
    return Plan(fingerprint(sites), "t", tuple(SitePlan(s.id, 4, 2, f) for s, f in zip(sites, forms)), {}, (30,))


def _batch(lengths, seed=3, left=True):
    """Token rows of these lengths, padded (left by default, as generate() pads) to the longest."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 256, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, where], mask[i, where] = r, 1
    return rows, ids, mask


def test_mask_function_builds_what_sdpa_mask_builds():
    """attnforge's mask function returns sdpa_mask's values, through the padding op where it is a plain causal
    or bidirectional padding mask, through sdpa_mask itself otherwise (a sliding window here)."""
    from transformers import masking_utils as mu

    am = torch.ones(3, 12, dtype=torch.long)
    am[0, :4] = 0
    am[2, 9:] = 0
    cases = [(dict(q_length=12, kv_length=12), True), (dict(q_length=1, kv_length=12, q_offset=11), True),
             (dict(q_length=3, kv_length=10, q_offset=9, kv_offset=2), True),
             (dict(q_length=12, kv_length=12, mask_function=mu.bidirectional_mask_function), True),
             (dict(q_length=3, kv_length=10, q_offset=2, kv_offset=2), False),     # queries not the last keys
             (dict(q_length=12, kv_length=12, mask_function=mu.sliding_window_causal_mask_function(4)), False)]
    for case, ours in cases:
        args = dict(batch_size=3, attention_mask=am, **case)
        want, got = mu.sdpa_mask(**args), hf.attnforge_mask(**args)
        assert torch.equal(got, want)
        assert hasattr(got, "_attnforge_padding") == ours
    assert hf.attnforge_mask(batch_size=3, q_length=12, kv_length=12, attention_mask=torch.ones_like(am)) is None


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_padded_batch_runs_the_plan_each_row_as_alone(impl):
    """af.optimize on an SDPA model: a padded batch (left, right and a hole) compiles with padded sites, the op
    takes the padding vector (no N x S mask is built) and every row's logits equal that row run alone; an
    all-ones attention_mask equals no mask at all."""
    if impl == "triton" and not kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    model = _llama()
    plan = _plan(model)
    af.optimize(model, plan, impl=impl, compiler="eager")
    rows, ids, mask = _batch((30, 17, 24))
    mask[2, 10] = 0                                    # a hole: the row is its other tokens
    positions = (mask.cumsum(1) - 1).clamp(min=0)      # the model's own positions as generate() gives them
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions).logits
        records = model.attnforge_backend.records
        assert [s.mask for s in records[-1].sites] == ["padding", "padding"] and records[-1].planned
        assert "padding_mask" not in records[-1].code and records[-1].code.count("attnforge.attention") == 2
        assert af.runtime.counters["padded"] == 2
        if impl == "triton":
            assert af.runtime.counters["triton_interpreter"] == 2 and af.runtime.counters["reference"] == 0
        for i in range(3):
            real = mask[i].nonzero().squeeze(1)
            alone = model(ids[i:i + 1, real]).logits
            assert (out[i, real] - alone[0]).abs().max() < 1e-4
        assert torch.equal(model(ids[:1], attention_mask=torch.ones_like(ids[:1])).logits, model(ids[:1]).logits)


def test_padded_generation_is_each_row_generated_alone():
    """model.generate() with left-padded prompts over the plan's per-head cache: each row's tokens are the
    tokens that row generates alone; with no plan, Hugging Face's own padded generate(). Each row's cache
    holds only its own tokens."""
    model = _llama()
    plan = _plan(model)
    rows, ids, mask = _batch((30, 17, 24))
    for p in (None, plan):
        out, cache = af.generate(model, ids, p, max_new_tokens=6, attention_mask=mask)
        for i, r in enumerate(rows):
            alone, single = af.generate(model, r[None], p, max_new_tokens=6)
            assert torch.equal(out[i, 30:], alone[0, len(r):])
        if p is None:
            with torch.no_grad():
                assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
            site = cache.layers[0].site
            assert site.lens == [30 + 5, 17 + 5, 24 + 5]            # real tokens per row (the last step's not yet)
            assert [int(x) for x in (site.pos >= 0).sum(1)] == [2 * n for n in site.lens]
    af.optimize(model, plan, compiler="eager")                 # the same through model.generate()
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), out)


def test_right_padded_prompts_are_refused_with_what_to_do():
    """Right padding puts a padding slot last: the next token would be predicted from it (Hugging Face warns
    and generates from what its mask leaves there); the plan cache refuses and says to pad on the left."""
    model = _llama()
    rows, ids, mask = _batch((30, 17, 24), left=False)
    for p in (None, _plan(model)):
        with pytest.raises(KVCacheError, match="right-padded prompt.*padding_side = 'left'"):
            af.generate(model, ids, p, max_new_tokens=2, attention_mask=mask)
    out, _ = af.generate(model, ids[:1], None, max_new_tokens=2, attention_mask=mask[:1])   # the full row is fine
    assert out.shape == (1, 32)


@interpreted
def test_padded_decoding_kernel_reads_each_rows_own_cache():
    model = _llama()
    plan = _plan(model)
    rows, ids, mask = _batch((30, 9, 24), seed=5)
    want, _ = af.generate(model, ids, plan, max_new_tokens=5, impl="reference", attention_mask=mask)
    af.runtime.reset_counters()
    got, _ = af.generate(model, ids, plan, max_new_tokens=5, impl="triton", attention_mask=mask)
    assert torch.equal(got, want) and af.runtime.counters["kvcache_decode_triton"] == 2 * 4


def test_linear_groups_of_a_padded_batch_take_each_rows_tokens():
    model = _llama()
    plan = _plan(model, ((Linear("taylor2", window=4), Dense()), (Dense(), SinkWindow(1, 6))))
    rows, ids, mask = _batch((20, 11))
    out, _ = af.generate(model, ids, plan, max_new_tokens=4, attention_mask=mask)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, 20:], af.generate(model, r[None], plan, max_new_tokens=4)[0][0, len(r):])


def test_evicting_and_quantized_groups_refuse_padded_prompts():
    model = _llama()
    rows, ids, mask = _batch((12, 7))
    for forms in (KVEvict("h2o", 0.5, recent=2), KVQuant(4, group=4, residual=4)):
        plan = _plan(model, ((forms, Dense()), (Dense(), Dense())))
        with pytest.raises(KVCacheError, match="rows of equal length"):
            af.generate(model, ids, plan, max_new_tokens=2, attention_mask=mask)


def test_padded_training_step_through_inductor():
    """A compiled training step on a right-padded batch (labels -100 at padding): the loss and every weight's
    gradient equal eager SDPA's on the same batch (padding rows feed no real token), and the attention ran as
    padded sites (the reference's backward traced by AOTAutograd)."""
    rows, ids, mask = _batch((24, 13, 19), left=False)
    labels = ids.masked_fill(mask == 0, -100)
    eager = _llama()
    loss = eager(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    model = _llama()
    be = af.Backend(impl="reference")
    hf.uses_padding_masks(model)
    ours = torch.compile(model, backend=be)(ids, attention_mask=mask, labels=labels).loss
    ours.backward()
    assert [s.mask for s in be.records[0].sites] == ["padding", "padding"]
    assert abs(ours.item() - loss.item()) < 1e-5
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name


def test_an_optimized_model_without_a_cache_keeps_its_plan_at_every_length():
    """use_cache=False (SmolLM2 as attnforge loads it, or training): Hugging Face then builds a packed-sequence
    mask from the positions, opaque once Dynamo compiles the length symbolically. af.optimize gives such calls
    an all-ones mask made in the graph, so every length runs the plan: two compilations for four lengths, the
    same logits as a static compile of each length."""
    import copy

    model = _llama()
    model.config.use_cache = False
    plan = _plan(model)
    static = copy.deepcopy(model)
    xs = [torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in (30, 20, 25, 41)]
    with torch.no_grad():
        wants = []
        for x in xs:
            torch._dynamo.reset()
            wants.append(torch.compile(static, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(x).logits)
        torch._dynamo.reset()
        af.optimize(model, plan, impl="reference", compiler="eager")
        for x, want in zip(xs, wants):
            assert torch.equal(model(x).logits, want)
    records = model.attnforge_backend.records
    assert len(records) == 2 and records[-1].sites[0].q_len.startswith("s")         # one symbolic-length graph
    assert all(r.planned and not r.unplanned and [s.mask for s in r.sites] == ["causal"] * 2 for r in records)


def test_a_mask_attnforge_cannot_read_runs_dense_and_says_so():
    """The same model compiled by hand (no af.optimize): the symbolic-length graph's masks are opaque, so its
    sites run dense, exactly as the model wrote them, with a warning and the reason in the record (before,
    the plan's fingerprint check failed the compile)."""
    model = _llama()
    model.config.use_cache = False
    plan = _plan(model)
    torch._dynamo.reset()                   # (finding the sites compiled one length already)
    be = af.Backend(plan=plan, impl="reference", compiler="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randint(1, 256, (1, 33), generator=torch.Generator().manual_seed(7))
    import warnings

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x[:, :30])
        out = compiled(x).logits
        assert (out - model(x).logits).abs().max() < 1e-5                 # dense: the model's own attention
    assert any("the plan is not applied to 2 site" in str(w.message) for w in caught)
    assert be.records[0].planned and not be.records[0].unplanned
    assert not be.records[-1].planned and [sid for sid, _ in be.records[-1].unplanned] == [s.id for s in be.records[-1].sites]
