"""attnforge: a compiler for the attention in PyTorch models.

    import attnforge as af
    sites = af.find_attention(model, example_inputs)      # list[AttentionSite]; the model is unchanged
    be = af.Backend()                                      # every site dense and exact
    out = torch.compile(model, backend=be)(*example_inputs)
    be.records                                             # per graph: sites, rewritten, declined, kernels
    torch.compile(model, backend="attnforge")              # the same, found by name
"""
__version__ = "0.1.0"

from attnforge import runtime  # noqa: E402  (registers torch.ops.attnforge.attention)
from attnforge.compiler import (  # noqa: E402
    AttentionSite, Backend, BackendOptions, Decline, GraphRecord, compile_and_compare, find_attention,
)
from attnforge.runtime import KernelUnavailable  # noqa: E402

__all__ = [
    "AttentionSite", "Backend", "BackendOptions", "Decline", "GraphRecord", "KernelUnavailable",
    "compile_and_compare", "find_attention", "runtime", "__version__",
]
