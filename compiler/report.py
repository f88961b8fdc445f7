"""Profiling reports: one self-contained HTML file (plots inline as SVG, sortable tables, no network),
plus the same content as Markdown (plots as SVG files beside it) and JSON.

    rep = build_report(plan=Plan.load("plan.json"), profile=Profile.load("profile.npz"))
    write_report(rep, "report.html")          # also report.md, report.json, report.assets/*.svg

Either input may be missing: a profile alone shows per-head statistics before any search; a plan alone
shows the forms. What is not known is said, never invented: speed-ups are labelled measured (with the
device) or estimated (analytic FLOPs); perplexities are shown only when the plan carries measurements.
"""
from __future__ import annotations

import html
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np

from .plan import Plan
from .profile import Profile

__all__ = ["build_report", "write_report", "measure_latency"]

FORM_COLORS = {"dense": "#4c72b0", "sink_window": "#dd8452", "elastic_window": "#55a868",
               "block_sparse": "#c44e52", "kv_evict": "#8172b3", "kv_quant": "#937860", "linear": "#64b5cd",
               "vertical_slash": "#da8bc3", "none": "#dddddd"}


# ------------------------------------------------------------------------------------------ content
def _site_rows(plan: Plan | None, profile: Profile | None) -> list[dict]:
    if profile is not None:
        return [dict(s) for s in profile.sites]
    return [{"id": sp.site, "num_heads": sp.num_heads, "num_kv_heads": sp.num_kv_heads, "head_dim": None,
             "causal": True} for sp in plan.sites]


def build_report(plan: Plan | None = None, profile: Profile | None = None, *, length: int | None = None,
                 latency: dict | None = None, bench: dict | None = None, declined: list | None = None,
                 command: str | None = None) -> dict:
    """The report's content as plain data (what `write_report` renders). length: where span and kept
    fractions are shown (default: the plan's or profile's longest length). latency: from
    `measure_latency`. bench: an accuracy benchmark's JSON (benchmarks/accuracy.py): its measured
    perplexity of searched and uniform streaming plans at each density. declined: (site, reason) pairs."""
    if plan is None and profile is None:
        raise ValueError("a report needs a plan, a profile, or both")
    lengths = sorted(set((plan.lengths if plan else ()) + tuple(profile.lengths if profile else ())))
    n = length or (max(lengths) if lengths else 4096)
    sites = _site_rows(plan, profile)
    rep: dict = {"title": f"attnforge report: {(plan or profile).model}", "model": (plan or profile).model,
                 "length": n, "sites": len(sites), "heads": [], "summary": {}, "pareto": None,
                 "latency": latency, "thumbnails": [], "declined": [list(d) for d in (declined or [])],
                 "reproduce": {"command": command or " ".join(["attnforge"] + sys.argv[1:]),
                               "versions": _versions()}}
    summary = rep["summary"]
    summary["sites found"] = len(sites)
    if declined is not None:
        summary["sites declined"] = len(declined)
    if plan is not None:
        from attnforge.runtime.forms import causal_pairs, kept_pairs, kv_tokens

        planned = sum(any(f.kind != "dense" for f in sp.forms) for sp in plan.sites)
        summary["sites planned (non-dense)"] = planned
        summary["budget"] = ", ".join(f"{k} {v}" for k, v in plan.budget.items())
        summary[f"density at {n}"] = round(plan.density(n), 4)
        groups = [(sp, g, f) for sp in plan.sites for g, f in enumerate(sp.forms)]
        kv_frac = sum(kv_tokens(f, n) for _, _, f in groups) / (len(groups) * n)
        if all(s.get("head_dim") for s in sites):
            per_group = [2 * s["head_dim"] * 2 for s in sites for _ in range(s["num_kv_heads"])]  # K+V, fp16
            after = sum(b * kv_tokens(f, n) / n for b, (_, _, f) in zip(per_group, groups))
            summary["KV cache bytes per token (fp16), dense"] = sum(per_group)
            summary[f"KV cache bytes per token (fp16), plan at {n}"] = round(after, 1)
        summary[f"KV entries kept at {n}"] = round(kv_frac, 4)
        flops = sum(kept_pairs(f, n) for _, _, f in groups) / (len(groups) * causal_pairs(n))
        summary[f"attention speed-up at {n} (estimated: analytic FLOPs)"] = round(1 / max(flops, 1e-12), 2)
        cost = plan.predicted.get("cost", {}).get(str(n))
        if cost:
            summary[f"attention speed-up at {n} (estimated: roofline, {cost['plan']['device']})"] = round(
                cost["dense"]["estimated_ms"] / max(cost["plan"]["estimated_ms"], 1e-12), 2)
        for key, value in plan.predicted.get("loss", {}).items():
            summary[f"predicted loss at {key} ({plan.predicted.get('metric', '?')})"] = round(value, 6)
        measured = plan.measured or {}
        for key, value in measured.items():
            if key.startswith("ppl@") or key == "passkey":
                summary[f"measured {key}"] = round(value, 4)
                dense = measured.get("dense", {}).get(key)
                if dense is not None:
                    summary[f"dense {key}"] = round(dense, 4)
        for (sp, g, f) in groups:
            w = f.window_at(n) or getattr(f, "window", None)
            rep["heads"].append({"site": sp.site, "group": g, "form": f.kind, "span": w,
                                 "kept": round(kept_pairs(f, n) / causal_pairs(n), 4),
                                 "kv": round(kv_tokens(f, n) / n, 4), "params": f.to_dict()})
    if bench is not None:
        rep["measured_front"] = _measured_front(bench)
    if profile is not None:
        summary["profiled lengths"] = ", ".join(f"{k} ({v} samples)" for k, v in sorted(profile.samples.items()))
        rep["profile_heads"] = _profile_heads(profile, n)
        rep["distillation"] = _distillation_rows(profile, n)
        rep["thumbnails"] = _pick_thumbnails(profile, plan, n)
        from .search import SearchError, _plannable, pareto, tables_for

        if any(_plannable(s) for s in profile.sites):
            at = tuple(plan.budget["at_lengths"]) if plan is not None and plan.budget.get("at_lengths") else None
            try:
                rep["pareto"] = pareto(profile, tables=tables_for(profile), at=at)
            except SearchError as e:
                rep["pareto"] = {"error": str(e)}
    return rep


