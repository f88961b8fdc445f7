"""The compiled kernels on a CUDA device against float64 references (skipped without one).

The rest of the suite runs every kernel through Triton's interpreter on the CPU; this file runs the same
kernels compiled, in half precision, at sizes where the tiling matters (N not a multiple of any block,
GQA, several splits). Run on a GPU machine with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py

(ATTNFORGE_GPU_TESTS_ON=cpu runs the same checks through the interpreter, to check the checks; slow.)
Each check asserts that the compiled path ran (the op's counters) and that its error against float64 is
of the order of PyTorch's own half-precision error (SDPA on the same inputs and mask).
"""
import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import attnforge as af
from attnforge import codegen
from attnforge.compiler.decode import cache_kwargs
from attnforge.runtime import kernels
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, Linear, SinkWindow, forms_to_json, keep_mask
from attnforge.runtime.reference import attention_reference

from conftest import assert_closer

DEVICE = os.environ.get("ATTNFORGE_GPU_TESTS_ON", "cuda")
RAN = "triton" if DEVICE == "cuda" else "triton_interpreter"       # the counter the compiled path bumps
if DEVICE == "cuda":
    pytestmark = [pytest.mark.gpu,
                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
                  pytest.mark.skipif(kernels.interpreter_enabled(), reason="run with TRITON_INTERPRET=0 (compiled kernels)")]
else:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")]

# (Triton's interpreter computes bfloat16 tl.dot wrongly: the CPU dry run checks float16 only)
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16]
HALF = DTYPES[0]
MIXED = (Dense(), SinkWindow(64, 256), ElasticWindow(16, 64, 0.25), BlockSparse(64, (0, 3), (0, 1)))


def _qkv(h, hk, n, d, dtype, seed, grad=False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(1, hh, n, d, device=DEVICE, generator=g).to(dtype) for hh in (h, hk, hk))
    return tuple(t.requires_grad_() for t in (q, k, v)) if grad else (q, k, v)


