"""`af.varlen_attention`: FlashAttention's variable-length calling convention over attnforge's packed path.

    out = af.varlen_attention(q, k, v, cu_seqlens, causal=True, forms=None, softcap=0.0)

q [T, Hq, D], k / v [T, Hkv, D] hold every sequence's tokens end to end (T in all); cu_seqlens [n + 1] int
gives the sequences' bounds (0, len_0, len_0 + len_1, ..., T), as flash_attn_varlen_func takes them (one
set for queries and keys: self-attention). Each sequence is computed as that sequence alone — causal or
not, and with `forms` (one per KV head group: a plan entry) at its own positions — through the same
kernels as a packed batch (runtime.padding: the tokens are one row, labelled by sequence). softcap > 0
soft-caps the scores (softcap * tanh(s / softcap), Gemma 2), as flash_attn_varlen_func's softcap does. Returns
[T, Hq, Dv]; differentiable.
"""
from __future__ import annotations

import torch

__all__ = ["varlen_attention"]


def _labels(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least two entries (0, ..., T), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the token count T = {total} (the sequences' bounds, "
                         f"as flash_attn_varlen_func takes them), got {cu.tolist()[:8]}")
    # token t belongs to sequence i where cu[i] <= t < cu[i + 1]; labels 1 .. n (0 would mean padding)
    return torch.bucketize(torch.arange(total, device=device), cu[1:], right=True)[None] + 1


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                     causal: bool = True, scale: float | None = None, forms=None, impl: str = "auto",
                     softcap: float = 0.0) -> torch.Tensor:
    """See the module docstring. forms: None (dense) or one attnforge Form per KV head group (causal only).
    impl: 'auto' | 'triton' | 'reference', as the attention op takes it."""
    from attnforge import codegen
    from attnforge.runtime import kernels
    from attnforge.runtime.forms import forms_to_json

    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"varlen_attention takes q [T, Hq, D], k / v [T, Hkv, D] (every sequence end to end), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must hold the same tokens (self-attention), got T = {q.shape[0]}, {k.shape[0]}, "
                         f"{v.shape[0]}")
    planned = bool(forms) and any(f.kind != "dense" for f in forms)
    if planned and not causal:
        raise ValueError("forms are causal restrictions: pass causal=True with forms")
    if forms is not None and len(forms) != k.shape[1]:
        raise ValueError(f"forms: one per KV head group, {k.shape[1]} here, got {len(forms)}")
    labels = _labels(cu_seqlens, q.shape[0], q.device)
    key = "" if impl == "reference" else kernels.register_source(
        codegen.render_attention(codegen.KernelSpec(causal=causal, plan=planned)).source)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))           # [1, H, T, D]
    out = torch.ops.attnforge.attention(q4, k4, v4, None, causal, 0, scale, impl, key,
                                        forms_to_json(forms) if planned else "", labels, float(softcap))
    return out[0].transpose(0, 1).contiguous()
