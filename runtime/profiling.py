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
from .reference import _compute_dtype, _grouped, _probs, _scores, attention_reference

__all__ = ["ProfileCollector", "collecting", "capturing", "attention_profile", "CHUNK", "SINK", "SPANS",
           "EVICT_POLICIES", "EVICT_BUDGETS", "EVICT_PARAMS", "EVICT_FRACTION", "evict_form", "LINEAR_CANDIDATES",
           "linear_form", "QUANT_BITS", "QUANT_GROUP", "QUANT_RESIDUAL", "quant_form", "VS_CANDIDATES"]

CHUNK = 256
SINK = 64                                              # sink tokens of every measured window form
WBLOCK = 64                                            # key block of the window measurement's prefix sums
# KV eviction (forms.KVEvict) is measured on the last 1/EVICT_FRACTION of each sample's rows, as if
# they were decoded after the rest as a prompt: per policy and budget, the exact output change when
# the prompt keys the policy would drop are dropped (renormalized), and its loss effect g·dO.
EVICT_FRACTION = 8
EVICT_POLICIES = ("streaming", "h2o", "a2sf", "snapkv")
EVICT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
EVICT_PARAMS = {"sink": 4, "recent": 32, "alpha": 0.99, "pool": 7}


def evict_form(policy: str, budget: float):
    """The KVEvict form the profile measures for (policy, budget)."""
    from .forms import KVEvict

    return KVEvict(policy, budget, **EVICT_PARAMS)
SPANS = tuple(int(round(16 * 2 ** (k / 2))) for k in range(21))      # 16 .. 16384, steps of sqrt(2)
# KV quantization (forms.KVQuant) is measured on the same decode rows as eviction (collector quant=True):
# per bit width, the exact output change when every key / value the cache would hold as codes at that
# row (runtime.kvquant.quantized_tokens) is replaced by what its codes stand for, and its loss effect.
QUANT_BITS = (2, 4, 8)
QUANT_GROUP, QUANT_RESIDUAL = 32, 128


def quant_form(bits: int):
    """The KVQuant form the profile measures for `bits`."""
    from .forms import KVQuant

    return KVQuant(bits, QUANT_GROUP, QUANT_RESIDUAL)
# VerticalSlash (forms.VerticalSlash, MInference) measured when the collector asks (dynamic=True): per
# budget (verticals, slashes beyond block 0 and the diagonal), the block influence its resolution on each
# sample drops ("vs_dropped"), read by the search as the influence loss of a static form is.
VS_CANDIDATES = ((2, 2), (4, 4), (8, 8), (16, 16))
# Linear hybrids (forms.Linear, sink SINK) measured when the collector carries feature maps: per
# candidate, the exact output change of every row and its loss effect, as for the windows.
LINEAR_CANDIDATES = (("taylor2", 64), ("hedgehog", 64), ("taylor2", 256), ("hedgehog", 256))


def linear_form(feature_map: str, window: int, maps: str = ""):
    from .forms import Linear

    return Linear(feature_map, window, SINK, maps)
_active = threading.local()


class ProfileCollector:
    """Accumulates per-(site, length) statistics as float64 numpy arrays."""

    def __init__(self, block: int = 64, linear_maps=None, recall: tuple[int, int, int] | None = None,
                 quant: bool = False, dynamic: bool = False):
        self.block = block
        self.quant = quant                    # measure the KVQuant forms of QUANT_BITS
        self.dynamic = dynamic                # measure the VerticalSlash forms of VS_CANDIDATES
        # (source, target, length) of a recall sample: rows target.. copy keys source..; their attention
        # mass on that source goes to the "recall_mass" statistic
        self.recall = recall
        self.stats: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.calls = 0
        # site string -> {window: [FeatureMaps per KV group]} (None: the site's linear forms are not measured)
        self.linear_maps = linear_maps

    def add(self, site: str, n: int, **arrays):
        entry = self.stats.setdefault((site, n), {})
        for name, value in arrays.items():
            value = value.detach().double().cpu().numpy()
            entry[name] = entry[name] + value if name in entry else value
        self.calls += 1


