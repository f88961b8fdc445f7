"""Profile a model's attention on calibration text: per site, per KV head group, at several lengths.

    prof = profile_model(model, {1024: [ids], 2048: [ids], 4096: [ids]}, model_name="smollm2", out="prof.npz")

Each sample runs forward and backward once through the profiling op (attnforge.runtime.profiling):
labels are the dense model's own predictions (MoA), so the loss measures how far a change moves the
model from itself. Per (site, length) the profile keeps, summed over samples, the block influence and
block attention mass [Hkv, nb, nb], the entropy per group, the number of query rows, and for causal sites
the measured error of sink + window forms at every span of `spans` [Hkv, len(spans)]. The file is an
.npz (arrays plus JSON metadata, no pickle) written after every sample; a run given the same `out`
resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnforge.runtime.profiling import (LINEAR_CANDIDATES, SINK, SPANS, ProfileCollector, capturing,
                                         collecting)

from .api import _first_tensor, find_attention
from .backend import Backend
from .capture import compile_traced
from .plan import fingerprint, resolve_site

__all__ = ["Profile", "profile_model", "ProfileError", "RecallWindow"]

PROFILE_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # version 1 lacks the window measurements, 2 the KV-eviction ones,
                                     # 3 the linear forms (4 has them when profiled with linear=True),
                                     # 4 the retrieval mass of recall windows


@dataclass(frozen=True)
class RecallWindow:
    """A calibration sample whose rows target .. target + length - 1 repeat the tokens at source ..
    source + length - 1 (compiler.evaluate.recall_windows): besides the usual statistics, the profile
    records how much attention those rows pay to the segment they copy (Profile.recall_mass)."""
    ids: torch.Tensor
    source: int
    target: int
    length: int

    def __post_init__(self):
        n = self.ids.shape[-1]
        if not (0 <= self.source and self.source + self.length <= self.target and self.target + self.length <= n):
            raise ProfileError(f"recall window: source {self.source} / target {self.target} / length "
                               f"{self.length} do not fit a copy that comes later in {n} tokens")


def _ids(sample) -> torch.Tensor:
    return sample.ids if isinstance(sample, RecallWindow) else sample


class ProfileError(ValueError):
    pass


@dataclass
class Profile:
    model: str
    fingerprint: str
    block: int
    sites: list[dict]                                   # id, num_heads, num_kv_heads, head_dim, causal
    samples: dict[int, int] = field(default_factory=dict)       # length -> samples done
    stats: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    spans: tuple[int, ...] = SPANS                      # window spans measured (sink `sink` + window w)
    sink: int = SINK
    # linear forms (profile_model(linear=True)): site -> {window: [FeatureMaps per KV group]} distilled
    # hedgehog maps, and site -> {window: {"before": [Hkv], "after": [Hkv]}} held-out relative output errors
    linear_maps: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    linear_candidates: tuple = ()

    @property
    def lengths(self) -> list[int]:
        return sorted(n for n, c in self.samples.items() if c)

    def influence(self, site: str, n: int) -> np.ndarray:
        """[Hkv, nb, nb] mean block influence per sample."""
        return self.stats[(site, n)]["influence"] / max(1, self.samples[n])

    def mass(self, site: str, n: int) -> np.ndarray:
        return self.stats[(site, n)]["mass"] / max(1, self.samples[n])

    def recall_mass(self, site: str, n: int) -> np.ndarray | None:
        """[Hkv, nb, nb] attention mass of the recall windows' copied rows onto the segment they copy
        (summed over samples and query heads; block tiles as `mass`): what a head spends on long-range
        retrieval. None where the profile has no recall window at this length."""
        st = self.stats.get((site, n), {})
        return st.get("recall_mass")

    def entropy(self, site: str, n: int) -> np.ndarray:
        st = self.stats[(site, n)]
        return st["entropy"] / st["rows"]

    def _per_token(self, site: str, n: int, stat: str) -> np.ndarray | None:
        """A measured statistic divided by the query tokens behind it (rows over the group's query heads)."""
        st = self.stats.get((site, n), {})
        if stat not in st:
            return None
        site_row = next(s for s in self.sites if s["id"] == site)
        tokens = st["rows"] / (site_row["num_heads"] // site_row["num_kv_heads"])
        return st[stat] / max(float(tokens), 1.0)

    def window_error(self, site: str, n: int, stat: str = "window_abs") -> np.ndarray | None:
        """[Hkv, len(spans)]: a measured window statistic (runtime.profiling) per query token, summed over
        the query heads of each group; None where the profile did not measure it."""
        return self._per_token(site, n, stat)

    def evict_error(self, site: str, n: int, stat: str = "evict_abs") -> np.ndarray | None:
        """[Hkv, len(EVICT_POLICIES), len(EVICT_BUDGETS)]: a measured KV-eviction statistic per query token
        (runtime.profiling), like window_error; None where the profile did not measure it."""
        return self._per_token(site, n, stat)

    def quant_error(self, site: str, n: int, stat: str = "quant_abs") -> np.ndarray | None:
        """[Hkv, len(QUANT_BITS)]: a measured KV-quantization statistic per query token (runtime.profiling,
        the decode rows as evict_error); None where the profile did not measure it."""
        return self._per_token(site, n, stat)

    def linear_error(self, site: str, n: int, stat: str = "linear_abs") -> np.ndarray | None:
        """[Hkv, len(linear_candidates)]: a measured linear-hybrid statistic per query token, like
        window_error; None where the profile did not measure it."""
        return self._per_token(site, n, stat) if self.linear_candidates else None

    def save(self, path) -> None:
        path = Path(path)
        meta = {"version": PROFILE_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "block": self.block, "sites": self.sites, "samples": {str(k): v for k, v in self.samples.items()},
                "spans": list(self.spans), "sink": self.sink,
                "linear": {"candidates": [list(c) for c in self.linear_candidates],
                           "distill": {sid: {str(w): {k: [float(x) for x in v] for k, v in e.items() if k in ("before", "after")}
                                             for w, e in per.items()} for sid, per in self.distill.items()}}}
        arrays = {"meta": np.array(json.dumps(meta))}
        index = {s["id"]: i for i, s in enumerate(self.sites)}
        for sid, per in self.linear_maps.items():
            for w, groups in per.items():
                for g, m in enumerate(groups):
                    for name, a in m.arrays().items():
                        arrays[f"maps/{index[sid]}/{w}/{g}/{name}"] = a
        for (site, n), st in self.stats.items():
            for name, value in st.items():
                arrays[f"{index[site]}/{n}/{name}"] = np.asarray(value)
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".npz")
        os.close(fd)
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> Profile:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, KeyError) as e:
            raise ProfileError(f"{path} is not a readable attnforge profile ({e})") from e
        if meta.get("version") not in READABLE_VERSIONS:
            raise ProfileError(f"{path} has profile version {meta.get('version')}; this attnforge reads "
                               f"versions {list(READABLE_VERSIONS)} — profile again")
        from attnforge.runtime.linear import FeatureMaps

        sites = meta["sites"]
        stats: dict = {}
        raw_maps: dict = {}
        for key, value in arrays.items():
            if key.startswith("maps/"):
                _, i, w, g, name = key.split("/")
                raw_maps.setdefault((sites[int(i)]["id"], int(w), int(g)), {})[name] = value
                continue
            i, n, name = key.split("/")
            stats.setdefault((sites[int(i)]["id"], int(n)), {})[name] = value
        linear_maps: dict = {}
        for (sid, w, g), a in sorted(raw_maps.items()):
            linear_maps.setdefault(sid, {}).setdefault(w, []).append(FeatureMaps(a["wq"], a["wk"], float(a["gain"])))
        lin = meta.get("linear", {})
        distill = {sid: {int(w): {k: np.asarray(v) for k, v in e.items()} for w, e in per.items()}
                   for sid, per in lin.get("distill", {}).items()}
        return cls(meta["model"], meta["fingerprint"], meta["block"], sites,
                   {int(k): v for k, v in meta["samples"].items()}, stats,
                   tuple(meta.get("spans", SPANS)), int(meta.get("sink", SINK)), linear_maps, distill,
                   tuple(tuple(c) for c in lin.get("candidates", [])))


