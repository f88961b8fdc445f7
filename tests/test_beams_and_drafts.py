"""Beam search and assisted (speculative) decoding over the per-head KV cache.

Beam search reorders the cache's rows after every step (a row may be taken twice, another dropped); assisted
and prompt-lookup decoding write draft tokens and take back the rejected ones (crop). Both are checked at the
cache level against a cache fed only what should be there (float64), and inside Hugging Face generate():
beams equal HF's own beam search where every group is dense and the plan's whole-sequence forward otherwise;
drafts give exactly the tokens of plain greedy decoding with the same plan, with rejections taken back."""
import pytest
import torch

import attnforge as af
from attnforge import runtime
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, KVEvict, KVQuant, Linear, SinkWindow
from attnforge.runtime.kvcache import KVCacheError, SiteKVCache

STATELESS = (Dense(), SinkWindow(3, 7), ElasticWindow(2, 4, 0.1), BlockSparse(4, (0, 2), (0, 2)))
D, R, SCALE = 16, 2, 0.25


def _tokens(b, g, t, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, D, generator=gen, dtype=dtype) for n in (g, g, g * R)]     # k, v, q


def _visible(cache, row):
    """Per group, what the newest query of `row` reads: (position, key, value) sorted by position."""
    flags = cache.keep_flags().bool()[row]
    seen = []
    for o, c in zip(cache._offs, cache._caps):
        sel = flags[o:o + c].nonzero().squeeze(1) + o
        order = cache.pos[row, sel].argsort()
        seen.append((cache.pos[row, sel][order], cache.k[row, sel][order], cache.v[row, sel][order]))
    return seen


def _same(a, b, row_a=0, row_b=0):
    for (pa, ka, va), (pb, kb, vb) in zip(_visible(a, row_a), _visible(b, row_b)):
        assert torch.equal(pa, pb) and torch.equal(ka, kb) and torch.equal(va, vb)


# ------------------------------------------------------------------------ beam search: reorder
@pytest.mark.parametrize("first_read", [False, True])
def test_reordered_rows_decode_as_caches_fed_each_rows_history(first_read):
    """Rows 2, 0, 0 of a 3-row cache (one taken twice: its linear states are copied, not shared), then 6 more
    steps of different tokens per row: every step of every row equals a fresh cache fed that row's own history,
    for full, window, elastic, block-sparse, KIVI and linear-hybrid groups. first_read: reorder after decoding
    steps (linear states made) or right after the prompt (the states still pending), as beam search's first
    reorder comes."""
    forms = STATELESS + (KVQuant(4, 8, 8), Linear("taylor2", 4, 2))
    g, prompt, before, after = len(forms), 11, 4 if first_read else 0, 6
    k, v, q = _tokens(3, g, prompt + before, seed=1)
    k2, v2, q2 = _tokens(3, g, after, seed=2)
    cache = SiteKVCache(forms, max_length=40)
    cache.append(k[:, :, :prompt], v[:, :, :prompt])
    for t in range(prompt, prompt + before):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        cache.decode_reference(q[:, :, t], SCALE)
    rows = [2, 0, 0]
    cache.reorder(torch.tensor(rows))
    alone = []
    for b, src in enumerate(rows):
        one = SiteKVCache(forms, max_length=40)
        one.append(k[src:src + 1, :, :prompt], v[src:src + 1, :, :prompt])
        for t in range(prompt, prompt + before):
            one.append(k[src:src + 1, :, t:t + 1], v[src:src + 1, :, t:t + 1])
            one.decode_reference(q[src:src + 1, :, t], SCALE)
        alone.append(one)
    for t in range(after):
        cache.append(k2[:, :, t:t + 1], v2[:, :, t:t + 1])
        got = cache.decode_reference(q2[:, :, t], SCALE)
        for b, one in enumerate(alone):
            one.append(k2[b:b + 1, :, t:t + 1], v2[b:b + 1, :, t:t + 1])
            want = one.decode_reference(q2[b:b + 1, :, t], SCALE)
            assert (got[b] - want[0]).abs().max() < 1e-12, (t, b)
    assert cache.linear[1][0] is not cache.linear[2][0]       # the row taken twice holds its own state


