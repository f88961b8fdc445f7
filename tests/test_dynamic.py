"""VerticalSlash (MInference's dynamic sparse prefill): the estimate against a brute-force one, patterns it
must find, the op running the resolved BlockSparse forms exactly (Triton under the interpreter and the
reference, float64), and the places it is refused or decodes densely."""
import math

import numpy as np
import pytest
import torch

import attnforge as af
from attnforge import codegen, runtime
from attnforge.runtime import kernels
from attnforge.runtime.dynamic import block_mass, resolve
from attnforge.runtime.forms import (BlockSparse, Dense, FormError, SinkWindow, VerticalSlash, forms_to_json, keep_mask,
                                     kept_pairs, kv_tokens)
from attnforge.runtime.reference import attention_reference


def _qkv(h, hk, n, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, d, generator=g), torch.randn(1, hk, n, d, generator=g),
            torch.randn(1, hk, n, d, generator=g))


def _mass_by_loops(form, q, k, scale, cap=0.0):
    """The estimate spelled out: each of the last queries' softmax row, its entries added to their key block and
    to their block diagonal one by one."""
    b, r, n, _ = q.shape
    s = k.shape[1]
    nb = math.ceil(s / form.block)
    per_key, per_diag = [0.0] * nb, [0.0] * nb
    for bi in range(b):
        for h in range(r):
            for i in range(n - min(form.last_q, n), n):
                p = s - n + i
                sc = (q[bi, h, i].double() @ k[bi, :p + 1].double().T) * scale
                if cap:
                    sc = cap * torch.tanh(sc / cap)
                a = torch.softmax(sc, -1)
                for j in range(p + 1):
                    per_key[j // form.block] += float(a[j])
                    per_diag[p // form.block - j // form.block] += float(a[j])
    return torch.tensor(per_key, dtype=torch.float64), torch.tensor(per_diag, dtype=torch.float64)


@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_block_mass_is_the_estimate_spelled_out(cap):
    form = VerticalSlash(2, 2, block=16, last_q=7)
    q, k, _ = _qkv(3, 1, 70)
    per_key, per_diag = block_mass(form, q, k[:, 0], 0.3, cap)
    want_key, want_diag = _mass_by_loops(form, q, k[:, 0], 0.3, cap)
    assert torch.allclose(per_key.double(), want_key, atol=1e-5) and torch.allclose(per_diag.double(), want_diag, atol=1e-5)
    assert per_key.sum() == pytest.approx(3 * 7, rel=1e-5)           # every row's mass, once per key block


def test_it_finds_a_planted_column_and_a_planted_diagonal():
    """Key block 5 holds keys every query matches (a retrieval column); in the other group each query matches
    the key 130 positions back (a periodic copy: block diagonal 2)."""
    n, d, blk = 512, 32, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, n, d, generator=g) * 0.1
    k = torch.randn(1, 2, n, d, generator=g) * 0.1
    target = torch.randn(d, generator=g)
    q[:, 0] += target * 3
    k[:, 0, 5 * blk:6 * blk] += target * 3
    k[:, 1, :n - 130] += q[:, 1, 130:] * 40
    forms = resolve((VerticalSlash(1, 1), VerticalSlash(1, 1)), q, k, d ** -0.5)
    assert forms[0].verticals == (0, 5)
    assert forms[1].slashes[1] in (2, 3)            # query block p // 64, key block (p - 130) // 64
    # deterministic: the same input, the same forms
    assert resolve((VerticalSlash(1, 1), VerticalSlash(1, 1)), q, k, d ** -0.5) == forms


@pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("n", [300, 64 * 5])
def test_the_op_runs_the_resolved_forms_exactly(n):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    q, k, v = _qkv(6, 3, n)
    forms = (VerticalSlash(1, 1), Dense(), VerticalSlash(2, 0))
    resolved = resolve(forms, q, k, 0.3)
    assert all(isinstance(f, (BlockSparse, Dense)) for f in resolved)
    runtime.reset_counters()
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "triton", key, forms_to_json(forms))
    assert runtime.counters["dynamic_resolved"] == 1 and runtime.counters["triton_interpreter"] == 1
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, 0.3, 0, resolved)
    assert (out.double() - ref).abs().max() < 1e-5
    dense = attention_reference(q.double(), k.double(), v.double(), None, True, 0.3)
    assert (out.double() - dense).abs().max() > 1e-2                  # blocks were skipped
    again = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "reference", "", forms_to_json(forms))
    assert (again.double() - ref).abs().max() < 1e-5


