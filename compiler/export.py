"""ONNX export of a model running a plan: one `attnforge`-domain function node per attention site.

    af.export_onnx(model, (ids,), "model.onnx", plan=plan)          # or plan=None: every site dense

How it goes:
1. capture: `torch._dynamo.export` with the sequence dims dynamic, so the graph holds torch-level calls
   with symbolic lengths (no length is baked in); weights stay module attributes.
2. the backend's own passes (detect, canonicalize, apply_plan) rewrite every site into one call of
   `torch.ops.attnforge.attention` carrying its plan entry. A site the passes decline stays as the
   model wrote it and is listed in the result (`declined`), never rewritten approximately.
3. each call becomes `torch.onnx.ops.symbolic("attnforge::<Op>")`, so the exporter keeps it as one named
   node (an onnxscript translation would be inlined); `torch.onnx.export(..., dynamo=True)`, opset 23.
4. every distinct site configuration gets a model-local FunctionProto whose body ONNX Runtime runs:
   the standard `Attention` op (GQA through the 4-D K/V head count, the site's scale) with a boolean
   mask built inside the graph from positions (Range / compare, per KV group: causal, sink + window,
   elastic span alpha + beta * S, block-sparse verticals / slashes gathered from small lookup tables).
   The sequence length stays dynamic and no N x N constant is ever stored.
5. the plan (JSON) and the site -> function map go into the model's metadata; `onnx.checker` runs.

Positions follow attnforge.runtime.forms: with N queries and S keys, query i sits at S - N + i; the
model's own causal flag / sliding window stay top-left, as in the reference implementation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnforge.runtime.forms import (BlockSparse, Dense, ElasticWindow, Linear, SinkWindow, VerticalSlash, forms_from_json,
                                     prefill_form)

__all__ = ["export_onnx", "ExportError", "ExportResult", "DOMAIN", "OPSET"]

DOMAIN = "attnforge"
OPSET = 23                      # standard Attention (GQA) needs opset 23; ONNX Runtime >= 1.24 runs it right
_DENSE_SPAN = 1 << 40           # a window no sequence reaches (dense groups inside a mixed site)


class ExportError(RuntimeError):
    """The model or plan cannot be exported; the message says which part, why, and what to do."""


@dataclass
class ExportResult:
    path: str
    sites: list[dict]                   # one per exported site: id, function, forms
    declined: list[dict]                # attention left as the model wrote it, with the reason
    functions: list[str]                # attnforge-domain functions in the file
    opset: int = OPSET
    dynamic: dict = field(default_factory=dict)
    # ONNX Runtime's run of the file on the example inputs against the PyTorch run of the same plan: the
    # largest |difference| of any output (None: not run, check=False or onnxruntime missing)
    ort_max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "opset": self.opset, "sites": self.sites, "declined": self.declined,
                "functions": self.functions, "dynamic": self.dynamic, "ort_max_abs_diff": self.ort_max_abs_diff}


# --------------------------------------------------------------------------------------- capture
@contextlib.contextmanager
def _hf_sdpa_causal_path():
    """Hugging Face builds an explicit N x N mask whenever it sees an export (so that an exported SDPA
    call cannot hard-code is_causal for the example length) and, with no attention mask given, ANDs in
    a packed-sequence mask computed from position ids. attnforge rebuilds causality from positions at
    run time, so during this capture the model takes its is_causal path (contiguous positions, no
    padding: the prefill an exported file runs): each site is then plain causal attention, as in the
    plan, instead of an opaque data-dependent mask. Restored afterwards."""
    try:
        import transformers.masking_utils as mu
    except Exception:               # transformers missing: nothing to adjust
        yield
        return
    patches = {"is_torchdynamo_exporting": lambda: False, "find_packed_sequence_indices": lambda *a, **k: None}
    saved = {name: getattr(mu, name) for name in patches if hasattr(mu, name)}
    for name in saved:
        setattr(mu, name, patches[name])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mu, name, value)


@contextlib.contextmanager
def _rotary_per_row(model):
    """Hugging Face's rotary embedding takes positions [1, N] when the call gives none and broadcasts the
    cos / sin over the batch; ONNX's RotaryEmbedding (which the exporter fuses the pattern into) wants them
    per row, and ONNX Runtime refuses a file with a batch of one there once it runs two rows. During the
    capture, positions of one row are expanded to the batch (the same values: every row at 0 .. N-1, what
    the model computes without position_ids). Removed afterwards."""
    hooks = []

    def per_row(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        if not (isinstance(x, torch.Tensor) and isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[0] == 1):
            return None
        pos = pos.expand(x.shape[0], -1)
        if len(args) > 1:
            return (args[0], pos, *args[2:]), kwargs
        return args, {**kwargs, "position_ids": pos}

    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            hooks.append(module.register_forward_pre_hook(per_row, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _dynamic_shapes(example_inputs, dynamic, bounds=None):
    """(dynamic_shapes spec for torch.export, the axes as {input: {dim: name}}). bounds: {name: (min,
    max)}; a length range the model itself imposes (a mask buffer of 512 rows, say)."""
    from torch.export import Dim

    if dynamic is None:         # token ids [B, N]: the sequence dim is dynamic, the batch too from two rows on
        dynamic = {i: ({0: "batch", 1: "seq"} if x.shape[0] > 1 else {1: "seq"}) for i, x in enumerate(example_inputs)
                   if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point()}
    bounds = bounds or {}
    dims: dict[str, Dim] = {}
    spec = []
    for i, x in enumerate(example_inputs):
        axes = dynamic.get(i, {})
        for d in axes:
            if not isinstance(x, torch.Tensor) or d >= x.dim():
                raise ExportError(f"dynamic axis {d} of input {i} does not exist (input shape "
                                  f"{getattr(x, 'shape', None)}); give axes that the example inputs have")
        spec.append({d: dims.setdefault(name, Dim(name, min=bounds.get(name, (2, None))[0],
                                                  max=bounds.get(name, (2, None))[1]))
                     for d, name in axes.items()} or None)
    return tuple(spec), dynamic


def _suggested_bounds(error: Exception, bounds: dict) -> dict:
    """Length ranges that satisfy the guards torch reports when the model bounds a dynamic dim: its
    suggested fix ("seq = Dim('seq', max=512)"), and a single excluded value at the edge of the range
    ("... != 512", a slice of a 512-row buffer that is a no-op at exactly 512) moved inside it."""
    import re

    text, out = str(error), dict(bounds)
    for name, args in re.findall(r"(\w+) = Dim\('\w+'(?:, )?([^)]*)\)", text):
        lo, hi = re.search(r"min=(\d+)", args), re.search(r"max=(\d+)", args)
        out[name] = (max(2, int(lo.group(1))) if lo else 2, int(hi.group(1)) if hi else None)
    for name, value in re.findall(r"values of (\w+) = .*? satisfy the generated guard .*? != (\d+)", text):
        lo, hi = out.get(name, (2, None))
        value = int(value)
        if hi is not None and value == hi:
            out[name] = (lo, hi - 1)
        elif value == lo:
            out[name] = (lo + 1, hi)
    return out if out != bounds else {}


def _capture(model, example_inputs, dynamic):
    """(graph module, dynamic_shapes spec, axes, bounds): torch._dynamo.export with the given axes dynamic;
    when the model bounds a length (guards torch reports with a suggested range), once more within it."""
    shapes, dynamic = _dynamic_shapes(example_inputs, dynamic)
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved:
        config.use_cache = False            # prefill graph: no cache object in the outputs
    bounds: dict = {}
    try:
        for attempt in range(3):
            torch._dynamo.reset()
            try:
                with _hf_sdpa_causal_path(), _rotary_per_row(model), torch.no_grad():
                    gm = torch._dynamo.export(model, dynamic_shapes=shapes)(*example_inputs).graph_module
                return gm, shapes, dynamic, bounds
            except Exception as e:
                new = _suggested_bounds(e, bounds) if attempt < 2 else {}
                if not new:
                    raise ExportError(
                        f"capturing {type(model).__name__} for export failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''} — the model must trace as one graph with a "
                        "dynamic sequence length (torch._dynamo.export); remove graph breaks, or pass "
                        "dynamic={} to export at the example shape only") from e
                bounds = new
                shapes, dynamic = _dynamic_shapes(example_inputs, dynamic, bounds)
    finally:
        if saved:
            config.use_cache = saved


# ------------------------------------------------------------------- the node the exporter keeps
def export_attention(q, k, v, mask, causal, window, scale, impl, kernel, forms, padding=None, *, site: str, op: str,
                     softcap: float = 0.0):
    """Stands in for torch.ops.attnforge.attention in the graph handed to torch.onnx.export: one
    `attnforge::<op>` node whose function body (added after export) computes the site's plan (a padded
    site also takes the [B, S] padding flags)."""
    if torch.onnx.is_in_onnx_export():
        inputs = [q, k, v] + ([mask] if mask is not None else []) + ([padding] if padding is not None else [])
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{op}", inputs, {}, dtype=q.dtype,
                                       shape=(*q.shape[:3], v.shape[-1]), version=1,
                                       metadata_props={"attnforge.site": site, "attnforge.forms": forms or "dense"})
    return torch.ops.attnforge.attention(q, k, v, mask, causal, window, scale, "reference", kernel, forms, padding,
                                         softcap)


@dataclass(frozen=True)
class _SiteConfig:
    forms: str                  # plan entry (JSON), "" when dense
    causal: bool
    window: int
    scale: float
    mask: str | None            # None | "bool" | "float"
    heads: int
    kv_heads: int
    padded: bool = False        # a padded batch: the function takes the [B, S] padding flags as "P"
    softcap: float = 0.0        # > 0: the Attention node's softcap (applied before its masks, as Gemma 2 does)

    def op_name(self) -> str:
        digest = hashlib.sha1(repr(self).encode()).hexdigest()[:8]
        return ("PlanAttention_" if self.forms else "DenseAttention_") + digest


def _meta_value(node):
    return node.meta.get("val", node.meta.get("example_value")) if hasattr(node, "meta") else None


def _rewrite_for_export(gm):
    """Point every attnforge attention call at export_attention; returns the configs by op name."""
    from attnforge.passes.canonicalize import ATTENTION_OP

    configs: dict[str, _SiteConfig] = {}
    sites = []
    for node in gm.graph.nodes:
        if node.target is not ATTENTION_OP:
            continue
        q, k, _v, mask, causal, window, scale = node.args[:7]
        forms = node.args[9] if len(node.args) > 9 else ""
        padding = node.args[10] if len(node.args) > 10 else None
        softcap = float(node.args[11] if len(node.args) > 11 else node.kwargs.get("softcap", 0.0))
        if any(isinstance(f, VerticalSlash) for f in forms_from_json(forms or "")):
            raise ExportError(f"site {node.meta.get('attnforge_site')}: a vertical_slash form is estimated per input "
                              "(top-k over the last queries' attention), which the exported graph does not compute "
                              "yet; export a plan without it (or with its groups Dense)")
        if softcap and any(isinstance(f, Linear) for f in forms_from_json(forms or "")):
            raise ExportError(f"site {node.meta.get('attnforge_site')}: linear forms on soft-capped scores")
        if padding is not None and (pv := _meta_value(padding)) is not None and pv.dtype != torch.bool:
            raise ExportError(f"site {node.meta.get('attnforge_site')}: integer sequence labels (packed sequences) "
                              "reached the export; the exported file takes a 0/1 attention_mask: export with one")
        qv, kv, mv = _meta_value(q), _meta_value(k), _meta_value(mask) if mask is not None else None
        if qv is None or kv is None:
            raise ExportError(f"site {node.meta.get('attnforge_site')}: no shape information on its inputs")
        mkind = None if mask is None else ("bool" if mv is not None and mv.dtype == torch.bool else "float")
        cfg = _SiteConfig(forms or "", bool(causal), int(window), float(scale), mkind, int(qv.shape[1]),
                          int(kv.shape[1]), padding is not None, softcap)
        op = cfg.op_name()
        configs[op] = cfg
        site = node.meta.get("attnforge_site", node.name)
        sites.append({"site": site, "function": op, "forms": json.loads(forms) if forms else "dense"})
        node.target = export_attention
        node.args = tuple(node.args[:10]) + ("",) * (10 - len(node.args)) + (padding,)
        node.kwargs = {"site": site, "op": op, "softcap": softcap}
    gm.recompile()
    return configs, sites


# ------------------------------------------------------------------------- function bodies
class _Body:
    """A tiny builder of an ONNX function body: op() appends a node and returns its output name."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype) -> str:
        return self.op("Constant", value=self.numpy_helper.from_array(np.asarray(value, dtype=dtype)))


