"""Find attention in an FX graph.

Normalize, then match one canonical form. Every spelling is read as

    out = PV(dropout?(cast?(softmax(S, dim=keys))), v)
    S   = QK(q, k) * scale [* factor] [+ additive mask] [masked by a boolean keep mask]

where QK / PV may be `matmul`, `@`, `bmm`, `baddbmm` (its bias is an additive mask, its alpha a scale)
or a two-operand `einsum`; q, k, v may come in any dim order (their permutation becomes a transform);
heads may be folded into the batch (3-D; heads stay in the batch dim); the scale may be a constant, a
value computed in the graph, or a tensor (a learned temperature) that is moved onto q; masks may be
added, `masked_fill`-ed or `where`-selected. K and V are looked through Hugging Face's `repeat_kv` and
`repeat_interleave(n, dim=1)`, so a site records the unexpanded KV heads (GQA). SDPA calls are read
directly. A mask that is only causal or sliding-window structure is lifted (see masks.py).

Every softmax and every SDPA call is a candidate; one that does not fit becomes a `Decline` naming what
did not fit, so near misses are visible. Detection never changes the graph.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
from torch import fx

from . import match as M
from .masks import keep_from_additive, mask_structure, operand_value
from .site import AttentionSite, Decline
from .transforms import Operand

__all__ = ["detect", "NotAttention"]

NEG_LARGE = -1e4          # a fill value at or below this removes a key (finfo.min, -inf, -1e9, -10000)


class NotAttention(Exception):
    """Raised inside a rule to decline a candidate; the message is the reason shown to users."""


# ------------------------------------------------------------------------------------------ helpers
def _shape(node, what: str):
    value = M.meta(node)
    if value is None:
        raise NotAttention(f"no shape information for {what} ({getattr(node, 'name', node)}); "
                           "capture through torch.compile or pass example inputs")
    return tuple(value.shape), value.dtype


def _static(x, what: str) -> int:
    value = M.static_int(x)
    if value is None:
        raise NotAttention(f"{what} is symbolic ({x}); attnforge needs it fixed")
    return value


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "nothing"
        raise NotAttention(f"{what} ({node.name}) is used by {len(users)} nodes ({names}); rewriting would "
                           "drop a value something else needs")
    return users[0]


def _constant(value, what: str, kinds):
    if isinstance(value, fx.Node) or not isinstance(value, kinds):
        raise NotAttention(f"{what} is not a constant ({value!r})")
    return value


def _operand(node: fx.Node, perm=None) -> Operand:
    if perm is None or tuple(perm) == tuple(range(len(perm))):
        return Operand(node.name)
    return Operand(node.name, (("permute", tuple(perm)),))


def _canonical_shape(shape, ops):
    shape = list(shape)
    for name, *args in ops:
        if name == "permute":
            shape = [shape[d] for d in args[0]]
        elif name == "unsqueeze":
            shape.insert(args[0] % (len(shape) + 1), 1)
        elif name == "squeeze":
            shape.pop(args[0])
    return tuple(shape)


def _peel_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(unexpanded tensor, repeat factor) for repeat_kv / repeat_interleave on dim 1; (node, 1) otherwise."""
    if M.is_call(node, {torch.reshape}, ("reshape", "view")):
        expanded = node.args[0]
        if isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand":
            inserted = expanded.args[0]
            if isinstance(inserted, fx.Node) and inserted.args and isinstance(inserted.args[0], fx.Node):
                base = inserted.args[0]
                b, e, r = M.meta(base), M.meta(expanded), M.meta(node)
                if (b is not None and e is not None and r is not None and len(b.shape) == 4
                        and len(e.shape) == 5 and len(r.shape) == 4
                        and M.same_size(e.shape[1], b.shape[1]) and M.same_size(e.shape[3], b.shape[2])
                        and M.same_size(e.shape[4], b.shape[3]) and M.same_size(r.shape[2], b.shape[2])):
                    rep, hk = M.static_int(e.shape[2]), M.static_int(b.shape[1])
                    if rep and hk and M.static_int(r.shape[1]) == hk * rep:
                        return base, rep
    if M.is_call(node, {torch.repeat_interleave}, ("repeat_interleave",)):
        base = node.args[0]
        dim = M.arg(node, 2, "dim")
        b, r = M.meta(base), M.meta(node)
        if isinstance(base, fx.Node) and b is not None and r is not None and dim in (1, -3) and len(b.shape) == 4:
            hk, hr = M.static_int(b.shape[1]), M.static_int(r.shape[1])
            if hk and hr and hr % hk == 0:
                return base, hr // hk
    return node, 1