def test_reorder_refuses_evicting_groups():
    cache = SiteKVCache((KVEvict("h2o", 0.5, sink=1, recent=2),), max_length=16)
    k, v, q = _tokens(1, 1, 8, seed=3)
    cache.append(k, v)
    cache.select(q, SCALE)
    cache.reorder(torch.tensor([0]))                         # one row: nothing to reorder
    with pytest.raises(KVCacheError, match="beam search needs a plan without KVEvict"):
        cache.reorder(torch.tensor([0, 0]))


# ------------------------------------------------------------------------ drafts: record / rollback
def _schedule(seed, steps=12, most=5):
    """(tokens written, tokens taken back) per verification step, as assisted decoding does it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        n = int(torch.randint(1, most + 1, (1,), generator=gen))
        out.append((n, int(torch.randint(0, n, (1,), generator=gen))))
    return out


def _rejected(k, n):
    """n draft tokens that are not the accepted ones (other random keys)."""
    return torch.randn(k.shape[0], k.shape[1], n, k.shape[-1], dtype=k.dtype, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("forms,max_length", [(STATELESS, 80), ((Dense(), SinkWindow(2, 5)), 6)],
                         ids=["every_layout", "full_regrows"])
def test_rolled_back_drafts_leave_what_the_accepted_tokens_alone_leave(forms, max_length, seed):
    """Record, then a prompt with a draft after it and verification steps of 1-5 tokens with 0..n-1 of them
    taken back: after each step the cache reads exactly what a cache fed only the accepted tokens reads (slot
    by slot, for the newest query), and attends the same; a ring's overwritten keys come back, full groups
    that grew while recording keep their accepted keys."""
    g = len(forms)
    k, v, q = _tokens(2, g, 90, seed=10 + seed)
    cache, plain = SiteKVCache(forms, max_length), SiteKVCache(forms, max_length)
    cache.record()
    prompt, draft = 9, 4
    bad = _rejected(k, 2)
    cache.append(torch.cat([k[:, :, :prompt + draft - 2], bad], 2), torch.cat([v[:, :, :prompt + draft - 2], bad], 2))
    cache.rollback(2)                                         # 2 of the prompt's 4 draft tokens rejected
    accepted = prompt + draft - 2
    plain.append(k[:, :, :accepted], v[:, :, :accepted])
    for n, back in _schedule(seed):
        bad = _rejected(k, back)                               # the rejected drafts: other tokens
        cache.append(torch.cat([k[:, :, accepted:accepted + n - back], bad], 2),
                      torch.cat([v[:, :, accepted:accepted + n - back], bad], 2))
        cache.rollback(back)
        for t in range(accepted, accepted + n - back):
            plain.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        accepted += n - back
        assert cache.length == plain.length == accepted
        for row in range(2):
            _same(cache, plain, row, row)
        newest = q[:, :, accepted - 1]
        assert (cache.decode_reference(newest, SCALE) - plain.decode_reference(newest, SCALE)).abs().max() < 1e-12
    assert cache.recording


def test_a_padded_prompts_drafts_roll_back_row_by_row():
    """A left-padded prompt (rows of 7 and 10 real tokens), then steps of one token per row, some taken back
    several at once: each row reads what it reads fed its accepted tokens alone."""
    forms = STATELESS
    k, v, q = _tokens(2, len(forms), 30, seed=4)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :3] = False
    cache = SiteKVCache(forms, max_length=40)
    cache.record()
    cache.append(k[:, :, :10], v[:, :, :10], keep)
    cache.commit()
    for t in range(10, 16):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    extra = _rejected(k, 3)
    for t in range(3):
        cache.append(extra[:, :, t:t + 1], extra[:, :, t:t + 1])
    cache.rollback(3)
    assert cache.lens == [13, 16]
    for row, real in ((0, range(3, 16)), (1, range(0, 16))):
        alone = SiteKVCache(forms, max_length=40)
        idx = torch.tensor(list(real))
        alone.append(k[row:row + 1, :, idx], v[row:row + 1, :, idx])
        _same(cache, alone, row, 0)


def test_rollback_needs_recording_except_for_full_groups():
    k, v, _ = _tokens(1, 2, 12, seed=5)
    full = SiteKVCache((Dense(), Dense()), max_length=16)
    full.append(k, v)
    full.rollback(3)                                          # nothing overwritten: the newest positions go
    assert full.length == 9 and full.kv_entries() == 2 * 9
    for other in (SinkWindow(1, 4), KVQuant(4, 8, 8)):
        cache = SiteKVCache((Dense(), other), max_length=16)
        cache.append(k, v)
        with pytest.raises(KVCacheError, match="needs record"):
            cache.rollback(1)
    with pytest.raises(KVCacheError, match="cannot take back 20 tokens"):
        cache.rollback(20)
    cache.record()
    cache.append(k[:, :, :2], v[:, :, :2])
    with pytest.raises(KVCacheError, match="written before recording began"):
        cache.rollback(3)


def _hedgehog():
    from attnforge.runtime.linear import FeatureMaps, register_maps

    g = torch.Generator().manual_seed(8)
    return Linear("hedgehog", 4, 2, register_maps(FeatureMaps(torch.eye(D) + 0.2 * torch.randn(D, D, generator=g),
                                                               torch.eye(D), 0.7))[0])


STATEFUL = {"h2o_kivi": lambda: (KVEvict("h2o", 0.5, sink=1, recent=3), KVQuant(4, 8, 8), SinkWindow(2, 5)),
            "a2sf_linear": lambda: (KVEvict("a2sf", 0.5, recent=2, alpha=0.9), Linear("taylor2", 4, 2), Dense()),
            "streaming_snapkv": lambda: (KVEvict("streaming", 0.5, sink=2, recent=4), KVEvict("snapkv", 0.5, recent=4),
                                         _hedgehog())}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_rolled_back_drafts_restore_evicting_quantized_and_linear_state(name, seed):
    """Evicting groups (H2O / A2SF scores and evictions, a StreamingLLM ring, SnapKV's kept set), KIVI codes and
    residual, linear-hybrid sums: a prompt with a draft (rolled back: the policies choose again over the accepted
    prompt) and steps of 1-5 tokens decoded one by one with some taken back attend exactly as a cache fed only
    the accepted tokens (each with its step: attention read, scores added, a key evicted)."""
    forms = STATEFUL[name]()
    g = len(forms)
    k, v, q = _tokens(1, g, 80, seed=20 + seed)
    cache, plain = SiteKVCache(forms, 80), SiteKVCache(forms, 80)
    cache.record()
    prompt, draft = 24, 3
    bad = _rejected(k, draft)
    cache.append(torch.cat([k[:, :, :prompt], bad], 2), torch.cat([v[:, :, :prompt], bad], 2))
    cache.select(torch.cat([q[:, :, :prompt], _rejected(q, draft)], 2), SCALE)
    cache.rollback(draft)
    plain.append(k[:, :, :prompt], v[:, :, :prompt])
    plain.select(q[:, :, :prompt], SCALE)

    def step(c, kt, vt, qt):
        c.append(kt, vt)
        out = c.decode_reference(qt, SCALE)
        c.after_step(qt, SCALE)
        return out

    accepted = prompt
    for n, back in _schedule(seed, steps=10):
        bad_k, bad_q = _rejected(k, back), _rejected(q, back)
        for t in range(n):
            if t < n - back:
                step(cache, k[:, :, accepted + t:accepted + t + 1], v[:, :, accepted + t:accepted + t + 1],
                     q[:, :, accepted + t])
            else:
                j = t - (n - back)
                step(cache, bad_k[:, :, j:j + 1], bad_k[:, :, j:j + 1], bad_q[:, :, j])
        cache.rollback(back)
        for t in range(accepted, accepted + n - back):
            step(plain, k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t])
        accepted += n - back
        assert cache.length == plain.length == accepted
        # the next step reads and evicts the same: its attention equals the plain cache's
        nxt = (k[:, :, accepted:accepted + 1], v[:, :, accepted:accepted + 1], q[:, :, accepted])
        got = step(cache, *nxt)
        want = step(plain, *nxt)
        assert (got - want).abs().max() < 1e-12
        cache.commit()
        accepted += 1
    assert cache.kv_entries() == plain.kv_entries()


# ------------------------------------------------------------------------ inside Hugging Face generate()
transformers = pytest.importorskip("transformers")


def _llama(seed=0, layers=2):
    """A tiny Llama whose logits are sharp enough for beams to part and drafts to be rejected (init 0.1)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   initializer_range=0.1)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _plan(model, ids, forms):
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    sites = af.find_attention(model, (ids,))
    return Plan(fingerprint(sites), "t", tuple(SitePlan(s.id, 4, 2, f) for s, f in zip(sites, forms)), {},
                (ids.shape[1],))