def _distillation_rows(profile: Profile, n: int) -> list[dict]:
    """Per site, KV group and window: the hedgehog maps' held-out relative output error before (identity
    maps) and after distillation, and every linear candidate's measured loss at length n (fisher)."""
    rows = []
    for sid, per in profile.distill.items():
        err = profile.linear_error(sid, n, "linear_sq")
        for w, e in sorted(per.items()):
            for g in range(len(e["before"])):
                row = {"site": sid, "group": g, "window": w, "error before": round(float(e["before"][g]), 4),
                       "error after": round(float(e["after"][g]), 4)}
                if err is not None:
                    for ci, (fm, cw) in enumerate(profile.linear_candidates):
                        if cw == w:
                            row[f"{fm} loss@{n}"] = float(f"{err[g, ci]:.3g}")
                rows.append(row)
    return rows


def _measured_front(bench: dict) -> list[dict]:
    """Rows of an accuracy benchmark: plan family, density and perplexity at each evaluated length."""
    rows = []
    for name, row in bench.get("rows", {}).items():
        family, _, _ = name.partition("@")
        for key, ppl in row.items():
            if key.startswith("ppl@"):
                n = key[4:]
                rows.append({"plan": family, "name": name, "length": int(n), "density": round(row["density"][n], 4),
                             "ppl": round(ppl, 4), "vs dense": round(row.get("ppl_vs_dense", {}).get(key, 0.0), 4),
                             "passkey": row.get("passkey")})
    return rows


def _profile_heads(profile: Profile, n: int) -> list[dict]:
    """Per KV group at the profiled length closest to n: entropy, attention mass on the sink block, on the
    local band (diagonal block and the one before) and far away."""
    ln = min(profile.lengths, key=lambda x: abs(x - n))
    rows = []
    for s in profile.sites:
        if (s["id"], ln) not in profile.stats:
            continue
        mass = profile.mass(s["id"], ln)
        ent = profile.entropy(s["id"], ln)
        for g in range(mass.shape[0]):
            m = mass[g] / max(mass[g].sum(), 1e-30)
            nb = m.shape[0]
            qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
            local = m[(qb - kb >= 0) & (qb - kb <= 1)].sum()
            sink = m[:, 0].sum()
            rows.append({"site": s["id"], "group": g, "length": ln, "entropy": round(float(ent[g]), 4),
                         "sink mass": round(float(sink), 4), "local mass": round(float(local), 4),
                         "far mass": round(float(max(0.0, 1 - local - sink)), 4)})
    return rows


