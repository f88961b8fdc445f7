"""Plans: per site, one Form per KV head group, saved as versioned JSON (never pickle).

    plan = af.Plan.load("plan.json")        # validates the schema; PlanError names what is wrong
    plan.check(sites)                        # the model's sites must match (fingerprint, heads, groups)
    plan.save("plan.json")                   # atomic write
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from attnforge.runtime.forms import Form, FormError, causal_pairs, form_from_dict, kept_pairs

__all__ = ["Plan", "SitePlan", "PlanError", "SCHEMA_VERSION", "fingerprint", "resolve_site"]

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan file or object that cannot be used; the message names the field and what to do."""


def resolve_site(site_id: str, known) -> str | None:
    """The id in `known` naming the same site as `site_id`. After a graph break Dynamo resumes inside a
    submodule, so paths there are relative to it ("layers.3.attn#0" for "model.layers.3.attn#0"): an
    exact match, else the unique known id that ends with "." + site_id."""
    if site_id in known:
        return site_id
    hits = [k for k in known if k.endswith("." + site_id)]
    return hits[0] if len(hits) == 1 else None


def fingerprint(sites) -> str:
    """A hash of the model's attention structure: site ids, heads, KV heads, head dims, causal."""
    rows = sorted((s.id, s.num_heads, s.num_kv_heads, s.head_dim, bool(s.causal)) for s in sites)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SitePlan:
    site: str
    num_heads: int
    num_kv_heads: int
    forms: tuple            # one Form per KV head group

    def to_dict(self) -> dict:
        return {"site": self.site, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                "forms": [f.to_dict() for f in self.forms]}


