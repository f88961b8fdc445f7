"""Mask lifting: recognise a mask tensor that is really just causal or sliding-window structure.

A mask whose subgraph reads no graph input is a pure function of the graph's static shapes: Hugging
Face builds its causal mask that way, from `arange` comparisons; GPT-style models slice a `triu`/`tril`
buffer. Module buffers count as constants here (what the model registered, not what the caller passes).
Such a mask is evaluated once and compared with the causal and sliding-window patterns exactly. Only an
exact match lifts (the site then carries causal / window and no mask tensor); anything else stays an
exact mask. Symbolic lengths are never evaluated.
"""
from __future__ import annotations

import torch
from torch import fx

from .transforms import Operand, apply_transforms

__all__ = ["buffer_value", "constant_value", "keep_from_additive", "mask_structure", "operand_value"]

MAX_SUBGRAPH = 256


def buffer_value(node: fx.Node) -> torch.Tensor | None:
    """The tensor of a module buffer read by `node` (a Dynamo placeholder or an FX get_attr); else None."""
    if node.op == "get_attr":
        root = node.graph.owning_module
        try:
            value = root.get_buffer(node.target)
        except (AttributeError, TypeError):
            return None
        return value
    if node.op == "placeholder":
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else source
        if "._buffers[" in str(source):
            example = getattr(grapharg, "example", None)
            return example if isinstance(example, torch.Tensor) else None
    return None


def constant_value(node: fx.Node):
    """The value of `node` if its subgraph reads only constants and buffers and is small and pure."""
    seen, stack, buffers = set(), [node], {}
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            value = buffer_value(n)
            if value is None:
                return None
            buffers[n] = value
            continue
        if n.op == "call_module" or n.is_impure() or len(seen) > MAX_SUBGRAPH:
            return None
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = []
    for n in node.graph.nodes:             # graph order is a topological order
        if n in buffers:
            env[n] = graph.placeholder(n.name)
            inputs.append(buffers[n])
        elif n in seen:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily(), torch.no_grad():
            return fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    except Exception:
        return None


def operand_value(operand: Operand, graph: fx.Graph):
    """An operand's evaluated value (its node's constant value with its transforms), or None."""
    nodes = {n.name: n for n in graph.nodes}
    values = {}
    for name in operand.node_refs():
        value = constant_value(nodes[name])
        if value is None:
            return None
        values[name] = value
    try:
        return apply_transforms(values[operand.node], operand.ops, values.__getitem__)
    except Exception:
        return None


def mask_structure(keep: torch.Tensor | None, n: int | None, s: int | None) -> tuple[str, int] | None:
    """('none', 0), ('causal', 0) or ('window', w) when a keep-mask (True = attend) is exactly that
    structure for every batch and head; None otherwise."""
    if keep is None or n is None or s is None or keep.dtype != torch.bool or keep.dim() > 4:
        return None
    if tuple(keep.shape[-2:]) not in ((n, s), (1, s), (n, 1), (1, 1)):
        return None
    keep = keep.expand(*keep.shape[:-2], n, s)
    if bool(keep.all()):
        return "none", 0
    rows = torch.arange(n, device=keep.device)[:, None]
    cols = torch.arange(s, device=keep.device)[None, :]
    if bool((keep == (cols <= rows)).all()):
        return "causal", 0
    window = int(keep[(0,) * (keep.dim() - 2)][-1].sum())
    if 0 < window < s and bool((keep == ((cols <= rows) & (cols > rows - window))).all()):
        return "window", window
    return None


def keep_from_additive(value: torch.Tensor) -> torch.Tensor | None:
    """The keep-mask of an additive mask that only holds 0 and 'minus infinity' (<= finfo.min / 2)."""
    if not value.is_floating_point():
        return None
    keep = value > torch.finfo(value.dtype).min / 2
    if bool((value[keep] != 0).any()):
        return None                     # a real bias, not only structure
    return keep
