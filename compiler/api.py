"""Plain functions behind the public surface and the command line."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from attnforge import runtime
from attnforge.passes import AttentionSite, Decline
from attnforge.passes.regions import detect_regions, flatten

from .backend import Backend
from .capture import capture, compile_traced

__all__ = ["find_attention", "detect_model", "compile_and_compare", "CompareResult"]


def detect_model(model, example_inputs, method: str = "dynamo") -> tuple[list[AttentionSite], list[Decline]]:
    """Sites and near misses over every captured graph; the model is not changed."""
    def on_graph(gm):                        # the graph and its activation-checkpointed regions
        return flatten(detect_regions(gm)[1])

    sites, declined = [], []
    for s, d in capture(model, example_inputs, method, on_graph=on_graph):
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
        compiled = compile_traced(model, backend=backend)
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
    backend in place, so `model(...)` runs it. On a Hugging Face model that generates, `generate()` also
    decodes with the plan's per-head KV cache (a PlanCache: each group holds only what its form reads; one
    is made per call unless an af.PlanCache is passed; use_cache=False recomputes the whole sequence
    through the compiled forward instead); the cache of the last call is `model.attnforge_cache`.
    A Hugging Face model that runs SDPA switches to the same SDPA with attnforge's padding masks (compiler.hf):
    then a padded batch (`attention_mask` with zeros) runs the plan too, each row as that row alone.
    Returns the same model."""
    from .hf import uses_padding_masks, with_masks

    backend = Backend(plan=plan, impl=impl, compiler=compiler)
    hf_masks = uses_padding_masks(model)
    eager_forward = model.forward
    model.forward = compile_traced(with_masks(eager_forward, model) if hf_masks else eager_forward, backend=backend)
    model.attnforge_backend = backend
    if callable(getattr(model, "generate", None)) and hasattr(getattr(model, "config", None), "num_hidden_layers"):
        model.generate = _plan_generate(model, backend.options.plan, eager_forward, impl)
    return model


def _plan_generate(model, plan, eager_forward, impl: str):
    """model.generate() with a PlanCache sized for the prompt plus the new tokens. Decoding steps go through
    the eager forward with attnforge's attention function (the cache's reads are its own kernels; the
    compiled forward stays for whole-sequence calls)."""
    import functools

    from .decode import PlanCache, cache_kwargs, draft_room, plan_attention

    original = model.generate

    @functools.wraps(original)
    def generate(inputs=None, *args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        if args or kwargs.get("use_cache") is False or not torch.is_tensor(inputs) or inputs.dim() != 2:
            return original(inputs, *args, **kwargs)      # no cache to plan (or inputs we do not read)
        given = {n: kwargs.pop(n) for n in ("past_key_values", "cache") if kwargs.get(n) is not None}
        cache = next(iter(given.values()), None)
        if cache is not None and not getattr(cache, "attnforge_plan_cache", False):
            raise ValueError(f"this model was optimized with a plan: generate() decodes with the plan's own "
                             f"per-head cache, and a {type(cache).__name__} would attend to every key. Pass no "
                             "cache (one is made for the call) or an af.PlanCache(model, plan, max_length=...)")
        if cache is None:
            new = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
            total = inputs.shape[1] + new if new else kwargs.get("max_length") or getattr(config, "max_length", None)
            cache = PlanCache(model, plan, max_length=total and total + draft_room(model, kwargs), impl=impl)
        compiled = model.forward
        model.forward = eager_forward
        try:
            with plan_attention(model):
                out = original(inputs, **cache_kwargs(model, cache), **kwargs)
        finally:
            model.forward = compiled
        model.attnforge_cache = cache
        return out

    return generate