def _sdpa_masked(q, k, v, forms, scale):
    """PyTorch's own attention in the same dtype, with the forms' mask as a boolean attn_mask."""
    n = q.shape[2]
    keep = keep_mask(forms, n, n, device=q.device) & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    keep = keep.repeat_interleave(q.shape[1] // k.shape[1], 0)[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)


def _grads(fn, inputs, grad):
    return torch.autograd.grad(fn(*inputs), inputs, grad)


@pytest.mark.parametrize("dtype,h,hk,n,d", [(DTYPES[0], 9, 3, 1000, 64), (DTYPES[-1], 8, 2, 777, 128)])
def test_dense_kernel_forward(dtype, h, hk, n, d):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    q, k, v = _qkv(h, hk, n, d, dtype, seed=n)
    af.runtime.reset_counters()
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, d ** -0.5, "triton", key)
    assert af.runtime.counters[RAN] == 1
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, d ** -0.5)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_closer(out, theirs, ref, slack=4.0, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_kernel_forward_and_backward(dtype):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    n, d, scale = 1000 - 1000 % 64 + 64 * 2 + 17, 64, 0.125         # 1041: not a multiple of the tile
    q, k, v = _qkv(12, 4, n, d, dtype, seed=3, grad=True)
    grad = torch.randn(1, 12, n, d, device=DEVICE, dtype=dtype)
    fj = forms_to_json(MIXED)
    af.runtime.reset_counters()
    ours = _grads(lambda *t: torch.ops.attnforge.attention(*t, None, True, 0, scale, "triton", key, fj), (q, k, v), grad)
    assert af.runtime.counters[RAN] == 1 and af.runtime.counters["triton_backward"] == 1
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton", key, fj)
    t64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(*t64, None, True, scale, forms=MIXED)
    ref_grads = torch.autograd.grad(ref, t64, grad.double())
    theirs = _grads(lambda *t: _sdpa_masked(*t, MIXED, scale), (q, k, v), grad)
    assert_closer(out, _sdpa_masked(q, k, v, MIXED, scale), ref, slack=4.0, floor=1e-3)
    for a, t, e in zip(ours, theirs, ref_grads):
        assert_closer(a, t, e, slack=8.0, floor=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_site_backward_through_the_plan_kernel(dtype):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    q, k, v = _qkv(9, 3, 1000, 64, dtype, seed=5, grad=True)
    grad = torch.randn(1, 9, 1000, 64, device=DEVICE, dtype=dtype)
    af.runtime.reset_counters()
    ours = _grads(lambda *t: torch.ops.attnforge.attention(*t, None, True, 0, 0.125, "triton", key), (q, k, v), grad)
    assert af.runtime.counters["triton_backward"] == 1
    t64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_reference(*t64, None, True, 0.125), t64, grad.double())
    theirs = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, scale=0.125, enable_gqa=True),
                    (q, k, v), grad)
    for a, t, e in zip(ours, theirs, ref_grads):
        assert_closer(a, t, e, slack=8.0, floor=2e-3)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_batch_forward_and_backward(dtype, packed):
    """A padded batch (left padding, right padding, a hole) through the compiled plan kernel, compacted:
    against the rows alone in float64, forward and backward, PyTorch's own error (the compacted reference in
    the same dtype) as the yardstick; packed: integer labels, several sequences per row, one compacted row
    per sequence."""
    from attnforge.runtime import padding as P

    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    n, scale = 777, 0.125
    g = torch.Generator(device=DEVICE).manual_seed(11)
    q, k, v = (torch.randn(3, hh, n, 64, device=DEVICE, generator=g).to(dtype).requires_grad_() for hh in (12, 4, 4))
    padding = torch.ones(3, n, dtype=torch.bool, device=DEVICE)
    padding[1, :300] = False
    padding[2, 500:] = False
    padding[2, 77] = False
    if packed:                              # row 0: sequences of 200, 400 and 177 tokens; row 1: 300 padding, 2 more
        padding = padding.long()
        padding[0, 200:600], padding[0, 600:] = 2, 3
        padding[1, 650:] = 5
    grad = torch.randn(3, 12, n, 64, device=DEVICE, dtype=dtype)
    fj = forms_to_json(MIXED)
    af.runtime.reset_counters()
    out, _ = torch.ops.attnforge.attention_train(q, k, v, None, True, 0, scale, "triton", key, fj, padding)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters[RAN] == 1 and af.runtime.counters["triton_backward"] == 1
    assert af.runtime.counters["packed"] == (1 if packed else 0)            # the forward, compacted per sequence
    t64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = P.attention_rows(*t64, padding, True, scale, MIXED)
    ref_grads = torch.autograd.grad(ref, t64, grad.double())
    theirs = P.reference(q, k, v, padding, True, scale, MIXED)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    assert_closer(out, theirs, ref, slack=4.0, floor=1e-3)
    for a, t, e in zip(ours, theirs_grads, ref_grads):
        assert_closer(a, t, e, slack=8.0, floor=2e-3)