def _window_keep(b: _Body, form, jrow, pcol, s_scalar) -> str:
    """[N, S] keep of a sink + window form (elastic: the span is computed from S in float64)."""
    sink = b.const(form.sink, np.int64)
    if isinstance(form, SinkWindow):
        w = b.const(form.window, np.int64)
    else:                       # max(1, int(alpha + beta * S)), as ElasticWindow.window_at
        span = b.op("Add", b.const(float(form.alpha), np.float64),
                    b.op("Mul", b.const(float(form.beta), np.float64), b.op("Cast", s_scalar, to=11)))
        w = b.op("Max", b.op("Cast", b.op("Floor", span), to=7), b.const(1, np.int64))
    return b.op("Or", b.op("Less", jrow, sink), b.op("Greater", jrow, b.op("Sub", pcol, w)))


def _block_keep(b: _Body, form: BlockSparse, jrow, pcol) -> str:
    """[N, S] keep of a block-sparse form: lookup tables over key-block index and block distance (size
    of the largest listed index + 1, the last entry False), gathered with the indices clamped."""
    blk = b.const(form.block, np.int64)
    qb, kb = b.op("Div", pcol, blk), b.op("Div", jrow, blk)
    vl = len(form.verticals) and max(form.verticals) + 1
    vlut = np.zeros(vl + 1, dtype=bool)
    vlut[list(form.verticals)] = True
    vert = b.op("Gather", b.const(vlut, bool), b.op("Min", kb, b.const(vl, np.int64)), axis=0)
    sl = max(form.slashes) + 1
    slut = np.zeros(sl + 1, dtype=bool)
    slut[list(form.slashes)] = True
    diag = b.op("Sub", qb, kb)
    sentinel = b.const(sl, np.int64)
    idx = b.op("Where", b.op("Less", diag, b.const(0, np.int64)), sentinel, b.op("Min", diag, sentinel))
    slash = b.op("Gather", b.const(slut, bool), idx, axis=0)
    return b.op("Or", vert, slash)


