"""The PyTorch reference for attention: the oracle every other implementation is checked against.

Shapes (one convention across attnforge):
    q: [B, Hq, N, D]    k: [B, Hkv, S, D]    v: [B, Hkv, S, Dv]    out: [B, Hq, N, Dv]
    mask: broadcastable to [B, Hq, N, S]; bool (True = attend) or floating (added to the scores).
Hq must be a multiple of Hkv (GQA); query head h reads KV head h // (Hq // Hkv). K and V are never
repeated: the query heads of a group are folded next to each other instead.

`causal` is aligned top-left, as in `scaled_dot_product_attention(is_causal=True)`: query i sees keys
j <= i. `window` > 0 also hides keys j <= i - window (a sliding window of `window` keys, the query's own
included). A row that can see no key at all returns zeros (SDPA's math path does the same).
`softcap` > 0 soft-caps the scaled scores before any mask is applied, as Gemma 2 does:
s = softcap * tanh(q k^T * scale / softcap); 0: no cap.

Math runs in float32 for half inputs and in the input dtype for float32/float64.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_reference_backward", "reference_lse"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    # [B, Hq, ...] -> [B, Hkv, G, ...]
    return x.unflatten(1, (hkv, x.shape[1] // hkv))


def _scores(q, k, mask, causal, scale, window=0, forms=(), row0=0, row1=None, softcap=0.0, cap_grad=False):
    """Scores and masks of query rows [row0, row1) (all rows by default), [B, Hkv, G, rows, S], masked
    with -inf, in the compute dtype. Chunked callers (the profiling backward) pass a row range.
    softcap > 0: soft-capped before the masks; cap_grad: also return d(capped)/d(uncapped) = 1 - tanh^2
    (None without a cap), which the backward multiplies into dS."""
    b, hq, n, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    row1 = n if row1 is None else row1
    ct = _compute_dtype(q.dtype)
    qg = _grouped(q[:, :, row0:row1].to(ct), hkv)                # [B, Hkv, G, rows, D]
    scores = torch.matmul(qg, k.to(ct).unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, rows, S]
    dcap = None
    if softcap:
        t = torch.tanh(scores / softcap)
        scores = softcap * t
        dcap = 1 - t * t if cap_grad else None
    keep = None
    if causal or window:
        rows = torch.arange(row0, row1, device=q.device)[:, None]
        cols = torch.arange(s, device=q.device)[None, :]
        keep = cols <= rows if causal else torch.ones(row1 - row0, s, dtype=torch.bool, device=q.device)
        if window:
            keep = keep & (cols > rows - window)
    if forms:
        if len(forms) != hkv:
            raise ValueError(f"{len(forms)} forms for {hkv} key/value heads; give one per KV head group")
        from .forms import keep_mask

        group_keep = keep_mask(forms, n, s, device=q.device)[None, :, None, row0:row1]   # [1, Hkv, 1, rows, S]
        keep = group_keep if keep is None else keep & group_keep
    if mask is not None:
        full = _grouped(mask.expand(b, hq, n, s)[:, :, row0:row1], hkv)
        if full.dtype == torch.bool:
            keep = full if keep is None else keep & full
        else:
            scores = scores + full.to(ct)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores, dcap) if cap_grad else scores


def soft_cap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Scores soft-capped as a site computes them, softcap * tanh(s / softcap); s itself for softcap 0."""
    return softcap * torch.tanh(s / softcap) if softcap else s


