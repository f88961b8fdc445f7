"""Padded batches: rows of different lengths in one attention call, each computed as that row alone.

A key-padding vector `padding` [B, S] (True / nonzero = a real token, as Hugging Face's `attention_mask`)
says which key slots of each row hold tokens. With it, the attention op computes, for every row b:

    the row's real tokens, in order, attend exactly as they would in a call of that row alone: causal
    (or not) over the row's own real keys only, the plan's forms at the row's own positions (its first
    real token is position 0; an elastic span uses the row's own length); padding slots output zeros

(the contract of FlashAttention's variable-length path and of Hugging Face's flash-attention-2 path; an
SDPA call with the same mask differs only in what it writes at padding query slots, which no real token
reads). How it runs, without a host synchronization or an N x S mask:

    rows_of(padding)  per row: the slots of its real tokens first (in order), then its padding slots
                      (`order`, a stable argsort), and its length
    gather            q, k, v [B, H, S, D] -> compacted: row b's real tokens at [0, len_b). Causal
                      self-attention there is exact for every real token (it sees only keys before it,
                      all real); what the compacted tail computes is discarded
    scatter           the compacted output back to the slots, zeros at padding slots

The kernels also take the lengths, so they skip the tail's query blocks (and, without causality, bound
the keys); an elastic window's span per row comes from `row_windows`. `reference` is the op's
PyTorch path: keys and values compacted, queries where they are, one boolean mask over the compacted keys
from each query's rank in its row (device ops only, so it also traces on fake tensors for a compiled
training step's backward). `attention_rows` is the oracle both are tested against: a host loop over rows,
each a plain attention_reference call on that row alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["mask_4d", "Rows", "rows_of", "gather", "scatter", "gather_rows", "scatter_rows", "row_windows", "keep_rows",
           "reference", "reference_backward", "reference_lse", "attention_rows", "padding_reason"]


@dataclass(frozen=True)
class Rows:
    order: Tensor        # [B, S] int64: row b's real slots first (in order), then its padding slots
    lens: Tensor         # [B] int32: real tokens per row
    valid: Tensor        # [B, S] bool: compacted slot t holds a real token (t < lens[b])


def _keep(padding: Tensor) -> Tensor:
    """The key-padding flags as bool (True = a token)."""
    return padding if padding.dtype == torch.bool else padding != 0


def mask_4d(padding: Tensor, n: int, causal: bool) -> Tensor:
    """[B, 1, N, S] bool (True = attend): key j of row b is kept where padding[b, j] is set and, if causal,
    j <= i + S - N (queries are the last N key slots). Hugging Face's sdpa_mask for a causal or bidirectional
    mask with a 2-D attention_mask builds exactly this."""
    keep = _keep(padding)
    s = keep.shape[1]
    out = keep[:, None, None, :].expand(keep.shape[0], 1, n, s)
    if causal:
        rows = torch.arange(s - n, s, device=keep.device)[:, None]
        out = out & (torch.arange(s, device=keep.device)[None, :] <= rows)
    return out.contiguous()


def padding_reason(padding: Tensor, q: Tensor, k: Tensor, causal: bool, mask, window: int) -> str | None:
    """None if `padding` can describe this call, else what is wrong with it (a ValueError message)."""
    b, s = k.shape[0], k.shape[2]
    if padding.dim() != 2 or tuple(padding.shape) != (b, s):
        return (f"padding must be [B, S] = [{b}, {s}] (one flag per key slot, as Hugging Face's attention_mask), "
                f"got {tuple(padding.shape)}")
    if padding.device != q.device:
        return f"padding is on {padding.device} but q is on {q.device}"
    if padding.dtype.is_floating_point or padding.dtype.is_complex:
        return f"padding must be bool or integer (1 = a token, 0 = padding), got {padding.dtype}"
    if mask is not None or window:
        return "padding replaces the mask: give a padding vector or a mask (and no window), not both"
    if causal and q.shape[2] > s:
        return f"causal padded attention needs at most as many queries ({q.shape[2]}) as keys ({s})"
    return None


def rows_of(padding: Tensor) -> Rows:
    """The compaction of a [B, S] key-padding vector (device ops only: no synchronization)."""
    keep = _keep(padding)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lens = keep.sum(1, dtype=torch.int32)
    valid = torch.arange(keep.shape[1], device=keep.device)[None, :] < lens[:, None]
    return Rows(order, lens, valid)


def _index(rows: Rows, x: Tensor) -> Tensor:
    return rows.order[:, None, :, None].expand(x.shape[0], x.shape[1], rows.order.shape[1], x.shape[3])


def gather(x: Tensor, rows: Rows) -> Tensor:
    """x [B, H, S, D] -> row b's real tokens at [0, len_b), then its padding slots (contiguous)."""
    return x.gather(2, _index(rows, x))


