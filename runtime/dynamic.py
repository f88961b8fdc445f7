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
and one host read of the chosen blocks per call.
"""
from __future__ import annotations

import torch

from .forms import BlockSparse, VerticalSlash

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
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(s - last, s, device=q.device)[:, None]                          # query positions
    cols = torch.arange(s, device=q.device)[None, :]
    a = torch.softmax(scores.masked_fill(cols > pos, float("-inf")), -1).sum((0, 1))   # [last, S]
    blk = form.block
    nb = -(-s // blk)
    per_key = torch.zeros(nb, device=q.device).index_add_(0, cols[0] // blk, a.sum(0))
    diag = (pos // blk - cols // blk).clamp(min=0)                                      # [last, S]
    per_diag = torch.zeros(nb, device=q.device).index_add_(0, diag.flatten(), a.flatten())
    return per_key, per_diag


def _top(mass: torch.Tensor, count: int) -> tuple[int, ...]:
    """Index 0 and the `count` other indices of most mass (ties: the lower index)."""
    rest = mass[1:]
    count = min(count, rest.numel())
    if count <= 0:
        return (0,)
    # stable order: sort by mass descending, index ascending (topk's tie order is not specified)
    order = torch.sort(rest, descending=True, stable=True).indices[:count] + 1
    return (0,) + tuple(sorted(order.tolist()))


def resolve(forms, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float = 0.0) -> tuple:
    """forms with every VerticalSlash replaced by the BlockSparse form this input gives it (module docstring).
    q [B, Hq, N, D], k [B, Hkv, S, D]; one form per KV group."""
    if not dynamic(forms):
        return tuple(forms)
    hkv = k.shape[1]
    if len(forms) != hkv:
        raise ValueError(f"{len(forms)} forms for {hkv} key/value heads; give one per KV head group")
    r = q.shape[1] // hkv
    out = []
    with torch.no_grad():
        for g, f in enumerate(forms):
            if not isinstance(f, VerticalSlash):
                out.append(f)
                continue
            per_key, per_diag = block_mass(f, q[:, g * r:(g + 1) * r], k[:, g], scale, softcap)
            out.append(BlockSparse(f.block, _top(per_key, f.verticals), _top(per_diag, f.slashes)))
    return tuple(out)


def candidates(q: torch.Tensor, k: torch.Tensor, scale: float, counts, block: int, softcap: float = 0.0,
               last_q: int = 64) -> list[list[BlockSparse]]:
    """[KV group][candidate]: the BlockSparse form each VerticalSlash(verticals, slashes) of `counts` resolves
    to on this input (one estimate per group serves every budget): what the profile scores them by."""
    hkv = k.shape[1]
    r = q.shape[1] // hkv
    probe = VerticalSlash(0, 0, block=block, last_q=last_q)
    out = []
    with torch.no_grad():
        for g in range(hkv):
            per_key, per_diag = block_mass(probe, q[:, g * r:(g + 1) * r], k[:, g], scale, softcap)
            out.append([BlockSparse(block, _top(per_key, nv), _top(per_diag, ns)) for nv, ns in counts])
    return out