def _not_weights(node: fx.Node, what: str) -> None:
    if node.op == "get_attr" or isinstance(M.meta(node), torch.nn.Parameter):
        raise NotAttention(f"the {what} are parameters (weights), not activations")
    grapharg = node.meta.get("grapharg") if node.op == "placeholder" else None
    source = str(getattr(getattr(grapharg, "source", None), "name", ""))
    if "._parameters[" in source:
        raise NotAttention(f"the {what} are parameters (weights), not activations")


def _very_negative(value) -> bool:
    from .masks import constant_value

    if isinstance(value, fx.Node):
        value = constant_value(value)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            return False
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value <= NEG_LARGE


# --------------------------------------------------------------------------- QK and PV products
def _parse_einsum(node: fx.Node):
    eq = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq or len(operands) != 2:
        raise NotAttention(f"einsum {eq!r} is not a two-operand contraction with an explicit output")
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    if any(len(set(x)) != len(x) for x in (a, b, out)):
        raise NotAttention(f"einsum {eq!r} repeats an index within an operand (a diagonal)")
    return a, b, out, operands


def _is_qk(node) -> bool:
    return M.is_matmul(node) or M.is_bmm(node) or M.is_baddbmm(node) or M.is_einsum(node)


def _k_from_kt(kt) -> Operand:
    """k as [.., S, D] from the right operand of q @ k^T ([.., D, S])."""
    p = M.permutation(kt)
    if p is None:
        raise NotAttention(f"the right operand of q @ k^T ({getattr(kt, 'name', kt)}) is not a transpose "
                           "of an activation")
    src, perm = p
    perm = list(perm)
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return _operand(src, perm)


def _qk(node: fx.Node):
    """(q, k, scale, bias) of a scores product; q/k are [.., N, D] / [.., S, D] operands."""
    if M.is_matmul(node) or M.is_bmm(node):
        q, k = node.args[0], _k_from_kt(node.args[1])
        return _operand(q), k, 1.0, None
    if M.is_baddbmm(node):
        bias, q, kt = node.args[0], node.args[1], node.args[2]
        beta = _constant(M.arg(node, 3, "beta", 1), "baddbmm beta", (int, float))
        alpha = _constant(M.arg(node, 4, "alpha", 1), "baddbmm alpha", (int, float))
        mask = None
        if beta != 0:
            if not isinstance(bias, fx.Node):
                raise NotAttention("baddbmm's bias is not a tensor")
            mask = Operand(bias.name) if beta == 1 else Operand(bias.name, (("scale_mask", float(beta)),))
        return _operand(q), _k_from_kt(kt), float(alpha), mask
    a, b, out, (x, y) = _parse_einsum(node)
    contracted = (set(a) & set(b)) - set(out)
    batch = [c for c in out if c in a and c in b]
    qi = [c for c in a if c not in b]
    kj = [c for c in b if c not in a]
    if len(contracted) != 1 or len(qi) != 1 or len(kj) != 1 or out != "".join(batch) + qi[0] + kj[0]:
        raise NotAttention(f"einsum '{a},{b}->{out}' is not q.k^T with scores laid out [batch.., q, k]")
    c = contracted.pop()
    q_perm = [a.index(ch) for ch in batch + qi + [c]]
    k_perm = [b.index(ch) for ch in batch + kj + [c]]
    return _operand(x, q_perm), _operand(y, k_perm), 1.0, None


