"""The heterogeneous per-head plan kernel (Triton interpreter on the CPU) against the float64 reference."""
import pytest
import torch

import attnforge as af
from attnforge import codegen
from attnforge.runtime import blockmeta, kernels
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, SinkWindow, forms_to_json, keep_mask
from attnforge.runtime.reference import attention_reference

from conftest import assert_closer

pytestmark = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")

MIXES = {
    "dense+window+elastic": (Dense(), SinkWindow(4, 40), ElasticWindow(8, 16, 0.25)),
    "block_sparse+window": (BlockSparse(64, (0, 2), (0, 1)), SinkWindow(0, 70), Dense()),
    "all_window": (SinkWindow(64, 64), SinkWindow(1, 1), SinkWindow(3, 129)),
}


def _plan_key():
    return kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("n,s", [(200, 200), (130, 258), (1, 193), (200, 136)])
def test_plan_kernel_matches_float64(mix, n, s):
    forms = MIXES[mix]
    if any(isinstance(f, BlockSparse) for f in forms) and (s - n) % 64:
        pytest.skip("block-sparse needs aligned query blocks (the op sends this case to the reference)")
    g = torch.Generator().manual_seed(n + s)
    q = torch.randn(2, 6, n, 32, generator=g)
    k, v = torch.randn(2, 3, s, 32, generator=g), torch.randn(2, 3, s, 32, generator=g)
    fj = forms_to_json(forms)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _plan_key(), fj)
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, 0.2, forms=forms)
    theirs = attention_reference(q, k, v, None, True, 0.2, forms=forms)
    assert_closer(out, theirs, ref)
    assert af.runtime.counters["triton_interpreter"] == 1 and af.runtime.counters["reference"] == 0
    # the kernel visited only the blocks the forms keep: never more than the block-level mask has
    meta = blockmeta.block_meta(fj, 2, n, s, 64, 64, "cpu")
    keep = keep_mask(forms, n, s) & torch.ones(n, s, dtype=torch.bool).tril()   # [G, N, S], op's causal too
    pad = (0, -s % 64, 0, -n % 64)
    needed = torch.nn.functional.pad(keep, pad).unflatten(1, (-1, 64)).unflatten(3, (-1, 64)).any(2).any(-1)
    assert torch.equal(meta.count, needed.sum(-1, dtype=torch.int32))
    assert af.runtime.counters["triton_plan_blocks"] == meta.visited_blocks * 1 < needed[0].numel() * 3
    # blocks wholly inside a form's keep region (below the diagonal, in a sink) ran without an element mask
    assert af.runtime.counters["triton_plan_whole_blocks"] == meta.whole_blocks
    assert (meta.whole_blocks > 0) == (n > 64)


