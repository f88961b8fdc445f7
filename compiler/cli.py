"""The `attnforge` command line.

    attnforge detect MODEL [--json]     list the attention sites (and the near misses declined)
    attnforge run MODEL [--json]        compile MODEL with the attnforge backend, compare with eager
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]

MODEL_HELP = ("a built-in example (smollm2, smollm2-eager, tiny, tiny-sdpa), path/to/file.py:factory or "
              "package.module:factory where factory() returns (model, example_inputs)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--seq-len", type=int, default=None, help="example input length (built-in models)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnforge", description="A compiler for the attention in PyTorch "
                                "models: find every attention, rewrite it into one op, run it from "
                                "generated Triton kernels.")
    from attnforge import __version__

    p.add_argument("--version", action="version", version=f"attnforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("detect", help="list the attention sites of a model",
                       description="Capture MODEL's graphs on its example input and list every attention "
                                   "site found, with heads, KV heads, head dim, causal and mask kind; "
                                   "also every near miss that was declined and why.")
    _model_args(d)
    d.add_argument("--capture", choices=("dynamo", "symbolic"), default="dynamo",
                   help="graph capture: Dynamo (as torch.compile) or torch.fx.symbolic_trace")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")

    r = sub.add_parser("run", help="compile a model with the attnforge backend and compare with eager",
                       description="Run MODEL eagerly and through torch.compile(backend=attnforge); "
                                   "report sites rewritten, which implementation ran, and the output "
                                   "difference.")
    _model_args(r)
    r.add_argument("--impl", choices=("auto", "triton", "reference"), default="auto",
                   help="attention implementation (triton on CPU needs TRITON_INTERPRET=1)")
    r.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                   help="what runs the rewritten graph")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _load(args):
    from .models import load_model

    return load_model(args.model, args.seq_len)


def _cmd_detect(args) -> int:
    from .api import detect_model

    model, inputs = _load(args)
    sites, declined = detect_model(model, inputs, args.capture)
    if args.json:
        print(json.dumps({"model": args.model, "sites": [s.to_dict() for s in sites],
                          "declined": [d.to_dict() for d in declined]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=200)
    if not sites:
        console.print(f"No attention found in {args.model}.")
    else:
        t = Table(title=f"{len(sites)} attention sites in {args.model}")
        for col in ("site", "rule", "heads", "kv heads", "head dim", "causal", "mask", "scale", "q len",
                    "dtype"):
            t.add_column(col)
        for s in sites:
            t.add_row(s.id, s.spelling, str(s.num_heads), str(s.num_kv_heads), str(s.head_dim),
                      "yes" if s.causal else "no", s.mask, f"{s.scale:.4g}", s.q_len, s.dtype)
        console.print(t)
    if declined:
        t = Table(title=f"{len(declined)} near misses declined")
        for col in ("node", "module", "rule", "reason"):
            t.add_column(col)
        for d in declined:
            t.add_row(d.node, d.module_path, d.rule, d.reason)
        console.print(t)
    return 0


def _cmd_run(args) -> int:
    from .api import compile_and_compare
    from .backend import Backend

    model, inputs = _load(args)
    backend = Backend(impl=args.impl, compiler=args.compiler)
    res = compile_and_compare(model, inputs, backend)
    if args.json:
        print(json.dumps({"model": args.model, **res.to_dict()}, indent=2))
        return 0
    print(f"{args.model}: {res.sites_rewritten}/{res.sites_found} attention sites rewritten "
          f"({res.declined} near misses declined)")
    print(f"attnforge op calls: {res.calls or 'none'}")
    top1 = "" if res.top1_agreement is None else f", top-1 agreement {res.top1_agreement:.2%}"
    print(f"compiled vs eager: max |diff| {res.max_abs_diff:.3g} (relative {res.rel_diff:.3g}){top1}")
    print(f"time: eager {res.eager_s:.2f}s, first compiled run {res.compiled_first_s:.1f}s "
          f"(includes compilation), next {res.compiled_s:.2f}s")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .models import ModelSpecError

    try:
        return {"detect": _cmd_detect, "run": _cmd_run}[args.command](args)
    except ModelSpecError as e:
        print(f"attnforge: error: {e}", file=sys.stderr)
        return 2