def _site_rows(sites) -> list[dict]:
    return [{"id": s.id, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
             "causal": bool(s.causal), "mask": s.mask} for s in sites]


def profile_model(model: torch.nn.Module, samples: dict[int, list[torch.Tensor | RecallWindow]], *, model_name: str,
                  block: int = 64, out=None, progress: bool = True, linear: bool = False, kv_quant: bool = True,
                  dynamic: bool = True,
                  distill_samples: list[torch.Tensor] | None = None, distill_steps: int = 200) -> Profile:
    """Profile `model` on token batches per length (each [1, L] input ids, or a RecallWindow, whose
    copied rows' attention onto their source is also recorded). See the module docstring.

    linear=True also measures the linear hybrids of LINEAR_CANDIDATES: first the hedgehog feature maps
    of every KV group are distilled (runtime.linear.distill) on the activations of `distill_samples`
    (default: the first two samples of the shortest length; the last one held out to report the error),
    then every profiled sample measures each candidate's exact output change and loss effect.
    kv_quant=True also measures the KVQuant forms of runtime.profiling.QUANT_BITS on the decode rows;
    dynamic=True the VerticalSlash budgets of runtime.profiling.VS_CANDIDATES (the influence each one's
    resolution drops on each sample)."""
    lengths = sorted(samples)
    first = _ids(samples[lengths[0]][0])
    sites = find_attention(model, (first,))
    if not sites:
        raise ProfileError(f"{model_name}: no attention found to profile")
    prof = None
    if out is not None and Path(out).exists():
        prof = Profile.load(out)
        if prof.fingerprint != fingerprint(sites) or prof.block != block or prof.spans != SPANS:
            raise ProfileError(f"{out} was profiled for another model, block size or attnforge version; "
                               "remove it or choose another output file")
    if prof is None:
        prof = Profile(model_name, fingerprint(sites), block, _site_rows(sites))
    if linear and not prof.linear_candidates and any(prof.samples.values()):
        raise ProfileError(f"{out} was profiled without the linear forms; profile with them into another file")
    if kv_quant and any(prof.samples.values()) and not any("quant_abs" in st for st in prof.stats.values()):
        kv_quant = False              # resuming a profile made without them: keep its samples comparable
    if dynamic and any(prof.samples.values()) and not any("vs_dropped" in st for st in prof.stats.values()):
        dynamic = False
    todo = [(n, j, x) for n in lengths for j, x in enumerate(samples[n]) if j >= prof.samples.get(n, 0)]

    # Gradients are needed through the activations only: freeze every weight but the input embedding
    # (a hook making activations require grad would break the graph in two).
    frozen = [p for p in model.parameters() if p.requires_grad]
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    keep = {id(p) for p in embed.parameters()} if embed is not None else {id(p) for p in frozen}
    for p in frozen:
        if id(p) not in keep:
            p.requires_grad_(False)
    was_training = model.training
    model.eval()
    backend = Backend(compiler="eager", profile_block=block)
    compiled = compile_traced(model, backend=backend, dynamic=False)
    lookup = None
    try:
        if linear:
            if not prof.linear_maps:
                _distill_all(prof, compiled, [_ids(x) for x in distill_samples or samples[lengths[0]][:2]],
                             distill_steps, progress)
                if out is not None:
                    prof.save(out)
            known = [s["id"] for s in prof.sites]

            def lookup(sid):
                rid = resolve_site(sid, known)
                return prof.linear_maps.get(rid) if rid is not None else None
        bar = _progress(progress, len(todo))
        for n, j, sample in todo:
            ids = _ids(sample)
            recall = (sample.source, sample.target, sample.length) if isinstance(sample, RecallWindow) else None
            collector = ProfileCollector(block, linear_maps=lookup, recall=recall, quant=kv_quant, dynamic=dynamic)
            with collecting(collector), torch.enable_grad():
                logits = _first_tensor(compiled(ids)).float()
                labels = logits.argmax(-1).detach()
                loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum")
                loss.backward()
            if collector.calls == 0:
                raise ProfileError("the profiling op did not run: no attention site was rewritten")
            known = [s["id"] for s in prof.sites]
            for (sid, length), st in collector.stats.items():
                site_id = resolve_site(sid, known)
                if site_id is None:
                    raise ProfileError(f"profiled site {sid} is not among the model's sites")
                entry = prof.stats.setdefault((site_id, length), {})
                for name, value in st.items():
                    entry[name] = entry[name] + value if name in entry else value
            prof.samples[n] = prof.samples.get(n, 0) + 1
            if out is not None:
                prof.save(out)
            bar(f"length {n}, sample {j + 1}")
    finally:
        model.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
        torch._dynamo.reset()
    return prof


