"""Linear-hybrid kernel against dense causal attention, side by side in one run: SDPA, FlexAttention
(sink + window mask of the hybrid's exact part, for scale), attnforge's hybrid (taylor2, hedgehog).

    python benchmarks/linear_kernel.py [--json out.json]          # needs a CUDA GPU

One KV group of SmolLM2's shape (3 query heads over 1 KV head, d = 64) and a Llama-shaped group
(4 query heads, d = 128), at 4k-32k tokens; a hybrid with sink 64 and window 64 replaces the head's
dense attention. Times from triton.testing.do_bench (CUDA events, median); the hybrid is checked
against its float32 reference on a short prefix before it is timed. Prints ms and the speed-up over
SDPA dense causal for the same head: the issue's criterion is hedgehog faster than SDPA at 32k.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

SHAPES = [(3, 1, 64), (4, 1, 128)]                # (query heads of the group, kv heads, head dim)
LENGTHS = (4096, 8192, 16384, 32768)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sink", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/linear_kernel.py needs a CUDA GPU; no speed is measured on the CPU")
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attnforge  # noqa: F401  (registers the linear kernel source)
    from attnforge.runtime.forms import Linear
    from attnforge.runtime.linear import FeatureMaps, linear_reference, linear_triton, register_maps

    dtype = getattr(torch, args.dtype)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>22} {'SDPA ms':>9} {'Flex win ms':>12} {'taylor2 ms':>11} {'hedgehog ms':>12} "
          f"{'hh speed-up':>12}")
    for g, hk, d in SHAPES:
        gen = torch.Generator().manual_seed(d)
        maps = FeatureMaps(torch.eye(d) + 0.05 * torch.randn(d, d, generator=gen), torch.eye(d), 1.0)
        forms = {"taylor2": Linear("taylor2", args.window, args.sink),
                 "hedgehog": Linear("hedgehog", args.window, args.sink, register_maps(maps)[0])}
        for n in LENGTHS:
            q = torch.randn(1, g, n, d, device="cuda", dtype=dtype)
            k = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
            v = torch.randn(1, hk, n, d, device="cuda", dtype=dtype)
            scale = 1 / math.sqrt(d)
            for name, form in forms.items():           # correctness on a prefix, against the fp32 reference
                m = min(n, 1024)
                ref = linear_reference(q[:, :, :m].float(), k[:, :, :m].float(), v[:, :, :m].float(), (form,), scale)
                got = linear_triton(q[:, :, :m].contiguous(), k[:, :, :m].contiguous(), v[:, :, :m].contiguous(),
                                    (form,), scale)
                torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)
            sink, win = args.sink, args.window
            mask = create_block_mask(lambda b, h_, qi, ki: (ki <= qi) & ((ki < sink) | (qi - ki < win)), 1, 1, n, n,
                                     device="cuda")
            fns = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                "flex_window": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
                "taylor2": lambda: linear_triton(q, k, v, (forms["taylor2"],), scale),
                "hedgehog": lambda: linear_triton(q, k, v, (forms["hedgehog"],), scale),
            }
            times = {name: triton.testing.do_bench(fn, warmup=25, rep=100) for name, fn in fns.items()}
            row = {"query_heads": g, "kv_heads": hk, "d": d, "n": n, "window": win, "sink": sink,
                   **{f"{k_}_ms": t for k_, t in times.items()},
                   "hedgehog_speedup_vs_sdpa": times["sdpa"] / times["hedgehog"],
                   "taylor2_speedup_vs_sdpa": times["sdpa"] / times["taylor2"]}
            rows.append(row)
            print(f"{f'{g}/{hk} d{d} N{n}':>22} {times['sdpa']:9.3f} {times['flex_window']:12.3f} "
                  f"{times['taylor2']:11.3f} {times['hedgehog']:12.3f} {row['hedgehog_speedup_vs_sdpa']:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
