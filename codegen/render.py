"""Render Triton kernel sources from Jinja2 templates.

A `KernelSpec` says what the kernel must do (not how fast): the form and the mask style. Rendering is
pure and deterministic, so the same spec always gives the same text, and so the same cache key.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jinja2

__all__ = ["KernelSpec", "RenderedKernel", "render_attention", "render_decode", "render_decode_quant", "render_linear"]

MASK_STYLES = (None, "bool", "additive")
PLAN_BLOCK = 64          # tile of the plan kernel = the block of the block-sparse forms the search makes


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """What one attention kernel computes. causal: top-left aligned; mask: None | 'bool' | 'additive';
    window: the kernel takes a sliding-window size (a run-time argument) and skips blocks outside it;
    plan: the heterogeneous per-head kernel (causal, no mask): each KV group runs its own form, from
    block metadata built by attnforge.runtime.blockmeta."""
    causal: bool = False
    mask: str | None = None
    window: bool = False
    plan: bool = False

    def __post_init__(self):
        if self.mask not in MASK_STYLES:
            raise ValueError(f"mask style {self.mask!r} is not one of {MASK_STYLES}")
        if self.plan and (not self.causal or self.mask or self.window):
            raise ValueError("the per-head plan kernel is for causal attention without a mask or window")

    @property
    def name(self) -> str:
        if self.plan:
            return "attnforge_fwd_plan_causal"
        parts = ["attnforge_fwd_dense", "causal" if self.causal else "full"]
        if self.window:
            parts.append("window")
        if self.mask:
            parts.append(f"{self.mask}mask")
        return "_".join(parts)


@dataclass(frozen=True, slots=True)
class RenderedKernel:
    spec: KernelSpec
    template: str
    source: str


def environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    """The Jinja2 environment the kernels render in, over any loader (tests/aot_sm90.py --rev renders the
    templates of another revision through it)."""
    return jinja2.Environment(loader=loader, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return environment(jinja2.PackageLoader("attnforge.codegen", "templates"))


def render_attention(spec: KernelSpec, env: jinja2.Environment | None = None) -> RenderedKernel:
    """Source text of the forward kernel for `spec` (a Python module defining KERNEL and launch), from the
    package's templates or those of `env`."""
    template = "attention_plan_fwd.py.j2" if spec.plan else "attention_fwd.py.j2"
    source = (env or _env()).get_template(template).render(
        template=template, name=spec.name, causal=spec.causal, mask=spec.mask, window=spec.window,
        block=PLAN_BLOCK, spec_repr=_spec_repr(spec), description=_describe(spec),
    )
    return RenderedKernel(spec, template, source)


def _spec_repr(spec: KernelSpec) -> str:
    plan = ", plan=True" if spec.plan else ""
    return f"KernelSpec(causal={spec.causal}, mask={spec.mask!r}, window={spec.window}{plan})"


def _describe(spec: KernelSpec) -> str:
    if spec.plan:
        return "causal, one form per KV group (dense / sink + window / elastic window / block-sparse)"
    parts = ["dense"]
    if spec.causal:
        parts.append("causal (top-left: query i sees keys j <= i)")
    if spec.window:
        parts.append("sliding window (query i sees keys j > i - WINDOW)")
    if spec.mask == "bool":
        parts.append("boolean mask (True = attend)")
    elif spec.mask == "additive":
        parts.append("additive mask")
    return ", ".join(parts)


DECODE_NAME = "attnforge_decode_splitkv"


def render_decode() -> RenderedKernel:
    """Source of the split-KV decode kernel over attnforge's per-head KV cache (runtime/kvcache.py)."""
    template = "decode.py.j2"
    source = _env().get_template(template).render(template=template, name=DECODE_NAME)
    return RenderedKernel(KernelSpec(), template, source)


DECODE_QUANT_NAME = "attnforge_decode_quant"


def render_decode_quant() -> RenderedKernel:
    """Source of the split-KV decode kernel over KIVI-quantized KV groups (runtime/kvquant.py), which
    unpacks and dequantizes keys and values in registers."""
    template = "decode_quant.py.j2"
    source = _env().get_template(template).render(template=template, name=DECODE_QUANT_NAME)
    return RenderedKernel(KernelSpec(), template, source)


LINEAR_NAME = "attnforge_linear_hybrid"


def render_linear() -> RenderedKernel:
    """Source of the chunked linear-hybrid kernels (forms.Linear: taylor2 and hedgehog feature maps)."""
    template = "linear_fwd.py.j2"
    source = _env().get_template(template).render(template=template, name=LINEAR_NAME)
    return RenderedKernel(KernelSpec(causal=True), template, source)
