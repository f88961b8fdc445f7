"""`torch.ops.attnforge.attention_profile`: exact dense attention whose backward also measures, per KV
head group, what each part of the attention matrix is worth.

Forward: the reference attention. Backward: the same gradients, computed chunk by chunk over query rows
(memory O(chunk * S) per group, never the full N x S), and, for each chunk,

    influence  |dL_ij| = |A_ij (G_ij - sum_n A_in G_in)| / (1 - A_ij) = |dS_ij| / (1 - A_ij)   (MoA)
               with G = dL/dA; the first-order loss change if entry (i, j) is dropped and its row renormalized
    mass       A_ij                                                   (recall of a mask = mass it keeps)
    entropy    -sum_j A_ij log A_ij per row

summed over batch and over the query heads of each KV group, then into block x block tiles; and, for
causal sites, the measured effect of sink + window forms on every row, for each span w of `SPANS`:

    dO_i(w)    = O_i(w) - O_i = (m_i O_i - sum_{j dropped} A_ij V_j) / (1 - m_i)
                 the exact output change of row i when keys SINK <= j <= pos_i - w are dropped and the
                 row renormalized (m_i = dropped mass)
    lin_i(w)   = dL/dO_i . dO_i(w)     the first-order loss change of that exact output change
    window_abs = sum_i |lin_i(w)|, window_sq = sum_i lin_i(w)^2, window_out = sum_i |dO_i(w)|^2

per KV group (summed over its query heads). Unlike entry-wise influence, these see the renormalization of
each row and the cancellation between dropped entries, so a window's predicted error is measured, not
summed from single-entry estimates. The sums go to the active `ProfileCollector` (see `collecting`),
keyed by the site string and the query length.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import ops as _ops  # noqa: F401  (the attention op is registered first)
from .reference import _grouped, _probs, _scores, attention_reference

__all__ = ["ProfileCollector", "collecting", "attention_profile", "CHUNK", "SINK", "SPANS"]

CHUNK = 256
SINK = 64                                              # sink tokens of every measured window form
SPANS = tuple(int(round(16 * 2 ** (k / 2))) for k in range(21))      # 16 .. 16384, steps of sqrt(2)
_active = threading.local()


class ProfileCollector:
    """Accumulates per-(site, length) statistics as float64 numpy arrays."""

    def __init__(self, block: int = 64):
        self.block = block
        self.stats: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.calls = 0

    def add(self, site: str, n: int, **arrays):
        entry = self.stats.setdefault((site, n), {})
        for name, value in arrays.items():
            value = value.detach().double().cpu().numpy()
            entry[name] = entry[name] + value if name in entry else value
        self.calls += 1


@contextlib.contextmanager
def collecting(collector: ProfileCollector):
    prev = getattr(_active, "collector", None)
    _active.collector = collector
    try:
        yield collector
    finally:
        _active.collector = prev


def _block_sum(x: Tensor, block: int, rows_total: int) -> Tensor:
    """[Hkv, c, S] -> [Hkv, ceil(c/block), ceil(S/block)], zero-padded at the ends."""
    h, c, s = x.shape
    pc, ps = -c % block, -s % block
    x = torch.nn.functional.pad(x, (0, ps, 0, pc))
    return x.view(h, (c + pc) // block, block, (s + ps) // block, block).sum((2, 4))


@torch.library.custom_op("attnforge::attention_profile", mutates_args=())
def attention_profile(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, window: int,
                      scale: float, site: str, block: int) -> Tensor:
    return attention_reference(q, k, v, mask, causal, scale, window)


@attention_profile.register_fake
def _(q, k, v, mask, causal, window, scale, site, block):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _setup(ctx, inputs, output):
    q, k, v, mask, causal, window, scale, site, block = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.args = (causal, window, scale, site, block)


def _measure_windows(p: Tensor, vv: Tensor, out: Tensor, g: Tensor, pos0: int, acc: dict) -> None:
    """Add one chunk's window statistics (module docstring) to `acc`. p: [B, Hkv, G, c, S] probabilities
    of query rows at absolute positions pos0 .. pos0 + c - 1; out, g: [B, Hkv, G, c, Dv]."""
    c, s = p.shape[-2], p.shape[-1]
    pos = torch.arange(pos0, pos0 + c, device=p.device)[:, None]
    for wi, w in enumerate(SPANS):
        kmax = min(s, pos0 + c - w)                     # keys j <= pos - w for the chunk's last row
        if kmax <= SINK:
            break                                       # spans only grow: nothing is dropped from here on
        j = torch.arange(kmax, device=p.device)[None, :]
        pd = p[..., :kmax] * ((j >= SINK) & (j <= pos - w))
        m = pd.sum(-1, keepdim=True)
        d_o = (m * out - torch.matmul(pd, vv[..., :kmax, :])) / (1 - m).clamp_min(1e-6)
        lin = (g * d_o).sum(-1)                                                   # [B, Hkv, G, c]
        acc["window_abs"][:, wi] += lin.abs().sum((0, 2, 3)).double()
        acc["window_sq"][:, wi] += lin.square().sum((0, 2, 3)).double()
        acc["window_out"][:, wi] += d_o.square().sum((0, 2, 3, 4)).double()


def _backward(ctx, grad_out):
    q, k, v, mask = ctx.saved_tensors
    causal, window, scale, site, block = ctx.args
    b, hq, n, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    collector = getattr(_active, "collector", None)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = _grouped(q.to(ct), hkv)                                    # [B, Hkv, G, N, D]
    kk, vv = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)          # [B, Hkv, 1, S, D]
    go = _grouped(grad_out.to(ct), hkv)
    dq = torch.empty_like(qg)
    dk = torch.zeros(kk.shape[:2] + kk.shape[3:], dtype=ct, device=q.device)
    dv = torch.zeros(vv.shape[:2] + vv.shape[3:], dtype=ct, device=q.device)
    nb_q, nb_k = math.ceil(n / block), math.ceil(s / block)
    infl = torch.zeros(hkv, nb_q, nb_k, dtype=torch.float64, device=q.device)
    mass = torch.zeros_like(infl)
    entropy = torch.zeros(hkv, dtype=torch.float64, device=q.device)
    measure = collector is not None and causal and not window
    win = {name: torch.zeros(hkv, len(SPANS), dtype=torch.float64, device=q.device)
           for name in ("window_abs", "window_sq", "window_out")}
    chunk = max(block, CHUNK // block * block)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        p = _probs(_scores(q, k, mask, causal, scale, window, row0=r0, row1=r1))    # [B, Hkv, G, c, S]
        g = go[:, :, :, r0:r1]
        out = torch.matmul(p, vv)
        dp = torch.matmul(g, vv.transpose(-1, -2))
        ds = p * (dp - (g * out).sum(-1, keepdim=True))
        dq[:, :, :, r0:r1] = torch.matmul(ds, kk) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qg[:, :, :, r0:r1]).sum(2) * scale
        dv += torch.matmul(p.transpose(-1, -2), g).sum(2)
        if collector is not None:
            i_chunk = (ds.abs() / (1 - p).clamp_min(1e-6)).sum((0, 2))               # [Hkv, c, S]
            qb0 = r0 // block
            ib = _block_sum(i_chunk.double(), block, n)
            infl[:, qb0:qb0 + ib.shape[1]] += ib[:, :, :nb_k]
            mb = _block_sum(p.sum((0, 2)).double(), block, n)
            mass[:, qb0:qb0 + mb.shape[1]] += mb[:, :, :nb_k]
            entropy += -(p * torch.log(p.clamp_min(1e-30))).sum(-1).sum((0, 2, 3)).double()
        if measure:
            _measure_windows(p, vv, out, g, r0 + s - n, win)
    if collector is not None:
        collector.add(site, n, influence=infl, mass=mass, entropy=entropy,
                      rows=torch.tensor(float(b * (hq // hkv) * n)), **(win if measure else {}))
    dmask = None
    return (dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, None, None, None, None, None)


attention_profile.register_autograd(_backward, setup_context=_setup)
