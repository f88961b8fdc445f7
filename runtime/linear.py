"""Linear-attention forms: a softmax window plus linear attention over the rest, one normalizer (LoLCATs).

For a KV group with form `Linear(feature_map, window, sink, maps)`, query row i at position p sees

    exact keys  E_p = { j <= p : j < sink  or  j > p - window }    weight  exp(s_pj - m_p)
    linear keys L_p = { sink <= j <= p - window }                    weight  c_p * kappa(q_p, k_j)

with s = q.k * scale, m_p = max_{j in E_p} s_pj (finite: E_p holds the query's own key), and
    out_p = sum_j weight_pj v_j / sum_j weight_pj.
Feature maps:
    taylor2   kappa = 1 + s + s^2 / 2  (parameter-free, > 0 everywhere); c_p = exp(-m_p), so the linear
              weights approximate the same exp(s) the window uses (the form is softmax with exp replaced
              by its 2nd-order Taylor expansion outside the window). Feature dim 1 + d + d^2.
    hedgehog  kappa = gain * phi_q(q) . phi_k(k), phi(x) = softmax([x W, -x W]) over 2d features, one
              W_q, W_k (d x d, initialized to the identity) and gain per KV group, distilled so the
              hybrid's output matches dense attention (`distill`); c_p = 1 (LoLCATs: the window's
              exp(s - m) and the maps learn one scale). Feature dim 2d.
The learned maps live in a `FeatureMaps` store keyed by a content hash (the form's `maps` field), saved
beside the plan as .npz (no pickle) and registered with `register_maps` before a plan with hedgehog
heads runs.

`linear_reference` is the float64-capable oracle (quadratic, chunked over query rows); the Triton kernels
(codegen/templates/linear_fwd.py.j2) compute the same thing chunk by chunk with a running state.
"""
from __future__ import annotations

import copy
import hashlib
import math
import threading

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .reference import _compute_dtype

__all__ = ["FEATURE_MAPS", "FeatureMaps", "register_maps", "maps_for", "feature_dim", "phi", "linear_reference",
           "linear_group_reference", "distill", "LinearMapError", "ROW_CHUNK", "decode_step_reference",
           "LinearState", "linear_triton", "set_kernel_factory", "kernel_key", "linear_group_chunked",
           "linear_backward"]

FEATURE_MAPS = ("taylor2", "hedgehog")
ROW_CHUNK = 512


class LinearMapError(KeyError):
    """A hedgehog form whose learned feature maps are not loaded."""

    def __str__(self):
        return str(self.args[0])


def feature_dim(feature_map: str, head_dim: int) -> int:
    return 1 + head_dim + head_dim * head_dim if feature_map == "taylor2" else 2 * head_dim


class FeatureMaps:
    """Learned hedgehog maps of one KV group: wq, wk [D, D] and a scalar gain, float32 tensors."""

    __slots__ = ("wq", "wk", "gain")

    def __init__(self, wq, wk, gain):
        self.wq = torch.as_tensor(np.asarray(wq, dtype=np.float32))
        self.wk = torch.as_tensor(np.asarray(wk, dtype=np.float32))
        self.gain = float(gain)
        d = self.wq.shape[0]
        if self.wq.shape != (d, d) or self.wk.shape != (d, d):
            raise ValueError(f"feature maps must be square [D, D], got {tuple(self.wq.shape)}, {tuple(self.wk.shape)}")

    def key(self) -> str:
        h = hashlib.sha256()
        for t in (self.wq, self.wk):
            h.update(t.numpy().astype(np.float32).tobytes())
        h.update(np.float64(self.gain).tobytes())
        return "hh-" + h.hexdigest()[:20]

    def arrays(self) -> dict:
        return {"wq": self.wq.numpy(), "wk": self.wk.numpy(), "gain": np.array(self.gain, dtype=np.float64)}


_store: dict[str, FeatureMaps] = {}
_lock = threading.Lock()


def register_maps(maps) -> list[str]:
    """Register FeatureMaps (one, a list, or a {key: FeatureMaps} dict); returns their keys."""
    items = maps.values() if isinstance(maps, dict) else (maps if isinstance(maps, (list, tuple)) else [maps])
    keys = []
    with _lock:
        for m in items:
            k = m.key()
            _store[k] = m
            keys.append(k)
    return keys


