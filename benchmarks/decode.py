"""Decode speed and memory of attnforge's per-head KV cache against Hugging Face's default cache + SDPA.

    python benchmarks/decode.py --json decode.json          # on a CUDA GPU (random weights, bf16)

For a SmolLM2-shaped and a Llama-8B-shaped layer stack at 4k-32k tokens of context: prefill once, then
time `--steps` greedy decoding steps (one token each, the model's full forward per step) with
    hf          transformers DynamicCache, attn_implementation="sdpa"
    dense       attnforge PlanCache, every group full (the split-KV Triton decode kernel)
    kv50        attnforge PlanCache, every group sink 64 + window: 50% of the KV entries at that context
    kivi4/2     attnforge PlanCache, every group KVQuant (KIVI codes, 4 / 2 bits, group 32, residual 128),
                read by the quantized decode kernel (dequantization in registers)
and report tokens/s, speed-up over hf, the bytes each cache holds and the peak allocated memory. With
`--continuation N`, also one N-token continuation after the prompt (a chat's next turn, a later chunk of a
chunked prefill) per cache: hf, dense (one attention through the dense kernel) and kv50 (the window groups
attend at once in PyTorch), as tokens/s and the last token's logits against hf's.
Also each decode kernel alone for one layer (CUDA events): bytes it reads per call over its time, as a
fraction of the device's HBM bandwidth (datasheet: H100 SXM 3.35 TB/s, H200 4.8 TB/s); measured first,
since it is quick. The JSON is rewritten after every row; a failed row is recorded under "errors".
"""
import argparse
import json
import time

import torch

from _common import Device, Results
from attnforge.compiler.decode import cache_kwargs

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, head_dim=64),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, head_dim=128),
    # only for `--device cpu`, the smoke test of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=16),
}
HBM = {"H100": 3.35e12, "H200": 4.8e12}


def build(shape, max_pos, dev, dtype):
    """A Llama stack of that shape with random weights, built on the device (rotary tables computed by
    transformers itself, whatever its version keeps them in)."""
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=max_pos, use_cache=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev.kind):
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def run(model, cache, ids, steps, attnforge, dev):
    """(tokens/s over `steps` greedy steps after a warm-up step, peak allocated bytes, first step's logits)."""
    import attnforge as af

    ctx = af.plan_attention(model) if attnforge else torch.no_grad()
    dev.sync()
    dev.reset_peak()
    with ctx, torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        first = model(tok, **cache_kwargs(model, cache)).logits[:, -1].float()     # warm-up step (compile, autotune)
        tok = first.argmax(-1, keepdim=True)
        dev.sync()
        t = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, **cache_kwargs(model, cache)).logits[:, -1].argmax(-1, keepdim=True)
        dev.sync()
        seconds = time.perf_counter() - t
    return steps / seconds, dev.peak(), first


def continuation(model, make_cache, ids, new, attnforge, dev):
    """(tokens/s of one forward over the last `new` tokens of ids after a prefill of the rest, its last logits):
    once to warm up (kernels compiled, autotuned), then timed on a fresh cache."""
    import attnforge as af

    for timed in (False, True):
        cache = make_cache()
        ctx = af.plan_attention(model) if attnforge else torch.no_grad()
        with ctx, torch.no_grad():
            model(ids[:, :-new], **cache_kwargs(model, cache), logits_to_keep=1)
            dev.sync()
            t = time.perf_counter()
            logits = model(ids[:, -new:], **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1].float()
            dev.sync()
            seconds = time.perf_counter() - t
        del cache
    return new / seconds, logits


def hf_cache_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _time_calls(call, dev, reps=50):
    """(milliseconds per call by CUDA events after one warm-up call, the splits the last call used)."""
    call()
    if not dev.cuda:
        t = time.perf_counter()
        _, splits = call()
        return (time.perf_counter() - t) * 1e3, splits
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        _, splits = call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, splits


