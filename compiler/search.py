"""Choose one form per KV head group under a budget, from a profile (mixture-of-attention search).

For every group g and candidate form c, at every profiled length L, the predicted loss is, by `metric`:
    "fisher" (default when the profile has it): for sink + window forms, sum over tokens of
                     (dL/dO_i . dO_i)^2 per token, with dO_i the exact output change of the windowed row
                     (runtime.profiling window_sq: an empirical-Fisher estimate of the loss increase that
                     does not let dropped entries of opposite sign cancel, nor single entries add up as
                     if each were dropped alone); interpolated in log(span) between measured spans;
    "first_order":   the same with |dL/dO_i . dO_i| (window_abs);
    "output":        the same with |dO_i|^2 (window_out), blind to what the loss needs;
                     for forms without a measurement (block-sparse) the three take the influence loss
                     (below) rescaled per group and length to agree with the measured window forms;
    "influence":     sum over blocks of influence_L[g] (normalized to sum 1 per site-group and length)
                     times the fraction of that block's causal pairs the form drops   (MoA's first-order loss)
and kept[g, c, L] = causal (i, j) pairs the form keeps (exact, attnforge.runtime.forms.kept_pairs).
Then, with binary x[g, c]:
    minimize   sum_{g, c, L} x[g, c] * loss[g, c, L]
    subject to sum_c x[g, c] = 1                                      (one form per group)
               sum_{g, c} x[g, c] * kept[g, c, L] <= density * groups * causal_pairs(L)   for every L
               optionally, at most `max_forms_per_layer` distinct forms within a site
solved exactly by scipy.optimize.milp (HiGHS). `pareto` solves it over a grid of densities.

Candidates per group: Dense; SinkWindow(64, w); ElasticWindow(64, alpha, beta) on MoA's grid; and
BlockSparse layouts grown greedily from the group's own averaged influence (sinks as vertical key blocks,
locality as slashes) at several sizes. Any Form can be added: the search only needs its keep mask.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from attnforge.runtime.forms import (BlockSparse, Dense, ElasticWindow, SinkWindow, causal_pairs, keep_mask, kept_pairs,
                                     kv_tokens)
from attnforge.runtime.profiling import SINK

from .costs import plan_cost
from .plan import Plan, SitePlan
from .profile import Profile

__all__ = ["Budget", "search", "pareto", "streaming_baseline", "candidate_forms", "tables_for", "SearchError"]

WINDOW_STATS = {"fisher": "window_sq", "first_order": "window_abs", "output": "window_out"}
EVICT_STATS = {"fisher": "evict_sq", "first_order": "evict_abs", "output": "evict_out"}
QUANT_STATS = {"fisher": "quant_sq", "first_order": "quant_abs", "output": "quant_out"}
LINEAR_STATS = {"fisher": "linear_sq", "first_order": "linear_abs", "output": "linear_out"}
METRICS = ("auto", *WINDOW_STATS, "influence")
WINDOWS = (64, 128, 256, 512, 1024, 2048)
ALPHAS = (0, 64, 128, 256, 512)
BETAS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
BLOCK_TARGETS = (0.1, 0.2, 0.3, 0.45, 0.6)


class SearchError(ValueError):
    pass


BUDGET_KINDS = ("density", "kv", "flops")
RECALL_SLACK = 0.01        # search(): predicted-loss tolerance within which retrieval attention is maximized


@dataclass(frozen=True, slots=True)
class Budget:
    """A fraction of dense attention's cost that the plan may spend. kind:
        "density"  causal (query, key) pairs kept, over all KV groups
        "kv"       KV entries the newest query reads (forms.kv_tokens): the decode-time KV cache
        "flops"    prefill attention FLOPs (4 * head_dim per kept pair and query head; equals density
                   when every site has the same heads and head dim)
    lengths: the profiled lengths at which it must hold (None: every profiled length, as MoA; e.g.
    (4096,) to spend the budget where the model will run). The loss is always summed over every
    profiled length."""
    density: float
    lengths: tuple[int, ...] | None = None
    kind: str = "density"

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise SearchError(f"the budget fraction must be in (0, 1], got {self.density}")
        if self.kind not in BUDGET_KINDS:
            raise SearchError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if self.lengths is not None:
            object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))


# ------------------------------------------------------------------------------------- geometry
@functools.lru_cache(maxsize=4096)
def _keep_frac(form, n: int, block: int) -> np.ndarray:
    """[nb, nb]: fraction of each block's causal pairs that `form` keeps at length n."""
    nb = -(-n // block)
    if isinstance(form, BlockSparse) and form.block == block:
        qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
        kept = np.isin(kb, form.verticals) | np.isin(qb - kb, form.slashes)
        return (kept & (kb <= qb)).astype(np.float64)
    keep = keep_mask([form], n, n)[0].numpy()
    pad = nb * block - n
    keep = np.pad(keep, ((0, pad), (0, pad)))
    causal = np.pad(np.tri(n, dtype=bool), ((0, pad), (0, pad)))
    k = keep.reshape(nb, block, nb, block).sum((1, 3))
    c = causal.reshape(nb, block, nb, block).sum((1, 3))
    return np.divide(k, c, out=np.zeros_like(k, dtype=np.float64), where=c > 0)


def _grow_block_sparse(score: np.ndarray, block: int, targets) -> list[BlockSparse]:
    """Greedy layouts: add the vertical (key block) or slash (block diagonal) with the most influence per
    newly kept block, recording a layout each time the kept block fraction passes a target."""
    nb = score.shape[0]
    causal = np.tri(nb, dtype=bool)
    kept = np.eye(nb, dtype=bool)                          # slash 0 is always kept
    verts, slashes, out = set(), {0}, []
    total = causal.sum()
    qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
    diag = qb - kb
    on_diag = np.where(diag >= 0, diag, nb).ravel()         # below-diagonal blocks fall into bin nb
    for target in sorted(targets):
        while kept.sum() / total < target:
            free = causal & ~kept
            free_score = score * free
            gain_v = free_score.sum(0)                     # per key block (vertical)
            cost_v = free.sum(0)
            gain_s = np.bincount(on_diag, weights=free_score.ravel(), minlength=nb + 1)[:nb]   # per diagonal
            cost_s = np.bincount(on_diag, weights=free.ravel(), minlength=nb + 1)[:nb]
            rv = np.where(cost_v > 0, gain_v / np.maximum(cost_v, 1), -1)
            rs = np.where(cost_s > 0, gain_s / np.maximum(cost_s, 1), -1)
            if max(rv.max(), rs.max()) < 0:
                break
            if rv.max() >= rs.max():
                v = int(rv.argmax())
                verts.add(v)
                kept[:, v] |= causal[:, v]
            else:
                d = int(rs.argmax())
                slashes.add(d)
                kept |= (diag == d) & causal
        out.append(BlockSparse(block, tuple(verts), tuple(slashes)))
    return list(dict.fromkeys(out))


def candidate_forms(group_score: np.ndarray | None, block: int) -> list:
    forms = [Dense()] + [SinkWindow(SINK, w) for w in WINDOWS]
    forms += [ElasticWindow(SINK, a, b) for a in ALPHAS for b in BETAS]
    if group_score is not None:
        forms += _grow_block_sparse(group_score, block, BLOCK_TARGETS)
    return forms


# ----------------------------------------------------------------------------------------- tables
@dataclass
class _Tables:
    groups: list[tuple[int, int]]          # (site index, group index)
    cands: list[list]                      # per group: forms
    loss: list[np.ndarray]                 # per group: [C, L]
    kept: list[np.ndarray]                 # per group: [C, L]
    lengths: list[int]
    metric: str = "influence"
    kv: list[np.ndarray] = field(default_factory=list)       # per group: [C, L] kv_tokens
    flops: list[float] = field(default_factory=list)         # per group: FLOPs per kept pair
    recall: list[np.ndarray] = field(default_factory=list)   # per group: [C, L] retrieval mass kept (0: not profiled)
    recall_total: np.ndarray | None = None                   # [L] retrieval mass of all-dense

    def cost(self, kind: str, li: int) -> tuple[np.ndarray, float]:
        """(cost of every candidate of every group at length index li, the same for all-dense)."""
        n = self.lengths[li]
        if kind == "density":
            return np.concatenate([k[:, li] for k in self.kept]), len(self.groups) * causal_pairs(n)
        if kind == "kv":
            return np.concatenate([k[:, li] for k in self.kv]), len(self.groups) * n
        return (np.concatenate([k[:, li] * w for k, w in zip(self.kept, self.flops)]),
                sum(self.flops) * causal_pairs(n))


def _window_loss(curve: np.ndarray, spans: np.ndarray, sink: int, form, n: int) -> float | None:
    """Measured loss of a sink + window form at length n from a group's curve over `spans` (None: the
    form is not a sink + window form with the profile's sink)."""
    w = form.window_at(n)
    if isinstance(form, Dense):
        return 0.0
    if w is None or form.sink != sink:
        return None
    if w >= n - sink:
        return 0.0                                     # nothing is dropped at this length
    return float(np.interp(np.log(w), np.log(spans), curve))


def _resolve_metric(profile: Profile, metric: str) -> str:
    if metric not in METRICS:
        raise SearchError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    measured = all(profile.window_error(s["id"], n) is not None for s in profile.sites if _plannable(s)
                   for n in profile.lengths)
    if metric == "auto":
        return "fisher" if measured else "influence"
    if metric != "influence" and not measured:
        raise SearchError("this profile has no window measurements (made by an older attnforge); profile "
                          "again, or search with metric='influence'")
    return metric


def _plannable(site: dict) -> bool:
    return bool(site["causal"]) and site.get("mask") in ("causal", None)   # plain causal attention only


def _tables(profile: Profile, metric: str = "auto", linear: bool = True, dynamic: bool = False) -> _Tables:
    lengths = profile.lengths
    if not lengths:
        raise SearchError("the profile holds no samples; run the profile step first")
    metric = _resolve_metric(profile, metric)
    block, nb_max = profile.block, -(-max(lengths) // profile.block)
    spans = np.asarray(profile.spans, dtype=np.float64)
    groups, cands, losses, kepts, kvs, flops, recalls = [], [], [], [], [], [], []
    for si, site in enumerate(profile.sites):
        if not _plannable(site):
            continue
        infl = {n: profile.influence(site["id"], n) for n in lengths}
        curves = ({n: profile.window_error(site["id"], n, WINDOW_STATS[metric]) for n in lengths}
                  if metric != "influence" else None)
        for g in range(site["num_kv_heads"]):
            norm = {n: infl[n][g] / max(infl[n][g].sum(), 1e-30) for n in lengths}
            score = np.zeros((nb_max, nb_max))
            for n in lengths:
                m = norm[n]
                score[: m.shape[0], : m.shape[1]] += m
            forms = candidate_forms(score, block)
            loss = np.array([[float((norm[n] * (1 - _keep_frac(f, n, block))).sum()) for n in lengths]
                             for f in forms])
            if dynamic:
                forms, loss = _with_dynamic(profile, site["id"], g, lengths, forms, loss)
            if curves is not None:
                loss = _measured_loss(forms, loss, {n: curves[n][g] for n in lengths}, spans, profile.sink,
                                      lengths)
            if metric != "influence":
                forms, loss = _with_evict(profile, site["id"], g, lengths, metric, forms, loss)
                forms, loss = _with_quant(profile, site["id"], g, lengths, metric, forms, loss)
                if linear:
                    forms, loss = _with_linear(profile, site["id"], g, lengths, metric, forms, loss)
            kept = np.array([[kept_pairs(f, n, site["head_dim"]) for n in lengths] for f in forms], dtype=np.float64)
            groups.append((si, g))
            cands.append(forms)
            losses.append(loss)
            kepts.append(kept)
            kvs.append(np.array([[kv_tokens(f, n, head_dim=site["head_dim"]) for n in lengths] for f in forms],
                                dtype=np.float64))
            flops.append(4.0 * site["head_dim"] * (site["num_heads"] // site["num_kv_heads"]))
            recalls.append(_recall_kept(profile, site["id"], g, forms, lengths))
    if not groups:
        raise SearchError("no causal attention site in the profile to plan")
    total = np.sum([r[0] for r in recalls], axis=0)     # Dense is candidate 0 of every group
    return _Tables(groups, cands, losses, kepts, lengths, metric, kvs, flops, recalls, total)


def _recall_kept(profile: Profile, site: str, g: int, forms: list, lengths) -> np.ndarray:
    """[C, L]: the retrieval attention mass (Profile.recall_mass: copied rows onto their source, on the
    recall windows) each candidate keeps, block by block through the same keep fractions as the influence
    loss; 0 where the profile has none. A linear hybrid counts its exact sink + window only (the rest it
    weighs approximately); a KV-evicting form none (which far keys survive decoding depends on the prompt,
    and counting its dense prefill would credit it with what the decoding steps lose)."""
    from attnforge.runtime.forms import KVEvict, Linear, VerticalSlash

    out = np.zeros((len(forms), len(lengths)))
    for li, n in enumerate(lengths):
        r = profile.recall_mass(site, n)
        if r is None or not r[g].any():
            continue
        for ci, f in enumerate(forms):
            if isinstance(f, (KVEvict, VerticalSlash)):   # which blocks it keeps depends on the input
                continue
            f = SinkWindow(f.sink, f.window) if isinstance(f, Linear) else f
            out[ci, li] = float((r[g] * _keep_frac(f, n, profile.block)).sum())
    return out


def _with_dynamic(profile: Profile, site: str, g: int, lengths, forms: list, loss: np.ndarray):
    """Append the VerticalSlash candidates with the influence their resolutions dropped on the samples, as a
    fraction of the group's influence (what a static form's influence loss is), when the profile measured them
    at every length; the measured metrics rescale them as they do every influence loss (_measured_loss)."""
    from attnforge.runtime.forms import VerticalSlash
    from attnforge.runtime.profiling import VS_CANDIDATES

    stats = [profile.stats.get((site, n), {}) for n in lengths]
    if not all("vs_dropped" in st for st in stats):
        return forms, loss
    rows = [[float(st["vs_dropped"][g, ci] / max(st["influence"][g].sum(), 1e-30)) for st in stats]
            for ci in range(len(VS_CANDIDATES))]
    extra = [VerticalSlash(nv, ns, block=profile.block) for nv, ns in VS_CANDIDATES]
    return forms + extra, np.concatenate([loss, np.array(rows)])


def _with_quant(profile: Profile, site: str, g: int, lengths, metric: str, forms: list, loss: np.ndarray):
    """Append the KVQuant candidates (dense prefill, KIVI codes while decoding) with their measured
    losses, when the profile measured them at every length."""
    from attnforge.runtime.profiling import QUANT_BITS, quant_form

    errs = {n: profile.quant_error(site, n, QUANT_STATS[metric]) for n in lengths}
    if any(e is None for e in errs.values()):
        return forms, loss
    rows = [[float(errs[n][g, bi]) for n in lengths] for bi in range(len(QUANT_BITS))]
    return forms + [quant_form(b) for b in QUANT_BITS], np.concatenate([loss, np.array(rows)])


def _with_evict(profile: Profile, site: str, g: int, lengths, metric: str, forms: list, loss: np.ndarray):
    """Append the KV-evicting candidates (dense prefill, a policy's budget of the prompt's keys while
    decoding) with their measured losses, when the profile measured them at every length."""
    from attnforge.runtime.profiling import EVICT_BUDGETS, EVICT_POLICIES, evict_form

    errs = {n: profile.evict_error(site, n, EVICT_STATS[metric]) for n in lengths}
    if any(e is None for e in errs.values()):
        return forms, loss
    extra, rows = [], []
    for pi, pol in enumerate(EVICT_POLICIES):
        for bi, b in enumerate(EVICT_BUDGETS):
            extra.append(evict_form(pol, b))
            rows.append([float(errs[n][g, pi, bi]) for n in lengths])
    return forms + extra, np.concatenate([loss, np.array(rows)])


def _with_linear(profile: Profile, site: str, g: int, lengths, metric: str, forms: list, loss: np.ndarray):
    """Append the linear hybrids (runtime.linear) with their measured losses, when the profile measured
    them at every length; hedgehog candidates carry the group's distilled maps (registered here)."""
    from attnforge.runtime.linear import register_maps
    from attnforge.runtime.profiling import linear_form

    errs = {n: profile.linear_error(site, n, LINEAR_STATS[metric]) for n in lengths}
    if any(e is None for e in errs.values()):
        return forms, loss
    extra, rows = [], []
    for ci, (fm, w) in enumerate(profile.linear_candidates):
        key = ""
        if fm == "hedgehog":
            key = register_maps(profile.linear_maps[site][w][g])[0]
        extra.append(linear_form(fm, w, key))
        rows.append([float(errs[n][g, ci]) for n in lengths])
    return forms + extra, np.concatenate([loss, np.array(rows)])


def _measured_loss(forms, influence_loss: np.ndarray, curves: dict, spans, sink: int, lengths) -> np.ndarray:
    """[C, L] measured losses; forms without a measurement get their influence loss times the ratio of
    measured to influence loss over the group's window forms at that length."""
    out = np.full(influence_loss.shape, np.nan)
    for ci, f in enumerate(forms):
        for li, n in enumerate(lengths):
            v = _window_loss(curves[n], spans, sink, f, n)
            if v is not None:
                out[ci, li] = v
    known = ~np.isnan(out)
    for li in range(len(lengths)):
        ref = influence_loss[known[:, li], li].sum()
        ratio = out[known[:, li], li].sum() / ref if ref > 0 else 0.0
        out[~known[:, li], li] = influence_loss[~known[:, li], li] * ratio
    return out


def _solve(t: _Tables, density: float, max_forms_per_layer: int | None, time_limit: float, at=None,
           kind: str = "density", recall: float | None = None, slack: float = 0.0):
    """(choice per group, the MILP result) of the least predicted loss under the budget (and recall floor).
    slack > 0 and a profile with retrieval mass: a second MILP then keeps the most retrieval attention
    (summed over lengths, each as a fraction of dense) among plans within (1 + slack) of that least loss."""
    sizes = [len(c) for c in t.cands]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    nx = int(offs[-1])
    c = np.concatenate([l.sum(1) for l in t.loss])
    # a tiny preference for fewer kept pairs breaks ties between forms of equal predicted loss
    kept_rel = np.concatenate([k[:, -1] / causal_pairs(t.lengths[-1]) for k in t.kept])
    c = c + 1e-9 * kept_rel
    rows, lb, ub = [], [], []
    for gi in range(len(t.groups)):
        r = np.zeros(nx)
        r[offs[gi]:offs[gi + 1]] = 1
        rows.append(r), lb.append(1), ub.append(1)
    for li, n in enumerate(t.lengths):
        if at is not None and n not in at:
            continue
        cost, full = t.cost(kind, li)
        rows.append(cost)
        lb.append(-np.inf), ub.append(density * full)
    if recall:                 # keep at least `recall` of the retrieval mass, at every length that measured it
        for li in range(len(t.lengths)):
            if t.recall_total is not None and t.recall_total[li] > 0:
                rows.append(np.concatenate([r[:, li] for r in t.recall]))
                lb.append(recall * t.recall_total[li]), ub.append(np.inf)
    integrality = np.ones(nx)
    n_vars = nx
    if max_forms_per_layer:
        # y[site, form] >= x[g, c] for every group of the site choosing that form; sum_f y <= cap
        ys = {}
        links = []
        for gi, (si, _g) in enumerate(t.groups):
            for ci, f in enumerate(t.cands[gi]):
                key = (si, f)
                if key not in ys:
                    ys[key] = n_vars + len(ys)
                links.append((offs[gi] + ci, ys[key]))
        n_vars = nx + len(ys)
        c = np.concatenate([c, np.zeros(len(ys))])
        integrality = np.ones(n_vars)
        rows = [np.concatenate([r, np.zeros(len(ys))]) for r in rows]
        for xi, yi in links:
            r = np.zeros(n_vars)
            r[xi], r[yi] = 1, -1
            rows.append(r), lb.append(-np.inf), ub.append(0)
        for si in {si for si, _ in t.groups}:
            r = np.zeros(n_vars)
            for (s2, _f), yi in ys.items():
                if s2 == si:
                    r[yi] = 1
            rows.append(r), lb.append(-np.inf), ub.append(max_forms_per_layer)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lb, ub), integrality=integrality,
               bounds=Bounds(0, 1), options={"time_limit": time_limit})
    if res.x is None:
        also = f" while keeping {recall:.0%} of the retrieval attention" if recall else ""
        raise SearchError(f"no plan meets the {kind} budget {density}{also}: even the sparsest candidates cost "
                          f"more ({res.message}); raise the budget{' or lower the recall floor' if recall else ''}")
    if slack > 0 and t.recall_total is not None and t.recall_total.any():
        keep = np.concatenate([(r[:, t.recall_total > 0] / t.recall_total[t.recall_total > 0]).sum(1) for r in t.recall])
        keep = np.concatenate([keep, np.zeros(n_vars - nx)])
        rows.append(c), lb.append(-np.inf), ub.append(res.fun + slack * abs(res.fun) + 1e-12)
        second = milp(-keep + 1e-9 * c, constraints=LinearConstraint(np.array(rows), lb, ub), integrality=integrality,
                      bounds=Bounds(0, 1), options={"time_limit": time_limit})
        if second.x is not None:            # (the least-loss plan is feasible for it, so this always holds)
            res = second
    x = res.x[:nx]
    choice = [int(np.argmax(x[offs[gi]:offs[gi + 1]])) for gi in range(len(t.groups))]
    return choice, res


def search(profile: Profile, budget: Budget, *, max_forms_per_layer: int | None = None,
           time_limit: float = 60.0, tables: _Tables | None = None, metric: str = "auto",
           linear: bool = True, recall: float | None = None, recall_slack: float = RECALL_SLACK,
           dynamic: bool = False) -> Plan:
    """The plan minimizing total predicted loss under `budget` at every profiled length.
    `tables` (from `tables_for(profile, metric)`) can be shared between several searches of one profile.
    linear=False leaves out the linear hybrids even where the profile measured them; dynamic=True also
    offers the VerticalSlash forms the profile measured (inference only: such a plan neither trains, nor
    runs padded batches, nor exports to ONNX).
    recall: keep at least this fraction of the retrieval attention the profile measured on its recall
    windows (Profile.recall_mass), at every length that has some; None: no such floor.
    recall_slack: among plans whose predicted loss is within (1 + recall_slack) of the least, take the one
    keeping the most retrieval attention (a second MILP; 0: the least-loss plan). The predicted loss comes
    from a few calibration windows and is not known to 1%, so plans that close are ties by its measure;
    the tie is broken toward the heads that copy from far back, which perplexity on plain text rarely
    needs and passkey-style retrieval does."""
    if recall is not None and not 0 <= recall <= 1:
        raise SearchError(f"the recall floor is a fraction in [0, 1], got {recall}")
    t0 = time.perf_counter()
    t = tables or _tables(profile, metric, linear, dynamic)
    if budget.lengths is not None and not set(budget.lengths) <= set(t.lengths):
        raise SearchError(f"budget lengths {list(budget.lengths)} are not all profiled ({t.lengths})")
    t1 = time.perf_counter()
    if recall and (t.recall_total is None or not t.recall_total.any()):
        raise SearchError("a recall floor needs a profile with recall windows (attnforge profile "
                          "--recall-samples N, N >= 1, with this version); profile again or drop the floor")
    choice, res = _solve(t, budget.density, max_forms_per_layer, time_limit, budget.lengths, budget.kind, recall,
                         recall_slack)
    t2 = time.perf_counter()
    per_site: dict[int, dict[int, object]] = {}
    for gi, (si, g) in enumerate(t.groups):
        per_site.setdefault(si, {})[g] = t.cands[gi][choice[gi]]
    sites = []
    for si, site in enumerate(profile.sites):
        chosen = per_site.get(si, {})
        forms = tuple(chosen.get(g, Dense()) for g in range(site["num_kv_heads"]))
        sites.append(SitePlan(site["id"], site["num_heads"], site["num_kv_heads"], forms))
    loss = {str(n): float(sum(t.loss[gi][choice[gi], li] for gi in range(len(t.groups))))
            for li, n in enumerate(t.lengths)}
    plan = Plan(fingerprint=profile.fingerprint, model=profile.model, sites=tuple(sites),
                budget={"density" if budget.kind == "density" else budget.kind: budget.density,
                        **({"at_lengths": list(budget.lengths)} if budget.lengths else {}),
                        **({"max_forms_per_layer": max_forms_per_layer} if max_forms_per_layer else {}),
                        **({"recall": recall} if recall else {})},
                lengths=tuple(t.lengths))
    density = {str(n): plan.density(n) for n in t.lengths}
    kv = {str(n): float(sum(t.kv[gi][choice[gi], li] for gi in range(len(t.groups))) / (len(t.groups) * n))
          for li, n in enumerate(t.lengths)}
    cost = {str(n): {"plan": plan_cost(profile.sites, [sp.forms for sp in plan.sites], n),
                     "dense": plan_cost(profile.sites, None, n)} for n in t.lengths}
    retrieval = ({str(n): float(sum(t.recall[gi][choice[gi], li] for gi in range(len(t.groups))) / t.recall_total[li])
                  for li, n in enumerate(t.lengths) if t.recall_total[li] > 0}
                 if t.recall_total is not None else {})
    predicted = {"loss": loss, "metric": t.metric, "density": density, "kv_fraction": kv,
                 **({"retrieval_kept": retrieval} if retrieval else {}),
                 "attention_flops": {n: c["plan"]["flops"] for n, c in cost.items()},
                 "dense_attention_flops": {n: c["dense"]["flops"] for n, c in cost.items()},
                 "cost_model": "analytic: 4 * head_dim FLOPs per kept (query, key) pair and query head",
                 "cost": cost,
                 "groups": len(t.groups), "candidates": int(sum(len(c) for c in t.cands)),
                 "solver": {"status": int(res.status), "seconds": round(t2 - t1, 3), "recall_slack": recall_slack,
                            "tables_seconds": round(t1 - t0, 3)}}
    return Plan(plan.fingerprint, plan.model, plan.sites, plan.budget, plan.lengths, predicted)


def tables_for(profile: Profile, metric: str = "auto", linear: bool = True, dynamic: bool = False) -> _Tables:
    """Candidates and their predicted loss / kept pairs for every group (the costly part of a search)."""
    return _tables(profile, metric, linear, dynamic)


def pareto(profile: Profile, densities=(0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0),
           time_limit: float = 30.0, tables: _Tables | None = None, at=None,
           recall: float | None = None) -> list[dict]:
    """Predicted loss of the best plan at each density (the Pareto front the search sees), the density
    held at the lengths `at` (None: every profiled length), as `Budget.lengths`, under the same recall
    floor as `search` (densities where it cannot hold are left out)."""
    t = tables or _tables(profile)
    front = []
    for d in densities:
        try:
            choice, _ = _solve(t, d, None, time_limit, at, recall=recall)
        except SearchError:
            continue
        loss = float(sum(t.loss[gi][choice[gi]].sum() for gi in range(len(t.groups))))
        front.append({"density": d, "predicted_loss": loss})
    return front


def _window_for_density(n: int, density: float, sink: int = SINK) -> int:
    lo, hi = 1, n
    while lo < hi:                       # the largest window whose sink+window density stays <= target
        mid = (lo + hi + 1) // 2
        if kept_pairs(SinkWindow(sink, mid), n) <= density * causal_pairs(n):
            lo = mid
        else:
            hi = mid - 1
    return lo


def streaming_baseline(profile: Profile, density: float, n: int) -> Plan:
    """The uniform StreamingLLM plan: every causal group SinkWindow(64, w), w giving `density` at length n."""
    w = _window_for_density(n, density)
    sites = []
    for site in profile.sites:
        form = SinkWindow(SINK, w) if _plannable(site) else Dense()
        sites.append(SitePlan(site["id"], site["num_heads"], site["num_kv_heads"], (form,) * site["num_kv_heads"]))
    plan = Plan(profile.fingerprint, profile.model, tuple(sites), {"density": density, "baseline": "streaming"},
                (n,))
    return Plan(plan.fingerprint, plan.model, plan.sites, plan.budget, plan.lengths,
                {"density": {str(n): plan.density(n)}, "window": w})