def maps_for(key: str) -> FeatureMaps:
    try:
        return _store[key]
    except KeyError:
        raise LinearMapError(f"the hedgehog feature maps {key!r} are not loaded: load the plan with its "
                             "sidecar file (plan.maps.npz next to plan.json, written by `attnforge search`), "
                             "or register them with attnforge.runtime.linear.register_maps") from None


def phi(x: Tensor, w: Tensor) -> Tensor:
    """Hedgehog feature map: softmax([x W, -x W]) over the last dim ([..., D] -> [..., 2D])."""
    y = torch.matmul(x, w.to(x.dtype))
    return torch.softmax(torch.cat([y, -y], -1), -1)


def _form_maps(form, device, dtype):
    if form.feature_map != "hedgehog":
        return None
    m = maps_for(form.maps)
    return m.wq.to(device, dtype), m.wk.to(device, dtype), m.gain


def linear_group_reference(qg: Tensor, kg: Tensor, vg: Tensor, form, scale: float, row0: int | Tensor = 0,
                           maps=None) -> Tensor:
    """One KV group: qg [B, G, n, D] at positions row0 .. row0 + n - 1 (or at the sorted positions of a
    tensor `row0`), kg [B, S, D], vg [B, S, Dv] -> [B, G, n, Dv], in qg's dtype (use float64 inputs for an
    oracle). `maps` overrides the form's registered maps: (wq, wk, gain) tensors (distillation passes its
    parameters here)."""
    n, s = qg.shape[-2], kg.shape[-2]
    if maps is None:
        maps = _form_maps(form, qg.device, qg.dtype)
    rows = row0[:, None] if isinstance(row0, Tensor) else torch.arange(row0, row0 + n, device=qg.device)[:, None]
    cols = torch.arange(s, device=qg.device)[None, :]
    causal = cols <= rows
    exact = causal & ((cols < form.sink) | (cols > rows - form.window))
    lin = causal & ~exact
    sc = torch.matmul(qg, kg.unsqueeze(1).transpose(-1, -2)) * scale                 # [B, G, n, S]
    m = sc.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)
    w_exact = torch.exp(sc - m).masked_fill(~exact, 0.0)
    if form.feature_map == "taylor2":
        kappa = (1 + sc + 0.5 * sc * sc) * torch.exp(-m)
    else:
        wq, wk, gain = maps
        kappa = torch.matmul(phi(qg, wq), phi(kg, wk).unsqueeze(1).transpose(-1, -2)) * gain
    w = w_exact + kappa.masked_fill(~lin, 0.0)
    return torch.matmul(w, vg.unsqueeze(1)) / w.sum(-1, keepdim=True)