WINDOWS = ((SinkWindow(2, 8), BlockSparse(8, (0,), (0, 2))), (ElasticWindow(1, 4, 0.2), Dense()))


class _Reorders:
    """Counts the beam reorders that moved rows (a beam search whose beams never part tests nothing)."""

    def __init__(self, monkeypatch):
        self.moved = 0
        real = SiteKVCache.reorder

        def spy(cache, rows, host=None):
            self.moved += rows.tolist() != list(range(rows.numel()))
            return real(cache, rows, host)

        monkeypatch.setattr(SiteKVCache, "reorder", spy)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("padded", [False, True])
def test_beam_search_with_every_group_dense_equals_hf(impl, padded, monkeypatch):
    """num_beams=3 over the plan cache (no plan: every group full) gives Hugging Face's own beam search
    tokens, on one prompt and on a left-padded batch of two (beams of rows of different lengths)."""
    model = _llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2 if padded else 1, 24), generator=g)
    kw = {}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :6] = 0
        kw["attention_mask"] = mask
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, num_beams=3, **kw)
    reorders = _Reorders(monkeypatch)
    got, cache = af.generate(model, ids, None, max_new_tokens=10, num_beams=3, impl=impl, **kw)
    assert torch.equal(got, want)
    assert reorders.moved > 0
    assert runtime.counters[f"kvcache_decode_{impl}"] == 2 * 9           # layers x steps after the first
    assert cache.layers[0].site.k.shape[0] == ids.shape[0] * 3


