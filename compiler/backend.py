"""The torch.compile backend: detect attention, rewrite it into the attnforge op, emit its kernels,
then hand the graph to Inductor (or run it as it is).

    be = attnforge.Backend()                        # every site dense and exact
    out = torch.compile(model, backend=be)(x)
    be.records                                      # one GraphRecord per graph Dynamo captured

    torch.compile(model, backend="attnforge", options={"impl": "reference"})   # found by name
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import fx

from attnforge import codegen, runtime
from attnforge.passes import AttentionSite, Decline, canonicalize
from attnforge.passes.apply_plan import apply_plan
from attnforge.passes.regions import detect_regions, flatten, graphs

from .plan import Plan, PlanError, fingerprint, resolve_site

__all__ = ["Backend", "BackendOptions", "GraphRecord", "attnforge_backend", "named_backend"]

COMPILERS = ("inductor", "eager")
_MASK_STYLE = {"none": None, "causal": None, "window": None, "boolean": "bool", "additive": "additive", "padding": None}


def kernel_spec(site: AttentionSite, planned: bool = False) -> "codegen.KernelSpec":
    """The forward kernel a detected site needs: its causal / mask / window structure, or the per-head
    plan kernel when the plan gives the site (plain causal attention) non-dense forms."""
    if planned and site.causal and site.mask in ("none", "causal", "padding") and not site.window:
        return codegen.KernelSpec(causal=True, plan=True)
    return codegen.KernelSpec(causal=site.causal, mask=_MASK_STYLE[site.mask], window=site.window > 0)


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """impl: 'auto' | 'triton' | 'reference' (see attnforge.runtime.ops); compiler: what runs the
    rewritten graph, 'inductor' (default) or 'eager'; rewrite: False only detects and records;
    debug: print the graph after each pass."""
    impl: str = "auto"
    compiler: str = "inductor"
    rewrite: bool = True
    debug: bool = False
    plan: Any = None
    profile_block: int = 0          # > 0: rewrite into the profiling op (used by attnforge.compiler.profile)

    def __post_init__(self):
        if self.impl not in runtime.IMPLS:
            raise ValueError(f"impl must be one of {runtime.IMPLS}, not {self.impl!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, not {self.compiler!r}")
        if self.plan is not None and self.profile_block:
            raise ValueError("profiling runs every site dense; pass plan=None with profile_block")


@dataclass(frozen=True, slots=True)
class KernelRecord:
    site: str
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class GraphRecord:
    """What the backend did with one captured graph."""
    index: int
    sites: tuple[AttentionSite, ...]
    rewritten: tuple[str, ...]          # site ids now running torch.ops.attnforge.attention
    declined: tuple[Decline, ...]       # near misses left untouched, with the reason
    kernels: tuple[KernelRecord, ...]
    impl: str
    compiler: str
    code: str = field(repr=False)       # the rewritten graph's Python code (a reproducer to read)
    planned: tuple[str, ...] = ()       # site ids running a non-dense plan entry
    unplanned: tuple[tuple[str, str], ...] = ()    # (site id, why) the plan names but this graph runs dense

    @property
    def fallbacks(self) -> dict[str, int]:
        """Reason -> count of automatic fallbacks to the reference by this graph's kernels so far."""
        keys = {k.key for k in self.kernels}
        out: dict[str, int] = {}
        for (key, reason), count in runtime.fallbacks.items():
            if key in keys:
                out[reason] = out.get(reason, 0) + count
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("code")
        d["fallbacks"] = self.fallbacks
        return d


