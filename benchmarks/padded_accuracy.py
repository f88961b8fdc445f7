"""Padded batches on SmolLM2-135M with real weights (CPU): a batch of prompts of different lengths, left-padded,
against each prompt run alone, with a searched plan and without.

    python benchmarks/padded_accuracy.py [--plan benchmarks/results/accuracy.searched_0.5.plan.json]
                                         [--lengths 2048 1536 1024 640] [--new-tokens 32] [--out padded_accuracy.json]

Prompts are held-out real text (pydoc topics 40 on, never profiled). Reported:
    forward   af.optimize(model, plan): the batch's logits at every real position against each prompt alone
              through the same optimized model (max abs difference, top-1 agreement), and how the sites ran
    generate  greedy generation of --new-tokens tokens for the whole batch through the plan's per-head cache
              against each prompt generated alone (tokens equal per row), and with no plan against Hugging
              Face's own padded generate()
"""
import argparse
import json
import time

import torch

DEFAULT_PLAN = "benchmarks/results/accuracy.searched_0.5.plan.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default=DEFAULT_PLAN)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 1536, 1024, 640])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import attnforge as af
    from attnforge.compiler.data import sample_text
    from attnforge.compiler.models import _smollm2

    tok, base = _smollm2("sdpa")
    plan = af.Plan.load(args.plan)
    text_ids = tok(sample_text(max(args.lengths) * 8, offset=40), return_tensors="pt").input_ids[0]
    rows = [text_ids[i * 97:i * 97 + n] for i, n in enumerate(args.lengths)]        # different text per row
    width = max(args.lengths)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    result = {"model": "SmolLM2-135M-Instruct (real weights)", "plan": args.plan, "lengths": args.lengths,
              "new_tokens": args.new_tokens, "torch": torch.__version__}

    # forward: the padded batch through the optimized model against each row alone
    import copy

    model = af.optimize(copy.deepcopy(base), plan, compiler="eager")
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        af.runtime.reset_counters()
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        counters = dict(af.runtime.counters)
        sites = [s.mask for s in model.attnforge_backend.records[-1].sites]        # the padded batch's graph
        per_row = []
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            got = batch[i, width - len(r):]
            per_row.append({"length": len(r), "max_abs_logit_diff": (got - alone).abs().max().item(),
                            "top1_agreement": (got.argmax(-1) == alone.argmax(-1)).float().mean().item()})
    result["forward"] = {"rows": per_row, "attention_calls": counters, "padded_sites": sites.count("padding"),
                         "sites": len(sites), "seconds": time.perf_counter() - t0}
    print(f"forward: {sites.count('padding')}/{len(sites)} padded sites; "
          + "; ".join(f"{r['length']} tokens: max |dlogit| {r['max_abs_logit_diff']:.2e}, "
                      f"top-1 {r['top1_agreement']:.1%}" for r in per_row), flush=True)

    # generate: the batch against each row alone (plan), and against HF's own padded generate (no plan)
    gen = {}
    for name, p in (("plan", plan), ("dense", None)):
        t0 = time.perf_counter()
        out, cache = af.generate(base, ids, p, max_new_tokens=args.new_tokens, attention_mask=mask)
        equal = []
        for i, r in enumerate(rows):
            alone, _ = af.generate(base, r[None], p, max_new_tokens=args.new_tokens)
            equal.append(bool(torch.equal(out[i, width:], alone[0, len(r):])))
        entry = {"rows_equal_to_alone": equal, "cache_bytes": cache.nbytes(), "seconds": time.perf_counter() - t0}
        if p is None:
            with torch.no_grad():
                hf_out = base.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
            entry["equal_to_hf_generate"] = bool(torch.equal(out, hf_out))
        gen[name] = entry
        print(f"generate ({name}): rows equal to alone {equal}"
              + (f", equal to HF's padded generate(): {entry['equal_to_hf_generate']}" if p is None else ""),
              flush=True)
    result["generate"] = gen
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
