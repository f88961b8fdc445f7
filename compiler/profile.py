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

from attnforge.runtime.profiling import SINK, SPANS, ProfileCollector, collecting

from .api import _first_tensor, find_attention
from .backend import Backend
from .plan import fingerprint, resolve_site

__all__ = ["Profile", "profile_model", "ProfileError"]

PROFILE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)     # version 1 lacks the window measurements, 2 the KV-eviction ones


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

    @property
    def lengths(self) -> list[int]:
        return sorted(n for n, c in self.samples.items() if c)

    def influence(self, site: str, n: int) -> np.ndarray:
        """[Hkv, nb, nb] mean block influence per sample."""
        return self.stats[(site, n)]["influence"] / max(1, self.samples[n])

    def mass(self, site: str, n: int) -> np.ndarray:
        return self.stats[(site, n)]["mass"] / max(1, self.samples[n])

    def entropy(self, site: str, n: int) -> np.ndarray:
        st = self.stats[(site, n)]
        return st["entropy"] / st["rows"]

    def window_error(self, site: str, n: int, stat: str = "window_abs") -> np.ndarray | None:
        """[Hkv, len(spans)]: a measured window statistic (runtime.profiling) per query token, summed over
        the query heads of each group; None where the profile did not measure it."""
        st = self.stats.get((site, n), {})
        if stat not in st:
            return None
        site_row = next(s for s in self.sites if s["id"] == site)
        tokens = st["rows"] / (site_row["num_heads"] // site_row["num_kv_heads"])
        return st[stat] / max(float(tokens), 1.0)

    def evict_error(self, site: str, n: int, stat: str = "evict_abs") -> np.ndarray | None:
        """[Hkv, len(EVICT_POLICIES), len(EVICT_BUDGETS)]: a measured KV-eviction statistic per query token
        (runtime.profiling), like window_error; None where the profile did not measure it."""
        st = self.stats.get((site, n), {})
        if stat not in st:
            return None
        site_row = next(s for s in self.sites if s["id"] == site)
        tokens = st["rows"] / (site_row["num_heads"] // site_row["num_kv_heads"])
        return st[stat] / max(float(tokens), 1.0)

    def save(self, path) -> None:
        path = Path(path)
        meta = {"version": PROFILE_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "block": self.block, "sites": self.sites, "samples": {str(k): v for k, v in self.samples.items()},
                "spans": list(self.spans), "sink": self.sink}
        arrays = {"meta": np.array(json.dumps(meta))}
        index = {s["id"]: i for i, s in enumerate(self.sites)}
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
        sites = meta["sites"]
        stats: dict = {}
        for key, value in arrays.items():
            i, n, name = key.split("/")
            stats.setdefault((sites[int(i)]["id"], int(n)), {})[name] = value
        return cls(meta["model"], meta["fingerprint"], meta["block"], sites,
                   {int(k): v for k, v in meta["samples"].items()}, stats,
                   tuple(meta.get("spans", SPANS)), int(meta.get("sink", SINK)))


def _site_rows(sites) -> list[dict]:
    return [{"id": s.id, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
             "causal": bool(s.causal), "mask": s.mask} for s in sites]


def profile_model(model: torch.nn.Module, samples: dict[int, list[torch.Tensor]], *, model_name: str,
                  block: int = 64, out=None, progress: bool = True) -> Profile:
    """Profile `model` on token batches per length (each [1, L] input ids). See the module docstring."""
    lengths = sorted(samples)
    first = samples[lengths[0]][0]
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
    todo = [(n, j, ids) for n in lengths for j, ids in enumerate(samples[n]) if j >= prof.samples.get(n, 0)]

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
    compiled = torch.compile(model, backend=backend, dynamic=False)
    try:
        bar = _progress(progress, len(todo))
        for n, j, ids in todo:
            collector = ProfileCollector(block)
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


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return lambda what: None
    from rich.progress import Progress

    progress = Progress(transient=False)
    progress.start()
    task = progress.add_task("profiling", total=total)
    done = [0]

    def step(what):
        done[0] += 1
        progress.update(task, advance=1, description=f"profiling ({what})")
        if done[0] == total:
            progress.stop()
    return step
