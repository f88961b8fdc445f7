"""Logit soft-capping (Gemma 2: scores = cap * tanh(q k^T * scale / cap), then the masks): detected with its
cap, computed by every kernel (dense and plan forwards, the plan kernel's backward, both decode kernels),
the reference, the profiling op and the ONNX export, each against float64 with the cap; Linear forms refuse it.
Every comparison also checks that the cap mattered (the uncapped result is far off)."""
import math

import pytest
import torch

import attnforge as af
from attnforge import codegen, runtime
from attnforge.runtime import kernels
from attnforge.runtime.forms import (BlockSparse, Dense, ElasticWindow, KVEvict, KVQuant, Linear, SinkWindow,
                                     forms_to_json)
from attnforge.runtime.kvcache import SiteKVCache
from attnforge.runtime.reference import attention_reference, attention_reference_backward, reference_lse

from conftest import assert_closer

interpreted = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")

CAP = 2.5          # small against these scores (|q.k * scale| up to ~10): the tanh bends most of them


def _qkv(h, hk, n, s=None, d=32, dtype=torch.float32, seed=0, gain=2.0):
    g = torch.Generator().manual_seed(seed)
    s = n if s is None else s
    return (torch.randn(2, h, n, d, generator=g).mul(gain).to(dtype), torch.randn(2, hk, s, d, generator=g).mul(gain).to(dtype),
            torch.randn(2, hk, s, d, generator=g).to(dtype))


