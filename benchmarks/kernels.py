"""Per-head plan kernel against SDPA and FlexAttention, side by side in one run (needs a CUDA GPU).

    python benchmarks/kernels.py [--json kernels.json] [--dtype bfloat16] [--shapes 32x8x32768x128 ...] [--backward]

For the shapes of ../shared/BASELINE.md plus SmolLM2's (9/3 heads, d=64) at 4k-32k, three plans:
    dense       every KV group Dense (attnforge's dense kernel), SDPA causal, Flex causal
    window      every group SinkWindow(64, 1024); Flex with the same mask_mod
    mixed       even KV groups Dense, odd ones SinkWindow(64, 256 * (1 + g % 16)) (BASELINE's MoA-like plan;
                per KV group here, since attnforge forms are per group); Flex with the same per-head mask
Prints ms, effective TFLOP/s (kept pairs only), speed-up over SDPA causal, the ideal speed-up
(causal pairs / kept pairs) and the fraction of it reached, and the ratio to Flex. Also per plan: the
host time to build attnforge's block metadata at the tile that ran (plan-to-first-launch overhead) as a
fraction of the attention time, the launch config the autotuner chose, and first-call times at new
lengths (what a new length costs: Triton specializes on divisibility, not on the length; launch configs
are tuned once per length bucket, 1k / 4k / 16k / 64k, and per forms for plans). --backward also times a
training step's attention, forward +
backward, of the three (attnforge: attention_train, whose backward reads the forward's log-sum-exp), with
the gradients checked against the same reference. The dense rows run attnforge's dense kernel (what the backend emits
for a site whose groups are all dense); the others the plan kernel. Every result is checked before timing: against SDPA with the same mask up to 8k, against
FlexAttention beyond (an H x N x N mask would not fit). The JSON is rewritten after every row; a row
that fails is recorded under "errors" and the run goes on.
"""
import time

import torch
import torch.nn.functional as F

from _common import Device, Results, arguments

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


def _name(shape) -> str:
    return "x".join(map(str, shape))