class Backend:
    """A torch.compile backend (a callable) that holds its options and one record per graph."""

    def __init__(self, plan=None, impl: str = "auto", compiler: str = "inductor", rewrite: bool = True,
                 debug: bool = False, profile_block: int = 0):
        if isinstance(plan, (str, os.PathLike)):
            plan = Plan.load(plan)
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be None, an attnforge Plan or a path to plan.json, not {type(plan).__name__}")
        self.options = BackendOptions(impl=impl, compiler=compiler, rewrite=rewrite, debug=debug, plan=plan,
                                      profile_block=profile_block)
        self.records: list[GraphRecord] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"attnforge.Backend({self.options}, graphs={len(self.records)})"

    @property
    def fallbacks(self) -> dict[str, int]:
        """Reason -> count of automatic fallbacks to the reference, over every graph of this backend."""
        out: dict[str, int] = {}
        for r in self.records:
            for reason, count in r.fallbacks.items():
                out[reason] = out.get(reason, 0) + count
        return out

    @property
    def sites_rewritten(self) -> int:
        return sum(len(r.rewritten) for r in self.records)

    def transform(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, GraphRecord]:
        """Detect, emit kernels, rewrite. Returns the (rewritten) graph and its record. Activation-checkpointed
        regions (passes.regions) are rewritten inside their bodies, as part of this graph."""
        opts = self.options
        every, found = detect_regions(gm)
        sites, declined = flatten(found)
        self._dump("after detect", gm, sites=sites, declined=declined)
        kernels: dict[str, str] = {}
        kernel_records = []
        entries, unplanned = self._plan_entries(sites) if opts.plan is not None and opts.rewrite and sites else ({}, ())
        if opts.rewrite and opts.impl != "reference":
            for site in sites:
                spec = kernel_spec(site, planned=any(f.kind != "dense" for f in entries.get(site.id, ())))
                rendered = codegen.render_attention(spec)
                key = runtime.kernels.register_source(rendered.source)
                kernels[site.id] = key
                kernel_records.append(KernelRecord(site.id, spec.name, key))
        changed = False
        planned: tuple[str, ...] = ()
        if opts.rewrite and sites:
            for graph, (graph_sites, _) in zip(every, found):
                if not graph_sites:
                    continue
                graph, graph_changed = canonicalize(graph, graph_sites, impl=opts.impl, kernels=kernels,
                                                    profile_block=opts.profile_block)
                changed |= graph_changed
                if opts.plan is not None and graph_changed:
                    apply_plan(graph, entries)
            self._dump("after canonicalize" + (" and apply_plan" if opts.plan is not None else ""), gm)
            if opts.plan is not None and changed:
                planned = tuple(sid for sid, forms in entries.items() if any(f.kind != "dense" for f in forms))
        rewritten = tuple(s.id for s in sites) if changed else ()
        code = "\n".join([gm.code] + [f"# region {i}\n{g.code}" for i, g in enumerate(every[1:])])
        with self._lock:
            record = GraphRecord(len(self.records), tuple(sites), rewritten, tuple(declined),
                                 tuple(kernel_records), opts.impl, opts.compiler, code, planned, unplanned)
            self.records.append(record)
        return gm, record

    def _plan_entries(self, sites) -> tuple[dict, tuple]:
        """The plan's forms for the sites of this graph, and the sites it names that run dense here, with why.
        A site with other head counts (or a plan for another model) is an error. When the sites differ from
        the plan's only in that some carry an exact mask where the plan was searched on causal ones (a
        causal model traced with symbolic lengths, where Hugging Face builds its masks from the positions,
        comes this way), those sites run dense, exactly as the model wrote them: the forms are causal
        restrictions at positions that mask does not give; the record and a warning say so."""
        plan = self.options.plan
        by_id = {sp.site: sp for sp in plan.sites}
        resolved = {s.id: resolve_site(s.id, by_id) for s in sites}
        missing = [sid for sid, pid in resolved.items() if pid is None]
        if missing:
            raise PlanError(f"the plan has no entry for site(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                            f"that this model has; the plan ({plan.model}, {len(plan.sites)} sites) was made for "
                            "another model or edited — search a new plan for this one")
        for s in sites:
            sp = by_id.get(resolved[s.id]) if resolved[s.id] else None
            if sp is not None and (sp.num_heads, sp.num_kv_heads) != (s.num_heads, s.num_kv_heads):
                raise PlanError(f"site {s.id}: the plan expects {sp.num_heads} heads / {sp.num_kv_heads} KV heads, "
                                f"the graph has {s.num_heads} / {s.num_kv_heads}; the plan is for another model")
        opaque = []
        if {s.id for s in sites} == set(by_id):
            try:
                plan.check(sites)
            except PlanError:
                # the plan fits if the sites with an exact mask were causal: the mask hides the structure the
                # plan was searched on (not another model), so its forms cannot be placed there
                opaque = [s for s in sites if s.mask in ("boolean", "additive") and not s.causal]
                as_causal = [replace(s, causal=True) if s in opaque else s for s in sites]
                if not opaque or fingerprint(as_causal) != plan.fingerprint:
                    raise
        else:
            # sites named otherwise than the plan's (a graph resumed after a break names them relative to a
            # submodule) are not checked against its fingerprint: there a site whose causality is an exact
            # mask does not take forms (nothing says the mask is the causal structure they were searched on)
            opaque = [s for s in sites if s.mask in ("boolean", "additive") and not s.causal]
        entries = {sid: by_id[pid].forms for sid, pid in resolved.items()}
        why = ("its mask is an exact tensor attnforge cannot read as causal, padding or window structure "
               "(the plan's forms are causal restrictions at positions it does not give); it runs dense")
        unplanned = tuple((s.id, why) for s in opaque if any(f.kind != "dense" for f in entries.get(s.id, ())))
        for sid, _ in unplanned:
            entries.pop(sid)
        if unplanned:
            warnings.warn(f"attnforge: the plan is not applied to {len(unplanned)} site(s) of this graph "
                          f"({unplanned[0][0]}, ...): {why}. Pass the attention_mask (a 2-D padding mask) to "
                          "a Hugging Face model optimized by attnforge, or compile with static shapes",
                          RuntimeWarning, stacklevel=3)
        return entries, unplanned

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        _restart_for_symbolic_scales(gm)
        gm, _ = self.transform(gm)
        if torch.is_grad_enabled():
            # a graph that may be differentiated: its sites also return the log-sum-exp the backward kernels
            # need, so the backward does not run the forward again (Dynamo compiles per grad mode); inside a
            # checkpointed region too, where the region's recomputation then keeps it for the backward
            for graph in graphs(gm):
                _with_saved_lse(graph)
        if self.options.compiler == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def _dump(self, title, gm, **extra):
        if not self.options.debug:
            return
        print(f"--- attnforge: {title} ---")
        for key, value in extra.items():
            for item in value:
                print(f"{key}: {item}")
        print(gm.code)


