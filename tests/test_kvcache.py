"""The per-head KV cache: each group stores only what its form reads again; decoding over it (PyTorch
reference and the split-KV Triton kernel under the interpreter) equals dense attention with the same
forms, in float64; memory follows the layouts; and inside HF generate() it gives HF's own tokens when
every group is dense and the full-forward logits of the same plan otherwise."""
import pytest
import torch

import attnforge as af
from attnforge import codegen, runtime
from attnforge.compiler.decode import cache_kwargs
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
    assert cache.nbytes() == 2 * sum(caps) * (16 + 16) * 8 + 2 * sum(caps) * 4  # K, V (float64) + int32 positions
    # the window group's ring holds exactly the sink and the last 7 positions
    o = cache._offs[1]
    assert sorted(cache.pos[0, o:o + 10].tolist()) == [0, 1, 2] + list(range(57, 64))


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
        logits = [model(out[:, :30], **cache_kwargs(model, steps)).logits[:, -1]]
        for t in range(30, out.shape[1] - 1):
            logits.append(model(out[:, t:t + 1], **cache_kwargs(model, steps)).logits[:, -1])
    logits = torch.stack(logits, 1)
    assert (logits - full[:, 29:-1]).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), out[:, 30:])
    dense = af.PlanCache(model, None, max_length=out.shape[1])
    with af.plan_attention(model), torch.no_grad():
        model(out, **cache_kwargs(model, dense))
    assert steps.nbytes() < dense.nbytes() and steps.kv_entries() < dense.kv_entries()


def _fed(model, cache, ids, ends, **kwargs):
    """Logits of `ids` fed to the model over `cache` in pieces ending at `ends` (one forward per piece)."""
    out, start = [], 0
    with af.plan_attention(model), torch.no_grad():
        for end in ends:
            out.append(model(ids[:, start:end], **cache_kwargs(model, cache), **kwargs).logits)
            start = end
    return torch.cat(out, 1)


def _continuation_forms():
    from attnforge.runtime.forms import KVEvict, KVQuant, Linear

    return {"window_blocks": {0: (SinkWindow(2, 8), BlockSparse(8, (0,), (0, 2))), 1: (Dense(), SinkWindow(1, 5))},
            "evict_quant_linear": {0: (KVEvict("h2o", 0.5, sink=1, recent=4), KVQuant(4, 8, 8)),
                                   1: (Linear("taylor2", 8, 2), KVEvict("a2sf", 0.5, recent=3, alpha=0.9))}}


@pytest.mark.parametrize("name", ["window_blocks", "evict_quant_linear"])
def test_a_continuation_attends_as_its_tokens_fed_one_by_one(name):
    """n > 1 tokens after the prompt (a chat's next turn, a later prefill chunk) give the logits the same
    tokens give fed one per step: every form keeps its decoding semantics (a ring slides, H2O / A2SF evict after
    each token, KIVI quantizes, a linear group's state advances)."""
    from attnforge.compiler.decode import plan_cache_from_forms

    model = _llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(11))
    forms = _continuation_forms()[name]
    steps = _fed(model, plan_cache_from_forms(forms, 40, "reference"), ids, [12, *range(13, 41)])
    runtime.reset_counters()
    cache = plan_cache_from_forms(forms, 40, "reference")
    if name == "evict_quant_linear":      # the budgets were sized from the first call: said once per layer
        with pytest.warns(UserWarning, match="sized their budgets from the first call's 12 tokens") as seen:
            chunks = _fed(model, cache, ids, [12, 20, 21, 40])
        assert len(seen) == 2
    else:
        chunks = _fed(model, cache, ids, [12, 20, 21, 40])
    # two continuations: at once where reads depend on positions only, else token by token
    counter = "kvcache_continued_batched" if name == "window_blocks" else "kvcache_continued"
    assert runtime.counters[counter] == 8 + 19
    assert runtime.counters["kvcache_prefill"] == 2                 # once per layer
    assert cache.get_seq_length() == 40
    assert (chunks - steps).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_a_dense_continuation_is_one_attention_and_equals_the_full_forward(impl, monkeypatch):
    """Every group full (no plan, or dense layers): the n queries attend over all keys at once through the
    attention op (the generated dense kernel with impl='triton'), equal to the model's own forward."""
    model = _llama()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want = model(ids).logits
    from attnforge.compiler import decode
    from attnforge.compiler.decode import _full_groups

    monkeypatch.setattr(decode, "_MASK_ROWS", 4)    # 4 query rows per call (1024 on real prompts): 15 = 4+4+4+3
    runtime.reset_counters()
    cache = af.PlanCache(model, None, max_length=40, impl=impl)
    got = _fed(model, cache, ids, [9, 10, 25, 33])
    site = cache.layers[0].site
    k, v = _full_groups(site, 33)                                   # the cache itself, viewed: no copy
    assert k.data_ptr() == site.k.data_ptr() and v.data_ptr() == site.v.data_ptr() and k.shape == (2, 2, 33, 16)
    assert torch.equal(k[:, 1], site.k[:, site._offs[1]:site._offs[1] + 33])
    assert runtime.counters["kvcache_continued_batched"] == 15 + 8
    assert "kvcache_continued" not in runtime.counters
    if impl == "triton":
        assert runtime.counters["triton_interpreter"] == 2 * (4 + 2)   # row blocks of both continuations, 2 layers
    assert (got - want).abs().max() < 1e-4


