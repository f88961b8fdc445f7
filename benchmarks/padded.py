"""Padded and packed batches: SDPA with Hugging Face's mask, FlexAttention with the same mask, attnforge's
padded / packed path (sequences compacted, per-sequence lengths), side by side in one run (needs a CUDA GPU).

    python benchmarks/padded.py [--json padded.json] [--shapes 9x3x8192x64 ...] [--batch 8] [--plans dense mixed]
                                [--layouts padded packed]

padded: a batch of B rows whose lengths spread evenly from N/4 to N, left-padded to N (what generate()
builds) and masked as Hugging Face's sdpa path masks them: key j of row b kept where it is a token and
j <= i. packed: B rows of N tokens, each holding four sequences end to end (N/2, N/4, N/8, N/8, rotated
per row: what a collator that flattens a batch builds), masked as Hugging Face masks packed positions: key
j kept where it is in query i's sequence and j <= i. SDPA gets that [B, 1, N, N] boolean mask (HF's SDPA
attention); FlexAttention the same mask_mod (and for the mixed plan each sequence's per-head windows from
its own first token); attnforge the [B, N] padding flags or sequence labels (runtime.padding). The work that
matters is the sequences' causal pairs; the ideal speed-up over SDPA is B * N^2 (what a masked SDPA computes)
over the kept pairs of the sequences. Results are checked against SDPA (dense) or FlexAttention (mixed) on
every token's row before timing (padding rows are zeros in attnforge, as in Hugging Face's
flash-attention-2 path, and are not compared). The JSON is rewritten after every row.
"""

import torch
import torch.nn.functional as F

from _common import Device, Results, arguments

SHAPES = [(9, 3, 8192, 64), (32, 8, 8192, 128)]       # SmolLM2 and Llama-3-8B shaped layers
SINK = 64


