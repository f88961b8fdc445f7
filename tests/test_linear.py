"""Linear-hybrid forms (runtime.linear): the formula, decoding state, the chunked Triton kernel, the
distillation, and the profile -> search -> plan -> run path."""
import math

import numpy as np

import pytest
import torch

import attnforge as af
from attnforge.runtime import ops
from attnforge.runtime.forms import Dense, FormError, Linear, SinkWindow, form_from_dict, kept_pairs, kv_tokens
from attnforge.runtime.linear import (FeatureMaps, LinearState, distill, linear_triton, maps_for, register_maps)
from attnforge.runtime.reference import attention_reference

from attnforge.runtime import kernels

needs_interpreter = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")


def _qkv(b, hq, hkv, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=g, dtype=dtype), torch.randn(b, hkv, n, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, n, d, generator=g, dtype=dtype))


def _maps(d, seed=1, gain=0.8):
    g = torch.Generator().manual_seed(seed)
    m = FeatureMaps(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g), torch.eye(d) + 0.3 * torch.randn(d, d, generator=g),
                    gain)
    return register_maps(m)[0]


def _naive(q, k, v, form, scale, gi, g):
    """Row by row, straight from the definition in runtime/linear.py (float64)."""
    out = torch.zeros(q.shape[0], g, q.shape[2], v.shape[-1], dtype=torch.float64)
    m = maps_for(form.maps) if form.feature_map == "hedgehog" else None

    def phi(x, w):
        y = x @ w.double()
        return torch.softmax(torch.cat([y, -y]), 0)

    for b in range(q.shape[0]):
        for h in range(g):
            for i in range(q.shape[2]):
                qi = q[b, gi * g + h, i]
                exact = [j for j in range(i + 1) if j < form.sink or j > i - form.window]
                lin = [j for j in range(i + 1) if j not in exact]
                s = {j: float(qi @ k[b, gi, j]) * scale for j in range(i + 1)}
                mx = max(s[j] for j in exact)
                w = {j: math.exp(s[j] - mx) for j in exact}
                for j in lin:
                    if form.feature_map == "taylor2":
                        w[j] = (1 + s[j] + s[j] ** 2 / 2) * math.exp(-mx)
                    else:
                        w[j] = m.gain * float(phi(qi, m.wq) @ phi(k[b, gi, j], m.wk))
                den = sum(w.values())
                out[b, h, i] = sum(w[j] * v[b, gi, j] for j in w) / den
    return out


def test_form_fields_and_costs():
    f = Linear("taylor2", 64, 64)
    assert form_from_dict(f.to_dict()) == f
    with pytest.raises(FormError, match="feature_map"):
        Linear("elu", 64)
    with pytest.raises(FormError, match="window"):
        Linear("taylor2", 0)
    with pytest.raises(FormError, match="hedgehog"):
        Linear("taylor2", 8, 0, "hh-abc")
    # cost in pair-equivalents: more than its exact part; taylor2 (F = 1 + d + d^2) costs more than dense
    # at 4k for d = 64 and wins only at long lengths, hedgehog (F = 2d) wins early
    exact = kept_pairs(SinkWindow(64, 64), 4096)
    assert kept_pairs(Linear("hedgehog", 64, 64, "x"), 4096) > exact
    assert kept_pairs(Linear("taylor2", 64, 64), 4096) > kept_pairs(Dense(), 4096)
    assert kept_pairs(Linear("taylor2", 64, 64), 65536) < kept_pairs(Dense(), 65536)
    assert kept_pairs(Linear("hedgehog", 64, 64, "x"), 4096) < 0.2 * kept_pairs(Dense(), 4096)
    # decoding holds sink + window keys and a constant state: hedgehog 2d x (d + 1) numbers = 65 K+V entries
    assert kv_tokens(Linear("hedgehog", 64, 64, "x"), 4096) == 128 + 65
    assert kv_tokens(Linear("hedgehog", 64, 64, "x"), 65536) == 128 + 65


@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_reference_matches_definition(fmap):
    q, k, v = _qkv(1, 4, 2, 23, 8)
    key = _maps(8) if fmap == "hedgehog" else ""
    form = Linear(fmap, 5, 2, key)
    scale = 1 / math.sqrt(8)
    out = attention_reference(q, k, v, None, True, scale, 0, (form, Dense()))
    torch.testing.assert_close(out[:, :2], _naive(q, k, v, form, scale, 0, 2), rtol=1e-10, atol=1e-12)
    dense = attention_reference(q, k, v, None, True, scale)
    torch.testing.assert_close(out[:, 2:], dense[:, 2:], rtol=0, atol=0)      # the dense group untouched
    assert (out[:, :2, 10:] - dense[:, :2, 10:]).abs().max() > 1e-3            # the linear part is really used


