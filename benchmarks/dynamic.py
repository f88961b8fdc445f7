"""VerticalSlash (MInference's dynamic sparse prefill) against SDPA and FlexAttention, side by side in one run
(needs a CUDA GPU).

    python benchmarks/dynamic.py [--json dynamic.json] [--shapes 32x8x32768x128 ...] [--budgets 16x96 ...]

Per shape and budget (verticals x slashes, in 64-token blocks beyond block 0 and the diagonal; MInference's
Llama-3-8B default, 1000 vertical and 6096 slash tokens, is about 16 x 96), every KV group VerticalSlash:
    attnforge        the op on the dynamic forms: the estimate from the last 64 queries, the block metadata and
                     the plan kernel, all of it, as a call pays it
    attnforge-kernel the op on the forms that estimate resolved to (the kernel and its cached metadata)
    estimate         runtime.dynamic.resolve alone
    flex             FlexAttention compiled, with a block mask of the same resolved blocks (its creation timed
                     apart: a dynamic mask is built on every call)
    sdpa             SDPA causal (dense: the speed-up's base)
Prints ms, the kept fraction of the causal blocks, the ideal speed-up over SDPA (1 / kept), the fraction of it
reached, and the ratio to Flex. Every output is checked before timing: against SDPA with the same mask up to 8k,
against FlexAttention beyond. The JSON is rewritten after every row; a failed row is recorded under "errors".
"""
import time

import torch
import torch.nn.functional as F

from _common import Device, Results, arguments

SHAPES = [(32, 8, 32768, 128), (32, 8, 65536, 128), (9, 3, 32768, 64)]
BUDGETS = [(16, 96), (8, 32)]


def main():
    ap = arguments(__doc__)
    ap.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                    help="shapes as HxHKVxNxD (query heads, kv heads, length, head dim)")
    ap.add_argument("--budgets", nargs="+", default=["x".join(map(str, b)) for b in BUDGETS],
                    help="VerticalSlash budgets as VERTICALSxSLASHES (64-token blocks)")
    args = ap.parse_args()
    dev = Device(args.device)
    dev.require("benchmarks/dynamic.py")
    import triton

    from attnforge import codegen, runtime
    from attnforge.runtime.dynamic import resolve
    from attnforge.runtime.forms import VerticalSlash, forms_to_json

    dtype = getattr(torch, args.dtype)
    key = runtime.kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=True)).source)
    flex = dev.flex()
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':>22} {'budget':>7} {'SDPA':>8} {'Flex':>8} {'ours':>8} {'kernel':>8} {'est.':>7} {'kept':>6} "
          f"{'of ideal':>8} {'x Flex':>7}")
    for shape in args.shapes:
        h, hk, n, d = (int(x) for x in shape.split("x"))
        group, scale = h // hk, d ** -0.5
        q = torch.randn(1, h, n, d, device=dev.kind, dtype=dtype)
        k = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        v = torch.randn(1, hk, n, d, device=dev.kind, dtype=dtype)
        sdpa_ms = dev.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                            warmup=25, rep=100)
        for budget in args.budgets:
            nv, ns = (int(x) for x in budget.split("x"))
            try:
                forms = (VerticalSlash(nv, ns),) * hk
                resolved = resolve(forms, q, k, scale)
                blk = resolved[0].block
                nb = -(-n // blk)
                vert = torch.zeros(hk, nb, dtype=torch.bool, device=dev.kind)
                slash = torch.zeros(hk, nb, dtype=torch.bool, device=dev.kind)
                for g, f in enumerate(resolved):
                    vert[g, [x for x in f.verticals if x < nb]] = True
                    slash[g, [x for x in f.slashes if x < nb]] = True

                def mask_mod(b, hq, qi, ki, vert=vert, slash=slash):
                    g, qb, kb = hq // group, qi // blk, ki // blk
                    return (qi >= ki) & (vert[g, kb] | slash[g, (qb - kb).clamp(min=0)])

                t0 = time.perf_counter()
                block_mask = dev.block_mask(mask_mod, 1, h, n, n)
                dev.sync()
                flex_mask_ms = (time.perf_counter() - t0) * 1e3
                dyn, fixed = forms_to_json(forms), forms_to_json(resolved)
                fns = {
                    "flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                    "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton", key, dyn),
                    "kernel": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton", key, fixed),
                }
                if n <= 8192:
                    i = torch.arange(n, device=dev.kind)
                    keep = mask_mod(0, torch.arange(h, device=dev.kind)[:, None, None], i[None, :, None], i[None, None, :])
                    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None], scale=scale, enable_gqa=True)
                else:
                    ref = fns["flex"]()
                before = runtime.counters["dynamic_resolved"]
                times = {}
                for name, fn in fns.items():
                    torch.testing.assert_close(fn(), ref, rtol=2e-2, atol=2e-2)
                    times[name] = dev.bench(fn, warmup=25, rep=100)
                assert runtime.counters["dynamic_resolved"] > before, "the dynamic forms were not resolved"
                times["estimate"] = dev.bench(lambda: resolve(forms, q, k, scale), warmup=5, rep=20)
                qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
                causal = kb <= qb
                kept = sum(float(((vert[g].cpu()[kb] | slash[g].cpu()[(qb - kb).clamp(min=0)]) & causal).sum())
                           for g in range(hk)) / (hk * float(causal.sum()))
                ours = times["attnforge"]
                row = {"heads": h, "kv_heads": hk, "n": n, "d": d, "verticals": nv, "slashes": ns,
                       "sdpa_causal_ms": sdpa_ms, "flex_ms": times["flex"], "flex_block_mask_ms": flex_mask_ms,
                       "attnforge_ms": ours, "attnforge_kernel_ms": times["kernel"], "estimate_ms": times["estimate"],
                       "kept_block_fraction": kept, "ideal_speedup": 1 / kept, "speedup_vs_sdpa": sdpa_ms / ours,
                       "fraction_of_ideal": sdpa_ms / ours * kept, "vs_flex": times["flex"] / ours,
                       "vs_flex_with_its_mask": (times["flex"] + flex_mask_ms) / ours,
                       "checked_against": "sdpa" if n <= 8192 else "flex"}
                res.add(row)
                print(f"{f'{h}/{hk} N={n} d={d}':>22} {budget:>7} {sdpa_ms:8.3f} {times['flex']:8.3f} {ours:8.3f} "
                      f"{times['kernel']:8.3f} {times['estimate']:7.3f} {kept:6.1%} {row['fraction_of_ideal']:7.0%} "
                      f"{row['vs_flex']:6.2f}x", flush=True)
            except Exception as e:        # record it, keep the other rows
                res.error({"heads": h, "kv_heads": hk, "n": n, "d": d, "budget": budget}, e)
            dev.empty_cache()


if __name__ == "__main__":
    main()
