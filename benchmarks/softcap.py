"""Soft-capped attention (Gemma 2) against FlexAttention's score_mod and the eager formula, side by side in
one run (needs a CUDA GPU).

    python benchmarks/softcap.py [--json softcap.json] [--dtype bfloat16] [--shapes 16x8x8192x256 ...]
                                 [--cap 50] [--window 4096]

Per shape, the two layers Gemma 2 alternates: "global" (causal) and "local" (causal, sliding window of
--window keys), scores soft-capped: cap * tanh(q k^T * scale / cap), before the mask. Timed in one run:
  attnforge   the generated dense kernel (the window kernel for the local layer) with the cap, as the backend
              runs a Gemma 2 site
  flex        FlexAttention compiled, the cap as its score_mod and the same mask as a block mask
  eager       the formula in PyTorch (matmul, tanh, mask, softmax, matmul): what Gemma 2 runs in Hugging Face
              by default (attn_implementation "eager": SDPA has no soft-cap); only where its N x N scores fit
              (N <= 8192)
  sdpa        SDPA causal WITHOUT a cap: not the same function; the bound a soft-capped kernel is measured
              against (ours / sdpa = what the cap and the window cost or save)
Every result is checked before timing: against the eager formula in float32 up to 8k, against FlexAttention
beyond. Prints ms and ratios; the JSON is rewritten after every row, a failing row recorded under "errors".
Default shapes: Gemma 2 9B (16/8 heads, d=256) and 27B (32/16 heads, d=128) at 8k and 32k.
"""
import torch
import torch.nn.functional as F
from _common import Device, Results, arguments

SHAPES = [(16, 8, 8192, 256), (32, 16, 8192, 128), (16, 8, 32768, 256), (32, 16, 32768, 128)]


def eager(q, k, v, scale, cap, window):
    """Gemma 2's eager attention: the scores materialized, capped, masked, softmaxed (float32)."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    s = cap * torch.tanh(s / cap)
    n = q.shape[2]
    i = torch.arange(n, device=q.device)
    keep = i[None, :] <= i[:, None]
    if window:
        keep = keep & (i[:, None] - i[None, :] < window)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


def main():
    ap = arguments(__doc__)
    ap.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                    help="shapes as HxHKVxNxD (query heads, kv heads, length, head dim)")
    ap.add_argument("--cap", type=float, default=50.0, help="the soft-cap (Gemma 2: 50)")
    ap.add_argument("--window", type=int, default=4096, help="the local layers' sliding window (Gemma 2: 4096)")
    args = ap.parse_args()
    dev = Device(args.device)
    dev.require("benchmarks/softcap.py")
    import triton

    from attnforge import codegen, runtime

    dtype = getattr(torch, args.dtype)
    keys = {w: runtime.kernels.register_source(codegen.render_attention(
        codegen.KernelSpec(causal=True, window=bool(w))).source) for w in (0, args.window)}
    flex = dev.flex()
    cap = args.cap
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                  cap=cap, window=args.window)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}, cap {cap}")
    print(f"{'shape':>24} {'layer':>6} {'SDPA*':>8} {'eager':>8} {'Flex':>8} {'ours':>8} {'x eager':>8} {'x Flex':>7} "
          f"{'/ SDPA*':>7}")
    for shape in args.shapes:
        h, hk, n, d = (int(x) for x in shape.split("x"))
        q = torch.randn(1, h, n, d, device=dev.kind, dtype=dtype)
        k = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        v = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        scale = d ** -0.5
        sdpa_ms = dev.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            warmup=25, rep=100)
        for layer, window in (("global", 0), ("local", args.window)):
            try:
                def mask_mod(b, hq, qi, ki, window=window):
                    keep = qi >= ki
                    return keep & (qi - ki < window) if window else keep

                def score_mod(score, b, hq, qi, ki):
                    return cap * torch.tanh(score / cap)

                block_mask = dev.block_mask(mask_mod, 1, 1, n, n)
                fns = {
                    "flex": lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=True),
                    "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, window, scale, "triton",
                                                                       keys[window], "", None, cap),
                }
                if n <= 8192:
                    fns["eager"] = lambda: eager(q, k, v, scale, cap, window)
                    ref = eager(q.float(), k.float(), v.float(), scale, cap, window).to(dtype)
                else:
                    ref = fns["flex"]()
                before = runtime.counters["triton"] + runtime.counters["triton_interpreter"]
                times = {}
                for name, fn in fns.items():
                    torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
                    times[name] = dev.bench(fn, warmup=25, rep=100)
                assert runtime.counters["triton"] + runtime.counters["triton_interpreter"] > before, \
                    "attnforge's kernel did not run"
                ours = times["attnforge"]
                row = {"heads": h, "kv_heads": hk, "n": n, "d": d, "layer": layer, "window": window, "cap": cap,
                       "sdpa_causal_uncapped_ms": sdpa_ms, "flex_ms": times["flex"], "eager_ms": times.get("eager"),
                       "attnforge_ms": ours, "vs_flex": times["flex"] / ours,
                       "vs_eager": times["eager"] / ours if "eager" in times else None,
                       "vs_sdpa_uncapped": ours / sdpa_ms, "checked_against": "eager" if n <= 8192 else "flex"}
                res.add(row)
                eager_ms = f"{times['eager']:8.3f}" if "eager" in times else f"{'-':>8}"
                vs_eager = f"{row['vs_eager']:7.2f}x" if "eager" in times else f"{'-':>8}"
                print(f"{f'{h}/{hk} N={n} d={d}':>24} {layer:>6} {sdpa_ms:8.3f} {eager_ms} {times['flex']:8.3f} "
                      f"{ours:8.3f} {vs_eager} {row['vs_flex']:6.2f}x {row['vs_sdpa_uncapped']:6.2f}", flush=True)
            except Exception as e:        # record it, keep the other rows
                res.error({"heads": h, "kv_heads": hk, "n": n, "d": d, "layer": layer}, e)
            dev.empty_cache()
    print("SDPA* computes attention without the cap: the bound, not the same function")


if __name__ == "__main__":
    main()