def _bandwidth(nbytes, ms, device_name):
    peak = next((v for k_, v in HBM.items() if k_ in device_name), None)
    return {"GBps": round(nbytes / ms / 1e6, 1),
            "fraction_of_hbm": round(nbytes / ms / 1e-3 / peak, 3) if peak else None}


def kernel_bandwidth(shape, context, dev, dtype):
    """The decode kernel alone on one layer's dense cache at `context` tokens: GB/s and fraction of HBM;
    checked against the cache's float64 decode first."""
    from attnforge.compiler.decode import _decode_kernel
    from attnforge.runtime.forms import Dense
    from attnforge.runtime.kvcache import SiteKVCache

    s = SHAPES[shape]
    g, h, d = s["num_key_value_heads"], s["num_attention_heads"], s["head_dim"]
    cache = SiteKVCache((Dense(),) * g, max_length=context)
    k = torch.randn(1, g, context, d, device=dev.kind, dtype=dtype)
    cache.append(k, torch.randn_like(k))
    q = torch.randn(1, h, d, device=dev.kind, dtype=dtype)
    loaded = _decode_kernel(q.device)
    out, _ = cache.decode(q, d ** -0.5, loaded)
    err = (out.double() - cache.decode_reference(q.double(), d ** -0.5)).abs().max().item()
    ms, splits = _time_calls(lambda: cache.decode(q, d ** -0.5, loaded), dev)
    nbytes = 2 * g * context * d * k.element_size() + g * context          # K and V + keep flags
    return {"context": context, "ms_per_layer_call": round(ms, 4), "splits": splits, "max_error_vs_float64": err,
            **_bandwidth(nbytes, ms, dev.name())}