def test_decode_kernels_over_the_per_head_cache():
    """The split-KV decode kernel over dense / window / evicting groups and the quantized one over 2-, 4-
    and 8-bit groups, against the cache's float64 decode of the same contents."""
    from attnforge.compiler.decode import _decode_kernel, _decode_quant_kernel
    from attnforge.runtime.kvcache import SiteKVCache
    from attnforge.runtime.kvquant import QuantKV

    g = torch.Generator(device=DEVICE).manual_seed(9)
    n, d = 5000, 64
    k, v = (torch.randn(1, 4, n, d, device=DEVICE, generator=g, dtype=HALF) for _ in range(2))
    q = torch.randn(1, 12, d, device=DEVICE, generator=g, dtype=HALF)
    cache = SiteKVCache((Dense(), SinkWindow(64, 512), ElasticWindow(8, 128, 0.1), Dense()), max_length=n + 8)
    cache.append(k[:, :, :-3], v[:, :, :-3])
    for t in range(n - 3, n):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    out, splits = cache.decode(q, 0.125, _decode_kernel(q.device))
    assert splits > 1
    want = cache.decode_reference(q.double(), 0.125)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    store = QuantKV([(0, 2), (1, 4), (2, 8), (3, 4)], 32, 128, n + 8)
    store.append(k[:, :, :-3], v[:, :, :-3])
    for t in range(n - 3, n):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    out, splits = store.decode(q, 0.125, _decode_quant_kernel(q.device))
    assert splits > 1
    torch.testing.assert_close(out.double(), store.decode_reference(q.double(), 0.125), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_linear_hybrid_kernel(fmap):
    from attnforge.runtime.linear import FeatureMaps, register_maps

    d, n = 64, 1500
    g = torch.Generator().manual_seed(2)
    maps = register_maps(FeatureMaps(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g), torch.eye(d), 1.0))[0]
    form = Linear(fmap, 64, 64, maps if fmap == "hedgehog" else "")
    forms = (form, Dense())
    q, k, v = _qkv(6, 2, n, d, HALF, seed=4)
    ref = attention_reference(q.double(), k.double(), v.double(), None, True, 1 / math.sqrt(d), 0, forms)
    af.runtime.reset_counters()
    out = torch.ops.attnforge.attention(q, k, v, None, True, 0, 1 / math.sqrt(d), "triton", "", forms_to_json(forms))
    assert af.runtime.counters["triton_linear"] == 1
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("fmap", ["taylor2", "hedgehog"])
def test_linear_hybrid_training_step(fmap):
    """Forward through the linear and plan kernels (attention_train, its log-sum-exp saved), backward through
    attnforge::linear_backward: the chunked PyTorch form for the Linear group, the plan kernel's backward for
    the window group; gradients against the float64 reference."""
    from attnforge.runtime.linear import FeatureMaps, register_maps

    d, n = 64, 1100
    g = torch.Generator().manual_seed(3)
    maps = register_maps(FeatureMaps(torch.eye(d) + 0.1 * torch.randn(d, d, generator=g), torch.eye(d), 1.0))[0]
    forms = (Linear(fmap, 64, 64, maps if fmap == "hedgehog" else ""), SinkWindow(64, 256))
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    q, k, v = _qkv(6, 2, n, d, HALF, seed=6, grad=True)
    grad = torch.randn(1, 6, n, d, device=DEVICE, dtype=HALF)
    scale, fj = 1 / math.sqrt(d), forms_to_json(forms)
    af.runtime.reset_counters()
    ours = _grads(lambda *t: torch.ops.attnforge.attention_train(*t, None, True, 0, scale, "triton", key, fj)[0],
                  (q, k, v), grad)
    assert af.runtime.counters["triton_linear"] == 1 and af.runtime.counters["linear_backward"] == 1
    assert af.runtime.counters["triton_backward"] == 1
    t64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(attention_reference(*t64, None, True, scale, 0, forms), t64, grad.double())
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2)


def test_backend_on_a_small_model_runs_compiled_kernels():
    from attnforge.compiler.models import tiny

    model, (ids,) = tiny(300, sdpa=True)
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    be = af.Backend(compiler="eager", impl="triton")
    af.runtime.reset_counters()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(ids)
        want = model(ids)
    assert af.runtime.counters[RAN] >= 2 and af.runtime.counters["reference"] == 0
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


def test_inductor_training_step_runs_the_backward_kernels_with_the_saved_lse():
    """A plan trained through torch.compile's default compiler (Inductor): the forward runs attention_train
    (the log-sum-exp saved), the backward the plan kernel's dQ / dK-dV kernels behind their op; no fallback,
    no recomputation, gradients as the reference's."""
    from attnforge.compiler.models import tiny
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    model, (ids,) = tiny(300, sdpa=True)
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "tiny", (SitePlan(sites[0].id, 8, 2, (SinkWindow(4, 64), Dense())),
                                            SitePlan(sites[1].id, 8, 2, (Dense(), Dense()))), {"density": 0.7}, (300,))
    grads = {}
    for impl in ("triton", "reference"):
        torch._dynamo.reset()
        af.runtime.reset_counters()
        model.zero_grad()
        out = torch.compile(model, backend=af.Backend(plan=plan, impl=impl))(ids)
        out.float().square().mean().backward()
        grads[impl] = [p.grad.clone() for p in (model.attn[0].q.weight, model.attn[1].kv.weight, model.embed.weight)]
        if impl == "triton":
            assert af.runtime.counters["triton_backward"] == 2 and af.runtime.counters["reference"] == 0
            assert af.runtime.counters["triton_backward_recomputed"] == 0 and not af.runtime.fallbacks
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)