def test_refusals_say_what_to_do():
    q, k, v = _qkv(2, 1, 80)
    fj = forms_to_json((VerticalSlash(1, 1),))
    with pytest.raises(ValueError, match="padded or packed"):
        torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "reference", "", fj,
                                      torch.ones(1, 80, dtype=torch.bool))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.attnforge.attention(*leaves, None, True, 0, 0.3, "reference", "", fj)
    with pytest.raises(RuntimeError, match="inference"):
        out.sum().backward()
    with pytest.raises(FormError, match="resolve it first"):
        keep_mask((VerticalSlash(1, 1),), 8, 8)
    with pytest.raises(FormError, match="vertical_slash needs"):
        VerticalSlash(-1, 2)


def test_costs_count_its_most_and_decoding_holds_every_key():
    f = VerticalSlash(3, 2, block=16)
    assert kept_pairs(f, 200) == kept_pairs(BlockSparse(16, (0, 1, 2, 3), (0, 1, 2)), 200) < kept_pairs(Dense(), 200)
    assert kv_tokens(f, 200) == 200
    from attnforge.runtime.kvcache import SiteKVCache

    cache = SiteKVCache((f, SinkWindow(0, 8)), max_length=64)
    assert cache.layouts[0].kind == "full"


def test_a_plan_with_it_generates_and_refuses_export(tmp_path):
    """Through af.generate: the prompt resolved once per layer, decoding over every key of those groups."""
    import transformers

    from attnforge.compiler.export import ExportError, export_onnx
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "t", tuple(SitePlan(s.id, 4, 2, (VerticalSlash(1, 1), Dense())) for s in sites),
                {}, (150,))
    runtime.reset_counters()
    out, cache = af.generate(model, ids, plan, max_new_tokens=4)
    assert out.shape == (1, 154) and runtime.counters["dynamic_resolved"] == 2
    assert [layer.site._caps for layer in cache.layers] == [[154, 154]] * 2
    with pytest.raises(ExportError, match="vertical_slash"):
        export_onnx(model, (ids[:, :40],), tmp_path / "v.onnx", plan=plan)


def test_the_profile_measures_it_and_the_search_offers_it_on_request(tmp_path):
    """Per sample, the influence each VerticalSlash budget's resolution drops: a larger budget keeps a
    superset (the same ranking), the largest every block at these lengths; the search's loss is that share
    of the group's influence, and it is a candidate only with dynamic=True."""
    import transformers

    from attnforge.compiler.profile import profile_model
    from attnforge.compiler.search import tables_for
    from attnforge.runtime.profiling import VS_CANDIDATES

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prof = profile_model(model, {n: [torch.randint(0, 128, (1, n), generator=g)] for n in (512, 1024)},
                         model_name="t", progress=False, kv_quant=False)
    site = prof.sites[0]["id"]
    for n in (512, 1024):
        dropped = prof.stats[(site, n)]["vs_dropped"]                        # [Hkv, candidates]
        assert dropped.shape == (2, len(VS_CANDIDATES))
        assert (np.diff(dropped, axis=1) <= 1e-12).all() and (dropped[:, 0] > 0).all()
        assert (dropped <= prof.stats[(site, n)]["influence"].sum((1, 2))[:, None] + 1e-12).all()
        assert (dropped[:, -1] == 0).all()                                  # 1 + 16 verticals: every block
    plain = tables_for(prof, "influence")
    assert not any(isinstance(f, VerticalSlash) for f in plain.cands[0])
    t = tables_for(prof, "influence", dynamic=True)
    idx = [i for i, f in enumerate(t.cands[0]) if isinstance(f, VerticalSlash)]
    assert [t.cands[0][i] for i in idx] == [VerticalSlash(nv, ns) for nv, ns in VS_CANDIDATES]
    st = prof.stats[(site, 512)]
    assert t.loss[0][idx, 0] == pytest.approx(st["vs_dropped"][0] / st["influence"][0].sum())
    # a plan with it: the report builds (its thumbnail draws no region: the form has none before an input)
    from attnforge.compiler.plan import Plan, SitePlan
    from attnforge.compiler.report import build_report, write_report
    from attnforge.compiler.search import search

    plan = search(prof, af.Budget(density=0.5), metric="influence", dynamic=True)
    forced = Plan(plan.fingerprint, "t", (SitePlan(site, 4, 2, (VerticalSlash(2, 2), Dense())),), {}, (512, 1024))
    for p in (plan, forced):
        rep = build_report(p, prof, command="pytest")
        paths = write_report(rep, tmp_path / f"r{p is forced}.html", profile=prof, plan=p)
        assert paths