def scatter(xc: Tensor, rows: Rows) -> Tensor:
    """The inverse of gather for a compacted result [B, H, S, D]; padding slots get zeros."""
    xc = xc.masked_fill(~rows.valid[:, None, :, None], 0)
    return torch.zeros_like(xc).scatter_(2, _index(rows, xc), xc)


def scatter_rows(xc: Tensor, rows: Rows, fill: float) -> Tensor:
    """The same for a per-row value [B, H, S] (a log-sum-exp): `fill` at padding slots."""
    xc = xc.masked_fill(~rows.valid[:, None, :], fill)
    index = rows.order[:, None, :].expand_as(xc)
    return torch.full_like(xc, fill).scatter_(2, index, xc)


def gather_rows(x: Tensor, rows: Rows) -> Tensor:
    return x.gather(2, rows.order[:, None, :].expand_as(x))


def row_windows(forms, lens: Tensor) -> Tensor | None:
    """[B, G] int32 window per row and group where some group's span depends on the length (an elastic
    window: alpha + beta * len_b, as forms.ElasticWindow.window_at computes it on the host); None when
    every window is the same for every row."""
    from .forms import ElasticWindow

    if not any(isinstance(f, ElasticWindow) for f in forms):
        return None
    cols = []
    length = lens.to(torch.float64)
    for f in forms:
        if isinstance(f, ElasticWindow):
            # Python's int() of a non-negative float is its floor: the same double arithmetic as window_at
            cols.append(torch.clamp(torch.floor(f.alpha + f.beta * length), min=1).to(torch.int32))
        else:
            cols.append(torch.full_like(lens, f.window_at(0) or 0))    # length-free (0: no window)
    return torch.stack(cols, 1).contiguous()


