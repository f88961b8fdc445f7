"""KIVI-style quantized KV storage for the KV groups of one attention site (forms.KVQuant).

Keys are quantized per channel over groups of `group` consecutive tokens, values per token over groups
of min(group, D) channels (KIVI, Liu et al. 2024): asymmetric, `bits` in (2, 4, 8),

    scale = (max - min) / (2^bits - 1),   code = round((x - min) / scale),   x~ = code * scale + min

with scale and min stored in float16. The newest tokens stay in full precision: with n tokens, the first

    quantized(n) = floor(max(0, n - residual) / group) * group

are held as codes, the rest (between `residual` and `residual + group - 1` once n >= residual) in a
residual buffer, so a key group is quantized only once all of its tokens exist. Codes are packed along
the channels, 8 / bits per byte: a token's key takes D * bits / 8 bytes instead of 2 D (float16).

`fake_quant(k, v, ...)` is the float reference (what the cache's dequantized keys and values equal);
`QuantKV` holds a site's quantized groups (several groups, each its own bits) in flat byte and scale
buffers with per-group offsets, appends tokens (quantizing a key group as it completes), and decodes one
query token per head either by `decode_reference` (dequantize, then exact attention) or through the
Triton kernel of codegen.render_decode_quant() (`decode`), which dequantizes inside the kernel.
"""
from __future__ import annotations

import torch

from .reference import _compute_dtype, soft_cap

__all__ = ["QUANT_BITS", "quantized_tokens", "quantize", "dequantize", "pack", "unpack", "fake_quant", "QuantKV",
           "quant_bytes", "KVQuantError"]

QUANT_BITS = (2, 4, 8)


class KVQuantError(ValueError):
    pass


def _check(bits: int, group: int, residual: int) -> None:
    if bits not in QUANT_BITS:
        raise KVQuantError(f"KV quantization takes bits in {QUANT_BITS}, got {bits}")
    if group < 1 or residual < 0:
        raise KVQuantError(f"KV quantization needs group >= 1 and residual >= 0, got {group}, {residual}")


def quantized_tokens(n: int, group: int, residual: int) -> int:
    """How many of n tokens are held as codes (the rest stay in the full-precision residual)."""
    return max(0, n - residual) // group * group


def _value_group(group: int, d: int) -> int:
    g = min(group, d)
    if d % g:
        raise KVQuantError(f"head dim {d} is not a multiple of the value channel group {g}")
    return g