def _pick_thumbnails(profile: Profile, plan: Plan | None, n: int) -> list[dict]:
    heads = _profile_heads(profile, n)
    if not heads:
        return []
    picks = {"most local": max(heads, key=lambda r: r["local mass"]),
             "most retrieval-like": max(heads, key=lambda r: r["far mass"]),
             "highest entropy": max(heads, key=lambda r: r["entropy"])}
    out, seen = [], set()
    for why, r in picks.items():
        key = (r["site"], r["group"])
        if key in seen:
            continue
        seen.add(key)
        form = None
        if plan is not None:
            sp = next((p for p in plan.sites if p.site == r["site"]), None)
            form = sp.forms[r["group"]] if sp is not None else None
        out.append({"why": why, "site": r["site"], "group": r["group"], "length": r["length"],
                    "form": form.to_dict() if form is not None else None})
    return out


def measure_latency(model, inputs, plan: Plan | None, repeats: int = 3) -> dict:
    """Per-site attention time, dense vs planned, from torch.profiler (CPU) or CUDA events (GPU): the
    op's calls in order map to the rewritten sites of the compiled graph."""
    import torch

    from .backend import Backend
    from .capture import compile_traced

    def per_site(p):
        torch._dynamo.reset()
        be = Backend(plan=p, compiler="eager")
        run = compile_traced(model, backend=be)
        with torch.no_grad():
            run(*inputs)                                            # compile outside the measurement
            order = [sid for r in be.records for sid in r.rewritten]
            times = {sid: [] for sid in order}
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            for _ in range(repeats):
                with torch.profiler.profile(activities=acts) as prof:
                    run(*inputs)
                events = [e for e in prof.events() if e.name == "attnforge::attention"]
                for sid, e in zip(order, events):
                    dev = getattr(e, "device_time_total", 0) or 0
                    times[sid].append((dev if dev > 0 else e.cpu_time_total) / 1e3)
        torch._dynamo.reset()
        return {sid: round(float(np.median(v)), 4) for sid, v in times.items() if v}

    dense = per_site(None)
    planned = per_site(plan) if plan is not None else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device, "tool": "CUDA events (torch.profiler)" if device == "cuda" else "torch.profiler (CPU)",
            "sites": [{"site": s, "dense_ms": dense[s], "planned_ms": planned.get(s)} for s in dense]}


def _versions() -> dict:
    import torch

    from attnforge import __version__
    from attnforge.runtime.kernels import triton_version

    return {"attnforge": __version__, "torch": torch.__version__, "triton": triton_version(),
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------ plots
def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]                       # drop the XML prolog for inlining