def _pv(node: fx.Node, probs: fx.Node):
    """(v as [.., S, Dv], out transforms) of the probabilities @ values product."""
    if M.is_matmul(node) or M.is_bmm(node):
        if node.args[0] is not probs:
            raise NotAttention(f"the attention probabilities are the right operand of {node.name}")
        return _operand(node.args[1]), ()
    if M.is_einsum(node):
        pa, b, out, (x, y) = _parse_einsum(node)
        if x is not probs:
            raise NotAttention(f"the attention probabilities are not the first operand of {node.name}")
        batch, qi, kj = list(pa[:-2]), pa[-2], pa[-1]
        dv = [ch for ch in b if ch not in pa]
        if (len(dv) != 1 or sorted(b) != sorted(batch + [kj] + dv) or kj in out
                or sorted(out) != sorted(batch + [qi] + dv)):
            raise NotAttention(f"einsum '{pa},{b}->{out}' is not probabilities @ values")
        canon = batch + [qi] + dv
        out_perm = tuple(canon.index(ch) for ch in out)
        v = _operand(y, [b.index(ch) for ch in batch + [kj] + dv])
        return v, (() if out_perm == tuple(range(len(out))) else (("permute", out_perm),))
    raise NotAttention(f"the attention probabilities are not multiplied with values (used by {node.name})")


# ----------------------------------------------------------------------------------- score chain
def _reaches_qk(node, depth: int = 8) -> bool:
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if _is_qk(node):
            return True
        if M.is_cast(node) or M.is_mul(node) or M.is_div(node) or M.is_masked_fill(node) or M.is_tanh(node):
            node = node.args[0] if not (M.is_mul(node) and isinstance(node.args[0], (int, float))) else node.args[1]
        elif M.is_add(node):
            return any(_reaches_qk(a, depth - 1) for a in node.args[:2])
        elif M.is_where(node):
            return any(_reaches_qk(a, depth - 1) for a in node.args[1:3])
        else:
            return False
    return False


class _Scores:
    """What lies between q @ k^T and the softmax."""

    def __init__(self):
        self.scale = 1.0
        self.q_ops: list[tuple] = []
        self.masks: list[tuple[str, Operand]] = []     # ("additive" | "boolean" (a keep-mask), operand)
        self.qk: fx.Node | None = None
        self.softcap = 0.0          # cap * tanh(s / cap) between the masks (above) and q @ k^T * scale (below)