def test_beam_search_with_a_plan_equals_beam_search_over_the_plans_whole_forward(monkeypatch):
    """Windows, kept blocks and an elastic span: beam search over the plan's cache gives the tokens of beam
    search that recomputes every step's whole sequence through the optimized forward (use_cache=False)."""
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    model = _llama()
    plan = _plan(model, ids, WINDOWS)
    af.optimize(model, plan, compiler="eager")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, num_beams=3, use_cache=False)
    reorders = _Reorders(monkeypatch)
    runtime.reset_counters()
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=10, do_sample=False, num_beams=3)
    assert torch.equal(got, want)
    assert reorders.moved > 0 and runtime.counters["kvcache_decode_reference"] == 2 * 9
    assert model.attnforge_cache.kv_entries() < 2 * 2 * 34                # the plan's layouts held the beams


def _greedy_and_drafted(model, ids, plan, impl, **draft):
    with torch.no_grad():
        want, _ = af.generate(model, ids, plan, max_new_tokens=24, impl=impl)
    runtime.reset_counters()
    got, cache = af.generate(model, ids, plan, max_new_tokens=24, impl=impl, **draft)
    return got, want, cache


@pytest.mark.parametrize("plan,impl", [("dense", "reference"), ("windows", "reference"), ("windows", "triton")])
def test_prompt_lookup_decoding_gives_the_greedy_tokens(plan, impl):
    """Prompt-lookup drafts (n-grams copied from the prompt) verified in one forward each: the tokens of
    plain greedy decoding with the same plan, with rejected drafts taken back from every layout."""
    model = _llama()
    x = torch.randint(0, 256, (1, 15), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([x, x, x[:, :5]], 1)                                 # repeats: drafts to propose
    chosen = None if plan == "dense" else _plan(model, ids, WINDOWS)
    got, want, cache = _greedy_and_drafted(model, ids, chosen, impl, prompt_lookup_num_tokens=4)
    assert torch.equal(got, want)
    if plan == "dense":
        with torch.no_grad():
            assert torch.equal(got, model.generate(ids, max_new_tokens=24, do_sample=False))
    assert runtime.counters["kvcache_rolled_back"] > 0                   # drafts were rejected and taken back
    assert runtime.counters["kvcache_continued_batched"] > 0             # drafts verified several at once
    assert cache.get_seq_length() == got.shape[1] - 1                    # the newest token is not in it yet
    # sized for HF's last verification, which may run up to prompt_lookup_num_tokens past max_length
    assert cache.layers[0].site.max_length == ids.shape[1] + 24 + 4


def test_assisted_decoding_with_a_draft_model_gives_the_greedy_tokens():
    """A smaller draft model of the same vocabulary proposes tokens (assistant_model=): the plan's greedy
    tokens, drafts verified and partly taken back."""
    model, assistant = _llama(), _llama(seed=5, layers=1)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    got, want, _ = _greedy_and_drafted(model, ids, _plan(model, ids, WINDOWS), "reference", assistant_model=assistant)
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_rolled_back"] > 0


def test_a_sliding_window_model_drafts_over_its_own_window():
    """Mistral's every layer slides (window 8, carried past it): prompt lookup = HF's own greedy tokens."""
    from test_kvcache import _sliding_model

    model = _sliding_model("mistral")
    with torch.no_grad():                      # sharper logits: drafts get rejected past the window
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([x, x], 1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=20, do_sample=False)
    got, _ = af.generate(model, ids, None, max_new_tokens=20, prompt_lookup_num_tokens=3)
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_rolled_back"] > 0


def test_drafts_over_evicting_quantized_and_linear_groups_give_the_greedy_tokens():
    """A KV-compressed plan (H2O, A2SF, KIVI 4-bit, a linear-hybrid group): prompt lookup gives the plan's
    greedy tokens, rejected drafts taken back from every group's state, without the chunked-prefill warning
    (each verification decodes its tokens, as greedy decoding would)."""
    import warnings

    model = _llama()
    x = torch.randint(0, 256, (1, 15), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([x, x, x[:, :5]], 1)
    plan = _plan(model, ids, ((KVEvict("h2o", 0.5, sink=1, recent=4), KVQuant(4, 8, 8)),
                              (Linear("taylor2", 8, 2), KVEvict("a2sf", 0.5, recent=3, alpha=0.9))))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sized their budgets")
        got, want, cache = _greedy_and_drafted(model, ids, plan, "reference", prompt_lookup_num_tokens=4)
    assert torch.equal(got, want)
    assert runtime.counters["kvcache_rolled_back"] > 0 and runtime.counters["kvcache_continued"] > 0
    # beam search over KIVI and linear groups (their buffers and states are per row)
    beams = _plan(model, ids, ((KVQuant(4, 8, 8), Dense()), (Linear("taylor2", 8, 2), SinkWindow(2, 6))))
    out, _ = af.generate(model, ids, beams, max_new_tokens=4, num_beams=2)
    assert out.shape == (1, ids.shape[1] + 4)
