"""Padded and packed batches: rows of different lengths, or several sequences in one row, in one attention
call, each sequence computed as that sequence alone.

A key vector `padding` [B, S] says which key slots of each row hold tokens and which sequence each belongs to:

    bool            True = a token, False = padding; a row's tokens are one sequence (Hugging Face's
                    attention_mask, as its mask functions hand it over)
    integer         0 = padding; tokens with equal nonzero labels are one sequence, in slot order (a 0/1
                    attention_mask is one sequence per row; packed rows, as a collator that flattens a batch
                    makes them, carry 1, 1, 1, 2, 2, 3, ...)

With it, the attention op computes, for every sequence:

    its tokens, in order, attend exactly as they would in a call of that sequence alone: causal (or not)
    over its own keys only, the plan's forms at its own positions (its first token is position 0; an
    elastic span uses its own length); padding slots output zeros

(the contract of FlashAttention's variable-length path and of Hugging Face's flash-attention-2 path; an
SDPA call with the same mask differs only in what it writes at padding query slots, which no real token
reads). How it runs, without an N x S mask:

    rows_of(padding)      per row: the slots of its tokens first, ordered by label then slot (a stable
                          argsort), then its padding slots; its token count. Device ops only
    segments_of(padding)  the compaction the kernels run on: rows_of where every row holds one sequence
                          (always for a bool vector: no host synchronization), else one compacted row per
                          sequence (a host synchronization reads how many and how long, as FlashAttention's
                          varlen path takes max_seqlen on the host)
    gather                q, k, v [B, H, S, D] -> compacted: sequence r's tokens at [0, len_r). Causal
                          self-attention there is exact for every token (it sees only keys before it, all its
                          own); what the compacted tail computes is discarded
    scatter               the compacted output back to the slots, zeros at padding slots

The kernels also take the lengths, so they skip the tail's query blocks (and, without causality, bound
the keys); an elastic window's span per sequence comes from `row_windows`. `reference` is the op's
PyTorch path: keys and values compacted per row, queries where they are, one boolean mask over the
compacted keys from each query's label and rank (device ops only, so it also traces on fake tensors for a
compiled training step's backward). `attention_rows` is the oracle both are tested against: a host loop
over the sequences, each a plain attention_reference call on that sequence alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["mask_4d", "Rows", "rows_of", "segments_of", "gather", "scatter", "gather_rows", "scatter_rows",
           "row_windows", "keep_rows", "reference", "reference_backward", "reference_lse", "attention_rows",
           "padding_reason", "with_linear_grads"]


@dataclass(frozen=True)
class Rows:
    order: Tensor                # [R, L] int64: compacted slot t of row r holds source slot order[r, t]
    lens: Tensor                 # [R] int32: tokens per compacted row
    valid: Tensor                # [R, L] bool: compacted slot t holds a token (t < lens[r])
    src: Tensor | None = None    # [R] int64: the source row of each compacted row; None: row r is row r (R = B)
    source: tuple = ()           # (B, S) of the source where src is given
    take: Tensor | None = None   # where src is given: the compacted tokens' flat indices among R * L ...
    dest: Tensor | None = None   # ... and their flat slots among B * S (each once: scatters write no slot twice)


def _keep(padding: Tensor) -> Tensor:
    """The key-padding flags as bool (True = a token)."""
    return padding if padding.dtype == torch.bool else padding != 0


def _labels(padding: Tensor) -> Tensor:
    """[B, S] int64 sequence labels: 0 = padding, equal nonzero labels = one sequence (a bool vector: 1/0)."""
    return padding.to(torch.int64)


def mask_4d(padding: Tensor, n: int, causal: bool) -> Tensor:
    """[B, 1, N, S] bool (True = attend): key j of row b is kept where it is a token of the query's own sequence
    (a padding query: any token) and, if causal, j <= i + S - N (queries are the last N key slots). For a 0/1
    vector this is exactly what Hugging Face's sdpa_mask builds for a causal or bidirectional mask with a 2-D
    attention_mask; for packed labels, what it builds for packed sequences (causality within a sequence in
    slot order, as its positions run)."""
    lab = _labels(padding)
    s = lab.shape[1]
    keys, queries = lab[:, None, None, :], lab[:, None, s - n:, None]
    out = (keys != 0) & ((queries == 0) | (queries == keys))
    if causal:
        rows = torch.arange(s - n, s, device=lab.device)[:, None]
        out = out & (torch.arange(s, device=lab.device)[None, :] <= rows)
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


_LAST = torch.iinfo(torch.int64).max


def _sorted(padding: Tensor):
    """(order, labels in that order, rank of each compacted slot in its sequence, its sequence's length), all
    [B, S]: each row's tokens ordered by label then slot, padding last (device ops only)."""
    lab = _labels(padding)
    b, s = lab.shape
    order = _order(lab)
    ordered = lab.gather(1, order)
    t = torch.arange(s, device=lab.device).expand(b, s)
    edge = ordered[:, 1:] != ordered[:, :-1]
    first = torch.cat([torch.ones_like(ordered[:, :1], dtype=torch.bool), edge], 1)
    last = torch.cat([edge, torch.ones_like(ordered[:, :1], dtype=torch.bool)], 1)
    start = torch.where(first, t, 0).cummax(1).values
    end = torch.where(last, t, s).flip(1).cummin(1).values.flip(1) + 1
    return order, ordered, t - start, end - start


def _order(lab: Tensor) -> Tensor:
    """[B, S]: each row's slots, its tokens first by label then slot (a stable argsort), padding last."""
    return torch.argsort(torch.where(lab == 0, _LAST, lab), dim=1, stable=True)


def rows_of(padding: Tensor, order: Tensor | None = None) -> Rows:
    """The per-row compaction of a [B, S] key vector: tokens first, by label then slot (device ops only).
    order: _order of these labels where the caller has it already."""
    lab = _labels(padding)
    order = _order(lab) if order is None else order
    lens = (lab != 0).sum(1, dtype=torch.int32)
    valid = torch.arange(lab.shape[1], device=lab.device)[None, :] < lens[:, None]
    return Rows(order, lens, valid)


def segments_of(padding: Tensor) -> Rows:
    """The compaction the kernels run: rows_of where no row holds more than one sequence (a bool vector never
    does: no synchronization), else one compacted row per sequence, as long as the longest (this reads the
    number and lengths of the sequences on the host)."""
    if padding.dtype == torch.bool:
        return rows_of(padding)
    if isinstance(padding, torch._subclasses.FakeTensor):
        raise NotImplementedError(
            "packed sequences (integer labels) need their count on the host, which a traced graph cannot read "
            "here (linear-hybrid forms over packed sequences with impl='reference', whose backward is traced: "
            "use impl='auto' or 'triton', whose attnforge::linear_backward op reads it at run time, run eagerly, "
            "or pass one sequence per row)")
    order, ordered, rank, length = _sorted(padding)
    starts = (rank == 0) & (ordered != 0)
    if int(starts.sum(1).max()) <= 1:
        return rows_of(padding, order)
    row, at = starts.nonzero(as_tuple=True)                        # row-major: sequences in slot order
    lens = length[row, at]
    width = int(lens.max())
    t = torch.arange(width, device=padding.device)[None, :]
    valid = t < lens[:, None]
    slots = torch.where(valid, order[row[:, None], (at[:, None] + t).clamp(max=padding.shape[1] - 1)], 0)
    take = valid.reshape(-1).nonzero().squeeze(1)
    dest = (row[:, None] * padding.shape[1] + slots).reshape(-1)[take]
    return Rows(slots, lens.to(torch.int32), valid, row, tuple(padding.shape), take, dest)


def _index(rows: Rows, x: Tensor) -> Tensor:
    return rows.order[:, None, :, None].expand(x.shape[0], x.shape[1], rows.order.shape[1], x.shape[3])


def _flat(rows: Rows) -> Tensor:
    """[R * L] index of each compacted slot among the source's B * S slots (tail slots: any of the row's)."""
    return (rows.src[:, None] * rows.source[1] + rows.order).reshape(-1)


def _slots_first(x: Tensor) -> Tensor:
    """[B, H, S, ...] -> [B * S, H, ...]"""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


def _from_slots(flat: Tensor, b: int, s: int) -> Tensor:
    return flat.view(b, s, *flat.shape[1:]).transpose(1, 2).contiguous()


def _gather_sequences(x: Tensor, rows: Rows) -> Tensor:
    """x [B, H, S, ...] -> [R, H, L, ...]: one compacted row per sequence (rows.src given)."""
    return _from_slots(_slots_first(x)[_flat(rows)], *rows.order.shape)


def _scatter_sequences(xc: Tensor, rows: Rows, out: Tensor) -> Tensor:
    """Each compacted token of xc [R, H, L, ...] written into `out` [B * S, H, ...] at its slot: [B, H, S, ...]."""
    return _from_slots(out.index_copy_(0, rows.dest, _slots_first(xc).index_select(0, rows.take)), *rows.source)


def gather(x: Tensor, rows: Rows) -> Tensor:
    """x [B, H, S, D] -> each compacted row's tokens at [0, len_r), then its tail (contiguous)."""
    if rows.src is None:
        return x.gather(2, _index(rows, x))
    return _gather_sequences(x, rows)


def scatter(xc: Tensor, rows: Rows) -> Tensor:
    """The inverse of gather for a compacted result [R, H, L, D]; padding slots get zeros."""
    if rows.src is None:
        xc = xc.masked_fill(~rows.valid[:, None, :, None], 0)
        return torch.zeros_like(xc).scatter_(2, _index(rows, xc), xc)
    b, s = rows.source                   # (only the compacted tokens are written: the tail needs no clearing)
    return _scatter_sequences(xc, rows, xc.new_zeros((b * s,) + (xc.shape[1], xc.shape[3])))


def scatter_rows(xc: Tensor, rows: Rows, fill: float) -> Tensor:
    """The same for a per-row value [R, H, L] (a log-sum-exp): `fill` at padding slots."""
    if rows.src is None:
        xc = xc.masked_fill(~rows.valid[:, None, :], fill)
        index = rows.order[:, None, :].expand_as(xc)
        return torch.full_like(xc, fill).scatter_(2, index, xc)
    b, s = rows.source
    return _scatter_sequences(xc, rows, xc.new_full((b * s, xc.shape[1]), fill))


def gather_rows(x: Tensor, rows: Rows) -> Tensor:
    if rows.src is None:
        return x.gather(2, rows.order[:, None, :].expand_as(x))
    return _gather_sequences(x, rows)


def row_windows(forms, lens: Tensor) -> Tensor | None:
    """[B, G] int32 window per sequence and group where some group's span depends on the length (an elastic
    window: alpha + beta * len_b, as forms.ElasticWindow.window_at computes it on the host); lens [B, N]
    (one length per query) gives [B, G, N]. None when every window is the same for every sequence."""
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
            cols.append(torch.full_like(lens, f.window_at(0) or 0, dtype=torch.int32))   # length-free (0: none)
    return torch.stack(cols, 1).contiguous()


def attention_rows(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool, scale: float,
                   forms=()) -> Tensor:
    """The reference of a padded or packed call: each sequence's tokens through attention_reference on their
    own. Queries are the last N key slots (N <= S); a query slot that is padding outputs zeros. With forms
    (or causal), a sequence's keys sit at positions 0 .. len - 1 and its queries at their own ranks among
    them. Differentiable (plain PyTorch ops); runs a host loop over rows and sequences."""
    from .forms import Dense, keep_mask
    from .reference import attention_reference

    b, hq, n, _ = q.shape
    s = k.shape[2]
    labels = _labels(padding).cpu()
    seq_forms = tuple(forms) or ((Dense(),) * k.shape[1] if causal else ())
    rows = []
    for r in range(b):
        full = q.new_zeros(1, hq, n, v.shape[-1])
        for label in labels[r].unique().tolist():
            slots = (labels[r] == label).nonzero().squeeze(1)
            q_slots = slots[slots >= s - n] - (s - n)            # the sequence's query slots, 0 .. n - 1
            if label == 0 or not len(q_slots):
                continue
            length = len(slots)
            kr = k[r:r + 1, :, slots.to(k.device)]
            vr = v[r:r + 1, :, slots.to(v.device)]
            qr = q[r:r + 1, :, q_slots.to(q.device)]
            if seq_forms and all(getattr(f, "kind", "") != "linear" for f in seq_forms):
                if len(q_slots) == length:                        # every token queries: the sequence alone
                    o = attention_reference(qr, kr, vr, None, False, scale, 0, seq_forms)
                else:                                             # each query at its rank in the sequence
                    ranks = torch.searchsorted(slots, q_slots + (s - n))
                    g_keep = keep_mask(seq_forms, length, length, device=q.device)[:, ranks.to(q.device)]
                    mask = g_keep.repeat_interleave(hq // k.shape[1], 0)[None]        # [1, Hq, n_r, len]
                    o = attention_reference(qr, kr, vr, mask, False, scale)
            elif seq_forms:                                      # linear hybrids: plain causal self-attention
                if len(q_slots) != length:
                    raise ValueError("linear forms in a padded call need every real token among the queries")
                o = attention_reference(qr, kr, vr, None, True, scale, 0, seq_forms)
            else:
                o = attention_reference(qr, kr, vr, None, False, scale)
            full = full.index_copy(2, q_slots.to(q.device), o)
        rows.append(full)
    return torch.cat(rows, 0)


def keep_rows(forms, padding: Tensor, n: int, causal: bool, heads: int) -> Tensor:
    """[B, H or 1, N, S] bool over the compacted keys (rows_of: key t of row b = its t-th token by label then
    slot): what each query slot attends to. Query slot i is key slot S - N + i; a token query sits at its rank
    in its sequence and sees that sequence's keys only, a padding query attends to nothing. forms: one per KV
    group (each at the sequence's own length), or () for plain causal / bidirectional attention."""
    from .forms import ElasticWindow, _keep_one

    order, ordered, rank, length = _sorted(padding)
    s = ordered.shape[1]
    at_slot = torch.zeros_like(rank).scatter(1, order, rank)                    # rank of each slot's token
    length_at_slot = torch.zeros_like(length).scatter(1, order, length)
    labels = _labels(padding)
    q_label, q_pos = labels[:, s - n:, None], at_slot[:, s - n:, None]          # [B, N, 1]
    k_label, k_pos = ordered[:, None, :], rank[:, None, :]                      # [B, 1, S]
    base = (q_label != 0) & (k_label == q_label)                                # [B, N, S]
    if not forms:
        return (base & (k_pos <= q_pos) if causal else base)[:, None]
    windows = row_windows(forms, length_at_slot[:, s - n:])                     # [B, G, N]: each query's span
    # an elastic span per sequence; the other forms are length-free (s only sizes block-sparse tables)
    groups = [base & _keep_one(f, q_pos, k_pos, s, windows[:, g, :, None] if isinstance(f, ElasticWindow) else None)
              for g, f in enumerate(forms)]
    per_group = torch.stack(groups, 1)                                          # [B, G, N, S]
    return per_group.repeat_interleave(heads // len(forms), 1)


def _linear(forms) -> bool:
    return any(getattr(f, "kind", "") == "linear" for f in forms)


def _per_head(forms, heads: int) -> tuple[Tensor, Tensor]:
    """([G] bool, [H] bool): which KV groups, and which of their query heads, are Linear."""
    groups = torch.tensor([getattr(f, "kind", "") == "linear" for f in forms])
    return groups, groups.repeat_interleave(heads // len(forms))


def _select(flags: Tensor, linear: Tensor, other: Tensor) -> Tensor:
    """Per head (dim 1) of [B, H, ...]: `linear` where flags are set, else `other`."""
    return torch.where(flags.to(other.device)[None, :, None, None], linear, other)


def reference(q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool, scale: float, forms=(),
              softcap: float = 0.0) -> Tensor:
    """The padded call in PyTorch (see the module docstring): out [B, H, N, DV], zeros at padding queries.
    Linear groups: causal self-attention over one compacted row per sequence (a linear hybrid is the same at
    every length); every other group through the mask over the compacted keys (its span at the sequence's own
    length)."""
    from .linear import linear_reference
    from .reference import attention_reference

    rows = rows_of(padding)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    out = attention_reference(q, gather(k, rows), gather(v, rows), mask, False, scale, softcap=softcap)
    if not _linear(forms):
        return out
    seqs = segments_of(padding)
    lin = linear_reference(gather(q, seqs), gather(k, seqs), gather(v, seqs), forms, scale)
    return _select(_per_head(forms, q.shape[1])[1], scatter(lin, seqs), out)


def reference_lse(q: Tensor, k: Tensor, padding: Tensor, causal: bool, scale: float, forms=(),
                  softcap: float = 0.0) -> Tensor:
    """[B, H, N] float32 log-sum-exp of the padded call (+inf at padding queries; NaN for linear forms, whose
    gradients never read it)."""
    from .reference import reference_lse as dense_lse

    if _linear(forms):
        return torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    return dense_lse(q, gather(k, rows_of(padding)), mask, False, scale, softcap=softcap)


def reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, padding: Tensor, causal: bool,
                       scale: float, forms=(), softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `reference` (explicit formulas, traceable without Linear groups; zeros at padding slots).
    Each KV group's gradients come from the path that computed it (they touch only that group's K and V)."""
    from .reference import attention_reference_backward

    rows = rows_of(padding)
    mask = keep_rows(forms, padding, q.shape[2], causal, q.shape[1])
    dq, dkc, dvc, _ = attention_reference_backward(grad_out, q, gather(k, rows), gather(v, rows), mask, False, scale,
                                                   softcap=softcap)
    dk, dv = scatter(dkc, rows), scatter(dvc, rows)
    if not _linear(forms):
        return dq, dk, dv
    return with_linear_grads(grad_out, q, k, v, padding, forms, (dq, dk, dv),
                             lambda go, qc, kc, vc: attention_reference_backward(go, qc, kc, vc, None, True, scale, 0,
                                                                                 forms)[:3])


def with_linear_grads(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, padding: Tensor, forms, grads, backward):
    """grads (dq, dk, dv) with the Linear groups' slots replaced by `backward(grad_out, q, k, v)` (causal,
    the Linear groups' gradients) run over each sequence compacted, as the Linear groups' forward ran."""
    seqs = segments_of(padding)         # one compacted row per sequence: causal, so its tail is never seen
    goc = gather(grad_out, seqs).masked_fill(~seqs.valid[:, None, :, None], 0)
    lq, lk, lv = backward(goc, gather(q, seqs), gather(k, seqs), gather(v, seqs))
    groups, heads = _per_head(forms, q.shape[1])
    dq, dk, dv = grads
    return (_select(heads, scatter(lq, seqs), dq), _select(groups, scatter(lk, seqs), dk),
            _select(groups, scatter(lv, seqs), dv))
