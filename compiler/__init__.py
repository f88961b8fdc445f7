"""attnforge.compiler: the driver. capture, IR, backend, CLI, built-in models."""
from .api import compile_and_compare, detect_model, find_attention
from .backend import Backend, BackendOptions, GraphRecord, attnforge_backend, named_backend
from .capture import capture, capture_dynamo, capture_symbolic
from .ir import AttentionSite, Decline


def _linear_kernel_key() -> str:
    from attnforge import codegen
    from attnforge.runtime import kernels

    return kernels.register_source(codegen.render_linear().source)


def _plan_kernel_key() -> str:
    from .decode import _attention_key

    return _attention_key(plan=True)


def _masked_kernel_key() -> str:
    from attnforge import codegen
    from attnforge.runtime import kernels

    return kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=False, mask="bool")).source)


def _install() -> None:
    from attnforge.runtime import linear, ops

    linear.set_kernel_factory(_linear_kernel_key)
    ops.set_plan_kernel_factory(_plan_kernel_key)
    ops.set_masked_kernel_factory(_masked_kernel_key)


_install()

__all__ = [
    "AttentionSite", "Backend", "BackendOptions", "Decline", "GraphRecord", "attnforge_backend",
    "capture", "capture_dynamo", "capture_symbolic", "compile_and_compare", "detect_model",
    "find_attention", "named_backend",
]
