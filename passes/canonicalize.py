"""Rewrite each detected site into one call of torch.ops.attnforge.attention.

Before (one site, eager Llama spelling):
    kt = k_rep.transpose(2, 3); s = matmul(q, kt) * 0.125; s = s + mask; p = softmax(s, -1, float32)
    p = p.to(float32); out = matmul(p, v_rep)            # k_rep / v_rep: repeat_kv(k) / repeat_kv(v)
After:
    out = torch.ops.attnforge.attention(q, k, v, mask, False, 0, 0.125, "auto", "<kernel key>")

q, k, v and the mask enter through their operands' transforms (permutes, a heads dim for 3-D inputs, a
temperature moved onto q, a keep-mask from masked_fill); the op's [B, H, N, Dv] result goes through the
site's output transforms back to the layout the graph expected. K and V enter unexpanded (GQA). If the
original output dtype differs, a cast restores it. Nodes of the old chain that nothing uses any more are
erased; inputs and anything with other users stay. Invariants: the graph lints after the pass, and a site
whose nodes are gone (already rewritten) is skipped, not rewritten twice.
"""
from __future__ import annotations

import torch
from torch import fx

import attnforge.runtime  # noqa: F401  (registers torch.ops.attnforge.attention)
import attnforge.runtime.profiling  # noqa: F401  (registers torch.ops.attnforge.attention_profile)

from . import match as M
from .decompose import encoder_layer_forward, mha_forward
from .detect import _MHA_ARGS, _MHA_DEFAULTS, _TEL_ARGS, call_args
from .site import AttentionSite
from .transforms import TRANSFORMS, Operand

__all__ = ["canonicalize", "ATTENTION_OP"]

ATTENTION_OP = torch.ops.attnforge.attention.default
PROFILE_OP = torch.ops.attnforge.attention_profile.default


def _softcap_kwargs(site: AttentionSite) -> dict:
    """The op's softcap keyword where the site's scores are soft-capped (absent otherwise: graphs unchanged)."""
    return {"softcap": site.softcap} if site.softcap else {}


def _erase_dead_ancestors(graph: fx.Graph, node: fx.Node, keep: set[fx.Node]) -> None:
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n in keep or n.users or n.op in ("placeholder", "output", "get_attr") or n.is_impure():
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def _apply(graph: fx.Graph, x: fx.Node, ops, nodes) -> fx.Node:
    for name, *args in ops:
        args = [nodes[a[1:]] if isinstance(a, str) and a.startswith("%") else a for a in args]
        x = graph.call_function(TRANSFORMS[name], (x, *args))
    return x


def _materialize(graph: fx.Graph, operand: Operand | None, nodes) -> fx.Node | None:
    if operand is None:
        return None
    return _apply(graph, nodes[operand.node], operand.ops, nodes)


def _decompose(graph: fx.Graph, node: fx.Node, site: AttentionSite, impl: str, kernel: str) -> None:
    """Replace an opaque MHA / fused encoder-layer call by its decomposition (same arguments)."""
    if site.spelling == "mha":
        a = call_args(node, _MHA_ARGS, _MHA_DEFAULTS)
        sep = a["use_separate_proj_weight"]
        args = (a["query"], a["key"], a["value"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
                a["out_proj_weight"], a["out_proj_bias"], a["key_padding_mask"], a["attn_mask"],
                a["q_proj_weight"] if sep else None, a["k_proj_weight"] if sep else None,
                a["v_proj_weight"] if sep else None, a["is_causal"], a["need_weights"], impl, kernel)
        fn = mha_forward
    else:
        a = call_args(node, _TEL_ARGS)
        args = tuple(a[k] for k in _TEL_ARGS if k not in ("embed_dim", "mask", "mask_type")) + (impl, kernel)
        fn = encoder_layer_forward
    with graph.inserting_before(node):
        new = graph.call_function(fn, args)
    new.meta.update(node.meta)
    new.meta["attnforge_site"] = site.id
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def canonicalize(gm: fx.GraphModule, sites: list[AttentionSite], impl: str = "auto",
                 kernels: dict[str, str] | None = None, profile_block: int = 0) -> tuple[fx.GraphModule, bool]:
    """Replace each site's output with the attnforge op. `kernels`: site id -> generated kernel key.
    profile_block > 0: use the profiling op instead (dense; its backward measures influence per block)."""
    kernels = kernels or {}
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = False
    for site in sites:
        out = nodes.get(site.output)
        operands = [o for o in (site.q, site.k, site.v, site.mask_operand, site.padding) if o is not None]
        refs = [r for o in operands for r in o.node_refs()]
        if out is None or out.target in (ATTENTION_OP, PROFILE_OP) or any(r not in nodes for r in refs):
            continue
        if profile_block and site.spelling in ("mha", "encoder_layer"):
            continue                       # opaque decompositions are not profiled
        if site.spelling in ("mha", "encoder_layer"):
            _decompose(gm.graph, out, site, impl, kernels.get(site.id, ""))
            changed = True
            continue
        with gm.graph.inserting_before(out):
            q, k, v, mask = (_materialize(gm.graph, o, nodes) for o in (site.q, site.k, site.v, site.mask_operand))
            if profile_block:
                # profiling keeps a padded site's exact mask (calibration windows are not padded anyway)
                new = gm.graph.call_function(PROFILE_OP, (q, k, v, mask, site.causal and site.mask != "padding",
                                                          site.window, site.scale, site.id, profile_block),
                                             _softcap_kwargs(site))
            elif site.padding is not None:      # a padded batch: the padding vector, the mask is never built
                padding = _materialize(gm.graph, site.padding, nodes)
                new = gm.graph.call_function(ATTENTION_OP, (q, k, v, None, site.causal, 0, site.scale, impl,
                                                            kernels.get(site.id, ""), "", padding),
                                             _softcap_kwargs(site))
            else:
                new = gm.graph.call_function(ATTENTION_OP, (q, k, v, mask, site.causal, site.window, site.scale,
                                                            impl, kernels.get(site.id, "")), _softcap_kwargs(site))
            new.meta.update({k_: v_ for k_, v_ in out.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
            new.meta["attnforge_site"] = site.id
            result = _apply(gm.graph, new, site.out_ops, nodes)
            out_val, q_val = M.meta(out), M.meta(nodes[site.q.node])
            if out_val is not None and q_val is not None and out_val.dtype != q_val.dtype:
                result = gm.graph.call_method("to", (result, out_val.dtype))
            if "example_value" in out.meta:
                result.meta["example_value"] = out.meta["example_value"]
        out.replace_all_uses_with(result)
        if site.padding is not None and not profile_block:       # the padded site does not read the mask
            refs = [r for o in (site.q, site.k, site.v, site.padding) for r in o.node_refs()]
        _erase_dead_ancestors(gm.graph, out, keep={nodes[r] for r in refs})
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm, changed