def linear_reference(q: Tensor, k: Tensor, v: Tensor, forms, scale: float | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Fill the output of every Linear group of `forms` (queries at the last N of S positions), chunked
    over query rows so memory stays O(ROW_CHUNK * S). Groups that are not Linear are left as in `out`
    (zeros when `out` is None). Math in float64 for float64 inputs, else float32."""
    from .forms import Linear

    b, hq, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    if out is None:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for gi, form in enumerate(forms):
        if not isinstance(form, Linear):
            continue
        maps = _form_maps(form, q.device, ct)
        qg = q[:, gi * g:(gi + 1) * g].to(ct)
        kg, vg = k[:, gi].to(ct), v[:, gi].to(ct)
        for r0 in range(0, n, ROW_CHUNK):
            r1 = min(n, r0 + ROW_CHUNK)
            hi = s - n + r1                                   # keys a row of this chunk can see
            o = linear_group_reference(qg[:, :, r0:r1], kg[:, :hi], vg[:, :hi], form, scale, s - n + r0, maps)
            out[:, gi * g:(gi + 1) * g, r0:r1] = o.to(out.dtype)
    return out


def _taylor2_features(x: Tensor, scale: float) -> Tensor:
    """[..., D] -> [..., 1 + D + D (D + 1) / 2] with phi(q) . phi(k) = 1 + s + s^2 / 2, s = q.k * scale: the
    (q.k)^2 term from the upper triangle of x x^T (a < b weighed twice), half the D^2 of the full product."""
    d = x.shape[-1]
    a, b = torch.triu_indices(d, d, device=x.device)
    weight = torch.full(a.shape, scale, dtype=x.dtype, device=x.device).masked_fill(a == b, scale / math.sqrt(2))
    pairs = (x[..., :, None] * x[..., None, :]).flatten(-2).index_select(-1, a * d + b) * weight
    return torch.cat([torch.ones_like(x[..., :1]), x * math.sqrt(scale), pairs], -1)


def linear_group_chunked(qg: Tensor, kg: Tensor, vg: Tensor, form, scale: float, maps=None,
                         chunk: int = 64) -> Tensor:
    """The same as linear_group_reference for causal self-attention (qg [B, G, N, D], kg [B, N, D],
    vg [B, N, Dv], positions 0 .. N-1), computed chunk by chunk as the Triton kernel does, in plain
    differentiable PyTorch: per query chunk of `chunk` rows, the exact part over its sink keys and the
    keys of its window span, the linear part from the prefix of the key chunks' states
    phi(K_c)^T V_c (chunks wholly below every row's window) plus a band of at most 2 chunks weighed key
    by key. Time and memory are linear in N: O(N (sink + window + chunk) G) scores and O(N F (G + Dv /
    chunk)) features and states, F the feature dim (taylor2: 1 + D + D (D+1) / 2; hedgehog: 2D), instead of the
    reference's N x N. Autograd through it gives the hybrid's gradients (the op's backward)."""
    n = qg.shape[2]
    c = chunk
    nc = -(-n // c)
    npad = nc * c
    dev = qg.device
    if maps is None:
        maps = _form_maps(form, dev, qg.dtype)
    # rows past N (zeros) are positions N .. npad-1: causal, so no real row sees them; each sees itself
    qp = torch.nn.functional.pad(qg, (0, 0, 0, npad - n))
    kp = torch.nn.functional.pad(kg, (0, 0, 0, npad - n))
    vp = torch.nn.functional.pad(vg, (0, 0, 0, npad - n))
    qc = qp.unflatten(2, (nc, c))                                      # [B, G, nc, C, D]
    rows = torch.arange(npad, device=dev).view(nc, c)[:, :, None]      # [nc, C, 1]
    i0 = torch.arange(nc, device=dev) * c
    win, sink = form.window, min(form.sink, npad)

    # ---- exact part: the sink keys, then the span i0 + C - E_w .. i0 + C - 1 that holds every window
    e_w = min(win + c - 1, npad)
    span = (i0[:, None] + c - e_w).clamp(min=0) + torch.arange(e_w, device=dev)[None, :]
    idx = torch.cat([torch.arange(sink, device=dev).expand(nc, sink), span], 1)      # [nc, E]
    j = idx[:, None, :]
    in_window = (span[:, None, :] > rows - win) & (span[:, None, :] >= form.sink)        # [nc, C, E_w]
    keep = (j <= rows) & torch.cat([torch.ones(nc, c, sink, dtype=torch.bool, device=dev), in_window], 2)
    ke, ve = kp[:, idx], vp[:, idx]                                    # [B, nc, E, D]
    s = torch.einsum("bgcid,bced->bgcie", qc, ke) * scale
    s = s.masked_fill(~keep, float("-inf"))                            # every row keeps its own key
    m = s.amax(-1, keepdim=True)
    w = torch.exp(s - m)
    num = torch.einsum("bgcie,bcev->bgciv", w, ve)
    den = w.sum(-1)

    # ---- linear part: the keys sink <= j <= p - window
    if form.feature_map == "taylor2":
        fk = _taylor2_features(kp, scale)
    else:
        wq, wk, gain = maps
        fk = phi(kp, wk)
    fk = fk.masked_fill((torch.arange(npad, device=dev) < form.sink)[:, None], 0.0)
    fkc = fk.unflatten(1, (nc, c))                                     # [B, nc, C, F]
    states = torch.einsum("bcjf,bcjv->bcfv", fkc, vp.unflatten(1, (nc, c)))
    zs = fkc.sum(2)
    cstar = (i0 - win + 1).clamp(min=0) // c                           # chunks < cstar: linear for every row
    prefix = torch.cat([torch.zeros_like(states[:, :1]), states.cumsum(1)[:, :-1]], 1)[:, cstar]
    zprefix = torch.cat([torch.zeros_like(zs[:, :1]), zs.cumsum(1)[:, :-1]], 1)[:, cstar]
    band = cstar[:, None] * c + torch.arange(2 * c, device=dev)[None, :]               # [nc, 2C]
    jb = band[:, None, :]
    lin = (jb >= form.sink) & (jb <= rows - win) & (jb < npad)
    band = band.clamp(max=npad - 1)
    kb, vb = kp[:, band], vp[:, band]                                  # [B, nc, 2C, D]
    if form.feature_map == "taylor2":
        x = torch.einsum("bgcid,bced->bgcie", qc, kb) * scale
        kappa = 1 + x + 0.5 * x * x
        fq = _taylor2_features(qc, scale)
    else:
        fq = phi(qc, wq) * gain
        kappa = torch.einsum("bgcif,bcef->bgcie", fq, fk[:, band])
    kappa = kappa.masked_fill(~lin, 0.0)
    num_l = torch.einsum("bgcif,bcfv->bgciv", fq, prefix) + torch.einsum("bgcie,bcev->bgciv", kappa, vb)
    den_l = torch.einsum("bgcif,bcf->bgci", fq, zprefix) + kappa.sum(-1)
    # one normalizer (see the module docstring): taylor2's linear weights carry exp(-m), hedgehog's the gain
    cm = torch.exp(-m) if form.feature_map == "taylor2" else torch.ones_like(m)
    out = (num + cm * num_l) / (den + cm[..., 0] * den_l)[..., None]
    return out.flatten(2, 3)[:, :, :n]


def linear_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, forms, scale: float,
                    grads: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of the Linear groups of `forms` (causal self-attention, q [B, Hq, N, D]), by autograd
    through linear_group_chunked (linear in N). The slots of the other groups are left as in `grads`
    (zeros when None). Math in float64 for float64 inputs, else float32."""
    from .forms import Linear

    g = q.shape[1] // k.shape[1]
    ct = _compute_dtype(q.dtype)
    dq, dk, dv = grads if grads is not None else (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    for gi, form in enumerate(forms):
        if not isinstance(form, Linear) or q.shape[2] == 0:     # (no rows: nothing to differentiate)
            continue
        heads = slice(gi * g, (gi + 1) * g)
        maps = _form_maps(form, q.device, ct)
        # torch.func.vjp, not torch.autograd.grad: this runs inside a custom op, below the autograd keys
        _, vjp = torch.func.vjp(lambda a, b, c, form=form, maps=maps: linear_group_chunked(a, b, c, form, scale, maps),
                                q[:, heads].to(ct), k[:, gi].to(ct), v[:, gi].to(ct))
        gq, gk, gv = vjp(grad_out[:, heads].to(ct))
        dq[:, heads], dk[:, gi], dv[:, gi] = gq.to(dq.dtype), gk.to(dk.dtype), gv.to(dv.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------- decoding
class LinearState:
    """Constant-size decoding state of one Linear KV group: the exact part's keys (sink + a ring of the
    last `window`) and the linear part's running sums over the keys that left the window, kept in the
    Triton kernel's part layout (parts of [D, Dv]):
        S[a] = sum_j phi_a(k_j)^T v_j   [A, BD, BDV]     z[a] = sum_j phi_a(k_j)   [A, BD]
        S0 = sum_j phi_0(k_j) v_j       [BDV]            z0 = sum_j phi_0(k_j)
    taylor2: phi_a(k) = k * k_a * scale / sqrt(2) (a < D), phi_D(k) = k * sqrt(scale), phi_0 = 1, so that
    phi(q).phi(k) = 1 + s + s^2 / 2; hedgehog: the two softmax halves, phi_0 = 0.
    The exact keys live in one buffer of min(sink + window, max_length) slots allocated up front: position
    p < sink at slot p, a later one at sink + (p - sink) % window, so the key a new position overwrites is
    the one leaving the window, which moves into the sums first; the filled slots are always a prefix,
    which attend reads in place. Positions are counted on the host: no step reads the device.
    Memory does not grow with the sequence: (sink + window) * (D + Dv) + A * D * (Dv + 1) numbers per group.
    `attend(q, impl="triton")` reads it with the decode kernel (CUDA, or the interpreter on the CPU)."""

    def __init__(self, form, head_dim: int, value_dim: int, scale: float, device=None, dtype=torch.float32,
                 max_length: int | None = None, kv_dtype=None):
        self.form, self.scale, self.d, self.dv = form, scale, head_dim, value_dim
        self.maps = _form_maps(form, device, dtype)
        self.parts = 2 if form.feature_map == "hedgehog" else head_dim + 1
        bd = max(16, 1 << (head_dim - 1).bit_length())
        bdv = max(16, 1 << (value_dim - 1).bit_length())
        self.S = torch.zeros(self.parts, bd, bdv, device=device, dtype=dtype)
        self.z = torch.zeros(self.parts, bd, device=device, dtype=dtype)
        self.S0 = torch.zeros(bdv, device=device, dtype=dtype)
        self.z0 = torch.zeros(1, device=device, dtype=dtype)
        slots = form.sink + form.window if max_length is None else min(form.sink + form.window, max_length)
        self.max_length = max_length
        self.ke = torch.zeros(slots, head_dim, device=device, dtype=kv_dtype or dtype)
        self.ve = torch.zeros(slots, value_dim, device=device, dtype=kv_dtype or dtype)
        self.length = 0

    @property
    def exact(self) -> int:
        """How many exact keys (sink + window at most) it holds."""
        return min(self.length, self.form.sink + self.form.window)

    def _slot(self, p: int) -> int:
        sink = self.form.sink
        return p if p < sink else sink + (p - sink) % self.form.window

    def _index(self, positions):
        """Their slots: a slice for one position (a decoding step: no index copied to the device), else a
        tensor."""
        if len(positions) == 1:
            s = self._slot(positions[0])
            return slice(s, s + 1)
        return torch.tensor([self._slot(p) for p in positions], dtype=torch.long, device=self.ke.device)

    def features(self, x: Tensor, query: bool) -> tuple[Tensor, float]:
        """(phi_a(x) [..., A, D], phi_0)"""
        if self.form.feature_map == "taylor2":
            outer = x[..., None, :] * x[..., :, None] * (self.scale / math.sqrt(2))       # [..., D(a), D]
            return torch.cat([outer, (x * math.sqrt(self.scale))[..., None, :]], -2), 1.0
        wq, wk, gain = self.maps
        f = phi(x, wq) * gain if query else phi(x, wk)
        return torch.stack([f[..., :self.d], f[..., self.d:]], -2), 0.0

    def _absorb(self, kk: Tensor, vv: Tensor) -> None:
        """Keys [T, D] / values [T, Dv] that left the window, into the running sums."""
        kk, vv = kk.to(self.S.dtype), vv.to(self.S.dtype)
        f, f0 = self.features(kk, query=False)                       # [T, A, D]
        self.S[:, :self.d, :self.dv] += torch.einsum("tad,tv->adv", f, vv)
        self.z[:, :self.d] += f.sum(0)
        self.S0[:self.dv] += f0 * vv.sum(0)
        self.z0 += f0 * kk.shape[0]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add the key/value of position `length`; a key leaving the window moves into the sums."""
        self.extend(k[None], v[None])

    def extend(self, k: Tensor, v: Tensor) -> None:
        """Add the keys / values [T, D] / [T, Dv] of positions length .. length + T - 1 at once (a prompt):
        the same state as T append() calls, with the keys that leave the window summed in one batch."""
        t = k.shape[0]
        if t == 0:
            return
        sink, win = self.form.sink, self.form.window
        start, newest = self.length, self.length + t - 1
        if self.max_length is not None and newest >= self.max_length:
            raise ValueError(f"this linear state holds at most {self.max_length} positions, got {newest + 1}")
        # held keys that leave the window now (positions max(sink, start - win) .. newest - win), then new
        # keys that are already past it
        old = range(max(sink, start - win), min(start, newest - win + 1))
        if len(old):
            idx = self._index(old)
            self._absorb(self.ke[idx], self.ve[idx])
        new = range(max(sink, start), newest - win + 1)
        if len(new):
            self._absorb(k[new.start - start:new.stop - start], v[new.start - start:new.stop - start])
        # the new keys that stay: the sink's, and the last `win` (a contiguous run of the new rows each)
        for run in (range(start, min(newest + 1, sink)), range(max(start, sink, newest - win + 1), newest + 1)):
            if len(run):
                rows = slice(run.start - start, run.stop - start)
                idx = self._index(run)
                self.ke[idx] = k[rows].to(self.ke.dtype)
                self.ve[idx] = v[rows].to(self.ve.dtype)
        self.length = newest + 1

    def clone(self) -> "LinearState":
        """An independent copy (beam search continues one sequence in two rows); the feature maps are shared."""
        other = copy.copy(self)
        for name in ("S", "z", "S0", "z0", "ke", "ve"):
            setattr(other, name, getattr(self, name).clone())
        return other

    def nbytes(self) -> int:
        """Bytes held: the running sums and the exact part's buffer."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.S0, self.z0, self.ke, self.ve))

    def attend(self, q: Tensor, impl: str = "reference") -> Tensor:
        """q [G, D] for the newest position (length - 1) -> [G, Dv]."""
        kk, vv = self.ke[:self.exact], self.ve[:self.exact]
        if impl == "triton":
            from . import ops

            key = kernel_key()
            if key is None:
                raise kernels.KernelUnavailable("the linear kernel was not generated: import attnforge first")
            loaded = kernels.load_kernel(key, q.device)
            wq, gain = (maps_for(self.form.maps).wq, maps_for(self.form.maps).gain) if self.maps else (None, 1.0)
            ops.counters["triton_linear_decode"] += 1
            return loaded.module.decode(q.float(), kk.float(), vv.float(), self.S.float(), self.S0.float(),
                                        self.z.float(), self.z0.float(), self.scale,
                                        self.form.feature_map == "hedgehog", wq, gain,
                                        interpreted=loaded.interpreted).to(q.dtype)
        kk, vv = kk.to(self.S.dtype), vv.to(self.S.dtype)
        sc = q.to(self.S.dtype) @ kk.T * self.scale                 # [G, E]
        m = sc.amax(-1, keepdim=True)
        w = torch.exp(sc - m)
        f, f0 = self.features(q.to(self.S.dtype), query=True)       # [G, A, D]
        num_l = torch.einsum("gad,adv->gv", f, self.S[:, :self.d, :self.dv]) + f0 * self.S0[:self.dv]
        den_l = torch.einsum("gad,ad->g", f, self.z[:, :self.d]) + f0 * self.z0
        c = torch.exp(-m) if self.form.feature_map == "taylor2" else torch.ones_like(m)
        num = w @ vv + c * num_l
        den = w.sum(-1, keepdim=True) + c * den_l[:, None]
        return (num / den).to(q.dtype)


def decode_step_reference(states, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One decoding step for a site's Linear groups: q [Hq, D], k, v [Hkv, D] of the new token."""
    hkv = len(states)
    g = q.shape[0] // hkv
    outs = []
    for gi, st in enumerate(states):
        st.append(k[gi], v[gi])
        outs.append(st.attend(q[gi * g:(gi + 1) * g]))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------ distillation
def distill(q: list[Tensor], k: list[Tensor], v: list[Tensor], window: int, sink: int, scale: float, *,
            steps: int = 200, rows: int = 128, lr: float = 1e-2, seed: int = 0, hold_out: int = 1):
    """Learn hedgehog maps for every KV group of one site so that the hybrid's output matches dense
    attention on calibration activations (q [1, Hq, N, D], k, v [1, Hkv, N, D] per sample, causal, N = S).

    Each step takes `rows` random query rows of one training sample (all their keys) and minimizes the
    mean squared difference to the dense output, all groups at once (their parameters are separate).
    The last `hold_out` samples are not trained on; the relative output error ||O_lin - O|| / ||O||
    on them is reported before (identity maps) and after; a group whose held-out error the training
    made worse keeps the identity maps. Returns ([FeatureMaps per group],
    {"before": [Hkv], "after": [Hkv], "steps": steps, "identity": [Hkv] bool})."""
    from .forms import Linear

    torch.manual_seed(seed)
    hkv, d = k[0].shape[1], k[0].shape[-1]
    g = q[0].shape[1] // hkv
    train = list(range(len(q) - hold_out)) or [0]
    held = list(range(len(q) - hold_out, len(q))) or [0]
    form = Linear("hedgehog", window, sink, "")
    eye = torch.eye(d).expand(hkv, d, d)
    wq = torch.nn.Parameter(eye.clone())
    wk = torch.nn.Parameter(eye.clone())
    log_gain = torch.nn.Parameter(torch.zeros(hkv))
    opt = torch.optim.Adam([wq, wk, log_gain], lr=lr)

    def dense_rows(qq, kk, vv, r):            # [Hkv, G, len(r), Dv]
        qg = qq[0].float().unflatten(0, (hkv, g))[:, :, r]
        sc = torch.matmul(qg, kk[0].float().unsqueeze(1).transpose(-1, -2)) * scale
        sc = sc.masked_fill(torch.arange(kk.shape[2])[None, :] > r[:, None], float("-inf"))
        return torch.matmul(torch.softmax(sc, -1), vv[0].float().unsqueeze(1))

    def hybrid_rows(qq, kk, vv, r, params):
        outs = []
        hi = int(r.max()) + 1
        for gi in range(hkv):
            qg = qq[0, gi * g:(gi + 1) * g].float()[None, :, r]
            sub = linear_group_reference(qg, kk[0, gi, :hi].float()[None], vv[0, gi, :hi].float()[None], form, scale, r,
                                        (params[0][gi], params[1][gi], params[2][gi]))
            outs.append(sub[0])
        return torch.stack(outs)

    def rel_error(params, samples):
        num = den = 0.0
        with torch.no_grad():
            for i in samples:
                n = q[i].shape[2]
                r = torch.arange(min(n, sink + window), n)
                r = r[torch.linspace(0, len(r) - 1, min(len(r), 4 * rows)).long()]
                ref = dense_rows(q[i], k[i], v[i], r)
                out = hybrid_rows(q[i], k[i], v[i], r, params)
                num = num + (out - ref).square().sum((1, 2, 3))
                den = den + ref.square().sum((1, 2, 3))
        return (num / den).sqrt()

    if all(q[i].shape[2] <= sink + window for i in range(len(q))):
        # the window covers these samples whole: nothing is weighed linearly, nothing to learn
        zero = np.zeros(hkv, dtype=np.float32)
        return ([FeatureMaps(np.eye(d), np.eye(d), 1.0) for _ in range(hkv)],
                {"before": zero, "after": zero, "steps": 0, "identity": np.ones(hkv, dtype=bool)})
    train = [i for i in train if q[i].shape[2] > sink + window] or [i for i in held if q[i].shape[2] > sink + window]
    held = [i for i in held if q[i].shape[2] > sink + window] or train
    before = rel_error((eye, eye, torch.ones(hkv)), held)
    for step in range(steps):
        i = train[step % len(train)]
        n = q[i].shape[2]
        lo = min(n - 1, sink + window)
        r = torch.sort(torch.randint(lo, n, (min(rows, n - lo),)))[0]
        with torch.no_grad():
            ref = dense_rows(q[i], k[i], v[i], r)
        out = hybrid_rows(q[i], k[i], v[i], r, (wq, wk, log_gain.exp()))
        loss = (out - ref).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = (wq.detach(), wk.detach(), log_gain.detach().exp())
    after = rel_error(params, held)
    worse = after > before
    params = (torch.where(worse[:, None, None], eye, params[0]), torch.where(worse[:, None, None], eye, params[1]),
              torch.where(worse, torch.ones(hkv), params[2]))
    after = torch.minimum(after, before)
    maps = [FeatureMaps(params[0][gi].numpy(), params[1][gi].numpy(), float(params[2][gi])) for gi in range(hkv)]
    return maps, {"before": before.numpy(), "after": after.numpy(), "steps": steps, "identity": worse.numpy()}



# ------------------------------------------------------------------------------------ Triton kernel
# the linear kernel's source, rendered by codegen.render_linear (installed by the compiler)
_kernel = kernels.KernelFactory()
set_kernel_factory = _kernel.install
kernel_key = _kernel.key


def linear_triton(q: Tensor, k: Tensor, v: Tensor, forms, scale: float | None = None,
                  out: Tensor | None = None) -> Tensor:
    """The Linear groups of `forms` through the chunked Triton kernel (CUDA, or Triton's interpreter on
    the CPU); causal self-attention (N = S). Other groups are left as in `out`."""
    from .forms import Linear

    key = kernel_key()
    if key is None:
        raise kernels.KernelUnavailable("the linear kernel was not generated: import attnforge (its compiler "
                                        "registers the source) before running linear forms through Triton")
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if k.shape[2] != n:
        raise ValueError(f"the linear kernel runs causal self-attention (N = S), got N={n}, S={k.shape[2]}")
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    loaded = kernels.load_kernel(key, q.device)
    if out is None:
        out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for gi, form in enumerate(forms):
        if not isinstance(form, Linear):
            continue
        hh = form.feature_map == "hedgehog"
        wq = wk = None
        gain = 1.0
        if hh:
            m = maps_for(form.maps)
            wq, wk, gain = m.wq, m.wk, m.gain
        loaded.module.launch(loaded.kernel, q[:, gi * g:(gi + 1) * g], k[:, gi], v[:, gi],
                             out[:, gi * g:(gi + 1) * g], scale, form.window, form.sink, hh, wq, wk, gain,
                             interpreted=loaded.interpreted)
    return out
