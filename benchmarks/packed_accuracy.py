"""Packed sequences on SmolLM2-135M with real weights (CPU): several prompts end to end in one row, positions
restarting per prompt (what a collator that flattens a batch feeds a training step), against each prompt alone.

    python benchmarks/packed_accuracy.py [--plan benchmarks/results/accuracy.searched_0.5.plan.json]
                                         [--lengths 2048 1536 1024 640] [--out packed_accuracy.json]

Prompts are held-out real text (pydoc topics 40 on, never profiled), the same as padded_accuracy.py's. The
model runs without a cache (use_cache=False, as attnforge loads SmolLM2, and as training runs). Reported, per
prompt: the packed row's logits at the prompt's positions against the prompt run alone (max abs difference,
top-1 agreement) and its next-token loss inside the packed row against alone, for
    plan      af.optimize(model, plan): the packed row and each prompt alone through the same optimized model
    hf        Hugging Face's own packed forward (its packed-sequence mask, SDPA) against its own forward alone
and how the optimized model's sites ran (packed sites, attention calls).
"""
import argparse
import copy
import json
import time

import torch


def _loss(logits, ids) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:]).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="benchmarks/results/accuracy.searched_0.5.plan.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 1536, 1024, 640])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import attnforge as af
    from attnforge.compiler.data import sample_text
    from attnforge.compiler.models import _smollm2

    tok, base = _smollm2("sdpa")
    assert not base.config.use_cache
    plan = af.Plan.load(args.plan)
    text_ids = tok(sample_text(max(args.lengths) * 8, offset=40), return_tensors="pt").input_ids[0]
    prompts = [text_ids[i * 97:i * 97 + n] for i, n in enumerate(args.lengths)]        # as padded_accuracy.py
    ids = torch.cat(prompts)[None]
    positions = torch.cat([torch.arange(n) for n in args.lengths])[None]
    starts = [sum(args.lengths[:i]) for i in range(len(prompts))]
    result = {"model": "SmolLM2-135M-Instruct (real weights)", "plan_file": args.plan, "lengths": args.lengths,
              "packed_tokens": ids.shape[1], "torch": torch.__version__}

    def compare(run, name):
        t0 = time.perf_counter()
        with torch.no_grad():
            packed = run(ids, position_ids=positions).logits[0]
            rows = []
            for p, at in zip(prompts, starts):
                alone = run(p[None]).logits[0]
                got = packed[at:at + len(p)]
                rows.append({"length": len(p), "max_abs_logit_diff": (got - alone).abs().max().item(),
                             "top1_agreement": (got.argmax(-1) == alone.argmax(-1)).float().mean().item(),
                             "loss_packed": _loss(got, p), "loss_alone": _loss(alone, p)})
        print(f"{name}: " + "; ".join(f"{r['length']} tokens: max |dlogit| {r['max_abs_logit_diff']:.2e}, "
                                      f"top-1 {r['top1_agreement']:.1%}, loss {r['loss_packed']:.4f} packed / "
                                      f"{r['loss_alone']:.4f} alone" for r in rows), flush=True)
        return {"rows": rows, "seconds": time.perf_counter() - t0}

    model = af.optimize(copy.deepcopy(base), plan, compiler="eager")
    af.runtime.reset_counters()
    result["plan"] = compare(model, "plan")
    record = next(r for r in model.attnforge_backend.records if r.sites and r.sites[0].mask == "padding")
    result["plan"].update(packed_sites=sum(s.mask == "padding" for s in record.sites), sites=len(record.sites),
                          planned=bool(record.planned), attention_calls=dict(af.runtime.counters))
    print(f"plan: {result['plan']['packed_sites']}/{len(record.sites)} sites packed; calls {dict(af.runtime.counters)}")
    result["hf"] = compare(base, "hf")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
