"""Find attention in an FX graph.

Two rules, each a pattern plus checks that can decline with a reason:

  sdpa:            scaled_dot_product_attention(q, k, v, mask?, dropout_p=0, is_causal, scale) => attention
  matmul_softmax:  matmul(cast/dropout(softmax(add?(scale?(matmul(q, k^T)), mask), -1)), v) => attention

In both, K and V are looked through Hugging Face's `repeat_kv` (x[:, :, None].expand(...).reshape(...))
and `repeat_interleave(n, dim=1)`, so a site records the unexpanded KV heads (GQA).

Every softmax and every SDPA call is a candidate: one that no rule accepts becomes a `Decline` naming
what did not fit, so near misses are visible. Detection never changes the graph.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import fx

from . import match as M
from .masks import mask_structure
from .site import AttentionSite, Decline

__all__ = ["detect", "NotAttention"]


class NotAttention(Exception):
    """Raised inside a rule to decline a candidate; the message is the reason shown to users."""


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


def _peel_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(unexpanded tensor, repeat factor) for repeat_kv / repeat_interleave on dim 1; (node, 1) otherwise."""
    if M.is_call(node, {torch.reshape}, ("reshape", "view")):
        expanded = node.args[0]
        if isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand":
            inserted = expanded.args[0]
            if isinstance(inserted, fx.Node) and len(inserted.args) >= 1 and isinstance(inserted.args[0], fx.Node):
                base = inserted.args[0]
                b, e, r = M.meta(base), M.meta(expanded), M.meta(node)
                if (b is not None and e is not None and r is not None and len(b.shape) == 4
                        and len(e.shape) == 5 and len(r.shape) == 4
                        and M.same_size(e.shape[1], b.shape[1]) and M.same_size(e.shape[3], b.shape[2])
                        and M.same_size(e.shape[4], b.shape[3]) and M.same_size(r.shape[2], b.shape[2])):
                    rep = M.static_int(e.shape[2])
                    hk = M.static_int(b.shape[1])
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


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "nothing"
        raise NotAttention(f"{what} ({node.name}) is used by {len(users)} nodes ({names}); rewriting would "
                           "drop a value something else needs")
    return users[0]


def _site(spelling, out, q, k, v, mask, causal, scale, softmax_dtype, module_path, site_id) -> AttentionSite:
    (qs, qdt), (ks, _), (vs, _) = _shape(q, "q"), _shape(k, "k"), _shape(v, "v")
    if not (len(qs) == len(ks) == len(vs) == 4):
        raise NotAttention(f"q, k, v are not 4-D [B, H, N, D] (got {len(qs)}-D, {len(ks)}-D, {len(vs)}-D)")
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
    if mask is not None:
        lifted = mask_structure(mask, qs[2], ks[2])
        if lifted is not None:
            causal, mask = causal or lifted == "causal", None
    mask_kind = "causal" if causal else "none"
    if mask is not None:
        ms, mdt = _shape(mask, "mask")
        if len(ms) > 4:
            raise NotAttention(f"mask has {len(ms)} dims; it must broadcast to [B, H, N, S]")
        mask_kind = "boolean" if mdt == torch.bool else "additive"
    return AttentionSite(
        id=site_id, module_path=module_path, spelling=spelling, output=out.name, q=q.name, k=k.name,
        v=v.name, mask_node=mask.name if mask is not None else None,
        batch=str(qs[0]), q_len=str(qs[2]), kv_len=str(ks[2]), num_heads=h, num_kv_heads=hk,
        head_dim=d, head_dim_v=dv, causal=causal, mask=mask_kind, scale=float(scale),
        dtype=str(qdt).replace("torch.", ""), softmax_dtype=softmax_dtype, dropout=0.0,
    )


def _constant(value, what: str, kinds):
    if isinstance(value, fx.Node) or not isinstance(value, kinds):
        raise NotAttention(f"{what} is not a constant ({value!r})")
    return value


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
    k0, rk = _peel_repeat_kv(k)
    v0, rv = _peel_repeat_kv(v)
    if rk != rv:
        k0, v0 = k, v                       # expanded differently: keep both as they are (exact)
    qs, qdt = _shape(q, "q")
    if scale is None:
        scale = 1.0 / math.sqrt(_static(qs[-1], "head dim"))
    return _site("sdpa", node, q, k0, v0, mask, causal, scale, str(qdt).replace("torch.", ""), path, site_id)


