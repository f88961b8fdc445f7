"""Mask lifting: recognise a mask tensor that is really just the causal structure.

A mask whose subgraph reads no graph input (no placeholder, no attribute) is a pure function of the
graph's static shapes: Hugging Face builds its causal mask that way, from `arange` comparisons. Such a
mask is evaluated once, here, and compared with the causal pattern exactly. Only an exact match lifts
(the site then runs with causal=True and no mask tensor); anything else stays an exact mask.
"""
from __future__ import annotations

import torch
from torch import fx

from . import match as M

__all__ = ["constant_mask_value", "mask_structure"]

MAX_SUBGRAPH = 256


def constant_mask_value(mask: fx.Node) -> torch.Tensor | None:
    """The value of `mask` if its subgraph depends on no input and is small and pure; else None."""
    seen, stack = set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr", "call_module") or n.is_impure() or len(seen) > MAX_SUBGRAPH:
            return None
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in mask.graph.nodes:             # graph order is a topological order
        if n in seen:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[mask])
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily(), torch.no_grad():
            value = fx.GraphModule(torch.nn.Module(), graph)()
    except Exception:
        return None
    return value if isinstance(value, torch.Tensor) else None


def mask_structure(mask: fx.Node, q_len, kv_len) -> str | None:
    """'causal' or 'none' when the mask is exactly that structure for these (static) lengths; else None."""
    n, s = M.static_int(q_len), M.static_int(kv_len)
    if n is None or s is None:
        return None
    value = constant_mask_value(mask)
    if value is None or value.dim() > 4 or tuple(value.shape[-2:]) not in ((n, s), (1, s), (n, 1), (1, 1)):
        return None
    if value.dtype == torch.bool:
        keep = value
    elif value.is_floating_point():
        keep = value > torch.finfo(value.dtype).min / 2
        if bool((value[keep] != 0).any()):
            return None                     # a real bias, not only structure
    else:
        return None
    keep = keep.expand(*keep.shape[:-2], n, s)
    if bool(keep.all()):
        return "none"
    causal = torch.ones(n, s, dtype=torch.bool, device=keep.device).tril()
    return "causal" if bool((keep == causal).all()) else None