def test_the_next_chat_turn_over_a_kept_cache_generates_what_hf_does():
    """generate(), new user tokens appended, generate() again over the same cache (left-padded batch of two):
    the tokens Hugging Face's own DynamicCache gives."""
    transformers_cache = transformers.DynamicCache
    model = _llama()
    g = torch.Generator().manual_seed(13)
    ids, turn = torch.randint(0, 256, (2, 20), generator=g), torch.randint(0, 256, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def chat(cache, kw):
        first = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kw(cache))
        ids2 = torch.cat([first, turn], 1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
        return model.generate(ids2, attention_mask=mask2, max_new_tokens=6, do_sample=False, **kw(cache))

    with torch.no_grad():
        want = chat(transformers_cache(), lambda c: cache_kwargs(model, c))
    runtime.reset_counters()
    with af.plan_attention(model), torch.no_grad():
        got = chat(af.PlanCache(model, None, max_length=60), lambda c: cache_kwargs(model, c))
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_continued_batched"] == 8        # the last answer token + 7 new ones


def test_a_continuation_with_a_tree_mask_or_padding_is_refused():
    model = _llama()
    ids = torch.randint(0, 256, (1, 16))
    cache = af.PlanCache(model, None, max_length=40)
    _fed(model, cache, ids, [12])
    causal = torch.ones(4, 16, dtype=torch.bool).tril(12)[None, None]
    tree = causal.clone()
    tree[0, 0, 3, 14] = False                                       # a draft branch that does not see another
    with pytest.raises(KVCacheError, match="tree or custom mask"):
        _fed(model, cache, ids[:, 12:], [4], attention_mask=tree)
    cache = af.PlanCache(model, None, max_length=40)
    _fed(model, cache, ids, [12])
    pad = torch.ones(1, 16, dtype=torch.long)
    pad[0, 14] = 0
    with pytest.raises(KVCacheError, match="new slots are padding"):
        _fed(model, cache, ids[:, 12:], [4], attention_mask=pad)
    cache = af.PlanCache(model, None, max_length=40)
    _fed(model, cache, ids, [12])
    assert _fed(model, cache, ids[:, 12:], [4], attention_mask=causal).shape == (1, 4, 256)   # plain causal: runs


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ends", [(9, 30, 31, 50), (5, 50), (20, 21, 23, 50)])
def test_continue_reference_equals_decoding_step_by_step(ends, padded):
    """SiteKVCache.continue_reference (n queries at once over the slots before them and the new keys) = the
    decoding steps one at a time in float64, for dense, sink + window (the ring overrun within one
    continuation), elastic and block-sparse groups, a left-padded batch too; the slots it leaves equal theirs."""
    q, k, v = _data(len(FORMS), 50)
    keep = torch.ones(2, ends[0], dtype=torch.bool)
    if padded:
        keep[1, :3] = False
    step, bulk = SiteKVCache(FORMS, max_length=50), SiteKVCache(FORMS, max_length=50)
    for cache in (step, bulk):
        cache.append(k[:, :, :ends[0]], v[:, :, :ends[0]], keep if padded else None)
    want = torch.stack([(step.append(k[:, :, t:t + 1], v[:, :, t:t + 1]), step.decode_reference(q[:, :, t], 0.25))[1]
                        for t in range(ends[0], 50)], 2)
    got = torch.cat([bulk.continue_reference(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], 0.25, rows=4)
                     for a, e in zip(ends, ends[1:])], 2)
    assert (got - want).abs().max() < 1e-12
    assert torch.equal(bulk.pos, step.pos) and torch.equal(bulk.k, step.k) and bulk.lens == step.lens
    with pytest.raises(KVCacheError, match=r"51 tokens exceed the cache's max_length 50, which its "
                                           r"\['elastic window'\]"):     # refused before anything is written
        bulk.continue_reference(q[:, :, :1], k[:, :, :1], v[:, :, :1], 0.25)
    assert bulk.length == 50 and torch.equal(bulk.pos, step.pos)
    from attnforge.runtime.forms import KVEvict

    with pytest.raises(KVCacheError, match="one step at a time"):
        SiteKVCache((KVEvict("h2o", 0.5),), 8).continue_reference(q[:1, :2, :2], k[:1, :1, :2], v[:1, :1, :2], 0.25)


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


# ------------------------------------------------------------------ KV eviction policies
from attnforge.runtime.forms import KVEvict, kv_tokens  # noqa: E402

EVICT = (KVEvict("streaming", 0.3, sink=2, recent=3), KVEvict("h2o", 0.4, sink=1, recent=4),
         KVEvict("a2sf", 0.4, recent=3, alpha=0.9), KVEvict("snapkv", 0.35, recent=4, pool=3), Dense())