def _plots(rep: dict, profile: Profile | None, plan: Plan | None) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    plots = {}
    if rep["heads"]:
        site_ids = list(dict.fromkeys(h["site"] for h in rep["heads"]))
        g_max = max(h["group"] for h in rep["heads"]) + 1
        kinds = list(FORM_COLORS)
        kind_grid = np.full((len(site_ids), g_max), kinds.index("none"))
        kept_grid = np.full((len(site_ids), g_max), np.nan)
        for h in rep["heads"]:
            i = site_ids.index(h["site"])
            kind_grid[i, h["group"]] = kinds.index(h["form"])
            kept_grid[i, h["group"]] = h["kept"]
        fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.2 * g_max, 1.5 + 0.22 * len(site_ids)))
        axes[0].imshow(kind_grid, cmap=ListedColormap([FORM_COLORS[k] for k in kinds]), vmin=0,
                       vmax=len(kinds) - 1, aspect="auto", interpolation="nearest")
        axes[0].set_title("form per KV group")
        im = axes[1].imshow(kept_grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        axes[1].set_title(f"kept fraction at {rep['length']}")
        fig.colorbar(im, ax=axes[1], fraction=0.05)
        for ax in axes:
            ax.set_xlabel("KV group")
            ax.set_xticks(range(g_max))
            ax.set_yticks(range(len(site_ids)))
        axes[0].set_yticklabels([s if len(s) < 28 else "…" + s[-26:] for s in site_ids], fontsize=6)
        axes[1].set_yticklabels([])
        for h in rep["heads"]:
            if h["span"]:
                axes[1].text(h["group"], site_ids.index(h["site"]), str(h["span"]), ha="center", va="center",
                             fontsize=5, color="white")
        handles = [plt.Rectangle((0, 0), 1, 1, color=FORM_COLORS[k]) for k in kinds[:-1]]
        axes[0].legend(handles, kinds[:-1], fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.5 /
                       max(len(site_ids), 1)), ncol=2)
        plots["heatmap"] = _svg(fig)
    if isinstance(rep.get("pareto"), list) and rep["pareto"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        d = [p["density"] for p in rep["pareto"]]
        ax.plot(d, [p["predicted_loss"] for p in rep["pareto"]], "o-", label="searched (predicted loss)")
        if plan is not None and plan.predicted.get("loss"):
            ax.plot([plan.density(rep["length"])], [sum(plan.predicted["loss"].values())], "*", ms=12,
                    label="this plan")
        ax.set_xlabel("density budget")
        ax.set_ylabel("predicted loss")
        ax.set_title("Pareto front the search sees")
        ax.legend(fontsize=7)
        plots["pareto"] = _svg(fig)
    if rep.get("measured_front"):
        mf = rep["measured_front"]
        ns = sorted({r["length"] for r in mf})
        fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.2), squeeze=False)
        for ax, n in zip(axes[0], ns):
            for family, style in (("searched", "o-"), ("streaming", "s--")):
                pts = sorted((r["density"], r["ppl"]) for r in mf if r["length"] == n and r["plan"] == family)
                if pts:
                    ax.plot(*zip(*pts), style, label=family if family == "searched" else "uniform streaming")
            dense = [r["ppl"] for r in mf if r["length"] == n and r["plan"] == "dense"]
            if dense:
                ax.axhline(dense[0], color="gray", lw=0.8, label="dense")
            ax.set_xlabel(f"density at {n}")
            ax.set_ylabel("perplexity (held-out text)")
            ax.set_title(f"measured at {n} tokens")
            ax.legend(fontsize=7)
        plots["measured"] = _svg(fig)
    if rep.get("latency") and rep["latency"]["sites"]:
        lat = rep["latency"]["sites"]
        fig, ax = plt.subplots(figsize=(6, 1.2 + 0.18 * len(lat)))
        y = np.arange(len(lat))
        ax.barh(y - 0.2, [s["dense_ms"] for s in lat], 0.4, label="dense")
        if any(s["planned_ms"] is not None for s in lat):
            ax.barh(y + 0.2, [s["planned_ms"] or 0 for s in lat], 0.4, label="planned")
        ax.set_yticks(y)
        ax.set_yticklabels([s["site"][-26:] for s in lat], fontsize=6)
        ax.set_xlabel(f"ms per call ({rep['latency']['tool']})")
        ax.legend(fontsize=7)
        plots["latency"] = _svg(fig)
    if profile is not None and rep["thumbnails"]:
        from .search import _keep_frac  # the block keep fractions the search itself used

        from attnforge.runtime.forms import form_from_dict

        fig, axes = plt.subplots(1, len(rep["thumbnails"]), figsize=(3.2 * len(rep["thumbnails"]), 3.4))
        axes = np.atleast_1d(axes)
        for ax, t in zip(axes, rep["thumbnails"]):
            mass = profile.mass(t["site"], t["length"])[t["group"]]
            rows = mass / np.maximum(mass.sum(1, keepdims=True), 1e-30)
            ax.imshow(np.log10(np.maximum(rows, 1e-6)), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
            if t["form"] is not None and t["form"]["kind"] != "vertical_slash":   # (a dynamic form has no region)
                keep = _keep_frac(form_from_dict(t["form"]), t["length"], profile.block)
                ax.contour(keep > 0.5, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"{t['why']}\n{t['site'][-22:]} g{t['group']}"
                         + (f"\n{t['form']['kind']}" if t["form"] else ""), fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"attention mass per {profile.block}x{profile.block} block (log10), chosen form's kept "
                     "region outlined", fontsize=8)
        plots["thumbnails"] = _svg(fig)
    return plots


# ------------------------------------------------------------------------------------------ render
_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;cursor:pointer}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}code,pre{background:#f6f6f6;padding:2px 4px}"""

_SORT_JS = """document.querySelectorAll('table.sortable th').forEach(function(th, i){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.prototype.slice.call(tb.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[i].textContent, y = b.cells[i].textContent, fx = parseFloat(x), fy = parseFloat(y);
      var c = (!isNaN(fx) && !isNaN(fy)) ? fx - fy : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
window.addEventListener('load', function(){
  var figs = document.querySelectorAll('figure svg, img'), shown = 0;
  figs.forEach(function(f){
    var r = f.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && (f.tagName !== 'IMG' || (f.complete && f.naturalWidth > 0))) shown++;
  });
  document.body.dataset.figures = String(figs.length);
  document.body.dataset.figuresShown = String(shown);
});"""


def _cell(v) -> str:
    cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
    text = json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else str(v))
    return f"<td{cls}>{html.escape(text)}</td>"


