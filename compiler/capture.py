"""Capture a model's FX graphs: through Dynamo (what torch.compile sees) or torch.fx.symbolic_trace."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["capture_dynamo", "capture_symbolic", "capture", "compile_traced", "tracing_config"]

# Dynamo settings attnforge traces under. Hugging Face's hub-kernel wrapper (the `kernels` package, which
# transformers 5 requires) sets and resets a global in every wrapped attention module's forward; inside an
# activation-checkpointed layer Dynamo refuses that side effect ("Mutating a variable from outside the scope
# of this HOP") and breaks the graph around the checkpoint, so the layer, attention included, ran outside the
# graph and attnforge found nothing in it. Not replaying such a side effect at recomputation is what the
# setting allows (the wrapper's set/reset pair leaves nothing behind). Absent from older torch: skipped.
_TRACING = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def tracing_config():
    """A context in which Dynamo traces as attnforge needs (see _TRACING); settings this torch lacks are left."""
    import torch._dynamo

    cfg = torch._dynamo.config
    return cfg.patch(**{k: v for k, v in _TRACING.items() if hasattr(cfg, k)})


def compile_traced(fn, **compile_kwargs):
    """torch.compile(fn, **compile_kwargs), each call (and so each trace) under tracing_config()."""
    import functools

    compiled = torch.compile(fn, **compile_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with tracing_config():
            return compiled(*args, **kwargs)

    return call


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

    compiled = compile_traced(model, backend=collect, dynamic=False)
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
