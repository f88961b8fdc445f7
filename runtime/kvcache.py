"""A KV cache per attention site where every KV head group has its own layout and budget.

Memory is really saved: a group stores only the keys its form can still read, in one flat slot buffer
per site (K [B, T, D], V [B, T, DV], T = the sum of the groups' capacities):

    Dense                     every position (the region grows, doubling)
    SinkWindow(sink, w)       the first `sink` positions + a ring of the last w          (sink + w slots)
    ElasticWindow(sink, a, b) the same ring sized for the longest length the cache is built for
                              (span a + b * S grows with S); reads mask positions <= q - span(S)
    BlockSparse(blk, V, D)    the vertical blocks V + a ring of the last (max D + 1) blocks; reads keep
                              block distances in D (a key block leaves the ring only when no later
                              query block can reach it)

Keys are stored as the model produced them (after rotary embeddings), so a slot's order does not matter
to attention; `pos` [B, T] records each slot's absolute position per sequence (-1 = empty) and the read
rule works from it. Positions follow attnforge.runtime.forms: the newest query of a length-S sequence sits
at S - 1.

A padded batch (prompts of different lengths, left-padded as Hugging Face's generate() pads them) gives
`append` the prompt's key-padding flags: each row stores only its real tokens, at its own positions 0 ..
len_b - 1, so every form reads what it would read for that row alone; each decoding step then adds one
token to every row, at its own next position (`lens`). Evicting and quantized groups take rows of equal
length only.

`SiteKVCache.append(k, v)` writes the new tokens of every group; `keep_flags()` gives the slots the
newest query reads; `decode_reference(q)` is the PyTorch oracle for one query token per head, and
`decode(q, kernel)` runs the split-KV Triton kernel (codegen `render_decode`) over the same buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .forms import BlockSparse, Dense, ElasticWindow, KVEvict, KVQuant, Linear, SinkWindow, VerticalSlash, kv_tokens
from .kvquant import QuantKV
from .padding import _keep
from .reference import _compute_dtype, _probs, soft_cap as _capped

__all__ = ["GroupLayout", "SiteKVCache", "layout_for", "policy_scores", "policy_keep", "KVCacheError"]


class KVCacheError(ValueError):
    """A cache cannot hold what was asked; the message says what and what to do."""


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """Where one KV group keeps its keys. kind: 'full' | 'window' | 'blocks' | 'evict' | 'quant' / 'linear'
    (no slots in the flat buffer: the site's QuantKV, or a runtime.linear.LinearState per sequence)."""
    kind: str
    sink: int = 0
    ring: int = 0                   # ring slots (window: the span; blocks: (max distance + 1) * block)
    alpha: int = 0                  # elastic span alpha + beta * S (beta 0: a fixed window)
    beta: float = 0.0
    block: int = 0
    verticals: tuple = ()
    slashes: tuple = ()
    form: object = None             # kind 'evict': the KVEvict form (its region is sized at prefill)
    horizon: int = 0                # kind 'blocks': > 0 when verticals past this length were left out

    def capacity(self, length: int) -> int:
        """Slots this group needs for a sequence of `length` tokens (= forms.kv_tokens of its form)."""
        if self.kind == "evict":
            raise KVCacheError("an evicting group's capacity depends on its prompt (see SiteKVCache.append)")
        if self.kind == "full":
            return length
        if self.kind in ("quant", "linear"):
            return 0
        if self.kind == "window":
            return min(length, self.sink + self.ring)
        reached = sum(1 for v in self.verticals if v * self.block < length)     # sorted: slots 0.. in use
        return reached * self.block + min(length, self.ring)

    def slots(self, pos: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored, slot) for positions `pos` once the sequence holds `length` tokens: whether each
        position still has a slot, and which (ring slots are reused; the latest position wins)."""
        if self.kind == "full":
            return torch.ones_like(pos, dtype=torch.bool), pos
        if self.kind == "window":
            sink = pos < self.sink
            ring = self.sink + (pos - self.sink).remainder(self.ring)
            return sink | (pos >= max(self.sink, length - self.ring)), torch.where(sink, pos, ring)
        nv = len(self.verticals)
        kb = pos // self.block
        r_slot = nv * self.block + pos.remainder(self.ring)
        if not nv:
            return pos >= length - self.ring, r_slot
        vert = torch.tensor(self.verticals, dtype=pos.dtype, device=pos.device)
        is_v = kb[:, None] == vert[None, :]
        v_slot = is_v.long().argmax(1) * self.block + pos % self.block
        in_v = is_v.any(1)
        return in_v | (pos >= length - self.ring), torch.where(in_v, v_slot, r_slot)

    def slot(self, p: int) -> int:
        """The slot of the newest position p (always stored): slots() for one position, in Python ints,
        so a decoding step computes every group's slot without a device operation."""
        if self.kind == "full":
            return p
        if self.kind == "window":
            return p if p < self.sink else self.sink + (p - self.sink) % self.ring
        kb = p // self.block
        if kb in self.verticals:
            return self.verticals.index(kb) * self.block + p % self.block
        return len(self.verticals) * self.block + p % self.ring

    @property
    def dynamic(self) -> bool:
        """Whether the slots a query reads change with the query beyond 'every stored slot'."""
        return self.kind == "blocks" or bool(self.beta)

    def reads(self, pos: torch.Tensor, query) -> torch.Tensor:
        """Which stored positions the query at position `query` attends to (pos >= 0 assumed stored).
        query: an int, or a tensor broadcasting against pos (one position per sequence, [B, 1])."""
        ok = (pos >= 0) & (pos <= query)
        if self.kind == "window" and self.beta:
            if isinstance(query, int):
                span = max(1, int(self.alpha + self.beta * (query + 1)))
            else:                          # the same double arithmetic as int(), per sequence
                span = torch.floor(self.alpha + self.beta * (query + 1).double()).clamp(min=1).long()
            ok &= (pos < self.sink) | (pos > query - span)
        elif self.kind == "blocks":
            kb = torch.where(pos >= 0, pos // self.block, torch.zeros_like(pos))
            dist = query // self.block - kb
            hit = torch.zeros_like(ok)
            for v in self.verticals:
                hit |= kb == v
            for d in self.slashes:
                hit |= dist == d
            ok &= hit
        return ok

    def sees(self, pos: torch.Tensor, query) -> torch.Tensor:
        """reads(), also for a query whose ring has since moved on: a fixed window's keys older than the
        query's window are dropped (a decoding step's ring holds none of them; a continuation's queries attend
        over the slots before it, some of which a later query no longer sees)."""
        ok = self.reads(pos, query)
        if self.kind == "window" and not self.beta:
            ok &= (pos < self.sink) | (pos > query - self.ring)
        return ok


def _to_device(values: list[int], device) -> torch.Tensor:
    """A small int64 index tensor on `device` without stalling it: on CUDA through pinned memory and a
    non-blocking copy (a pageable host-to-device copy waits for the whole stream, once per layer per
    decoding step); the caching host allocator keeps the pinned block until the copy has run."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def layout_for(form, max_length: int) -> GroupLayout:
    """The cache layout of a form, for sequences up to `max_length` tokens (elastic spans grow)."""
    if isinstance(form, (Dense, VerticalSlash)):      # a dynamic form's later inputs choose other keys
        return GroupLayout("full")
    if isinstance(form, SinkWindow):
        return GroupLayout("window", sink=form.sink, ring=form.window)
    if isinstance(form, ElasticWindow):
        return GroupLayout("window", sink=form.sink, ring=form.window_at(max_length), alpha=form.alpha,
                           beta=form.beta)
    if isinstance(form, KVEvict):
        return GroupLayout("evict", sink=form.sink, ring=form.recent, alpha=0, beta=0.0, form=form)
    if isinstance(form, BlockSparse):
        # vertical blocks past max_length hold no key of this cache's sequences (queries see no later keys):
        # they get no slots, so the ring starts right after the ones that do
        reached = tuple(v for v in form.verticals if v * form.block < max_length)
        return GroupLayout("blocks", ring=(max(form.slashes) + 1) * form.block, block=form.block,
                           verticals=reached, slashes=form.slashes, horizon=max_length if reached != form.verticals else 0)
    if isinstance(form, KVQuant):
        return GroupLayout("quant", form=form)
    if isinstance(form, Linear):
        return GroupLayout("linear", form=form)
    raise KVCacheError(f"no KV cache layout for form {getattr(form, 'kind', form)!r}")


class SiteKVCache:
    """The KV cache of one attention site: one layout per KV group over one flat slot buffer."""

    def __init__(self, forms, max_length: int):
        if max_length < 1:
            raise KVCacheError(f"max_length must be >= 1, got {max_length}")
        self.layouts = tuple(layout_for(f, max_length) for f in forms)
        self.max_length = max_length
        self._dynamic = any(lay.dynamic for lay in self.layouts)
        self._evict = [gi for gi, lay in enumerate(self.layouts) if lay.kind == "evict"]
        self._quant = [gi for gi, lay in enumerate(self.layouts) if lay.kind == "quant"]
        self._heads_cache: dict = {}
        self.quant = None                     # QuantKV of the KVQuant groups (runtime.kvquant)
        if self._quant:
            shapes = {(self.layouts[gi].form.group, self.layouts[gi].form.residual) for gi in self._quant}
            if len(shapes) > 1:
                raise KVCacheError(f"KVQuant groups of one site must share group and residual sizes, got {sorted(shapes)}")
            (qg, qr), = shapes
            self.quant = QuantKV([(gi, self.layouts[gi].form.bits) for gi in self._quant], qg, qr, max_length)
        self._linear = [gi for gi, lay in enumerate(self.layouts) if lay.kind == "linear"]
        self._log: list | None = None         # while recording (assisted decoding): what each append replaced
        self._empty()

    def _empty(self) -> None:
        """No token held (a new cache, or one whose every write was taken back): buffers are made by the first
        append, sized by its prompt."""
        self.length = 0                       # tokens seen (padding included: what the model was fed)
        self.lens: list[int] | None = None    # a padded batch: real tokens per row (None: every row has length)
        self.k = self.v = self.pos = self._flags = None
        self._caps: list[int] = []
        self._offs: list[int] = []
        self._off_t = self._cap_t = None
        if self.quant is not None:
            self.quant.set_state(None)
        self.linear = None                    # [batch][group] LinearState, made at the first read (needs the scale)
        self._linear_pending = None           # (k, v [B, nl, T, D], keep [B, T] or None) of Linear groups until then
        self.prompt = 0                       # prompt length (evicting groups size their regions by it)
        self.scores = None                    # [T] float32: accumulated attention per slot (h2o / a2sf)
        self._pending = None                  # prompt K/V of evicting groups until select() chooses
        self._free: dict[int, list] = {}      # h2o / a2sf: free slots, host ints or (evicted on the device) 0-dim tensors
        self._count: dict[int, int] = {}
        self._held: dict[int, int] = {}       # h2o / a2sf: keys each group holds (tracked on the host)

    # ------------------------------------------------------------------ storage
    def _allocate(self, like_k, like_v, caps):
        b, d, dv = like_k.shape[0], like_k.shape[-1], like_v.shape[-1]
        offs = [0]
        for c in caps[:-1]:
            offs.append(offs[-1] + c)
        total = sum(caps)
        k = like_k.new_zeros(b, total, d)
        v = like_v.new_zeros(b, total, dv)
        pos = torch.full((b, total), -1, dtype=torch.int32, device=like_k.device)      # per sequence
        self._offs_old, self._caps_old = self._offs, self._caps
        if self.k is not None:                # regrow: copy each group's region
            for g, (o_old, c_old) in enumerate(zip(self._offs, self._caps)):
                k[:, offs[g]:offs[g] + c_old] = self.k[:, o_old:o_old + c_old]
                v[:, offs[g]:offs[g] + c_old] = self.v[:, o_old:o_old + c_old]
                pos[:, offs[g]:offs[g] + c_old] = self.pos[:, o_old:o_old + c_old]
        self.k, self.v, self.pos, self._caps, self._offs = k, v, pos, list(caps), offs
        self._flags = (pos >= 0).to(torch.int8)
        scores = torch.zeros(total, dtype=torch.float32, device=like_k.device)
        if self.scores is not None:
            for g, (o_old, c_old) in enumerate(zip(self._offs_old, self._caps_old)):
                scores[offs[g]:offs[g] + c_old] = self.scores[o_old:o_old + c_old]
        self.scores = scores
        self._off_t = torch.tensor(offs, dtype=torch.int32, device=like_k.device)
        self._cap_t = torch.tensor(caps, dtype=torch.int32, device=like_k.device)
        # full and sink + window regions fill from their start: the decode kernel reads their used part only
        self._prefix = [lay.kind in ("full", "window") for lay in self.layouts]
        self._prefix_t = torch.tensor(self._prefix, dtype=torch.int8, device=like_k.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store the next tokens: k [B, G, n, D], v [B, G, n, DV] at positions length .. length+n-1 (with
        `keep`, the prompt's [B, n] key-padding flags: each row's real tokens at its own positions)."""
        b, g, n, _ = k.shape
        if g != len(self.layouts):
            raise KVCacheError(f"{g} KV heads for a cache of {len(self.layouts)} groups")
        keep = self._padding(keep, b, n)
        new_len = self.length + n
        if new_len > self.max_length and any(lay.beta or lay.horizon for lay in self.layouts):
            raise KVCacheError(f"{new_len} tokens exceed the cache's max_length {self.max_length} that its "
                               "elastic windows or block-sparse verticals were sized for; build the cache with a "
                               "larger max_length")
        if self._evict and self.length == 0:
            if b != 1:
                raise KVCacheError("eviction policies choose keys per sequence; decode one sequence (batch 1) "
                                   "at a time with KV-evicting forms")
            self.prompt = n
        elif self._evict and n != 1:
            raise KVCacheError(f"after the prompt, a cache with KV-evicting forms takes one token per step, got {n}")
        if self._pending is not None:
            raise KVCacheError("call select(q, scale) with the prompt's queries before the first decoding step: "
                               "the evicting groups have not chosen their keys yet")
        # Every region is sized for max_length at once (no copies while generating); past it, full
        # groups grow by doubling. Evicting groups: by their prompt (forms.kv_tokens).
        horizon = max(new_len, self.max_length)
        need = [kv_tokens(lay.form, self.prompt, horizon) if lay.kind == "evict" else lay.capacity(horizon)
                for lay in self.layouts]
        if self.k is None or any(c > have for c, have in zip(need, self._caps)):
            if self.k is not None and self._evict:
                raise KVCacheError(f"{new_len} tokens exceed the max_length {self.max_length} this cache was "
                                   "built for; build it with a larger max_length")
            grow = [max(c, 2 * have) if lay.kind == "full" else c
                    for c, have, lay in zip(need, self._caps or [0] * g, self.layouts)]
            self._allocate(k, v, grow)
        if self._log is not None:            # before any write: what these tokens will replace
            self._log.append(self._snapshot(k, v, keep, n))
        if self.quant is not None:
            sel = self._groups(tuple(self._quant), k.device)
            self.quant.append(k[:, sel], v[:, sel])
        if self._linear:
            self._linear_append(k[:, self._linear], v[:, self._linear], keep)
        rest = [gi for gi, lay in enumerate(self.layouts) if lay.kind not in ("quant", "linear")]
        if n == 1 and self.length > 0 and self.lens is not None:     # a decoding step of a padded batch
            self._append_rows(k, v, rest)
            self.length = new_len
            return
        if n == 1 and self.length > 0:   # a decoding step: every group's slot in Python, one scatter for all
            p = self.length
            slots = [self._offs[gi] + (self._evict_slot(gi, p) if self.layouts[gi].kind == "evict"
                                       else self.layouts[gi].slot(p)) for gi in rest]
            idx = _to_device([x if isinstance(x, int) else 0 for x in slots], k.device)
            for i, x in enumerate(slots):
                if not isinstance(x, int):       # an h2o / a2sf slot freed on the device by an eviction
                    idx[i] = x
            sel = self._groups(tuple(rest), k.device)
            self.k[:, idx] = k[:, sel, 0].to(self.k.dtype)     # (nothing when every group is quantized / linear)
            self.v[:, idx] = v[:, sel, 0].to(self.v.dtype)
            self.pos[:, idx] = p
            self._flags[:, idx] = 1
            self.scores[idx] = 0
            self.length = new_len
            return
        if self._evict:
            self._pending = (k, v)
        if keep is not None:             # a padded prompt: row by row, its real tokens at 0 .. len_b - 1
            self.lens = keep.sum(1).tolist()
            for row in range(b):
                real = keep[row].nonzero().squeeze(1).to(k.device)
                self._store(k[row:row + 1, :, real], v[row:row + 1, :, real],
                            torch.arange(len(real), device=k.device), len(real), rest, row)
        else:
            self._store(k, v, torch.arange(self.length, new_len, device=k.device), new_len, rest)
        self.length = new_len

    def _padding(self, keep, b: int, n: int):
        """The prompt's key-padding flags on the host (None when no row is padded); the combinations a padded
        batch cannot take are refused."""
        if keep is None:
            if self.lens is not None and n != 1:
                raise KVCacheError("a padded batch takes one token per row per step after its prompt")
            return None
        if tuple(keep.shape) != (b, n):
            raise KVCacheError(f"the key-padding flags must be [B, n] = [{b}, {n}], got {tuple(keep.shape)}")
        if keep.dtype != torch.bool and keep.numel():
            labels, bound = keep.cpu().to(torch.int64), torch.iinfo(torch.int64)
            high = labels.masked_fill(labels == 0, bound.min).amax(1)
            low = labels.masked_fill(labels == 0, bound.max).amin(1)
            if bool(((high != low) & (labels != 0).any(1)).any()):
                raise KVCacheError("a row of the prompt holds several sequences (packed labels); a cache holds one "
                                   "sequence per row: give each sequence its own row (padded)")
        keep = _keep(keep).cpu()
        if bool(keep.all()):
            return None
        if self.length:
            raise KVCacheError("padding comes with the prompt only: after it, every row takes one real token per "
                               "step (left-pad the prompts, as Hugging Face's generate() does)")
        if self._evict or self._quant:
            raise KVCacheError("KV-evicting and KVQuant groups decode rows of equal length; give prompts without "
                               "padding (one sequence at a time) to a plan with those forms")
        return keep

    def _store(self, k, v, pos, length: int, groups, row=None) -> None:
        """Write tokens at positions `pos` (k/v [B or 1, G, n, D]) of a sequence that then holds `length`
        tokens, in every listed group's layout; row: the one batch row written (a padded prompt), else all."""
        rows = slice(None) if row is None else slice(row, row + 1)
        for gi in groups:
            lay = self.layouts[gi]
            if lay.kind == "evict":
                continue
            stored, slot = lay.slots(pos, length)
            idx = self._offs[gi] + slot[stored]
            self.k[rows, idx] = k[:, gi, stored.nonzero().squeeze(1)].to(self.k.dtype)
            self.v[rows, idx] = v[:, gi, stored.nonzero().squeeze(1)].to(self.v.dtype)
            self.pos[rows, idx] = pos[stored].to(self.pos.dtype)
            self._flags[rows, idx] = 1

    def _append_rows(self, k, v, groups) -> None:
        """One decoding step of a padded batch: row b's token at its own position lens[b], in every group."""
        b = k.shape[0]
        slots = [self._offs[gi] + self.layouts[gi].slot(p) for p in self.lens for gi in groups]
        idx = _to_device(slots, k.device).view(b, len(groups))
        key = ("rows", b, str(k.device))
        if key not in self._heads_cache:
            self._heads_cache[key] = torch.arange(b, device=k.device)[:, None]
        rows = self._heads_cache[key]
        sel = self._groups(tuple(groups), k.device)
        self.k[rows, idx] = k[:, sel, 0].to(self.k.dtype)
        self.v[rows, idx] = v[:, sel, 0].to(self.v.dtype)
        self.pos[rows, idx] = _to_device(self.lens, k.device).to(self.pos.dtype)[:, None]
        self._flags[rows, idx] = 1
        self.lens = [p + 1 for p in self.lens]

    # ------------------------------------------------------------------ beam search and rollback
    def reorder(self, rows: torch.Tensor, host: list[int] | None = None) -> None:
        """Beam search: row b of the cache becomes what row rows[b] holds (rows [B'] int64; an index may repeat,
        one may go). host: the same indices as Python ints, where the caller has them (a padded batch's lengths
        and linear groups' states are per row on the host; without it they are read from `rows` once)."""
        if self._evict and rows.numel() != 1:
            raise KVCacheError("KV-evicting groups choose keys per sequence (batch 1): beam search needs a plan "
                               "without KVEvict forms")
        if self._pending is not None or self._log:
            raise KVCacheError("reorder the cache between steps only (not between a prompt and its selection, "
                               "nor with rolled-back drafts pending)")
        if self.k is not None:
            idx = rows.to(self.k.device)
            self.k, self.v, self.pos, self._flags = (t.index_select(0, idx) for t in (self.k, self.v, self.pos,
                                                                                       self._flags))
        if self.quant is not None:
            self.quant.reorder(rows)
        if self.lens is None and self.linear is None and self._linear_pending is None:
            return
        host = rows.tolist() if host is None else host
        if self.lens is not None:
            self.lens = [self.lens[i] for i in host]
        if self._linear_pending is not None:
            k, v, keep = self._linear_pending
            idx = rows.to(k.device)
            self._linear_pending = (k.index_select(0, idx), v.index_select(0, idx),
                                    None if keep is None else keep[host])
        if self.linear is not None:           # states change in place: a row taken again gets copies
            taken, states = set(), []
            for i in host:
                states.append([st.clone() for st in self.linear[i]] if i in taken else self.linear[i])
                taken.add(i)
            self.linear = states

    def record(self, on: bool = True) -> None:
        """Assisted (speculative) decoding: from now on every append remembers what it replaces, so that
        rollback(n) can take back rejected draft tokens (commit() forgets, keeping them). Position-only groups
        keep the slots a write overwrites; evicting, quantized and linear groups, whose state changes with every
        token (and which take tokens one at a time after the prompt), keep their whole state before each token:
        an evicting group's region and scores, KIVI's residual (codes past the kept count are never read), a
        linear group's sums and window."""
        self._log = [] if on else None

    @property
    def recording(self) -> bool:
        return self._log is not None

    def commit(self) -> None:
        """Keep every token written since recording began (or since the last commit / rollback)."""
        if self._log is not None:
            self._log = []

    def rollback(self, n: int) -> None:
        """Take back the last n tokens written since recording began (or the last commit): the cache then holds
        exactly what it would hold had they never come. Commits what remains."""
        if n < 0 or n > self.length:
            raise KVCacheError(f"cannot take back {n} tokens of a cache holding {self.length}")
        if self._log is None:
            if not n:
                return
            if self.lens is not None or any(lay.kind != "full" for lay in self.layouts):
                raise KVCacheError("rolling back tokens needs record() before they are written (Hugging Face's "
                                   "activate_past_recording(), which assisted decoding calls)")
            # full groups only, nothing overwritten: the newest positions just go
            self._undo({"length": self.length - n, "lens": None, "saved": {}, "state": None})
            return
        log, self._log = self._log, None               # the replay below is not recorded
        while n > 0:
            if not log:
                raise KVCacheError(f"cannot take back {n} more tokens: they were written before recording began")
            entry = log.pop()
            self._undo(entry)
            drop = min(entry["n"], n)
            n -= drop
            if entry["n"] > drop:                      # the first part of this write stays: write it again
                self._replay(entry, entry["n"] - drop)
        self._log = []

    def _snapshot(self, k, v, keep, n: int) -> dict:
        """What a write of n tokens (k / v [B, G, n, D]) replaces: per window / block group, the slots its
        positions map to (in-group indices, so a later regrow does not move them) and their contents; full
        groups' new slots were empty (taken back by position); the state of evicting, quantized and linear
        groups. An empty cache is taken back to empty (and its prompt written again, evicting groups choosing
        again from the queries select() gets)."""
        entry = {"length": self.length, "lens": None if self.lens is None else list(self.lens), "n": n,
                 "k": k, "v": v, "keep": keep, "saved": {}, "state": None, "select": None}
        if not self.length:
            return entry
        if not self.stateless:
            entry["state"] = self._state()
        starts = self.lens if self.lens is not None else [self.length]
        positions = range(min(starts), max(starts) + n)
        for gi, lay in enumerate(self.layouts):
            if lay.kind in ("window", "blocks"):      # the slots on the host (no device sync), each once
                slots = _to_device(sorted({lay.slot(p) for p in positions}), self.pos.device)
                idx = self._offs[gi] + slots            # (gathering copies)
                entry["saved"][gi] = (slots, self.k[:, idx], self.v[:, idx], self.pos[:, idx], self._flags[:, idx])
        return entry

    def _state(self) -> dict:
        """The token-dependent state of the evicting, quantized and linear groups (copies)."""
        state = {}
        for gi in self._evict:
            o, c = self._offs[gi], self._caps[gi]
            state[gi] = tuple(t[:, o:o + c].clone() for t in (self.k, self.v, self.pos, self._flags)) + (
                self.scores[o:o + c].clone(), list(self._free.get(gi, ())), self._held.get(gi), self._count.get(gi))
        if self.quant is not None:
            state["quant"] = self.quant.state()
        if self._linear:
            state["linear"] = (None if self.linear is None else [[st.clone() for st in row] for row in self.linear],
                               self._linear_pending)        # (pending tensors are replaced, never written)
        return state

    def _set_state(self, state: dict) -> None:
        for gi in self._evict:
            o, c = self._offs[gi], self._caps[gi]
            *tensors, scores, free, held, count = state[gi]
            for t, saved in zip((self.k, self.v, self.pos, self._flags), tensors):
                t[:, o:o + c] = saved
            self.scores[o:o + c] = scores
            self._free[gi] = free
            for book, value in ((self._held, held), (self._count, count)):
                if value is None:
                    book.pop(gi, None)
                else:
                    book[gi] = value
        if self.quant is not None:
            self.quant.set_state(state["quant"])
        if self._linear:
            self.linear, self._linear_pending = state["linear"]

    def _undo(self, entry: dict) -> None:
        """Put the slots back as they were before `entry`'s write."""
        if not entry["length"]:               # empty again: the buffers go too (regions are sized by the prompt)
            self._empty()
            return
        if entry["state"] is not None:
            self._set_state(entry["state"])
        start = _to_device(entry["lens"] if entry["lens"] is not None else [entry["length"]] * self.pos.shape[0],
                           self.pos.device)[:, None]
        for gi, lay in enumerate(self.layouts):
            o, c = self._offs[gi], self._caps[gi]
            if lay.kind == "full":
                stale = self.pos[:, o:o + c] >= start
                self.pos[:, o:o + c].masked_fill_(stale, -1)
                self._flags[:, o:o + c].masked_fill_(stale, 0)
            elif gi in entry["saved"]:
                slots, k, v, pos, flags = entry["saved"][gi]
                idx = o + slots
                self.k[:, idx], self.v[:, idx], self.pos[:, idx], self._flags[:, idx] = k, v, pos, flags
        self.length, self.lens = entry["length"], entry["lens"]

    def _replay(self, entry: dict, m: int) -> None:
        """Write the first m tokens of `entry` again, as they first came. Only a prompt (with its padding flags)
        or an unpadded continuation over position-only groups writes several tokens at once: after the prompt,
        padded rows and evicting, quantized and linear groups take one token per append."""
        keep = entry["keep"]
        self.append(entry["k"][:, :, :m], entry["v"][:, :, :m], None if keep is None else keep[:, :m])
        if entry["select"] is not None and self.needs_select:    # a prompt: evicting groups choose again
            q, scale, softcap = entry["select"]
            self.select(q[:, :, :m], scale, softcap)

    # ------------------------------------------------------------------ eviction (KVEvict groups)
    def _evict_slot(self, gi: int, p: int) -> int:
        form = self.layouts[gi].form
        if form.policy == "streaming":
            ring = form.kept(self.prompt) - form.sink
            return p if p < form.sink else form.sink + (p - form.sink) % ring
        if form.policy == "snapkv":
            slot = self._count[gi]
            self._count[gi] += 1
            return slot
        if not self._free[gi]:
            raise KVCacheError(f"group {gi}: no free slot; after_step(q, scale) must follow every decoding step")
        self._held[gi] += 1
        return self._free[gi].pop()

    @property
    def needs_select(self) -> bool:
        return self._pending is not None

    def select(self, q: torch.Tensor, scale: float, softcap: float = 0.0) -> None:
        """After the prompt's attention: each evicting group keeps its form's choice of the prompt's keys.
        q: the prompt's queries [1, H, P, D]; softcap: the site's (scores ranked as the model attends)."""
        if self._pending is None:
            return
        if self._log:                         # while recording: a rolled-back prompt chooses again from these
            self._log[-1]["select"] = (q, scale, softcap)
        k, v = self._pending
        g, h = len(self.layouts), q.shape[1]
        r = h // g
        for gi in self._evict:
            form, o = self.layouts[gi].form, self._offs[gi]
            qg = q[0, gi * r:(gi + 1) * r]
            keep = policy_keep(form, qg, k[0, gi], scale, softcap)
            positions = torch.tensor(keep, device=k.device)
            if form.policy == "streaming":
                slots = torch.tensor([self._evict_slot(gi, p) for p in keep], device=k.device)
            else:
                slots = torch.arange(len(keep), device=k.device)
            idx = o + slots
            self.k[:, idx] = k[:, gi, positions].to(self.k.dtype)
            self.v[:, idx] = v[:, gi, positions].to(self.v.dtype)
            self.pos[:, idx] = positions.to(self.pos.dtype)
            self._flags[:, idx] = 1
            if form.policy in ("h2o", "a2sf"):
                self.scores[idx] = policy_scores(form, qg, k[0, gi], scale, softcap=softcap)[positions].float()
                self._free[gi] = list(range(len(keep), self._caps[gi]))[::-1]
                self._held[gi] = len(keep)
            self._count[gi] = len(keep)
        self._pending = None

    def after_step(self, q: torch.Tensor, scale: float, softcap: float = 0.0) -> None:
        """After a decoding step's attention (q [1, H, D], the newest query): h2o / a2sf groups add the
        step's attention to their scores (decayed by alpha) and evict their lowest-scoring key outside the
        sink and the recent window when over budget."""
        g, h = len(self.layouts), q.shape[1]
        r = h // g
        newest = self.length - 1
        for gi in self._evict:
            form = self.layouts[gi].form
            if form.policy not in ("h2o", "a2sf"):
                continue
            o, c = self._offs[gi], self._caps[gi]
            valid = self._flags[0, o:o + c].bool()
            s = _capped(torch.einsum("rd,nd->rn", q[0, gi * r:(gi + 1) * r].float(), self.k[0, o:o + c].float())
                        * scale, softcap)
            p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).sum(0)
            self.scores[o:o + c] = torch.where(valid, form.alpha * self.scores[o:o + c] + p, torch.zeros_like(p))
            if self._held[gi] <= form.kept(self.prompt):
                continue
            pos = self.pos[0, o:o + c]
            cand = valid & (pos >= form.sink) & (pos <= newest - form.recent)
            # at most sink + recent held keys are not candidates, so with more held one is and the host need
            # not look; only a prompt shorter than sink + recent may leave nothing to evict (a host read)
            if self._held[gi] <= form.sink + form.recent and not bool(cand.any()):
                continue
            j = torch.where(cand, self.scores[o:o + c], torch.full_like(p, float("inf"))).argmin()
            slot = (o + j).view(1)
            self.pos.index_fill_(1, slot, -1)
            self._flags.index_fill_(1, slot, 0)
            self.scores.index_fill_(0, slot, 0)
            self._free[gi].append(j)             # a device index: the next step writes its key there
            self._held[gi] -= 1

    # ------------------------------------------------------------------ reads
    def keep_flags(self) -> torch.Tensor:
        """[B, T] int8: the slots each sequence's newest query (position length - 1, or lens[b] - 1 in a padded
        batch) attends to. Full and fixed-window groups read every stored slot (kept up to date by append);
        elastic and block-sparse regions are recomputed from slot positions."""
        if not self._dynamic:
            return self._flags
        flags = self._flags.clone()
        q = self.length - 1 if self.lens is None else _to_device(self.lens, self.pos.device)[:, None] - 1
        for gi, lay in enumerate(self.layouts):
            if lay.dynamic:
                o, c = self._offs[gi], self._caps[gi]
                flags[:, o:o + c] = lay.reads(self.pos[:, o:o + c], q).to(torch.int8)
        return flags

    def group_views(self):
        """Per group (K [B, cap, D], V [B, cap, DV], keep [B, cap] bool)."""
        flags = self.keep_flags().bool()
        return [(self.k[:, o:o + c], self.v[:, o:o + c], flags[:, o:o + c]) for o, c in zip(self._offs, self._caps)]

    def decode_reference(self, q: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
        """Attention of one query token per head q [B, H, D] over the cache: the PyTorch oracle (scores
        soft-capped, softcap * tanh(s / softcap), if softcap > 0).
        Math in float64 for float64 inputs, float32 otherwise; out [B, H, DV] in q's dtype."""
        b, h, _ = q.shape
        g = len(self.layouts)
        r = h // g
        ct = _compute_dtype(q.dtype)
        outs = []
        for gi, (k, v, keep) in enumerate(self.group_views()):
            qg = q[:, gi * r:(gi + 1) * r].to(ct)                               # [B, r, D]
            s = _capped(torch.einsum("brd,bnd->brn", qg, k.to(ct)) * scale, softcap)
            p = _probs(s.masked_fill(~keep[:, None, :], float("-inf")))          # zeros where nothing is kept
            outs.append(torch.einsum("brn,bnd->brd", p, v.to(ct)))
        out = torch.cat(outs, 1)
        if self.quant is not None:
            heads = self._quant_heads(r, q.device)
            out[:, heads] = self.quant.decode_reference(q[:, heads], scale, softcap).to(ct)
        if self._linear:
            _no_linear_softcap(softcap)
            self._linear_attend(q.to(ct), scale, out, "reference")
        return out.to(q.dtype)

    def check_room(self, n: int) -> None:
        """Raise (before anything is written) if n more tokens exceed max_length in a layout that cannot grow:
        elastic spans and block-sparse verticals are sized for it, evicting and quantized regions too; full,
        fixed-window, block-ring and linear groups can go on."""
        new_len = self.length + n
        fixed = ["elastic window" if lay.beta else "block-sparse" if lay.horizon else lay.kind
                 for lay in self.layouts if lay.beta or lay.horizon or lay.kind in ("evict", "quant")]
        if new_len > self.max_length and fixed:
            raise KVCacheError(f"{new_len} tokens exceed the cache's max_length {self.max_length}, which its "
                               f"{sorted(set(fixed))} groups were sized for; build the cache with a larger "
                               "max_length (the whole conversation's, plus prompt_lookup_num_tokens when drafting "
                               "from the prompt)")

    @property
    def stateless(self) -> bool:
        """Whether what each group reads depends only on positions (full, window and block layouts): no
        eviction, quantization or linear state that changes with the tokens seen."""
        return all(lay.kind in ("full", "window", "blocks") for lay in self.layouts)

    def continue_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           softcap: float = 0.0, rows: int = 256) -> torch.Tensor:
        """n new tokens at once (q [B, H, n, D], k / v [B, G, n, D|DV]) in a stateless cache: query t of row b,
        at position p_b + t, attends to what the decoding step at that position would read (the slots stored
        before it and the new keys up to it, within its group's form); then the tokens are stored. The PyTorch
        oracle, a block of `rows` queries at a time; out [B, H, n, DV] in q's dtype."""
        if not self.stateless:
            raise KVCacheError("evicting, quantized and linear groups take new tokens one step at a time")
        b, h, n, _ = q.shape
        self.check_room(n)
        g = len(self.layouts)
        r, ct = h // g, _compute_dtype(q.dtype)
        start = torch.tensor(self.lens if self.lens is not None else [self.length] * b, device=q.device)
        qpos = start[:, None] + torch.arange(n, device=q.device)[None, :]                 # [B, n]
        out = q.new_zeros(b, h, n, v.shape[-1], dtype=ct)
        for gi, lay in enumerate(self.layouts):
            o, c = (self._offs[gi], self._caps[gi]) if self.k is not None else (0, 0)
            kg = torch.cat([self.k[:, o:o + c], k[:, gi].to(self.k.dtype)], 1).to(ct) if c else k[:, gi].to(ct)
            vg = torch.cat([self.v[:, o:o + c], v[:, gi].to(self.v.dtype)], 1).to(ct) if c else v[:, gi].to(ct)
            pos = torch.cat([self.pos[:, o:o + c].long(), qpos], 1) if c else qpos          # [B, c + n]
            for t0 in range(0, n, rows):
                t1 = min(n, t0 + rows)
                see = lay.sees(pos[:, None, :], qpos[:, t0:t1, None])                       # [B, rows, c + n]
                qg = q[:, gi * r:(gi + 1) * r, t0:t1].to(ct)
                s = _capped(torch.einsum("brnd,bjd->brnj", qg, kg) * scale, softcap)
                p = _probs(s.masked_fill(~see[:, None], float("-inf")))
                out[:, gi * r:(gi + 1) * r, t0:t1] = torch.einsum("brnj,bjd->brnd", p, vg)
        if self.lens is None:
            self.append(k, v)
        else:                              # a padded batch: each row's tokens at its own positions, step by step
            for t in range(n):
                self.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        return out.to(q.dtype)

    def _groups(self, groups: tuple[int, ...], device):
        """Index of these KV groups for k[:, groups]: a slice when they are all of them in order, else an
        index tensor made once per device (a Python list index is copied to the GPU on every use, and a
        pageable copy waits for the stream)."""
        if groups == tuple(range(len(self.layouts))):
            return slice(None)
        key = (groups, str(device))
        if key not in self._heads_cache:
            self._heads_cache[key] = torch.tensor(groups, dtype=torch.long, device=device)
        return self._heads_cache[key]

    def _quant_heads(self, r: int, device) -> torch.Tensor:
        """Query-head indices of the KVQuant groups, group-major (QuantKV's order); made once per (r, device)."""
        key = (r, str(device))
        if key not in self._heads_cache:
            self._heads_cache[key] = torch.tensor([gi * r + i for gi in self._quant for i in range(r)], device=device)
        return self._heads_cache[key]

    # ------------------------------------------------------------------ Linear groups
    def _linear_append(self, k: torch.Tensor, v: torch.Tensor, keep=None) -> None:
        """Linear groups' new tokens (k/v [B, nl, n, D]); keep: a padded prompt's flags (each row's state then
        takes its real tokens only)."""
        if self.linear is None:               # no read yet: the states need the scale the model attends with
            if self._linear_pending is not None:
                pending_keep = self._linear_pending[2]
                if pending_keep is not None or keep is not None:
                    old = torch.ones(k.shape[0], self._linear_pending[0].shape[2], dtype=torch.bool) \
                        if pending_keep is None else pending_keep
                    keep = torch.cat([old, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
                                      if keep is None else keep], 1)
                k, v = (torch.cat([a, b], 2) for a, b in zip(self._linear_pending[:2], (k, v)))
            self._linear_pending = (k, v, keep)
            return
        for b, states in enumerate(self.linear):
            real = slice(None) if keep is None else keep[b].nonzero().squeeze(1).to(k.device)
            for j, st in enumerate(states):
                st.extend(k[b, j, real], v[b, j, real])

    def _linear_attend(self, q: torch.Tensor, scale: float, out: torch.Tensor, impl: str) -> None:
        """Write the Linear groups' heads of out [B, H, DV] from their states (q [B, H, D])."""
        from .linear import LinearState

        r = q.shape[1] // len(self.layouts)
        if self.linear is None:
            k, v, keep = self._linear_pending
            self.linear = [[LinearState(self.layouts[gi].form, k.shape[-1], v.shape[-1], scale, device=k.device,
                                        dtype=_compute_dtype(k.dtype), max_length=self.max_length, kv_dtype=k.dtype)
                            for gi in self._linear] for _ in range(k.shape[0])]
            self._linear_pending = None
            self._linear_append(k, v, keep)
        for b, states in enumerate(self.linear):
            for gi, st in zip(self._linear, states):
                out[b, gi * r:(gi + 1) * r] = st.attend(q[b, gi * r:(gi + 1) * r], impl=impl).to(out.dtype)

    def decode(self, q: torch.Tensor, scale: float, loaded, splits: int | None = None, loaded_quant=None,
               softcap: float = 0.0):
        """The same through the split-KV Triton kernel `loaded` (runtime.kernels.LoadedKernel of
        codegen.render_decode()), and for KVQuant groups `loaded_quant` (codegen.render_decode_quant()),
        which dequantizes in the kernel. Returns (out [B, H, DV], splits used by the first)."""
        length = self.length if self.lens is None else max(self.lens)      # a padded batch: its longest row
        longest = max(min(c, length) if pre else c for c, pre in zip(self._caps, self._prefix))
        out, used = loaded.launch(q, self.k, self.v, self.keep_flags(), self._off_t, self._cap_t, self._prefix_t,
                                  length, scale, longest, splits=splits, softcap=softcap)
        if self.quant is not None:
            if loaded_quant is None:
                raise KVCacheError("this cache has KVQuant groups: pass loaded_quant (codegen.render_decode_quant())")
            heads = self._quant_heads(q.shape[1] // len(self.layouts), q.device)
            out[:, heads] = self.quant.decode(q[:, heads].contiguous(), scale, loaded_quant,
                                              softcap=softcap)[0].to(out.dtype)
        if self._linear:
            _no_linear_softcap(softcap)
            self._linear_attend(q, scale, out, "triton")
        return out, used

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes held now (K, V and slot positions, and the KVQuant groups' buffers)."""
        if self.k is None:
            return 0
        quant = self.quant.nbytes() if self.quant is not None else 0
        linear = sum(st.nbytes() for states in self.linear or [] for st in states)
        if self._linear_pending is not None:
            linear += sum(t.numel() * t.element_size() for t in self._linear_pending[:2])
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos)) + quant + linear

    def kv_entries(self) -> int:
        """Key slots in use summed over groups, per sequence (what a per-group-exact cache must hold); a KVQuant
        group counts its bytes in float16 K+V entries (forms.kv_tokens)."""
        if self.pos is None:
            return 0
        quant = sum(kv_tokens(self.layouts[gi].form, self.length, head_dim=self.k.shape[-1])
                    for gi in self._quant + self._linear)
        return int((self.pos >= 0).sum(1).max()) + quant       # per sequence (a padded batch: its longest row)

    @staticmethod
    def predicted_entries(forms, length: int, max_length: int | None = None, head_dim: int = 64) -> int:
        """Key slots the forms need at `length` tokens (per batch entry, summed over groups; KVQuant
        groups in float16 K+V entry equivalents, as kv_entries)."""
        return sum(kv_tokens(f, length, head_dim=head_dim) if isinstance(f, (KVQuant, Linear))
                   else layout_for(f, max_length or length).capacity(length) for f in forms)



# ---------------------------------------------------------------------------- eviction policies
def _no_linear_softcap(softcap: float) -> None:
    if softcap:
        from .reference import LINEAR_SOFTCAP

        raise KVCacheError(LINEAR_SOFTCAP)


def policy_scores(form, q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256,
                  softcap: float = 0.0) -> torch.Tensor:
    """Per prompt key, the attention its policy ranks it by. q [r, P, D] (the group's heads), k [P, D].
    h2o: attention summed over every prompt query and head; a2sf: the same, query i weighted by
    alpha ** (P - 1 - i); snapkv: summed over the last `recent` queries, average-pooled over `pool`
    neighbouring keys. Over query chunks (memory O(chunk * P)); float32 (float64 inputs: float64)."""
    ct = _compute_dtype(q.dtype)
    p_len = k.shape[0]
    cols = torch.arange(p_len, device=k.device)
    first = max(0, p_len - form.recent) if form.policy == "snapkv" else 0
    score = torch.zeros(p_len, dtype=ct, device=k.device)
    for i0 in range(first, p_len, chunk):
        i1 = min(p_len, i0 + chunk)
        s = _capped(torch.einsum("rid,jd->rij", q[:, i0:i1].to(ct), k.to(ct)) * scale, softcap)
        rows = torch.arange(i0, i1, device=k.device)[:, None]
        a = torch.softmax(s.masked_fill(cols[None, :] > rows, float("-inf")), dim=-1)
        if form.policy == "a2sf":
            a = a * (form.alpha ** (p_len - 1 - rows.to(ct)))[None]
        score += a.sum((0, 1))
    if form.policy == "snapkv" and form.pool > 1:
        pooled = torch.nn.functional.avg_pool1d(score[None, None], form.pool, stride=1, padding=form.pool // 2,
                                                count_include_pad=False)[0, 0]
        score = pooled[:p_len]
    return score


def policy_keep(form, q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float = 0.0) -> list[int]:
    """Prompt positions a KVEvict form keeps (sorted): sink and recent ones always, the rest of its budget
    by policy_scores (streaming: the most recent ones)."""
    p_len = k.shape[0]
    kept = form.kept(p_len)
    if form.policy == "streaming":
        return list(range(min(form.sink, p_len))) + list(range(max(form.sink, p_len - (kept - form.sink)), p_len))
    protected = set(range(min(form.sink, p_len))) | set(range(max(0, p_len - form.recent), p_len))
    score = policy_scores(form, q, k, scale, softcap=softcap)
    eligible = torch.ones(p_len, dtype=torch.bool, device=k.device)
    eligible[list(protected)] = False
    rest = max(0, kept - len(protected))
    top = torch.topk(torch.where(eligible, score, torch.full_like(score, float("-inf"))), rest).indices.tolist() \
        if rest else []
    return sorted(protected | set(top))