def quant_kernel_bandwidth(shape, context, dev, dtype, bits=4):
    """The quantized decode kernel alone on one layer (every group KVQuant(bits)): bytes it reads (codes,
    float16 scales and minima, the residual) over its time; checked against float64 decoding of the same
    codes first."""
    from attnforge.compiler.decode import _decode_quant_kernel
    from attnforge.runtime.kvquant import QuantKV

    s = SHAPES[shape]
    g, h, d = s["num_key_value_heads"], s["num_attention_heads"], s["head_dim"]
    store = QuantKV([(i, bits) for i in range(g)], 32, 128, context)
    k = torch.randn(1, g, context, d, device=dev.kind, dtype=dtype)
    store.append(k, torch.randn_like(k))
    q = torch.randn(1, h, d, device=dev.kind, dtype=dtype)
    loaded = _decode_quant_kernel(q.device)
    out, _ = store.decode(q, d ** -0.5, loaded)
    err = (out.double() - store.decode_reference(q.double(), d ** -0.5)).abs().max().item()
    ms, splits = _time_calls(lambda: store.decode(q, d ** -0.5, loaded), dev)
    return {"context": context, "bits": bits, "ms_per_layer_call": round(ms, 4), "splits": splits,
            "max_error_vs_float64": err, **_bandwidth(store.held_bytes(), ms, dev.name())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "llama8b"], choices=list(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--continuation", type=int, default=0, metavar="N",
                    help="also time one N-token continuation after the prompt per cache (0: not)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: smoke-test this script through Triton's interpreter (--shapes tiny; no figures)")
    args = ap.parse_args()
    dev = Device(args.device)
    dev.require("benchmarks/decode.py")
    import transformers

    import attnforge as af
    from attnforge.compiler.decode import plan_cache_from_forms
    from attnforge.runtime.forms import Dense, KVQuant, SinkWindow

    dtype = getattr(torch, args.dtype)
    res = Results(args.json, device=dev.name(), torch=torch.__version__, transformers=transformers.__version__,
                  attnforge=af.__version__, steps=args.steps, dtype=args.dtype, kernel=[])
    top = max(args.contexts)
    for shape in args.shapes:                     # the kernels alone first: quick, and the HBM criterion
        for what, fn in (("dense", lambda: kernel_bandwidth(shape, top, dev, dtype)),
                         ("quant4", lambda: quant_kernel_bandwidth(shape, top, dev, dtype, 4)),
                         ("quant2", lambda: quant_kernel_bandwidth(shape, top, dev, dtype, 2))):
            try:
                row = res.add({"shape": shape, "kernel": what, **fn()}, key="kernel")
                print(json.dumps(row), flush=True)
            except Exception as e:
                res.error({"shape": shape, "kernel": what}, e)
            dev.empty_cache()
    for shape in args.shapes:
        layers, g = SHAPES[shape]["num_hidden_layers"], SHAPES[shape]["num_key_value_heads"]
        model = build(shape, top + args.steps + 8, dev, dtype)
        for n in args.contexts:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, n), device=dev.kind)
            row = {"shape": shape, "context": n}
            try:
                hf = transformers.DynamicCache(config=model.config)
                row["hf_tokens_per_s"], row["hf_peak_bytes"], hf_first = run(model, hf, ids, args.steps, False, dev)
                row["hf_cache_bytes"] = hf_cache_bytes(hf)
                del hf
            except Exception as e:
                res.error({"shape": shape, "context": n, "cache": "hf"}, e)
                continue
            for label, form in (("dense", Dense()), ("kv50", SinkWindow(64, n // 2 - 64)), ("kivi4", KVQuant(4)),
                                ("kivi2", KVQuant(2))):
                try:
                    # on the CPU smoke run the decode steps go through the interpreter's kernels too
                    cache = plan_cache_from_forms({i: (form,) * g for i in range(layers)}, n + args.steps + 2,
                                                  impl="auto" if dev.cuda else "triton")
                    af.runtime.reset_counters()
                    tps, peak, first = run(model, cache, ids, args.steps, True, dev)
                    row[f"{label}_tokens_per_s"], row[f"{label}_peak_bytes"] = tps, peak
                    row[f"{label}_cache_bytes"] = cache.nbytes()
                    row[f"{label}_speedup_vs_hf"] = round(tps / row["hf_tokens_per_s"], 3)
                    row[f"{label}_decode_kernel_calls"] = af.runtime.counters.get("kvcache_decode_triton", 0)
                    # the first decoded token's logits against HF's (same prompt, same weights): exact for
                    # dense up to rounding; the compressed caches' distance is what they change
                    row[f"{label}_first_step_logits_max_diff_vs_hf"] = (first - hf_first).abs().max().item()
                    if label.startswith("kivi"):
                        row[f"{label}_quantized_bytes"] = sum(layer.site.quant.held_bytes() for layer in cache.layers)
                    del cache
                except Exception as e:
                    res.error({"shape": shape, "context": n, "cache": label}, e)
                dev.empty_cache()
            if args.continuation:
                impl = "auto" if dev.cuda else "triton"
                makers = (("hf", False, lambda: transformers.DynamicCache(config=model.config)),
                          ("dense", True, lambda: plan_cache_from_forms({i: (Dense(),) * g for i in range(layers)},
                                                                        n + 2, impl=impl)),
                          ("kv50", True, lambda: plan_cache_from_forms(
                              {i: (SinkWindow(64, n // 2 - 64),) * g for i in range(layers)}, n + 2, impl=impl)))
                want = None
                for label, ours, make in makers:
                    try:
                        tps, last = continuation(model, make, ids, args.continuation, ours, dev)
                        row[f"{label}_continue_tokens_per_s"] = tps
                        if want is None:
                            want = last
                        else:
                            row[f"{label}_continue_speedup_vs_hf"] = round(tps / row["hf_continue_tokens_per_s"], 3)
                            row[f"{label}_continue_logits_max_diff_vs_hf"] = (last - want).abs().max().item()
                    except Exception as e:
                        res.error({"shape": shape, "context": n, "continuation": label}, e)
                        if label == "hf":          # no reference: the others are not compared with each other
                            break
                    dev.empty_cache()
            print(json.dumps(row), flush=True)
            res.add(row)
        del model
        dev.empty_cache()


if __name__ == "__main__":
    main()
