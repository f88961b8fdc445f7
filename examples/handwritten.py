"""A small handwritten model: attention spelled as matmul / softmax / matmul with GQA repeat_kv.

    python examples/handwritten.py
    TRITON_INTERPRET=1 python examples/handwritten.py --impl triton   # the generated kernel, on the CPU
"""
import argparse
import math

import torch
from torch import nn

import attnforge as af


class Block(nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.h * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        q = q.view(b, n, self.h, self.d).transpose(1, 2)                 # [B, H, N, D]
        k = k.view(b, n, self.hk, self.d).transpose(1, 2)                # [B, Hkv, N, D]
        v = v.view(b, n, self.hk, self.d).transpose(1, 2)
        rep = self.h // self.hk                                          # repeat_kv, as Hugging Face does
        k = k[:, :, None].expand(b, self.hk, rep, n, self.d).reshape(b, self.h, n, self.d)
        v = v[:, :, None].expand(b, self.hk, rep, n, self.d).reshape(b, self.h, n, self.d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        out = torch.softmax(scores, dim=-1) @ v
        return x + self.out(out.transpose(1, 2).reshape(b, n, -1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 50, 64)
    backend = af.Backend(impl=args.impl)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        ref = model(x)
    (rec,) = backend.records
    for site in rec.sites:
        print(f"{site.id}: {site.num_heads} heads / {site.num_kv_heads} KV heads, head dim {site.head_dim}")
    print(f"rewritten {len(rec.rewritten)}, op calls {dict(af.runtime.counters)}, "
          f"max |diff| {(out - ref).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