def test_taylor2_with_a_window_covering_everything_is_dense():
    q, k, v = _qkv(2, 4, 2, 40, 8)
    out = attention_reference(q, k, v, None, True, None, 0, (Linear("taylor2", 40),) * 2)
    torch.testing.assert_close(out, attention_reference(q, k, v, None, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_decoding_state_equals_prefill(fmap):
    q, k, v = _qkv(1, 4, 2, 50, 8)
    key = _maps(8, seed=3) if fmap == "hedgehog" else ""
    form = Linear(fmap, 7, 3, key)
    scale = 1 / math.sqrt(8)
    ref = attention_reference(q, k, v, None, True, scale, 0, (form, form))
    st = LinearState(form, 8, 8, scale, dtype=torch.float64)
    rows = []
    for t in range(50):
        st.append(k[0, 1, t], v[0, 1, t])
        rows.append(st.attend(q[0, 2:, t]))
        assert st.exact == min(t + 1, form.sink + form.window) and st.ke.shape[0] == form.sink + form.window
    torch.testing.assert_close(torch.stack(rows, 1), ref[0, 2:], rtol=1e-10, atol=1e-12)
    bulk = LinearState(form, 8, 8, scale, dtype=torch.float64)             # a prompt added at once, then steps
    bulk.extend(k[0, 1, :30], v[0, 1, :30])
    for t in range(30, 50):
        bulk.extend(k[0, 1, t:t + 1], v[0, 1, t:t + 1])
    assert torch.equal(bulk.ke, st.ke) and torch.equal(bulk.ve, st.ve)      # the same keys in the same slots
    torch.testing.assert_close(bulk.attend(q[0, 2:, 49]), rows[-1], rtol=1e-10, atol=1e-12)


def test_decoding_state_does_not_keep_the_prompt_alive():
    """The exact part is copied into the state's own sink + window slots: the prompt's K / V can be freed (the
    state used to keep views of every prompt row it held, and so the whole [N, D] prompt tensors, while
    nbytes() counted only the held rows: 16.8 MB kept for a 32k prompt's group, 0.16 MB reported)."""
    import gc
    import weakref

    form = Linear("taylor2", 16, 4)
    st = LinearState(form, 8, 8, 0.3)
    k, v = torch.randn(1000, 8), torch.randn(1000, 8)
    refs = weakref.ref(k), weakref.ref(v)
    st.extend(k, v)
    del k, v
    gc.collect()
    assert all(r() is None for r in refs)
    assert st.nbytes() == sum(t.untyped_storage().nbytes() for t in (st.S, st.z, st.S0, st.z0, st.ke, st.ve))
    assert st.ke.shape == (20, 8) and st.exact == 20


@needs_interpreter
@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_triton_decode_step_matches_the_reference(fmap):
    q, k, v = _qkv(1, 6, 2, 30, 16, torch.float32, seed=11)
    key = _maps(16, seed=4) if fmap == "hedgehog" else ""
    form = Linear(fmap, 5, 3, key)
    scale = 1 / math.sqrt(16)
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, scale, 0, (form, form))
    st = LinearState(form, 16, 16, scale)
    ops.reset_counters()
    for t in range(30):
        st.append(k[0, 1, t], v[0, 1, t])
        if t in (2, 9, 29):                     # exact only; a few keys in the sums; most keys in the sums
            got = st.attend(q[0, 3:, t], impl="triton")
            torch.testing.assert_close(got.double(), ref[0, 3:, t], rtol=2e-5, atol=2e-5)
    assert ops.counters["triton_linear_decode"] == 3


@needs_interpreter
@pytest.mark.parametrize("n,d,sink,window,dtype", [
    (45, 16, 4, 16, torch.float32),       # N not a multiple of the chunk, window = chunk
    (40, 16, 0, 1, torch.float32),        # no sink, window of one key: almost all linear
    (37, 16, 20, 9, torch.float16),       # sink over a chunk boundary
    (33, 16, 2, 40, torch.bfloat16),      # window longer than the sequence: all exact
])
def test_triton_kernel_matches_float64_reference(n, d, sink, window, dtype):
    q, k, v = _qkv(1, 4, 2, n, d, torch.float32, seed=n)
    forms = (Linear("taylor2", window, sink), Linear("hedgehog", window, sink, _maps(d, seed=n)))
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, None, 0, forms)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ops.reset_counters()
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 1 / math.sqrt(d), "triton", "",
                                        af.runtime.forms.forms_to_json(forms))
    # every group is Linear: the linear kernel writes every slot, nothing else runs
    assert ops.counters["triton_linear"] == 1 and ops.counters["reference"] == 0
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@needs_interpreter
def test_triton_kernel_next_to_other_forms():
    q, k, v = _qkv(1, 6, 3, 36, 16, torch.float32, seed=5)
    forms = (Dense(), Linear("taylor2", 8, 4), SinkWindow(4, 8))
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, None, 0, forms)
    out = linear_triton(q, k, v, forms, out=attention_reference(q, k, v, None, True, None, 0, forms))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_gradients_through_the_op_match_autograd_of_the_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 12, 4))
    forms = af.runtime.forms.forms_to_json((Linear("taylor2", 3, 1),))
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.attnforge.attention(a, b, c, None, True, 0, 0.5, "reference",
                                                                                  "", forms), (q, k, v))


