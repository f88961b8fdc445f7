"""attnforge.codegen: Triton kernel sources rendered from templates, keyed by a content hash."""
from .render import KernelSpec, RenderedKernel, render_attention, render_decode, render_decode_quant, render_linear

__all__ = ["KernelSpec", "RenderedKernel", "render_attention", "render_decode", "render_decode_quant", "render_linear"]
