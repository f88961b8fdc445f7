"""Per-head attention forms: what each KV head group computes. Forms are data; kernels follow them.

All forms are causal restrictions of dense attention on absolute positions: with N queries and S keys,
query i sits at position p = S - N + i (the last N positions, as in a KV cache; p = i when N = S), and

    keep(p, j) is one of

    Dense()                              every key j <= p
    SinkWindow(sink, window)             j < sink, or p - window < j <= p           (StreamingLLM)
    ElasticWindow(sink, alpha, beta)     SinkWindow with window = alpha + beta * S  (MoA; S = key length)
    BlockSparse(block, verticals, slashes)
        key block kb kept for query block qb = p // block if kb in verticals, or (qb - kb) in slashes;
        slash 0 (the diagonal block) is always kept, so every query sees itself. Defined for any length.

and two KV-compressed forms whose prefill is Dense and which act on the decoding cache: KVEvict (a
policy's share of the prompt's keys) and KVQuant (KIVI: keys and values as 2/4/8-bit codes, the newest
tokens in full precision); plus Linear (softmax window + feature-map kernel over the rest); plus one
dynamic form, VerticalSlash (MInference), whose key blocks are estimated per input: each call resolves it
to a BlockSparse form (attnforge.runtime.dynamic), which is what the kernels and the reference run; it
has no fixed mask (keep_mask refuses it until resolved) and decodes over every key.

`keep_mask(forms, n, s)` builds the [G, N, S] boolean mask of several groups' forms (the reference
uses it); `kept_pairs(form, n)` counts kept (i, j) pairs in closed form for costs and densities;
`kv_tokens(form, n)` counts the KV entries a decoder holds at length n (what the per-head KV cache
allocates); `kv_read(form, n)` the keys its newest query reads.
Forms serialize to small dicts (`to_dict` / `form_from_dict`); unknown kinds are an error, never a guess.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["Dense", "SinkWindow", "ElasticWindow", "BlockSparse", "KVEvict", "KVQuant", "Linear", "VerticalSlash",
           "EVICT_POLICIES", "prefill_form", "Form", "FORM_KINDS", "form_from_dict",
           "forms_to_json", "forms_from_json", "keep_mask", "kept_pairs", "kv_tokens", "kv_read", "causal_pairs", "FormError"]


class FormError(ValueError):
    """A form description that is not valid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Dense:
    kind = "dense"

    def window_at(self, s: int):
        return None

    def to_dict(self) -> dict:
        return {"kind": "dense"}


@dataclass(frozen=True, slots=True)
class SinkWindow:
    sink: int
    window: int
    kind = "sink_window"

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise FormError(f"sink_window needs sink >= 0 and window >= 1, got {self.sink}, {self.window}")

    def window_at(self, s: int):
        return self.window

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True)
class ElasticWindow:
    sink: int
    alpha: int
    beta: float
    kind = "elastic_window"

    def __post_init__(self):
        if self.sink < 0 or self.alpha < 0 or self.beta < 0 or (self.alpha == 0 and self.beta == 0):
            raise FormError(f"elastic_window needs sink, alpha, beta >= 0 and a positive span, got "
                            f"{self.sink}, {self.alpha}, {self.beta}")

    def window_at(self, s: int):
        return max(1, int(self.alpha + self.beta * s))

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True)
class BlockSparse:
    block: int
    verticals: tuple[int, ...]
    slashes: tuple[int, ...]
    kind = "block_sparse"

    def __post_init__(self):
        if self.block < 1:
            raise FormError(f"block_sparse needs block >= 1, got {self.block}")
        object.__setattr__(self, "verticals", tuple(sorted(set(int(v) for v in self.verticals))))
        object.__setattr__(self, "slashes", tuple(sorted(set(int(v) for v in self.slashes) | {0})))
        if any(v < 0 for v in self.verticals + self.slashes):
            raise FormError("block_sparse verticals and slashes must be >= 0")

    def window_at(self, s: int):
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "block": self.block, "verticals": list(self.verticals),
                "slashes": list(self.slashes)}


EVICT_POLICIES = ("streaming", "h2o", "a2sf", "snapkv")


@dataclass(frozen=True, slots=True)
class KVEvict:
    """KV-compressed decoding (kvpress / H2O / SnapKV style): the prompt runs dense, then the group's
    cache keeps `budget` of the prompt's keys, chosen by `policy`:
        streaming  the first `sink` and the most recent ones (StreamingLLM)
        h2o        the `recent` newest + the highest accumulated attention; while decoding, the lowest
                   scoring key outside the recent ones is evicted each step (cache size stays fixed)
        a2sf       h2o with the accumulated attention decayed by `alpha` per query (forgetting factor)
        snapkv     the `recent` newest + the highest attention from the last `recent` prompt queries,
                   average-pooled over `pool` neighbouring keys; decoded tokens are appended
    Prefill attention is dense, so prefill masks, kernels and costs treat it as Dense."""
    policy: str
    budget: float
    sink: int = 0
    recent: int = 32
    alpha: float = 1.0
    pool: int = 7
    kind = "kv_evict"

    def __post_init__(self):
        if self.policy not in EVICT_POLICIES:
            raise FormError(f"kv_evict policy must be one of {EVICT_POLICIES}, got {self.policy!r}")
        if not 0 < self.budget <= 1:
            raise FormError(f"kv_evict budget is a fraction of the prompt's keys in (0, 1], got {self.budget}")
        if self.sink < 0 or self.recent < 1 or not 0 < self.alpha <= 1 or self.pool < 1:
            raise FormError(f"kv_evict needs sink >= 0, recent >= 1, 0 < alpha <= 1, pool >= 1; got "
                            f"{self.sink}, {self.recent}, {self.alpha}, {self.pool}")

    def kept(self, prompt: int) -> int:
        """Keys kept from a prompt of `prompt` tokens (never fewer than sink + recent, never more than all)."""
        return min(prompt, max(self.sink + self.recent, math.ceil(self.budget * prompt)))

    def window_at(self, s: int):
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True)
class KVQuant:
    """KV-compressed decoding, KIVI style: the prompt runs dense; the cache holds the group's keys and
    values as `bits`-bit codes (keys per channel over `group` tokens, values per token over min(group, D)
    channels, float16 scale and minimum), the newest `residual` .. `residual + group - 1` tokens in full
    precision (attnforge.runtime.kvquant). Prefill masks, kernels and costs treat it as Dense."""
    bits: int
    group: int = 32
    residual: int = 128
    kind = "kv_quant"

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise FormError(f"kv_quant bits must be 2, 4 or 8, got {self.bits}")
        if self.group < 1 or self.residual < 0:
            raise FormError(f"kv_quant needs group >= 1 and residual >= 0, got {self.group}, {self.residual}")

    def window_at(self, s: int):
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


LINEAR_MAPS = ("taylor2", "hedgehog")
LINEAR_BAND = 64          # keys next to the window that the chunked kernel weighs tile by tile


@dataclass(frozen=True, slots=True)
class Linear:
    """Softmax over `sink` + `window` keys, linear attention over the keys in between, one normalizer
    (attnforge.runtime.linear has the formula). feature_map "taylor2" (parameter-free) or "hedgehog"
    (learned per KV group; `maps` is the key of its FeatureMaps, saved beside the plan)."""
    feature_map: str
    window: int
    sink: int = 0
    maps: str = ""
    kind = "linear"

    def __post_init__(self):
        if self.feature_map not in LINEAR_MAPS:
            raise FormError(f"linear feature_map must be one of {LINEAR_MAPS}, got {self.feature_map!r}")
        if self.window < 1 or self.sink < 0:
            raise FormError(f"linear needs window >= 1 and sink >= 0, got {self.window}, {self.sink}")
        if (self.feature_map == "hedgehog") != bool(self.maps) and self.maps != "":
            raise FormError("linear: only hedgehog forms carry learned maps")

    def window_at(self, s: int):
        return None

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, slots=True)
class VerticalSlash:
    """MInference's vertical-slash pattern, estimated per input: the attention of the last `last_q` queries
    (every query head of the group) picks the `verticals` key blocks (columns) and the `slashes` block
    diagonals with the most mass; key block 0 (the sink) and diagonal 0 (the local block) are always kept, on
    top. Each call resolves it to BlockSparse(block, those verticals, those slashes)
    (attnforge.runtime.dynamic.resolve), which the kernels run exactly; decoding reads every key (the
    cache holds them all: later inputs choose other blocks). Inference only: no gradients through it."""
    verticals: int
    slashes: int
    block: int = 64
    last_q: int = 64
    kind = "vertical_slash"

    def __post_init__(self):
        if self.verticals < 0 or self.slashes < 0 or self.block < 1 or self.last_q < 1:
            raise FormError(f"vertical_slash needs verticals, slashes >= 0, block and last_q >= 1; got "
                            f"{self.verticals}, {self.slashes}, {self.block}, {self.last_q}")

    def window_at(self, s: int):
        return None

    def nominal(self) -> BlockSparse:
        """The BlockSparse form of its budget with the verticals and slashes nearest the start and the
        diagonal: the most pairs any resolution of it keeps (costs and densities count this)."""
        return BlockSparse(self.block, tuple(range(self.verticals + 1)), tuple(range(self.slashes + 1)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


Form = Dense | SinkWindow | ElasticWindow | BlockSparse | KVEvict | KVQuant | Linear | VerticalSlash
FORM_KINDS = {cls.kind: cls for cls in (Dense, SinkWindow, ElasticWindow, BlockSparse, KVEvict, KVQuant, Linear,
                                        VerticalSlash)}


def prefill_form(form):
    """The form that prefill attention runs: Dense for KV-compressed forms (they act on decoding)."""
    return Dense() if isinstance(form, (KVEvict, KVQuant)) else form


def form_from_dict(d: dict) -> Form:
    if not isinstance(d, dict) or "kind" not in d:
        raise FormError(f"a form must be an object with a 'kind', got {d!r}")
    cls = FORM_KINDS.get(d["kind"])
    if cls is None:
        raise FormError(f"unknown form kind {d['kind']!r}; known: {sorted(FORM_KINDS)}")
    names = {f.name for f in fields(cls)}
    extra = set(d) - names - {"kind"}
    missing = names - set(d)
    if extra or missing:
        raise FormError(f"form {d['kind']!r}: unexpected fields {sorted(extra)}, missing {sorted(missing)}")
    try:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "kind"})
    except TypeError as e:
        raise FormError(f"form {d['kind']!r}: {e}") from e


def forms_to_json(forms) -> str:
    return json.dumps([f.to_dict() for f in forms], separators=(",", ":"))


def forms_from_json(text: str) -> tuple:
    return tuple(form_from_dict(d) for d in json.loads(text)) if text else ()


def _keep_one(form: Form, rows, cols, s: int, window=None) -> torch.Tensor:
    """One form's keep rule at query positions `rows` and key positions `cols` (broadcasting tensors) of a
    length-s sequence; window: a window-like form's span instead of window_at(s) (a tensor, e.g. one span
    per sequence of a padded batch)."""
    form = prefill_form(form)
    causal = cols <= rows
    if isinstance(form, VerticalSlash):
        raise FormError("a vertical_slash form has no fixed mask: it is estimated per input; resolve it first "
                        "(attnforge.runtime.dynamic.resolve)")
    if isinstance(form, Linear):        # every causal key is weighed (the window exactly, the rest linearly)
        return causal
    if isinstance(form, Dense):
        return causal
    if isinstance(form, (SinkWindow, ElasticWindow)):
        w = form.window_at(s) if window is None else window
        return causal & ((cols < form.sink) | (cols > rows - w))
    qb, kb = rows // form.block, cols // form.block
    # key blocks (and block diagonals) run 0 .. (s - 1) // block: sizes from s, not from the tensors, so that
    # the mask also builds on fake tensors (a compiled training step traces the reference backward)
    nb = (s - 1) // form.block + 1 if s > 0 else 1
    vert = torch.zeros(nb, dtype=torch.bool, device=rows.device)
    vert[[v for v in form.verticals if v < nb]] = True
    slash = torch.zeros(nb, dtype=torch.bool, device=rows.device)
    slash[[d for d in form.slashes if d < nb]] = True
    return causal & (vert[kb] | slash[(qb - kb).clamp(min=0)])


def keep_mask(forms, n: int, s: int, device=None) -> torch.Tensor:
    """[G, N, S] boolean mask, True = attend, for one form per group; queries are the last n of s
    positions (causality included)."""
    rows = torch.arange(s - n, s, device=device)[:, None]
    cols = torch.arange(s, device=device)[None, :]
    return torch.stack([_keep_one(f, rows, cols, s) for f in forms])


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def kept_pairs(form: Form, n: int, head_dim: int = 64) -> int:
    """Number of (i, j) pairs a form keeps for a square length n (exact). For Linear forms, its cost in
    pair-equivalents: the exact part's pairs, plus per token LINEAR_BAND pairs (the band next to the
    window weighed tile by tile) and F pair-equivalents of state update and read-out (F feature dims,
    each F * Dv multiply-adds against a pair's 2 * D; Dv = D), never more than the causal pairs' worth
    of a dense kernel plus that overhead: taylor2 (F = 1 + d + d^2) wins only at long lengths."""
    form = prefill_form(form)
    if isinstance(form, Linear):
        from .linear import feature_dim

        exact = kept_pairs(SinkWindow(form.sink, form.window), n)
        return exact + min(causal_pairs(n) - exact, n * LINEAR_BAND) + n * feature_dim(form.feature_map, head_dim) // 2
    if isinstance(form, Dense):
        return causal_pairs(n)
    if isinstance(form, VerticalSlash):  # an upper bound: which blocks it keeps depends on the input
        return _block_sparse_pairs(form.nominal(), n)
    if isinstance(form, (SinkWindow, ElasticWindow)):
        w, sink = min(form.window_at(n), n), form.sink
        window = causal_pairs(w) + (n - w) * w          # rows i < w see i + 1 keys, the others w
        m = n - w                                       # rows i >= w also see sink keys j < min(sink, i-w+1)
        extra = m * (m + 1) // 2 if m <= sink else sink * (sink + 1) // 2 + (m - sink) * sink
        return window + extra
    return _block_sparse_pairs(form, n)


def _block_sparse_pairs(form: BlockSparse, n: int) -> int:
    """kept_pairs of a BlockSparse form, block by block (no N x N mask): an off-diagonal kept block holds
    rows(qb) * cols(kb) pairs, the diagonal block the causal triangle of its (possibly partial) size."""
    nb = -(-n // form.block)
    size = [min(form.block, n - b * form.block) for b in range(nb)]
    verts, slashes = set(form.verticals), set(form.slashes)
    total = 0
    for qb in range(nb):
        total += size[qb] * (size[qb] + 1) // 2                     # slash 0: always kept
        total += size[qb] * sum(size[kb] for kb in range(qb) if kb in verts or qb - kb in slashes)
    return total


def kv_tokens(form: Form, n: int, max_length: int | None = None, head_dim: int = 64) -> int:
    """KV entries a decoder holds for one group at length n (exact; attnforge.runtime.kvcache allocates
    exactly this many slots): every key for Dense; sink + window (at most n) for the windows, the elastic
    span taken at `max_length` (default n); for BlockSparse the vertical blocks reached so far plus a
    ring of the last (max distance + 1) blocks, which is also every key a later query can still read;
    for Linear the exact part's keys plus its constant-size state counted as K+V entries of `head_dim`."""
    if isinstance(form, (Dense, VerticalSlash)):     # a dynamic form decodes over every key
        return n
    if isinstance(form, Linear):         # sink + window keys, plus the running sums (A parts of D x (Dv + 1)
        from .linear import feature_dim   # numbers) in key+value-entry equivalents (Dv = D assumed)

        state = feature_dim(form.feature_map, head_dim) * (head_dim + 1)
        return min(n, form.sink + form.window) + -(-state // (2 * head_dim))
    if isinstance(form, KVQuant):        # the bytes of its codes, statistics and residual, in float16
        from .kvquant import quant_bytes  # K+V entries (4 * head_dim bytes), rounded up

        return -(-quant_bytes(n, form.bits, form.group, form.residual, head_dim) // (4 * head_dim))
    if isinstance(form, KVEvict):        # the kept prompt keys; h2o / a2sf one slot more (evicted after
        extra = {"snapkv": (max_length or n) - n, "streaming": 0}.get(form.policy, 1)   # each step), snapkv
        return min(max_length or n, form.kept(n) + extra)                              # the new tokens too
    if isinstance(form, (SinkWindow, ElasticWindow)):
        return min(n, form.sink + form.window_at(max_length or n))
    reached = sum(1 for v in form.verticals if v * form.block < n)
    return reached * form.block + min(n, (max(form.slashes) + 1) * form.block)


def kv_read(form: Form, n: int) -> int:
    """Keys the query at position n - 1 reads (exact)."""
    if isinstance(form, VerticalSlash):
        return n
    return int(keep_mask([form], 1, n).sum())