def _distill_all(prof: Profile, compiled, ids_list, steps: int, progress: bool) -> None:
    """Capture every causal site's q, k, v on `ids_list` and distill hedgehog maps per KV group for each
    window of LINEAR_CANDIDATES (runtime.linear.distill), into prof.linear_maps / prof.distill."""
    from attnforge.runtime.linear import distill

    store: dict = {}
    with capturing(store), torch.no_grad():
        for ids in ids_list:
            compiled(ids)
    known = [s["id"] for s in prof.sites]
    windows = sorted({w for fm, w in LINEAR_CANDIDATES if fm == "hedgehog"})
    bar = _progress(progress, len(store) * len(windows), "distilling hedgehog maps")
    for sid, acts in store.items():
        site_id = resolve_site(sid, known)
        if site_id is None:
            raise ProfileError(f"captured site {sid} is not among the model's sites")
        qs, ks, vs, scales = zip(*acts)
        scale = scales[0]
        for w in windows:
            maps, errs = distill(list(qs), list(ks), list(vs), w, prof.sink, scale, steps=steps,
                                 hold_out=1 if len(qs) > 1 else 0)
            prof.linear_maps.setdefault(site_id, {})[w] = maps
            prof.distill.setdefault(site_id, {})[w] = errs
            bar(f"{site_id}, window {w}")
    prof.linear_candidates = LINEAR_CANDIDATES


def _progress(enabled: bool, total: int, title: str = "profiling"):
    if not enabled or total == 0:
        return lambda what: None
    import sys

    if not sys.stderr.isatty():           # a log file: one plain line per step (a live bar shows nothing there)
        done = [0]

        def line(what):
            done[0] += 1
            print(f"{title}: {what} ({done[0]}/{total})", file=sys.stderr, flush=True)
        return line
    from rich.progress import Progress

    progress = Progress(transient=False)
    progress.start()
    task = progress.add_task(title, total=total)
    done = [0]

    def step(what):
        done[0] += 1
        progress.update(task, advance=1, description=f"{title} ({what})")
        if done[0] == total:
            progress.stop()
    return step