def _evict_reference(form, q, k, v, prompt, scale):
    """The policy written plainly (full matrices, Python sets): outputs of the decoding steps prompt..T-1.
    q [r, T, D], k/v [T, D]; float64."""
    t_all = k.shape[0]
    s = q[:, :prompt] @ k[:prompt].T * scale
    causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)          # [r, P, P]
    n_keep = form.kept(prompt) if isinstance(form, KVEvict) else t_all
    scores = {}
    if not isinstance(form, KVEvict):
        keep = set(range(prompt))
    elif form.policy == "streaming":
        keep = set(range(form.sink)) | set(range(prompt - (n_keep - form.sink), prompt))
    else:
        if form.policy == "snapkv":
            raw = a[:, prompt - form.recent:].sum((0, 1))
            lo = [max(0, j - form.pool // 2) for j in range(prompt)]
            score = torch.stack([raw[lo[j]:min(prompt, j - form.pool // 2 + form.pool)].mean() for j in range(prompt)])
        else:
            alpha = form.alpha if form.policy == "a2sf" else 1.0
            w = torch.tensor([alpha ** (prompt - 1 - i) for i in range(prompt)], dtype=a.dtype)
            score = (a * w[None, :, None]).sum((0, 1))
        protected = set(range(form.sink)) | set(range(prompt - form.recent, prompt))
        others = sorted((j for j in range(prompt) if j not in protected), key=lambda j: -score[j].item())
        keep = protected | set(others[:n_keep - len(protected)])
        scores = {j: score[j].item() for j in keep}
    outs = []
    for t in range(prompt, t_all):
        keep.add(t)
        scores[t] = 0.0
        if isinstance(form, KVEvict) and form.policy == "streaming":
            ring = sorted(j for j in keep if j >= form.sink)
            if len(ring) > n_keep - form.sink:
                keep.remove(ring[0])
        idx = sorted(keep)
        p = torch.softmax(q[:, t] @ k[idx].T * scale, -1)                   # [r, |keep|]
        outs.append(p @ v[idx])
        if isinstance(form, KVEvict) and form.policy in ("h2o", "a2sf"):
            for col, j in enumerate(idx):
                scores[j] = form.alpha * scores[j] + p[:, col].sum().item()
            if len(keep) > n_keep:
                cand = [j for j in idx if form.sink <= j <= t - form.recent]
                if cand:
                    keep.remove(min(cand, key=lambda j: (scores[j], j)))
    return torch.stack(outs, 1)                                               # [r, T - P, D]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_every_eviction_policy_equals_its_plain_reference(impl):
    g, r, prompt, steps = len(EVICT), 2, 24, 16
    q, k, v = _data(g, prompt + steps, r=r, seed=3)
    q, k, v = q[:1], k[:1], v[:1]
    if impl == "triton":
        loaded = runtime.kernels.load_kernel(runtime.kernels.register_source(codegen.render_decode().source),
                                             torch.device("cpu"))
        q, k, v = q.float(), k.float(), v.float()
    cache = SiteKVCache(EVICT, max_length=prompt + steps)
    cache.append(k[:, :, :prompt], v[:, :, :prompt])
    assert cache.needs_select
    cache.select(q[:, :, :prompt], 0.25)
    outs = []
    for t in range(prompt, prompt + steps):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        step = cache.decode(q[:, :, t], 0.25, loaded)[0] if impl == "triton" else cache.decode_reference(q[:, :, t], 0.25)
        outs.append(step)
        cache.after_step(q[:, :, t], 0.25)
    got = torch.stack(outs, 2)                                                # [1, H, steps, D]
    for gi, form in enumerate(EVICT):
        want = _evict_reference(form, q[0, gi * r:(gi + 1) * r].double(), k[0, gi].double(), v[0, gi].double(),
                                prompt, 0.25)
        assert (got[0, gi * r:(gi + 1) * r].double() - want).abs().max() < (1e-12 if impl == "reference" else 1e-5), form
    # memory: each evicting group holds exactly forms.kv_tokens slots
    for gi, form in enumerate(EVICT[:4]):
        assert cache._caps[gi] == kv_tokens(form, prompt, prompt + steps)
    assert cache._caps[4] == prompt + steps                                  # the dense group: every key
    kept = {f.policy: f.kept(prompt) for f in EVICT[:4]}
    live = [int((cache.pos[0, o:o + c] >= 0).sum()) for o, c in zip(cache._offs, cache._caps)]
    assert live[:4] == [kept["streaming"], kept["h2o"], kept["a2sf"], kept["snapkv"] + steps]
    # h2o / a2sf evicted on the device (no host read per step): the host's count matches what is held, and
    # each group's last freed slot, a device index, waits for the next token
    assert [cache._held[gi] for gi in (1, 2)] == live[1:3]
    assert all(len(cache._free[gi]) == 1 and torch.is_tensor(cache._free[gi][0]) for gi in (1, 2))


def test_eviction_refuses_batches_and_chunks():
    cache = SiteKVCache((KVEvict("h2o", 0.5),), max_length=64)
    with pytest.raises(KVCacheError, match="batch 1"):
        cache.append(torch.randn(2, 1, 40, 8), torch.randn(2, 1, 40, 8))
    cache = SiteKVCache((KVEvict("h2o", 0.5),), max_length=64)
    cache.append(torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8))
    with pytest.raises(KVCacheError, match="select"):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    from attnforge.runtime.forms import FormError

    with pytest.raises(FormError, match="policy"):
        KVEvict("lru", 0.5)


def test_evicting_plan_inside_generate_prefills_densely_and_holds_its_budget():
    """Inside HF generate(): KVEvict groups prefill densely, select their keys from the prompt's
    attention and evict while decoding (their outputs are checked against the plain policy above)."""
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    model = _llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    sites = af.find_attention(model, (ids,))
    forms = (KVEvict("h2o", 0.3, sink=1, recent=4), KVEvict("snapkv", 0.3, recent=4, pool=3))
    plan = Plan(fingerprint(sites), "t", tuple(SitePlan(s.id, 4, 2, forms) for s in sites), {}, (40,))
    runtime.reset_counters()
    out, cache = af.generate(model, ids, plan, max_new_tokens=8, min_new_tokens=8)   # no early EOS
    assert runtime.counters["kvcache_decode_reference"] == 2 * 7
    # prefill is dense: the first new token equals the dense model's
    with torch.no_grad():
        assert out[0, 40] == model(ids).logits[0, -1].argmax()
    site = cache.layers[0].site
    h2o_live = int((site.pos[0, site._offs[0]:site._offs[0] + site._caps[0]] >= 0).sum())
    assert h2o_live == forms[0].kept(40)                                      # the budget held while decoding
    dense = af.PlanCache(model, None, max_length=48)
    with af.plan_attention(model), torch.no_grad():
        model(out, **cache_kwargs(model, dense))
    assert cache.nbytes() < dense.nbytes() / 2


def _quant_plan(model, ids, forms_per_site):
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    sites = af.find_attention(model, (ids,))
    return Plan(fingerprint(sites), "t", tuple(SitePlan(s.id, 4, 2, f) for s, f in zip(sites, forms_per_site)),
                {}, (ids.shape[1],))


def _teacher_forced(model, plan, out, prompt, impl):
    cache = af.PlanCache(model, plan, max_length=out.shape[1], impl=impl)
    with af.plan_attention(model), torch.no_grad():
        logits = [model(out[:, :prompt], **cache_kwargs(model, cache)).logits[:, -1]]
        for t in range(prompt, out.shape[1] - 1):
            logits.append(model(out[:, t:t + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_quantized_groups_inside_generate(impl):
    """KVQuant groups next to dense / window groups in one site: decoding reads their codes (the Triton
    kernel dequantizes in registers), the residual path alone equals the dense plan exactly, 8-bit codes
    stay close to it, and the quantized groups hold fewer bytes."""
    from attnforge.runtime.forms import KVQuant
    from attnforge.runtime.kvquant import quant_bytes

    model = _llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    base = _quant_plan(model, ids, [(Dense(), Dense()), (Dense(), Dense())])
    # the second site quantizes every group (nothing left in its flat slot buffer)
    quant = _quant_plan(model, ids, [(KVQuant(4, 8, 8), Dense()), (KVQuant(8, 8, 8), KVQuant(8, 8, 8))])
    unquantized = _quant_plan(model, ids, [(KVQuant(4, 8, 64), Dense()), (KVQuant(8, 8, 64), KVQuant(8, 8, 64))])
    runtime.reset_counters()
    out, cache = af.generate(model, ids, quant, max_new_tokens=10, min_new_tokens=10, impl=impl)
    assert runtime.counters[f"kvcache_decode_{impl}"] == 2 * 9
    site = cache.layers[0].site
    assert site.quant.length == 49 and site.quant.nq == 40          # (49 - 8) // 8 * 8 tokens as codes
    want, _ = _teacher_forced(model, base, out, 40, "reference")
    same, _ = _teacher_forced(model, unquantized, out, 40, impl)    # residual 64 > 50 tokens: nothing quantized
    assert (same - want).abs().max() < 1e-4
    got, qcache = _teacher_forced(model, quant, out, 40, impl)
    assert torch.equal(got.argmax(-1), out[:, 40:])                 # generate() read the same cache
    err = (got - want).abs().max()
    assert 0 < err < 0.5                                            # quantized, and close (4 and 8 bits)
    if impl == "triton":
        ref, _ = _teacher_forced(model, quant, out, 40, "reference")
        assert (got - ref).abs().max() < 1e-4
    held = qcache.layers[0].site.quant.held_bytes()
    residual_fp32 = (49 - 40) * (16 + 16) * 2                        # the residual in float32, not float16
    assert held == quant_bytes(49, 4, 8, 8, 16) + residual_fp32 < 49 * (16 + 16) * 4   # under float32 K/V


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_linear_groups_inside_generate_equal_the_full_forward(impl):
    """Linear-hybrid groups (taylor2 and hedgehog) next to a window group: the cache keeps their
    constant-size states (LinearState, the prompt added in one batch), decoding reads them, and the
    teacher-forced logits equal the full forward of the same plan."""
    from attnforge.runtime.forms import Linear
    from attnforge.runtime.linear import FeatureMaps, register_maps

    model = _llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    key = register_maps(FeatureMaps(torch.eye(16) + 0.2 * torch.randn(16, 16, generator=g), torch.eye(16), 0.7))[0]
    plan = _quant_plan(model, ids, [(Linear("taylor2", 8, 2), SinkWindow(1, 5)),
                                    (Dense(), Linear("hedgehog", 6, 1, key))])
    runtime.reset_counters()
    out, cache = af.generate(model, ids, plan, max_new_tokens=8, min_new_tokens=8, impl=impl)
    assert runtime.counters[f"kvcache_decode_{impl}"] == 2 * 7
    if impl == "triton":
        assert runtime.counters["triton_linear_decode"] == 2 * 7
    site = cache.layers[0].site
    assert len(site.linear[0]) == 1 and site.linear[0][0].length == 47
    state = site.linear[0][0]
    assert state.exact == 2 + 8 and state.ke.shape[0] == 2 + 8        # sink + window exact, the rest summed
    torch._dynamo.reset()
    with torch.no_grad():
        full = torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(out).logits
    got, _ = _teacher_forced(model, plan, out, 40, impl)
    assert (got - full[:, 39:-1]).abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), out[:, 40:])


class _Tiles:
    """A loaded kernel whose launches use the tile a GPU runs (`**tiles`) under the interpreter."""

    def __init__(self, loaded, **tiles):
        self.loaded, self.tiles = loaded, tiles

    def launch(self, *args, **kwargs):
        return self.loaded.module.launch(self.loaded.kernel, *args, interpreted=True, **self.tiles, **kwargs)


def test_decode_kernel_with_the_gpu_key_tile():
    """The interpreter runs 16-key tiles for speed; a GPU runs 64: the same attention at that tile too."""
    key = runtime.kernels.register_source(codegen.render_decode().source)
    loaded = _Tiles(runtime.kernels.load_kernel(key, torch.device("cpu")), block_n=64)
    q, k, v = _data(len(FORMS), 200, r=3)
    cache = SiteKVCache(FORMS, max_length=200)
    cache.append(k[:, :, :150].float(), v[:, :, :150].float())
    for t in range(150, 200):
        cache.append(k[:, :, t:t + 1].float(), v[:, :, t:t + 1].float())
    want = _want(q, k, v, 199, FORMS)
    for splits in (None, 3):
        out, _ = cache.decode(q[:, :, 199].float(), 0.25, loaded, splits=splits)
        assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_half_precision(dtype):
    key = runtime.kernels.register_source(codegen.render_decode().source)
    loaded = runtime.kernels.load_kernel(key, torch.device("cpu"))
    q, k, v = _data(len(FORMS), 90, r=3, seed=4)
    cache = SiteKVCache(FORMS, max_length=90)
    cache.append(k.to(dtype), v.to(dtype))
    out, _ = cache.decode(q[:, :, 89].to(dtype), 0.25, loaded, splits=2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), cache.decode_reference(q[:, :, 89], 0.25), rtol=2e-2, atol=2e-2)


def test_decode_reads_the_stored_tokens_not_the_capacity():
    """A cache built for 4000 tokens holding 40: the kernel reads the filled part of the full and window
    regions (the splits are chosen for 40 tokens, not 4000) and still equals float64 at every step."""
    key = runtime.kernels.register_source(codegen.render_decode().source)
    loaded = runtime.kernels.load_kernel(key, torch.device("cpu"))
    forms = (Dense(), SinkWindow(3, 7), Dense())
    q, k, v = _data(len(forms), 45, r=2, seed=9)
    cache = SiteKVCache(forms, max_length=4000)
    cache.append(k[:, :, :40].float(), v[:, :, :40].float())
    assert max(cache._caps) >= 4000
    for t in range(40, 45):
        cache.append(k[:, :, t:t + 1].float(), v[:, :, t:t + 1].float())
        out, splits = cache.decode(q[:, :, t].float(), 0.25, loaded)
        assert splits <= -(-(t + 1) // 16)                      # interpreter tiles: 16 keys
        assert (out.double() - _want(q, k, v, t, forms)).abs().max() < 1e-5


def test_generate_under_optimize_decodes_with_the_plan_cache():
    """af.optimize(model, plan) makes model.generate() use the per-head cache: the same tokens as
    af.generate with that plan, every step read from the plan's cache, the compiled forward restored
    after; a caller's af.PlanCache is used, any other cache is refused with the reason; beams decode over it."""
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    model = _llama()
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "t", (SitePlan(sites[0].id, 4, 2, (SinkWindow(2, 8), Dense())),
                                          SitePlan(sites[1].id, 4, 2, (Dense(), SinkWindow(1, 5)))), {}, (30,))
    want, want_cache = af.generate(_llama(), ids, plan, max_new_tokens=8)
    torch._dynamo.reset()
    af.optimize(model, plan, compiler="eager")
    compiled = model.forward
    runtime.reset_counters()
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_decode_reference"] == 2 * 7 and runtime.counters["kvcache_prefill"] == 2
    held = model.attnforge_cache.kv_entries()
    assert held == want_cache.kv_entries() < 2 * 2 * 38                # layers x groups x tokens when dense
    assert model.forward is compiled
    mine = af.PlanCache(model, plan, max_length=33)                  # the caller's own plan cache is used
    with torch.no_grad():
        again = model.generate(ids, max_new_tokens=3, do_sample=False, **cache_kwargs(model, mine))
    assert model.attnforge_cache is mine and torch.equal(again, want[:, :33])
    assert torch.equal(af.generate(model, ids, plan, max_new_tokens=8)[0], want)   # af.generate on it too
    # restored after generate() to what af.optimize set: SDPA with attnforge's padding masks
    assert model.forward is compiled and model.config._attn_implementation == "attnforge_sdpa"
    with pytest.raises(ValueError, match="DynamicCache would attend to every key"):
        model.generate(ids, max_new_tokens=3, **cache_kwargs(model, transformers.DynamicCache()))
    with torch.no_grad():                                             # beam search decodes over the plan cache too
        beams = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    assert model.attnforge_cache.layers[0].site.k.shape[0] == 2
    assert torch.equal(beams, af.generate(model, ids, plan, max_new_tokens=3, num_beams=2)[0])


def test_block_sparse_verticals_past_max_length_take_no_slots():
    """A vertical block the cache's sequences never reach (past max_length) holds no slot, and the ring after
    the reached ones stays inside the group's region (it used to start after every vertical and overflow)."""
    forms = (BlockSparse(4, (0, 2, 9), (0, 1)),)
    q, k, v = _data(1, 30)
    cache = SiteKVCache(forms, max_length=30)                   # block 9 starts at 36: never reached
    cache.append(k[:, :, :20], v[:, :, :20])
    for t in range(20, 30):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert (cache.decode_reference(q[:, :, t], 0.25) - _want(q, k, v, t, forms)).abs().max() < 1e-12
    assert cache._caps == [2 * 4 + 2 * 4] == [SiteKVCache.predicted_entries(forms, 30)]
    with pytest.raises(KVCacheError, match="block-sparse verticals"):
        cache.append(k[:, :, :1], v[:, :, :1])


# ------------------------------------------------------------------------ the model's own sliding windows
def _sliding_model(kind, window=8):
    """A tiny Gemma 2 (sliding and full layers alternating, layer_types; eager, soft-capped), Gemma 3 (q/k
    norms, SDPA) or Mistral (every layer sliding, no layer types) whose window binds within the test."""
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=128, head_dim=16, sliding_window=window)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common)
        cfg._attn_implementation = "eager"
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, layer_types=["sliding_attention", "full_attention"])
        cfg._attn_implementation = "sdpa"
        return transformers.Gemma3ForCausalLM(cfg).eval()
    cfg = transformers.MistralConfig(**common)
    cfg._attn_implementation = "sdpa"
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("prompt", [6, 20])
@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "mistral"])
def test_sliding_window_layers_hold_only_their_window_and_decode_exactly(kind, prompt):
    """A prompt longer than the window, and one shorter that decoding carries past it (the cache used to read
    every key there: logits off by 0.2-0.4): greedy tokens = HF's generate(), each step's logits = the
    model's full forward, and a sliding layer's groups hold the window only (a full layer every token)."""
    model = _sliding_model(kind)
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    got, cache = af.generate(model, ids, None, max_new_tokens=12)
    assert torch.equal(got, want)
    total = prompt + 12
    sliding = [1, 1] if kind == "mistral" else [1, 0]
    assert [layer.site._caps for layer in cache.layers] == [[8, 8] if s else [total, total] for s in sliding]
    steps = af.PlanCache(model, None, max_length=total)
    with af.plan_attention(model), torch.no_grad():
        logits = [model(got[:, :prompt], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1]]
        for t in range(prompt, total - 1):
            logits.append(model(got[:, t:t + 1], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1])
        full = model(got).logits[:, prompt - 1:-1]
    assert (torch.stack(logits, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "mistral"])