def test_distillation_lowers_the_held_out_error():
    # attention with a smooth structure (low-rank keys) that a learned feature map can fit better than identity
    g = torch.Generator().manual_seed(0)
    n, d = 160, 8
    base = torch.randn(1, 1, n, 2, generator=g)
    k = torch.cat([base, 0.1 * torch.randn(1, 1, n, d - 2, generator=g)], -1) * 2
    qs = [k.repeat(1, 2, 1, 1) + 0.3 * torch.randn(1, 2, n, d, generator=g) for _ in range(2)]
    vs = [torch.randn(1, 1, n, d, generator=g) for _ in range(2)]
    maps, errs = distill(qs, [k, k], vs, window=4, sink=1, scale=1 / math.sqrt(d), steps=150, rows=64, lr=0.1)
    assert len(maps) == 1 and maps[0].wq.shape == (d, d)
    assert errs["after"][0] < 0.9 * errs["before"][0], errs


def test_plan_with_hedgehog_heads_keeps_its_maps_beside_it(tmp_path):
    from attnforge.compiler.plan import Plan, PlanError, SitePlan

    key = _maps(16, seed=9)
    plan = Plan("fp", "toy", (SitePlan("s#0", 4, 2, (Linear("hedgehog", 8, 4, key), Dense())),), {"density": 0.5}, (64,))
    plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.maps.npz").exists()
    back = Plan.load(tmp_path / "plan.json")
    assert back.sites[0].forms[0].maps == key and maps_for(key).wq.shape == (16, 16)
    (tmp_path / "plan.maps.npz").unlink()
    with pytest.raises(PlanError, match="plan.maps.npz"):
        Plan.load(tmp_path / "plan.json")


