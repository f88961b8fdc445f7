"""Decode speed and memory of attnforge's per-head KV cache against Hugging Face's default cache + SDPA.

    python benchmarks/decode.py --json decode.json          # on a CUDA GPU (random weights, bf16)

For a SmolLM2-shaped and a Llama-8B-shaped layer stack at 4k-32k tokens of context: prefill once, then
time `--steps` greedy decoding steps (one token each, the model's full forward per step) with
    hf          transformers DynamicCache, attn_implementation="sdpa"
    dense       attnforge PlanCache, every group full (the split-KV Triton decode kernel)
    kv50        attnforge PlanCache, every group sink 64 + window: 50% of the KV entries at that context
    kivi4/2     attnforge PlanCache, every group KVQuant (KIVI codes, 4 / 2 bits, group 32, residual 128),
                read by the quantized decode kernel (dequantization in registers)
and report tokens/s, speed-up over hf, the bytes each cache holds and the peak allocated memory.
Also each decode kernel alone for one layer (CUDA events): bytes it reads per call over its time, as a
fraction of the device's HBM bandwidth (datasheet: H100 SXM 3.35 TB/s, H200 4.8 TB/s).
"""
import argparse
import json
import time

import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, head_dim=64),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, head_dim=128),
}
HBM = {"H100": 3.35e12, "H200": 4.8e12}


def build(shape, max_pos):
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=max_pos, use_cache=True)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, b in model.named_buffers():          # rotary inverse frequencies: recompute, not random
            if name.endswith("inv_freq"):
                d = cfg.head_dim
                b.copy_(1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device="cuda").float() / d)))
    return model


def run(model, cache, ids, steps, attnforge):
    import attnforge as af

    ctx = af.plan_attention(model) if attnforge else torch.no_grad()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with ctx, torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        model(tok, past_key_values=cache)                      # warm-up step (kernel compile, autotune)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return steps / seconds, torch.cuda.max_memory_allocated()


def hf_cache_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _time_calls(call, reps=50):
    """(milliseconds per call by CUDA events after one warm-up call, the splits the last call used)."""
    call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        _, splits = call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, splits


def kernel_bandwidth(shape, context, device_name):
    """The decode kernel alone on one layer's dense cache at `context` tokens: GB/s and fraction of HBM."""
    from attnforge.compiler.decode import _decode_kernel
    from attnforge.runtime.forms import Dense
    from attnforge.runtime.kvcache import SiteKVCache

    s = SHAPES[shape]
    g, h, d = s["num_key_value_heads"], s["num_attention_heads"], s["head_dim"]
    cache = SiteKVCache((Dense(),) * g, max_length=context)
    k = torch.randn(1, g, context, d, device="cuda", dtype=torch.bfloat16)
    cache.append(k, k.clone())
    q = torch.randn(1, h, d, device="cuda", dtype=torch.bfloat16)
    loaded = _decode_kernel(q.device)
    ms, splits = _time_calls(lambda: cache.decode(q, d ** -0.5, loaded))
    nbytes = 2 * g * context * d * 2 + g * context            # K and V (bf16) + keep flags
    peak = next((v for k_, v in HBM.items() if k_ in device_name), None)
    return {"context": context, "ms_per_layer_call": round(ms, 4), "splits": splits, "GBps": round(nbytes / ms / 1e6, 1),
            "fraction_of_hbm": round(nbytes / ms / 1e-3 / peak, 3) if peak else None}


def quant_kernel_bandwidth(shape, context, device_name, bits=4):
    """The quantized decode kernel alone on one layer (every group KVQuant(bits)): bytes it reads (codes,
    float16 scales and minima, the residual) over its time."""
    from attnforge.compiler.decode import _decode_quant_kernel
    from attnforge.runtime.kvquant import QuantKV

    s = SHAPES[shape]
    g, h, d = s["num_key_value_heads"], s["num_attention_heads"], s["head_dim"]
    store = QuantKV([(i, bits) for i in range(g)], 32, 128, context)
    k = torch.randn(1, g, context, d, device="cuda", dtype=torch.bfloat16)
    store.append(k, k.clone())
    q = torch.randn(1, h, d, device="cuda", dtype=torch.bfloat16)
    loaded = _decode_quant_kernel(q.device)
    ms, splits = _time_calls(lambda: store.decode(q, d ** -0.5, loaded))
    nbytes = store.held_bytes()
    peak = next((v for k_, v in HBM.items() if k_ in device_name), None)
    return {"context": context, "bits": bits, "ms_per_layer_call": round(ms, 4), "splits": splits,
            "GBps": round(nbytes / ms / 1e6, 1), "fraction_of_hbm": round(nbytes / ms / 1e-3 / peak, 3) if peak else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py measures GPU decoding; no CUDA device here")
    import transformers

    import attnforge as af
    from attnforge.compiler.decode import plan_cache_from_forms
    from attnforge.runtime.forms import Dense, KVQuant, SinkWindow

    name = torch.cuda.get_device_name()
    out = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "attnforge": af.__version__, "steps": args.steps, "rows": [], "kernel": []}
    for shape in args.shapes:
        layers, g = SHAPES[shape]["num_hidden_layers"], SHAPES[shape]["num_key_value_heads"]
        model = build(shape, max(args.contexts) + args.steps + 8)
        for n in args.contexts:
            ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, n), device="cuda")
            row = {"shape": shape, "context": n}
            hf = transformers.DynamicCache(config=model.config)
            row["hf_tokens_per_s"], row["hf_peak_bytes"] = run(model, hf, ids, args.steps, False)
            row["hf_cache_bytes"] = hf_cache_bytes(hf)
            del hf
            for label, form in (("dense", Dense()), ("kv50", SinkWindow(64, n // 2 - 64)), ("kivi4", KVQuant(4)),
                                ("kivi2", KVQuant(2))):
                cache = plan_cache_from_forms({i: (form,) * g for i in range(layers)}, n + args.steps + 2)
                af.runtime.reset_counters()
                tps, peak = run(model, cache, ids, args.steps, True)
                row[f"{label}_tokens_per_s"], row[f"{label}_peak_bytes"] = tps, peak
                row[f"{label}_cache_bytes"] = cache.nbytes()
                row[f"{label}_speedup_vs_hf"] = round(tps / row["hf_tokens_per_s"], 3)
                row[f"{label}_decode_kernel_calls"] = af.runtime.counters.get("kvcache_decode_triton", 0)
                if label.startswith("kivi"):
                    row[f"{label}_quantized_bytes"] = sum(layer.site.quant.held_bytes() for layer in cache.layers)
                del cache
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
        out["kernel"].append({"shape": shape, **kernel_bandwidth(shape, max(args.contexts), name)})
        print(json.dumps(out["kernel"][-1]), flush=True)
        for bits in (4, 2):
            out["kernel"].append({"shape": shape, "kernel": "quant",
                                  **quant_kernel_bandwidth(shape, max(args.contexts), name, bits)})
            print(json.dumps(out["kernel"][-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
