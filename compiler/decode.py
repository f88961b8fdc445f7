"""Decoding with a per-head compressed KV cache, inside Hugging Face `generate()`.

    out, cache = af.generate(model, ids, plan, max_new_tokens=64)    # greedy by default
    cache.nbytes(), cache.kv_entries()                                  # real memory held

or, by hand:

    cache = af.PlanCache(model, plan, max_length=ids.shape[1] + 64)
    with af.plan_attention(model):
        model.generate(ids, cache=cache, max_new_tokens=64, do_sample=False)   # past_key_values= before transformers 5.2x

Each decoder layer's cache is an attnforge.runtime.kvcache.SiteKVCache laid out by the plan's forms for
that layer (one layout per KV group: full, sink + ring window, kept blocks, a KVEvict policy's kept
set: StreamingLLM, H2O, A2SF, SnapKV, KVQuant's 2/4/8-bit codes with a full-precision residual, or a
linear-hybrid group's constant-size state), so a window head really holds sink + window keys, an evicting
head its budget and a quantized head its codes. The model's attention calls go to `attnforge_attention`
(registered with transformers' AttentionInterface under the name "attnforge"): the prefill runs the plan's forms through
torch.ops.attnforge.attention (on CUDA the generated dense or per-head plan kernel, a padded batch's rows
compacted through the same kernels) while the cache keeps only what each group will read again; every decoding step reads the cache through the split-KV Triton kernel
(CUDA, or CPU under TRITON_INTERPRET=1 with impl="triton") or its PyTorch reference.
Supported: prefill of the whole prompt at once, then one token per step or several (a chat's next turn over a
kept cache, a later chunk of a prompt): a continuation of n tokens attends as n decoding steps fed those
tokens would, every form keeping its decoding semantics; where every group of the layer holds all keys and no
row is padded, that is one attention of the n queries over the cache (the generated dense kernel). Beam search
reorders the cache's rows after every step (reorder_cache). Assisted (speculative) and prompt-lookup decoding
verify a draft as such a continuation and take the rejected tokens back (crop): while Hugging Face records
(activate_past_recording), each write keeps what it overwrites (and evicting, quantized and linear groups their
state before each token), so every layout rolls back exactly. A padded batch (prompts of
different lengths, left-padded as generate() pads them, the `attention_mask` given) prefills every row as
that row alone (runtime.padding) and the cache holds each row's real tokens at the row's own positions, so
each row generates what it would generate alone; forms with KV eviction or quantization take rows of equal
length only. Layers with the model's own sliding window (Gemma 2 / 3's local layers, Mistral; read from the
config, checked against what each call passes) hold only that window: their groups' forms take it on (Dense
becomes SinkWindow(0, w)); a left-padded batch runs each row alone there too (its window over the row's own
positions). Soft-capped scores
(Gemma 2) are capped in the prefill, every decoding step and the eviction scores. Anything else raises
KVCacheError, never silently attends to the wrong keys.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch

from attnforge import codegen, runtime
from attnforge.runtime.forms import Dense, SinkWindow, forms_to_json, prefill_form
from attnforge.runtime.kvcache import KVCacheError, SiteKVCache

from .plan import resolve_site

__all__ = ["PlanCache", "plan_cache_from_forms", "plan_attention", "generate", "attnforge_attention", "KVCacheError",
           "cache_kwargs", "draft_room"]

NAME = "attnforge"
_kernel_keys: dict[str, str] = {}


def _load(render, device):
    """The kernel that codegen's `render()` emits (registered once), loaded for `device`'s backend."""
    name = render.__name__
    if name not in _kernel_keys:
        _kernel_keys[name] = runtime.kernels.register_source(render().source)
    return runtime.kernels.load_kernel(_kernel_keys[name], device)


def _attention_key(plan: bool) -> str:
    """Key of the generated causal prefill kernel: the per-head plan kernel, or the dense one."""
    name = "plan" if plan else "dense"
    if name not in _kernel_keys:
        spec = codegen.KernelSpec(causal=True, plan=plan)
        _kernel_keys[name] = runtime.kernels.register_source(codegen.render_attention(spec).source)
    return _kernel_keys[name]


def _masked_key() -> str:
    """Key of the generated dense kernel that reads a boolean mask and has no causality of its own."""
    if "masked" not in _kernel_keys:
        spec = codegen.KernelSpec(causal=False, mask="bool")
        _kernel_keys["masked"] = runtime.kernels.register_source(codegen.render_attention(spec).source)
    return _kernel_keys["masked"]


def _decode_kernel(device):
    return _load(codegen.render_decode, device)


def _decode_quant_kernel(device):
    return _load(codegen.render_decode_quant, device)


def _layer_forms(model, plan, kv_heads: int) -> dict[int, tuple]:
    """layer_idx -> forms, from the plan's site ids (module path + '#0')."""
    out = {}
    known = {sp.site: sp for sp in plan.sites} if plan is not None else {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int):
            continue
        if idx in out:
            continue
        if plan is None:
            out[idx] = (Dense(),) * kv_heads
            continue
        sid = resolve_site(f"{name}#0", known)
        if sid is None:
            continue
        forms = known[sid].forms
        if len(forms) != kv_heads:
            raise KVCacheError(f"site {sid}: the plan has {len(forms)} KV groups, the model {kv_heads}")
        out[idx] = forms
    return out