def test_schedule_runs_heaviest_first_and_covers_every_program():
    forms = (Dense(), SinkWindow(0, 64))
    meta = blockmeta.block_meta(forms_to_json(forms), 2, 640, 640, 64, 64, "cpu")
    sched = meta.schedule.tolist()
    assert sorted(map(tuple, sched)) == [(qb, h) for qb in range(10) for h in range(4)]
    work = [int(meta.count[h // 2, qb]) for qb, h in sched]
    assert work == sorted(work, reverse=True) and work[0] == 10 and work[-1] == 1
    # the two query heads of a KV group at one query block are next to each other (they share K/V tiles)
    assert all(sched[i][0] == sched[i + 1][0] and sched[i][1] // 2 == sched[i + 1][1] // 2
               for i in range(0, len(sched), 2))


def test_misaligned_block_sparse_goes_to_the_reference_with_a_reason():
    forms = (BlockSparse(64, (0,), (0,)),)
    q, k = torch.randn(1, 1, 10, 16), torch.randn(1, 1, 70, 16)
    with pytest.raises(af.KernelUnavailable, match="aligned"):
        torch.ops.attnforge.attention(q, k, k, None, True, 0, 0.2, "triton", _plan_key(), forms_to_json(forms))
    out = torch.ops.attnforge.attention(q, k, k, None, True, 0, 0.2, "auto", _plan_key(), forms_to_json(forms))
    torch.testing.assert_close(out, attention_reference(q, k, k, None, True, 0.2, forms=forms))


def test_backend_emits_the_plan_kernel_for_planned_sites():
    from attnforge.compiler.models import tiny
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    model, (ids,) = tiny(150, sdpa=True)
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "tiny", (SitePlan(sites[0].id, 8, 2, (SinkWindow(4, 32), Dense())),
                                            SitePlan(sites[1].id, 8, 2, (Dense(), Dense()))), {"density": 0.7}, (150,))
    be = af.Backend(plan=plan, impl="triton", compiler="eager")
    out = torch.compile(model, backend=be)(ids)
    names = {kr.site: kr.name for kr in be.records[0].kernels}
    assert names == {sites[0].id: "attnforge_fwd_plan_causal", sites[1].id: "attnforge_fwd_dense_causal"}
    torch._dynamo.reset()
    ref = torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(ids)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    assert af.runtime.counters["triton_interpreter"] == 2 and af.runtime.counters["triton_plan_blocks"] > 0


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("n,s", [(150, 150), (70, 198)])
def test_plan_kernel_backward_matches_float64(mix, n, s):
    forms = MIXES[mix]
    if any(isinstance(f, BlockSparse) for f in forms) and (s - n) % 64:
        pytest.skip("block-sparse needs aligned query blocks (the op sends this case to the reference)")
    g = torch.Generator().manual_seed(7 + n)
    q = torch.randn(1, 6, n, 32, generator=g).requires_grad_()
    k, v = (torch.randn(1, 3, s, 32, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 6, n, 32, generator=g)
    fj = forms_to_json(forms)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _plan_key(), fj)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters["triton_backward"] == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(attention_reference(q64, k64, v64, None, True, 0.2, forms=forms), (q64, k64, v64),
                                   grad.double())
    theirs = torch.autograd.grad(attention_reference(q, k, v, None, True, 0.2, forms=forms), (q, k, v), grad)
    for a, t, e in zip(got, theirs, expected):
        assert_closer(a, t, e, slack=8.0, floor=1e-5)


@pytest.mark.parametrize("case", ["planned", "dense", "dense_window"])
def test_attention_train_hands_its_log_sum_exp_to_the_backward(case):
    """attention_train: the same output as attention, each row's log-sum-exp from the forward kernel (the
    plan kernel, or the dense kernel for a dense site) equal to the float64 one, and a backward that uses it
    instead of running the forward again; gradients against float64."""
    from attnforge.runtime.reference import reference_lse

    forms, window = {"planned": (MIXES["dense+window+elastic"], 0), "dense": ((), 0), "dense_window": ((), 30)}[case]
    spec = codegen.KernelSpec(causal=True, plan=bool(forms), window=bool(window))
    key = kernels.register_source(codegen.render_attention(spec).source)
    fj = forms_to_json(forms) if forms else ""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 150, 32, generator=g).requires_grad_()
    k, v = (torch.randn(1, 3, 150, 32, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 6, 150, 32, generator=g)
    out, lse = torch.ops.attnforge.attention_train(q, k, v, None, True, window, 0.2, "triton", key, fj)
    assert torch.equal(out, torch.ops.attnforge.attention(q, k, v, None, True, window, 0.2, "triton", key, fj))
    assert lse.shape == (1, 6, 150) and lse.dtype == torch.float32
    lse64 = reference_lse(q.double(), k.double(), None, True, 0.2, window, forms)
    assert (lse.double() - lse64).abs().max() < 1e-5
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters["triton_backward"] == 1 and af.runtime.counters["triton_backward_recomputed"] == 0
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(attention_reference(*t64, None, True, 0.2, window, forms), t64, grad.double())
    theirs = torch.autograd.grad(attention_reference(q, k, v, None, True, 0.2, window, forms), (q, k, v), grad)
    for a, t_, e in zip(got, theirs, expected):
        assert_closer(a, t_, e, slack=8.0, floor=1e-5)
    # the plain op has no log-sum-exp to hand over: its backward runs the forward once more
    out = torch.ops.attnforge.attention(q, k, v, None, True, window, 0.2, "triton", key, fj)
    torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters["triton_backward"] == 2 and af.runtime.counters["triton_backward_recomputed"] == 1


def test_reference_lse_of_a_row_that_sees_nothing_is_plus_infinity():
    from attnforge.runtime.reference import reference_lse

    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    lse = reference_lse(q, k, mask, False, 0.3)
    assert torch.isposinf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, [0, 1, 3, 4]]).all()
    want = torch.logsumexp((q @ k.transpose(-1, -2)) * 0.3, -1)
    torch.testing.assert_close(lse[:, :, 3], want[:, :, 3])


def test_plan_kernel_head_dims_narrower_than_the_tile():
    """Head dims 40 (q, k) and 24 (v) in 64- and 32-wide tiles: the whole blocks' loads keep their
    head-dim bound (only a tile exactly the head dim loads unmasked), forward and both backward kernels."""
    forms = (Dense(), SinkWindow(8, 70), ElasticWindow(4, 16, 0.25))
    g = torch.Generator().manual_seed(40)
    q = torch.randn(1, 6, 200, 40, generator=g).requires_grad_()
    k = torch.randn(1, 3, 200, 40, generator=g).requires_grad_()
    v = torch.randn(1, 3, 200, 24, generator=g).requires_grad_()
    grad = torch.randn(1, 6, 200, 24, generator=g)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _plan_key(), forms_to_json(forms))
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    assert af.runtime.counters["triton_backward"] == 1 and af.runtime.counters["triton_plan_whole_blocks"] > 0
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*t64, None, True, 0.2, forms=forms)
    expected = (ref, *torch.autograd.grad(ref, t64, grad.double()))
    theirs = attention_reference(q, k, v, None, True, 0.2, forms=forms)
    theirs = (theirs, *torch.autograd.grad(theirs, (q, k, v), grad))
    for a, t_, e in zip(got, theirs, expected):
        assert_closer(a, t_, e, slack=8.0, floor=1e-5)


@pytest.mark.parametrize("window,n,s", [(0, 150, 150), (40, 150, 150), (0, 70, 198)])
def test_dense_site_backward_runs_through_the_plan_kernel_where_exact(window, n, s):
    """A dense site has no backward kernel of its own: causal self-attention (N = S) takes the plan kernel's
    backward with every group dense (or SinkWindow(0, w)); cross-shaped calls keep the reference's."""
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, window=bool(window))).source)
    g = torch.Generator().manual_seed(window + n)
    q = torch.randn(2, 6, n, 32, generator=g).requires_grad_()
    k, v = (torch.randn(2, 3, s, 32, generator=g).requires_grad_() for _ in range(2))
    grad = torch.randn(2, 6, n, 32, generator=g)
    out = torch.ops.attnforge.attention(q, k, v, None, True, window, 0.2, "triton", key)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters["triton_backward"] == (1 if n == s else 0)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(attention_reference(q64, k64, v64, None, True, 0.2, window), (q64, k64, v64),
                                   grad.double())
    theirs = torch.autograd.grad(attention_reference(q, k, v, None, True, 0.2, window), (q, k, v), grad)
    for a, t, e in zip(got, theirs, expected):
        assert_closer(a, t, e, slack=8.0, floor=1e-5)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_training_step_through_the_backend_uses_the_backward_kernels(compiler):
    """A compiled training step: with Inductor, AOTAutograd traces the backward with fake tensors, so the
    kernels must sit behind an op of their own (attention_backward) to run at all."""
    from attnforge.compiler.models import tiny
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    model, (ids,) = tiny(140, sdpa=True)
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "tiny", (SitePlan(sites[0].id, 8, 2, (SinkWindow(4, 32), BlockSparse(64, (0,), (0,)))),
                                            SitePlan(sites[1].id, 8, 2, (Dense(), ElasticWindow(2, 8, 0.3)))),
                {"density": 0.6}, (140,))
    grads = {}
    for impl in ("triton", "reference"):
        torch._dynamo.reset()
        model.zero_grad()
        out = torch.compile(model, backend=af.Backend(plan=plan, impl=impl, compiler=compiler))(ids)
        out.float().square().mean().backward()
        grads[impl] = [p.grad.clone() for p in (model.attn[0].q.weight, model.attn[1].kv.weight, model.embed.weight)]
    assert af.runtime.counters["triton_backward"] == 2
    # the graph compiled with grad enabled runs attention_train: the backward used the forward's log-sum-exp
    assert af.runtime.counters["triton_backward_recomputed"] == 0
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("n,s", [(150, 150), (130, 258)])
def test_every_autotune_config_of_the_plan_kernel_computes_the_same_attention(mix, n, s):
    """Each of the plan kernel's CONFIGS (tiles 64 x 64 up to 128 x 128, warps, stages), forward with the
    log-sum-exp, on metadata built for its tile, as the autotuner launches them: a block-sparse group's
    64-granular layout inside larger tiles (kept and dropped sub-blocks in one tile) included."""
    from attnforge.runtime.reference import reference_lse

    loaded = kernels.load_kernel(_plan_key(), torch.device("cpu"))
    forms = MIXES[mix]
    g = torch.Generator().manual_seed(n + s)
    q = torch.randn(1, 6, n, 32, generator=g)
    k, v = torch.randn(1, 3, s, 32, generator=g), torch.randn(1, 3, s, 32, generator=g)
    ref64 = attention_reference(q.double(), k.double(), v.double(), None, True, 0.2, forms=forms)
    lse64 = reference_lse(q.double(), k.double(), None, True, 0.2, 0, forms)
    tiles = {tuple(c[:2]) for c in loaded.module.CONFIGS}
    assert {(64, 64), (128, 64), (128, 128)} <= tiles
    for config in loaded.module.CONFIGS:
        meta = blockmeta.block_meta(forms_to_json(forms), 2, n, s, config[0], config[1], "cpu")
        assert meta.sub == (config[0] // 64, config[1] // 64)
        out, lse = torch.full_like(q, float("nan")), torch.empty(1, 6, n)
        loaded.launch(q, k, v, out, 0.2, meta, lse=lse, config=config)
        assert (out.double() - ref64).abs().max() < 1e-5, config
        # rows that see no key (the window group's first rows here) have lse +inf in both
        torch.testing.assert_close(lse.double(), lse64.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tile", [(128, 64), (128, 128)])
def test_the_op_runs_larger_tiles_on_their_own_metadata(tile, monkeypatch):
    """The op's launch path as on a GPU: the autotuner runs every config it tries on metadata built for
    that config's tile, and the chosen one's blocks are what the counters see."""
    from attnforge.runtime import ops

    forms = MIXES["block_sparse+window"]
    fj = forms_to_json(forms)
    tried = []

    def tune(loaded, kernel, q, v, run, shape_key=""):
        for config in loaded.module.CONFIGS[:2]:
            meta = run((*config[:2], 1, 1, False))
            tried.append(((meta.block_m, meta.block_n), shape_key))
        return (*tile, 1, 1, False)

    monkeypatch.setattr(ops, "_config", tune)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 200, 32, generator=g) for h in (6, 3, 3))
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _plan_key(), fj)
    assert_closer(out, attention_reference(q, k, v, None, True, 0.2, forms=forms),
                  attention_reference(q.double(), k.double(), v.double(), None, True, 0.2, forms=forms))
    meta = blockmeta.block_meta(fj, 2, 200, 200, *tile, "cpu")
    assert af.runtime.counters["triton_plan_blocks"] == meta.visited_blocks
    assert af.runtime.counters["triton_plan_whole_blocks"] == meta.whole_blocks
    assert [t for t, _ in tried] == [tuple(c[:2]) for c in kernels.load_kernel(_plan_key(), q.device).module.CONFIGS[:2]]
    assert all(key.startswith("n1k|forms-") for _, key in tried)


