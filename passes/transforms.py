"""Small, exact transforms that bring an operand into the canonical layout of the attention op.

A detected site names each of q, k, v, mask by an `Operand`: a node plus the transforms that turn its
value into the canonical [B, H, N, D] layout (or, for the output, turn the op's [B, H, N, Dv] result
back into the layout the graph expected). One table serves twice: canonicalize inserts the transforms
as graph nodes; mask lifting applies them to evaluated tensors.

Transforms (name, *args); an argument written "%name" is the graph node called name:
    ("permute", dims)          x.permute(dims)
    ("unsqueeze", d)           x.unsqueeze(d)          [BH, N, D] -> [BH, 1, N, D] (heads folded, kept in B)
    ("squeeze", d)             x.squeeze(d)
    ("unflatten_heads", H)     x.unflatten(0, (-1, H))  [B*H, ...] -> [B, H, ...]
    ("flatten_heads",)         x.flatten(0, 1)          [B, H, ...] -> [B*H, ...]
    ("mul", f) / ("div", f)    x * f, x / f             f a number or "%node" (a learned temperature, say)
    ("not",)                   ~x                       a masked_fill mask -> a keep mask
    ("scale_mask", f)          x * f                    baddbmm's beta on the bias
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Operand", "TRANSFORMS", "apply_transforms"]


def _unflatten_heads(x, heads):
    return x.unflatten(0, (-1, heads))


def _flatten_heads(x):
    return x.flatten(0, 1)


def _permute(x, dims):
    return x.permute(dims)


TRANSFORMS = {
    "permute": _permute,
    "unsqueeze": torch.unsqueeze,
    "squeeze": torch.squeeze,
    "unflatten_heads": _unflatten_heads,
    "flatten_heads": _flatten_heads,
    "mul": torch.mul,
    "div": torch.div,
    "not": torch.logical_not,
    "scale_mask": torch.mul,
}


@dataclass(frozen=True, slots=True)
class Operand:
    """A graph node and the transforms that bring its value into the op's canonical layout."""
    node: str
    ops: tuple = ()

    def then(self, *op) -> Operand:
        return Operand(self.node, self.ops + (tuple(op),))

    def node_refs(self) -> list[str]:
        """Names of the graph nodes this operand reads (its own and those of '%name' arguments)."""
        refs = [self.node]
        for op in self.ops:
            refs += [a[1:] for a in op[1:] if isinstance(a, str) and a.startswith("%")]
        return refs

    def __str__(self) -> str:
        return self.node + "".join(f".{op[0]}{op[1:] if len(op) > 1 else ''}" for op in self.ops)


def apply_transforms(value, ops, resolve):
    """Apply `ops` to `value`; `resolve(name)` gives the value of a '%name' argument."""
    for name, *args in ops:
        args = [resolve(a[1:]) if isinstance(a, str) and a.startswith("%") else a for a in args]
        value = TRANSFORMS[name](value, *args)
    return value