def _naive(q, k, v, scale, cap, causal, mask=None):
    """The formula spelled out (repeat_kv, dense softmax), float64: what Gemma 2's eager attention computes."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = q @ k.transpose(-1, -2) * scale
    s = cap * torch.tanh(s / cap)
    if mask is not None:
        s = s + mask if mask.is_floating_point() else s.masked_fill(~mask, -math.inf)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).tril().logical_not(), -math.inf)
    return torch.softmax(s, -1) @ v


def test_reference_forward_and_backward_are_the_formula_and_its_autograd():
    q, k, v = (t.double() for t in _qkv(4, 2, 23))
    mask = torch.randn(1, 1, 23, 23, dtype=torch.float64)
    want = _naive(q, k, v, 0.2, CAP, True, mask)
    got = attention_reference(q, k, v, mask, True, 0.2, softcap=CAP)
    assert (got - want).abs().max() < 1e-12
    assert (attention_reference(q, k, v, mask, True, 0.2) - want).abs().max() > 1e-2      # the cap matters here
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    go = torch.randn_like(want)
    torch.autograd.backward(_naive(*leaves[:3], 0.2, CAP, True, leaves[3]), go)
    grads = attention_reference_backward(go, q, k, v, mask, True, 0.2, softcap=CAP)
    for mine, theirs in zip(grads, leaves):
        assert (mine - theirs.grad).abs().max() < 1e-10
    lse = reference_lse(q, k, mask, True, 0.2, softcap=CAP)
    s = (CAP * torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.2 / CAP) + mask)
    s = s.masked_fill(torch.ones(23, 23, dtype=torch.bool).tril().logical_not(), -math.inf)
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 1e-5


def _dense_key(**spec):
    return kernels.register_source(codegen.render_attention(codegen.KernelSpec(**spec)).source)


@interpreted
@pytest.mark.parametrize("spec,window,mask", [
    (dict(causal=True), 0, None),
    (dict(causal=True, window=True), 9, None),
    (dict(causal=False, mask="bool"), 0, "bool"),
    (dict(causal=True, mask="additive"), 0, "additive"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_kernel_soft_caps_before_its_masks(spec, window, mask, dtype):
    q, k, v = _qkv(4, 2, 70, dtype=dtype)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 70, 70, generator=torch.Generator().manual_seed(1)) > 0.4
        m[:, :, 5] = False                                       # a row that sees nothing: zeros
    elif mask == "additive":
        m = torch.randn(1, 4, 70, 70, generator=torch.Generator().manual_seed(1))
    before = runtime.counters["triton_interpreter"]
    out = torch.ops.attnforge.attention(q, k, v, m, spec["causal"], window, 0.3, "triton", _dense_key(**spec), "",
                                        None, CAP)
    assert runtime.counters["triton_interpreter"] == before + 1
    m64 = m.double() if m is not None and m.is_floating_point() else m
    ref = attention_reference(q.double(), k.double(), v.double(), m64, spec["causal"], 0.3, window, softcap=CAP)
    theirs = attention_reference(q, k, v, m, spec["causal"], 0.3, window, softcap=CAP)
    # bf16: the kernel rounds each P tile to bf16 for P @ V (as FlashAttention does), torch rounds once at the
    # end; a small cap flattens the rows, which makes torch's own error small (measured: 4.4x, 2.4x uncapped)
    assert_closer(out, theirs, ref, slack=8.0 if dtype == torch.bfloat16 else 4.0)
    uncapped = attention_reference(q.double(), k.double(), v.double(), m64, spec["causal"], 0.3, window)
    assert (out.double() - uncapped).abs().max() > 0.1
    if mask == "bool":
        assert out[:, :, 5].abs().max() == 0


MIXED = (Dense(), SinkWindow(4, 20), ElasticWindow(2, 8, 0.25), BlockSparse(64, (0,), (0, 1)))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_plan_kernel_forward_lse_and_backward_with_a_cap(dtype):
    """Every group its own form, N not a multiple of the tile; gradients through the Triton backward kernels."""
    key = _dense_key(causal=True, plan=True)
    q, k, v = _qkv(8, 4, 150, dtype=dtype)
    fj = forms_to_json(MIXED)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    runtime.reset_counters()
    out, lse = torch.ops.attnforge.attention_train(*leaves, None, True, 0, 0.3, "triton", key, fj, None, CAP)
    go = torch.randn_like(out)
    out.backward(go)
    assert runtime.counters["triton_interpreter"] == 1 and runtime.counters["triton_backward"] == 1
    assert runtime.counters["reference"] == 0
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, None, True, 0.3, 0, MIXED, softcap=CAP)
    assert_closer(out, attention_reference(q, k, v, None, True, 0.3, 0, MIXED, softcap=CAP), ref)
    assert (lse - reference_lse(q64, k64, None, True, 0.3, 0, MIXED, softcap=CAP)).abs().max() < 1e-3
    want = attention_reference_backward(go.double(), q64, k64, v64, None, True, 0.3, 0, MIXED, softcap=CAP)[:3]
    theirs = attention_reference_backward(go, q, k, v, None, True, 0.3, 0, MIXED, softcap=CAP)[:3]
    for mine, t, w in zip((leaf.grad for leaf in leaves), theirs, want):
        assert_closer(mine, t, w, slack=8.0)
    uncapped = attention_reference_backward(go.double(), q64, k64, v64, None, True, 0.3, 0, MIXED)[0]
    assert (leaves[0].grad.double() - uncapped).abs().max() > 0.1


@interpreted
def test_plan_kernel_tiles_agree_with_a_cap():
    """The GPU's tiles (128 x 64, 128 x 128) carry the cap too: each config's launch against float64."""
    from attnforge.runtime.blockmeta import block_meta

    key = _dense_key(causal=True, plan=True)
    loaded = kernels.load_kernel(key, torch.device("cpu"))
    q, k, v = _qkv(8, 4, 200)
    fj = forms_to_json(MIXED)
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, 0.3, 0, MIXED, softcap=CAP)
    for bm, bn in ((128, 64), (128, 128)):
        out = torch.empty_like(q)
        meta = block_meta(fj, 2, 200, 200, bm, bn, q.device)
        loaded.launch(q, k, v, out, 0.3, meta, config=(bm, bn, 4, 2, False), softcap=CAP)
        assert (out.double() - ref).abs().max() < 1e-4, (bm, bn)


@interpreted
def test_a_padded_batch_runs_compacted_with_the_cap():
    key = _dense_key(causal=True, plan=True)
    q, k, v = _qkv(4, 2, 40)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[1, :13] = False                                   # left padding: row 1 holds 27 tokens
    forms = (Dense(), SinkWindow(2, 6))
    runtime.reset_counters()
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "triton", key, forms_to_json(forms), padding, CAP)
    assert runtime.counters["padded"] == 1 and runtime.counters["triton_interpreter"] == 1
    for row, start in ((0, 0), (1, 13)):                      # each row as that sequence alone
        sl = slice(start, 40)
        want = attention_reference(q[row:row + 1, :, sl].double(), k[row:row + 1, :, sl].double(),
                                   v[row:row + 1, :, sl].double(), None, True, 0.3, 0, forms, softcap=CAP)
        assert (out[row:row + 1, :, sl].double() - want).abs().max() < 1e-4
    assert out[1, :, :13].abs().max() == 0


@interpreted
def test_decode_kernels_read_the_cache_with_the_cap():
    """Split-KV decode over a mixed per-head cache (full, window, quantized groups): kernel = reference = the
    same attention from scratch over what each group keeps."""
    forms = (Dense(), SinkWindow(2, 9), KVQuant(8, group=8, residual=8))
    split = kernels.load_kernel(kernels.register_source(codegen.render_decode().source), torch.device("cpu"))
    quant = kernels.load_kernel(kernels.register_source(codegen.render_decode_quant().source), torch.device("cpu"))
    q, k, v = _qkv(6, 3, 40)
    cache = SiteKVCache(forms, max_length=41)
    cache.append(k, v)
    qt = q[:, :, -1]
    ref = cache.decode_reference(qt.double(), 0.3, CAP)
    for splits in (1, 3):
        out, _ = cache.decode(qt, 0.3, split, splits=splits, loaded_quant=quant, softcap=CAP)
        assert (out.double() - ref).abs().max() < 1e-4
    # the full and window groups, from scratch (the quantized group's codes are checked by test_kvquant)
    want = attention_reference(q[:, :4, -1:].double(), k[:, :2].double(), v[:, :2].double(), None, False, 0.3, 0,
                               forms[:2], softcap=CAP)[:, :, 0]
    assert (ref[:, :4] - want).abs().max() < 1e-10
    assert (cache.decode_reference(qt.double(), 0.3)[:, :4] - want).abs().max() > 0.05


def test_eviction_ranks_keys_by_the_capped_attention():
    """H2O keeps the keys the model attends to: with soft-capped scores, the capped attention decides."""
    from attnforge.runtime.kvcache import policy_scores

    form = KVEvict("h2o", 0.5, sink=1, recent=2)
    q, k, _ = (t.double() for t in _qkv(2, 1, 30, gain=3.0))
    got = policy_scores(form, q[0], k[0, 0], 0.3, softcap=CAP)
    s = CAP * torch.tanh(q[0] @ k[0, 0].T * 0.3 / CAP)
    want = torch.softmax(s.masked_fill(torch.ones(30, 30, dtype=torch.bool).tril().logical_not(), -math.inf), -1)
    assert (got - want.sum((0, 1))).abs().max() < 1e-10


def test_linear_forms_and_bad_caps_are_refused():
    q, k, v = _qkv(2, 1, 16)
    fj = forms_to_json((Linear("taylor2", window=4),))
    with pytest.raises(ValueError, match="soft-cap"):
        torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "reference", "", fj, None, CAP)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be"):
            torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.3, "reference", "", "", None, bad)


def test_profiling_op_gradients_carry_the_cap():
    from attnforge.runtime.profiling import attention_profile

    q, k, v = _qkv(4, 2, 24)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_profile(*leaves, None, True, 0, 0.3, "s#0", 8, CAP)
    assert (out - attention_reference(q, k, v, None, True, 0.3, softcap=CAP)).abs().max() < 1e-6
    go = torch.randn_like(out)
    out.backward(go)
    want = attention_reference_backward(go, q, k, v, None, True, 0.3, softcap=CAP)[:3]
    for leaf, w in zip(leaves, want):
        assert (leaf.grad - w).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- Gemma 2
def _gemma2(impl="eager", window=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    num_hidden_layers=2, vocab_size=128, head_dim=16, sliding_window=window,
                                    attn_logit_softcapping=2.0, use_cache=False)
    cfg._attn_implementation = impl
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():                   # scores large enough that the cap bends them
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(25)
    return model


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_gemma2_sites_are_found_with_their_cap_and_compile_exactly():
    model = _gemma2(window=4)
    ids = _ids(12)
    sites = af.find_attention(model, (ids,))
    assert [(s.softcap, s.scale, s.window, s.causal) for s in sites] == [(2.0, 0.0625, 4, True), (2.0, 0.0625, 0, True)]
    torch._dynamo.reset()
    be = af.Backend(impl="reference", compiler="eager")
    runtime.reset_counters()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend=be)(ids).logits
    assert runtime.counters["reference"] == 2 and be.records[-1].declined == ()
    assert (got - want).abs().max() < 1e-5
    # a graph whose softcap argument were dropped would be far off (the cap matters for these weights)
    caps = [n for r in be.records for n in r.code.splitlines() if "softcap" in n]
    assert len(caps) == 2


@interpreted
def test_a_compiled_gemma2_training_step_runs_the_kernels_with_the_cap():
    """Forward and backward through the Triton kernels (attention_train, then the plan kernel's backward
    kernels for these dense causal / windowed sites): gradients equal eager's."""
    model = _gemma2(window=4).train()
    ids = _ids(12)

    def grads(run):
        model.zero_grad()
        run(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(model)
    torch._dynamo.reset()
    runtime.reset_counters()
    compiled = torch.compile(model, backend=af.Backend(impl="triton", compiler="eager"))
    got = grads(compiled)
    assert runtime.counters["triton_interpreter"] == 2 and runtime.counters["triton_backward"] == 2
    assert runtime.counters["reference"] == 0
    worst = max(float((got[n] - g).abs().max() / (g.abs().max() + 1e-12)) for n, g in want.items())
    assert worst < 1e-4


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_gemma2_decoding_through_the_plan_cache_equals_hf(impl):
    """Greedy tokens equal HF's generate(); each step's logits (prefill, then one token at a time through the
    cache and, with impl='triton', the split-KV kernel) equal the model's full forward, which the cap changes."""
    from attnforge.compiler.decode import cache_kwargs

    if impl == "triton" and not kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    model = _gemma2()
    ids = _ids(20, seed=1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    runtime.reset_counters()
    got, _ = af.generate(model, ids, None, max_new_tokens=6, impl=impl)
    assert torch.equal(got, want)
    assert runtime.counters[f"kvcache_decode_{impl}"] == 2 * 5
    steps = af.PlanCache(model, None, max_length=got.shape[1], impl=impl)
    with af.plan_attention(model), torch.no_grad():
        logits = [model(got[:, :20], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1]]
        for t in range(20, got.shape[1] - 1):
            logits.append(model(got[:, t:t + 1], use_cache=True, **cache_kwargs(model, steps)).logits[:, -1])
    with torch.no_grad():
        full = model(got).logits[:, 19:-1]
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(got).logits[:, 19:-1]
    assert (torch.stack(logits, 1) - full).abs().max() < 1e-4
    assert (uncapped - full).abs().max() > 1e-2


def test_gemma2_exports_to_onnx_with_the_cap(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from attnforge.compiler.export import export_onnx

    model = _gemma2()
    ids = _ids(16)
    res = export_onnx(model, (ids,), tmp_path / "g.onnx")
    proto = onnx.load(str(tmp_path / "g.onnx"))
    caps = [a.f for f in proto.functions for n in f.node if n.op_type == "Attention" for a in n.attribute
            if a.name == "softcap"]
    assert caps and all(c == 2.0 for c in caps)
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(ids).logits
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])
    assert (got - want).abs().max() < 1e-4
    assert res.ort_max_abs_diff is not None and res.ort_max_abs_diff < 1e-4