def _small_llama():
    """A 2-layer Llama (4 query / 2 KV heads, head dim 32, random weights) on DEVICE and 400 token ids."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, head_dim=32, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(cfg).eval()
    return model, torch.randint(0, 300, (1, 400), device=DEVICE)


def test_plan_cache_prefills_and_decodes_with_the_kernels():
    """A small Llama under af.plan_attention with a PlanCache: the prefill runs the generated kernels (dense
    layers the dense kernel, mixed ones the plan kernel), every step the decode kernels; with every group
    dense the logits equal transformers' own cache."""
    import transformers

    from attnforge.compiler.decode import plan_attention, plan_cache_from_forms
    from attnforge.runtime.forms import KVQuant

    model, ids = _small_llama()
    cfg = model.config
    logits = {}
    for name, forms in (("dense", (Dense(), Dense())), ("mixed", (SinkWindow(16, 64), KVQuant(4)))):
        cache = plan_cache_from_forms({0: forms, 1: (Dense(), Dense())}, 410)
        af.runtime.reset_counters()
        with plan_attention(model), torch.no_grad():
            out = [model(ids, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]]
            for _ in range(3):
                out.append(model(out[-1].argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1])
        logits[name] = torch.stack(out)
        if DEVICE == "cuda":          # (on the CPU the prefill takes the reference: "auto" compiles nothing there)
            assert af.runtime.counters[RAN] == 2 and af.runtime.counters["reference"] == 0
            assert af.runtime.counters["kvcache_decode_triton"] == 6
    hf = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        want = [model(ids, **cache_kwargs(model, hf), logits_to_keep=1).logits[:, -1]]
        for _ in range(3):
            want.append(model(want[-1].argmax(-1, keepdim=True), **cache_kwargs(model, hf)).logits[:, -1])
    torch.testing.assert_close(logits["dense"], torch.stack(want), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits["mixed"], logits["dense"], atol=1e-6)     # the plan did change something


def test_a_continuation_runs_the_dense_kernel_and_matches_hf():
    """A 120-token continuation after a 280-token prompt over the plan cache (a chat's next turn): with every
    group dense it is one attention through the generated masked kernel per layer, its logits those of
    transformers' own cache; with window groups, at once through PyTorch, equal to feeding the tokens one by one."""
    import transformers

    from attnforge.compiler.decode import plan_attention, plan_cache_from_forms

    model, ids = _small_llama()
    cfg = model.config

    def fed(cache, ends, ours=True):
        out, start = [], 0
        with plan_attention(model) if ours else contextlib.nullcontext(), torch.no_grad():
            for end in ends:
                out.append(model(ids[:, start:end], **cache_kwargs(model, cache)).logits)
                start = end
        return torch.cat(out, 1)

    af.runtime.reset_counters()
    dense = fed(plan_cache_from_forms({0: (Dense(), Dense()), 1: (Dense(), Dense())}, 410), [280, 400])
    assert af.runtime.counters["kvcache_continued_batched"] == 120
    if DEVICE == "cuda":
        assert af.runtime.counters[RAN] == 4 and af.runtime.counters["reference"] == 0   # prefill + continuation
    want = fed(transformers.DynamicCache(config=cfg), [280, 400], ours=False)
    torch.testing.assert_close(dense, want, rtol=1e-3, atol=1e-3)
    windows = {0: (SinkWindow(16, 64), Dense()), 1: (Dense(), SinkWindow(4, 100))}
    at_once = fed(plan_cache_from_forms(windows, 410), [280, 400])
    one_by_one = fed(plan_cache_from_forms(windows, 410), [280, *range(281, 401)])
    torch.testing.assert_close(at_once[:, 280:], one_by_one[:, 280:], rtol=1e-3, atol=1e-3)