def _peel_scores(node: fx.Node, scores_rank: int) -> _Scores:
    res = _Scores()
    while not _is_qk(node):
        if res.softcap and (M.is_add(node) or M.is_masked_fill(node) or M.is_where(node)):
            raise NotAttention(f"a mask ({node.name}) is applied before the soft-cap (tanh): masked keys would keep "
                               "a finite score, which no attnforge kernel computes")
        if M.is_cast(node):
            nxt = node.args[0]
        elif M.is_tanh(node):
            # logit soft-capping, c2 * tanh(s / c1) (Gemma 2, Grok): the factors met so far (c2 and any after it)
            # are the cap, and the kernels compute C * tanh(S * qk / C) with S the product of every factor
            if res.softcap:
                raise NotAttention("the scores pass through tanh twice")
            if res.q_ops:
                raise NotAttention("the soft-capped scores are scaled by a tensor after the tanh; only a constant "
                                   "cap is supported")
            if not res.scale > 0:
                raise NotAttention(f"the soft-cap's factor after the tanh is {res.scale!r}, not a positive constant")
            res.softcap = float(res.scale)
            nxt = node.args[0]
        elif M.is_mul(node) or M.is_div(node):
            a, b = node.args[0], node.args[1]
            if M.is_mul(node) and not _reaches_qk(a) and _reaches_qk(b):
                a, b = b, a
            nxt, factor = a, b
            if isinstance(factor, (int, float)) and not isinstance(factor, bool):
                res.scale = res.scale * factor if M.is_mul(node) else res.scale / factor
            elif isinstance(factor, fx.Node):
                fv = M.meta(factor)
                if fv is not None and hasattr(fv, "shape") and len(fv.shape):
                    fshape = tuple(fv.shape)
                    if M.static_int(fshape[-1]) != 1 or (scores_rank != 4 and len(fshape) > 1):
                        raise NotAttention(f"the scores are scaled per key by {factor.name} {fshape}; only a "
                                           "factor constant over keys can be moved onto q")
                res.q_ops.append(("mul" if M.is_mul(node) else "div", "%" + factor.name))
            else:
                raise NotAttention(f"the scores are scaled by {factor!r}")
        elif M.is_add(node):
            if "alpha" in node.kwargs or len(node.args) != 2:
                raise NotAttention(f"add with alpha in the scores ({node.name})")
            a, b = node.args
            if isinstance(a, fx.Node) and _reaches_qk(a):
                nxt, mask = a, b
            elif isinstance(b, fx.Node) and _reaches_qk(b):
                nxt, mask = b, a
            else:
                raise NotAttention(f"no q @ k^T before the add {node.name}")
            if not isinstance(mask, fx.Node):
                raise NotAttention(f"a constant ({mask!r}) is added to the scores, not a mask tensor")
            rs, _ = _shape(node, "masked scores")
            ss, _ = _shape(nxt, "scores")
            if len(rs) != len(ss) or not all(M.same_size(x, y) for x, y in zip(rs, ss)):
                raise NotAttention("the mask broadcasts the scores to a larger shape")
            # factors met above this add scale the mask as much as the scores: the kernels scale q only
            if res.q_ops:
                raise NotAttention(f"the scores and the additive mask {mask.name} are scaled together by a tensor "
                                   "after the add; only a constant factor can be carried onto the mask")
            res.masks.append(("additive", Operand(mask.name, (("scale_mask", res.scale),) if res.scale != 1 else ())))
        elif M.is_masked_fill(node):
            nxt, m, value = node.args[0], M.arg(node, 1, "mask"), M.arg(node, 2, "value")
            if not isinstance(m, fx.Node) or not _very_negative(value):
                raise NotAttention(f"masked_fill with {value!r} is not a mask that removes keys")
            res.masks.append(("boolean", Operand(m.name, (("not",),))))
        elif M.is_where(node) and len(node.args) == 3:
            cond, a, b = node.args
            if isinstance(a, fx.Node) and _reaches_qk(a) and _very_negative(b):
                nxt, keep = a, Operand(cond.name)
            elif isinstance(b, fx.Node) and _reaches_qk(b) and _very_negative(a):
                nxt, keep = b, Operand(cond.name, (("not",),))
            else:
                raise NotAttention(f"where() on the scores ({node.name}) does not select between scores and a "
                                   "large negative value")
            res.masks.append(("boolean", keep))
        else:
            what = node.target if node.op != "call_module" else type(M.module_of(node)).__name__
            raise NotAttention(f"softmax input is not q @ k^T -> scale -> mask (found {what} at {node.name})")
        if not isinstance(nxt, fx.Node):
            raise NotAttention(f"{node.name} has no tensor input")
        _single_user(nxt, "the attention scores")
        node = nxt
    res.qk = node
    return res


# ------------------------------------------------------------------------------------------ sites
_ONES = {torch.ones, torch.ones_like, "new_ones", "ones_like"}
_SAME_VALUES = {"to", "bool", "contiguous", "clone", torch.Tensor.to, operator.getitem}


