"""Plain functions behind the public surface and the command line."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from attnforge import runtime
from attnforge.passes import AttentionSite, Decline, detect

from .backend import Backend
from .capture import capture

__all__ = ["find_attention", "detect_model", "compile_and_compare", "CompareResult"]


def detect_model(model, example_inputs, method: str = "dynamo") -> tuple[list[AttentionSite], list[Decline]]:
    """Sites and near misses over every captured graph; the model is not changed."""
    sites, declined = [], []
    for gm in capture(model, example_inputs, method):
        s, d = detect(gm)
        sites += s
        declined += d
    return sites, declined


def find_attention(model, example_inputs, method: str = "dynamo") -> list[AttentionSite]:
    """Every attention site of `model` on `example_inputs` (capture through Dynamo by default)."""
    return detect_model(model, example_inputs, method)[0]


@dataclass(frozen=True)
class CompareResult:
    sites_found: int
    sites_rewritten: int
    declined: int
    max_abs_diff: float
    rel_diff: float                 # max |compiled - eager| / max |eager|
    top1_agreement: float | None    # for logits: fraction of positions with the same argmax
    calls: dict                     # attnforge op calls by implementation during the compiled run
    eager_s: float
    compiled_first_s: float         # includes compilation
    compiled_s: float

    def to_dict(self):
        return asdict(self)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__})")


def compile_and_compare(model, example_inputs, backend: Backend | None = None) -> CompareResult:
    """Run `model` eagerly and through torch.compile with the attnforge backend; compare outputs."""
    backend = backend or Backend()
    torch._dynamo.reset()
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = _first_tensor(model(*example_inputs)).float()
        t1 = time.perf_counter()
        compiled = torch.compile(model, backend=backend)
        runtime.reset_counters()
        out = _first_tensor(compiled(*example_inputs)).float()
        t2 = time.perf_counter()
        calls = dict(runtime.counters)
        compiled(*example_inputs)
        t3 = time.perf_counter()
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    top1 = None
    if ref.dim() >= 2 and ref.shape[-1] > 1:
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return CompareResult(
        sites_found=sum(len(r.sites) for r in backend.records),
        sites_rewritten=backend.sites_rewritten,
        declined=sum(len(r.declined) for r in backend.records),
        max_abs_diff=diff, rel_diff=diff / scale, top1_agreement=top1, calls=calls,
        eager_s=t1 - t0, compiled_first_s=t2 - t1, compiled_s=t3 - t2,
    )