def test_a_continuation_on_sliding_window_layers_equals_hf(kind):
    """A prompt, then 9 more tokens in one call, on layers whose own window binds within them: the mask Hugging
    Face builds for the continuation is checked (causal within the window) and the logits equal the model's
    full forward (a left-padded batch of two, each row as alone)."""
    model = _sliding_model(kind)
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
    runtime.reset_counters()
    cache = af.PlanCache(model, None, max_length=20)
    with af.plan_attention(model), torch.no_grad():
        first = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True, **cache_kwargs(model, cache)).logits
        rest = model(ids[:, 6:], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache)).logits
    assert runtime.counters["kvcache_continued_batched"] == 9      # window layouts, padded: at once
    got = torch.cat([first, rest], 1)
    assert (got - want)[mask.bool()].abs().max() < 1e-4


def test_the_window_mask_check_reads_every_row_block(monkeypatch):
    """_window_mask_reason compares the mask a few rows at a time (no second N x S mask): a wrong entry in any
    row block, padding not on the left, and a non-boolean mask are each named; the exact mask passes."""
    from attnforge.compiler import decode

    monkeypatch.setattr(decode, "_MASK_ROWS", 3)
    n, s, w = 10, 14, 5
    i, j = torch.arange(s - n, s)[:, None], torch.arange(s)[None, :]
    keys = torch.ones(2, s, dtype=torch.bool)
    keys[1, :2] = False
    exact = ((j <= i) & (j > i - w))[None, None] & keys[:, None, None, :]
    assert decode._window_mask_reason(exact, w, n, s, keys) is None
    for row in (0, 4, 9):                                          # the first, a middle and the last block
        wrong = exact.clone()
        wrong[0, 0, row, s - n + row] = False
        assert decode._window_mask_reason(wrong, w, n, s, keys) == "a mask that also hides other keys"
    right = keys.clone()
    right[0, -1] = False
    assert "not all on the left" in decode._window_mask_reason(exact, w, n, s, right)
    assert "torch.float32 mask" in decode._window_mask_reason(exact.float(), w, n, s, keys)


def test_a_kept_cache_carried_past_the_models_window_is_refused_or_sized_for_it():
    """A cache af.generate sized within the model's window (so its sliding layers keep every key), carried
    past the window by the next turn: refused with what to do (it used to read every key: logits 0.08-0.18
    off); built for the whole conversation (max_length=), the turns generate what HF's generate() does."""
    model = _sliding_model("mistral")
    g = torch.Generator().manual_seed(3)
    ids, turn = torch.randint(0, 128, (1, 3), generator=g), torch.randint(0, 128, (1, 2), generator=g)
    first, cache = af.generate(model, ids, max_new_tokens=3)                # max_length 6 <= window 8
    conversation = torch.cat([first, turn], 1)
    with pytest.raises(KVCacheError, match="past the model's sliding window of 8, but the plan cache was built for "
                                           "max_length 6"):
        af.generate(model, conversation, cache=cache, max_new_tokens=8)
    first, cache = af.generate(model, ids, max_new_tokens=3, max_length=16)
    conversation = torch.cat([first, turn], 1)
    second, _ = af.generate(model, conversation, cache=cache, max_new_tokens=8)
    with torch.no_grad():
        assert torch.equal(second, model.generate(conversation, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_padding_among_new_tokens_on_sliding_layers_is_named(kind):
    """On a sliding-window layer, padding among a continuation's new tokens is refused as such (it used to be
    named a tree or custom mask)."""
    model = _sliding_model(kind)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = af.PlanCache(model, None, max_length=30)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, 15] = 0
    with af.plan_attention(model), torch.no_grad():
        model(ids[:, :12], use_cache=True, **cache_kwargs(model, cache))
        with pytest.raises(KVCacheError, match="new slots are padding"):
            model(ids[:, 12:], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))


