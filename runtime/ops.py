"""`torch.ops.attnforge.attention`: the one op every rewritten attention site calls.

    attention(q, k, v, mask, causal, window, scale, impl, kernel, forms="", padding=None, softcap=0.0) -> out
        q [B, Hq, N, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> out [B, Hq, N, Dv]
        mask:   None, or broadcastable to [B, Hq, N, S]; bool (True = attend) or additive float
        causal: top-left aligned (as SDPA's is_causal)
        padding: None, or [B, S] key flags: bool (True = a token, as Hugging Face's attention_mask) or integer
                labels (0 = padding, equal nonzero labels = one sequence: packed rows). A padded or packed
                batch, every sequence computed as that sequence alone (attnforge.runtime.padding): its tokens
                at their own positions (queries = the last N key slots), zeros at padding queries; no mask or
                window with it. Compacted through the same kernels where N = S (one row per sequence).
        window: > 0 hides keys j <= i - window (sliding window, own key included); 0: no window
        impl:   "auto" | "triton" | "reference"
        kernel: key of a generated Triton source (attnforge.runtime.kernels), "" when none was generated
        forms:  "" (dense) or the JSON of one Form per KV head group (attnforge.runtime.forms): a plan entry
        softcap: > 0 soft-caps the scaled scores before any mask, softcap * tanh(s / softcap) (Gemma 2's
                logit soft-capping); 0: none. Every kernel and the reference compute it (not Linear forms)

It is a torch.library custom op with a fake implementation and autograd, so it survives torch.compile
and torch.export. Two companions:
    attention_train(same arguments) -> (out, lse [B, Hq, N] float32): the same output plus each row's
                 log-sum-exp, which its backward reads instead of running the forward again (the backend
                 uses it in graphs compiled with grad enabled)
    padding_mask(padding [B, S], N, causal) -> [B, 1, N, S] bool: the mask of a padded batch, as Hugging
                 Face's sdpa_mask builds it; attnforge's mask function (compiler.hf) builds masks through it
                 so that the passes see a padded batch and give the attention op `padding` instead
    attention_backward(grad_out, q, k, v, out?, lse?, scale, impl, kernel, forms, padding?, softcap)
                 -> (dq, dk, dv): the
                 plan kernel's backward kernels, an op of their own so that AOTAutograd (which traces the
                 backward with fake tensors) keeps them for run time
Implementations:
    reference -> attention_reference (PyTorch; runs anywhere; the oracle)
    triton    -> the generated kernel: compiled on CUDA, Triton's interpreter on CPU. Never falls back:
                 if it cannot run, KernelUnavailable says why.
    auto      -> triton on CUDA when it can run, else the reference. A fallback on CUDA warns and is
                 recorded (`fallbacks[(kernel, reason)]`, which each backend record reads back); CPU
                 tensors take the reference without a warning.
Every call bumps `counters[<implementation that ran>]`, so tests and records can see what really ran.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .blockmeta import block_meta, block_reason
from .dynamic import dynamic, resolve
from .forms import forms_from_json, forms_to_json
from . import padding as pad
from .kernels import KernelUnavailable
from .reference import LINEAR_SOFTCAP, attention_reference, attention_reference_backward, reference_lse

__all__ = ["attention", "attention_train", "attention_backward", "padding_mask", "counters", "fallbacks", "reset_counters",
           "IMPLS", "triton_check", "set_plan_kernel_factory", "set_masked_kernel_factory"]

IMPLS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
PLAN_TILE = 64            # the plan kernel's sub-block (codegen.render.PLAN_BLOCK): its tiles are multiples

counters: collections.Counter = collections.Counter()
fallbacks: collections.Counter = collections.Counter()   # (kernel key, reason) -> automatic fallbacks


def reset_counters() -> None:
    counters.clear()
    fallbacks.clear()


# the per-head plan kernel, whose backward also runs a dense site's backward (installed by the compiler)
_plan_kernel = kernels.KernelFactory()
set_plan_kernel_factory = _plan_kernel.install
_plan_key = _plan_kernel.key
# the dense kernel with a boolean mask and no causality of its own: a padded call with fewer queries than keys
# (a decoding step over a padded cache) runs it on the padding's mask (installed by the compiler)
_masked_kernel = kernels.KernelFactory()
set_masked_kernel_factory = _masked_kernel.install


def triton_check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], kernel: str,
                 forms: str = "", causal: bool = True, window: int = 0) -> Optional[str]:
    """None if the generated kernel can run these inputs, else the reason it cannot."""
    if _planned(forms):
        if not causal or mask is not None or window:
            return "per-head forms on a site with its own mask or window run in the reference"
        if any(f.kind == "linear" for f in _forms(forms)):
            return "linear forms run in their own kernel (attnforge.runtime.linear), not the plan kernel"
        # every tile the plan kernel runs is a multiple of PLAN_TILE, whose sub-blocks carry the forms exactly
        reason = block_reason(_forms(forms), q.shape[2], k.shape[2], PLAN_TILE, PLAN_TILE)
        if reason:
            return reason
    if not kernel:
        return "no Triton kernel was generated for this site"
    if not kernels.triton_available():
        return kernels.NO_TRITON
    if q.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA (or the CPU interpreter), not {q.device.type}"
    if q.device.type == "cpu" and not kernels.interpreter_enabled():
        return ("the tensors are on the CPU, where Triton runs only through its interpreter: start Python "
                "with TRITON_INTERPRET=1")
    if q.device.type == "cpu" and (problem := kernels.interpreter_problem()):
        return problem
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernel (use float16, bfloat16 or float32)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds {MAX_HEAD_DIM}"
    if mask is not None and mask.device != q.device:
        return f"mask is on {mask.device} but q is on {q.device}"
    if mask is not None and mask.requires_grad:
        return "the mask requires grad; the forward kernel does not produce its gradient"
    return None


def _accelerated(q: Tensor) -> bool:
    """Where the automatic choice tries the compiled kernel (CUDA); elsewhere it runs the reference."""
    return q.device.type == "cuda"


DYNAMIC_PADDED = ("vertical_slash forms are estimated per input over one sequence's positions; a padded or packed "
                  "batch is not supported with them yet: run the rows one at a time, or plan without them")


def _check_args(q, k, v, mask, impl, softcap=0.0):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no soft-cap), got {softcap!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}, {v.shape[1]})")


def _config(loaded, kernel: str, q: Tensor, v: Tensor, run, shape_key: str = ""):
    """The tuned launch config on a GPU (attnforge.runtime.autotune), None (the kernel's default) elsewhere.
    shape_key: what else the best config depends on (a length bucket; a plan's forms)."""
    from . import autotune

    if loaded.interpreted or q.device.type != "cuda" or not hasattr(loaded.module, "CONFIGS") or not autotune.ENABLED:
        return None

    return autotune.tuned_config(loaded.module, kernel, torch.cuda.get_device_name(q.device),
                                 max(q.shape[-1], v.shape[-1]), q.dtype, run, shape_key=shape_key)


def _length_bucket(n: int) -> str:
    """Lengths that share a tuned config: up to 1k, 4k, 16k, 64k, ... tokens (powers of 4). Coarser than
    Triton's own N_CTX keys on purpose: a new bucket costs a tuning run on its first call (and a compile of
    every config where the length's divisibility is new), which a serving process should meet rarely."""
    bucket = 1024
    while bucket < n:
        bucket *= 4
    return f"n{bucket // 1024}k"


def _plan_meta(forms: str, q: Tensor, k: Tensor, tile: tuple[int, int], per_row: bool = False):
    """Block metadata of a plan call on `tile` (BLOCK_M, BLOCK_N); per_row: a compacted padded batch whose rows
    take their own elastic spans."""
    return block_meta(forms, q.shape[1] // k.shape[1], q.shape[2], k.shape[2], tile[0], tile[1], q.device, per_row)


def _planned(forms: str) -> bool:
    return bool(forms) and any(f.kind != "dense" for f in _forms(forms))


def _run_triton(q, k, v, mask, causal, window, scale, kernel, forms="", lse=None, lens=None, windows=None,
                softcap=0.0):
    """The generated kernel on these inputs. lens / windows: a compacted padded batch (runtime.padding)."""
    loaded = kernels.load_kernel(kernel, q.device)
    is_plan = getattr(loaded.module, "PLAN", False)
    if _planned(forms) != is_plan:
        raise KernelUnavailable("the site's generated kernel is " + ("the per-head plan kernel but the call has "
                                "no plan" if is_plan else "dense but the call carries a plan") +
                                "; compile the model again with its plan")
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if q.shape[2] and k.shape[2]:
        shape_key = _length_bucket(max(q.shape[2], k.shape[2]))
        if is_plan:
            # the tile is the config's (autotuned per length bucket and forms), the metadata built for it
            default = loaded.module.default_config(max(q.shape[-1], v.shape[-1]), loaded.interpreted)

            def run(config):
                meta = _plan_meta(forms, q, k, (config or default)[:2], per_row=windows is not None)
                loaded.launch(q, k, v, out, scale, meta, config=config or default, lse=lse, lens=lens, windows=windows,
                              softcap=softcap)
                return meta

            meta = run(_config(loaded, kernel, q, v, run, f"{shape_key}|forms-{_forms_id(forms)}"))
            counters["triton_plan_blocks"] += meta.visited_blocks
            counters["triton_plan_whole_blocks"] += meta.whole_blocks     # run with no element mask
        else:
            run = lambda config: loaded.launch(q, k, v, mask, out, scale, window, config=config, lse=lse,  # noqa: E731
                                               lens=lens, softcap=softcap)
            run(_config(loaded, kernel, q, v, run, shape_key))
    else:
        out.zero_()                      # no queries or no keys: nothing to attend to
        if lse is not None:
            lse.fill_(float("inf"))
    counters["triton_interpreter" if loaded.interpreted else "triton"] += 1
    return out


@functools.lru_cache(maxsize=256)
def _forms(text: str) -> tuple:
    return forms_from_json(text)


@functools.lru_cache(maxsize=256)
def _forms_id(text: str) -> str:
    """A short stable name of a plan entry's forms (the autotuner's key for the plan kernel)."""
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _forward(q, k, v, mask, causal, window, scale, impl, kernel, forms, lse=None, padding=None, softcap=0.0):
    """The op's forward. lse: None, or a float32 [B, H, N] tensor to fill with each row's log-sum-exp wherever
    a Triton backward may read it (see attention_train)."""
    _check_args(q, k, v, mask, impl, softcap)
    head_forms = _forms(forms)
    if dynamic(head_forms):              # VerticalSlash: this input's BlockSparse forms (runtime.dynamic)
        if padding is not None:
            raise ValueError(DYNAMIC_PADDED)
        head_forms = resolve(head_forms, q, k, scale, softcap)
        forms = forms_to_json(head_forms)
        counters["dynamic_resolved"] += 1
    if softcap and any(f.kind == "linear" for f in head_forms):
        raise ValueError(LINEAR_SOFTCAP)
    if padding is not None:
        return _forward_padded(q, k, v, padding, mask, causal, window, scale, impl, kernel, forms, lse, softcap)
    if impl != "reference" and any(f.kind == "linear" for f in head_forms):
        return _attention_linear(q, k, v, mask, causal, window, scale, impl, kernel, head_forms, lse=lse)
    if impl == "reference":
        return _reference(q, k, v, mask, causal, scale, window, head_forms, lse, softcap=softcap)
    return _choose(impl, q, kernel, triton_check(q, k, v, mask, kernel, forms, causal, window),
                   lambda: _run_triton(q, k, v, mask, causal, window, scale, kernel, forms, lse, softcap=softcap),
                   lambda failed: _reference(q, k, v, mask, causal, scale, window, head_forms, lse, exact_lse=failed,
                                             softcap=softcap))


def _choose(impl, q, kernel, reason, triton, reference):
    """The choice every call makes once impl is 'triton' or 'auto': `triton()` where the kernel can run
    (reason None) and is asked for or the tensors are on CUDA, else `reference(failed)`, on CUDA with a
    warning and a recorded fallback (failed: the kernel was tried and raised at run time). impl='triton'
    never falls back: KernelUnavailable says why, a kernel failure propagates."""
    if impl == "triton" and reason:
        raise KernelUnavailable(f"impl='triton' was asked for but {reason}; use impl='auto' or impl='reference'")
    failed = False
    if reason is None and (impl == "triton" or _accelerated(q)):
        try:
            return triton()
        except Exception as e:             # a kernel that fails to load or compile must not lose the run
            if impl == "triton":
                raise
            reason, failed = f"Triton kernel failed: {type(e).__name__}: {e}", True
    if _accelerated(q):
        fallbacks[(kernel, reason)] += 1
        warnings.warn(f"attnforge: running the reference attention because {reason}", RuntimeWarning,
                      stacklevel=4)
    return reference(failed)


def _padded_reason(q, k, v, padding, causal, kernel, forms) -> Optional[str]:
    """None if a padded call can run compacted through the Triton kernels, else why not."""
    if q.shape[2] != k.shape[2]:
        if _planned(forms):
            return "a planned padded call with fewer queries than keys (a decoding step) runs in the reference"
        if not (key := _masked_kernel.key()):
            return "no masked Triton kernel was generated for a padded call with fewer queries than keys"
        return triton_check(q, k, v, None, key, "", False, 0)
    if any(f.kind == "linear" for f in _forms(forms)):
        if not causal:
            return "linear forms need causal attention"
        return _linear_reason(q, k, None, True, 0) or triton_check(q, k, v, None, kernel, _linear_rest(_forms(forms)),
                                                                   True, 0)
    return triton_check(q, k, v, None, kernel, forms, causal, 0)


def _run_padded(q, k, v, padding, causal, scale, impl, kernel, forms, lse, softcap=0.0):
    """Compact the rows (runtime.padding), run the kernels on them, scatter the result back."""
    if q.shape[2] != k.shape[2]:         # (dense only, see _padded_reason) the padding's mask, read tile by tile
        mask = pad.mask_4d(padding, q.shape[2], causal)
        return _run_triton(q, k, v, mask, False, 0, scale, _masked_kernel.key(), "", lse, softcap=softcap)
    rows = pad.segments_of(padding)     # one compacted row per sequence (per row, unless rows are packed)
    if rows.src is not None:
        counters["packed"] += 1
    qc, kc, vc = pad.gather(q, rows), pad.gather(k, rows), pad.gather(v, rows)
    head_forms = _forms(forms)
    if any(f.kind == "linear" for f in head_forms):
        # the plan kernel's groups at each sequence's own length (elastic spans), the Linear groups length-free
        windows = pad.row_windows(forms_from_json(_linear_rest(head_forms)), rows.lens)
        lse_c = None if lse is None else lse.new_empty(qc.shape[:-1])
        out = pad.scatter(_attention_linear(qc, kc, vc, None, True, 0, scale, impl, kernel, head_forms, rows.lens,
                                            windows, lse_c), rows)
        if lse is not None:
            lse.copy_(pad.scatter_rows(lse_c, rows, float("inf")))
        return out
    lse_c = None if lse is None else lse.new_empty(qc.shape[:-1])
    windows = pad.row_windows(head_forms, rows.lens) if _planned(forms) else None
    out = pad.scatter(_run_triton(qc, kc, vc, None, causal, 0, scale, kernel, forms, lse_c, rows.lens, windows,
                                  softcap), rows)
    if lse is not None:
        lse.copy_(pad.scatter_rows(lse_c, rows, float("inf")))
    return out


def _forward_padded(q, k, v, padding, mask, causal, window, scale, impl, kernel, forms, lse, softcap=0.0):
    """A padded batch (see the module docstring): the Triton kernels over compacted rows where they can run,
    else the reference; the same choices, errors and fallbacks as an unpadded call."""
    if reason := pad.padding_reason(padding, q, k, causal, mask, window):
        raise ValueError(reason)
    counters["padded"] += 1
    head_forms = _forms(forms)

    def reference(failed):
        counters["reference"] += 1
        if lse is not None:
            if failed:                   # the backward may still choose the Triton kernels: it reads this
                lse.copy_(pad.reference_lse(q, k, padding, causal, scale, head_forms, softcap))
            else:
                lse.fill_(float("nan"))
        return pad.reference(q, k, v, padding, causal, scale, head_forms, softcap)

    if impl == "reference":
        return reference(False)
    return _choose(impl, q, kernel, _padded_reason(q, k, v, padding, causal, kernel, forms),
                   lambda: _run_padded(q, k, v, padding, causal, scale, impl, kernel, forms, lse, softcap), reference)


@torch.library.custom_op("attnforge::padding_mask", mutates_args=())
def padding_mask(padding: Tensor, q_length: int, causal: bool) -> Tensor:
    """[B, 1, N, S] bool (True = attend) of a padded batch: runtime.padding.mask_4d."""
    return pad.mask_4d(padding, q_length, causal)


@padding_mask.register_fake
def _(padding, q_length, causal):
    return padding.new_empty((padding.shape[0], 1, q_length, padding.shape[1]), dtype=torch.bool)


def _reference(q, k, v, mask, causal, scale, window, head_forms, lse, exact_lse=False, softcap=0.0):
    """The reference's output; lse (if given) filled exactly only where the backward may still choose the
    Triton kernels (exact_lse: the checks passed but the forward kernel failed at run time), else with NaN,
    which nothing reads (the backward's checks fail as the forward's did, or it runs the reference)."""
    counters["reference"] += 1
    if lse is not None:
        if exact_lse:
            lse.copy_(reference_lse(q, k, mask, causal, scale, window, head_forms, softcap))
        else:
            lse.fill_(float("nan"))
    return attention_reference(q, k, v, mask, causal, scale, window, head_forms, softcap)


@torch.library.custom_op("attnforge::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, window: int,
              scale: float, impl: str, kernel: str, forms: str = "", padding: Optional[Tensor] = None,
              softcap: float = 0.0) -> Tensor:
    return _forward(q, k, v, mask, causal, window, scale, impl, kernel, forms, padding=padding, softcap=softcap)


@torch.library.custom_op("attnforge::attention_train", mutates_args=())
def attention_train(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, window: int,
                    scale: float, impl: str, kernel: str, forms: str = "",
                    padding: Optional[Tensor] = None, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """attention, also returning each row's log-sum-exp [B, H, N] (float32) for its backward, which then
    skips the forward recomputation. The backend puts it in place of attention in graphs compiled with
    grad enabled; the values of out are the same."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return _forward(q, k, v, mask, causal, window, scale, impl, kernel, forms, lse, padding, softcap), lse


def _linear_reason(q: Tensor, k: Tensor, mask, causal: bool, window: int) -> Optional[str]:
    """None if the linear kernel (runtime.linear.linear_triton) can run this call, else why not."""
    if not causal or mask is not None or window:
        return "linear forms need plain causal attention (no mask, no window)"
    if q.shape[2] != k.shape[2]:
        return "the linear kernel runs causal self-attention (as many queries as keys); decoding uses LinearState"
    if not kernels.triton_available():
        return kernels.NO_TRITON
    if q.device.type == "cpu" and not kernels.interpreter_enabled():
        return "the tensors are on the CPU, where Triton runs only through its interpreter (TRITON_INTERPRET=1)"
    if q.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA (or the CPU interpreter), not {q.device.type}"
    if q.dtype not in KERNEL_DTYPES or not (q.dtype == k.dtype):
        return f"dtype {q.dtype} is not supported by the kernel (use float16, bfloat16 or float32)"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} exceeds the linear kernel's 128"
    return None


def _linear_rest(head_forms) -> str:
    """The forms the plan kernel runs at a site with Linear groups: each Linear group as a cheap exact
    stand-in (its sink + window), whose output slots the linear kernel then fills."""
    from .forms import Linear, SinkWindow, forms_to_json

    return forms_to_json(tuple(SinkWindow(f.sink, f.window) if isinstance(f, Linear) else f for f in head_forms))


def _attention_linear(q, k, v, mask, causal, window, scale, impl, kernel, head_forms, lens=None, windows=None,
                      lse=None):
    """A site with Linear groups: the other groups through the plan kernel (or the reference), the Linear
    groups through the chunked linear kernel; the reference for everything where the kernel cannot run.
    lens / windows: a compacted padded or packed batch (the caller checked that the plan kernel runs).
    lse: filled with the plan kernel's log-sum-exp of the other groups where it ran them (their backward
    kernels read it, see linear_backward; the Linear groups' slots hold their stand-in's), else NaN."""
    from .linear import linear_triton

    if lse is not None:
        lse.fill_(float("nan"))          # never read where the plan kernel did not run the other groups
    reason = _linear_reason(q, k, mask, causal, window)
    if reason is None and (impl == "triton" or _accelerated(q)):
        rest_json = _linear_rest(head_forms)
        if all(f.kind == "linear" for f in head_forms):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))       # the linear kernel writes every slot
        elif lens is not None or triton_check(q, k, v, None, kernel, rest_json, True, 0) is None:
            out = _run_triton(q, k, v, None, True, 0, scale, kernel, rest_json, lse, lens, windows)
        else:
            counters["reference"] += 1
            out = attention_reference(q, k, v, None, True, scale, 0, forms_from_json(rest_json))
        linear_triton(q, k, v, head_forms, scale, out=out)
        counters["triton_linear"] += 1
        return out
    if impl == "triton":
        raise KernelUnavailable(f"impl='triton' was asked for but {reason or 'the tensors are not on a GPU'}; "
                                "use impl='auto' or impl='reference'")
    if _accelerated(q):
        fallbacks[("linear", reason)] += 1
        warnings.warn(f"attnforge: running the reference attention because {reason}", RuntimeWarning, stacklevel=4)
    counters["reference"] += 1
    return attention_reference(q, k, v, mask, causal, scale, window, head_forms)


@attention.register_fake
def _(q, k, v, mask, causal, window, scale, impl, kernel, forms="", padding=None, softcap=0.0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@attention_train.register_fake
def _(q, k, v, mask, causal, window, scale, impl, kernel, forms="", padding=None, softcap=0.0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output, saved_outputs=()):
    q, k, v, mask, causal, window, scale, impl, kernel, forms, padding, softcap = inputs
    ctx.save_for_backward(q, k, v, mask, padding, *saved_outputs)
    ctx.causal, ctx.window, ctx.scale, ctx.forms, ctx.softcap = causal, window, scale, forms, softcap
    ctx.dynamic = dynamic(_forms(forms))
    ctx.impl, ctx.kernel = impl, kernel


def _dense_as_forms(q: Tensor, k: Tensor, mask, causal: bool, window: int) -> str:
    """A dense call as plan forms when the plan kernel computes exactly the same thing, else "": causal
    self-attention (N = S, where top-left and bottom-right alignment agree), no mask; a sliding window of
    w keys is SinkWindow(0, w) for every group."""
    if not causal or mask is not None or q.shape[2] != k.shape[2]:
        return ""
    from .forms import Dense, SinkWindow, forms_to_json

    return forms_to_json((SinkWindow(0, window) if window else Dense(),) * k.shape[1])


def _backward_kernel(ctx, q, k, v, mask):
    """(plan kernel key, forms) when Triton's backward kernels should run this call, else None: the same
    choice the forward made (impl='triton', or 'auto' on CUDA). A planned call runs with its own forms; a
    dense one through the plan kernel with every group dense (or windowed) where that is exact."""
    if ctx.impl == "reference" or (ctx.impl == "auto" and not _accelerated(q)):
        return None
    if any(f.kind == "linear" for f in _forms(ctx.forms)):
        return None                  # linear hybrids: gradients by autograd through their reference
    if _planned(ctx.forms):
        key, forms = ctx.kernel, ctx.forms
        reason = triton_check(q, k, v, mask, key, forms, ctx.causal, ctx.window)
        if reason:
            if ctx.impl == "triton":
                raise KernelUnavailable(f"impl='triton' backward: {reason}; use impl='auto' or impl='reference'")
            return None
    else:
        # a dense call has no backward kernel of its own: where the plan kernel computes the same attention
        # its backward runs; elsewhere (masks, cross-attention) the reference's, as it always did
        key, forms = _plan_key(), _dense_as_forms(q, k, mask, ctx.causal, ctx.window)
        if not (forms and key) or triton_check(q, k, v, None, ctx.kernel, "", True, 0) or \
                triton_check(q, k, v, None, key, forms, True, 0):
            return None
    try:
        loaded = kernels.load_kernel(key, q.device)
    except Exception:
        if ctx.impl == "triton":
            raise
        return None                      # the forward reported why (it loads the same module)
    if not (getattr(loaded.module, "PLAN", False) and hasattr(loaded.module, "launch_backward")):
        return None
    return key, forms


def _triton_backward(kernel, forms, grad_out, q, k, v, out, lse, scale, padding=None, softcap=0.0):
    loaded = kernels.load_kernel(kernel, q.device)
    rows = lens = windows = None
    if padding is not None:              # a padded batch: the same compaction as its forward
        rows = pad.segments_of(padding)
        lens, windows = rows.lens, pad.row_windows(_forms(forms), rows.lens)
        grad_out = pad.gather(grad_out, rows).masked_fill(~rows.valid[:, None, :, None], 0)
        q, k, v = pad.gather(q, rows), pad.gather(k, rows), pad.gather(v, rows)
        out = None if out is None else pad.gather(out, rows)
        lse = None if lse is None else pad.gather_rows(lse, rows)
    tile = (loaded.module.BWD_BLOCK, loaded.module.BWD_BLOCK)
    meta = _plan_meta(forms, q, k, tile, per_row=windows is not None)
    if out is None or lse is None:
        # no log-sum-exp from the forward (the op was called as attention, not attention_train): recompute
        # the forward once to get it, then the dQ and dK/dV kernels
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        loaded.launch(q, k, v, out, scale, meta, lse=lse, lens=lens, windows=windows, softcap=softcap)
        counters["triton_backward_recomputed"] += 1
    grads = loaded.module.launch_backward(q, k, v, out, grad_out, lse, scale, meta, interpreted=loaded.interpreted,
                                          lens=lens, windows=windows, softcap=softcap)
    return grads if rows is None else tuple(pad.scatter(g, rows) for g in grads)


@torch.library.custom_op("attnforge::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor], lse: Optional[Tensor],
                       scale: float, impl: str, kernel: str, forms: str,
                       padding: Optional[Tensor] = None, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of causal self-attention without a mask (one form per KV group, `forms`; a padded batch with
    `padding`; soft-capped scores with `softcap`) through the backward kernels of the plan kernel `kernel`; out and lse from attention_train's
    forward, or None (recomputed).
    An op of its own so that a compiled training step (AOTAutograd traces the backward with fake tensors)
    keeps the kernel launches for run time. A failing kernel under impl='auto' falls back to the
    reference's gradients with a warning and a recorded fallback."""
    try:
        grads = _triton_backward(kernel, forms, grad_out, q, k, v, out, lse, scale, padding, softcap)
        counters["triton_backward"] += 1
        return grads
    except Exception as e:               # as in the forward: 'auto' must not lose the step to a kernel failure
        if impl == "triton":
            raise
        reason = f"Triton backward failed: {type(e).__name__}: {e}"
        fallbacks[(kernel, reason)] += 1
        warnings.warn(f"attnforge: running the reference backward because {reason}", RuntimeWarning, stacklevel=2)
    if padding is not None:
        dq, dk, dv = pad.reference_backward(grad_out, q, k, v, padding, True, scale, _forms(forms), softcap)
    else:
        dq, dk, dv, _ = attention_reference_backward(grad_out, q, k, v, None, True, scale, 0, _forms(forms), softcap)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, impl, kernel, forms, padding=None, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)     # contiguous, as the kernels' are


def _linear_rest_backward(grad_out, q, k, v, out, lse, scale, impl, kernel, head_forms, padding):
    """dq, dk, dv of the groups of a Linear site that are not Linear (see linear_backward); the Linear
    groups' slots hold their stand-in's gradients, which the caller replaces."""
    rest = _linear_rest(head_forms)
    # the plan kernel's backward exactly where the forward ran the plan kernel (and so filled lse)
    if _linear_reason(q, k, None, True, 0) is None and (impl == "triton" or _accelerated(q)) and \
            triton_check(q, k, v, None, kernel, rest, True, 0) is None:
        try:
            grads = _triton_backward(kernel, rest, grad_out, q, k, v, out, lse, scale, padding)
            counters["triton_backward"] += 1
            return grads
        except Exception as e:
            if impl == "triton":
                raise
            reason = f"Triton backward failed: {type(e).__name__}: {e}"
            fallbacks[(kernel, reason)] += 1
            warnings.warn(f"attnforge: running the reference backward because {reason}", RuntimeWarning,
                          stacklevel=3)
    if padding is not None:
        return pad.reference_backward(grad_out, q, k, v, padding, True, scale, _forms(rest))
    return attention_reference_backward(grad_out, q, k, v, None, True, scale, 0, _forms(rest))[:3]


@torch.library.custom_op("attnforge::linear_backward", mutates_args=())
def linear_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Optional[Tensor], lse: Optional[Tensor],
                    scale: float, impl: str, kernel: str, forms: str,
                    padding: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of a causal self-attention site with Linear groups (no mask): the Linear groups by
    autograd through their chunked form (runtime.linear.linear_group_chunked: time and memory linear in
    N, where the reference's autograd holds N x N scores), the other groups through the plan kernel's
    backward where the forward ran it, else the reference's. A padded or packed batch runs each sequence
    compacted, as its forward did. An op of its own so that a compiled training step keeps it for run time
    (the compaction reads lengths on the host)."""
    from .linear import linear_backward as chunked_backward

    head_forms = _forms(forms)
    if all(f.kind == "linear" for f in head_forms):
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    else:
        grads = tuple(g.contiguous() for g in
                      _linear_rest_backward(grad_out, q, k, v, out, lse, scale, impl, kernel, head_forms, padding))
    counters["linear_backward"] += 1
    if padding is None:
        return chunked_backward(grad_out, q, k, v, head_forms, scale, grads)
    grads = pad.with_linear_grads(grad_out, q, k, v, padding, head_forms, grads,
                                  lambda go, qc, kc, vc: chunked_backward(go, qc, kc, vc, head_forms, scale))
    return tuple(g.contiguous() for g in grads)


@linear_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, impl, kernel, forms, padding=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_NO_GRADS = (None,) * 9              # mask (a float mask's gradient where the reference gives one), then the
                                     # non-tensor arguments, padding and softcap


def _backward(ctx, grad_out, out=None, lse=None, saved=None):
    # saved: ctx.saved_tensors, read once by the caller (a non-reentrant checkpoint refuses a second unpack)
    if ctx.dynamic:
        raise RuntimeError("gradients through a vertical_slash form are not supported: it is estimated per input "
                           "for inference (MInference style); run it under torch.no_grad(), or fine-tune with the "
                           "plan's static forms")
    q, k, v, mask, padding = (ctx.saved_tensors if saved is None else saved)[:5]
    # the choice is made from shapes, dtypes and devices only (it also runs on fake tensors, when a compiled
    # training step is traced); the kernels run inside attention_backward
    square = padding is None or q.shape[2] == k.shape[2]     # a padded call runs compacted only where N = S
    if ctx.impl != "reference" and q.shape[2] == k.shape[2] and ctx.causal and mask is None and not ctx.window \
            and any(f.kind == "linear" for f in _forms(ctx.forms)):
        dq, dk, dv = torch.ops.attnforge.linear_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.impl,
                                                         ctx.kernel, ctx.forms, padding)
        return dq, dk, dv, *_NO_GRADS
    chosen = _backward_kernel(ctx, q, k, v, mask) if q.shape[2] and k.shape[2] and square else None
    if chosen is not None:
        key, forms = chosen
        dq, dk, dv = torch.ops.attnforge.attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.impl, key,
                                                            forms, padding, ctx.softcap)
        return dq, dk, dv, *_NO_GRADS
    if padding is not None:
        dq, dk, dv = pad.reference_backward(grad_out, q, k, v, padding, ctx.causal, ctx.scale, _forms(ctx.forms),
                                            ctx.softcap)
        return dq, dk, dv, *_NO_GRADS
    dq, dk, dv, dmask = attention_reference_backward(grad_out, q, k, v, mask, ctx.causal, ctx.scale,
                                                     ctx.window, _forms(ctx.forms), ctx.softcap)
    return dq, dk, dv, dmask, *_NO_GRADS[1:]


def _setup_context_train(ctx, inputs, output):
    _setup_context(ctx, inputs, output, saved_outputs=output)      # q, k, v, mask, then out, lse


def _backward_train(ctx, grad_out, _grad_lse):
    # lse is an auxiliary output: nothing downstream differentiates it (the backend reads only out)
    saved = ctx.saved_tensors
    return _backward(ctx, grad_out, *saved[5:], saved=saved)


attention.register_autograd(_backward, setup_context=_setup_context)
attention_train.register_autograd(_backward_train, setup_context=_setup_context_train)