@contextlib.contextmanager
def _active_as(name: str, value):
    """Set the thread's active `name` (collector or capture store) for the block, restoring the previous."""
    prev = getattr(_active, name, None)
    setattr(_active, name, value)
    try:
        yield value
    finally:
        setattr(_active, name, prev)


def capturing(store: dict):
    """While active, the profiling op's forward appends (q, k, v, scale) (float32, detached) to store[site]:
    the activations the linear forms' feature maps are distilled on."""
    return _active_as("capture", store)


def collecting(collector: ProfileCollector):
    return _active_as("collector", collector)


def _block_sum(x: Tensor, block: int, rows_total: int) -> Tensor:
    """[Hkv, c, S] -> [Hkv, ceil(c/block), ceil(S/block)], zero-padded at the ends."""
    h, c, s = x.shape
    pc, ps = -c % block, -s % block
    x = torch.nn.functional.pad(x, (0, ps, 0, pc))
    return x.view(h, (c + pc) // block, block, (s + ps) // block, block).sum((2, 4))


@torch.library.custom_op("attnforge::attention_profile", mutates_args=())
def attention_profile(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, window: int,
                      scale: float, site: str, block: int, softcap: float = 0.0) -> Tensor:
    store = getattr(_active, "capture", None)
    if softcap:
        # soft-capped scores (Gemma 2): no fused PyTorch kernel computes them; no linear candidate is measured
        return attention_reference(q, k, v, mask, causal, scale, window, softcap=softcap)
    if store is not None and causal and mask is None and not window:
        store.setdefault(site, []).append(tuple(t.detach().float().cpu() for t in (q, k, v)) + (float(scale),))
    if mask is None and not window and k.shape[-2] > 0 and q.shape[1] % k.shape[1] == 0 and (not causal or q.shape[-2] <= k.shape[-2]):
        # The forward only feeds the next layers: PyTorch's fused SDPA (flash on the CPU too) is exact
        # enough and far faster than materializing [B, H, N, S]; the statistics come from the backward.
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    return attention_reference(q, k, v, mask, causal, scale, window)


@attention_profile.register_fake
def _(q, k, v, mask, causal, window, scale, site, block, softcap=0.0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _setup(ctx, inputs, output):
    q, k, v, mask, causal, window, scale, site, block, softcap = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.args = (causal, window, scale, site, block, softcap)


def _measure_windows(p: Tensor, vv: Tensor, out: Tensor, g: Tensor, pos0: int, acc: dict) -> None:
    """Add one chunk's window statistics (module docstring) to `acc`. p: [B, Hkv, G, c, S] probabilities
    of query rows at absolute positions pos0 .. pos0 + c - 1; out, g: [B, Hkv, G, c, Dv].

    A span w drops, for row i, the contiguous keys SINK <= j <= pos_i - w. Their mass and their p-weighted
    values are prefix sums along the keys, taken once per chunk over WBLOCK-key blocks (one batched
    matmul) plus, per span, each row's partial block: O(c * (S / WBLOCK + WBLOCK) * Dv) per span
    instead of a full O(c * S * Dv) product."""
    c, s = p.shape[-2], p.shape[-1]
    if min(s, pos0 + c - SPANS[0]) <= SINK:
        return
    blk = WBLOCK
    nb = -(-s // blk)
    pad = nb * blk - s
    pp = torch.nn.functional.pad(p, (0, pad)) if pad else p
    vp = torch.nn.functional.pad(vv, (0, 0, 0, pad)) if pad else vv
    pb = pp.unflatten(-1, (nb, blk))                                   # [B, Hkv, G, c, nb, blk]
    vb = vp.unflatten(-2, (nb, blk))                                   # [B, Hkv, 1, nb, blk, Dv]
    cum_m = pb.sum(-1).cumsum(-1)                                      # [B, Hkv, G, c, nb]
    cum_pv = torch.einsum("...cnk,...nkd->...cnd", pb, vb.expand(*pb.shape[:3], nb, blk, vb.shape[-1])
                          if vb.shape[2] != pb.shape[2] else vb).cumsum(-2)          # [B, Hkv, G, c, nb, Dv]
    rows = torch.arange(c, device=p.device)
    pos = pos0 + rows

    def prefix(e: Tensor):
        """(mass, p-weighted values) of keys j <= e_i for every row i (e_i >= -1)."""
        full = (e + 1) // blk                                          # whole blocks below the edge
        rem = (e + 1) - full * blk                                     # keys of the partial block
        idx = (full - 1).clamp(min=0)
        m = torch.where(full > 0, cum_m[..., rows, idx], torch.zeros((), dtype=p.dtype, device=p.device))
        pv = torch.where((full > 0)[:, None], cum_pv[..., rows, idx, :], torch.zeros((), dtype=p.dtype, device=p.device))
        part = full.clamp(max=nb - 1)
        keep = (torch.arange(blk, device=p.device)[None, :] < rem[:, None]) & (full < nb)[:, None]   # [c, blk]
        pp_part = pb[..., rows, part, :] * keep                         # [B, Hkv, G, c, blk]
        # the edge grows with the row, so rows sharing a partial block are consecutive: one matmul per
        # run against that block's values (no per-row copy of a [blk, Dv] tile)
        pv_part = torch.empty(pp_part.shape[:-1] + (vb.shape[-1],), dtype=p.dtype, device=p.device)
        cuts = [0] + (torch.nonzero(part[1:] != part[:-1]).flatten() + 1).tolist() + [c]
        for a, b in zip(cuts[:-1], cuts[1:]):
            pv_part[..., a:b, :] = torch.matmul(pp_part[..., a:b, :], vb[..., int(part[a]), :, :])
        return m + pp_part.sum(-1), pv + pv_part

    m0, pv0 = prefix(torch.full_like(pos, SINK - 1))
    for wi, w in enumerate(SPANS):
        if min(s, pos0 + c - w) <= SINK:
            break                                       # spans only grow: nothing is dropped from here on
        e = torch.clamp(pos - w, min=SINK - 1, max=s - 1)
        m_e, pv_e = prefix(e)
        m = (m_e - m0)[..., None]
        d_o = (m * out - (pv_e - pv0)) / (1 - m).clamp_min(1e-6)
        lin = (g * d_o).sum(-1)                                                   # [B, Hkv, G, c]
        acc["window_abs"][:, wi] += lin.abs().sum((0, 2, 3)).double()
        acc["window_sq"][:, wi] += lin.square().sum((0, 2, 3)).double()
        acc["window_out"][:, wi] += d_o.square().sum((0, 2, 3, 4)).double()


class _EvictStats:
    """Column attention of the prompt rows per policy, then the kept sets, then the decode rows' errors."""

    def __init__(self, hkv: int, n: int, s: int, device):
        self.prompt = n - max(1, n // EVICT_FRACTION)
        self.cols = {pol: torch.zeros(hkv, s, dtype=torch.float64, device=device) for pol in ("h2o", "a2sf", "snapkv")}
        self.kept = None
        shape = (hkv, len(EVICT_POLICIES), len(EVICT_BUDGETS))
        self.acc = {name: torch.zeros(shape, dtype=torch.float64, device=device)
                    for name in ("evict_abs", "evict_sq", "evict_out")}

    def prompt_rows(self, p: Tensor, r0: int) -> None:
        """Accumulate the column attention of rows r0.. (positions; N = S) that lie in the prompt."""
        c = min(p.shape[-2], self.prompt - r0)
        if c <= 0:
            return
        pr = p[..., :c, :].sum((0, 2)).double()                  # [Hkv, rows, keys]: batch and query heads summed
        hi = pr.shape[-1]
        rows = torch.arange(r0, r0 + c, device=p.device, dtype=torch.float64)
        self.cols["h2o"][:, :hi] += pr.sum(1)
        w = EVICT_PARAMS["alpha"] ** (self.prompt - 1 - rows)
        self.cols["a2sf"][:, :hi] += torch.einsum("hrk,r->hk", pr, w)
        obs = rows >= self.prompt - EVICT_PARAMS["recent"]
        if bool(obs.any()):
            self.cols["snapkv"][:, :hi] += pr[:, obs].sum(1)

    def _choose(self) -> Tensor:
        """[Hkv, policies, budgets, P] bool: the prompt keys each (policy, budget) keeps."""
        pl = self.prompt
        hkv = self.cols["h2o"].shape[0]
        sink, recent = EVICT_PARAMS["sink"], EVICT_PARAMS["recent"]
        idx = torch.arange(pl, device=self.cols["h2o"].device)
        protected = (idx < sink) | (idx >= pl - recent)
        kept = torch.zeros(hkv, len(EVICT_POLICIES), len(EVICT_BUDGETS), pl, dtype=torch.bool, device=idx.device)
        for pi, pol in enumerate(EVICT_POLICIES):
            if pol != "streaming":
                score = self.cols[pol][:, :pl].clone()
                if pol == "snapkv" and EVICT_PARAMS["pool"] > 1:
                    k = EVICT_PARAMS["pool"]
                    score = torch.nn.functional.avg_pool1d(score[:, None], k, stride=1, padding=k // 2,
                                                           count_include_pad=False)[:, 0, :pl]
                score[:, protected] = float("-inf")
            for bi, b in enumerate(EVICT_BUDGETS):
                count = evict_form(pol, b).kept(pl)
                if pol == "streaming":
                    kept[:, pi, bi] = (idx < sink) | (idx >= pl - (count - sink))
                    continue
                rest = max(0, count - int(protected.sum()))
                mask = protected.expand(hkv, pl).clone()
                if rest:
                    mask.scatter_(1, torch.topk(score, rest, dim=1).indices, True)
                kept[:, pi, bi] = mask
        return kept

    def decode_rows(self, p: Tensor, vv: Tensor, out: Tensor, g: Tensor, r0: int) -> None:
        d0 = max(0, self.prompt - r0)
        if d0 >= p.shape[-2]:
            return
        if self.kept is None:
            self.kept = self._choose()
        pl = self.prompt
        pd_all = p[..., d0:, :pl]                                              # [B, Hkv, G, cd, P]
        o, gg = out[..., d0:, None, :], g[..., d0:, None, :]                   # [B, Hkv, G, cd, 1, Dv]
        n_comb = len(EVICT_POLICIES) * len(EVICT_BUDGETS)
        drop = (~self.kept.flatten(1, 2)).to(p.dtype)                          # [Hkv, C, P]
        # every (policy, budget) at once: dropped mass by one matmul with the drop masks, dropped
        # p-weighted values by one matmul with the masked values laid side by side
        m = torch.matmul(pd_all, drop.transpose(1, 2)[None, :, None])[..., None]          # [B, Hkv, G, cd, C, 1]
        w = (drop[None, :, :, :, None] * vv[:, :, 0, None, :pl, :])                         # [B, Hkv, C, P, Dv]
        pv = torch.matmul(pd_all, w.permute(0, 1, 3, 2, 4).flatten(-2)[:, :, None])         # [B, Hkv, G, cd, C*Dv]
        d_o = (m * o - pv.unflatten(-1, (n_comb, -1))) / (1 - m).clamp_min(1e-6)
        lin = (gg * d_o).sum(-1)                                                            # [B, Hkv, G, cd, C]
        shape = (-1, len(EVICT_POLICIES), len(EVICT_BUDGETS))
        self.acc["evict_abs"] += lin.abs().sum((0, 2, 3)).double().view(shape)
        self.acc["evict_sq"] += lin.square().sum((0, 2, 3)).double().view(shape)
        self.acc["evict_out"] += d_o.square().sum((0, 2, 3, 5)).double().view(shape)


class _QuantStats:
    """KVQuant errors on the decode rows (positions >= prompt, as _EvictStats): row i reads the keys and
    values of positions j < quantized_tokens(i + 1) from their codes, the newer ones exactly. A key
    group's codes do not depend on when it is quantized, so every complete group is quantized once."""

    def __init__(self, kk: Tensor, vv: Tensor, prompt: int):
        from .kvquant import fake_quant

        self.prompt = prompt
        s = kk.shape[-2]
        whole = s // QUANT_GROUP * QUANT_GROUP
        self.dk, self.dv = {}, {}          # what the codes stand for, minus the exact keys / values
        for bits in QUANT_BITS:            # residual 0: every complete group (rows mask what they cannot see)
            kt, vt = fake_quant(kk[..., :whole, :], vv[..., :whole, :], bits, QUANT_GROUP, 0)
            self.dk[bits] = kt.to(kk.dtype) - kk[..., :whole, :]
            self.dv[bits] = vt.to(vv.dtype) - vv[..., :whole, :]
        self.acc = {name: torch.zeros(kk.shape[1], len(QUANT_BITS), dtype=torch.float64, device=kk.device)
                    for name in ("quant_abs", "quant_sq", "quant_out")}

    def decode_rows(self, qg: Tensor, p: Tensor, kh: Tensor, vh: Tensor, out: Tensor, g: Tensor, r0: int,
                    scale: float, softcap: float = 0.0) -> None:
        from .kvquant import quantized_tokens

        d0 = max(0, self.prompt - r0)
        if d0 >= p.shape[-2]:
            return
        rows = torch.arange(r0 + d0, r0 + p.shape[-2], device=p.device)
        lim = torch.tensor([quantized_tokens(int(i) + 1, QUANT_GROUP, QUANT_RESIDUAL) for i in rows.tolist()],
                           device=p.device)
        qmax = int(lim.max())
        if qmax == 0:
            return
        qd, o, gg, pd = qg[..., d0:, :], out[..., d0:, :], g[..., d0:, :], p[..., d0:, :]
        hi = p.shape[-1]
        cols = torch.arange(qmax, device=p.device)
        coded = (cols[None, :] < lim[:, None])                                   # [cd, qmax]
        causal = torch.arange(hi, device=p.device)[None, :] <= rows[:, None]
        # the exact row's log-probabilities (= scores up to a per-row constant), masked past the row
        tiny = torch.finfo(p.dtype).tiny
        base = torch.where(causal, torch.log(pd.clamp_min(tiny)), torch.full((), float("-inf"), dtype=p.dtype,
                                                                             device=p.device))
        for bi, bits in enumerate(QUANT_BITS):
            # swapping coded keys in changes row i's score of key j by scale * q_i . (k~_j - k_j)
            delta = torch.matmul(qd, self.dk[bits][..., :qmax, :].transpose(-1, -2)) * scale
            if softcap:                    # the capped score moves by cap * (tanh((s + delta) / cap) - tanh(s / cap))
                raw = torch.matmul(qd, kh[..., :qmax, :].transpose(-1, -2)) * scale
                delta = softcap * (torch.tanh((raw + delta) / softcap) - torch.tanh(raw / softcap))
            logit = base.clone()
            logit[..., :qmax] += torch.where(coded, delta, torch.zeros((), dtype=p.dtype, device=p.device))
            pq = torch.softmax(logit, -1)
            d_o = torch.matmul(pq, vh) + torch.matmul(pq[..., :qmax] * coded, self.dv[bits][..., :qmax, :]) - o
            lin = (gg * d_o).sum(-1)
            self.acc["quant_abs"][:, bi] += lin.abs().sum((0, 2, 3)).double()
            self.acc["quant_sq"][:, bi] += lin.square().sum((0, 2, 3)).double()
            self.acc["quant_out"][:, bi] += d_o.square().sum((0, 2, 3, 4)).double()


def _measure_linear(qg: Tensor, kh: Tensor, vh: Tensor, out: Tensor, g: Tensor, pos0: int, scale: float,
                    maps: dict, acc: dict) -> None:
    """Add one chunk's linear-hybrid statistics: per candidate of LINEAR_CANDIDATES and group, the exact
    output change dO = O_linear - O of rows pos0 .. (qg [B, Hkv, G, c, D], kh/vh [B, Hkv, 1, hi, D]) and
    its loss effect g . dO, as `_measure_windows` does for the windows."""
    from .linear import linear_group_reference

    hkv = qg.shape[1]
    for ci, (fm, w) in enumerate(LINEAR_CANDIDATES):
        if fm == "hedgehog" and w not in maps:
            raise RuntimeError(f"no distilled hedgehog maps for window {w}: a candidate left unmeasured "
                               "would read as lossless")
        form = linear_form(fm, w)
        if pos0 + qg.shape[-2] - 1 < form.sink + form.window:
            continue                                     # every row of the chunk is exact
        for gi in range(hkv):
            m = None
            if fm == "hedgehog":
                fmaps = maps[w][gi]
                m = (fmaps.wq.to(qg), fmaps.wk.to(qg), fmaps.gain)
            hyb = linear_group_reference(qg[:, gi], kh[:, gi, 0], vh[:, gi, 0], form, scale, pos0, m)
            d_o = hyb - out[:, gi]                                      # [B, G, c, Dv]
            lin = (g[:, gi] * d_o).sum(-1)
            acc["linear_abs"][gi, ci] += lin.abs().sum().double()
            acc["linear_sq"][gi, ci] += lin.square().sum().double()
            acc["linear_out"][gi, ci] += d_o.square().sum().double()


def _measure_recall(p: Tensor, r0: int, recall: tuple[int, int, int], block: int, acc: Tensor) -> None:
    """Add to acc [Hkv, nbq, nbk] the block-summed attention mass of this chunk's copied rows (absolute
    rows target .. target + length - 1; queries = keys) on the keys they copy (source .. source + length - 1)."""
    source, target, length = recall
    a, b = max(r0, target), min(r0 + p.shape[-2], target + length)
    if a >= b:
        return
    hi = min(p.shape[-1], source + length)
    sub = p[..., a - r0:b - r0, source:hi].sum((0, 2)).double()              # [Hkv, rows, keys]
    # place the rectangle at its absolute offsets, then sum into tiles
    qa, ka = a // block * block, source // block * block
    tile = torch.zeros(sub.shape[0], b - qa, hi - ka, dtype=torch.float64, device=p.device)
    tile[:, a - qa:, source - ka:] = sub
    t = _block_sum(tile, block, 0)
    acc[:, qa // block:qa // block + t.shape[1], ka // block:ka // block + t.shape[2]] += t


def _vs_dropped(q: Tensor, k: Tensor, scale: float, softcap: float, infl: Tensor, block: int) -> Tensor:
    """[Hkv, len(VS_CANDIDATES)]: the block influence (this sample's, `infl` [Hkv, nb, nb]) that each
    VerticalSlash candidate drops on this input, resolved as the op resolves it (runtime.dynamic)."""
    from .dynamic import candidates

    nb = infl.shape[1]
    qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    out = torch.zeros(infl.shape[0], len(VS_CANDIDATES), dtype=torch.float64)
    for g, forms in enumerate(candidates(q, k, scale, VS_CANDIDATES, block, softcap)):
        for ci, f in enumerate(forms):
            keep = (torch.isin(kb, torch.tensor(f.verticals)) | torch.isin(qb - kb, torch.tensor(f.slashes))) & (kb <= qb)
            out[g, ci] = (infl[g].cpu() * ~keep).sum()
    return out


def _backward(ctx, grad_out):
    q, k, v, mask = ctx.saved_tensors
    causal, window, scale, site, block, softcap = ctx.args
    b, hq, n, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    collector = getattr(_active, "collector", None)
    ct = _compute_dtype(q.dtype)
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
    evict = _EvictStats(hkv, n, s, q.device) if measure and n == s and n >= 2 * EVICT_FRACTION else None
    win = {name: torch.zeros(hkv, len(SPANS), dtype=torch.float64, device=q.device)
           for name in ("window_abs", "window_sq", "window_out")}
    lin_maps = collector.linear_maps(site) if measure and n == s and collector.linear_maps is not None \
        and not softcap else None          # linear forms do not compute soft-capped scores: not candidates
    lin = ({name: torch.zeros(hkv, len(LINEAR_CANDIDATES), dtype=torch.float64, device=q.device)
            for name in ("linear_abs", "linear_sq", "linear_out")} if lin_maps is not None else None)
    recall = collector.recall if measure and n == s else None
    quant = (_QuantStats(kk, vv, evict.prompt) if evict is not None and collector.quant else None)
    recall_mass = torch.zeros_like(infl) if recall is not None else None
    chunk = max(block, CHUNK // block * block)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        # causal (top-left): the chunk's rows see keys j < r1 only; the rest would be exp(-inf) = 0 work
        hi = min(s, r1) if causal else s
        km = mask[..., :hi] if mask is not None and mask.shape[-1] == s else mask
        scores, dcap = _scores(q, k[:, :, :hi], km, causal, scale, window, row0=r0, row1=r1, softcap=softcap,
                               cap_grad=True)
        p = _probs(scores)                                                          # [B, Hkv, G, c, hi]
        g = go[:, :, :, r0:r1]
        vh, kh = vv[..., :hi, :], kk[..., :hi, :]
        out = torch.matmul(p, vh)
        dp = torch.matmul(g, vh.transpose(-1, -2))
        ds = p * (dp - (g * out).sum(-1, keepdim=True))      # on the probabilities' logits: what influence reads
        dsc = ds * dcap if softcap else ds                   # through the soft-cap, for the gradients
        dq[:, :, :, r0:r1] = torch.matmul(dsc, kh) * scale
        dk[:, :, :hi] += torch.matmul(dsc.transpose(-1, -2), qg[:, :, :, r0:r1]).sum(2) * scale
        dv[:, :, :hi] += torch.matmul(p.transpose(-1, -2), g).sum(2)
        if collector is not None:
            i_chunk = (ds.abs() / (1 - p).clamp_min(1e-6)).sum((0, 2))               # [Hkv, c, hi]
            qb0 = r0 // block
            ib = _block_sum(i_chunk.double(), block, n)
            infl[:, qb0:qb0 + ib.shape[1], :ib.shape[2]] += ib[:, :, :nb_k]
            mb = _block_sum(p.sum((0, 2)).double(), block, n)
            mass[:, qb0:qb0 + mb.shape[1], :mb.shape[2]] += mb[:, :, :nb_k]
            entropy -= torch.special.xlogy(p, p).sum((0, 2, 3, 4)).double()
        if measure:
            _measure_windows(p, vh, out, g, r0 + s - n, win)
        if evict is not None:
            evict.prompt_rows(p, r0)
            evict.decode_rows(p, vh, out, g, r0)
        if recall is not None:
            _measure_recall(p, r0, recall, block, recall_mass)
        if quant is not None:
            quant.decode_rows(qg[:, :, :, r0:r1], p, kh, vh, out, g, r0, scale, softcap)
        if lin is not None:
            _measure_linear(qg[:, :, :, r0:r1], kh, vh, out, g, r0 + s - n, scale, lin_maps, lin)
    vs = _vs_dropped(q, k, scale, softcap, infl, block) if measure and n == s and collector.dynamic else None
    if collector is not None:
        collector.add(site, n, influence=infl, mass=mass, entropy=entropy,
                      **({"vs_dropped": vs} if vs is not None else {}),
                      rows=torch.tensor(float(b * (hq // hkv) * n)), **(win if measure else {}),
                      **(evict.acc if evict is not None else {}), **(lin or {}),
                      **({"recall_mass": recall_mass} if recall is not None else {}),
                      **(quant.acc if quant is not None else {}))
    dmask = None
    return (dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask, None, None, None, None, None, None)


attention_profile.register_autograd(_backward, setup_context=_setup)
