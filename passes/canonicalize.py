"""Rewrite each detected site into one call of torch.ops.attnforge.attention.

Before (one site, eager Llama spelling):
    kt = k_rep.transpose(2, 3); s = matmul(q, kt) * 0.125; s = s + mask; p = softmax(s, -1, float32)
    p = p.to(float32); out = matmul(p, v_rep)            # k_rep / v_rep: repeat_kv(k) / repeat_kv(v)
After:
    out = torch.ops.attnforge.attention(q, k, v, mask, False, 0.125, "auto", "<kernel key>")

K and V enter unexpanded (GQA). If the original output dtype differs from q's, a cast restores it.
Nodes of the old chain that nothing uses any more are erased; q, k, v, mask and anything with other
users stay. Invariants: the graph lints after the pass, no node is left without its producer, and a
site whose nodes are gone (already rewritten) is skipped, not rewritten twice.
"""
from __future__ import annotations

import torch
from torch import fx

import attnforge.runtime  # noqa: F401  (registers torch.ops.attnforge.attention)

from . import match as M
from .site import AttentionSite

__all__ = ["canonicalize", "ATTENTION_OP"]

ATTENTION_OP = torch.ops.attnforge.attention.default


def _erase_dead_ancestors(graph: fx.Graph, node: fx.Node, keep: set[fx.Node]) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n in keep or n.users or n.op in ("placeholder", "output", "get_attr") or n.is_impure():
            continue
        inputs = [a for a in n.all_input_nodes]
        graph.erase_node(n)
        stack.extend(inputs)


def canonicalize(gm: fx.GraphModule, sites: list[AttentionSite], impl: str = "auto",
                 kernels: dict[str, str] | None = None) -> tuple[fx.GraphModule, bool]:
    """Replace each site's output with the attnforge op. `kernels`: site id -> generated kernel key."""
    kernels = kernels or {}
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = False
    for site in sites:
        out = nodes.get(site.output)
        q, k, v = nodes.get(site.q), nodes.get(site.k), nodes.get(site.v)
        mask = nodes.get(site.mask_node) if site.mask_node else None
        if out is None or None in (q, k, v) or (site.mask_node and mask is None) or out.target is ATTENTION_OP:
            continue
        args = (q, k, v, mask, site.causal, site.scale, impl, kernels.get(site.id, ""))
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(ATTENTION_OP, args)
            new.meta.update({k_: v_ for k_, v_ in out.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
            new.meta["attnforge_site"] = site.id
            result = new
            out_val, q_val = M.meta(out), M.meta(q)
            if out_val is not None and q_val is not None and out_val.dtype != q_val.dtype:
                result = gm.graph.call_method("to", (new, out_val.dtype))
            if "example_value" in out.meta:
                result.meta["example_value"] = out.meta["example_value"]
        out.replace_all_uses_with(result)
        _erase_dead_ancestors(gm.graph, out, keep={q, k, v} | ({mask} if mask is not None else set()))
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm, changed
