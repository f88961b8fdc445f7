"""attnforge.runtime: the custom op, its implementations, and the kernel cache. Imports nothing else
of attnforge."""
from . import kernels
from .kernels import KernelUnavailable
from .ops import IMPLS, attention, counters, fallbacks, reset_counters, triton_check
from .reference import attention_reference, attention_reference_backward

__all__ = [
    "IMPLS", "KernelUnavailable", "attention", "attention_reference", "attention_reference_backward",
    "counters", "fallbacks", "kernels", "reset_counters", "triton_check",
]