def test_beams_and_prompt_lookup_drafts_over_the_kernels():
    """Beam search over the plan cache read by the compiled decode kernel, every group dense: transformers'
    own beam search tokens; prompt-lookup drafts over a windows plan: that plan's greedy tokens, rejected
    drafts taken back (weights scaled up so that the logits are not near ties)."""
    model, ids = _small_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    prompt = torch.cat([ids[:, :60], ids[:, :60]], 1)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=16, do_sample=False, num_beams=3)
    af.runtime.reset_counters()
    got, _ = af.generate(model, prompt, None, max_new_tokens=16, num_beams=3)
    assert torch.equal(got, want)
    if DEVICE == "cuda":
        assert af.runtime.counters["kvcache_decode_triton"] == 2 * 15
    sites = af.find_attention(model, (prompt,))
    from attnforge.compiler.plan import Plan, SitePlan, fingerprint

    plan = Plan(fingerprint(sites), "t", (SitePlan(sites[0].id, 4, 2, (SinkWindow(4, 32), Dense())),
                                          SitePlan(sites[1].id, 4, 2, (Dense(), BlockSparse(64, (0,), (0, 1))))),
                {}, (120,))
    greedy, _ = af.generate(model, prompt, plan, max_new_tokens=40)
    af.runtime.reset_counters()
    drafted, _ = af.generate(model, prompt, plan, max_new_tokens=40, prompt_lookup_num_tokens=6)
    assert torch.equal(drafted, greedy)
    assert af.runtime.counters["kvcache_continued_batched"] > 0


def test_a_decoding_step_never_waits_for_the_gpu():
    """Appending a token, decoding over the per-head cache (window, elastic, block-sparse, quantized and
    H2O-evicting groups) and the eviction step issue no synchronizing CUDA call: the host keeps queueing
    work while the GPU runs."""
    if DEVICE != "cuda":
        pytest.skip("synchronization is a CUDA notion")
    from attnforge.compiler.decode import _decode_kernel, _decode_quant_kernel
    from attnforge.runtime.forms import KVEvict, KVQuant
    from attnforge.runtime.kvcache import SiteKVCache

    forms = (Dense(), SinkWindow(64, 512), ElasticWindow(8, 128, 0.1), BlockSparse(64, (0, 2), (0, 1)), KVQuant(4),
             KVEvict("h2o", 0.5, sink=4, recent=32))
    cache = SiteKVCache(forms, max_length=3000)
    k, v = (torch.randn(1, 6, 2000, 64, device=DEVICE, dtype=HALF) for _ in range(2))
    cache.append(k, v)
    cache.select(torch.randn(1, 12, 2000, 64, device=DEVICE, dtype=HALF), 0.125)
    loaded, loaded_quant = _decode_kernel(k.device), _decode_quant_kernel(k.device)
    q = torch.randn(1, 12, 64, device=DEVICE, dtype=HALF)
    step = torch.randn(1, 6, 1, 64, device=DEVICE, dtype=HALF)
    for _ in range(2):                                  # warm-up: compile, first allocations, first eviction
        cache.append(step, step)
        cache.decode(q, 0.125, loaded, loaded_quant=loaded_quant)
        cache.after_step(q, 0.125)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cache.append(step, step)
            out, _ = cache.decode(q, 0.125, loaded, loaded_quant=loaded_quant)
            cache.after_step(q, 0.125)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.double(), cache.decode_reference(q.double(), 0.125), rtol=2e-2, atol=2e-2)


