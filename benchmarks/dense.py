"""Dense causal attention forward, side by side in one run: SDPA, FlexAttention, attnforge's kernel.

    python benchmarks/dense.py [--json out.json] [--shapes 32x8x32768x128 ...]        # needs a CUDA GPU

Shapes are those of ../shared/BASELINE.md plus SmolLM2's (9/3 heads, d=64). Times come from
triton.testing.do_bench (CUDA events, warm-up, median); every implementation is checked against SDPA
before it is timed. Prints ms, effective TFLOP/s (causal work only) and the ratio to SDPA. The JSON is
rewritten after every row; a failed row is recorded under "errors". (benchmarks/kernels.py times the same
dense kernel in its dense rows, next to the plan kernel.)
"""

import torch
import torch.nn.functional as F

from _common import Device, Results, arguments

SHAPES = [  # (query heads, kv heads, N, head dim)
    (32, 32, 4096, 128), (32, 32, 16384, 128), (32, 8, 32768, 128), (9, 3, 8192, 64),
    (9, 3, 4096, 64), (9, 3, 16384, 64), (9, 3, 32768, 64),
]


def causal_flops(h, n, d):
    return 4 * h * d * n * (n + 1) / 2          # two matmuls over the causal half


def main():
    ap = arguments(__doc__)
    ap.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                    help="shapes as HxHKVxNxD (query heads, kv heads, length, head dim); default: all of SHAPES")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    dev = Device(args.device)
    dev.require("benchmarks/dense.py")
    import triton

    from attnforge import codegen, runtime

    dtype = getattr(torch, args.dtype)
    key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    flex = dev.flex()
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>24} {'SDPA ms':>9} {'Flex ms':>9} {'ours ms':>9} {'ours TF/s':>10} {'ours/SDPA':>10}")
    for h, hk, n, d in shapes:
        try:
            q = torch.randn(1, h, n, d, device=dev.kind, dtype=dtype)
            k = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
            v = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
            mask = dev.block_mask(lambda b, h_, qi, ki: qi >= ki, 1, 1, n, n)
            fns = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                "flex": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
                "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, d ** -0.5, "triton", key),
            }
            ref = fns["sdpa"]()
            times = {}
            for name, fn in fns.items():
                torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
                times[name] = dev.bench(fn, warmup=50, rep=200)
            tflops = causal_flops(h, n, d) / times["attnforge"] / 1e9
            row = {"heads": h, "kv_heads": hk, "n": n, "d": d, **{f"{k_}_ms": t for k_, t in times.items()},
                   "attnforge_tflops": tflops, "attnforge_vs_sdpa": times["sdpa"] / times["attnforge"],
                   "flex_vs_sdpa": times["sdpa"] / times["flex"]}
            res.add(row)
            print(f"{f'{h}/{hk} N={n} d={d}':>24} {times['sdpa']:9.3f} {times['flex']:9.3f} "
                  f"{times['attnforge']:9.3f} {tflops:10.0f} {row['attnforge_vs_sdpa']:9.2f}x", flush=True)
        except Exception as e:            # record it, keep the other rows
            res.error({"heads": h, "kv_heads": hk, "n": n, "d": d}, e)
        dev.empty_cache()


if __name__ == "__main__":
    main()
