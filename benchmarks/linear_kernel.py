"""Linear-hybrid kernel against dense causal attention, side by side in one run: SDPA, FlexAttention
(sink + window mask of the hybrid's exact part, for scale), attnforge's hybrid (taylor2, hedgehog).

    python benchmarks/linear_kernel.py [--json out.json] [--lengths 8192 32768]      # needs a CUDA GPU

One KV group of SmolLM2's shape (3 query heads over 1 KV head, d = 64) and a Llama-shaped group
(4 query heads, d = 128), at 4k-32k tokens; a hybrid with sink 64 and window 64 replaces the head's
dense attention. Times from triton.testing.do_bench (CUDA events, median); the hybrid is checked
against its float32 reference on a short prefix before it is timed. Prints ms and the speed-up over
SDPA dense causal for the same head: the issue's criterion is hedgehog faster than SDPA at 32k.
--backward adds a training row per shape and length: forward + backward through the attnforge op (the
linear kernel forward, the chunked PyTorch backward, runtime.linear.linear_group_chunked) against SDPA's
forward + backward, gradients checked against the float32 reference's on the prefix first.
The JSON is rewritten after every row; a failed row is recorded under "errors".
"""
import math

import torch
import torch.nn.functional as F

from _common import Device, Results, arguments

SHAPES = [(3, 1, 64), (4, 1, 128)]                # (query heads of the group, kv heads, head dim)
LENGTHS = (4096, 8192, 16384, 32768)


def main():
    ap = arguments(__doc__)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                    help="KV groups as GxHKVxD (query heads of the group, kv heads, head dim); default: all of SHAPES")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (training)")
    args = ap.parse_args()
    dev = Device(args.device)
    dev.require("benchmarks/linear_kernel.py")
    import triton

    import attnforge  # noqa: F401  (registers the linear kernel source)
    from attnforge.runtime import ops
    from attnforge.runtime.forms import Linear, forms_to_json
    from attnforge.runtime.linear import FeatureMaps, linear_reference, linear_triton, register_maps

    dtype = getattr(torch, args.dtype)
    flex = dev.flex()
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>22} {'SDPA ms':>9} {'Flex win ms':>12} {'taylor2 ms':>11} {'hedgehog ms':>12} "
          f"{'hh speed-up':>12}")
    for g, hk, d in (tuple(int(x) for x in s.split("x")) for s in args.shapes):
        gen = torch.Generator().manual_seed(d)
        maps = FeatureMaps(torch.eye(d) + 0.05 * torch.randn(d, d, generator=gen), torch.eye(d), 1.0)
        forms = {"taylor2": Linear("taylor2", args.window, args.sink),
                 "hedgehog": Linear("hedgehog", args.window, args.sink, register_maps(maps)[0])}
        for n in args.lengths:
            try:
                q = torch.randn(1, g, n, d, device=dev.kind, dtype=dtype)
                k = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
                v = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
                scale = 1 / math.sqrt(d)
                for name, form in forms.items():           # correctness on a prefix, against the fp32 reference
                    m = min(n, 1024)
                    ref = linear_reference(q[:, :, :m].float(), k[:, :, :m].float(), v[:, :, :m].float(), (form,), scale)
                    got = linear_triton(q[:, :, :m].contiguous(), k[:, :, :m].contiguous(), v[:, :, :m].contiguous(),
                                        (form,), scale)
                    torch.testing.assert_close(got.float(), ref, rtol=3e-2, atol=3e-2)
                sink, win = args.sink, args.window
                mask = dev.block_mask(lambda b, h_, qi, ki: (ki <= qi) & ((ki < sink) | (qi - ki < win)), 1, 1, n, n)
                fns = {
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                    "flex_window": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
                    "taylor2": lambda: linear_triton(q, k, v, (forms["taylor2"],), scale),
                    "hedgehog": lambda: linear_triton(q, k, v, (forms["hedgehog"],), scale),
                }
                times = {name: dev.bench(fn, warmup=25, rep=100) for name, fn in fns.items()}
                row = {"query_heads": g, "kv_heads": hk, "d": d, "n": n, "window": win, "sink": sink,
                       **{f"{k_}_ms": t for k_, t in times.items()},
                       "hedgehog_speedup_vs_sdpa": times["sdpa"] / times["hedgehog"],
                       "taylor2_speedup_vs_sdpa": times["sdpa"] / times["taylor2"]}
                print(f"{f'{g}/{hk} d{d} N{n}':>22} {times['sdpa']:9.3f} {times['flex_window']:12.3f} "
                      f"{times['taylor2']:11.3f} {times['hedgehog']:12.3f} {row['hedgehog_speedup_vs_sdpa']:12.2f}", flush=True)
                if args.backward:
                    row.update(_training(dev, q, k, v, forms, scale, ops, forms_to_json, linear_reference))
                    print(f"{'  fwd+bwd':>22} {row['sdpa_train_ms']:9.3f} {'':>12} {row['taylor2_train_ms']:11.3f} "
                          f"{row['hedgehog_train_ms']:12.3f} {row['hedgehog_train_speedup_vs_sdpa']:12.2f}", flush=True)
                res.add(row)
            except Exception as e:        # record it, keep the other rows
                res.error({"query_heads": g, "kv_heads": hk, "d": d, "n": n}, e)
            dev.empty_cache()


def _training(dev, q, k, v, forms, scale, ops, forms_to_json, linear_reference):
    """ms of forward + backward: SDPA dense causal, and each hybrid through the attnforge op."""
    grad = torch.randn_like(q)

    def op(form):
        return lambda a, b, c: torch.ops.attnforge.attention_train(a, b, c, None, True, 0, scale, "triton", "",
                                                                    forms_to_json((form,)))[0]

    fns = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True),
           **{name: op(form) for name, form in forms.items()}}
    m = min(q.shape[2], 512)
    for name, form in forms.items():               # gradients on a prefix, against the fp32 reference's
        pre = [t[:, :, :m].detach().float().contiguous().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(linear_reference(*pre, (form,), scale), pre, grad[:, :, :m].float())
        pre2 = [t[:, :, :m].detach().contiguous().requires_grad_() for t in (q, k, v)]
        got = torch.autograd.grad(fns[name](*pre2), pre2, grad[:, :, :m])
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    before = ops.counters["linear_backward"]

    def step(fn):
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)

    times = {f"{name}_train_ms": dev.bench(step(fn), warmup=5, rep=20) for name, fn in fns.items()}
    assert ops.counters["linear_backward"] > before, "the hybrid's backward did not run through attnforge's op"
    return {**times, "hedgehog_train_speedup_vs_sdpa": times["sdpa_train_ms"] / times["hedgehog_train_ms"],
            "taylor2_train_speedup_vs_sdpa": times["sdpa_train_ms"] / times["taylor2_train_ms"]}


if __name__ == "__main__":
    main()
