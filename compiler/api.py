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
    for s, d in capture(model, example_inputs, method, on_graph=detect):
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


def search(model, calibration, budget, *, lengths=(1024, 2048, 4096), samples: int = 1, block: int = 64,
           model_name: str | None = None, max_forms_per_layer: int | None = None, profile_out=None,
           progress: bool = True):
    """Profile `model` on calibration token ids and search a per-head plan under `budget`.

    calibration: [1, T] token ids (windows of each length are cut from it, disjoint per sample), or a
    dict {length: [ids, ...]}. budget: attnforge.Budget. Returns an attnforge.Plan.
    """
    from .profile import profile_model
    from .search import search as solve

    if isinstance(calibration, dict):
        per_length = calibration
    else:
        per_length = {}
        for n in lengths:
            need = n * samples
            if calibration.shape[-1] < need:
                raise ValueError(f"{calibration.shape[-1]} calibration tokens cannot give {samples} samples of "
                                 f"length {n}; pass more text or smaller lengths")
            per_length[n] = [calibration[..., i * n:(i + 1) * n] for i in range(samples)]
    name = model_name or type(model).__name__
    prof = profile_model(model, per_length, model_name=name, block=block, out=profile_out, progress=progress)
    return solve(prof, budget, max_forms_per_layer=max_forms_per_layer)


def optimize(model, plan, impl: str = "auto", compiler: str = "inductor"):
    """Make `model`'s forward run `plan` (a Plan or a path): forward is compiled with the attnforge
    backend in place, so `model(...)` and Hugging Face `generate()` use it. Returns the same model."""
    backend = Backend(plan=plan, impl=impl, compiler=compiler)
    model.forward = torch.compile(model.forward, backend=backend)
    model.attnforge_backend = backend
    return model