def attention_rows(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool, scale: float,
                   forms=()) -> Tensor:
    """The reference of a padded call: each row's real tokens through attention_reference on their own.
    Queries are the last N key slots (N <= S); a query slot that is padding outputs zeros. With forms (or
    causal), the row's real keys sit at positions 0 .. len_b - 1 and its real queries at their own ranks
    among them. Differentiable (plain PyTorch ops); runs a host loop over rows."""
    from .forms import Dense, keep_mask
    from .reference import attention_reference

    b, hq, n, _ = q.shape
    s = k.shape[2]
    keep = _keep(padding).cpu()
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    rows = []
    for r in range(b):
        slots = keep[r].nonzero().squeeze(1)
        q_slots = slots[slots >= s - n] - (s - n)            # the real query slots, 0 .. n - 1
        if not len(q_slots) or not len(slots):
            rows.append(out[r:r + 1])
            continue
        length = len(slots)
        kr = k[r:r + 1, :, slots.to(k.device)]
        vr = v[r:r + 1, :, slots.to(v.device)]
        qr = q[r:r + 1, :, q_slots.to(q.device)]
        row_forms = tuple(forms) or ((Dense(),) * k.shape[1] if causal else ())
        if row_forms and all(getattr(f, "kind", "") != "linear" for f in row_forms):
            if len(q_slots) == length:                            # every real token queries: the row alone
                o = attention_reference(qr, kr, vr, None, False, scale, 0, row_forms)
            else:                                                 # each real query at its rank in the row
                ranks = torch.searchsorted(slots, q_slots + (s - n))
                g_keep = keep_mask(row_forms, length, length, device=q.device)[:, ranks.to(q.device)]
                mask = g_keep.repeat_interleave(hq // k.shape[1], 0)[None]        # [1, Hq, n_r, len]
                o = attention_reference(qr, kr, vr, mask, False, scale)
        elif row_forms:                                          # linear hybrids: plain causal self-attention
            if len(q_slots) != length:
                raise ValueError("linear forms in a padded call need every real token among the queries")
            o = attention_reference(qr, kr, vr, None, True, scale, 0, row_forms)
        else:
            o = attention_reference(qr, kr, vr, None, False, scale)
        full = out.new_zeros(1, hq, n, v.shape[-1])
        full = full.index_copy(2, q_slots.to(q.device), o)
        rows.append(full)
    return torch.cat(rows, 0)


def keep_rows(forms, padding: Tensor, n: int, causal: bool, heads: int) -> Tensor:
    """[B, H or 1, N, S] bool over the compacted keys (key t of row b = its t-th real token): what each query
    slot attends to. Query slot i is key slot S - N + i; a real query sits at its rank among the row's real
    keys, a padding query attends to nothing. forms: one per KV group (each at the row's own length), or ()
    for plain causal / bidirectional attention."""
    from .forms import ElasticWindow, _keep_one

    keep = _keep(padding)
    s = keep.shape[1]
    rank = keep.cumsum(1) - 1
    qpos, qreal = rank[:, s - n:, None], keep[:, s - n:, None]                  # [B, N, 1]
    lens = keep.sum(1)
    cols = torch.arange(s, device=keep.device)[None, None, :]                   # [1, 1, S]
    base = qreal & (cols < lens[:, None, None])                                 # [B, N, S]
    if not forms:
        return (base & (cols <= qpos) if causal else base)[:, None]
    windows = row_windows(forms, lens.to(torch.int32))
    # an elastic span per row; the other forms are length-free (s only sizes block-sparse tables)
    groups = [base & _keep_one(f, qpos, cols, s, windows[:, g, None, None] if isinstance(f, ElasticWindow) else None)
              for g, f in enumerate(forms)]
    per_group = torch.stack(groups, 1)                                          # [B, G, N, S]
    return per_group.repeat_interleave(heads // len(forms), 1)


def _linear(forms) -> bool:
    return any(getattr(f, "kind", "") == "linear" for f in forms)


def reference(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool, scale: float, forms=()) -> Tensor:
    """The padded call in PyTorch (see the module docstring): out [B, H, N, DV], zeros at padding queries."""
    from .reference import attention_reference

    rows = rows_of(padding)
    if _linear(forms):                        # linear hybrids: causal self-attention, compacted
        qc, kc, vc = gather(q, rows), gather(k, rows), gather(v, rows)
        return scatter(attention_reference(qc, kc, vc, None, True, scale, 0, forms), rows)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    return attention_reference(q, gather(k, rows), gather(v, rows), mask, False, scale)


def reference_lse(q: Tensor, k: Tensor, padding: Tensor, causal: bool, scale: float, forms=()) -> Tensor:
    """[B, H, N] float32 log-sum-exp of the padded call (+inf at padding queries; NaN for linear forms, whose
    gradients never read it)."""
    from .reference import reference_lse as dense_lse

    if _linear(forms):
        return torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    return dense_lse(q, gather(k, rows_of(padding)), mask, False, scale)


def reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool,
                       scale: float, forms=()) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `reference` (explicit formulas, traceable; zeros at padding slots)."""
    from .reference import attention_reference_backward

    rows = rows_of(padding)
    if _linear(forms):
        goc = gather(grad_out, rows).masked_fill(~rows.valid[:, None, :, None], 0)
        dq, dk, dv, _ = attention_reference_backward(goc, gather(q, rows), gather(k, rows), gather(v, rows), None,
                                                     True, scale, 0, forms)
        return scatter(dq, rows), scatter(dk, rows), scatter(dv, rows)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    dq, dkc, dvc, _ = attention_reference_backward(grad_out, q, gather(k, rows), gather(v, rows), mask, False, scale)
    return dq, scatter(dkc, rows), scatter(dvc, rows)
