"""Profiling op, profile driver, MILP search, baseline and applying a plan — on small models."""
import itertools

import numpy as np
import pytest
import torch

import attnforge as af
import attnforge.compiler.search
from attnforge.compiler.models import tiny
from attnforge.compiler.profile import Profile, profile_model
from attnforge.compiler.search import _solve, _tables, pareto, search, streaming_baseline
from attnforge.runtime import profiling
from attnforge.runtime.forms import SinkWindow, causal_pairs, keep_mask
from attnforge.runtime.reference import attention_reference


def _profiled(q, k, v, collector, grad=None, scale=0.4):
    """Run the profiling op (causal, block 32) forward and backward under `collector`: (out, the gradient
    of out it was given, the input gradients)."""
    with profiling.collecting(collector):
        out = torch.ops.attnforge.attention_profile(q, k, v, None, True, 0, scale, "s", 32)
        grad = torch.randn_like(out) if grad is None else grad
        return out, grad, torch.autograd.grad(out, (q, k, v), grad)


def test_profiling_op_gradients_and_influence_are_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 150, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (6, 2, 2))
    col = profiling.ProfileCollector(32)
    out, grad, got = _profiled(q, k, v, col, scale=0.3)
    expected = torch.autograd.grad(attention_reference(q, k, v, None, True, 0.3), (q, k, v), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # brute-force MoA influence |A (G - sum A G)| / (1 - A), summed per KV group into 32x32 blocks
    keep = torch.ones(150, 150, dtype=torch.bool).tril()
    a = torch.softmax((q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3).masked_fill(~keep, -torch.inf), -1)
    gg = grad @ v.repeat_interleave(3, 1).transpose(-1, -2)
    infl = (a * (gg - (a * gg).sum(-1, keepdim=True)) / (1 - a).clamp_min(1e-6)).abs().detach()
    blocks = torch.nn.functional.pad(infl.view(2, 2, 3, 150, 150).sum((0, 2)), (0, 10, 0, 10))
    blocks = blocks.view(2, 5, 32, 5, 32).sum((2, 4)).numpy()
    np.testing.assert_allclose(col.stats[("s", 150)]["influence"], blocks, rtol=1e-6, atol=1e-9)
    assert col.stats[("s", 150)]["mass"].sum() == pytest.approx(2 * 6 * 150)
    ent = -torch.special.xlogy(a, a).detach().sum(-1).view(2, 2, 3, 150).sum((0, 2, 3))
    np.testing.assert_allclose(col.stats[("s", 150)]["entropy"], ent.numpy(), rtol=1e-9)


def test_window_measurements_match_the_windowed_attention():
    """window_out / window_abs / window_sq against running the SinkWindow form itself, per span, with the
    queries as the last N of S positions (several chunks, a group of 3 query heads per KV head)."""
    g = torch.Generator().manual_seed(1)
    n, s = 600, 700
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, s, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    col = profiling.ProfileCollector(32)
    out, grad, _ = _profiled(q, k, v, col)
    st = col.stats[("s", n)]
    measured = 0
    for wi, w in enumerate(profiling.SPANS):
        forms = (SinkWindow(profiling.SINK, w),) * 2
        d_o = (attention_reference(q, k, v, None, True, 0.4, forms=forms) - out).detach()
        lin = (grad * d_o).sum(-1).view(1, 2, 3, n)
        np.testing.assert_allclose(st["window_out"][:, wi], d_o.square().view(1, 2, 3, n, 8).sum((0, 2, 3, 4)),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["window_abs"][:, wi], lin.abs().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["window_sq"][:, wi], lin.square().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
        measured += bool(st["window_out"][0, wi] > 0)
    assert measured == sum(w < s - profiling.SINK for w in profiling.SPANS) > 4   # spans that drop something


def test_eviction_measurements_match_running_each_policy():
    """evict_* against dropping exactly the prompt keys runtime.kvcache.policy_keep drops (the same
    policy code the KV cache runs), for the last 1/8 of the rows decoded after the rest as a prompt."""
    from attnforge.runtime.kvcache import policy_keep

    g = torch.Generator().manual_seed(5)
    n = 256
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    col = profiling.ProfileCollector(32)
    out, grad, _ = _profiled(q, k, v, col)
    st = col.stats[("s", n)]
    prompt = n - n // profiling.EVICT_FRACTION
    for pi, pol in enumerate(profiling.EVICT_POLICIES):
        for bi, b in enumerate(profiling.EVICT_BUDGETS):
            form = profiling.evict_form(pol, b)
            keep = torch.zeros(2, n, n, dtype=torch.bool)              # per KV group: rows x keys
            keep[:, :prompt] = torch.ones(prompt, n, dtype=torch.bool).tril()
            for h in range(2):
                kept = policy_keep(form, q[0, 3 * h:3 * h + 3, :prompt].detach(), k[0, h, :prompt].detach(), 0.4)
                keep[h, prompt:, kept] = True                          # the kept prompt keys ...
                keep[h, prompt:, prompt:] = torch.ones(n - prompt, n - prompt, dtype=torch.bool).tril()  # ... + new
            want = attention_reference(q, k, v, keep.repeat_interleave(3, 0)[None], False, 0.4)
            d_o = (want - out).detach()
            lin = (grad * d_o).sum(-1).view(1, 2, 3, n)
            np.testing.assert_allclose(st["evict_out"][:, pi, bi], d_o.square().view(1, 2, 3, n, 8).sum((0, 2, 3, 4)),
                                       rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(st["evict_sq"][:, pi, bi], lin.square().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(st["evict_abs"][:, pi, bi], lin.abs().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
    assert (st["evict_sq"][:, :, 0] > st["evict_sq"][:, :, -1]).all()    # a smaller budget drops more


def test_quantization_measurements_match_decoding_from_codes():
    """quant_* against attending, row by row, over keys / values that are codes (runtime.kvquant) for
    positions j < quantized_tokens(i + 1) and exact after, on the same decode rows as eviction."""
    from attnforge.runtime.kvquant import fake_quant, quantized_tokens

    g = torch.Generator().manual_seed(6)
    n = 300
    q = torch.randn(1, 6, n, 16, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    col = profiling.ProfileCollector(32, quant=True)
    out, grad, _ = _profiled(q, k, v, col)
    st = col.stats[("s", n)]
    prompt = n - n // profiling.EVICT_FRACTION
    gr, res = profiling.QUANT_GROUP, profiling.QUANT_RESIDUAL
    for bi, bits in enumerate(profiling.QUANT_BITS):
        want = out.detach().clone()
        for i in range(prompt, n):
            nq = quantized_tokens(i + 1, gr, res)
            kq, vq = fake_quant(k.detach()[..., :i + 1, :], v.detach()[..., :i + 1, :], bits, gr, i + 1 - nq)
            kq, vq = kq.double(), vq.double()
            kq[..., nq:, :], vq[..., nq:, :] = k.detach()[..., nq:i + 1, :], v.detach()[..., nq:i + 1, :]   # exact
            kq, vq = kq.repeat_interleave(3, 1), vq.repeat_interleave(3, 1)
            a = torch.softmax(q.detach()[..., i:i + 1, :] @ kq.transpose(-1, -2) * 0.4, -1)
            want[..., i:i + 1, :] = a @ vq
        d_o = want - out.detach()
        assert d_o[..., :prompt, :].abs().max() == 0 and d_o.abs().max() > 0
        lin = (grad * d_o).sum(-1).view(1, 2, 3, n)
        np.testing.assert_allclose(st["quant_out"][:, bi], d_o.square().view(1, 2, 3, n, 16).sum((0, 2, 3, 4)),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["quant_sq"][:, bi], lin.square().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["quant_abs"][:, bi], lin.abs().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
    assert (st["quant_out"][:, 0] > st["quant_out"][:, 1]).all() and (st["quant_out"][:, 1] > st["quant_out"][:, 2]).all()
    plain = profiling.ProfileCollector(32)
    _profiled(q, k, v, plain, grad)
    assert "quant_out" not in plain.stats[("s", n)]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    model, (ids,) = tiny(192)
    out = tmp_path_factory.mktemp("prof") / "tiny.npz"
    prof = profile_model(model, {96: [ids[:, :96], ids[:, 96:]], 192: [ids]}, model_name="tiny", block=16,
                         out=out, progress=False)
    return model, ids, prof, out


def test_profile_file_round_trips_and_resumes(tiny_profile):
    model, ids, prof, out = tiny_profile
    assert prof.samples == {96: 2, 192: 1} and len(prof.sites) == 2
    back = Profile.load(out)
    assert back.samples == prof.samples
    np.testing.assert_array_equal(back.influence("attn.0#0", 192), prof.influence("attn.0#0", 192))
    # asking again for what is already there profiles nothing more
    again = profile_model(model, {96: [ids[:, :96], ids[:, 96:]], 192: [ids]}, model_name="tiny", block=16,
                          out=out, progress=False)
    assert again.samples == prof.samples


@pytest.mark.parametrize("density", [0.35, 0.6])
def test_search_meets_the_budget_at_every_length(tiny_profile, density):
    *_, prof, _ = tiny_profile
    plan = search(prof, af.Budget(density))
    for n in prof.lengths:
        assert plan.density(n) <= density + 1e-9
        assert plan.predicted["density"][str(n)] == pytest.approx(plan.density(n))
    assert plan.predicted["solver"]["status"] == 0


def test_budget_at_one_length_spends_it_there(tiny_profile):
    *_, prof, _ = tiny_profile
    everywhere = search(prof, af.Budget(0.4))
    at_long = search(prof, af.Budget(0.4, lengths=(192,)))
    assert at_long.density(192) <= 0.4 + 1e-9
    assert at_long.density(192) >= everywhere.density(192) - 1e-9
    assert at_long.budget["at_lengths"] == [192]
    with pytest.raises(af.compiler.search.SearchError, match="not all profiled"):
        search(prof, af.Budget(0.4, lengths=(500,)))


def test_milp_is_optimal_on_a_small_instance(tiny_profile):
    *_, prof, _ = tiny_profile
    t = _tables(prof)
    # 4 candidates per group, brute-forceable: the two of least loss and the two sparsest
    keep = [np.array(list(dict.fromkeys(list(np.argsort(l.sum(1))[:2]) + list(np.argsort(k[:, -1])[:2]))))
            for l, k in zip(t.loss, t.kept)]
    keep = [np.concatenate([idx, np.setdiff1d(np.arange(len(l)), idx)[:4 - len(idx)]]) for idx, l in zip(keep, t.loss)]
    t.cands = [[c[i] for i in idx] for c, idx in zip(t.cands, keep)]
    t.loss = [l[idx] for l, idx in zip(t.loss, keep)]
    t.kept = [k[idx] for k, idx in zip(t.kept, keep)]
    budget = 0.6
    choice, _ = _solve(t, budget, None, 10)
    best = None
    for combo in itertools.product(*[range(4)] * len(t.groups)):
        ok = all(sum(t.kept[g][c][li] for g, c in enumerate(combo)) <= budget * len(t.groups) * causal_pairs(n)
                 for li, n in enumerate(t.lengths))
        if ok:
            cost = sum(t.loss[g][c].sum() for g, c in enumerate(combo))
            best = cost if best is None else min(best, cost)
    got = sum(t.loss[g][c].sum() for g, c in enumerate(choice))
    assert got == pytest.approx(best, abs=1e-7)


def test_pareto_front_falls_with_density_and_cap_holds(tiny_profile):
    *_, prof, _ = tiny_profile
    front = pareto(prof)
    losses = [p["predicted_loss"] for p in front]
    assert losses == sorted(losses, reverse=True) and losses[-1] == pytest.approx(0, abs=1e-6)
    capped = search(prof, af.Budget(0.6), max_forms_per_layer=1)
    for sp in capped.sites:
        assert len(set(sp.forms)) == 1


def test_streaming_baseline_density():
    prof = Profile("m", "f", 64, [{"id": "a#0", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "causal": True,
                                   "mask": "causal"}], {4096: 1}, {})
    for d in (0.25, 0.5):
        plan = streaming_baseline(prof, d, 4096)
        assert d - 0.01 < plan.density(4096) <= d


def test_plan_runs_exact_masks_through_the_backend(tiny_profile):
    model, ids, prof, _ = tiny_profile
    plan = search(prof, af.Budget(0.35))
    be = af.Backend(plan=plan, compiler="eager")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids)
    rec = be.records[-1]
    assert set(rec.planned) == {sp.site for sp in plan.sites if any(f.kind != "dense" for f in sp.forms)}
    assert '"kind"' in rec.code                          # the plan entry is in the graph
    # the same model with the forms applied by hand, via an explicit mask per head
    entries = plan.entries()
    originals = [a.forward for a in model.attn]
    try:
        for i, attn in enumerate(model.attn):
            forms = entries[f"attn.{i}#0"]

            def forward(x, mask, attn=attn, forms=forms):
                b, n, _ = x.shape
                q = attn.q(x).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)
                k, v = attn.kv(x).view(b, n, 2, attn.kv_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                keep = keep_mask(forms, n, n).repeat_interleave(attn.heads // attn.kv_heads, 0)[None]
                o = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
                                                                     v.repeat_interleave(4, 1), attn_mask=keep)
                return attn.o(o.transpose(1, 2).reshape(b, n, -1))
            attn.forward = forward
        with torch.no_grad():
            expected = model(ids)
    finally:
        for attn, f in zip(model.attn, originals):
            attn.forward = f
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_optimize_keeps_generate_style_decoding_consistent(tiny_profile):
    """A decoding step (1 query, S keys) sees exactly what the same position saw in prefill."""
    model, ids, prof, _ = tiny_profile
    plan = search(prof, af.Budget(0.35))
    be = af.Backend(plan=plan, compiler="eager")
    form_json = next(sp.forms for sp in plan.sites)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 8, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    from attnforge.runtime.forms import forms_to_json
    full = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "reference", "", forms_to_json(form_json))
    last = torch.ops.attnforge.attention(q[:, :, -1:], k, v, None, False, 0, 0.25, "reference", "",
                                         forms_to_json(form_json))
    torch.testing.assert_close(last, full[:, :, -1:])
    assert be.options.plan is plan


def test_cli_metric_choices_are_the_search_metrics():
    from attnforge.compiler import cli
    from attnforge.compiler.search import METRICS

    assert cli.METRICS == METRICS       # the CLI keeps a copy so that `--help` needs no scipy import
    assert cli.RECALL_SLACK == attnforge.compiler.search.RECALL_SLACK


def test_measured_metric_reads_the_window_measurements(tiny_profile):
    _, _, prof, _ = tiny_profile
    t = _tables(prof)                                            # default: the measured Fisher metric
    assert t.metric == "fisher"
    site = prof.sites[0]["id"]
    checked = 0
    for gi, (si, g) in enumerate(t.groups):
        for ci, form in enumerate(t.cands[gi]):
            for li, n in enumerate(t.lengths):
                w = form.window_at(n)
                if form.kind == "sink_window" and w in prof.spans and w < n - prof.sink and si == 0:
                    curve = prof.window_error(site, n, "window_sq")[g]
                    assert t.loss[gi][ci, li] == pytest.approx(curve[prof.spans.index(w)], rel=1e-12)
                    checked += 1
                if form.kind == "dense" or (w is not None and w >= n - prof.sink):
                    assert t.loss[gi][ci, li] == 0
    assert checked > 0
    with pytest.raises(attnforge.compiler.search.SearchError, match="unknown metric"):
        _tables(prof, "magic")


def test_recall_windows_repeat_a_far_segment():
    from attnforge.compiler.evaluate import recall_windows, windows

    tokens = torch.arange(10_000)[None]
    (rw,) = recall_windows(tokens, 1024, 1, offset=2)
    (plain,) = windows(tokens, 1024, 3)[2:]
    w = rw.ids
    assert w.shape == (1, 1024) and torch.equal(w[0, :896], plain[0, :896])
    assert torch.equal(w[0, 896:], plain[0, 128:256])          # the tail copies tokens 768 positions back
    assert (rw.source, rw.target, rw.length) == (128, 896, 128)
    assert torch.equal(w[0, rw.target:rw.target + rw.length], w[0, rw.source:rw.source + rw.length])


def test_recall_mass_is_the_copied_rows_attention_on_their_source():
    """recall_mass against the probabilities themselves: rows 200..299 copy keys 40..139 (several query
    chunks, tiles not aligned with the rectangle, 3 query heads per KV head)."""
    g = torch.Generator().manual_seed(3)
    n = 300
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    col = profiling.ProfileCollector(32, recall=(40, 200, 100))
    _profiled(q, k, v, col)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    a = torch.softmax((q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.4).masked_fill(~keep, -torch.inf), -1)
    rect = torch.zeros(2, n, n, dtype=torch.float64)
    rect[:, 200:300, 40:140] = a.detach().view(2, 3, n, n).sum(1)[:, 200:300, 40:140]
    blocks = torch.nn.functional.pad(rect, (0, 20, 0, 20)).view(2, 10, 32, 10, 32).sum((2, 4)).numpy()
    np.testing.assert_allclose(col.stats[("s", n)]["recall_mass"], blocks, rtol=1e-9, atol=1e-12)
    assert blocks.sum() > 0
    plain = profiling.ProfileCollector(32)                     # a plain sample records none
    _profiled(q, k, v, plain)
    assert "recall_mass" not in plain.stats[("s", n)]


def test_recall_floor_keeps_the_retrieval_attention(tiny_profile, tmp_path):
    from attnforge.compiler.profile import RecallWindow

    model, ids, plain_prof, _ = tiny_profile
    copy = ids.clone()
    copy[0, 160:192] = ids[0, 16:48]
    prof = profile_model(model, {192: [ids, RecallWindow(copy, 16, 160, 32)]}, model_name="tiny", block=16,
                         out=tmp_path / "r.npz", progress=False)
    assert Profile.load(tmp_path / "r.npz").recall_mass("attn.0#0", 192).sum() > 0
    t = _tables(prof)
    free = search(prof, af.Budget(0.5), tables=t, recall_slack=0)
    floored = search(prof, af.Budget(0.5), tables=t, recall=0.7, recall_slack=0)
    assert floored.predicted["retrieval_kept"]["192"] >= 0.7 - 1e-9
    assert free.predicted["retrieval_kept"]["192"] < 0.7          # the floor changed the plan
    assert floored.budget["recall"] == 0.7 and floored.density(192) <= 0.5 + 1e-9
    assert sum(floored.predicted["loss"].values()) >= sum(free.predicted["loss"].values())
    # the slack: within 10% of the least predicted loss, the most retrieval attention
    tied = search(prof, af.Budget(0.5), tables=t, recall_slack=0.1)
    assert sum(tied.predicted["loss"].values()) <= 1.1 * sum(free.predicted["loss"].values()) + 1e-9
    assert tied.predicted["retrieval_kept"]["192"] >= free.predicted["retrieval_kept"]["192"] - 1e-12
    assert tied.density(192) <= 0.5 + 1e-9 and tied.predicted["solver"]["recall_slack"] == 0.1
    with pytest.raises(attnforge.compiler.search.SearchError, match="lower the recall floor"):
        search(prof, af.Budget(0.5), tables=t, recall=1.0)
    with pytest.raises(attnforge.compiler.search.SearchError, match="recall windows"):
        search(plain_prof, af.Budget(0.3), recall=0.5)


@pytest.mark.parametrize("kind", ["kv", "flops"])
def test_kv_and_flops_budgets_hold(tiny_profile, kind):
    from attnforge.runtime.forms import kv_tokens

    _, _, prof, _ = tiny_profile
    t = _tables(prof)
    plan = search(prof, af.Budget(0.5, kind=kind), tables=t)
    assert plan.budget == {kind: 0.5}
    for n in prof.lengths:
        if kind == "kv":
            used = sum(kv_tokens(f, n) for sp in plan.sites for f in sp.forms)
            assert used <= 0.5 * sum(sp.num_kv_heads for sp in plan.sites) * n + 1e-9
            assert plan.predicted["kv_fraction"][str(n)] == pytest.approx(used / (len(t.groups) * n))
        else:
            assert plan.predicted["attention_flops"][str(n)] <= 0.5 * plan.predicted["dense_attention_flops"][str(n)] + 1e-6
    with pytest.raises(attnforge.compiler.search.SearchError, match="budget kind"):
        af.Budget(0.5, kind="watts")


def test_cost_model_counts_the_kernels_tiles(tiny_profile):
    from attnforge.compiler.costs import site_cost
    from attnforge.runtime.forms import Dense

    _, _, prof, _ = tiny_profile
    plan = search(prof, af.Budget(0.5))
    for n in prof.lengths:
        cost = plan.predicted["cost"][str(n)]
        dense_flops = sum(causal_pairs(n) * s["num_heads"] * 4 * s["head_dim"] for s in prof.sites)
        assert cost["dense"]["flops"] == pytest.approx(dense_flops)
        assert cost["plan"]["flops"] <= cost["plan"]["executed_flops"] <= cost["dense"]["executed_flops"]
        assert 0 < cost["plan"]["estimated_ms"] <= cost["dense"]["estimated_ms"]
    # dense causal at n = 4 tiles: 10 visited tiles per query head, each head reads them once
    c = site_cost((Dense(),), 2, 16, 256)
    assert c["executed_flops"] == 10 * 2 * 64 * 64 * 4 * 16
    assert c["bytes"] == 10 * 2 * 64 * 2 * 16 * 2 + 2 * 256 * 2 * 16 * 2


def test_kv_evicting_candidates_compete_under_a_kv_budget_only(tiny_profile):
    """The profile measured every (policy, budget); the tables carry them as candidates with those losses;
    under a density budget they never win (dense prefill costs as much as Dense, with a loss), under a
    kv budget the search may mix them with windows and is never worse for having them."""
    from attnforge.runtime.forms import KVEvict

    _, _, prof, _ = tiny_profile
    t = _tables(prof)
    n_evict = len(profiling.EVICT_POLICIES) * len(profiling.EVICT_BUDGETS)
    for forms, loss in zip(t.cands, t.loss):
        ev = [i for i, f in enumerate(forms) if isinstance(f, KVEvict)]
        assert len(ev) == n_evict and np.isfinite(loss[ev]).all() and (loss[ev] >= 0).all()
    dense_budget = search(prof, af.Budget(0.5), tables=t)
    assert "kv_evict" not in dense_budget.form_counts()
    with_evict = search(prof, af.Budget(0.3, kind="kv"), tables=t)
    keep = [[i for i, f in enumerate(forms) if not isinstance(f, KVEvict)] for forms in t.cands]
    import dataclasses

    without = dataclasses.replace(t, cands=[[f[i] for i in k] for f, k in zip(t.cands, keep)],
                                  loss=[l[k] for l, k in zip(t.loss, keep)], kept=[x[k] for x, k in zip(t.kept, keep)],
                                  kv=[x[k] for x, k in zip(t.kv, keep)])
    no_evict = search(prof, af.Budget(0.3, kind="kv"), tables=without)
    assert sum(with_evict.predicted["loss"].values()) <= sum(no_evict.predicted["loss"].values()) + 1e-12


def test_kv_quant_candidates_are_measured_and_compete_under_a_kv_budget(tiny_profile):
    """The default profile measures KVQuant at 2/4/8 bits; the tables carry them with those losses (fewer
    bits lose more, by the output metric), density budgets never pick them, kv budgets may."""
    import dataclasses

    from attnforge.runtime.forms import KVQuant

    _, _, prof, _ = tiny_profile
    assert prof.quant_error("attn.0#0", 192) is not None
    t = _tables(prof, "output")
    for forms, loss in zip(t.cands, t.loss):
        qi = [i for i, f in enumerate(forms) if isinstance(f, KVQuant)]
        assert [forms[i].bits for i in qi] == list(profiling.QUANT_BITS)
        at192 = loss[qi, t.lengths.index(192)]
        assert at192[0] >= at192[1] >= at192[2] >= 0 and at192[0] > 0
    assert "kv_quant" not in search(prof, af.Budget(0.5), tables=t).form_counts()
    keep = [[i for i, f in enumerate(forms) if not isinstance(f, KVQuant)] for forms in t.cands]
    without = dataclasses.replace(t, cands=[[f[i] for i in k] for f, k in zip(t.cands, keep)],
                                  loss=[l[k] for l, k in zip(t.loss, keep)], kept=[x[k] for x, k in zip(t.kept, keep)],
                                  kv=[x[k] for x, k in zip(t.kv, keep)], recall=[x[k] for x, k in zip(t.recall, keep)])
    with_quant = search(prof, af.Budget(0.6, kind="kv"), tables=t)
    no_quant = search(prof, af.Budget(0.6, kind="kv"), tables=without)
    assert sum(with_quant.predicted["loss"].values()) <= sum(no_quant.predicted["loss"].values()) + 1e-12