def _all_ones(node: fx.Node) -> bool:
    """Whether a padding vector is all ones by construction (ones_like of the ids, sliced or cast): whatever
    its size, no key is padding. (attnforge's optimize passes such a mask where Hugging Face would otherwise
    build an opaque packed-sequence mask from the positions.)"""
    for _ in range(16):
        if node.op not in ("call_function", "call_method"):
            return False
        if node.target in _ONES:
            return True
        if node.target not in _SAME_VALUES or not isinstance(node.args[0], fx.Node):
            return False
        if node.target is operator.getitem and not all(isinstance(i, slice) or i is None or i is Ellipsis
                                                       for i in (node.args[1] if isinstance(node.args[1], tuple)
                                                                 else (node.args[1],))):
            return False                 # a slice keeps ones ones; an index tensor could repeat anything
        node = node.args[0]
    return False


def _padding_of(operand: Operand, nodes) -> tuple[Operand, bool, bool] | None:
    """(the [B, S] padding vector, whether it is all ones by construction, causal) when the mask is attnforge's
    padding_mask op (compiler.hf builds Hugging Face's padding masks through it), else None."""
    import attnforge.runtime  # noqa: F401  (registers torch.ops.attnforge.padding_mask)

    node = nodes[operand.node]
    op = torch.ops.attnforge.padding_mask
    if operand.ops or node.op != "call_function" or node.target not in (op, op.default):
        return None
    padding, causal = M.arg(node, 0, "padding"), M.arg(node, 2, "causal")
    if not isinstance(padding, fx.Node) or not isinstance(causal, bool):
        return None
    return Operand(padding.name), _all_ones(padding), causal


def _lift(mask: Operand | None, additive: bool, graph: fx.Graph, n, s):
    """(mask or None, causal, window) after lifting pure causal / window structure out of `mask`."""
    if mask is None:
        return None, False, 0
    value = operand_value(mask, graph)
    if value is None:
        return mask, False, 0
    keep = keep_from_additive(value) if additive else value
    structure = mask_structure(keep, M.static_int(n), M.static_int(s))
    if structure is None:
        return mask, False, 0
    kind, window = structure
    return None, kind in ("causal", "window"), window


