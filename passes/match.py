"""Node predicates that see through the many spellings of one operation in FX graphs.

Dynamo, symbolic_trace and hand-written graphs spell `x @ y` as operator.matmul, torch.matmul or the
method; softmax as F.softmax, torch.softmax or the method or an nn.Softmax module; and so on. The
detection rules ask these predicates instead of comparing targets themselves.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MATMUL = {torch.matmul, operator.matmul, torch.Tensor.matmul}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div}
_ADD = {operator.add, torch.add, torch.Tensor.add}
_DROPOUT = {F.dropout, torch.dropout}
_BMM = {torch.bmm, torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
_EINSUM = {torch.einsum, torch.functional.einsum}
_MASKED_FILL = {torch.masked_fill, torch.Tensor.masked_fill}
_WHERE = {torch.where}
# the traced root: L['self'], G['...'], (transformers >= 5.24 wraps forward) L['args'][0], or a bound forward
# a wrapper closes over, L['forward'].__self__
_DYNAMO_ROOT = re.compile(r"^([LG]\['[^']*'\](\[\d+\])*(\.__self__)?|self)\.?")
_CASTS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}


def is_call(node: Any, functions: set, methods: tuple = ()) -> bool:
    """node calls one of `functions`, or a method named in `methods`."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def module_of(node: fx.Node):
    """The nn.Module a call_module node calls, or None."""
    if node.op != "call_module":
        return None
    return node.graph.owning_module.get_submodule(node.target)


def is_sdpa(node) -> bool:
    return is_call(node, _SDPA)


def is_matmul(node) -> bool:
    return is_call(node, _MATMUL, ("matmul",))


def is_bmm(node) -> bool:
    return is_call(node, _BMM, ("bmm",))


def is_baddbmm(node) -> bool:
    return is_call(node, _BADDBMM, ("baddbmm",))


def is_einsum(node) -> bool:
    return is_call(node, _EINSUM)


def is_masked_fill(node) -> bool:
    return is_call(node, _MASKED_FILL, ("masked_fill",))


def is_where(node) -> bool:
    return is_call(node, _WHERE, ("where",))


def is_softmax(node) -> bool:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return isinstance(module_of(node), torch.nn.Softmax)
    return is_call(node, _SOFTMAX, ("softmax",))


def is_mul(node) -> bool:
    return is_call(node, _MUL, ("mul",))


def is_div(node) -> bool:
    return is_call(node, _DIV, ("div", "true_divide"))


def is_add(node) -> bool:
    return is_call(node, _ADD, ("add",))


def is_tanh(node) -> bool:
    return is_call(node, {torch.tanh, torch.nn.functional.tanh}, ("tanh",))


def is_cast(node) -> bool:
    """A dtype conversion (or a no-op conversion) that keeps the shape."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in _CASTS:
        return False
    if node.target == "to":
        # .to(dtype) / .to(dtype=...) only; a device move is not a cast we may drop
        extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "copy"]
        return all(isinstance(a, torch.dtype) or a is None for a in extra)
    return True


def is_dropout(node) -> bool:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return isinstance(module_of(node), torch.nn.Dropout)
    return is_call(node, _DROPOUT, ("dropout",))


def dropout_p(node: fx.Node) -> float:
    """Effective dropout probability of a dropout node: 0.0 when it is inactive (eval / training=False)."""
    if node.op == "call_module":
        mod = module_of(node)
        return float(mod.p) if mod.training else 0.0
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training" if node.target is F.dropout else "train", True)
    return float(p) if training else 0.0


def softmax_dim(node: fx.Node):
    if node.op == "call_module":
        return module_of(node).dim
    return arg(node, 1, "dim", None)


def softmax_dtype(node: fx.Node):
    if node.op == "call_module":
        return None
    return node.kwargs.get("dtype")


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `name` of a call, given positionally at `index` or as a keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > index:
        return node.args[index]
    return default


def permutation(node):
    """(source, perm) if `node` only reorders the dims of `source` (transpose, permute, .mT, .t());
    node's dim i is source's dim perm[i]. None otherwise."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    value = meta(src)
    if value is None:
        return None
    rank = len(value.shape)
    perm = list(range(rank))
    if is_call(node, {torch.transpose, torch.swapaxes, torch.swapdims}, ("transpose", "swapaxes", "swapdims")):
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        a, b = a % rank, b % rank
        perm[a], perm[b] = perm[b], perm[a]
    elif is_call(node, {torch.permute}, ("permute",)):
        dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        perm = [d % rank for d in dims]
    elif is_call(node, {torch.t}, ("t",)) and rank == 2:
        perm = [1, 0]
    elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",) and rank >= 2:
        perm[-1], perm[-2] = perm[-2], perm[-1]
    else:
        return None
    return src, tuple(perm)


def meta(node) -> Any:
    """The example value (fake tensor) or tensor metadata FX recorded for `node`, or None."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("example_value", "val", "tensor_meta"):
        value = node.meta.get(key)
        if value is not None and hasattr(value, "shape"):
            return value
    return None


def static_int(x) -> int | None:
    """x as a Python int when it is known statically (an int, or a SymInt bound to a constant)."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    maybe = getattr(node, "maybe_as_int", None)
    return maybe() if maybe is not None else None


def same_size(a, b) -> bool:
    """Equal sizes, comparing symbolic sizes by their expression (never adding a guard)."""
    ia, ib = static_int(a), static_int(b)
    if ia is not None and ib is not None:
        return ia == ib
    return str(a) == str(b)


def module_path(node: fx.Node) -> str:
    """Qualified path of the innermost module a node came from ('' at the top)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _DYNAMO_ROOT.sub("", path)       # "L['self'].model.layers.0" -> "model.layers.0"
    return node.meta.get("attnforge_module_path", "")
