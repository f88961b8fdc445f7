"""Give each rewritten attention call its plan entry: one Form per KV head group (as JSON).

Before:  attention(q, k, v, None, True, 0, 0.125, "auto", "<key>")
After:   attention(q, k, v, None, True, 0, 0.125, "auto", "<key>", '[{"kind":"dense"},{"kind":"sink_window",...}]')

Only calls whose site id is in `entries` change; an all-dense entry is left as it is (dense is the
default). The pass checks that each entry has one form per KV head group of the call.
"""
from __future__ import annotations

from torch import fx

from attnforge.runtime.forms import forms_to_json

from .canonicalize import ATTENTION_OP

__all__ = ["apply_plan", "PlanMismatch"]


class PlanMismatch(ValueError):
    """A plan entry does not fit the graph it is applied to; the message says which and how."""


def apply_plan(gm: fx.GraphModule, entries: dict[str, tuple]) -> tuple[fx.GraphModule, bool]:
    """entries: site id -> tuple of Forms (one per KV head group)."""
    changed = False
    for node in gm.graph.nodes:
        if node.target is not ATTENTION_OP:
            continue
        site = node.meta.get("attnforge_site")
        forms = entries.get(site)
        if not forms or all(f.kind == "dense" for f in forms):
            continue
        k = node.args[1]
        kv_heads = getattr(k.meta.get("example_value", k.meta.get("val")), "shape", (None, None))[1] \
            if isinstance(k, fx.Node) else None
        if kv_heads is not None and int(kv_heads) != len(forms):
            raise PlanMismatch(f"site {site}: the plan has {len(forms)} forms but the attention has {kv_heads} "
                               "KV head groups; search a plan for this model again")
        node.args = tuple(node.args[:9]) + (forms_to_json(forms),) + tuple(node.args[10:])     # padding stays
        changed = True
    if changed:
        gm.recompile()
    return gm, changed