def _site(spelling, out, q, k, v, masks, out_ops, causal, scale, softmax_dtype, path, site_id,
          graph, softcap: float = 0.0) -> AttentionSite:
    """masks: [("additive" | "boolean", Operand)], a keep-mask for "boolean"; each is lifted on its own and
    at most one may remain a tensor."""
    nodes = {n.name: n for n in graph.nodes}
    (qs, qdt), (ks, _), (vs, _) = (_shape(nodes[o.node], name) for o, name in ((q, "q"), (k, "k"), (v, "v")))
    qs, ks, vs = _canonical_shape(qs, q.ops), _canonical_shape(ks, k.ops), _canonical_shape(vs, v.ops)
    if not (len(qs) == len(ks) == len(vs) == 4):
        raise NotAttention(f"q, k, v are not [B, H, N, D] after normalization ({len(qs)}-D, {len(ks)}-D, "
                           f"{len(vs)}-D)")
    h, hk, hv = _static(qs[1], "query heads"), _static(ks[1], "key heads"), _static(vs[1], "value heads")
    d, dk, dv = _static(qs[3], "head dim"), _static(ks[3], "key head dim"), _static(vs[3], "value head dim")
    if hk != hv or h % hk:
        raise NotAttention(f"heads do not group: {h} query, {hk} key, {hv} value heads")
    if d != dk:
        raise NotAttention(f"query head dim {d} differs from key head dim {dk}")
    if not (M.same_size(qs[0], ks[0]) and M.same_size(ks[0], vs[0])):
        raise NotAttention(f"batch sizes differ between q, k, v ({qs[0]}, {ks[0]}, {vs[0]})")
    if not M.same_size(ks[2], vs[2]):
        raise NotAttention(f"key length {ks[2]} differs from value length {vs[2]}")
    padded = _padding_of(masks[0][1], nodes) if len(masks) == 1 and not causal else None
    padding = None
    if padded is not None and padded[1] and M.same_size(qs[2], ks[2]):
        masks, causal = [], padded[2]        # no key is padding and N = S: plain (causal) attention, no mask
    elif padded is not None:                 # a padded batch: the op takes the padding vector, not the mask
        padding, _, causal = padded
    window, remaining = 0, {}
    for style, operand in masks if padding is None else ():     # each mask lifts on its own; they intersect
        operand, lifted_causal, lifted_window = _lift(operand, style == "additive", graph, qs[2], ks[2])
        causal = causal or lifted_causal
        if lifted_window:
            window = min(window, lifted_window) if window else lifted_window
        if operand is not None:
            remaining[len(remaining)] = (style, operand)
    if len(remaining) > 1:
        raise NotAttention(f"{len(remaining)} masks on the scores that are not pure causal/window structure")
    mask_is_bool = any(style == "boolean" for style, _ in remaining.values())
    mask = next(iter(remaining.values()), (None, None))[1]
    if mask is not None:
        ms, _ = _shape(nodes[mask.node], "mask")
        if len(_canonical_shape(ms, mask.ops)) > 4:
            raise NotAttention("the mask has more than 4 dims; it must broadcast to [B, H, N, S]")
    kind = ("boolean" if mask_is_bool else "additive") if mask is not None else \
        ("window" if window else "causal" if causal else "none")
    if padding is not None:                  # the padding op's mask stays the site's (profiling reads it)
        mask, kind = masks[0][1], "padding"
    return AttentionSite(
        id=site_id, module_path=path, spelling=spelling, output=out.name, q=q, k=k, v=v, mask_operand=mask,
        out_ops=tuple(out_ops), batch=str(qs[0]), q_len=str(qs[2]), kv_len=str(ks[2]), num_heads=h,
        num_kv_heads=hk, head_dim=d, head_dim_v=dv, causal=causal, window=window, mask=kind,
        scale=float(scale), dtype=str(qdt).replace("torch.", ""), softmax_dtype=softmax_dtype, dropout=0.0,
        padding=padding, softcap=float(softcap),
    )


def _gqa(k: Operand, v: Operand, graph_nodes) -> tuple[Operand, Operand]:
    """Look through repeat_kv when K and V are repeated alike (only for operands without transforms)."""
    if k.ops or v.ops:
        return k, v
    k0, rk = _peel_repeat_kv(graph_nodes[k.node])
    v0, rv = _peel_repeat_kv(graph_nodes[v.node])
    if rk != rv or rk == 1:
        return k, v
    return Operand(k0.name), Operand(v0.name)


def _to_4d(rank: int, q, k, v, masks: list, graph):
    """Heads folded into the batch (3-D): q, k, v get a heads dim of 1; so does a 3-D mask (a mask of
    fewer dims already broadcasts the same way)."""
    if rank == 4:
        return q, k, v, masks
    if rank != 3:
        raise NotAttention(f"scores are {rank}-D; attention needs [B, H, N, S] or [B*H, N, S]")
    nodes = {n.name: n for n in graph.nodes}
    q, k, v = (o.then("unsqueeze", 1) for o in (q, k, v))
    masks = [(style, m.then("unsqueeze", 1) if len(_shape(nodes[m.node], "mask")[0]) == 3 else m)
             for style, m in masks]
    return q, k, v, masks