def _linear_groups(b: _Body, cfg: _SiteConfig, forms, jrow: str, pcol: str, causal: str, out: str = "Y") -> None:
    """Y = the Attention output "YA" with every Linear group's heads replaced by the hybrid, written out
    exactly as runtime.linear's reference (quadratic in the length; the window/linear split from
    positions, so the length stays dynamic):
        m = max over exact keys of s;  w = exp(s - m) on exact keys, c * kappa on the linear ones
        taylor2: kappa = 1 + s + s^2 / 2, c = exp(-m);  hedgehog: kappa = gain * phi_q(q) . phi_k(k)
        Y_g = (w V) / sum(w)
    (into `out`; positions and `causal` broadcast against the [B, r, N, S] scores, per row for a padded site)"""
    from attnforge.runtime.linear import maps_for

    r = cfg.heads // cfg.kv_heads
    axis1 = b.const([1], np.int64)
    last = b.const([-1], np.int64)
    neg_inf, zero_f = b.const(-np.inf, np.float32), b.const(0.0, np.float32)
    parts = []
    for gi, form in enumerate(forms):
        ya = b.op("Slice", "YA", b.const([gi * r], np.int64), b.const([(gi + 1) * r], np.int64), axis1)
        if not isinstance(form, Linear):
            parts.append(ya)
            continue
        qg = b.op("Cast", b.op("Slice", "Q", b.const([gi * r], np.int64), b.const([(gi + 1) * r], np.int64), axis1), to=1)
        kg = b.op("Cast", b.op("Slice", "K", b.const([gi], np.int64), b.const([gi + 1], np.int64), axis1), to=1)
        vg = b.op("Cast", b.op("Slice", "V", b.const([gi], np.int64), b.const([gi + 1], np.int64), axis1), to=1)
        sc = b.op("Mul", b.op("MatMul", qg, b.op("Transpose", kg, perm=[0, 1, 3, 2])),
                  b.const(cfg.scale, np.float32))                                   # [B, r, N, S]
        inwin = b.op("Or", b.op("Less", jrow, b.const(form.sink, np.int64)),
                     b.op("Greater", jrow, b.op("Sub", pcol, b.const(form.window, np.int64))))
        exact = b.op("And", causal, inwin)                                          # [N, S]
        lin = b.op("And", causal, b.op("Not", inwin))
        m = b.op("ReduceMax", b.op("Where", exact, sc, neg_inf), last, keepdims=1)
        w_exact = b.op("Where", exact, b.op("Exp", b.op("Sub", sc, m)), zero_f)
        if form.feature_map == "taylor2":
            poly = b.op("Add", b.op("Add", b.const(1.0, np.float32), sc),
                        b.op("Mul", b.const(0.5, np.float32), b.op("Mul", sc, sc)))
            kappa = b.op("Mul", poly, b.op("Exp", b.op("Neg", m)))
        else:
            fm = maps_for(form.maps)

            def phi(x, w):
                y = b.op("MatMul", x, b.const(w.numpy().astype(np.float32), np.float32))
                return b.op("Softmax", b.op("Concat", y, b.op("Neg", y), axis=-1), axis=-1)

            kappa = b.op("Mul", b.op("MatMul", phi(qg, fm.wq), b.op("Transpose", phi(kg, fm.wk), perm=[0, 1, 3, 2])),
                         b.const(fm.gain, np.float32))
        w = b.op("Add", w_exact, b.op("Where", lin, kappa, zero_f))
        yg = b.op("Div", b.op("MatMul", w, vg), b.op("ReduceSum", w, last, keepdims=1))
        parts.append(b.op("CastLike", yg, ya))
    b.nodes.append(b.helper.make_node("Concat", parts, [out], axis=1))