# soft-capped scores (Gemma 2): last, so that a short GPU lease cuts these before the older checks
def _eager_capped(q, k, v, scale, cap, keep):
    """Gemma 2's eager attention in the inputs' dtype (scores and the cap in half precision, softmax in float32):
    PyTorch's own error, the yardstick. keep: [G, N, N] bool."""
    r = q.shape[1] // k.shape[1]
    s = torch.matmul(q, k.repeat_interleave(r, 1).transpose(-1, -2)) * scale
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~keep.repeat_interleave(r, 0)[None], float("-inf"))
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v.repeat_interleave(r, 1))


@pytest.mark.parametrize("dtype,d", [(DTYPES[0], 256), (DTYPES[-1], 128)])
def test_soft_capped_dense_and_window_kernels(dtype, d):
    """Gemma 2's shapes (head dim 256 / 128, cap 50 on scores that reach it): the dense causal kernel and
    the sliding-window one, each against float64 with the cap."""
    n, cap, scale = 777, 50.0, d ** -0.5
    q, k, v = _qkv(8, 4, n, d, dtype, seed=21)
    q = q * 12                                         # scores up to ~ +-60: the tanh bends them
    for window in (0, 300):
        spec = codegen.KernelSpec(causal=True, window=bool(window))
        key = kernels.register_source(codegen.render_attention(spec).source)
        af.runtime.reset_counters()
        out = torch.ops.attnforge.attention(q, k, v, None, True, window, scale, "triton", key, "", None, cap)
        assert af.runtime.counters[RAN] == 1
        ref = attention_reference(q.double(), k.double(), v.double(), None, True, scale, window, softcap=cap)
        keep = keep_mask((SinkWindow(0, window) if window else Dense(),) * 4, n, n, device=q.device)
        assert_closer(out, _eager_capped(q, k, v, scale, cap, keep), ref, slack=4.0, floor=1e-3)
        uncapped = attention_reference(q.double(), k.double(), v.double(), None, True, scale, window)
        assert (out.double() - uncapped).abs().max() > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_capped_plan_kernel_forward_and_backward(dtype):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    n, d, scale, cap = 1041, 64, 0.125, 30.0
    q, k, v = _qkv(12, 4, n, d, dtype, seed=23)
    q = (q * 8).detach().requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    grad = torch.randn(1, 12, n, d, device=DEVICE, dtype=dtype)
    fj = forms_to_json(MIXED)
    af.runtime.reset_counters()
    out, _ = torch.ops.attnforge.attention_train(q, k, v, None, True, 0, scale, "triton", key, fj, None, cap)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert af.runtime.counters[RAN] == 1 and af.runtime.counters["triton_backward"] == 1
    t64 = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(*t64, None, True, scale, 0, MIXED, softcap=cap)
    ref_grads = torch.autograd.grad(ref, t64, grad.double())
    keep = keep_mask(MIXED, n, n, device=q.device)
    theirs = _eager_capped(q, k, v, scale, cap, keep)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    assert_closer(out, theirs, ref, slack=4.0, floor=1e-3)
    for a, t, e in zip(ours, theirs_grads, ref_grads):
        assert_closer(a, t, e, slack=8.0, floor=2e-3)


def test_soft_capped_decode_kernels():
    from attnforge.compiler.decode import _decode_kernel, _decode_quant_kernel
    from attnforge.runtime.forms import KVQuant
    from attnforge.runtime.kvcache import SiteKVCache

    g = torch.Generator(device=DEVICE).manual_seed(25)
    n, d, cap = 5000, 128, 20.0
    k, v = (torch.randn(1, 4, n, d, device=DEVICE, generator=g, dtype=HALF) for _ in range(2))
    q = torch.randn(1, 8, d, device=DEVICE, generator=g, dtype=HALF) * 8
    cache = SiteKVCache((Dense(), SinkWindow(64, 512), KVQuant(4), Dense()), max_length=n + 8)
    cache.append(k, v)
    out, splits = cache.decode(q, d ** -0.5, _decode_kernel(q.device), loaded_quant=_decode_quant_kernel(q.device),
                               softcap=cap)
    assert splits > 1
    want = cache.decode_reference(q.double(), d ** -0.5, cap)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    assert (cache.decode_reference(q.double(), d ** -0.5) - want).abs().max() > 0.05
