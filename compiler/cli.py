"""The `attnforge` command line.

    attnforge detect MODEL [--json]     list the attention sites (and the near misses declined)
    attnforge run MODEL [--json]        compile MODEL with the attnforge backend, compare with eager
    attnforge profile MODEL -o P.npz    per-head influence / mass / entropy on calibration text
    attnforge search P.npz --density D  a per-head plan under the budget (plus the Pareto front)
    attnforge optimize MODEL --density D -o OUT/   profile + search + kernels + report + ONNX + summary
    attnforge export MODEL [--plan P] --onnx F     the ONNX export alone (one function node per site)
    attnforge generate MODEL [--plan P]            generation (greedy, beams, prompt lookup) through the plan's
                                                   per-head KV cache, against every group dense: tokens, memory, time
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


METRICS = ("auto", "fisher", "first_order", "output", "influence")   # attnforge.compiler.search.METRICS
METRIC_HELP = ("predicted error of a candidate: fisher (measured windows, default), first_order, output, or "
               "influence (MoA's block influence); see attnforge.compiler.search")


RECALL_DEFAULT = 0.0
RECALL_HELP = ("keep at least this fraction of the attention that copied rows pay to their source on the "
               "profile's recall windows, a floor on long-range retrieval (0: none; default %(default)s)")
RECALL_SLACK = 0.01   # attnforge.compiler.search.RECALL_SLACK
SLACK_HELP = ("among plans within this fraction of the least predicted loss, take the one keeping the most "
              "retrieval attention (profiles with recall windows; 0: the least-loss plan; default %(default)s)")
BUDGET_HELP = ("what --density limits: kept attention pairs (density), KV entries read at decode (kv), or "
               "attention FLOPs (flops), as a fraction of dense")


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

    pr = sub.add_parser("profile", help="profile per-head attention statistics on calibration text",
                        description="Run MODEL forward and backward on calibration text at several lengths and "
                                    "record, per site and KV head group, MoA's attention influence and the "
                                    "attention mass in blocks, and the entropy. Resumable: an existing output "
                                    "file is continued.")
    pr.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _profile_args(pr)
    pr.add_argument("-o", "--out", required=True, help="profile file to write (.npz)")

    se = sub.add_parser("search", help="search a per-head plan under a budget from a profile",
                        description="Choose one form per KV head group minimizing predicted loss at every "
                                    "profiled length under the density budget (exact MILP, HiGHS).")
    se.add_argument("profile", metavar="PROFILE", help="a profile file from `attnforge profile`")
    se.add_argument("--density", type=float, required=True, help="kept fraction of causal attention, e.g. 0.5")
    se.add_argument("--max-forms-per-layer", type=int, default=None, help="cap on distinct forms in one site")
    se.add_argument("--at", type=int, nargs="+", default=None,
                    help="profiled lengths where the density must hold (default: every profiled length)")
    se.add_argument("--metric", choices=METRICS, default="auto", help=METRIC_HELP)
    se.add_argument("--budget", choices=("density", "kv", "flops"), default="density", help=BUDGET_HELP)
    se.add_argument("--baseline", choices=("streaming",), help="instead, the uniform sink+window plan at the "
                    "same density (at the longest profiled length)")
    se.add_argument("--no-linear", action="store_true", help="leave out the linear-hybrid candidates even where "
                    "the profile measured them")
    se.add_argument("--dynamic", action="store_true", help="also offer MInference-style VerticalSlash forms "
                    "(estimated per input; inference only: no training, padded batches or ONNX export)")
    se.add_argument("--recall", type=float, default=RECALL_DEFAULT, help=RECALL_HELP)
    se.add_argument("--recall-slack", type=float, default=RECALL_SLACK, help=SLACK_HELP)
    se.add_argument("-o", "--out", required=True, help="plan file to write (.json)")
    se.add_argument("--json", action="store_true", help="print the summary (and Pareto front) as JSON")

    rp = sub.add_parser("report", help="an HTML (+ Markdown, JSON) report of a plan and/or a profile",
                        description="Render a self-contained HTML report (plots inline, sortable tables), "
                                    "with report.md, report.json and report.assets/ beside it.")
    rp.add_argument("inputs", metavar="FILE", nargs="+", help="plan.json and/or profile.npz")
    rp.add_argument("--model", help="MODEL to measure per-site latency on (dense vs planned)")
    rp.add_argument("--length", type=int, default=None, help="length for spans and kept fractions")
    rp.add_argument("--bench", help="accuracy benchmark JSON (benchmarks/accuracy.py) to plot measured "
                                    "perplexity of searched vs uniform plans")
    rp.add_argument("-o", "--out", required=True, help="report file to write (.html)")

    op = sub.add_parser("optimize", help="profile + search + kernels + report + ONNX into one folder",
                        description="The offline job: profile MODEL, search a plan at the density, write "
                                    "OUT/plan.json, OUT/profile.npz, OUT/kernels/ (generated Triton sources "
                                    "with a manifest), OUT/report.html, OUT/model.onnx and OUT/summary.json.")
    op.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _profile_args(op)
    op.add_argument("--density", type=float, default=0.5, help="kept fraction of causal attention")
    op.add_argument("--max-forms-per-layer", type=int, default=None)
    op.add_argument("--at", type=int, nargs="+", default=None,
                    help="profiled lengths where the density must hold (default: every profiled length)")
    op.add_argument("--metric", choices=METRICS, default="auto", help=METRIC_HELP)
    op.add_argument("--budget", choices=("density", "kv", "flops"), default="density", help=BUDGET_HELP)
    op.add_argument("--recall", type=float, default=RECALL_DEFAULT, help=RECALL_HELP)
    op.add_argument("--recall-slack", type=float, default=RECALL_SLACK, help=SLACK_HELP)
    op.add_argument("--no-onnx", action="store_true", help="skip OUT/model.onnx")
    op.add_argument("-o", "--out", required=True, help="output folder")
    op.add_argument("--json", action="store_true", help="print the summary as JSON")

    ex = sub.add_parser("export", help="export MODEL running a plan to ONNX (opset 23, dynamic length)",
                        description="Capture MODEL with a dynamic sequence length, rewrite every attention "
                                    "site with its plan entry, and write an ONNX file where each site is "
                                    "one attnforge-domain function node (body: standard Attention with a "
                                    "mask built from positions). The plan goes into the model metadata.")
    _model_args(ex)
    ex.add_argument("--plan", default=None, help="plan.json (default: every site dense)")
    ex.add_argument("--onnx", required=True, help="ONNX file to write")
    ex.add_argument("--json", action="store_true", help="print the export summary as JSON")

    ge = sub.add_parser("generate", help="generate through a plan's per-head KV cache, against a dense cache",
                        description="Greedy generation with Hugging Face generate() over attnforge's per-head "
                                    "KV cache laid out by the plan (each group holds only what its form "
                                    "reads), then the same with every group dense: the continuation, how "
                                    "many new tokens agree, the bytes each cache holds, tokens/s. The prompt: "
                                    "--prompt / --prompt-file, else --prompt-tokens of held-out text (pydoc "
                                    "topics 40-78) for built-in text models, else the model's example input.")
    _model_args(ge)
    ge.add_argument("--plan", default=None, help="plan.json (default: every group dense)")
    ge.add_argument("--prompt", default=None, help="prompt text (text models)")
    ge.add_argument("--prompt-file", default=None, help="a UTF-8 file holding the prompt (text models)")
    ge.add_argument("--prompt-tokens", type=int, default=512,
                    help="length of the default held-out prompt (default %(default)s)")
    ge.add_argument("--max-new-tokens", type=int, default=32)
    ge.add_argument("--impl", choices=("auto", "triton", "reference"), default="auto")
    ge.add_argument("--num-beams", type=int, default=1, help="beam search over the cache (default 1: greedy)")
    ge.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                    help="prompt-lookup decoding: drafts of up to N tokens copied from the prompt, verified in "
                         "one forward each, rejected ones taken back from the cache (default 0: off)")
    ge.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    ge.add_argument("--json", action="store_true", help="print JSON")
    return p


def _profile_args(p):
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="calibration lengths in tokens (text models; default 1024 2048 4096)")
    p.add_argument("--samples", type=int, default=2, help="plain text windows per length")
    p.add_argument("--recall-samples", type=int, default=2,
                   help="long-range recall windows per length (text models; a far segment repeated at the end)")
    p.add_argument("--no-kv-quant", action="store_true",
                   help="do not measure the KVQuant (KIVI 2/4/8-bit KV cache) candidates")
    p.add_argument("--block", type=int, default=64, help="profile block size")
    p.add_argument("--linear", action="store_true",
                   help="also distill hedgehog feature maps per KV group and measure the linear-hybrid forms "
                        "(taylor2 / hedgehog, windows 64 and 256) as search candidates")
    p.add_argument("--data", default=None, help="calibration text file (UTF-8; text models; default: the "
                   "built-in pydoc reference text, topics 0-39)")


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
                      "yes" if s.causal else "no", s.mask,
                      f"{s.scale:.4g}" + (f", soft-cap {s.softcap:g}" if s.softcap else ""), s.q_len, s.dtype)
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


def _calibration(args):
    """(model, {length: [ids]}) from built-in text models, or the factory's example input."""
    from .evaluate import calibration_windows, text_tokens
    from .profile import ProfileError
    from .models import load_model, text_model

    tm = text_model(args.model)
    if tm is not None:
        model, tokenizer = tm
        if args.data:
            try:
                with open(args.data, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ProfileError(f"--data {args.data}: cannot read it as UTF-8 text ({e})") from e
            tokens = tokenizer(text, return_tensors="pt").input_ids
            need = max(args.lengths) * (args.samples + args.recall_samples)
            if tokens.shape[1] < need:
                raise ProfileError(f"--data {args.data} has {tokens.shape[1]} tokens; calibration at length "
                                 f"{max(args.lengths)} with {args.samples}+{args.recall_samples} windows needs "
                                 f"{need}: give more text, or lower --lengths / --samples / --recall-samples")
        else:
            tokens = text_tokens(tokenizer)
        return model, {n: calibration_windows(tokens, n, args.samples, args.recall_samples) for n in args.lengths}
    model, inputs = load_model(args.model)
    if len(inputs) != 1 or not isinstance(inputs[0], __import__("torch").Tensor):
        raise ValueError(f"{args.model}: profiling needs a model taking one tensor of token ids")
    return model, {inputs[0].shape[-1]: [inputs[0]]}


def _cmd_profile(args) -> int:
    from .profile import profile_model

    model, samples = _calibration(args)
    prof = profile_model(model, samples, model_name=args.model, block=args.block, out=args.out,
                         linear=args.linear, kv_quant=not args.no_kv_quant)
    print(f"profiled {len(prof.sites)} sites at lengths {prof.lengths} -> {args.out}")
    return 0


def _plan_summary(plan) -> dict:
    return {"model": plan.model, "sites": len(plan.sites), "budget": plan.budget, "forms": plan.form_counts(),
            "predicted": plan.predicted}


def _recall_floor(prof, recall: float) -> float | None:
    """The recall floor to search with: none (0) or a profile without recall windows searches without one."""
    if not recall:
        return None
    if not any(prof.recall_mass(s["id"], n) is not None for s in prof.sites for n in prof.lengths):
        print(f"note: {recall:.0%} recall floor not applied: the profile has no recall windows "
              "(profile with --recall-samples >= 1)", file=sys.stderr)
        return None
    return recall


def _cmd_search(args) -> int:
    from .profile import Profile
    from .search import Budget, pareto, search, streaming_baseline, tables_for

    prof = Profile.load(args.profile)
    if args.baseline:
        plan = streaming_baseline(prof, args.density, max(prof.lengths))
        front = None
    else:
        tables = tables_for(prof, args.metric, linear=not args.no_linear, dynamic=args.dynamic)
        recall = _recall_floor(prof, args.recall)
        plan = search(prof, Budget(args.density, args.at, args.budget),
                      max_forms_per_layer=args.max_forms_per_layer, tables=tables, recall=recall,
                      recall_slack=args.recall_slack)
        front = pareto(prof, tables=tables, at=args.at, recall=recall)
    plan.save(args.out)
    summary = {**_plan_summary(plan), "pareto": front, "plan": args.out}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"plan for {plan.model}: {len(plan.sites)} sites, forms {plan.form_counts()} -> {args.out}")
        for n, d in plan.predicted.get("density", {}).items():
            loss = plan.predicted.get("loss", {}).get(n)
            print(f"  length {n}: density {d:.3f}" + (f", predicted loss {loss:.4f}" if loss is not None else ""))
        if front:
            print("  Pareto front (density: predicted loss): " +
                  ", ".join(f"{p['density']}: {p['predicted_loss']:.3f}" for p in front))
    return 0