@pytest.mark.parametrize("seed", range(12))
def test_block_metadata_equals_the_per_form_definition(seed):
    """The vectorized block flags equal `_group_blocks` form by form (every kind, queries at the end of
    longer keys too), and the sort-free lists are each row's flagged blocks in order (forward and the
    backward's transpose)."""
    from attnforge.runtime.forms import KVEvict, KVQuant, Linear

    g = torch.Generator().manual_seed(seed)
    pick = lambda hi: int(torch.randint(1, hi, (1,), generator=g))          # noqa: E731
    menu = [Dense(), SinkWindow(pick(70), pick(300)), ElasticWindow(pick(9), pick(100), 0.1 * pick(5)),
            BlockSparse(64, (0, pick(4)), (0, pick(3))), Linear("taylor2", pick(130), pick(9)), KVQuant(4),
            KVEvict("h2o", 0.5), SinkWindow(0, 1)]
    forms = tuple(menu[int(i)] for i in torch.randint(0, len(menu), (5,), generator=g))
    n = 64 * pick(6) + (0 if seed % 2 else pick(60))
    s = n + 64 * (seed % 3) if seed % 4 else max(1, n - 64 * (seed % 3 + 1))   # some with fewer keys than queries
    meta = blockmeta.block_meta(forms_to_json(forms), 2, n, s, 64, 64, "cpu")
    qb, kb = torch.arange(meta.count.shape[1])[:, None], torch.arange(-(-s // 64))[None, :]
    want = torch.stack([blockmeta._group_blocks(f, qb, kb, n, s, 64, 64) for f in forms])
    assert torch.equal(meta.flags, want)
    # whole blocks, element by element: visited, every key in range, and the kernel's element rule (the
    # op's causal, the forms' causal at absolute positions, sink + window) keeps all of the block's valid
    # rows x keys; every other visited block is an edge block
    i, j = torch.arange(n)[:, None], torch.arange(s)[None, :]
    pos = s - n + i
    win, sink = meta.window[:, None, None], meta.sink[:, None, None]
    rule = (j <= i) & (j <= pos) & ((win == 0) | (j < sink) | (j > pos - win))          # [G, n, s]
    rule = torch.nn.functional.pad(rule, (0, -s % 64, 0, -n % 64), value=True)         # rows past n: free
    rule[:, :, s:] = False                                                               # keys past s: edge
    all_kept = rule.unflatten(1, (-1, 64)).unflatten(3, (-1, 64)).all(2).all(-1)       # [G, nbq, nbk]
    assert torch.equal(meta.whole, want & all_kept)
    for flags, whole, count, full, index in (
            (want, meta.whole, meta.count, meta.full, meta.index),
            (want.transpose(1, 2), meta.whole.transpose(1, 2), meta.count_t, meta.full_t, meta.index_t)):
        for gi in range(flags.shape[0]):
            for r in range(flags.shape[1]):
                first = whole[gi, r].nonzero().flatten().tolist()
                rest = (flags[gi, r] & ~whole[gi, r]).nonzero().flatten().tolist()
                assert count[gi, r] == len(first) + len(rest) and full[gi, r] == len(first)
                assert index[gi, r, :count[gi, r]].tolist() == first + rest


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tile", [(128, 64), (128, 128), (64, 128), (256, 128)])
def test_larger_tiles_metadata_is_the_64_granular_one_pooled(seed, tile):
    """Tiles of several 64 x 64 sub-blocks: a tile is visited iff one of its sub-blocks is, its bits are
    exactly its visited sub-blocks, it is whole iff the kernel's element rule on every visited sub-block
    keeps all valid rows x keys and no sub-block is dropped, and its lists put whole tiles first."""
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda hi: int(torch.randint(1, hi, (1,), generator=g))          # noqa: E731
    menu = [Dense(), SinkWindow(pick(70), pick(300)), ElasticWindow(pick(9), pick(100), 0.1 * pick(5)),
            BlockSparse(64, (0, pick(4)), (0, pick(3))), SinkWindow(0, 1), BlockSparse(64, (1,), (1, 2))]
    forms = tuple(menu[int(i)] for i in torch.randint(0, len(menu), (4,), generator=g))
    n = 64 * pick(7) + (0 if seed % 2 else pick(60))
    s = n + 64 * (seed % 3)
    fj = forms_to_json(forms)
    fine = blockmeta.block_meta(fj, 2, n, s, 64, 64, "cpu")
    meta = blockmeta.block_meta(fj, 2, n, s, *tile, "cpu")
    rm, rn = tile[0] // 64, tile[1] // 64
    assert meta.sub == (rm, rn) and meta.sub_blocks
    nbq, nbk = -(-n // tile[0]), -(-s // tile[1])
    f = torch.nn.functional.pad(fine.flags, (0, nbk * rn - fine.flags.shape[2], 0, nbq * rm - fine.flags.shape[1]))
    f = f.unflatten(1, (nbq, rm)).unflatten(3, (nbk, rn)).permute(0, 1, 3, 2, 4)      # [G, nbq, nbk, rm, rn]
    assert torch.equal(meta.flags, f.flatten(-2).any(-1))
    weights = 2 ** torch.arange(rm * rn)
    bits = (f.flatten(-2).long() * weights).sum(-1)
    # whole, element by element: the rule the edge tiles apply (element rule and the sub-block's bit)
    i, j = torch.arange(n)[:, None], torch.arange(s)[None, :]
    pos = s - n + i
    win, sink = meta.window[:, None, None], meta.sink[:, None, None]
    rule = (j <= i) & (j <= pos) & ((win == 0) | (j < sink) | (j > pos - win))           # [G, n, s]
    rule &= fine.flags.repeat_interleave(64, 1)[:, :n].repeat_interleave(64, 2)[:, :, :s]
    rule = torch.nn.functional.pad(rule, (0, nbk * tile[1] - s), value=False)
    rule = torch.nn.functional.pad(rule, (0, 0, 0, nbq * tile[0] - n), value=True)      # rows past n: free
    all_kept = rule.unflatten(1, (nbq, tile[0])).unflatten(3, (nbk, tile[1])).all(2).all(-1)
    assert torch.equal(meta.whole, meta.flags & all_kept)
    for gi in range(len(forms)):
        for r in range(nbq):
            first = meta.whole[gi, r].nonzero().flatten().tolist()
            rest = (meta.flags[gi, r] & ~meta.whole[gi, r]).nonzero().flatten().tolist()
            c = int(meta.count[gi, r])
            assert c == len(first) + len(rest) and meta.full[gi, r] == len(first)
            assert meta.index[gi, r, :c].tolist() == first + rest
            assert meta.bits[gi, r, :c].tolist() == bits[gi, r, first + rest].tolist()
    with pytest.raises(ValueError, match="64 x 64"):
        _ = meta.count_t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plan_kernel_half_precision_forward_and_backward(dtype):
    """fp16 and bf16 through the plan kernel's forward and both backward kernels, a fully masked-out
    key block pattern and N not a multiple of the tile, against float64 (bf16 products in float32 under
    the interpreter; see test_kernel.test_half_precision)."""
    forms = MIXES["block_sparse+window"]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 6, 150, 32, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, 3, 150, 32, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(1, 6, 150, 32, generator=g).to(dtype)
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.2, "triton", _plan_key(), forms_to_json(forms))
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters["triton_interpreter"] == 1 and af.runtime.counters["triton_backward"] == 1
    assert out.dtype == dtype and all(x.dtype == dtype for x in got)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*t64, None, True, 0.2, forms=forms)
    ref_grads = torch.autograd.grad(ref, t64, grad.double())
    t32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    theirs = attention_reference(*t32, None, True, 0.2, forms=forms)      # PyTorch in float32, rounded once
    theirs_grads = torch.autograd.grad(theirs, t32, grad.float())
    slack = 4.0 if dtype == torch.bfloat16 else 2.0
    assert_closer(out, theirs.to(dtype), ref, slack=slack, floor=1e-3)
    for a, t, e in zip(got, theirs_grads, ref_grads):
        assert_closer(a, t.to(dtype), e, slack=2 * slack, floor=2e-3)
