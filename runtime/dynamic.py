"""Dynamic forms resolved per input: MInference's vertical-slash estimate.

    resolve(forms, q, k, scale, softcap=0.0) -> forms     every VerticalSlash replaced by a BlockSparse form

For a VerticalSlash group (forms.VerticalSlash), the last `last_q` queries of every query head of the group
attend (exactly: causal, soft-capped if the site is, in float32) over all keys; their attention mass, summed
over heads, queries and the batch, is pooled

    per key block kb                    -> the `verticals` blocks with the most mass (key block 0 on top)
    per block diagonal d = qb - kb      -> the `slashes` diagonals with the most mass (diagonal 0 on top)

(qb the block of the query's position, kb the key's): which columns every query needs (sinks, retrieved
tokens) and which distances (local and periodic structure), as MInference estimates them from the last 64
queries. The result is an ordinary BlockSparse form, run exactly by the plan kernel and the reference; the
same inputs always resolve to the same form (the autograd-free forward and any rerun agree). A batch shares
one resolution (its rows' mass summed), as one call runs one set of forms. Costs O(last_q * S * D) per group
and one host read of every group's chosen blocks per call.
"""
from __future__ import annotations

import torch

from .forms import BlockSparse, VerticalSlash
from .reference import soft_cap

__all__ = ["resolve", "dynamic", "block_mass", "candidates"]


def dynamic(forms) -> bool:
    """Whether some form is resolved per input."""
    return any(isinstance(f, VerticalSlash) for f in forms)


def block_mass(form: VerticalSlash, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float = 0.0):
    """(per key block [nb], per block diagonal [nb]) float32 attention mass of the last queries of q
    [B, r, N, D] (the group's query heads) over k [B, S, D]; queries at the last N of S positions."""
    b, r, n, _ = q.shape
    s = k.shape[1]
    last = min(form.last_q, n)
    qs = q[:, :, n - last:].float()
    scores = torch.matmul(qs, k.float()[:, None].transpose(-1, -2)) * scale           # [B, r, last, S]
    scores = soft_cap(scores, softcap)
    pos = torch.arange(s - last, s, device=q.device)[:, None]                          # query positions
    cols = torch.arange(s, device=q.device)[None, :]
    a = torch.softmax(scores.masked_fill(cols > pos, float("-inf")), -1).sum((0, 1))   # [last, S]
    blk = form.block
    nb = -(-s // blk)
    per_key = torch.zeros(nb, device=q.device).index_add_(0, cols[0] // blk, a.sum(0))
    diag = (pos // blk - cols // blk).clamp(min=0)                                      # [last, S]
    per_diag = torch.zeros(nb, device=q.device).index_add_(0, diag.flatten(), a.flatten())
    return per_key, per_diag


def _tops(requests) -> list[tuple[int, ...]]:
    """For each (mass [nb], count): index 0 and the `count` other indices of most mass (ties: the lower index),
    sorted; every request's indices come to the host in one transfer (one synchronization per call)."""
    picks = []
    for mass, count in requests:
        count = min(count, mass.numel() - 1)
        # stable order: mass descending, index ascending (topk's order among ties is not specified)
        picks.append(torch.sort(mass[1:], descending=True, stable=True).indices[:max(count, 0)] + 1)
    flat = torch.cat(picks).tolist() if picks else []
    out, at = [], 0
    for p in picks:
        out.append((0,) + tuple(sorted(flat[at:at + p.numel()])))
        at += p.numel()
    return out


def resolve(forms, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float = 0.0) -> tuple:
    """forms with every VerticalSlash replaced by the BlockSparse form this input gives it (module docstring).
    q [B, Hq, N, D], k [B, Hkv, S, D]; one form per KV group."""
    if not dynamic(forms):
        return tuple(forms)
    hkv = k.shape[1]
    if len(forms) != hkv:
        raise ValueError(f"{len(forms)} forms for {hkv} key/value heads; give one per KV head group")
    r = q.shape[1] // hkv
    out, requests = list(forms), []
    with torch.no_grad():
        groups = [g for g, f in enumerate(forms) if isinstance(f, VerticalSlash)]
        for g in groups:
            per_key, per_diag = block_mass(forms[g], q[:, g * r:(g + 1) * r], k[:, g], scale, softcap)
            requests += [(per_key, forms[g].verticals), (per_diag, forms[g].slashes)]
        picks = _tops(requests)
    for i, g in enumerate(groups):
        out[g] = BlockSparse(forms[g].block, picks[2 * i], picks[2 * i + 1])
    return tuple(out)


def candidates(q: torch.Tensor, k: torch.Tensor, scale: float, counts, block: int, softcap: float = 0.0,
               last_q: int = 64) -> list[list[BlockSparse]]:
    """[KV group][candidate]: the BlockSparse form each VerticalSlash(verticals, slashes) of `counts` resolves
    to on this input (one estimate per group serves every budget): what the profile scores them by."""
    hkv = k.shape[1]
    r = q.shape[1] // hkv
    probe = VerticalSlash(0, 0, block=block, last_q=last_q)
    requests = []
    with torch.no_grad():
        for g in range(hkv):
            per_key, per_diag = block_mass(probe, q[:, g * r:(g + 1) * r], k[:, g], scale, softcap)
            requests += [req for nv, ns in counts for req in ((per_key, nv), (per_diag, ns))]
        picks = _tops(requests)
    c = len(counts)
    return [[BlockSparse(block, picks[2 * (g * c + j)], picks[2 * (g * c + j) + 1]) for j in range(c)]
            for g in range(hkv)]