def _group_keeps(b: _Body, forms, causal: str, jrow: str, pcol: str, length: str) -> list[str]:
    """One keep per KV group (the form's rule on top of `causal`), in the positions' broadcast shape."""
    groups = []
    for form in map(prefill_form, forms):       # KV-compressed forms prefill densely
        if isinstance(form, (Dense, Linear)):   # (a Linear group is replaced by the hybrid's own decomposition)
            groups.append(causal)
        elif isinstance(form, (SinkWindow, ElasticWindow)):
            groups.append(b.op("And", causal, _window_keep(b, form, jrow, pcol, length)))
        elif isinstance(form, BlockSparse):
            groups.append(b.op("And", causal, _block_keep(b, form, jrow, pcol)))
        else:
            raise ExportError(f"form {form.kind!r} has no ONNX decomposition yet; export a plan "
                              "without it (search with that candidate off)")
    return groups


def _padded_keep(b: _Body, cfg: _SiteConfig, forms, n1: str, s1: str):
    """A padded site's [B, H or 1, N, S] keep from the [B, S] flags "P": every position is a rank among the
    row's tokens (CumSum), so causality, windows (an elastic span from the row's own length) and block
    tables act at the row's own positions, as runtime.padding computes them; returns (keep, the [B, 1, N, 1]
    real-query flags, key ranks, query ranks, the causal keep), the ranks and causal keep for _linear_groups."""
    real = b.op("Cast", "P", to=9)                                              # [B, S] bool
    tokens = b.op("Cast", real, to=7)
    one = b.const(1, np.int64)
    rank = b.op("Sub", b.op("CumSum", tokens, b.const(1, np.int64)), one)     # [B, S]: the row's position
    start = b.op("Sub", s1, n1)                                                 # queries: the last N slots
    axis1 = b.const([1], np.int64)
    q_rank = b.op("Slice", rank, start, s1, axis1)
    q_real = b.op("Unsqueeze", b.op("Slice", real, start, s1, axis1), b.const([1, 3], np.int64))   # [B, 1, N, 1]
    jrow = b.op("Unsqueeze", rank, b.const([1, 2], np.int64))                  # [B, 1, 1, S]
    pcol = b.op("Unsqueeze", q_rank, b.const([1, 3], np.int64))                # [B, 1, N, 1]
    keep = b.op("And", b.op("Unsqueeze", real, b.const([1, 2], np.int64)), q_real)    # [B, 1, N, S]
    if cfg.causal:
        keep = b.op("And", keep, b.op("LessOrEqual", jrow, pcol))
    causal = keep
    if forms:
        length = b.op("ReduceSum", tokens, axis1, keepdims=1)                   # [B, 1]: the row's length
        length = b.op("Unsqueeze", length, b.const([2, 3], np.int64))          # [B, 1, 1, 1]
        keep = _heads_keep(b, cfg, _group_keeps(b, forms, causal, jrow, pcol, length), n1, s1)
    return keep, q_real, jrow, pcol, causal