def test_plan_forms_take_on_the_models_window_or_are_refused():
    from attnforge.compiler.decode import _windowed

    assert _windowed((Dense(), SinkWindow(4, 16), SinkWindow(0, 3), SinkWindow(0, 12)), 8, 0) == \
        (SinkWindow(0, 8), SinkWindow(0, 8), SinkWindow(0, 3), SinkWindow(0, 8))
    for form in (SinkWindow(2, 4), ElasticWindow(2, 4, 0.1), BlockSparse(4, (0,), (0,))):
        with pytest.raises(KVCacheError, match="sliding window of 8 tokens .* does not compose"):
            _windowed((Dense(), form), 8, 3)
    model = _sliding_model("gemma2")
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "t", (SitePlan(sites[0].id, 4, 2, (Dense(), SinkWindow(2, 4))),
                                          SitePlan(sites[1].id, 4, 2, (Dense(), SinkWindow(2, 4)))), {}, (12,))
    with pytest.raises(KVCacheError, match="decoder layer 0 .* KV group 1"):
        af.PlanCache(model, plan, max_length=20)
    af.PlanCache(model, plan, max_length=8)          # the window never binds: the plan's forms as they are
    # as the search plans it: the sliding layer (0, not a plain causal site) all Dense, so within its window;
    # the full layer (1) the plan's forms
    searched = Plan(plan.fingerprint, "t", (SitePlan(sites[0].id, 4, 2, (Dense(), Dense())),
                                            SitePlan(sites[1].id, 4, 2, (Dense(), SinkWindow(2, 4)))), {}, (12,))
    cache = af.PlanCache(model, searched, max_length=20)
    assert [layer.forms for layer in cache.layers] == [(SinkWindow(0, 8),) * 2, (Dense(), SinkWindow(2, 4))]
    # decoding it past the window = the same plan's full forward
    out, _ = af.generate(model, ids, searched, max_new_tokens=8)
    torch._dynamo.reset()
    with torch.no_grad():
        full = torch.compile(model, backend=af.Backend(plan=searched, impl="reference", compiler="eager"))(out).logits
    steps = af.PlanCache(model, searched, max_length=out.shape[1])
    with af.plan_attention(model), torch.no_grad():
        logits = [model(out[:, :12], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1]]
        for t in range(12, out.shape[1] - 1):
            logits.append(model(out[:, t:t + 1], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1])
    assert (torch.stack(logits, 1) - full[:, 11:-1]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["gemma2", "mistral"])