def _match_sdpa(node: fx.Node, path: str, site_id: str) -> AttentionSite:
    q, k, v = (M.arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = M.arg(node, 3, "attn_mask")
    dropout = _constant(M.arg(node, 4, "dropout_p", 0.0), "dropout_p", (int, float))
    if dropout:
        raise NotAttention(f"dropout_p={dropout}: attention with dropout is left to PyTorch")
    causal = bool(_constant(M.arg(node, 5, "is_causal", False), "is_causal", (bool, int)))
    scale = M.arg(node, 6, "scale")
    if scale is not None:
        scale = float(_constant(scale, "scale", (int, float)))
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise NotAttention("q, k, v are not all tensors of this graph")
    if mask is not None and not isinstance(mask, fx.Node):
        raise NotAttention(f"attn_mask is a constant {type(mask).__name__}, not a tensor of the graph")
    if causal and mask is not None:
        raise NotAttention("is_causal together with attn_mask")
    qs, qdt = _shape(q, "q")
    if scale is None:
        scale = 1.0 / math.sqrt(_static(qs[-1], "head dim"))
    nodes = {n.name: n for n in node.graph.nodes}
    kop, vop = _gqa(Operand(k.name), Operand(v.name), nodes)
    mop = Operand(mask.name) if mask is not None else None
    mask_is_bool = mask is not None and _shape(mask, "mask")[1] == torch.bool
    masks = [("boolean" if mask_is_bool else "additive", mop)] if mop is not None else []
    rank = len(qs)
    qop, kop, vop, masks = _to_4d(rank, Operand(q.name), kop, vop, masks, node.graph)
    out_ops = (("squeeze", 1),) if rank == 3 else ()
    return _site("sdpa", node, qop, kop, vop, masks, out_ops, causal, scale,
                 str(qdt).replace("torch.", ""), path, site_id, node.graph)


def _match_softmax(sm: fx.Node, path: str, site_id: str) -> AttentionSite:
    in_shape, in_dtype = _shape(sm.args[0], "softmax input")
    dim = M.softmax_dim(sm)
    if not isinstance(dim, int) or dim % len(in_shape) != len(in_shape) - 1:
        raise NotAttention(f"softmax over dim {dim}, not the last (key) dim")
    _single_user(sm.args[0], "the attention scores")
    probs = sm
    node = _single_user(sm, "the attention probabilities")
    while M.is_cast(node) or M.is_dropout(node):
        if M.is_dropout(node) and M.dropout_p(node):
            raise NotAttention(f"dropout p={M.dropout_p(node)} on the attention probabilities (training mode) "
                               "is left to PyTorch")
        probs = node
        node = _single_user(node, "the attention probabilities")
    v, out_ops = _pv(node, probs)
    out = node
    rank = len(in_shape)
    sc = _peel_scores(sm.args[0], rank)
    _single_user(sc.qk, "the attention scores")
    q, k, qk_scale, bias = _qk(sc.qk)
    if bias is not None:
        if sc.softcap:
            raise NotAttention("a bias is added to q @ k^T before the soft-cap (tanh), which no attnforge kernel "
                               "computes")
        sc.masks.append(("additive", bias))
    nodes = {n.name: n for n in sm.graph.nodes}
    for name, o in (("keys", k), ("values", v)):
        _not_weights(nodes[o.node], name)
    k, v = _gqa(k, v, nodes)
    q = Operand(q.node, q.ops + tuple(sc.q_ops))
    q, k, v, masks = _to_4d(rank, q, k, v, sc.masks, sm.graph)
    if rank == 3:
        out_ops = (("squeeze", 1),) + tuple(out_ops)
    sm_dtype = M.softmax_dtype(sm) or in_dtype
    return _site("matmul_softmax", out, q, k, v, masks, out_ops, False, sc.scale * qk_scale,
                 str(sm_dtype).replace("torch.", ""), path, site_id, sm.graph, softcap=sc.softcap)


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                 "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                 "is_causal": False}
_TEL_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
             "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1",
             "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")


