"""Dense causal attention forward, side by side in one run: SDPA, FlexAttention, attnforge's kernel.

    python benchmarks/dense.py [--json out.json]          # needs a CUDA GPU

Shapes are those of ../shared/BASELINE.md plus SmolLM2's (9/3 heads, d=64). Times come from
triton.testing.do_bench (CUDA events, warm-up, median); every implementation is checked against SDPA
before it is timed. Prints ms, effective TFLOP/s (causal work only) and the ratio to SDPA.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (query heads, kv heads, N, head dim)
    (32, 32, 4096, 128), (32, 32, 16384, 128), (32, 8, 32768, 128), (9, 3, 8192, 64),
    (9, 3, 4096, 64), (9, 3, 16384, 64), (9, 3, 32768, 64),
]


def causal_flops(h, n, d):
    return 4 * h * d * n * (n + 1) / 2          # two matmuls over the causal half


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dense.py needs a CUDA GPU; no speed is measured on the CPU")
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnforge import codegen, runtime

    dtype = getattr(torch, args.dtype)
    key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>24} {'SDPA ms':>9} {'Flex ms':>9} {'ours ms':>9} {'ours TF/s':>10} {'ours/SDPA':>10}")
    for h, hk, n, d in SHAPES:
        q = torch.randn(1, h, n, d, device="cuda", dtype=dtype)
        k = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
        v = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
        mask = create_block_mask(lambda b, h_, qi, ki: qi >= ki, 1, 1, n, n, device="cuda")
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "flex": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
            "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, d ** -0.5, "triton", key),
        }
        ref = fns["sdpa"]()
        times = {}
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
            times[name] = triton.testing.do_bench(fn, warmup=50, rep=200)
        tflops = causal_flops(h, n, d) / times["attnforge"] / 1e9
        row = {"heads": h, "kv_heads": hk, "n": n, "d": d, **{f"{k_}_ms": t for k_, t in times.items()},
               "attnforge_tflops": tflops, "attnforge_vs_sdpa": times["sdpa"] / times["attnforge"],
               "flex_vs_sdpa": times["sdpa"] / times["flex"]}
        rows.append(row)
        print(f"{f'{h}/{hk} N={n} d={d}':>24} {times['sdpa']:9.3f} {times['flex']:9.3f} "
              f"{times['attnforge']:9.3f} {tflops:10.0f} {row['attnforge_vs_sdpa']:9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
