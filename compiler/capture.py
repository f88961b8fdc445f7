"""Capture a model's FX graphs: through Dynamo (what torch.compile sees) or torch.fx.symbolic_trace."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["capture_dynamo", "capture_symbolic", "capture"]


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


def capture_dynamo(model: torch.nn.Module, example_inputs: Sequence, on_graph=None) -> list:
    """The graphs Dynamo hands a backend for `model(*example_inputs)` (several if the model breaks).

    `on_graph(gm)` runs inside the backend call, while Dynamo still holds the example value of every
    graph input (it drops them afterwards; mask lifting reads module buffers through them). With
    `on_graph`, its results are returned instead of the graphs. The model is not changed; it runs once,
    without gradients.
    """
    graphs: list = []

    def collect(gm: fx.GraphModule, _inputs):
        graphs.append(on_graph(gm) if on_graph is not None else gm)
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


def capture(model, example_inputs, method: str = "dynamo", on_graph=None) -> list:
    if method == "dynamo":
        return capture_dynamo(model, example_inputs, on_graph)
    if method == "symbolic":
        graphs = capture_symbolic(model, example_inputs)
        return [on_graph(g) for g in graphs] if on_graph is not None else graphs
    raise ValueError(f"capture method must be 'dynamo' or 'symbolic', not {method!r}")