def _table(rows: list[dict], table_id: str) -> str:
    if not rows:
        return "<p>none</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "none\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(out) + "\n"


def write_report(rep: dict, out, profile: Profile | None = None, plan: Plan | None = None) -> dict[str, Path]:
    """Write OUT (.html), and beside it .md (+ .assets/*.svg) and .json. Returns the paths written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = _plots(rep, profile, plan)
    summary_rows = [{"item": k, "value": v if not isinstance(v, dict) else json.dumps(v)}
                    for k, v in rep["summary"].items()]
    captions = {"heatmap": "Chosen form per KV group (left) and kept fraction of causal pairs with the span "
                           "written in (right).",
                "pareto": "Predicted loss of the best plan at each density budget.",
                "measured": "Measured perplexity against density: searched plans and the uniform streaming "
                            "baseline (from the accuracy benchmark).",
                "latency": "Per-site attention time, dense vs planned.",
                "thumbnails": "Representative heads: block attention mass from the profile."}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(rep['title'])}</title>"
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(rep['title'])}</h1>",
             "<h2>Summary</h2>", _table(summary_rows, "summary")]
    for name, svg in plots.items():
        parts += [f"<h2>{name.capitalize()}</h2>", f'<figure id="fig-{name}">{svg}'
                  f"<figcaption>{html.escape(captions[name])}</figcaption></figure>"]
    if rep["heads"]:
        parts += ["<h2>Per KV group: plan</h2>",
                  _table([{k: v for k, v in h.items() if k != "params"} for h in rep["heads"]], "heads")]
    if rep.get("profile_heads"):
        parts += ["<h2>Per KV group: profile</h2>", _table(rep["profile_heads"], "profile-heads")]
    if rep.get("distillation"):
        parts += ["<h2>Linear heads: distillation</h2>", _table(rep["distillation"], "distillation")]
    if rep.get("measured_front"):
        parts += ["<h2>Measured: searched vs uniform</h2>", _table(rep["measured_front"], "measured-front")]
    if rep.get("latency"):
        parts += ["<h2>Latency</h2>", _table(rep["latency"]["sites"], "latency")]
    if rep["declined"]:
        parts += ["<h2>Declined</h2>", _table([{"site": s, "reason": r} for s, r in rep["declined"]], "declined")]
    repro = rep["reproduce"]
    parts += ["<h2>Reproduce</h2>", f"<pre>{html.escape(repro['command'])}</pre>",
              _table([{"package": k, "version": v} for k, v in repro["versions"].items()], "versions"),
              f"<script>{_SORT_JS}</script></body></html>"]
    html_text = "".join(parts)
    out.write_text(html_text)

    assets = out.with_suffix(".assets")
    assets.mkdir(exist_ok=True)
    md = [f"# {rep['title']}\n", "## Summary\n", _md_table(summary_rows)]
    for name, svg in plots.items():
        (assets / f"{name}.svg").write_text(svg)
        md += [f"## {name.capitalize()}\n", f"![{captions[name]}]({assets.name}/{name}.svg)\n"]
    if rep["heads"]:
        md += ["## Per KV group: plan\n", _md_table([{k: v for k, v in h.items() if k != "params"}
                                                    for h in rep["heads"]])]
    if rep.get("profile_heads"):
        md += ["## Per KV group: profile\n", _md_table(rep["profile_heads"])]
    if rep.get("distillation"):
        md += ["## Linear heads: distillation\n", _md_table(rep["distillation"])]
    if rep.get("measured_front"):
        md += ["## Measured: searched vs uniform\n", _md_table(rep["measured_front"])]
    if rep.get("latency"):
        md += ["## Latency\n", _md_table(rep["latency"]["sites"])]
    md += ["## Reproduce\n", f"```\n{repro['command']}\n```\n", _md_table(
        [{"package": k, "version": v} for k, v in repro["versions"].items()])]
    out.with_suffix(".md").write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=str))
    return {"html": out, "md": out.with_suffix(".md"), "json": out.with_suffix(".json"), "assets": assets}