@dataclass(frozen=True, slots=True)
class Plan:
    fingerprint: str
    model: str
    sites: tuple[SitePlan, ...]
    budget: dict = field(default_factory=dict)          # e.g. {"density": 0.5}
    lengths: tuple[int, ...] = ()                        # profiled lengths
    predicted: dict = field(default_factory=dict)        # {"loss": {L: ...}, "density": {L: ...}}
    measured: dict = field(default_factory=dict)         # filled by validation (perplexity, ...)
    provenance: dict = field(default_factory=dict)       # command and versions that made it

    # ------------------------------------------------------------------ views
    def entries(self) -> dict[str, tuple[Form, ...]]:
        return {sp.site: sp.forms for sp in self.sites}

    def density(self, n: int) -> float:
        """Fraction of causal (i, j) pairs kept over all KV groups of all sites, at length n."""
        kept = sum(kept_pairs(f, n) for sp in self.sites for f in sp.forms)
        total = sum(len(sp.forms) for sp in self.sites) * causal_pairs(n)
        return kept / total if total else 1.0

    def form_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sp in self.sites:
            for f in sp.forms:
                counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    # ------------------------------------------------------------------ checks
    def check(self, sites) -> None:
        """Raise PlanError if this plan does not fit the model whose sites are given."""
        found = {s.id: s for s in sites}
        planned = {sp.site: sp for sp in self.sites}
        missing = sorted(set(planned) - set(found))
        if missing:
            raise PlanError(f"the plan names sites the model does not have: {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; the plan was made for another model "
                            f"({self.model}) — search a new plan for this one")
        for sid, sp in planned.items():
            s = found[sid]
            if (s.num_heads, s.num_kv_heads) != (sp.num_heads, sp.num_kv_heads):
                raise PlanError(f"site {sid}: the plan expects {sp.num_heads} heads / {sp.num_kv_heads} KV heads, "
                                f"the model has {s.num_heads} / {s.num_kv_heads}")
        if set(found) == set(planned) and fingerprint(sites) != self.fingerprint:
            raise PlanError(f"the plan's fingerprint {self.fingerprint} does not match the model's "
                            f"{fingerprint(sites)} (head dims or causality differ); search a new plan")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return {"schema": "attnforge.plan", "version": SCHEMA_VERSION, "fingerprint": self.fingerprint,
                "model": self.model, "budget": self.budget, "lengths": list(self.lengths),
                "predicted": self.predicted, "measured": self.measured, "provenance": self.provenance,
                "sites": [sp.to_dict() for sp in self.sites]}

    def maps_path(self, path) -> Path:
        """The sidecar file of the plan's learned feature maps: plan.json -> plan.maps.npz."""
        path = Path(path)
        return path.with_name(path.stem + ".maps.npz")

    def map_keys(self) -> list[str]:
        return sorted({f.maps for sp in self.sites for f in sp.forms if getattr(f, "maps", "")})

    def save(self, path) -> None:
        """Write plan.json, and beside it plan.maps.npz when hedgehog heads carry learned maps."""
        path = Path(path)
        keys = self.map_keys()
        if keys:
            import numpy as np

            from attnforge.runtime.linear import maps_for

            arrays = {f"{k}/{name}": a for k in keys for name, a in maps_for(k).arrays().items()}
            side = self.maps_path(path)
            fd, tmp = tempfile.mkstemp(dir=side.parent, prefix=".maps-", suffix=".npz")
            os.close(fd)
            np.savez(tmp, **arrays)
            os.replace(tmp, side)
        text = json.dumps(self.to_dict(), indent=1)
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=".plan-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> Plan:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanError(f"cannot read plan {path}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: it is not UTF-8 text (byte {e.start}); a plan is the "
                            "plan.json written by `attnforge search` or `optimize`") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        plan = cls.from_dict(data, source=str(path))
        keys = plan.map_keys()
        if keys:
            plan._load_maps(plan.maps_path(path), keys)
        return plan

    @staticmethod
    def _load_maps(side: Path, keys) -> None:
        """Read and register the learned feature maps the plan's hedgehog forms name (no pickle)."""
        import numpy as np

        from attnforge.runtime.linear import FeatureMaps, register_maps

        if not side.exists():
            raise PlanError(f"the plan has hedgehog heads whose learned feature maps belong in {side}, which "
                            "does not exist: keep plan.maps.npz next to plan.json (both are written by "
                            "`attnforge search`)")
        try:
            with np.load(side, allow_pickle=False) as z:
                for k in keys:
                    m = FeatureMaps(z[f"{k}/wq"], z[f"{k}/wk"], float(z[f"{k}/gain"]))
                    if m.key() != k:
                        raise PlanError(f"{side}: the maps stored under {k} hash to {m.key()}: the file was "
                                        "altered or belongs to another plan")
                    register_maps(m)
        except PlanError:
            raise
        except KeyError as e:
            raise PlanError(f"{side} lacks the feature maps {e}; it belongs to another plan") from e
        except (OSError, ValueError) as e:
            raise PlanError(f"{side} is not a readable feature-map file ({e})") from e

    @classmethod
    def from_dict(cls, data, source: str = "plan") -> Plan:
        def need(obj, key, kind, where):
            if not isinstance(obj, dict) or key not in obj:
                raise PlanError(f"{source}: {where} is missing the field '{key}'")
            value = obj[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise PlanError(f"{source}: {where}.{key} must be {name}, got {type(value).__name__}")
            return value

        if not isinstance(data, dict) or data.get("schema") != "attnforge.plan":
            raise PlanError(f"{source} is not an attnforge plan (no \"schema\": \"attnforge.plan\")")
        version = need(data, "version", int, "the plan")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{source} has plan schema version {version}; this attnforge reads version "
                            f"{SCHEMA_VERSION} — search the plan again with this version")
        sites = []
        for i, sd in enumerate(need(data, "sites", list, "the plan")):
            where = f"sites[{i}]"
            heads = need(sd, "num_heads", int, where)
            kv = need(sd, "num_kv_heads", int, where)
            raw = need(sd, "forms", list, where)
            if kv < 1 or heads % kv:
                raise PlanError(f"{source}: {where} has {heads} heads and {kv} KV heads, which do not group")
            if len(raw) != kv:
                raise PlanError(f"{source}: {where} has {len(raw)} forms for {kv} KV head groups; give one per group")
            try:
                forms = tuple(form_from_dict(f) for f in raw)
            except FormError as e:
                raise PlanError(f"{source}: {where}.forms: {e}") from e
            sites.append(SitePlan(need(sd, "site", str, where), heads, kv, forms))
        ids = [s.site for s in sites]
        if len(set(ids)) != len(ids):
            raise PlanError(f"{source}: a site appears twice in the plan")
        lengths = need(data, "lengths", list, "the plan") if "lengths" in data else []
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
            raise PlanError(f"{source}: lengths must be positive integers")
        extras = {}
        for key in ("budget", "predicted", "measured", "provenance"):
            extras[key] = need(data, key, dict, "the plan") if key in data else {}
        return cls(fingerprint=need(data, "fingerprint", str, "the plan"), model=need(data, "model", str, "the plan"),
                   sites=tuple(sites), lengths=tuple(lengths), **extras)
