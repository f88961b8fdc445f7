"""Capture a model's FX graphs: through Dynamo (what torch.compile sees) or torch.fx.symbolic_trace."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["capture_dynamo", "capture_symbolic", "capture"]


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


def capture_dynamo(model: torch.nn.Module, example_inputs: Sequence) -> list[fx.GraphModule]:
    """The graphs Dynamo hands a backend for `model(*example_inputs)` (several if the model breaks).

    The model itself is not changed; it runs once, without gradients.
    """
    graphs: list[fx.GraphModule] = []

    def collect(gm: fx.GraphModule, _inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=collect, dynamic=False)
    with torch.no_grad():
        compiled(*_as_tuple(example_inputs))
    return graphs


def capture_symbolic(model: torch.nn.Module, example_inputs: Sequence) -> list[fx.GraphModule]:
    """torch.fx.symbolic_trace, with shapes filled in by running the example inputs through it."""
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*_as_tuple(example_inputs))
    return [gm]


def capture(model, example_inputs, method: str = "dynamo") -> list[fx.GraphModule]:
    if method == "dynamo":
        return capture_dynamo(model, example_inputs)
    if method == "symbolic":
        return capture_symbolic(model, example_inputs)
    raise ValueError(f"capture method must be 'dynamo' or 'symbolic', not {method!r}")