def _peel_scores(node: fx.Node):
    """Walk back from the softmax input to the q @ k^T matmul. Returns (matmul, scale, mask, chain)."""
    scale, mask, chain = 1.0, None, []
    while True:
        if M.is_matmul(node):
            return node, scale, mask, chain
        chain.append(node)
        if M.is_cast(node):
            nxt = node.args[0]
        elif M.is_mul(node) or M.is_div(node):
            a, b = node.args[0], node.args[1]
            if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
                nxt, factor = a, b
            elif M.is_mul(node) and isinstance(b, fx.Node) and isinstance(a, (int, float)):
                nxt, factor = b, a
            else:
                raise NotAttention(f"scores are scaled by a value computed in the graph ({node.name}), "
                                   "not a constant")
            scale = scale * factor if M.is_mul(node) else scale / factor
        elif M.is_add(node):
            if "alpha" in node.kwargs or len(node.args) != 2:
                raise NotAttention(f"add with alpha in the scores ({node.name})")
            if mask is not None:
                raise NotAttention("more than one additive term on the scores")
            a, b = node.args
            # the scores side is the one that leads back to a matmul
            if isinstance(a, fx.Node) and _leads_to_matmul(a):
                nxt, mask = a, b
            elif isinstance(b, fx.Node) and _leads_to_matmul(b):
                nxt, mask = b, a
            else:
                raise NotAttention(f"no q @ k^T matmul before the add {node.name}")
            if not isinstance(mask, fx.Node):
                raise NotAttention(f"the additive term on the scores is a constant ({mask!r}), not a mask tensor")
            rs, _ = _shape(node, "masked scores")
            ss, _ = _shape(nxt, "scores")
            if len(rs) != len(ss) or not all(M.same_size(x, y) for x, y in zip(rs, ss)):
                raise NotAttention("the mask broadcasts the scores to a larger shape")
        else:
            what = node.target if node.op != "call_module" else type(M.module_of(node)).__name__
            raise NotAttention(f"softmax input is not matmul -> scale -> mask (found {what} at {node.name})")
        if not isinstance(nxt, fx.Node):
            raise NotAttention(f"{node.name} has no tensor input")
        _single_user(nxt, "the attention scores")
        node = nxt


def _leads_to_matmul(node: fx.Node, depth: int = 4) -> bool:
    for _ in range(depth):
        if M.is_matmul(node):
            return True
        if not (M.is_cast(node) or M.is_mul(node) or M.is_div(node)) or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return M.is_matmul(node)


def _match_softmax(sm: fx.Node, path: str, site_id: str) -> AttentionSite:
    in_shape, _ = _shape(sm.args[0], "softmax input")
    dim = M.softmax_dim(sm)
    if not isinstance(dim, int) or dim % len(in_shape) != len(in_shape) - 1:
        raise NotAttention(f"softmax over dim {dim}, not the last (key) dim")
    # forward: casts and inactive dropout, then the matmul with V
    probs = sm
    node = _single_user(sm, "the attention probabilities")
    while M.is_cast(node) or M.is_dropout(node):
        if M.is_dropout(node) and M.dropout_p(node):
            raise NotAttention(f"dropout p={M.dropout_p(node)} on the attention probabilities (training mode) "
                               "is left to PyTorch")
        probs = node
        node = _single_user(node, "the attention probabilities")
    if not M.is_matmul(node) or node.args[0] is not probs:
        raise NotAttention(f"the attention probabilities are not multiplied with values (used by {node.name})")
    out, v = node, node.args[1]
    # backward: scale / mask back to q @ k^T
    qk, scale, mask, _chain = _peel_scores(sm.args[0])
    _single_user(qk, "the attention scores")
    q, kt = qk.args[0], qk.args[1]
    if not isinstance(kt, fx.Node) or M.transpose_dims(kt) != (2, 3):
        raise NotAttention(f"the right operand of q @ k^T ({getattr(kt, 'name', kt)}) is not a transpose of "
                           "the last two dims of an activation")
    k = kt.args[0]
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        raise NotAttention("q, k, v are not all tensors of this graph")
    for name, x in (("keys", k), ("values", v)):
        if x.op == "get_attr" or isinstance(M.meta(x), torch.nn.Parameter):
            raise NotAttention(f"the {name} are parameters (weights), not activations")
    k0, rk = _peel_repeat_kv(k)
    v0, rv = _peel_repeat_kv(v)
    if rk != rv:
        k0, v0 = k, v
    sm_dtype = M.softmax_dtype(sm)
    if sm_dtype is None:
        sm_dtype = _shape(sm.args[0], "scores")[1]
    return _site("matmul_softmax", out, q, k0, v0, mask, False, scale, str(sm_dtype).replace("torch.", ""),
                 path, site_id)


def detect(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[Decline]]:
    """All attention sites of `gm` in graph order, and the near misses that were declined."""
    sites, declined = [], []
    order: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if M.is_sdpa(node):
            rule, fn = "sdpa", _match_sdpa
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