def _cmd_report(args) -> int:
    from .plan import Plan
    from .profile import Profile
    from .report import build_report, measure_latency, write_report

    plan = profile = None
    for path in args.inputs:
        if str(path).endswith(".npz"):
            profile = Profile.load(path)
        else:
            plan = Plan.load(path)
    latency = None
    if args.model:
        from .models import load_model

        model, inputs = load_model(args.model)
        latency = measure_latency(model, inputs, plan)
    bench = json.loads(open(args.bench).read()) if args.bench else None
    rep = build_report(plan, profile, length=args.length, latency=latency, bench=bench)
    paths = write_report(rep, args.out, profile=profile, plan=plan)
    print(f"report -> {paths['html']} (+ {paths['md'].name}, {paths['json'].name}, {paths['assets'].name}/)")
    return 0


class _Stages:
    """One line per stage of a long command on stderr: what runs, then how long it took."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet, self.seconds = total, 0, quiet, {}

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def stage():
            self.done += 1
            if not self.quiet:
                print(f"[{self.done}/{self.total}] {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            yield
            self.seconds[name] = round(time.perf_counter() - t, 2)
            if not self.quiet:
                print(f"[{self.done}/{self.total}] {name}: {self.seconds[name]:.1f}s", file=sys.stderr, flush=True)

        return stage()


def _write_kernels(model, example, plan, kdir) -> list[dict]:
    """OUT/kernels/: the generated Triton source of every site's forward kernel (the per-head plan
    kernel where the plan gives the site non-dense forms), with a manifest."""
    import os

    from attnforge import codegen, runtime

    from .api import find_attention
    from .backend import kernel_spec

    os.makedirs(kdir, exist_ok=True)
    entries = plan.entries() if plan is not None else {}
    manifest = []
    for site in find_attention(model, (example,)):
        planned = any(f.kind != "dense" for f in entries.get(site.id, ()))
        spec = kernel_spec(site, planned=planned)
        rendered = codegen.render_attention(spec)
        key = runtime.kernels.source_key(rendered.source)
        path = os.path.join(kdir, f"{spec.name}.py")
        with open(path, "w") as f:
            f.write(rendered.source)
        manifest.append({"site": site.id, "kernel": spec.name, "key": key, "file": f"kernels/{spec.name}.py",
                         "forms": [f.to_dict() for f in entries.get(site.id, ())] or "dense"})
    with open(os.path.join(kdir, "manifest.json"), "w") as f:
        json.dump({"note": "forward kernel source per site (the per-head plan kernel carries the backward "
                           "kernels too); the runtime compiles and caches them on first use", "kernels": manifest},
                  f, indent=1)
    return manifest


def _cmd_optimize(args) -> int:
    import os

    from .export import export_onnx
    from .profile import profile_model
    from .search import Budget, search

    os.makedirs(args.out, exist_ok=True)
    stages = _Stages(6 if not args.no_onnx else 5)
    files = ["plan.json", "profile.npz", "kernels/manifest.json", "report.html", "report.md", "report.json",
             "report.assets/"]
    with stages("load model and calibration text"):
        model, samples = _calibration(args)
    with stages("profile"):
        prof = profile_model(model, samples, model_name=args.model, block=args.block,
                             out=os.path.join(args.out, "profile.npz"), linear=args.linear, kv_quant=not args.no_kv_quant)
    with stages("search"):
        plan = search(prof, Budget(args.density, args.at, args.budget), max_forms_per_layer=args.max_forms_per_layer,
                      metric=args.metric, recall=_recall_floor(prof, args.recall), recall_slack=args.recall_slack)
        plan = type(plan)(plan.fingerprint, plan.model, plan.sites, plan.budget, plan.lengths, plan.predicted,
                          plan.measured, {"command": "attnforge " + " ".join(sys.argv[1:]) if sys.argv else "",
                                          "versions": _versions()})
        plan.save(os.path.join(args.out, "plan.json"))
    from .profile import _ids

    first = _ids(samples[min(samples)][0])
    with stages("kernels"):
        _write_kernels(model, first, plan, os.path.join(args.out, "kernels"))
    with stages("report"):
        from .report import build_report, write_report

        write_report(build_report(plan, prof, command=plan.provenance["command"]),
                     os.path.join(args.out, "report.html"), profile=prof, plan=plan)
    exported = None
    if not args.no_onnx:
        with stages("ONNX export"):
            exported = export_onnx(model, (first,), os.path.join(args.out, "model.onnx"), plan=plan)
        files.append("model.onnx")
    summary = {**_plan_summary(plan), "out": args.out, "seconds": stages.seconds,
               "files": files + ["summary.json"],
               "onnx": exported.to_dict() if exported else None}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.model}: plan at density {args.density} -> {args.out}/plan.json; forms {plan.form_counts()}")
        print(f"  wrote {', '.join(summary['files'])} in {args.out}/")
        if exported and exported.declined:
            print(f"  {len(exported.declined)} attention(s) left as the model wrote them: "
                  + "; ".join(f"{d['module']}: {d['reason']}" for d in exported.declined[:3]))
    return 0


def _cmd_export(args) -> int:
    from .export import export_onnx

    model, inputs = _load(args)
    res = export_onnx(model, inputs, args.onnx, plan=args.plan)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        planned = sum(1 for s in res.sites if s["forms"] != "dense")
        print(f"{args.model}: {len(res.sites)} sites ({planned} with non-dense forms) as {len(res.functions)} "
              f"attnforge functions -> {args.onnx} (opset {res.opset}, dynamic {res.dynamic})")
        for d in res.declined:
            print(f"  left as written: {d['module']} ({d['node']}): {d['reason']}")
    return 0


def _generate_prompt(args):
    """(model, prompt ids [1, T], tokenizer or None) for `attnforge generate`."""
    from .evaluate import EVALUATION, text_tokens
    from .models import ModelSpecError, load_model, text_model

    if args.prompt is not None and args.prompt_file is not None:
        raise ModelSpecError("give --prompt or --prompt-file, not both")
    tm = text_model(args.model)
    if tm is None:
        if args.prompt is not None or args.prompt_file is not None:
            raise ModelSpecError(f"{args.model} has no tokenizer here: it generates from its example input "
                                 "(drop --prompt / --prompt-file)")
        model, inputs = load_model(args.model, args.seq_len)
        if not callable(getattr(model, "generate", None)) or len(inputs) != 1 or getattr(inputs[0], "dim",
                                                                                          lambda: 0)() != 2:
            raise ModelSpecError(f"{args.model}: generate needs a Hugging Face causal LM whose example input "
                                 "is one [batch, length] tensor of token ids")
        return model, inputs[0], None
    model, tokenizer = tm
    text = args.prompt
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelSpecError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({e})") from e
    if text is not None:
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ModelSpecError("the prompt is empty")
    else:
        ids = text_tokens(tokenizer, EVALUATION)[:, :args.prompt_tokens]
    return model, ids, tokenizer


def _cmd_generate(args) -> int:
    import time

    from attnforge import runtime

    from .decode import KVCacheError, generate
    from .models import ModelSpecError
    from .plan import Plan

    if args.max_new_tokens < 1:
        raise ModelSpecError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1 or args.prompt_lookup < 0:
        raise ModelSpecError("--num-beams must be at least 1 and --prompt-lookup at least 0")
    if args.num_beams > 1 and args.prompt_lookup:
        raise ModelSpecError("--num-beams and --prompt-lookup do not go together (Hugging Face drafts for one "
                             "sequence at a time)")
    mode = {"num_beams": args.num_beams} if args.num_beams > 1 else {}
    if args.prompt_lookup:
        mode["prompt_lookup_num_tokens"] = args.prompt_lookup
    model, ids, tokenizer = _generate_prompt(args)
    plan = Plan.load(args.plan) if args.plan else None
    runs = [("plan" if plan is not None else "dense", plan)]
    if plan is not None and not args.no_dense:
        runs.append(("dense", None))
    rows = {}
    for name, p in runs:
        runtime.reset_counters()
        try:
            t0 = time.perf_counter()
            out, cache = generate(model, ids, p, max_new_tokens=args.max_new_tokens, impl=args.impl, **mode)
            seconds = time.perf_counter() - t0
        except KVCacheError as e:
            print(f"attnforge: error: {e}", file=sys.stderr)
            return 2
        new = out[0, ids.shape[1]:]
        rows[name] = {"new_tokens": new.tolist(), "seconds": round(seconds, 3),
                      "tokens_per_s": round(len(new) / seconds, 2), "cache_bytes": cache.nbytes(),
                      "kv_entries": cache.kv_entries(),
                      "calls": {k: v for k, v in sorted(runtime.counters.items()) if k.startswith("kvcache_")}}
        if tokenizer is not None:
            rows[name]["text"] = tokenizer.decode(new, skip_special_tokens=True)
    if "plan" in rows and "dense" in rows:
        a, b = rows["plan"]["new_tokens"], rows["dense"]["new_tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rows["plan"]["tokens_equal_to_dense_before_first_difference"] = same
        rows["plan"]["cache_bytes_vs_dense"] = round(rows["plan"]["cache_bytes"] / rows["dense"]["cache_bytes"], 4)
    summary = {"model": args.model, "plan": args.plan, "prompt_tokens": ids.shape[1],
               "max_new_tokens": args.max_new_tokens, "impl": args.impl, "num_beams": args.num_beams,
               "prompt_lookup": args.prompt_lookup, "runs": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    how = (f"{args.num_beams} beams" if args.num_beams > 1 else
           f"greedy, prompt-lookup drafts of up to {args.prompt_lookup}" if args.prompt_lookup else "greedy")
    print(f"{args.model}: prompt {ids.shape[1]} tokens, {args.max_new_tokens} new ({how})")
    for name, r in rows.items():
        extra = ""
        if name == "plan" and "dense" in rows:
            extra = (f", {r['cache_bytes_vs_dense']:.2f}x dense's bytes; the first "
                     f"{r['tokens_equal_to_dense_before_first_difference']} new tokens equal dense's")
        print(f"  {name:>5}: cache {r['cache_bytes'] / 2**20:.2f} MiB ({r['kv_entries']} KV entries){extra}; "
              f"{r['tokens_per_s']:.1f} tokens/s on this machine (first-call costs included)"
              + (f"; {r['calls'].get('kvcache_rolled_back', 0)} rejected draft tokens taken back"
                 if args.prompt_lookup else ""))
        print(f"         {r['text']!r}" if "text" in r else f"         {r['new_tokens']}")
    return 0


def _versions() -> dict:
    import platform

    import torch

    from attnforge import __version__
    from attnforge.runtime.kernels import triton_version

    return {"attnforge": __version__, "torch": torch.__version__, "triton": triton_version(),
            "python": platform.python_version()}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .models import ModelSpecError
    from .plan import PlanError
    from .profile import ProfileError
    from .search import SearchError

    commands = {"detect": _cmd_detect, "run": _cmd_run, "profile": _cmd_profile, "search": _cmd_search,
                "optimize": _cmd_optimize, "report": _cmd_report, "export": _cmd_export, "generate": _cmd_generate}
    from .export import ExportError

    try:
        return commands[args.command](args)
    except (ModelSpecError, PlanError, ProfileError, SearchError, ExportError) as e:
        print(f"attnforge: error: {e}", file=sys.stderr)
        return 2
