"""Block metadata for the per-head plan kernel, computed from the forms (never from an N x S mask).

For one site's forms (one per KV group), a query length N and key length S (queries at the last N
positions for the forms; the op's causal rule j <= i on top), and BLOCK_M x BLOCK_N tiles:

    count[g, qb]     key blocks query block qb of group g visits
    full[g, qb]      how many of them are whole: every valid query row of the block keeps every key of
                     the tile (no causal diagonal, window edge or sink edge inside, no key past S), so the
                     kernel runs them without any element mask
    index[g, qb, t]  those blocks: the whole ones first, then the edge ones, each part ascending (padded
                     with 0 past count)
    sink[g], window[g]  the element-level window rule inside edge blocks (window 0: none)
    bits[g, qb, t]   which FINE x FINE sub-blocks of that tile the forms keep (bit i * BLOCK_N/FINE + j for
                     sub-block (i, j)): a tile larger than FINE = 64, the block of the block-sparse forms,
                     holds up to (BLOCK_M/FINE) x (BLOCK_N/FINE) of them, and a block-sparse group may keep
                     some and drop others; the kernel masks the dropped ones on edge tiles
    schedule[w]      (query block, query head) of each program, heaviest (largest count) first
    count_t, full_t, index_t  the transpose, per (KV group, key block): the query blocks that visit it,
                     whole ones first (backward; FINE tiles only)

Tiles that are multiples of FINE are built from the FINE flags (a tile is visited if any sub-block is, whole
if every sub-block is), so a 128 x 64 or 128 x 128 forward tile keeps the block-sparse forms' 64-granular
layout exactly; other tiles (smaller, or not multiples) are flagged directly at their own size.

Work is O(G * N/BLOCK_M * S/BLOCK_N) block flags, built with a few tensor ops on the target device
(one broadcast expression for all window-like groups, no sort; the transpose only when a backward asks)
and cached per (forms, N, S, device); `block_reason` says when a form cannot be tiled exactly (a block-sparse
layout whose block is not the tile, or query blocks not aligned with its blocks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .forms import BlockSparse, Dense, ElasticWindow, Linear, SinkWindow, forms_from_json, prefill_form

__all__ = ["FINE", "BlockMeta", "block_meta", "block_reason", "fine_tile"]

FINE = 64        # the block of the block-sparse forms (codegen.render.PLAN_BLOCK): sub-blocks of larger tiles


@dataclass(frozen=True)
class BlockMeta:
    count: torch.Tensor       # [G, nbq] int32
    full: torch.Tensor        # [G, nbq] int32: the first `full` entries of each list are whole blocks
    index: torch.Tensor       # [G, nbq, maxk] int32, contiguous: whole blocks first, then edge blocks
    sink: torch.Tensor        # [G] int32
    window: torch.Tensor      # [G] int32
    schedule: torch.Tensor    # [G * group * nbq, 2] int32: (query block, query head), heaviest first
    block_m: int
    block_n: int
    visited_blocks: int       # sum of count, kept on the host (no device sync per launch)
    whole_blocks: int         # sum of full (the blocks run without an element mask), on the host too
    flags: torch.Tensor       # [G, nbq, nbk] bool: the block-level keep flags the lists come from
    whole: torch.Tensor       # [G, nbq, nbk] bool: the visited blocks that need no element mask
    bits: torch.Tensor | None  # [G, nbq, maxk] int32, aligned with index: the kept FINE sub-blocks of each tile
                               # (None where tiles are FINE x FINE: every visited tile is kept whole)
    sub: tuple[int, int]      # FINE sub-blocks per tile along queries and keys ((1, 1): the tile is its block)

    @property
    def sub_blocks(self) -> bool:
        """Whether tiles hold several FINE sub-blocks (the kernel then reads `bits` on edge tiles)."""
        return self.sub != (1, 1)

    @functools.cached_property
    def _transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sub_blocks:
            raise ValueError(f"the transposed lists (the backward's) are built on {FINE} x {FINE} tiles, not on "
                             f"{self.block_m} x {self.block_n} ones")
        return _lists(self.flags.transpose(1, 2), self.whole.transpose(1, 2))[:3]

    @property
    def count_t(self) -> torch.Tensor:
        """[G, nbk] int32: query blocks visiting each key block (built on first use: the backward's)."""
        return self._transposed[0]

    @property
    def full_t(self) -> torch.Tensor:
        """[G, nbk] int32: how many of them (listed first) see the whole key block."""
        return self._transposed[1]

    @property
    def index_t(self) -> torch.Tensor:
        """[G, nbk, maxq] int32, contiguous: those query blocks, whole ones first, each part ascending."""
        return self._transposed[2]


def fine_tile(block_m: int, block_n: int) -> tuple[int, int]:
    """The tile the flags are computed on: FINE x FINE where the kernel's tile is a multiple of it, else the
    kernel's own."""
    if block_m % FINE == 0 and block_n % FINE == 0:
        return FINE, FINE
    return block_m, block_n


def block_reason(forms, n: int, s: int, block_m: int, block_n: int) -> str | None:
    """None if the kernel can tile these forms exactly, else why not."""
    fm, fn = fine_tile(block_m, block_n)
    for f in forms:
        if isinstance(f, BlockSparse):
            if f.block != fm or f.block != fn:
                return (f"block_sparse block {f.block} is not the {fm}x{fn} sub-block of the kernel's "
                        f"{block_m}x{block_n} tiles")
            if (s - n) % f.block:
                return (f"block_sparse needs query blocks aligned with key blocks (S - N = {s - n} is not a "
                        f"multiple of {f.block})")
    return None


def _group_blocks(form, qb: torch.Tensor, kb: torch.Tensor, n: int, s: int, bm: int, bn: int) -> torch.Tensor:
    """[nbq, nbk] bool: key block kb holds at least one key some query of block qb keeps."""
    p0 = s - n + qb * bm                                        # first query position of the block
    last = torch.clamp((qb + 1) * bm, max=n) - 1               # last query index of the block
    p1 = s - n + last                                           # and its position
    k0, k1 = kb * bn, kb * bn + bn - 1
    causal = (k0 <= p1) & (k0 <= last)                          # the op's causal is top-left (j <= i)
    form = prefill_form(form)
    if isinstance(form, Dense):
        return causal
    if isinstance(form, Linear):                                # the tiles of its exact (softmax) part
        form = SinkWindow(form.sink, form.window)
    if isinstance(form, (SinkWindow, ElasticWindow)):
        # row i keeps window keys pos_i - w < j <= min(i, pos_i): a band of width w - max(0, S - N), so
        # over the block the union runs from pos(first row) - w + 1 up to the causal limit
        w = form.window_at(s)
        window_keys = (k1 > p0 - w) if w > max(0, s - n) else torch.zeros_like(causal)
        return causal & ((k0 < form.sink) | window_keys)
    fq = p0 // form.block                                       # aligned: the block's form query block
    vert = torch.zeros(kb.shape[-1], dtype=torch.bool, device=kb.device)
    vert[[v for v in form.verticals if v < vert.numel()]] = True
    diag = fq - kb
    slash = torch.zeros(int(max(form.slashes)) + 1, dtype=torch.bool, device=kb.device)
    slash[list(form.slashes)] = True
    in_slash = (diag >= 0) & (diag < slash.numel()) & slash[diag.clamp(0, slash.numel() - 1)]
    return causal & (vert[kb] | in_slash)


def _tile_grid(n: int, s: int, bm: int, bn: int, dev):
    """Broadcastable [nbq, 1] / [1, nbk] tensors of the tiling: query block, key block, the block's first and
    last valid query index, its first and last key."""
    qb = torch.arange(-(-n // bm), device=dev)[:, None]
    kb = torch.arange(-(-s // bn), device=dev)[None, :]
    return qb, kb, qb * bm, torch.clamp((qb + 1) * bm, max=n) - 1, kb * bn, kb * bn + bn - 1


def _flags(forms, n: int, s: int, bm: int, bn: int, dev) -> torch.Tensor:
    """[G, nbq, nbk] bool block flags of every group at once: the window forms (Dense, SinkWindow,
    ElasticWindow, a Linear's exact part, the KV forms' dense prefill) by one broadcast expression over
    per-group (dense, sink, window) vectors, BlockSparse groups one by one (`_group_blocks`, which is also
    the per-form definition the vectorized expression is tested against)."""
    qb, kb, first, last, k0, k1 = _tile_grid(n, s, bm, bn, dev)
    p0 = s - n + first                                          # first query position of each query block
    causal = (k0 <= s - n + last) & (k0 <= last)                # [nbq, nbk]
    prefill = [SinkWindow(f.sink, f.window) if isinstance(f, Linear) else f for f in map(prefill_form, forms)]
    dense = [isinstance(f, Dense) for f in prefill]
    windowed = [isinstance(f, (SinkWindow, ElasticWindow)) for f in prefill]
    w = [f.window_at(s) if wf else 0 for f, wf in zip(prefill, windowed)]
    params = torch.tensor([[d, f.sink if wf else 0, ww, wf and ww > max(0, s - n)]
                           for f, d, wf, ww in zip(prefill, dense, windowed, w)], dtype=torch.int64)
    d_, sink, win, band = (t.to(dev)[:, None, None] for t in params.unbind(1))
    flags = causal & ((d_ > 0) | (k0 < sink) | ((band > 0) & (k1 > p0 - win)))
    for g, f in enumerate(prefill):
        if isinstance(f, BlockSparse):
            flags[g] = _group_blocks(f, qb, kb, n, s, bm, bn)
    return flags


@functools.lru_cache(maxsize=256)
def _cached(forms_json: str, group: int, n: int, s: int, bm: int, bn: int, device: str,
            per_row: bool = False) -> BlockMeta:
    forms = forms_from_json(forms_json)
    dev = torch.device(device)
    fm, fn = fine_tile(bm, bn)
    flags = _flags(forms, n, s, fm, fn, dev)                                            # [G, nbq, nbk]
    sink = torch.tensor([getattr(f, "sink", 0) if f.window_at(s) is not None else 0 for f in forms],
                        dtype=torch.int32, device=dev)
    window = torch.tensor([f.window_at(s) or 0 for f in forms], dtype=torch.int32, device=dev)
    whole = flags & _whole(sink, window, n, s, fm, fn, dev)
    if per_row:
        # a padded batch: an elastic group's span differs per row (its own length), at most window_at(s); the
        # blocks it may visit are these, but which of them a shorter row keeps whole is not, so all are edges
        elastic = torch.tensor([isinstance(f, ElasticWindow) for f in forms], device=dev)
        whole &= ~elastic[:, None, None]
    sub = (bm // fm, bn // fn)
    flags, whole, bits = _coarsen(flags, whole, *sub)
    count, full, index, bits = _lists(flags, whole, bits)
    nbq = flags.shape[1]
    # one program per (query block, query head); heaviest first so long rows do not finish last, and
    # among equal work query-block-major, so the query heads of one KV group at one query block run side
    # by side and read the same K/V tiles while they are in L2
    g_of_head = torch.arange(len(forms) * group, device=dev) // group
    work = count[g_of_head].T                                                            # [nbq, H]
    qbs, heads = torch.meshgrid(torch.arange(nbq, device=dev), torch.arange(work.shape[1], device=dev),
                                indexing="ij")
    order = torch.argsort(work.flatten(), descending=True, stable=True)
    schedule = torch.stack([qbs.flatten()[order], heads.flatten()[order]], 1).to(torch.int32).contiguous()
    return BlockMeta(count, full, index, sink, window, schedule, bm, bn, int(count.sum()), int(full.sum()),
                     flags, whole, bits, sub)


def _coarsen(flags: torch.Tensor, whole: torch.Tensor, rm: int, rn: int):
    """FINE-tile flags and whole flags [G, fq, fk] -> those of tiles of rm x rn sub-blocks, and each tile's
    kept sub-blocks as bits [G, nbq, nbk] int32 (bit i * rn + j: sub-block (i, j)). A tile is visited if any
    sub-block is, whole if every one is; sub-blocks past the last key block are not kept (so their tile is an
    edge one, with column bounds), those past the last query block do not count (their rows are never
    stored)."""
    if (rm, rn) == (1, 1):
        return flags, whole, None
    g, fq, fk = flags.shape
    pad = (0, -fk % rn, 0, -fq % rm)
    f = torch.nn.functional.pad(flags, pad, value=False)
    w = torch.nn.functional.pad(torch.nn.functional.pad(whole, (0, -fk % rn), value=False), (0, 0, 0, -fq % rm),
                                value=True)
    f = f.view(g, f.shape[1] // rm, rm, f.shape[2] // rn, rn).permute(0, 1, 3, 2, 4)  # [G, nbq, nbk, rm, rn]
    w = w.view(g, w.shape[1] // rm, rm, w.shape[2] // rn, rn).permute(0, 1, 3, 2, 4)
    weights = (2 ** torch.arange(rm * rn, device=flags.device, dtype=torch.int32)).view(rm, rn)
    bits = (f.to(torch.int32) * weights).sum((-2, -1), dtype=torch.int32)
    coarse = f.any(-1).any(-1)
    return coarse, coarse & w.all(-1).all(-1), bits


def _whole(sink: torch.Tensor, window: torch.Tensor, n: int, s: int, bm: int, bn: int, dev) -> torch.Tensor:
    """[G, nbq, nbk] bool: every valid query row of block qb keeps every key of block kb under the kernel's
    element rule (keys j <= min(i, pos_i); j < sink or j > pos_i - window where window > 0), and the key
    block is complete (no key at or past S). Rows past N are never stored, so they do not count."""
    _, _, first, last, k0, k1 = _tile_grid(n, s, bm, bn, dev)
    causal = (k1 <= first) & (k1 <= s - n + first) & (k1 < s)   # [nbq, nbk]
    sink, window = (t.to(torch.int64)[:, None, None] for t in (sink, window))
    # the keys a row drops are [sink, pos - window], widest for the last row: whole if the block misses it
    gap_end = s - n + last - window
    return causal & ((window == 0) | (k1 < sink) | (k0 > gap_end) | (sink > gap_end))


def _lists(flags: torch.Tensor, first: torch.Tensor, values: torch.Tensor | None = None):
    """[G, R, C] flags and `first` (a subset of them) -> (count [G, R], nfirst [G, R], index [G, R, maxc],
    values [G, R, maxc] or None): the flagged columns of each row, those in `first` before the rest, each part
    ascending, padded with 0; `values` ([G, R, C] int32, optional) gathered into the same slots.
    No sort: a column in `first` goes to slot (first-columns before it), any other flagged one to slot
    nfirst + (other flagged columns before it). Slots in int16 where the columns allow (less memory traffic)."""
    cols = flags.shape[-1]
    dt = torch.int16 if cols < 2 ** 15 else torch.int32
    count = flags.sum(-1, dtype=torch.int32)
    nfirst = first.sum(-1, dtype=torch.int32)
    rest = flags & ~first
    maxc = max(1, int(count.max())) if count.numel() else 1
    slot_first = torch.cumsum(first, -1, dtype=dt).sub_(1)
    slot_rest = torch.cumsum(rest, -1, dtype=dt).add_((nfirst.to(dt) - 1)[..., None])
    slot = torch.where(first, slot_first, torch.where(rest, slot_rest, maxc)).to(torch.int64)
    ids = torch.arange(cols, device=flags.device, dtype=torch.int32).expand(flags.shape)
    index = torch.zeros(flags.shape[:-1] + (maxc + 1,), dtype=torch.int32, device=flags.device)
    index.scatter_(-1, slot, ids)                               # unflagged columns all land in the spare slot
    if values is not None:
        values = torch.zeros_like(index).scatter_(-1, slot, values.to(torch.int32))[..., :maxc].contiguous()
    return count, nfirst, index[..., :maxc].contiguous(), values


def block_meta(forms_json: str, group: int, n: int, s: int, block_m: int, block_n: int, device,
               per_row: bool = False) -> BlockMeta:
    """The metadata for one launch on block_m x block_n tiles (cached): forms as the op's JSON, `group` query
    heads per KV head. per_row: for a compacted padded batch whose rows take their own elastic spans
    (runtime.padding)."""
    return _cached(forms_json, group, n, s, block_m, block_n, str(torch.device(device)), per_row)