def lengths_of(batch: int, n: int) -> list[int]:
    return [n // 4 + (n - n // 4) * i // max(1, batch - 1) for i in range(batch)]


def documents_of(batch: int, n: int) -> list[list[int]]:
    """Per row, the lengths of the sequences packed end to end into its n tokens."""
    pieces = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    return [pieces[b % 4:] + pieces[:b % 4] for b in range(batch)]


def layout(kind: str, batch: int, n: int, device):
    """(the op's key vector, each slot's sequence label [B, N] (0: padding), each slot's sequence start [B, N],
    the sequences' lengths)."""
    labels = torch.zeros(batch, n, dtype=torch.long, device=device)
    start = torch.zeros(batch, n, dtype=torch.long, device=device)
    sequences = []
    for b in range(batch):
        if kind == "padded":
            length = lengths_of(batch, n)[b]
            labels[b, n - length:], start[b, :] = 1, n - length
            sequences.append(length)
            continue
        at = 0
        for i, length in enumerate(documents_of(batch, n)[b]):
            labels[b, at:at + length], start[b, at:at + length] = i + 1, at
            sequences.append(length)
            at += length
    return (labels != 0 if kind == "padded" else labels), labels, start, sequences


def main():
    ap = arguments(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--plans", nargs="+", default=["dense", "mixed"], choices=("dense", "mixed"))
    ap.add_argument("--layouts", nargs="+", default=["padded", "packed"], choices=("padded", "packed"))
    ap.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                    help="HxHKVxNxD (query heads, kv heads, padded length, head dim)")
    args = ap.parse_args()
    dev = Device(args.device)
    dev.require("benchmarks/padded.py")
    import triton

    from attnforge import codegen, runtime
    from attnforge.runtime.forms import Dense, SinkWindow, forms_to_json, kept_pairs

    dtype = getattr(torch, args.dtype)
    keys = {plan: runtime.kernels.register_source(codegen.render_attention(
        codegen.KernelSpec(causal=True, plan=plan == "mixed")).source) for plan in args.plans}
    flex = dev.flex()
    res = Results(args.json, device=dev.name(), torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
                  batch=args.batch)
    print(f"device: {dev.name()}, torch {torch.__version__}, triton {triton.__version__}, batch {args.batch}")
    print(f"{'shape':>20} {'layout':>6} {'plan':>6} {'SDPA+mask':>10} {'Flex':>8} {'ours':>8} {'x SDPA':>7} "
          f"{'ideal':>6} {'x Flex':>7}")
    for shape in args.shapes:
        h, hk, n, d = (int(x) for x in shape.split("x"))
        group, scale = h // hk, d ** -0.5
        q = torch.randn(args.batch, h, n, d, device=dev.kind, dtype=dtype)
        k, v = (torch.randn(args.batch, hk, n, d, device=dev.kind, dtype=dtype) for _ in range(2))
        causal = torch.ones(n, n, dtype=torch.bool, device=dev.kind).tril()
        for kind in args.layouts:
            keys_vec, labels, start, sequences = layout(kind, args.batch, n, dev.kind)
            # [B, 1, N, N], as HF's sdpa_mask builds it (padding: key is a token; packed: key in the query's sequence)
            same = (labels[:, None, None, :] != 0) & ((labels[:, None, :, None] == labels[:, None, None, :])
                                                      if kind == "packed" else True)
            hf_mask = same & causal
            sdpa_ms = dev.bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=hf_mask, scale=scale,
                                                                       enable_gqa=True), warmup=25, rep=100)
            for plan in args.plans:
                where = {"heads": h, "kv_heads": hk, "n": n, "d": d, "layout": kind, "plan": plan}
                try:
                    forms = (Dense(),) * hk if plan == "dense" else tuple(
                        Dense() if g % 2 == 0 else SinkWindow(SINK, 256 * (1 + g % 16)) for g in range(hk))
                    win = torch.tensor([f.window_at(0) or 0 for f in forms], device=dev.kind)

                    def mask_mod(b, hq, qi, ki, win=win, labels=labels, start=start):
                        w = win[hq // group]
                        rel_k = ki - start[b, qi]                 # positions from the sequence's first token
                        return (qi >= ki) & (labels[b, ki] != 0) & (labels[b, ki] == labels[b, qi]) & \
                            ((w == 0) | (rel_k < SINK) | (qi - ki < w))

                    block_mask = dev.block_mask(mask_mod, args.batch, h, n, n)
                    fj = "" if plan == "dense" else forms_to_json(forms)
                    fns = {
                        "flex": lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                        "attnforge": lambda: torch.ops.attnforge.attention(q, k, v, None, True, 0, scale, "triton",
                                                                           keys[plan], fj, keys_vec),
                    }
                    if plan == "dense":
                        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=hf_mask, scale=scale, enable_gqa=True)
                    else:
                        ref = fns["flex"]()
                    real = (labels != 0)[:, None, :, None]
                    times = {}
                    for name, fn in fns.items():
                        torch.testing.assert_close(fn().masked_fill(~real, 0), ref.masked_fill(~real, 0),
                                                   rtol=2e-2, atol=2e-2)
                        times[name] = dev.bench(fn, warmup=25, rep=100)
                    kept = sum(kept_pairs(f, length) for f in forms for length in sequences) * group
                    ideal = args.batch * h * n * n / kept
                    ours = times["attnforge"]
                    row = {**where, "lengths": sequences,
                           "sdpa_masked_ms": sdpa_ms, "flex_ms": times["flex"], "attnforge_ms": ours,
                           "kept_pairs": kept, "speedup_vs_sdpa": sdpa_ms / ours, "ideal_speedup": ideal,
                           "fraction_of_ideal": sdpa_ms / ours / ideal, "vs_flex": times["flex"] / ours,
                           "attnforge_tflops": 4 * d * kept / ours / 1e9,
                           "checked_against": "sdpa" if plan == "dense" else "flex"}
                    res.add(row)
                    print(f"{f'{h}/{hk} N={n} d={d}':>20} {kind:>6} {plan:>6} {sdpa_ms:10.3f} {times['flex']:8.3f} "
                          f"{ours:8.3f} {row['speedup_vs_sdpa']:6.2f}x {ideal:5.2f}x {row['vs_flex']:6.2f}x", flush=True)
                except Exception as e:        # record it, keep the other rows
                    res.error(where, e)
                dev.empty_cache()


if __name__ == "__main__":
    main()