def _probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys; rows with no visible key give zeros instead of NaN."""
    if scores.shape[-1] == 0:
        return scores                   # no keys at all: nothing to weigh (the output is zeros)
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    p = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def reference_lse(q, k, mask=None, causal=False, scale=None, window=0, forms=(), softcap=0.0) -> torch.Tensor:
    """[B, Hq, N] float32: each row's natural log-sum-exp of its kept scores, +inf for a row that sees no key
    (the convention of the kernels' backward: exp(s - lse) is then 0)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lse = torch.logsumexp(_scores(q, k, mask, causal, scale, window, forms, softcap=softcap), dim=-1)  # [B, Hkv, G, N]
    return torch.where(torch.isneginf(lse), float("inf"), lse).flatten(1, 2).float()


def attention_reference(q, k, v, mask=None, causal=False, scale=None, window=0, forms=(), softcap=0.0):
    """out = softmax(q k^T * scale + mask) v, GQA by grouping (the scores soft-capped first if softcap > 0).
    Returns q's dtype.

    forms: () or one attnforge.runtime.forms Form per KV head group, each restricting which keys its
    query heads see (on top of causal / window / mask); forms place the queries at the last N of the S
    key positions, so a decoding step (N = 1) sees what the same position saw in prefill."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    linear = _linear_groups(forms, mask, causal, window, softcap)
    p = _probs(_scores(q, k, mask, causal, scale, window, forms, softcap=softcap))   # [B, Hkv, G, N, S]
    out = torch.matmul(p, v.to(p.dtype).unsqueeze(2))             # [B, Hkv, G, N, Dv]
    out = out.flatten(1, 2).to(q.dtype)
    if linear:
        from .linear import linear_reference

        out = linear_reference(q, k, v, forms, scale, out=out)
    return out


def _linear_groups(forms, mask, causal, window, softcap=0.0) -> bool:
    """True if some form is Linear (runtime.linear computes those groups); only on plain causal sites."""
    if not any(getattr(f, "kind", "") == "linear" for f in forms):
        return False
    if softcap:
        raise ValueError(LINEAR_SOFTCAP)
    if not causal or mask is not None or window:
        raise ValueError("linear forms are planned for plain causal attention only (no mask, no window); "
                         "this call has " + ("a mask" if mask is not None else "a window" if window else
                                             "causal=False"))
    return True


LINEAR_SOFTCAP = ("linear forms approximate softmax(q k^T) without a soft-cap, and this site's scores are soft-capped "
                  "(cap * tanh(s / cap)); plan it without linear candidates")


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back down to `shape` (the mask's own shape)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, size in enumerate(shape):
        if size == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


def attention_reference_backward(grad_out, q, k, v, mask=None, causal=False, scale=None, window=0, forms=(),
                                 softcap=0.0):
    """Gradients (dq, dk, dv, dmask) of `attention_reference`, written out so that it can be traced.

    dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  dQ = dS' K * scale;  dK = dS'^T Q * scale;  dV = P^T dO
    with dS' = dS * (1 - tanh^2) under a soft-cap (dS itself without one).
    K/V gradients are summed over the query heads of their group. dmask is None unless the mask is
    floating (an additive bias), where it equals dS reduced to the mask's shape.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if _linear_groups(forms, mask, causal, window, softcap):   # the hybrid's gradients, by autograd on its reference
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = attention_reference(qq, kk, vv, None, causal, scale, 0, forms)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
        return dq, dk, dv, None
    hkv = k.shape[1]
    scores, dcap = _scores(q, k, mask, causal, scale, window, forms, softcap=softcap, cap_grad=True)
    p = _probs(scores)                                            # [B, Hkv, G, N, S]
    ct = p.dtype
    go = _grouped(grad_out.to(ct), hkv)                           # [B, Hkv, G, N, Dv]
    vg = v.to(ct).unsqueeze(2)                                    # [B, Hkv, 1, S, Dv]
    out = torch.matmul(p, vg)
    dp = torch.matmul(go, vg.transpose(-1, -2))                   # [B, Hkv, G, N, S]
    ds = p * (dp - (go * out).sum(-1, keepdim=True))             # d(loss) / d(capped scores + mask)
    dsc = ds * dcap if softcap else ds                            # d(loss) / d(q k^T * scale)
    dq = torch.matmul(dsc, k.to(ct).unsqueeze(2)) * scale         # [B, Hkv, G, N, D]
    dk = torch.matmul(dsc.transpose(-1, -2), _grouped(q.to(ct), hkv)).sum(2) * scale
    dv = torch.matmul(p.transpose(-1, -2), go).sum(2)
    dmask = None
    if mask is not None and mask.dtype != torch.bool:
        dmask = _reduce_to(ds.flatten(1, 2), mask.shape).to(mask.dtype)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask
