"""Things that look like attention and must NOT be rewritten: zero rewrites, a reason in the record,
outputs unchanged."""
import math

import pytest
import torch
from torch import nn

import attnforge as af
from zoo.handwritten import DropoutAttention, x


class MoERouter(nn.Module):
    """softmax(x @ W) then top-k: a router, not attention."""

    def __init__(self, dim=32, experts=8):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.Linear(dim, dim * experts)

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, idx = probs.topk(2, dim=-1)
        outs = self.experts(x).view(*x.shape[:-1], -1, x.shape[-1])               # [B, N, E, D]
        picked = torch.gather(outs, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))
        return (weights[..., None] * picked).sum(2)


class AdditivePooling(nn.Module):
    """Bahdanau-style additive attention: scores = v . tanh(W q + U k), not a dot product of q and k."""

    def __init__(self, dim=32):
        super().__init__()
        self.w, self.u, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)

    def forward(self, q, keys):
        scores = self.v(torch.tanh(self.w(q)[:, :, None] + self.u(keys)[:, None])).squeeze(-1)  # [B, N, S]
        return torch.matmul(torch.softmax(scores, dim=-1), keys)


class WeightKeys(nn.Module):
    """matmul -> softmax -> matmul against learned memory slots: the keys and values are weights."""

    def __init__(self, dim=32, slots=16):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(slots, dim))
        self.values = nn.Parameter(torch.randn(slots, dim))

    def forward(self, x):
        scores = torch.matmul(x, self.keys.transpose(0, 1)) / math.sqrt(x.shape[-1])
        return torch.matmul(torch.softmax(scores, dim=-1), self.values)


class PerKeyScale(nn.Module):
    """Scores scaled by a tensor that varies along the keys: cannot be moved onto q."""

    def forward(self, q, k, v, w):
        return torch.softmax((q @ k.transpose(-2, -1)) * w, dim=-1) @ v


class MaskInsideSoftCap(nn.Module):
    """A mask added before the soft-cap's tanh: masked keys end at -cap, a finite score, not removed."""

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) * 0.25 + torch.full((n, n), float("-inf")).triu(1)
        return torch.softmax(50.0 * torch.tanh(s / 50.0), dim=-1) @ v


class TensorSoftCap(nn.Module):
    """A soft-cap whose outer factor is a tensor (per query), which no kernel's constant cap expresses."""

    def forward(self, q, k, v, w):
        return torch.softmax(w * torch.tanh((q @ k.transpose(-2, -1)) / 50.0), dim=-1) @ v


CASES = {
    "moe_router": (MoERouter, lambda: (x(),), "not multiplied with values"),
    "additive_pooling": (AdditivePooling, lambda: (x(n=5), x(n=9, seed=1)), "softmax input is not q @ k^T"),
    "weights_as_keys": (WeightKeys, lambda: (x(),), "parameters (weights)"),
    "dropout_in_training": (lambda: DropoutAttention().train(), lambda: (x(),), "dropout p=0.1"),
    "per_key_scale": (PerKeyScale, lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8),
                                            torch.rand(1, 1, 1, 6) + 0.5), "scaled per key"),
    "mask_inside_softcap": (MaskInsideSoftCap, lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8),
                                                       torch.randn(1, 2, 6, 8)), "applied before the soft-cap"),
    "tensor_softcap": (TensorSoftCap, lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8),
                                               torch.rand(1, 2, 6, 1) + 40), "only a constant cap"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_not_rewritten_with_a_reason(name):
    make, inputs, reason = CASES[name]
    torch.manual_seed(0)
    model, args = make(), inputs()
    be = af.Backend(compiler="eager")
    torch.manual_seed(1)
    out = torch.compile(model, backend=be)(*args)
    torch.manual_seed(1)
    ref = model(*args)
    assert sum(len(r.rewritten) for r in be.records) == 0
    reasons = [d.reason for r in be.records for d in r.declined]
    assert any(reason in r for r in reasons), reasons
    assert "attnforge" not in "".join(r.code for r in be.records)
    assert af.runtime.counters.total() == 0
    torch.testing.assert_close(out, ref)
