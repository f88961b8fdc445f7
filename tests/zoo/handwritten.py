"""Handwritten attention spellings seen in real code bases. Each factory returns (model, inputs)."""
import math

import torch
from torch import nn
import torch.nn.functional as F


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


class TimmStyleViT(nn.Module):
    """timm's Attention: fused qkv Linear, reshape/permute/unbind, q * scale @ k^T (or its fused SDPA)."""

    def __init__(self, dim=64, heads=4, fused=False):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class EinsumAttention(nn.Module):
    """[B, N, H, D] layout throughout, scores via einsum, output back in [B, N, H, D]."""

    def __init__(self, dim=48, heads=3):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).unbind(2)          # [B, N, H, D]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d)
        p = s.softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, -1)


class AlibiBmm(nn.Module):
    """Heads folded into the batch; scores = baddbmm(alibi, q, k^T, alpha=scale) (BLOOM-style)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        slopes = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)])
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4).reshape(3, b * self.h, n, self.d)
        alibi = (self.slopes[:, None] * torch.arange(n, dtype=x.dtype)[None, :]).repeat(b, 1)[:, None, :]
        causal = torch.full((n, n), float("-inf")).triu(1)
        scores = torch.baddbmm(alibi + causal, q, k.transpose(1, 2), beta=1.0, alpha=self.d ** -0.5)
        p = torch.softmax(scores, dim=-1)
        out = torch.bmm(p, v)                                                   # [B*H, N, D]
        return out.view(b, self.h, n, self.d).transpose(1, 2).reshape(b, n, -1)


class MaskedFillTriu(nn.Module):
    """GPT-style: a registered triu buffer, masked_fill(-inf) on the scores, / sqrt(d)."""

    def __init__(self, dim=32, heads=2, max_len=64):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("future", torch.ones(max_len, max_len, dtype=torch.bool).triu(1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
        att = att.masked_fill(self.future[:n, :n], float("-inf"))
        return (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)


class LearnedTemperature(nn.Module):
    """Per-head learned temperature (a parameter tensor) dividing the scores."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1, generator=_g(1)) + 0.5)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        att = torch.matmul(q, k.transpose(-1, -2)) / self.temperature
        return torch.matmul(att.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)


class CrossAttention(nn.Module):
    """Encoder-decoder cross-attention: queries from one sequence, keys/values from another (N != S)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, x, memory, memory_pad):
        b, n, _ = x.shape
        s = memory.shape[1]
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(memory).view(b, s, 2, self.h, self.d).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(b, 1, 1, s).masked_fill(memory_pad[:, None, None, :], torch.finfo(x.dtype).min)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5 + bias
        return torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)


class DropoutAttention(nn.Module):
    """Dropout on the attention probabilities (active in training mode)."""

    def __init__(self, dim=32, heads=4, p=0.1):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        p = self.drop(torch.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5, dim=-1))
        return (p @ v).transpose(1, 2).reshape(b, n, -1)


class SdpaGQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def x(b=2, n=12, dim=32, seed=0):
    return torch.randn(b, n, dim, generator=_g(seed))
