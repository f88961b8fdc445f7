"""Exact decompositions of PyTorch's opaque attention functions, with the attention inside them running
as torch.ops.attnforge.attention.

Dynamo keeps `F.multi_head_attention_forward` (nn.MultiheadAttention, and TransformerEncoderLayer with
grad enabled) as one call, and the eval/no-grad fast path of TransformerEncoderLayer as one fused
`torch._transformer_encoder_layer_fwd` call. Neither exposes a softmax to match, so each has a rule that
replaces the call by the functions below: projections, the attnforge op, output projection (and for the
encoder layer: norms, residuals and the feed-forward), in the same order of operations as PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mha_forward", "encoder_layer_forward"]

ATTENTION = torch.ops.attnforge.attention.default


def _heads(x, batch, heads, seq_first):
    # [N, B, E] (seq_first) or [B, N, E] -> [B, H, N, D]
    if seq_first:
        n = x.shape[0]
        return x.view(n, batch, heads, -1).permute(1, 2, 0, 3)
    return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)


def _additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_forward(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                key_padding_mask, attn_mask, q_proj_weight, k_proj_weight, v_proj_weight, is_causal,
                need_weights, impl, kernel):
    """F.multi_head_attention_forward for seq-first, batched input without bias_k/zero-attn/dropout.

    query [N, B, E], key/value [S, B, E] -> ([N, B, E], None). key_padding_mask [B, S]; attn_mask [N, S] or
    [B*H, N, S]; bool masks mark positions NOT to attend (PyTorch's convention).
    """
    n, b, e = query.shape
    if q_proj_weight is None:
        wq, wk, wv = in_proj_weight.chunk(3)
    else:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = _heads(F.linear(query, wq, bq), b, num_heads, True)
    k = _heads(F.linear(key, wk, bk), b, num_heads, True)
    v = _heads(F.linear(value, wv, bv), b, num_heads, True)
    causal = bool(is_causal and key_padding_mask is None and not need_weights)
    mask = None
    if not causal:
        am = _additive(attn_mask, q.dtype)
        if am is not None and am.dim() == 3:
            am = am.view(b, num_heads, n, -1)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(b, 1, 1, -1)
        mask = kpm if am is None else am if kpm is None else am + kpm
    out = ATTENTION(q, k, v, mask, causal, 0, q.shape[-1] ** -0.5, impl, kernel)      # [B, H, N, D]
    out = out.permute(2, 0, 1, 3).reshape(n * b, e)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(n, b, e)
    return out, None


def encoder_layer_forward(src, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first,
                          eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1,
                          ffn_weight_2, ffn_bias_2, impl, kernel):
    """torch._transformer_encoder_layer_fwd (batch-first [B, N, E], no mask), decomposed."""
    e = src.shape[-1]

    def attention(x):
        b, n, _ = x.shape
        q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
        q, k, v = (_heads(t, b, num_heads, False) for t in (q, k, v))
        out = ATTENTION(q, k, v, None, False, 0, q.shape[-1] ** -0.5, impl, kernel)
        return F.linear(out.transpose(1, 2).reshape(b, n, e), proj_weight, proj_bias)

    def feed_forward(x):
        h = F.linear(x, ffn_weight_1, ffn_bias_1)
        h = F.gelu(h) if use_gelu else F.relu(h)
        return F.linear(h, ffn_weight_2, ffn_bias_2)

    if norm_first:
        x = src + attention(F.layer_norm(src, (e,), norm_weight_1, norm_bias_1, eps))
        return x + feed_forward(F.layer_norm(x, (e,), norm_weight_2, norm_bias_2, eps))
    x = F.layer_norm(src + attention(src), (e,), norm_weight_1, norm_bias_1, eps)
    return F.layer_norm(x + feed_forward(x), (e,), norm_weight_2, norm_bias_2, eps)