def _heads_keep(b: _Body, cfg: _SiteConfig, groups: list[str], n1: str, s1: str) -> str:
    """The KV groups' keeps (each [B or 1, 1, N, S]) as one per query head: [B or 1, H, N, S]."""
    per_group = b.op("Concat", *groups, axis=1)                                 # [B, G, N, S]
    expanded = b.op("Expand", b.op("Unsqueeze", per_group, b.const([2], np.int64)),
                    b.const([1, 1, cfg.heads // cfg.kv_heads, 1, 1], np.int64))   # [B, G, r, N, S]
    return b.op("Reshape", expanded, b.op("Concat", b.const([0, -1], np.int64), n1, s1, axis=0))


def _function(cfg: _SiteConfig, name: str):
    from onnx import helper

    b = _Body()
    inputs = ["Q", "K", "V"] + (["M"] if cfg.mask else []) + (["P"] if cfg.padded else [])
    forms = forms_from_json(cfg.forms)
    keep = q_real = None
    if cfg.padded:
        n1, s1 = b.op("Shape", "Q", start=2, end=3), b.op("Shape", "K", start=2, end=3)
        keep, q_real, jrow, pcol, causal = _padded_keep(b, cfg, forms, n1, s1)
    elif cfg.causal or cfg.window or forms:
        n1 = b.op("Shape", "Q", start=2, end=3)
        s1 = b.op("Shape", "K", start=2, end=3)
        n, s = b.op("Squeeze", n1), b.op("Squeeze", s1)
        zero, one = b.const(0, np.int64), b.const(1, np.int64)
        i = b.op("Range", zero, n, one)
        jrow = b.op("Unsqueeze", b.op("Range", zero, s, one), b.const([0], np.int64))
        icol = b.op("Unsqueeze", i, b.const([1], np.int64))
        if cfg.causal or cfg.window:
            keep = b.op("LessOrEqual", jrow, icol) if cfg.causal else None
            if cfg.window:
                inside = b.op("Greater", jrow, b.op("Sub", icol, b.const(cfg.window, np.int64)))
                keep = inside if keep is None else b.op("And", keep, inside)
            keep = b.op("Unsqueeze", keep, b.const([0, 1], np.int64))            # [1, 1, N, S]
        if forms:
            pcol = b.op("Unsqueeze", b.op("Add", i, b.op("Sub", s, n)), b.const([1], np.int64))
            causal = b.op("LessOrEqual", jrow, pcol)
            groups = [b.op("Unsqueeze", g, b.const([0, 1], np.int64))            # [1, 1, N, S] each
                      for g in _group_keeps(b, forms, causal, jrow, pcol, s)]
            fk = _heads_keep(b, cfg, groups, n1, s1)                              # [1, H, N, S]
            keep = fk if keep is None else b.op("And", keep, fk)
    mask = keep
    if cfg.mask == "bool":
        mask = "M" if keep is None else b.op("And", keep, "M")
    elif cfg.mask == "float":
        mask = "M" if keep is None else b.op("Where", keep, "M",
                                              b.op("CastLike", b.const(-np.inf, np.float32), "M"))
    if q_real is not None:              # padding queries attend to everything here (no empty softmax), zeroed below
        mask = b.op("Or", mask, b.op("Not", q_real))
    linear = [gi for gi, f in enumerate(forms) if isinstance(f, Linear)]
    out = "Y" if q_real is None else "Y0"
    # ONNX Runtime's Attention soft-caps the scaled scores, then applies the mask (boolean or additive): the
    # order Gemma 2 and the attention op compute them in (tests/test_softcap.py checks it)
    cap = {"softcap": cfg.softcap} if cfg.softcap else {}
    b.nodes.append(helper.make_node("Attention", ["Q", "K", "V"] + ([mask] if mask else []),
                                    ["YA" if linear else out], scale=cfg.scale, **cap))
    if linear:
        _linear_groups(b, cfg, forms, jrow, pcol, causal, out)
    if q_real is not None:              # zeros at padding queries, as the attention op writes them
        b.nodes.append(helper.make_node("Where", [q_real, out, b.op("CastLike", b.const(0.0, np.float32), out)],
                                        ["Y"]))
    return helper.make_function(DOMAIN, name, inputs, ["Y"], b.nodes,
                                [helper.make_opsetid("", OPSET)], [],
                                doc_string=f"attnforge site function: {cfg.forms or 'dense'}; causal={cfg.causal}, "
                                           f"window={cfg.window}, scale={cfg.scale}, mask={cfg.mask}, "
                                           f"padded={cfg.padded}" + (f", softcap={cfg.softcap}" if cfg.softcap else ""))


def _check_no_square_constants(model, lengths) -> None:
    """Refuse a file holding a constant whose last two dims are a sequence length (an N x N mask)."""
    from onnx import numpy_helper

    def shapes():
        for t in model.graph.initializer:
            yield t.name, tuple(t.dims)
        for f in [model.graph, *model.functions]:
            for nd in f.node:
                if nd.op_type == "Constant":
                    for a in nd.attribute:
                        if a.name == "value":
                            yield nd.name or nd.output[0], tuple(numpy_helper.to_array(a.t).shape)

    for name, dims in shapes():
        if len(dims) >= 2 and dims[-1] == dims[-2] and dims[-1] in lengths:
            raise ExportError(f"the exported file holds a constant {name} of shape {dims}, an N x N mask for "
                              "the example length; the sequence length would not stay dynamic")


# ------------------------------------------------------------------------------------ export
def export_onnx(model, example_inputs, path, plan=None, *, dynamic=None, check: bool = True) -> ExportResult:
    """Export `model` running `plan` (None: every site dense) to an ONNX file at `path`.

    example_inputs: a tuple of tensors (token ids [B, N] for text models; with an attention_mask, a padded
    batch). dynamic: {input index: {dim: name}} (default: the sequence dim of every 2-D integer input, and
    its batch dim where the example has two rows or more: a batch of one is specialized by torch.export).
    Returns an ExportResult naming each site's function and every attention the passes left untouched
    (with the reason)."""
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs the onnx extra: pip install 'attnforge[onnx]'") from e
    from .plan import Plan

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    plan = original = Plan.load(plan) if isinstance(plan, (str, Path)) else plan
    with _padding_masks(model):
        return _export(model, example_inputs, path, plan, original, dynamic, check, onnx)


@contextlib.contextmanager
def _padding_masks(model):
    """A Hugging Face SDPA model builds its padding masks through attnforge's op while it is captured
    (compiler.hf: the same values), so that an attention_mask among the inputs makes padded sites, which the
    file runs from the [B, S] flags; switched back afterwards."""
    from .hf import uses_padding_masks

    switched = uses_padding_masks(model)
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation("sdpa")


def _export(model, example_inputs, path, plan, original, dynamic, check, onnx) -> ExportResult:
    from .backend import Backend

    if plan is not None:
        # The plan was searched on the graph torch.compile sees (static lengths, where a mask that is
        # only causal structure is lifted). Check it against that; the dynamic graph may keep such a
        # mask as the model wrote it (exact either way), which changes the fingerprint, not the sites.
        from .api import find_attention
        from .plan import fingerprint

        plan.check(find_attention(model, example_inputs))
    gm, shapes, dynamic, bounds = _capture(model, example_inputs, dynamic)
    if plan is not None:
        from attnforge.passes import detect

        plan = dataclasses.replace(plan, fingerprint=fingerprint(detect(gm)[0]))
    backend = Backend(plan=plan, impl="reference", compiler="eager")
    gm, record = backend.transform(gm)
    declined = [{"node": d.node, "module": d.module_path, "reason": d.reason} for d in record.declined]
    if not record.sites:
        raise ExportError(f"no attention found in {type(model).__name__} to export with a plan; "
                          "`attnforge detect` lists what was declined and why")
    configs, sites = _rewrite_for_export(gm)
    gm.eval()
    try:
        program = torch.onnx.export(gm, example_inputs, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=shapes, verbose=False, report=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed after the attention rewrite: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''} — run with plan=None to see whether the "
                          "model exports at all, and report the failing node") from e
    proto = program.model_proto
    present = {fn.name for fn in proto.functions if fn.domain == DOMAIN}
    for name, cfg in sorted(configs.items()):
        if name not in present:
            proto.functions.append(_function(cfg, name))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    meta = {"attnforge.plan": json.dumps(original.to_dict()) if original is not None else "dense",
            "attnforge.sites": json.dumps(sites), "attnforge.declined": json.dumps(declined)}
    from attnforge import __version__

    meta["attnforge.version"] = __version__
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    lengths = {int(x.shape[d]) for i, x in enumerate(example_inputs) for d in dynamic.get(i, {})}
    _check_no_square_constants(proto, lengths)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    diff = None
    if check:
        onnx.checker.check_model(str(path), full_check=True)
        diff = _run_example(path, gm, example_inputs)
    return ExportResult(str(path), sites, declined, sorted(configs),
                        dynamic={str(i): {str(d): {"name": n, "range": list(bounds.get(n, (2, None)))}
                                          for d, n in ax.items()} for i, ax in dynamic.items()},
                        ort_max_abs_diff=diff)


def _run_example(path, gm, example_inputs) -> float | None:
    """Run the written file in ONNX Runtime on the example inputs and compare every output with the
    PyTorch run of the same graph (the plan through the reference): a file that loads and checks but
    fails or differs at run time is an ExportError here, not at the user's first inference. Returns the
    largest |difference|, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import numpy as np

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), example_inputs)}
        got = sess.run(None, feeds)
    except Exception as e:
        raise ExportError(f"the exported file {path} does not run in ONNX Runtime {ort.__version__} on the example "
                          f"inputs: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — report it with "
                          "the model; export_onnx(..., check=False) writes the file without this run") from e
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(gm(*example_inputs)) if isinstance(t, torch.Tensor)]
    diff = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        b = b.detach().float().cpu().numpy()
        if a.shape != b.shape:
            raise ExportError(f"output {i} of the exported file has shape {a.shape}, the PyTorch run {b.shape}")
        d = float(np.abs(a.astype(np.float32) - b).max()) if a.size else 0.0
        if not d <= 1e-3 * max(1.0, float(np.abs(b).max()) if b.size else 1.0):
            raise ExportError(f"output {i} of the exported file differs from the PyTorch run of the same plan by "
                              f"{d:.3g} on the example inputs — report it with the model and plan")
        diff = max(diff, d)
    return diff