def _restart_for_symbolic_scales(gm: fx.GraphModule) -> None:
    """With dynamic=True, Dynamo passes Python floats (a module's `scaling`) as graph inputs: an SDPA call's
    scale is then a symbolic float read by .item(), which detection cannot take as the op's constant, so every
    such site would be declined. Ask Dynamo to trace the frame again with those floats specialized, as
    Inductor's own scalar pass does (Dynamo guards on the value, so a changed float recompiles: exact): the
    floats SDPA's argument parsing already fixed to a number, and any left symbolic. A float specialized once
    is not asked for again."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import TensorifyState
        from torch._guards import TracingContext
        from torch.utils._sympy.symbol import SymT, symbol_is_type
    except ImportError:                  # a torch without the mechanism: the sites are declined, with the reason
        return
    from attnforge.passes import match as M

    symbolic = set()
    for graph in graphs(gm):
        for node in graph.graph.nodes:
            scale = M.arg(node, 6, "scale") if node.op == "call_function" and M.is_sdpa(node) else None
            value = scale.meta.get("example_value", scale.meta.get("val")) if isinstance(scale, fx.Node) else None
            if isinstance(value, torch.SymFloat):
                symbolic.add(value)
    if not symbolic:
        return
    names = {str(s) for v in symbolic for s in v.node.expr.free_symbols if symbol_is_type(s, SymT.FLOAT)}
    ctx = TracingContext.try_get()
    shape_env = getattr(getattr(ctx, "fake_mode", None), "shape_env", None)
    if shape_env is not None:           # already fixed to a number: the symbol is known only to the shape env
        names |= {str(k) for k, v in shape_env.replacements.items() if symbol_is_type(k, SymT.FLOAT) and v.is_number}
    names = {n for n in names if not TensorifyState.should_specialize(n)}
    if names:
        for name in sorted(names):
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis


def _with_saved_lse(gm: fx.GraphModule) -> fx.GraphModule:
    """Every attnforge.attention call becomes attnforge.attention_train(...)[0]: the same output, plus the
    log-sum-exp kept for the backward."""
    import operator

    from attnforge.passes.canonicalize import ATTENTION_OP

    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not ATTENTION_OP:
            continue
        with gm.graph.inserting_after(node):
            train = gm.graph.call_function(torch.ops.attnforge.attention_train.default, node.args, node.kwargs)
        with gm.graph.inserting_after(train):
            out = gm.graph.call_function(operator.getitem, (train, 0))
        train.meta.update({k: v for k, v in node.meta.items() if k != "val" and k != "example_value"})
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


_named: dict[tuple, Backend] = {}
_named_lock = threading.Lock()


def named_backend(options: dict | None = None) -> Backend:
    """The shared Backend used by backend="attnforge" with these options (its records live here)."""
    options = dict(options or {})
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    with _named_lock:
        if key not in _named:
            _named[key] = Backend(**options)
        return _named[key]


def attnforge_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """Entry point for torch.compile(model, backend="attnforge", options={...})."""
    if kwargs.get("mode") not in (None, "default"):
        raise ValueError(f"the attnforge backend takes options=, not mode={kwargs['mode']!r}")
    return named_backend(options)(gm, example_inputs)


def _register() -> None:
    # Installed, the package names the backend through its entry point and Dynamo loads it on first
    # use; registering then would be a duplicate. From a bare source tree there is no entry point.
    from torch._dynamo.backends import registry

    registry._lazy_import()
    if "attnforge" not in registry._BACKENDS:
        registry.register_backend(attnforge_backend, name="attnforge")


_register()