def quantize(x: torch.Tensor, bits: int, group: int, axis: int):
    """x [..., T, D] -> (codes uint8 [..., T, D], scale, minimum) with statistics over `group` entries
    along `axis` (-2: tokens, keys; -1: channels, values); scale and minimum in float16, shaped with that
    axis divided by `group`. The size along `axis` must be a multiple of `group`."""
    levels = (1 << bits) - 1
    shape = list(x.shape)
    if shape[axis] % group:
        raise KVQuantError(f"{shape[axis]} entries do not split into quantization groups of {group}")
    ax = axis % x.dim()
    g = x.float().unflatten(ax, (shape[ax] // group, group))
    lo = g.amin(ax + 1, keepdim=True).half()
    hi = g.amax(ax + 1, keepdim=True).half()
    scale = ((hi.float() - lo.float()) / levels).half()
    s = scale.float()
    codes = torch.where(s > 0, torch.round((g - lo.float()) / torch.where(s > 0, s, 1.0)), 0.0)
    codes = codes.clamp(0, levels).to(torch.uint8).flatten(ax, ax + 1)
    return codes, scale.squeeze(ax + 1), lo.squeeze(ax + 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """The float32 values the codes stand for (inverse of quantize)."""
    ax = axis % codes.dim()
    return (codes.float() * scale.float().repeat_interleave(group, ax) + lo.float().repeat_interleave(group, ax))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> [..., D * bits / 8]: code c of a byte sits at bit (c % (8 / bits)) * bits."""
    per = 8 // bits
    d = codes.shape[-1]
    if d % per:
        raise KVQuantError(f"{d} channels do not pack into bytes of {per} {bits}-bit codes")
    c = codes.view(*codes.shape[:-1], d // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.flatten(-2).to(torch.uint8)


def fake_quant(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, residual: int):
    """(k~, v~): k, v [..., T, D] with their first quantized(T) tokens replaced by what the codes stand
    for (float32), the residual left as it is: what QuantKV holds after T tokens."""
    _check(bits, group, residual)
    n = k.shape[-2]
    nq = quantized_tokens(n, group, residual)
    kt, vt = k.float().clone(), v.float().clone()
    if nq:
        kq = quantize(k[..., :nq, :], bits, group, -2)
        vg = _value_group(group, v.shape[-1])
        vq = quantize(v[..., :nq, :], bits, vg, -1)
        kt[..., :nq, :] = dequantize(*kq, group, -2)
        vt[..., :nq, :] = dequantize(*vq, vg, -1)
    return kt, vt


def quant_bytes(n: int, bits: int, group: int, residual: int, d: int, dv: int | None = None) -> int:
    """Bytes QuantKV holds for one KV head after n tokens: codes, float16 scales and minima, and the
    float16 residual (the accounting forms.kv_tokens turns into KV-entry equivalents)."""
    dv = dv or d
    nq = quantized_tokens(n, group, residual)
    codes = nq * (d + dv) * bits // 8
    stats = 2 * 2 * (nq // group * d + nq * (dv // _value_group(group, dv)))
    return codes + stats + 2 * (n - nq) * (d + dv)


class QuantKV:
    """The quantized KV groups of one site for a batch of sequences, sized for `max_length` tokens.

    groups: per quantized group (its index among the site's KV heads, bits); group / residual shared.
    Buffers (flat, per batch entry, each group at its offset): codes K and V uint8 [B, bytes], key
    statistics float16 [B, sum(max_length / group * D)], value statistics [B, sum(max_length * D / vg)],
    residual K/V [B, sum(residual + group), D] in the model's dtype."""

    def __init__(self, groups: list[tuple[int, int]], group: int, residual: int, max_length: int):
        for _, bits in groups:
            _check(bits, group, residual)
        self.groups = list(groups)
        self.group, self.residual, self.max_length = group, residual, max_length
        self.length = 0
        self.buf = None

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        b, d, dv = k.shape[0], k.shape[-1], v.shape[-1]
        self.d, self.dv, self.vg = d, dv, _value_group(self.group, dv)
        cap_q = quantized_tokens(self.max_length, self.group, self.residual)
        r_cap = self.residual + self.group
        self.cap_q, self.r_cap = cap_q, r_cap
        koff, voff, ksoff, vsoff = [0], [0], [0], [0]
        for _, bits in self.groups:
            koff.append(koff[-1] + cap_q * d * bits // 8)
            voff.append(voff[-1] + cap_q * dv * bits // 8)
            ksoff.append(ksoff[-1] + cap_q // self.group * d)
            vsoff.append(vsoff[-1] + cap_q * (dv // self.vg))
        dev = k.device
        ng = len(self.groups)
        self.buf = {
            "kq": torch.zeros(b, max(1, koff[-1]), dtype=torch.uint8, device=dev),
            "vq": torch.zeros(b, max(1, voff[-1]), dtype=torch.uint8, device=dev),
            "ks": torch.zeros(b, max(1, ksoff[-1]), dtype=torch.float16, device=dev),
            "kz": torch.zeros(b, max(1, ksoff[-1]), dtype=torch.float16, device=dev),
            "vs": torch.zeros(b, max(1, vsoff[-1]), dtype=torch.float16, device=dev),
            "vz": torch.zeros(b, max(1, vsoff[-1]), dtype=torch.float16, device=dev),
            "kr": k.new_zeros(b, ng * r_cap, d),
            "vr": v.new_zeros(b, ng * r_cap, dv),
        }
        self._offs = (koff[:-1], voff[:-1], ksoff[:-1], vsoff[:-1])
        meta = [[bits for _, bits in self.groups], koff[:-1], voff[:-1], ksoff[:-1], vsoff[:-1]]
        self._meta = torch.tensor(meta, dtype=torch.int32, device=dev)          # [5, ng]
        self.nq = 0                           # tokens held as codes (the same for every group)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k [B, ng, n, D], v [B, ng, n, DV]: the next tokens of the quantized groups, in `groups` order."""
        if k.shape[1] != len(self.groups):
            raise KVQuantError(f"{k.shape[1]} KV heads for {len(self.groups)} quantized groups")
        new_len = self.length + k.shape[2]
        if new_len > self.max_length:
            raise KVQuantError(f"{new_len} tokens exceed the max_length {self.max_length} this quantized cache "
                               "was sized for; build it with a larger max_length")
        if self.buf is None:
            self._allocate(k, v)
        # the residual in order: previous residual tokens, then the new ones
        old_r = self.length - self.nq
        kr = self.buf["kr"].view(k.shape[0], len(self.groups), self.r_cap, self.d)
        vr = self.buf["vr"].view(v.shape[0], len(self.groups), self.r_cap, self.dv)
        rk = torch.cat([kr[:, :, :old_r], k.to(kr.dtype)], 2)
        rv = torch.cat([vr[:, :, :old_r], v.to(vr.dtype)], 2)
        nq_new = quantized_tokens(new_len, self.group, self.residual)
        move = nq_new - self.nq                  # whole key groups leaving the residual
        if move:
            for gi, (_, bits) in enumerate(self.groups):
                self._store(gi, bits, rk[:, gi, :move], rv[:, gi, :move])
        rest = rk.shape[2] - move
        kr[:, :, :rest] = rk[:, :, move:]
        vr[:, :, :rest] = rv[:, :, move:]
        self.nq, self.length = nq_new, new_len

    def state(self):
        """What a token changes: the counts and the residual (codes are appended past nq, never rewritten)."""
        if self.buf is None:
            return None
        return self.length, self.nq, self.buf["kr"].clone(), self.buf["vr"].clone()

    def set_state(self, state) -> None:
        """Back to a state() (None: empty)."""
        if state is None:
            self.length = self.nq = 0
            return
        self.length, self.nq, kr, vr = state
        self.buf["kr"].copy_(kr)
        self.buf["vr"].copy_(vr)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row b becomes what row rows[b] holds (every buffer is per row; lengths are shared)."""
        if self.buf is not None:
            idx = rows.to(self.buf["kq"].device)
            self.buf = {name: t.index_select(0, idx) for name, t in self.buf.items()}

    def _store(self, gi: int, bits: int, k: torch.Tensor, v: torch.Tensor) -> None:
        koff, voff, ksoff, vsoff = (o[gi] for o in self._offs)
        t0, t = self.nq, k.shape[1]
        kc, ks, kz = quantize(k, bits, self.group, -2)
        vc, vs, vz = quantize(v, bits, self.vg, -1)
        wk, wv = self.d * bits // 8, self.dv * bits // 8
        self.buf["kq"][:, koff + t0 * wk:koff + (t0 + t) * wk] = pack(kc, bits).flatten(1)
        self.buf["vq"][:, voff + t0 * wv:voff + (t0 + t) * wv] = pack(vc, bits).flatten(1)
        g0, ng = t0 // self.group, t // self.group
        self.buf["ks"][:, ksoff + g0 * self.d:ksoff + (g0 + ng) * self.d] = ks.flatten(1)
        self.buf["kz"][:, ksoff + g0 * self.d:ksoff + (g0 + ng) * self.d] = kz.flatten(1)
        nv = self.dv // self.vg
        self.buf["vs"][:, vsoff + t0 * nv:vsoff + (t0 + t) * nv] = vs.flatten(1)
        self.buf["vz"][:, vsoff + t0 * nv:vsoff + (t0 + t) * nv] = vz.flatten(1)

    # ------------------------------------------------------------------ reading
    def dequantized(self, gi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [B, length, D|DV] float32 of group gi as the cache holds them (codes, then residual)."""
        bits = self.groups[gi][1]
        koff, voff, ksoff, vsoff = (o[gi] for o in self._offs)
        b, nq = self.buf["kq"].shape[0], self.nq
        wk, wv, nv = self.d * bits // 8, self.dv * bits // 8, self.dv // self.vg
        kc = unpack(self.buf["kq"][:, koff:koff + nq * wk].view(b, nq, wk), bits)
        vc = unpack(self.buf["vq"][:, voff:voff + nq * wv].view(b, nq, wv), bits)
        ng = nq // self.group
        ks = self.buf["ks"][:, ksoff:ksoff + ng * self.d].view(b, ng, self.d)
        kz = self.buf["kz"][:, ksoff:ksoff + ng * self.d].view(b, ng, self.d)
        vs = self.buf["vs"][:, vsoff:vsoff + nq * nv].view(b, nq, nv)
        vz = self.buf["vz"][:, vsoff:vsoff + nq * nv].view(b, nq, nv)
        r = self.length - nq
        kr = self.buf["kr"].view(b, len(self.groups), self.r_cap, self.d)[:, gi, :r]
        vr = self.buf["vr"].view(b, len(self.groups), self.r_cap, self.dv)[:, gi, :r]
        k = torch.cat([dequantize(kc, ks, kz, self.group, -2), kr.float()], 1)
        v = torch.cat([dequantize(vc, vs, vz, self.vg, -1), vr.float()], 1)
        return k, v

    def decode_reference(self, q: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
        """q [B, ng * R, D] (the query heads of each quantized group, group-major) -> out [B, ng * R, DV]
        float32 (float64 for a float64 q): exact attention over the dequantized keys and values."""
        b, h, _ = q.shape
        r = h // len(self.groups)
        ct = _compute_dtype(q.dtype)
        outs = []
        for gi in range(len(self.groups)):
            k, v = (t.to(ct) for t in self.dequantized(gi))
            s = torch.einsum("brd,btd->brt", q[:, gi * r:(gi + 1) * r].to(ct), k) * scale
            s = soft_cap(s, softcap)
            outs.append(torch.softmax(s, -1) @ v)
        return torch.cat(outs, 1)

    def decode(self, q: torch.Tensor, scale: float, loaded, splits: int | None = None, softcap: float = 0.0):
        """The same through the Triton kernel `loaded` (codegen.render_decode_quant()), dequantizing
        inside the kernel. Returns (out [B, ng * R, DV] in q's dtype, splits used)."""
        return loaded.launch(q, self.buf, self._meta, self.nq, self.length - self.nq, self.r_cap, self.group,
                             self.vg, scale, splits=splits, softcap=softcap)

    def nbytes(self) -> int:
        """Bytes of the buffers (allocated for max_length)."""
        return 0 if self.buf is None else sum(t.numel() * t.element_size() for t in self.buf.values())

    def held_bytes(self) -> int:
        """Bytes the tokens seen so far occupy (quant_bytes summed over groups, batch included)."""
        if self.buf is None:
            return 0
        b = self.buf["kq"].shape[0]
        dt = self.buf["kr"].element_size()
        per = sum(quant_bytes(self.length, bits, self.group, self.residual, self.d, self.dv)
                  for _, bits in self.groups)
        return b * (per + (dt - 2) * (self.length - self.nq) * (self.d + self.dv) * len(self.groups))