def main():
    ap = arguments(__doc__)
    ap.add_argument("--new-lengths", type=int, nargs="*", default=[4000, 4096, 5003, 6144, 7001],
                    help="lengths whose first call is timed (a new length must not recompile)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (a training step)")
    ap.add_argument("--shapes", nargs="+", default=[_name(s) for s in SHAPES],
                    help="shapes as HxHKVxNxD (query heads, kv heads, length, head dim); default: all of SHAPES")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    dev = Device(args.device)
    dev.require("benchmarks/kernels.py")
    import triton

    from attnforge import codegen, runtime
    from attnforge.runtime import autotune, blockmeta
    from attnforge.runtime.forms import causal_pairs, forms_to_json, kept_pairs

    dtype = getattr(torch, args.dtype)
    key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    dense_key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True)).source)
    flex = dev.flex()
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>22} {'plan':>7} {'SDPA':>8} {'Flex':>8} {'ours':>8} {'TF/s':>5} {'x SDPA':>7} {'ideal':>6} "
          f"{'of ideal':>8} {'x Flex':>7} {'meta %':>7}")
    for h, hk, n, d in shapes:
        group = h // hk
        q = torch.randn(1, h, n, d, device=dev.kind, dtype=dtype)
        k = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        v = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        scale = d ** -0.5
        sdpa_ms = dev.bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), warmup=50, rep=200)
        for plan_name, forms in plans(hk).items():
            try:
                fj = forms_to_json(forms)
                win = windows_of(forms).to(dev.kind)

                def mask_mod(b, hq, qi, ki, win=win):
                    w = win[hq // group]
                    return (qi >= ki) & ((w == 0) | (ki < SINK) | (qi - ki < w))

                t0 = time.perf_counter()
                block_mask = dev.block_mask(mask_mod, 1, h, n, n)
                dev.sync()
                flex_mask_s = time.perf_counter() - t0
                # an all-dense site runs the dense kernel (the backend emits it; the plan kernel is for plans)
                ours_key, ours_forms = (dense_key, "") if plan_name == "dense" else (key, fj)
                def flex_call(q, k, v, block_mask=block_mask):
                    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)

                fns = {
                    "flex": lambda: flex_call(q, k, v),
                    "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton",
                                                                       ours_key, ours_forms),
                }
                ref = None
                def dense_mask_of(mask_mod=mask_mod, h=h, n=n):     # [H, N, N]: the plan's mask, for SDPA
                    return mask_mod(0, torch.arange(h, device=dev.kind)[:, None, None],
                                    torch.arange(n, device=dev.kind)[None, :, None],
                                    torch.arange(n, device=dev.kind)[None, None, :])

                if n <= 8192:           # the SDPA check materializes an H x N x N mask: only where it fits
                    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask_of()[None], scale=scale,
                                                         enable_gqa=True)
                if ref is None:         # longer: FlexAttention with the same mask_mod is the reference
                    ref = fns["flex"]()
                tuned = autotune.chosen()
                times = {}
                for name, fn in fns.items():
                    torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
                    times[name] = dev.bench(fn, warmup=50, rep=200)
                # the launch config the first call chose (autotuned per length bucket, and per forms for plans)
                config = [c for key_, c in autotune.chosen().items() if key_ not in tuned]
                config = list(config[0]) if config else None
                # plan-to-first-launch overhead: the block metadata at the tile that ran, built from nothing (the
                # dense rows build none; theirs is the plan kernel's default tile, for comparison)
                tile = tuple(config[:2]) if config and plan_name != "dense" else \
                    tuple(runtime.kernels.load_kernel(key, q.device).module.default_config(d, False)[:2])
                blockmeta._cached.cache_clear()
                t0 = time.perf_counter()
                blockmeta.block_meta(fj, group, n, n, *tile, q.device)
                dev.sync()
                meta_s = time.perf_counter() - t0
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
                row["kernel"] = "dense" if plan_name == "dense" else "plan"
                row["config"] = config     # (BLOCK_M, BLOCK_N, warps, stages, TMA); None: tuning off, or tuned by an earlier row
                if args.backward:
                    row.update(_train_step(dev, q, k, v, flex_call, dense_mask_of, scale=scale, key=ours_key,
                                           forms=ours_forms))
                res.add(row)
                print(f"{f'{h}/{hk} N={n} d={d}':>22} {plan_name:>7} {sdpa_ms:8.3f} {times['flex']:8.3f} {ours:8.3f} "
                      f"{row['attnforge_tflops']:5.0f} {row['speedup_vs_sdpa']:6.2f}x {ideal:5.2f}x "
                      f"{row['fraction_of_ideal']:7.0%} {row['vs_flex']:6.2f}x {row['metadata_fraction']:6.1%}", flush=True)
                if args.backward:
                    flex_ms, vs_flex = row["flex_train_ms"], row["train_vs_flex"]
                    print(f"{'':>22} {'fwd+bwd':>7} {row['sdpa_causal_train_ms']:8.3f} "
                          f"{'-' if flex_ms is None else f'{flex_ms:.3f}':>8} {row['attnforge_train_ms']:8.3f} {'':>5} "
                          f"{row['train_speedup_vs_sdpa']:6.2f}x {'':>6} {'':>8} "
                          f"{'-' if vs_flex is None else f'{vs_flex:.2f}x':>7}", flush=True)
            except Exception as e:        # record it, keep the other rows
                res.error({"heads": h, "kv_heads": hk, "n": n, "d": d, "plan": plan_name}, e)
            dev.empty_cache()
    # a new length: the first call's time (metadata + any Triton specialization) against later calls
    lengths = []
    h, hk, d = 9, 3, 64
    forms = plans(hk)["mixed"]
    for n in args.new_lengths:
        q = torch.randn(1, h, n, d, device=dev.kind, dtype=dtype)
        k, v = (torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype) for _ in range(2))
        call = lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, d ** -0.5, "triton", key,  # noqa: E731
                                                     forms_to_json(forms))
        dev.sync()
        t0 = time.perf_counter()
        call()
        dev.sync()
        first = (time.perf_counter() - t0) * 1e3
        lengths.append({"n": n, "first_call_ms": first, "steady_ms": dev.bench(call)})
    res["new_lengths"] = lengths
    print("new lengths (first call ms / steady ms): " +
          ", ".join(f"{r['n']}: {r['first_call_ms']:.1f}/{r['steady_ms']:.3f}" for r in lengths))


def _train_step(dev, q, k, v, flex_call, dense_mask_of, scale, key, forms):
    """Forward + backward times of SDPA (causal), Flex and attnforge on these inputs; the gradients of Flex
    and attnforge checked against SDPA with the same mask up to 8k, attnforge's against Flex's beyond.
    (FlexAttention has no CPU backward: the --device cpu smoke run leaves it out.)"""
    n = q.shape[2]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def step(forward):
        return lambda: torch.autograd.grad(forward(), (q, k, v), grad)

    sdpa = step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    flex = step(lambda: flex_call(q, k, v)) if dev.kind == "cuda" else None
    ours = step(lambda: torch.ops.attnforge.attention_train(q, k, v, None, True, 0, scale, "triton", key, forms)[0])
    if n <= 8192:
        ref = step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask_of()[None], scale=scale,
                                                          enable_gqa=True))()
        checked = (ours(), flex()) if flex else (ours(),)
    else:
        ref, checked = flex(), (ours(),)
    for got in checked:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
    times = {name: dev.bench(fn, warmup=10, rep=50) if fn else None
             for name, fn in (("sdpa", sdpa), ("flex", flex), ("ours", ours))}
    return {"sdpa_causal_train_ms": times["sdpa"], "flex_train_ms": times["flex"], "attnforge_train_ms": times["ours"],
            "train_speedup_vs_sdpa": times["sdpa"] / times["ours"],
            "train_vs_flex": times["flex"] / times["ours"] if times["flex"] else None}


if __name__ == "__main__":
    main()