def test_linear_measurements_match_running_each_hybrid():
    """linear_* statistics of the profiling backward against running each Linear candidate itself."""
    from attnforge.runtime import profiling
    from attnforge.runtime.linear import register_maps

    g = torch.Generator().manual_seed(7)
    n = 600                                              # > sink + 256: every candidate drops something
    q = torch.randn(1, 6, n, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    windows = sorted({w for fm, w in profiling.LINEAR_CANDIDATES if fm == "hedgehog"})
    maps = {w: [FeatureMaps(torch.eye(8) + 0.2 * torch.randn(8, 8, generator=g), torch.eye(8), 0.5 + gi)
                for gi in range(2)] for w in windows}
    col = profiling.ProfileCollector(32, linear_maps=lambda site: maps)
    with profiling.collecting(col):
        out = torch.ops.attnforge.attention_profile(q, k, v, None, True, 0, 0.4, "s", 32)
        grad = torch.randn_like(out)
        torch.autograd.grad(out, (q, k, v), grad)
    st = col.stats[("s", n)]
    for ci, (fm, w) in enumerate(profiling.LINEAR_CANDIDATES):
        forms = tuple(profiling.linear_form(fm, w, register_maps(maps[w][gi])[0] if fm == "hedgehog" else "")
                      for gi in range(2))
        d_o = (attention_reference(q, k, v, None, True, 0.4, forms=forms) - out).detach()
        lin = (grad * d_o).sum(-1).view(1, 2, 3, n)
        np.testing.assert_allclose(st["linear_out"][:, ci], d_o.square().view(1, 2, 3, n, 8).sum((0, 2, 3, 4)),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["linear_sq"][:, ci], lin.square().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st["linear_abs"][:, ci], lin.abs().sum((0, 2, 3)), rtol=1e-9, atol=1e-12)
        assert (st["linear_out"][:, ci] > 0).all()


def test_profile_search_plan_and_run_with_linear_candidates(tmp_path):
    """profile(linear=True) on a small model: maps distilled and stored in the profile, the search sees
    the linear candidates with their measured losses, and a plan using them runs through the backend."""
    from attnforge.compiler.models import tiny
    from attnforge.compiler.plan import Plan, SitePlan
    from attnforge.compiler.profile import Profile, profile_model
    from attnforge.compiler.search import search, tables_for

    model, (ids,) = tiny(384)
    out = tmp_path / "p.npz"
    prof = profile_model(model, {384: [ids]}, model_name="tiny", block=16, out=out, progress=False, linear=True,
                         distill_samples=[ids[:, :192], ids[:, 192:]], distill_steps=5)
    back = Profile.load(out)
    sid = back.sites[0]["id"]
    assert back.linear_candidates and set(back.linear_maps[sid]) == {64, 256}
    assert back.distill[sid][64]["after"].shape == (back.sites[0]["num_kv_heads"],)
    torch.testing.assert_close(back.linear_maps[sid][64][0].wq, prof.linear_maps[sid][64][0].wq)
    t = tables_for(back)
    lin = [(c, row) for cands, loss in zip(t.cands, t.loss) for c, row in zip(cands, loss) if c.kind == "linear"]
    assert len(lin) == len(t.groups) * 4 and all(np.isfinite(r).all() and (r > 0).all() for _, r in lin)
    assert not any(c.kind == "linear" for cands in tables_for(back, linear=False).cands for c in cands)
    search(back, af.Budget(0.5))                      # solvable with the linear candidates in
    # a plan that uses them, saved and loaded with its maps, runs: linear groups through runtime.linear
    hh = next(c for c, _ in lin if c.feature_map == "hedgehog")
    sites = tuple(SitePlan(s["id"], s["num_heads"], s["num_kv_heads"], (hh,) + (Dense(),) * (s["num_kv_heads"] - 1))
                  for s in back.sites)
    plan = Plan(back.fingerprint, "tiny", sites, {"density": 1.0}, (384,))
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    ops.reset_counters()
    be = af.Backend(plan=loaded, impl="reference", compiler="eager")
    got = torch.compile(model, backend=be)(ids)
    assert ops.counters["reference"] >= len(sites)
    ref = model(ids)
    assert (got - ref).abs().max() > 1e-4                       # the hybrid heads really changed the output
    # and an all-dense plan through the same path reproduces the model: the change is the linear heads'
    torch._dynamo.reset()
    plan_dense = Plan(back.fingerprint, "tiny", tuple(SitePlan(s.site, s.num_heads, s.num_kv_heads, (Dense(),) * s.num_kv_heads)
                                                      for s in sites), {"density": 1.0}, (384,))
    same = torch.compile(model, backend=af.Backend(plan=plan_dense, impl="reference", compiler="eager"))(ids)
    torch.testing.assert_close(same, ref, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_triton_kernels_with_the_gpu_chunk(fmap, monkeypatch):
    """The interpreter runs 16-token chunks (and 16-key decode tiles) for speed; a GPU runs 64: the same
    hybrid at that size too, prefill over several chunks and a decode step over more than one tile."""
    import functools

    from attnforge.runtime.linear import kernel_key

    d, n = 16, 200
    q, k, v = _qkv(1, 4, 2, n, d, torch.float32, seed=21)
    form = Linear(fmap, 80, 5, _maps(d, seed=6) if fmap == "hedgehog" else "")
    forms = (form, form)
    scale = 1 / math.sqrt(d)
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, scale, 0, forms)
    loaded = af.runtime.kernels.load_kernel(kernel_key(), torch.device("cpu"))
    monkeypatch.setattr(loaded.module, "launch", functools.partial(loaded.module.launch, chunk=64))
    monkeypatch.setattr(loaded.module, "decode", functools.partial(loaded.module.decode, block_e=64))
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton", "", af.runtime.forms.forms_to_json(forms))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    st = LinearState(form, d, d, scale)
    st.extend(k[0, 1], v[0, 1])
    assert st.exact == 85                                      # sink + window exact keys: two 64-key tiles
    got = st.attend(q[0, 2:, n - 1], impl="triton")
    torch.testing.assert_close(got.double(), ref[0, 2:, n - 1], rtol=2e-5, atol=2e-5)
