"""The per-head KV cache: each group stores only what its form reads again; decoding over it (PyTorch
reference and the split-KV Triton kernel under the interpreter) equals dense attention with the same
forms, in float64; memory follows the layouts; and inside HF generate() it gives HF's own tokens when
every group is dense and the full-forward logits of the same plan otherwise."""
import pytest
import torch

import attnforge as af
from attnforge import codegen, runtime
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, SinkWindow
from attnforge.runtime.kvcache import KVCacheError, SiteKVCache, layout_for
from attnforge.runtime.reference import attention_reference

FORMS = (Dense(), SinkWindow(3, 7), ElasticWindow(2, 4, 0.1), BlockSparse(4, (0, 2), (0, 2)))


def _data(g, t, d=16, r=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(2, g, t, d, generator=gen, dtype=dtype)
    v = torch.randn(2, g, t, d, generator=gen, dtype=dtype)
    q = torch.randn(2, g * r, t, d, generator=gen, dtype=dtype)
    return q, k, v


def _want(q, k, v, t, forms):
    """Dense attention of the query at position t over keys 0..t with the forms' masks (float64)."""
    return attention_reference(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], None, False, 0.25,
                               forms=forms)[:, :, 0]


@pytest.mark.parametrize("prefill", [1, 5, 20])
def test_decode_reference_equals_masked_dense_attention_at_every_step(prefill):
    q, k, v = _data(len(FORMS), 45)
    cache = SiteKVCache(FORMS, max_length=45)
    cache.append(k[:, :, :prefill], v[:, :, :prefill])
    for t in range(prefill, 45):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert (cache.decode_reference(q[:, :, t], 0.25) - _want(q, k, v, t, FORMS)).abs().max() < 1e-12


def test_groups_hold_only_what_their_form_reads():
    cache = SiteKVCache(FORMS, max_length=64)
    _, k, v = _data(len(FORMS), 64)
    cache.append(k, v)
    caps = [64, 3 + 7, 2 + ElasticWindow(2, 4, 0.1).window_at(64), 2 * 4 + 3 * 4]
    assert cache._caps == caps
    assert cache.kv_entries() == sum(caps) == SiteKVCache.predicted_entries(FORMS, 64)
    assert cache.nbytes() == 2 * sum(caps) * (16 + 16) * 8 + sum(caps) * 8      # K, V (float64) + positions
    # the window group's ring holds exactly the sink and the last 7 positions
    o = cache._offs[1]
    assert sorted(cache.pos[o:o + 10].tolist()) == [0, 1, 2] + list(range(57, 64))


def test_decode_kernel_matches_float64_under_the_interpreter():
    key = runtime.kernels.register_source(codegen.render_decode().source)
    loaded = runtime.kernels.load_kernel(key, torch.device("cpu"))
    q, k, v = _data(len(FORMS), 45, r=3)
    cache = SiteKVCache(FORMS, max_length=45)
    cache.append(k.float(), v.float())
    want = _want(q, k, v, 44, FORMS)
    for splits in (1, 2, 5):                          # the split combine is exact in any count
        out, used = cache.decode(q[:, :, 44].float(), 0.25, loaded, splits=splits)
        assert used == splits
        assert (out.double() - want).abs().max() < 1e-5


def test_a_group_with_no_readable_key_gives_zeros_and_errors_are_clear():
    cache = SiteKVCache((SinkWindow(0, 1),), max_length=8)
    k = torch.randn(1, 1, 4, 8)
    cache.append(k, k)
    cache.pos[:] = -1                                 # nothing readable (forms never do this; the kernel
    cache._flags[:] = 0                               # and reference must still not divide by zero)
    assert cache.decode_reference(torch.randn(1, 2, 8), 0.3).abs().max() == 0
    with pytest.raises(KVCacheError, match="KV heads"):
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    elastic = SiteKVCache((ElasticWindow(1, 2, 0.5),), max_length=4)
    with pytest.raises(KVCacheError, match="max_length"):
        elastic.append(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    with pytest.raises(KVCacheError):
        layout_for("not a form", 8)


# ------------------------------------------------------------------ inside Hugging Face generate()
transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def test_all_dense_generation_equals_hf_generate():
    model = _llama()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    runtime.reset_counters()
    got, cache = af.generate(model, ids, None, max_new_tokens=12)
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_decode_reference"] == 2 * 11          # every step read our cache
    assert model.config._attn_implementation == "sdpa"                   # restored


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_plan_decoding_equals_the_full_forward_of_the_same_plan(impl):
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    model = _llama()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "t", (SitePlan(sites[0].id, 4, 2, (SinkWindow(2, 8), BlockSparse(8, (0,), (0, 2)))),
                                          SitePlan(sites[1].id, 4, 2, (Dense(), SinkWindow(1, 5)))), {}, (30,))
    runtime.reset_counters()
    out, cache = af.generate(model, ids, plan, max_new_tokens=10, impl=impl)
    assert runtime.counters[f"kvcache_decode_{impl}"] == 2 * 9
    torch._dynamo.reset()
    with torch.no_grad():
        full = torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(out).logits
    steps = af.PlanCache(model, plan, max_length=out.shape[1], impl=impl)
    with af.plan_attention(model), torch.no_grad():
        logits = [model(out[:, :30], past_key_values=steps).logits[:, -1]]
        for t in range(30, out.shape[1] - 1):
            logits.append(model(out[:, t:t + 1], past_key_values=steps).logits[:, -1])
    logits = torch.stack(logits, 1)
    assert (logits - full[:, 29:-1]).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), out[:, 30:])
    dense = af.PlanCache(model, None, max_length=out.shape[1])
    with af.plan_attention(model), torch.no_grad():
        model(out, past_key_values=dense)
    assert steps.nbytes() < dense.nbytes() and steps.kv_entries() < dense.kv_entries()


def test_chunked_prefill_is_refused():
    model = _llama()
    ids = torch.randint(0, 256, (1, 12))
    cache = af.PlanCache(model, None, max_length=40)
    with af.plan_attention(model), torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(KVCacheError, match="one token per step"):
            model(ids[:, :3], past_key_values=cache)


def test_one_token_steps_fill_the_same_slots_as_a_bulk_write():
    """The decoding fast path (slots in Python ints, one scatter) equals the vectorized bulk write."""
    _, k, v = _data(len(FORMS), 50)
    step = SiteKVCache(FORMS, max_length=50)
    for t in range(50):
        step.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    bulk = SiteKVCache(FORMS, max_length=50)
    bulk.append(k, v)
    assert torch.equal(step.pos, bulk.pos) and torch.equal(step.k, bulk.k) and torch.equal(step.v, bulk.v)
    assert torch.equal(step.keep_flags(), bulk.keep_flags())