def test_a_left_padded_batch_past_a_sliding_window_generates_each_row_as_alone(kind):
    """Rows of 12 and 9 tokens (left-padded), 10 new tokens past the window of 8: each row = HF's generate() on
    that row alone; the sliding layers ran the batch as a padded one (each row's window at its own positions)."""
    model = _sliding_model(kind)
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    runtime.reset_counters()
    got, cache = af.generate(model, ids, None, max_new_tokens=10, attention_mask=mask)
    assert runtime.counters["padded"] == 2                  # both layers' prefills (a full layer, a sliding one)
    for row, start in ((0, 0), (1, 3)):
        with torch.no_grad():
            alone = model.generate(ids[row:row + 1, start:], max_new_tokens=10, do_sample=False)
        assert torch.equal(got[row, 12:], alone[0, 12 - start:])
    right = mask.flip(1)
    with pytest.raises(KVCacheError, match="padding is not all on the left|right-padded"):
        af.generate(model, ids, None, max_new_tokens=2, attention_mask=right)


@pytest.mark.parametrize("plan", ["dense", "windows_blocks"])
def test_chunked_prefill_generates_what_the_whole_prompt_does(plan):
    """Hugging Face's chunked prefill (generate(prefill_chunk_size=16): a 40-token prompt in three calls) over
    the plan cache: the same tokens as the prompt at once (and as HF's own generate() for a dense plan),
    the later chunks continued at once."""
    model = _llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(14))
    forms = None if plan == "dense" else _quant_plan(model, ids, [(SinkWindow(2, 8), BlockSparse(8, (0,), (0, 2))),
                                                                  (ElasticWindow(2, 6, 0.2), Dense())])
    kw = dict(max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    whole, _ = af.generate(model, ids, forms, **kw)
    runtime.reset_counters()
    chunked, _ = af.generate(model, ids, forms, prefill_chunk_size=16, **kw)
    assert runtime.counters["kvcache_continued_batched"] == 24 and runtime.counters["kvcache_prefill"] == 2
    assert torch.equal(chunked.sequences, whole.sequences)
    assert (torch.stack(chunked.logits) - torch.stack(whole.logits)).abs().max() < 1e-4
    if plan == "dense":
        with torch.no_grad():
            assert torch.equal(whole.sequences, model.generate(ids, max_new_tokens=8, do_sample=False))


def test_af_generate_continues_a_kept_cache_over_turns():
    """af.generate(cache=...) and an optimized model's generate(cache=...): the second turn over the kept cache
    (a windowed / block-sparse plan) generates what the whole conversation prompted from scratch does."""
    model = _llama()
    g = torch.Generator().manual_seed(15)
    ids, turn = torch.randint(0, 256, (1, 24), generator=g), torch.randint(0, 256, (1, 9), generator=g)
    plan = _quant_plan(model, ids, [(SinkWindow(2, 8), BlockSparse(8, (0,), (0, 2))), (Dense(), SinkWindow(1, 5))])
    cache = af.PlanCache(model, plan, max_length=64)
    first, kept = af.generate(model, ids, cache=cache, max_new_tokens=6)
    assert kept is cache
    conversation = torch.cat([first, turn], 1)
    runtime.reset_counters()
    second, _ = af.generate(model, conversation, cache=cache, max_new_tokens=6)
    assert runtime.counters["kvcache_continued_batched"] == 1 + 9          # the last answer token + the turn
    scratch, _ = af.generate(model, conversation, plan, max_new_tokens=6)
    assert torch.equal(second, scratch)
    with pytest.raises(ValueError, match="not both"):
        af.generate(model, conversation, plan, cache=cache)
    with pytest.raises(ValueError, match="must be an af.PlanCache"):
        af.generate(model, conversation, cache=transformers.DynamicCache())
    optimized = af.optimize(_llama(), plan, impl="reference", compiler="eager")
    cache = af.PlanCache(optimized, plan, max_length=64)
    assert torch.equal(optimized.generate(ids, cache=cache, max_new_tokens=6, do_sample=False), first)
    assert torch.equal(optimized.generate(conversation, cache=cache, max_new_tokens=6, do_sample=False), second)
