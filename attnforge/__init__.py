"""attnforge: a compiler for the attention in PyTorch models.

    import attnforge as af
    sites = af.find_attention(model, example_inputs)      # list[AttentionSite]; the model is unchanged
    be = af.Backend()                                      # every site dense and exact
    out = torch.compile(model, backend=be)(*example_inputs)
    be.records                                             # per graph: sites, rewritten, declined, kernels
    torch.compile(model, backend="attnforge")              # the same, found by name
    plan = af.search(model, calibration_ids, budget=af.Budget(density=0.5))   # profile + search
    plan.save("plan.json"); model = af.optimize(model, af.Plan.load("plan.json"))
    af.export_onnx(model, (ids,), "model.onnx", plan=plan)   # one attnforge function node per site
"""
__version__ = "0.1.0"

from attnforge import runtime  # noqa: E402  (registers torch.ops.attnforge.attention)
from attnforge.compiler import (  # noqa: E402
    AttentionSite, Backend, BackendOptions, Decline, GraphRecord, compile_and_compare, find_attention,
)
from attnforge.compiler.api import optimize, search  # noqa: E402
from attnforge.compiler.decode import PlanCache, generate, plan_attention  # noqa: E402
from attnforge.compiler.export import ExportError, export_onnx  # noqa: E402
from attnforge.compiler.plan import Plan, PlanError  # noqa: E402
from attnforge.compiler.search import Budget  # noqa: E402
from attnforge.compiler.varlen import varlen_attention  # noqa: E402
from attnforge.runtime import KernelUnavailable  # noqa: E402
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, SinkWindow  # noqa: E402

__all__ = [
    "AttentionSite", "Backend", "BackendOptions", "BlockSparse", "Budget", "Decline", "Dense", "ElasticWindow",
    "ExportError", "GraphRecord", "KernelUnavailable", "Plan", "PlanCache", "PlanError", "SinkWindow", "compile_and_compare",
    "export_onnx", "find_attention", "generate", "optimize", "plan_attention", "runtime", "search", "varlen_attention",
    "__version__",
]
