"""Hugging Face glue: padding masks that attnforge can read, and the attention implementation it registers.

Hugging Face builds a padded batch's mask from the 2-D `attention_mask` (1 = token, 0 = padding) as a
[B, 1, N, S] boolean tensor: causal & padding[b, j] (or padding alone, bidirectional). Traced, that tensor
is an opaque N x S mask to the passes, so a plan (searched for causal attention) could not run on it and
the kernels read it tile by tile. Under attnforge's implementation the same mask is built by one op,

    torch.ops.attnforge.padding_mask(padding [B, S], N, causal)      (the same values as sdpa_mask)

which the detector recognizes: the site becomes a padded one (`mask="padding"`), the rewrite hands the
attention op the [B, S] padding vector instead of the mask (runtime.padding: every row computed as that row
alone, the plan's forms at the row's own positions), and the N x S mask is never built. Any other mask
(sliding windows, custom mask functions, a 4-D mask given by the caller) is built by Hugging Face's
own sdpa_mask, unchanged, and stays an exact mask; packed sequences are read from the positions (below).

    SDPA_NAME ("attnforge_sdpa")   Hugging Face's SDPA attention with this mask function: what af.optimize
                                   switches an SDPA model to, so that its compiled forward sees padding

Without a cache and without an attention_mask (use_cache=False, the training setup), Hugging Face reads the
positions for packed sequences (several sequences in one row, each restarting its positions, as a collator
that flattens a batch makes them) and builds a packed-sequence mask from them: opaque to the passes, so no
plan could run, and opaque even without packing once the length is symbolic (the second length Dynamo
sees). `with_masks` makes those calls readable, inside the compiled forward:

    no position_ids     an all-ones attention_mask: the same attention (no packing was asked for), and the
                        detector knows a padding vector made by ones_like has no padding, so the sites are
                        plain causal at every length
    position_ids        the same sequence labels Hugging Face derives from them (a new sequence wherever a
                        position is not the previous one plus 1), given to the model as the 4-D mask of
                        attnforge's padding_mask op over those labels: the same values as Hugging Face's
                        packed-sequence mask, and a packed site to the detector, whose kernels run each
                        sequence as that sequence alone (runtime.padding). Only for models whose every layer
                        takes the full causal mask (no sliding-window layers: they would be handed the same
                        4-D mask); other models keep Hugging Face's own
"""
from __future__ import annotations

import torch

__all__ = ["SDPA_NAME", "attnforge_mask", "register", "uses_padding_masks", "with_masks"]

SDPA_NAME = "attnforge_sdpa"


def attnforge_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, local_size=None, allow_is_causal_skip=True, allow_is_bidirectional_skip=False,
                   use_vmap=False, device="cpu", **kwargs):
    """A mask interface function (transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS): sdpa_mask's
    result, built through attnforge's padding_mask op where it is a plain causal or bidirectional mask with a
    2-D padding mask (queries the last q_length of the keys); sdpa_mask itself for anything else."""
    from transformers import masking_utils as mu

    mask_function = mask_function or mu.causal_mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                allow_is_causal_skip=allow_is_causal_skip, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                use_vmap=use_vmap, device=device, **kwargs)
    causal = mask_function is mu.causal_mask_function
    plain = causal or mask_function is getattr(mu, "bidirectional_mask_function", None)
    skips = [getattr(mu, n, None) for n in ("prepare_padding_mask", "_ignore_causal_mask_sdpa",
                                             "_ignore_bidirectional_mask_sdpa")]
    if not plain or use_vmap or attention_mask is None or attention_mask.dim() != 2 or None in skips or \
            (causal and q_offset - kv_offset != kv_length - q_length):
        mask = mu.sdpa_mask(**args)
        if mask is not None and not torch.compiler.is_compiling() and attention_mask is not None and \
                attention_mask.dim() == 2 and skips[0] is not None:
            # any other mask over a padded batch (a sliding window's, say) stays sdpa_mask's, tagged with its key
            # flags for eager callers: the plan cache's attention checks the mask against them and its window
            mask._attnforge_keys = skips[0](attention_mask, kv_length, kv_offset)[
                :, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        return mask
    prepare, ignore_causal, ignore_bidirectional = skips
    padding = prepare(attention_mask, kv_length, kv_offset)
    # the same early exits as sdpa_mask: no mask where SDPA's is_causal (or nothing) says it all
    if causal and allow_is_causal_skip and ignore_causal(padding, q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    if not causal and allow_is_bidirectional_skip and ignore_bidirectional(padding, kv_length, local_size):
        return None
    keys = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
    mask = torch.ops.attnforge.padding_mask(keys, q_length, causal)
    if not torch.compiler.is_compiling():
        mask._attnforge_padding = keys          # eager callers (the plan cache's attention) read it back
    return mask


def register() -> None:
    """Register SDPA_NAME with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(SDPA_NAME, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_NAME, attnforge_mask)


def uses_padding_masks(model) -> bool:
    """Switch a Hugging Face model that runs SDPA to SDPA_NAME (the same attention, padding masks built through
    attnforge's op); True if it did. Other implementations (eager, flash, flex) are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not callable(getattr(model, "set_attn_implementation",
                                                                                         None)):
        return False
    register()
    model.set_attn_implementation(SDPA_NAME)
    return True


def _full_causal(config) -> bool:
    """Whether every layer of this config takes the one causal mask (so a 4-D mask given to the model is what
    every layer would have built)."""
    if not getattr(config, "is_causal", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return set(layer_types) <= {"full_attention"}
    return not getattr(config, "sliding_window", None) and not getattr(config, "attention_chunk_size", None)


def packed_labels(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, S] int64 sequence labels (1, 1, 2, 2, 2, ...) of packed positions: a new sequence wherever a position
    is not the previous one plus 1 (Hugging Face's find_packed_sequence_indices, plus 1: 0 means padding)."""
    position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1) + 1


def with_masks(forward, model):
    """`forward` (a Hugging Face causal LM's) where the call gives no attention_mask and no cache and the model
    would keep none: an all-ones attention_mask without position_ids, the packed-sequence mask of
    attnforge's padding_mask op with them (see the module docstring); other calls as given."""
    import functools
    import inspect

    params = inspect.signature(forward).parameters
    cache_names = [n for n in ("past_key_values", "cache") if n in params]
    if not ({"input_ids", "attention_mask", "position_ids"} <= set(params) and cache_names):
        return forward
    packing = _full_causal(getattr(model, "config", None))

    @functools.wraps(forward)
    def call(*args, **kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        use_cache = kwargs.get("use_cache")
        use_cache = getattr(model.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and getattr(model, "is_gradient_checkpointing", False) and model.training \
                and torch.is_grad_enabled():
            # as Hugging Face decides (checkpointed training keeps no cache), said here so that its warning,
            # a graph break, does not split the forward where the mask is made from where it is read
            use_cache = kwargs["use_cache"] = False
        if len(args) > 1 or not torch.is_tensor(ids) or ids.dim() != 2 or kwargs.get("attention_mask") is not None \
                or use_cache or any(kwargs.get(n) is not None for n in cache_names):
            return forward(*args, **kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            kwargs["attention_mask"] = torch.ones_like(ids)
        elif packing and torch.is_tensor(positions) and positions.dim() == 2 and positions.shape[-1] == ids.shape[1]:
            labels = packed_labels(positions.to(ids.device), ids.shape[0])
            kwargs["attention_mask"] = torch.ops.attnforge.padding_mask(labels, ids.shape[1], True)
        return forward(*args, **kwargs)

    return call
