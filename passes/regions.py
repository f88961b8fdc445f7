"""Attention inside activation-checkpointed regions.

With gradient checkpointing (Hugging Face's `gradient_checkpointing_enable()`, or torch.utils.checkpoint
around a block), Dynamo captures each checkpointed call as one higher-order op whose body is a sub-graph,

    out = tag_activation_checkpoint(wrap_body_0, x, weight, ..., mask, use_reentrant=False)

so the top-level graph holds no attention at all: the passes must look inside. `bodies(gm)` lists those
sub-graphs; every pass then runs on each of them as on the top-level graph (the body's own nodes carry the
model's module paths, so site ids are the same as without checkpointing), and the region recomputes the
rewritten attention in the backward as it would have recomputed the model's.

One thing is lost at the boundary: a padded batch's mask is built outside the region (attnforge's
padding_mask op, compiler.hf) and handed in as a plain tensor, where the detector cannot read it.
`lift_padding` passes the [B, S] padding vector into the region instead of the mask and rebuilds the mask
from it inside (the same op, so the detector sees a padded site, or a causal one where the vector is all
ones by construction; the rewrite then drops the mask, so the N x S mask is built nowhere).
"""
from __future__ import annotations

import torch
from torch import fx

__all__ = ["bodies", "graphs", "detect_regions", "flatten", "lift_padding"]


def _checkpoint_ops() -> tuple:
    ops = []
    for name in ("tag_activation_checkpoint", "wrap"):
        op = getattr(torch.ops.higher_order, name, None)
        if op is not None:
            ops.append(op)
    return tuple(ops)


def bodies(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.GraphModule, fx.GraphModule]]:
    """(the higher-order call, the graph module holding it, its body) for every checkpointed (or wrapped)
    region of `gm`, nested regions included (outermost first)."""
    ops = _checkpoint_ops()
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops or not node.args:
            continue
        body = node.args[0]
        if not (isinstance(body, fx.Node) and body.op == "get_attr"):
            continue
        sub = getattr(gm, body.target, None)
        if isinstance(sub, fx.GraphModule):
            found.append((node, gm, sub))
            found += bodies(sub)
    return found


def graphs(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """`gm` and the body of every region in it: each graph the passes run on."""
    return [gm] + [body for _, _, body in bodies(gm)]


def _meta(node):
    return node.meta.get("example_value", node.meta.get("val"))


def _same_length(q_length: fx.Node, padding: fx.Node) -> bool:
    """Whether a symbolic query length is the padding vector's own length (self-attention)."""
    n, s = _meta(q_length), getattr(_meta(padding), "shape", (None, None))[1]
    return n is not None and s is not None and str(n) == str(s)


def lift_padding(gm: fx.GraphModule) -> int:
    """Give every region whose operand is attnforge's padding mask the padding vector itself, and rebuild the
    mask from it inside the region (see the module docstring). Returns how many masks were rebuilt."""
    import attnforge.runtime  # noqa: F401  (registers torch.ops.attnforge.padding_mask)
    from .detect import _all_ones

    op = torch.ops.attnforge.padding_mask
    lifted = 0
    for call, owner, body in bodies(gm):
        inner = [n for n in body.graph.nodes if n.op == "placeholder"]
        operands = list(call.args[1:])
        shared = sum(1 for n in owner.graph.nodes if n.op == "get_attr" and n.target == call.args[0].target) > 1
        if len(operands) != len(inner) or shared or len(call.args[0].users) > 1:
            continue                         # not a plain operand -> placeholder correspondence of one call
        dropped, added = set(), []
        for i, (placeholder, operand) in enumerate(zip(inner, operands)):
            if not (isinstance(operand, fx.Node) and operand.op == "call_function"
                    and operand.target in (op, op.default) and placeholder.users):
                continue
            padding, q_length, causal = (tuple(operand.args) + (None,) * 3)[:3]
            if not isinstance(padding, fx.Node) or not isinstance(causal, bool) or \
                    (isinstance(q_length, fx.Node) and not _same_length(q_length, padding)):
                continue
            graph = body.graph
            with graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1]):
                vector = graph.placeholder(f"{padding.name}_attnforge_padding")
            vector.meta["example_value"] = _meta(padding)
            anchor, flags, length = vector, vector, q_length
            if isinstance(q_length, fx.Node):            # the same symbol, read from the vector inside
                with graph.inserting_after(anchor):
                    anchor = length = graph.call_method("size", (vector, 1))
                length.meta["example_value"] = _meta(q_length)
            if _all_ones(padding):                       # ones by construction outside: say so inside
                with graph.inserting_after(anchor):
                    anchor = flags = graph.call_function(torch.ones_like, (vector,))
                flags.meta["example_value"] = _meta(padding)
            with graph.inserting_after(anchor):
                mask = graph.call_function(op.default, (flags, length, causal))
            mask.meta.update({k: v for k, v in placeholder.meta.items() if k != "nn_module_stack"})
            placeholder.replace_all_uses_with(mask)
            graph.erase_node(placeholder)      # the region no longer takes the N x S mask
            dropped.add(i)
            added.append(padding)
            lifted += 1
        if added:
            call.args = (call.args[0], *(a for i, a in enumerate(operands) if i not in dropped), *added)
            for i in dropped:
                if not operands[i].users:
                    owner.graph.erase_node(operands[i])
            body.graph.lint()
            body.recompile()
            owner.graph.lint()
            owner.recompile()
    return lifted


def detect_regions(gm: fx.GraphModule) -> tuple[list[fx.GraphModule], list[tuple[list, list]]]:
    """([gm, every region's body], detect()'s (sites, declined) for each), the padding lifted into the regions
    first (which changes only how the regions receive their masks)."""
    from .detect import detect

    lift_padding(gm)
    every = graphs(gm)
    return every, [detect(g) for g in every]


def flatten(found: list[tuple[list, list]]) -> tuple[list, list]:
    """detect_regions' per-graph (sites, declined) as one list of sites and one of declines."""
    return [s for sites, _ in found for s in sites], [d for _, declined in found for d in declined]