def call_args(node: fx.Node, names, defaults=None) -> dict:
    """A call's arguments by name (positional or keyword), defaults filled in."""
    out = dict(defaults or {})
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _decomposed_site(spelling, node, q, k, v, heads, embed, n, s, causal, mask_kind, path, site_id):
    qs, qdt = _shape(q, "query")
    d = embed // heads
    return AttentionSite(
        id=site_id, module_path=path, spelling=spelling, output=node.name, q=Operand(q.name), k=Operand(k.name),
        v=Operand(v.name), mask_operand=None, out_ops=(), batch=str(qs[1] if spelling == "mha" else qs[0]),
        q_len=str(n), kv_len=str(s), num_heads=heads, num_kv_heads=heads, head_dim=d, head_dim_v=d,
        causal=causal, window=0, mask=mask_kind, scale=d ** -0.5, dtype=str(qdt).replace("torch.", ""),
        softmax_dtype=str(qdt).replace("torch.", ""), dropout=0.0)


def _match_mha(node: fx.Node, path: str, site_id: str) -> AttentionSite:
    a = call_args(node, _MHA_ARGS, _MHA_DEFAULTS)
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        raise NotAttention("MultiheadAttention with bias_k/bias_v or add_zero_attn is left to PyTorch")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise NotAttention("MultiheadAttention with static_k/static_v is left to PyTorch")
    if a["training"] and a["dropout_p"]:
        raise NotAttention(f"MultiheadAttention dropout={a['dropout_p']} in training mode is left to PyTorch")
    weights_used = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1 and u.users]
    if any(u.target is not operator.getitem for u in node.users) or weights_used:
        raise NotAttention("the attention weights MultiheadAttention returns are used")
    heads = _constant(a["num_heads"], "num_heads", (int,))
    embed = _constant(a["embed_dim_to_check"], "embed_dim", (int,))
    for name in ("query", "key", "value"):
        if not isinstance(a[name], fx.Node) or len(_shape(a[name], name)[0]) != 3:
            raise NotAttention(f"MultiheadAttention {name} is not a batched [N, B, E] tensor")
    n, s = _shape(a["query"], "query")[0][0], _shape(a["key"], "key")[0][0]
    causal = bool(a["is_causal"] and a["key_padding_mask"] is None and not a["need_weights"])
    has_mask = a["attn_mask"] is not None or a["key_padding_mask"] is not None
    kind = "causal" if causal else "additive" if has_mask else "none"
    return _decomposed_site("mha", node, a["query"], a["key"], a["value"], heads, embed, n, s, causal, kind,
                            path, site_id)


def _match_encoder_layer(node: fx.Node, path: str, site_id: str) -> AttentionSite:
    a = call_args(node, _TEL_ARGS, {"mask": None, "mask_type": None})
    if a["mask"] is not None:
        raise NotAttention("the fused encoder layer with a mask is left to PyTorch")
    heads = _constant(a["num_heads"], "num_heads", (int,))
    embed = _constant(a["embed_dim"], "embed_dim", (int,))
    shape, _ = _shape(a["src"], "src")
    if len(shape) != 3:
        raise NotAttention("the fused encoder layer's input is not batched [B, N, E]")
    return _decomposed_site("encoder_layer", node, a["src"], a["src"], a["src"], heads, embed, shape[1],
                            shape[1], False, "none", path, site_id)


def detect(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[Decline]]:
    """All attention sites of `gm` in graph order, and the near misses that were declined."""
    sites, declined = [], []
    order: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if M.is_sdpa(node):
            rule, fn = "sdpa", _match_sdpa
        elif node.op == "call_function" and node.target is torch.nn.functional.multi_head_attention_forward:
            rule, fn = "mha", _match_mha
        elif node.op == "call_function" and node.target is torch._transformer_encoder_layer_fwd:
            rule, fn = "encoder_layer", _match_encoder_layer
        elif M.is_softmax(node):
            rule, fn = "matmul_softmax", _match_softmax
        else:
            continue
        path = M.module_path(node)
        try:
            site = fn(node, path, f"{path}#{order[path]}")
        except NotAttention as e:
            declined.append(Decline(node.name, path, rule, str(e)))
            continue
        order[path] += 1
        sites.append(site)
    return sites, declined
