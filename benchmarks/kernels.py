"""Per-head plan kernel against SDPA and FlexAttention, side by side in one run (needs a CUDA GPU).

    python benchmarks/kernels.py [--json kernels.json] [--dtype bfloat16]

For the shapes of ../shared/BASELINE.md plus SmolLM2's (9/3 heads, d=64) at 4k-32k, three plans:
    dense       every KV group Dense (attnforge's plan kernel), SDPA causal, Flex causal
    window      every group SinkWindow(64, 1024); Flex with the same mask_mod
    mixed       even KV groups Dense, odd ones SinkWindow(64, 256 * (1 + g % 16)) (BASELINE's MoA-like plan;
                per KV group here, since attnforge forms are per group); Flex with the same per-head mask
Prints ms, effective TFLOP/s (kept pairs only), speed-up over SDPA causal, the ideal speed-up
(causal pairs / kept pairs) and the fraction of it reached, and the ratio to Flex. Also per plan: the
host time to build attnforge's block metadata (plan-to-first-launch overhead) as a fraction of the
attention time, and first-call times at new lengths (what a new length costs: Triton specializes on
divisibility, not on the length). Every result is checked before timing: against SDPA with the same
mask up to 8k, against FlexAttention beyond (an H x N x N mask would not fit).
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (query heads, kv heads, N, head dim)
    (32, 32, 4096, 128), (32, 32, 16384, 128), (32, 8, 32768, 128), (9, 3, 8192, 64),
    (9, 3, 4096, 64), (9, 3, 16384, 64), (9, 3, 32768, 64),
]
SINK = 64


def plans(hk):
    from attnforge.runtime.forms import Dense, SinkWindow

    return {
        "dense": (Dense(),) * hk,
        "window": (SinkWindow(SINK, 1024),) * hk,
        "mixed": tuple(Dense() if g % 2 == 0 else SinkWindow(SINK, 256 * (1 + g % 16)) for g in range(hk)),
    }


def windows_of(forms):
    """Per KV group window (0 = dense) as a tensor, for Flex's mask_mod and the checking mask."""
    return torch.tensor([f.window_at(0) or 0 for f in forms], dtype=torch.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="run the first K shapes only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU; no speed is measured on the CPU")
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnforge import codegen, runtime
    from attnforge.runtime import blockmeta
    from attnforge.runtime.forms import causal_pairs, forms_to_json, kept_pairs

    dtype = getattr(torch, args.dtype)
    key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>22} {'plan':>7} {'SDPA':>8} {'Flex':>8} {'ours':>8} {'TF/s':>5} {'x SDPA':>7} {'ideal':>6} "
          f"{'of ideal':>8} {'x Flex':>7} {'meta %':>7}")
    for h, hk, n, d in SHAPES[:args.shapes]:
        group = h // hk
        q = torch.randn(1, h, n, d, device="cuda", dtype=dtype)
        k = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
        scale = d ** -0.5
        sdpa_ms = triton.testing.do_bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), warmup=50, rep=200)
        for plan_name, forms in plans(hk).items():
            fj = forms_to_json(forms)
            win = windows_of(forms).cuda()

            def mask_mod(b, hq, qi, ki, win=win):
                w = win[hq // group]
                return (qi >= ki) & ((w == 0) | (ki < SINK) | (qi - ki < w))

            t0 = time.perf_counter()
            block_mask = create_block_mask(mask_mod, 1, h, n, n, device="cuda", _compile=True)
            torch.cuda.synchronize()
            flex_mask_s = time.perf_counter() - t0
            blockmeta._cached.cache_clear()
            t0 = time.perf_counter()
            blockmeta.block_meta(fj, group, n, n, 64, 64, q.device)
            torch.cuda.synchronize()
            meta_s = time.perf_counter() - t0
            fns = {
                "flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton", key, fj),
            }
            ref = None
            if n <= 8192:           # the SDPA check materializes an H x N x N mask: only where it fits
                dense_mask = mask_mod(0, torch.arange(h, device="cuda")[:, None, None],
                                      torch.arange(n, device="cuda")[None, :, None],
                                      torch.arange(n, device="cuda")[None, None, :])
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[None], scale=scale,
                                                     enable_gqa=True)
                del dense_mask
            if ref is None:         # longer: FlexAttention with the same mask_mod is the reference
                ref = fns["flex"]()
            times = {}
            for name, fn in fns.items():
                torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
                times[name] = triton.testing.do_bench(fn, warmup=50, rep=200)
            kept = sum(kept_pairs(f, n) for f in forms) / (hk * causal_pairs(n))
            ideal = 1 / kept
            ours = times["attnforge"]
            row = {"heads": h, "kv_heads": hk, "n": n, "d": d, "plan": plan_name, "sdpa_causal_ms": sdpa_ms,
                   "flex_ms": times["flex"], "attnforge_ms": ours, "kept_fraction": kept,
                   "attnforge_tflops": 4 * h * d * causal_pairs(n) * kept / ours / 1e9,
                   "speedup_vs_sdpa": sdpa_ms / ours, "ideal_speedup": ideal,
                   "fraction_of_ideal": sdpa_ms / ours / ideal, "vs_flex": times["flex"] / ours,
                   "metadata_ms": meta_s * 1e3, "metadata_fraction": meta_s * 1e3 / ours,
                   "flex_block_mask_ms": flex_mask_s * 1e3, "checked_against": "sdpa" if n <= 8192 else "flex"}
            rows.append(row)
            print(f"{f'{h}/{hk} N={n} d={d}':>22} {plan_name:>7} {sdpa_ms:8.3f} {times['flex']:8.3f} {ours:8.3f} "
                  f"{row['attnforge_tflops']:5.0f} {row['speedup_vs_sdpa']:6.2f}x {ideal:5.2f}x "
                  f"{row['fraction_of_ideal']:7.0%} {row['vs_flex']:6.2f}x {row['metadata_fraction']:6.1%}")
    # a new length: the first call's time (metadata + any Triton specialization) against later calls
    lengths = []
    h, hk, d = 9, 3, 64
    forms = plans(hk)["mixed"]
    for n in (4000, 4096, 5003, 6144, 7001):
        q = torch.randn(1, h, n, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, hk, n, d, device="cuda", dtype=dtype) for _ in range(2))
        call = lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, d ** -0.5, "triton", key,  # noqa: E731
                                                     forms_to_json(forms))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1e3
        lengths.append({"n": n, "first_call_ms": first, "steady_ms": triton.testing.do_bench(call)})
    print("new lengths (first call ms / steady ms): " +
          ", ".join(f"{r['n']}: {r['first_call_ms']:.1f}/{r['steady_ms']:.3f}" for r in lengths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "dtype": args.dtype, "rows": rows, "new_lengths": lengths},
                      f, indent=2)


if __name__ == "__main__":
    main()