def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class PlanLayer(CacheLayerMixin):
        """One decoder layer: a SiteKVCache in the plan's per-group layouts."""
        is_compileable = False
        is_sliding = False

        def __init__(self, forms, max_length: int, impl: str, window: int = 0):
            super().__init__()
            self.site = SiteKVCache(forms, max_length)
            self.forms, self.impl = forms, impl
            self.window = window            # the model's own sliding window here, where it binds (0: none);
            # the forms already carry it (_windowed)
            self.prompt = None              # the prompt's (k, v) between update() and its attention
            # what the prefill runs: KV-compressed groups attend densely over the prompt (they act on decoding)
            prefill = tuple(map(prefill_form, forms))
            self.prefill_json = "" if all(f.kind == "dense" for f in prefill) else forms_to_json(prefill)

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            first = self.site.length == 0 and self.prompt is None
            if not first and self.prompt is not None:
                raise KVCacheError("the plan cache got new tokens before the prompt's attention ran (update() "
                                   "twice in a row): it is written by the model's own attention calls")
            if not first and n != 1:
                # a continuation (a chat's next turn, a later prefill chunk): the attention appends its tokens
                # one at a time, each attending as a decoding step would (see attnforge_attention)
                key_states._attnforge = (self, "continue")
                return key_states, value_states
            if first:                       # prefill: attention over the full prompt, plan masks applied; the
                # cache stores the prompt after it, when the attention has seen which tokens are padding
                self.prompt = (key_states, value_states)
                key_states._attnforge = (self, "prefill")
                return key_states, value_states
            self.site.append(key_states, value_states)
            self.keys, self.values = self.site.k, self.site.v
            k = self.site.k
            k._attnforge = (self, "decode")
            return k, self.site.v

        def store_prompt(self, padding=None) -> None:
            """Write the prompt update() kept into the per-head cache (padding: its [B, n] key flags)."""
            if self.prompt is not None:
                k, v = self.prompt
                self.prompt = None
                self.site.append(k, v, padding)
                self.keys, self.values = self.site.k, self.site.v

        def _seen(self) -> int:
            return self.site.length or (self.prompt[0].shape[-2] if self.prompt is not None else 0)

        def get_mask_sizes(self, query_length: int):
            return self._seen() + query_length, 0

        def get_seq_length(self) -> int:
            return self._seen()

        def get_max_length(self) -> int:
            return -1

        def reset(self):
            self.site = SiteKVCache(self.forms, self.site.max_length)
            self.prompt = None

        def reorder_cache(self, beam_idx, host=None):
            """Beam search: each row continues the beam beam_idx[row] was."""
            self.site.reorder(beam_idx, host)
            self.keys, self.values = self.site.k, self.site.v

        is_croppable = True       # crop() takes tokens back exactly, in every layout (SiteKVCache.rollback)

        @property
        def record_past(self) -> bool:
            return self.site.recording

        @record_past.setter
        def record_past(self, on: bool) -> None:
            self.site.record(on)

        def activate_past_recording(self, **kwargs):
            """From now on, remember what each write replaces, so that crop() can take back draft tokens."""
            self.site.record(True)

        def crop(self, tokens_to_remove: int) -> None:
            """Take back tokens: -n removes the newest n (0 keeps every token written since the last crop); a
            positive value is the length to keep (the older convention)."""
            n = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self._seen() - tokens_to_remove)
            if self.prompt is not None:
                raise KVCacheError("crop() between a prompt's update() and its attention")
            if n:
                self.site.rollback(n)
            else:
                self.site.commit()
            self.keys, self.values = self.site.k, self.site.v
            if n and self.first:
                runtime.counters["kvcache_rolled_back"] = runtime.counters.get("kvcache_rolled_back", 0) + n

    class PlanCacheImpl(Cache):
        """A transformers Cache whose layers keep, per KV group, only what the plan's form reads."""
        attnforge_plan_cache = True       # (the class is made per call of _cache_classes: test this, not the type)

        def __init__(self, layer_forms: dict[int, tuple], max_length: int, impl: str = "auto",
                     windows: dict[int, int] | None = None):
            windows = windows or {}
            layers = [PlanLayer(layer_forms[i], max_length, impl, windows.get(i, 0)) for i in sorted(layer_forms)]
            for i, layer in enumerate(layers):
                layer.first = i == 0        # checks made once per step, not once per layer
            super().__init__(layers=layers)
            self.impl = impl

        def reorder_cache(self, beam_idx):
            # the beams' indices on the host once per step, not once per layer, where a layer keeps rows there
            host = beam_idx.tolist() if any(layer.site.lens is not None or layer.site._linear
                                            for layer in self.layers) else None
            for layer in self.layers:
                layer.reorder_cache(beam_idx, host)

        def nbytes(self) -> int:
            return sum(layer.site.nbytes() for layer in self.layers)

        def kv_entries(self) -> int:
            return sum(layer.site.kv_entries() for layer in self.layers)

    return PlanLayer, PlanCacheImpl


def PlanCache(model, plan=None, max_length: int | None = None, impl: str = "auto"):
    """A transformers Cache for `model` laid out by `plan` (None: every group full, like DynamicCache).
    max_length: the longest sequence it will hold (prompt + new tokens; elastic spans are sized for it)."""
    if impl not in runtime.IMPLS:
        raise ValueError(f"impl must be one of {runtime.IMPLS}, not {impl!r}")
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    max_length = max_length or getattr(cfg, "max_position_embeddings", 4096)
    forms = _layer_forms(model, plan, kv_heads)
    layers = getattr(cfg, "num_hidden_layers", len(forms))
    model_windows = _layer_windows(cfg, layers)
    missing = [i for i in range(layers) if i not in forms]
    if missing:
        raise KVCacheError(f"the plan has no entry for decoder layer(s) {missing[:5]} of this model; search a "
                           "plan for this model")
    windows = {i: w for i, w in model_windows.items() if w and max_length > w}
    forms = {i: _windowed(f, windows[i], i) if i in windows else f for i, f in forms.items()}
    _, impl_cls = _cache_classes()
    return impl_cls(forms, max_length, impl, windows)


def _layer_windows(cfg, layers: int) -> dict[int, int]:
    """layer index -> the model's own sliding window there (0: full attention), from its config: the layers
    that `layer_types` marks "sliding_attention" (Gemma 2 / 3, Qwen 2, ...), or every layer of a model with a
    `sliding_window` and no layer types (Mistral). The attention call checks it against what the model passes."""
    window = getattr(cfg, "sliding_window", None) or 0
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return {i: window for i in range(layers)}
    return {i: window if t == "sliding_attention" else 0 for i, t in enumerate(types)}


def _windowed(forms, window: int, layer: int) -> tuple:
    """The forms of a layer that also attends through the model's own sliding window of `window` keys: what
    each group sees is its form's keys among the window's. Dense and sink + window groups become one window
    (a sink older than the window is hidden by it); other forms do not compose into one, so they are refused."""
    out = []
    for g, f in enumerate(forms):
        if isinstance(f, Dense):
            out.append(SinkWindow(0, window))
        elif isinstance(f, SinkWindow) and (f.sink == 0 or f.window >= window):
            out.append(SinkWindow(0, min(f.window, window)))
        else:
            raise KVCacheError(f"decoder layer {layer} attends through the model's own sliding window of {window} "
                               f"tokens and the plan gives KV group {g} the form {f.to_dict()}, which does not "
                               "compose with it into one form the cache can hold; plan that layer's groups Dense or "
                               f"SinkWindow (sink 0, or a window of at least {window}), or keep the whole sequence "
                               f"within {window} tokens")
    return tuple(out)


def _check_window(layer, kwargs, n: int) -> None:
    """The sliding window the model attends with on this layer must be the one the cache was laid out for:
    it binds when the cache was sized past it, or when this call's n tokens carry the sequence past it (a kept
    cache that outgrew the max_length it was built for: its layer holds every key, and would read them all)."""
    window = kwargs.get("sliding_window") or 0
    reach = max(layer.site.max_length, layer._seen() + n)
    binding = window if window and reach > window else 0
    if binding != layer.window:
        if window and not layer.window and layer.site.max_length <= window:
            raise KVCacheError(f"this call carries the sequence to {layer._seen() + n} tokens, past the model's "
                               f"sliding window of {window}, but the plan cache was built for max_length "
                               f"{layer.site.max_length} (within the window, so this layer keeps every key): build "
                               f"it with max_length >= the whole conversation (af.generate(..., max_length=...), "
                               "af.PlanCache(model, plan, max_length=...))")
        raise KVCacheError(f"this layer attends through a sliding window of {window or 'none'} but the plan cache "
                           f"was laid out for {layer.window or 'none'} (read from the model's config: "
                           "sliding_window / layer_types); build the cache from this model")


def _window_mask_reason(mask, window: int, n: int, s: int, keys=None):
    """None if a prefill's 4-D mask is exactly causal attention within the sliding window (queries the last n
    of s keys), and hides the padding slots of `keys` ([B, S] bool: True = a token; None: no padding) where
    given, else why it is not. A row's tokens must be contiguous at its end (left padding), where a window over
    slots is the same window over the row's own positions."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (n, s):
        return f"a {mask.dtype} mask of shape {tuple(mask.shape)}"
    if keys is not None:
        keys = keys.to(mask.device)
        if not bool((keys.cummax(1).values == keys).all()):
            return "a padded prompt whose padding is not all on the left"
    j = torch.arange(s, device=mask.device)[None, :]
    for r in range(0, n, _MASK_ROWS):      # a block of rows at a time: never a second N x S mask at long prompts
        i = torch.arange(s - n + r, s - n + min(n, r + _MASK_ROWS), device=mask.device)[:, None]
        want = ((j <= i) & (j > i - window))[None, None]
        if keys is not None:
            want = want & keys[:, None, None, :]
        if not bool((mask[..., r:r + _MASK_ROWS, :] == want).all()):
            return "a mask that also hides other keys"
    return None


_MASK_ROWS = 1024     # rows of an N x S mask checked or built at once


def plan_cache_from_forms(layer_forms: dict[int, tuple], max_length: int, impl: str = "auto"):
    """A PlanCache from forms per decoder layer index (no plan file needed: benchmarks, uniform plans)."""
    _, impl_cls = _cache_classes()
    return impl_cls(layer_forms, max_length, impl)


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands a Cache to `model`'s forward and generate(): `cache` where the forward takes it
    (transformers 5.2x renamed `past_key_values`, which goes away in 5.40), else `past_key_values`."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _use_kernel(impl: str, q: torch.Tensor) -> bool:
    if impl == "reference":
        return False
    if impl == "triton":
        return True
    return q.is_cuda and runtime.kernels.triton_available()


def attnforge_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q [B, H, N, D], k/v [B, Hkv, S, D] -> ([B, N, H, DV], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = float(kwargs.get("softcap") or 0.0)   # logit soft-capping (Gemma 2): every path below applies it
    tag = getattr(key, "_attnforge", None)
    if tag is None:                                  # no plan cache (plain forward): exact dense attention
        out = torch.ops.attnforge.attention(query, key, value, attention_mask, attention_mask is None, 0, scale,
                                            "auto", "", "", None, softcap)
        return out.transpose(1, 2).contiguous(), None
    layer, phase = tag
    _check_window(layer, kwargs, query.shape[2] if phase == "continue" else 0)   # (a step appended its token)
    padding = getattr(attention_mask, "_attnforge_padding", None)       # compiler.hf's padding masks carry it
    # a sliding-window layer's mask is sdpa_mask's, tagged with the batch's key flags (compiler.hf)
    keys = getattr(attention_mask, "_attnforge_keys", None) if layer.window and padding is None else None
    if keys is not None and not bool(keys.all()):
        padding = keys
    # the newest slot of every row must be a token: the prompt's last (right padding would predict from a
    # padding slot), then each step's new one
    last_is_padding = padding is not None and layer.first and not bool(padding[:, -1].all())
    if phase == "prefill":
        if layer.window and attention_mask is not None and not hasattr(attention_mask, "_attnforge_padding"):
            # the layer's sliding-window mask: its forms apply the window already (_windowed), and a left-padded
            # batch runs through the padding vector (its key flags), if the mask is exactly those two
            reason = _window_mask_reason(attention_mask, layer.window, query.shape[2], key.shape[2], keys)
            if reason:
                raise KVCacheError(f"a prefill on a layer with the model's own sliding window of {layer.window} "
                                   f"came with {reason}: the plan cache runs such layers for unpadded or "
                                   "left-padded batches (a 2-D attention_mask, as generate() pads)")
            attention_mask = None
        if attention_mask is not None and padding is None:
            raise KVCacheError("the plan cache reads a padded batch from its attention_mask (2-D, 1 = token) "
                               "through attnforge's mask function; this prompt came with another mask (a 4-D "
                               "mask, or one of another attention implementation): pass the 2-D attention_mask")
        if last_is_padding:
            raise KVCacheError("a right-padded prompt: the last slot of some row is padding, so its next token "
                               "would be predicted from a padding slot. Pad the prompts on the left "
                               "(tokenizer.padding_side = 'left'), as generate() expects (with prefill_chunk_size: "
                               "a row's left padding must fit in the first chunk)")
        # causal: the generated kernel (dense, or the per-head plan kernel) where it can run, every row of a
        # padded batch as that row alone (runtime.padding); the op says why where it falls back
        kernel = _attention_key(bool(layer.prefill_json))
        impl = "reference" if layer.impl == "reference" else "auto"
        out = torch.ops.attnforge.attention(query, key, value, None, True, 0, scale, impl, kernel,
                                            layer.prefill_json, padding, softcap)
        runtime.counters["kvcache_prefill"] = runtime.counters.get("kvcache_prefill", 0) + 1
        layer.store_prompt(padding)
        if layer.site.needs_select:                 # KV-evicting groups choose their keys from this prompt
            layer.site.select(query, scale, softcap)
        return out.transpose(1, 2).contiguous(), None
    if phase == "continue":
        return _continue(layer, query, key, value, attention_mask, padding, keys, scale, softcap), None
    if last_is_padding:
        raise KVCacheError("a decoding step's new token is padding in some row; after the prompt every row takes "
                           "one real token per step (left-pad the prompts)")
    if query.shape[2] != 1:
        raise KVCacheError(f"decoding takes one query token per step, got {query.shape[2]}")
    return _step(layer, query[:, :, 0], scale, softcap)[:, None], None      # [B, 1, H, DV]


def _step(layer, q, scale: float, softcap: float) -> torch.Tensor:
    """One decoding step's attention over the layer's cache (the new token already in it): q [B, H, D] ->
    [B, H, DV]; then the step's bookkeeping (H2O / A2SF scores and eviction)."""
    if _use_kernel(layer.impl, q):
        quant = _decode_quant_kernel(q.device) if layer.site.quant is not None else None
        out, _ = layer.site.decode(q, scale, _decode_kernel(q.device), loaded_quant=quant, softcap=softcap)
        runtime.counters["kvcache_decode_triton"] = runtime.counters.get("kvcache_decode_triton", 0) + 1
    else:
        out = layer.site.decode_reference(q, scale, softcap)
        runtime.counters["kvcache_decode_reference"] = runtime.counters.get("kvcache_decode_reference", 0) + 1
    layer.site.after_step(q, scale, softcap)
    return out


def _continue(layer, query, key, value, attention_mask, padding, keys, scale: float, softcap: float):
    """n > 1 new tokens after what the cache holds (a chat's next turn over a kept cache, a later chunk of a
    chunked prefill) attend as n decoding steps fed those tokens would, so every form keeps its decoding
    semantics; [B, n, H, DV]. Every group holding all keys (no padding): one attention through the op (the
    generated kernel); groups whose reads depend on positions only (windows, kept blocks): one PyTorch
    attention per group (SiteKVCache.continue_reference); evicting, quantized or linear groups: token by token
    (a ring slides, H2O / A2SF evict after each token, a linear state advances). The mask must be plain causal
    over the cache's slots (within the layer's own window), hiding only padding slots; new tokens are real."""
    site = layer.site
    n, s = query.shape[2], site.length + query.shape[2]
    if padding is not None and not bool(padding[:, -n:].all()):
        raise KVCacheError(f"{n} new tokens after {site.length}: some row's new slots are padding; "
                           "after the prompt every row takes real tokens only (left-pad the prompts)")
    site.check_room(n)                     # refused before anything is written, not halfway through
    if attention_mask is not None and not hasattr(attention_mask, "_attnforge_padding"):
        reason = _window_mask_reason(attention_mask, layer.window or s, n, s, keys)
        if reason:
            raise KVCacheError(f"{n} new tokens after {site.length} came with {reason}: the plan cache "
                               "continues a sequence causally (a 2-D attention_mask, or none); a tree or custom "
                               "mask (tree-based speculative decoding) is not supported")
    if site.lens is None and all(lay.kind == "full" for lay in site.layouts):
        # every group holds every key at its position's slot: one attention of the n queries over all of them
        # does the n steps at once, through the generated dense kernel; the queries are the last n positions
        # (the op's causal flag aligns query 0 with key 0, as SDPA's does, so the mask says it instead)
        # (a block of _MASK_ROWS queries per call, over the keys up to its last row: the mask stays that small)
        site.append(key, value)
        length = site.length
        k, v = _full_groups(site, length)
        outs = []
        for r in range(0, n, _MASK_ROWS):
            last = length - n + min(n, r + _MASK_ROWS)                 # keys up to the block's last query
            rows = torch.arange(length - n + r, last, device=query.device)[:, None]
            causal = rows >= torch.arange(last, device=query.device)[None, :]
            outs.append(torch.ops.attnforge.attention(query[:, :, r:r + _MASK_ROWS], k[:, :, :last], v[:, :, :last],
                                                      causal[None, None], False, 0, scale, layer.impl,
                                                      _masked_key(), "", None, softcap))
        return _continued(layer, torch.cat(outs, 2), n, "kvcache_continued_batched")
    if site.stateless:
        # what each group reads depends on positions only (windows, kept blocks): the n queries at once over
        # the slots before them and the new keys, each within its form, in PyTorch
        out = site.continue_reference(query, key, value, scale, softcap)
        return _continued(layer, out, n, "kvcache_continued_batched")
    # (the same text: Python shows it once); drafts being verified are decoding, not a later prompt chunk
    if site._evict and not site.recording and not getattr(site, "_warned_continue", False):
        site._warned_continue = True
        warnings.warn(f"{n} tokens continue a cache whose KV-evicting groups sized their budgets from the first "
                      f"call's {site.prompt} tokens: they are decoded into those budgets (evicting as they come), "
                      "as generated tokens are. For a long prompt, prefill it in one call (no prefill_chunk_size) "
                      "so that each policy chooses over all of it", stacklevel=2)
    outs = []
    for t in range(n):
        site.append(key[:, :, t:t + 1], value[:, :, t:t + 1])
        outs.append(_step(layer, query[:, :, t], scale, softcap))
    return _continued(layer, torch.stack(outs, 2), n, "kvcache_continued")


def _full_groups(site, length: int):
    """K, V [B, G, length, D] of a cache whose groups all hold every key: a strided view of the flat slot
    buffer where the regions are equal and back to back (no copy of the whole cache), else stacked."""
    cap, g = site._caps[0], len(site._caps)
    if site._caps == [cap] * g and site._offs == [i * cap for i in range(g)]:
        b = site.k.shape[0]
        return (site.k.view(b, g, cap, -1)[:, :, :length], site.v.view(b, g, cap, -1)[:, :, :length])
    return (torch.stack([site.k[:, o:o + length] for o in site._offs], 1),
            torch.stack([site.v[:, o:o + length] for o in site._offs], 1))


def _continued(layer, out, n: int, counter: str) -> torch.Tensor:
    """A continuation's output [B, H, n, DV] as the attention function returns it; the layer's views and the
    counter (once per model call) brought up to date."""
    layer.keys, layer.values = layer.site.k, layer.site.v
    if layer.first:
        runtime.counters[counter] = runtime.counters.get(counter, 0) + n
    return out.transpose(1, 2)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from .hf import attnforge_mask

    AttentionInterface.register(NAME, attnforge_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, attnforge_mask)


@contextlib.contextmanager
def plan_attention(model):
    """Route `model`'s attention through attnforge_attention while inside (restored after)."""
    _register()
    saved = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(saved)


def draft_room(model, kwargs) -> int:
    """Tokens past max_length a generate() call may run through the cache: Hugging Face's prompt-lookup drafts
    are capped at max_length as an index into the sequence, not as its total, so the verification of the last
    draft can reach max_length - 2 + prompt_lookup_num_tokens tokens (it keeps only those within max_length)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return int(kwargs.get("prompt_lookup_num_tokens") or getattr(config, "prompt_lookup_num_tokens", None) or 0)


def generate(model, input_ids, plan=None, max_new_tokens: int = 64, impl: str = "auto", cache=None,
             max_length: int | None = None, **kwargs):
    """model.generate() with a PlanCache (greedy unless told otherwise). Returns (token ids, cache).
    cache: a PlanCache this model filled before (the previous turn of a chat: input_ids then holds the whole
    conversation, and only its new tokens are run, continuing the cache); None makes one for the call, sized
    for max_length tokens (default: the prompt plus max_new_tokens; give the whole conversation's length for a
    cache that later turns continue)."""
    if cache is None:
        total = (max_length or input_ids.shape[1] + max_new_tokens) + draft_room(model, kwargs)
        cache = PlanCache(model, plan, max_length=total, impl=impl)
    elif not getattr(cache, "attnforge_plan_cache", False):
        raise ValueError(f"cache must be an af.PlanCache (the one a previous af.generate returned), not a "
                         f"{type(cache).__name__}")
    elif plan is not None:
        raise ValueError("give the plan or a cache built from it, not both: a kept cache decodes with the plan "
                         "it was built for")
    kwargs.setdefault("do_sample", False)
    # the cache is the point: a config saved with use_cache=False (as training configs are) would make
    # generate() feed the whole sequence at every step
    kwargs.setdefault("use_cache", True)
    with plan_attention(model), torch.no_grad():
        out = model.generate(input_ids, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, **kwargs)
    return out, cache
