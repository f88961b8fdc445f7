"""The HTML report for a small model, opened in headless Chromium: no console errors, every figure shown,
the key numbers in the DOM; the Markdown and JSON siblings carry the same numbers."""
import json
import re
import shutil
import subprocess

import pytest

from attnforge.compiler.models import tiny
from attnforge.compiler.profile import profile_model
from attnforge.compiler.report import build_report, measure_latency, write_report
from attnforge.compiler.search import Budget, search

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    model, (ids,) = tiny(320, sdpa=True)
    prof = profile_model(model, {320: [ids]}, model_name="tiny-320", block=16, progress=False)
    plan = search(prof, Budget(0.5))
    bench = {"rows": {"dense": {"density": {"320": 1.0}, "ppl@320": 9.5, "passkey": 1.0},
                      "searched@0.5": {"density": {"320": 0.49}, "ppl@320": 9.61, "ppl_vs_dense": {"ppl@320": 0.0116}},
                      "streaming@0.5": {"density": {"320": 0.5}, "ppl@320": 9.87}}}
    rep = build_report(plan, prof, latency=measure_latency(model, (ids,), plan, repeats=1), bench=bench,
                       command="pytest tests/test_report.py")
    out = tmp_path_factory.mktemp("report") / "report.html"
    paths = write_report(rep, out, profile=prof, plan=plan)
    return rep, plan, paths


def test_report_files_carry_the_same_numbers(report):
    rep, plan, paths = report
    density = f"{plan.density(320):.4f}".rstrip("0")
    for kind in ("html", "md"):
        assert density in paths[kind].read_text()
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["density at 320"] == round(plan.density(320), 4)
    assert sorted(p.name for p in paths["assets"].iterdir()) == ["heatmap.svg", "latency.svg", "measured.svg",
                                                                 "pareto.svg", "thumbnails.svg"]
    assert {(r["plan"], r["ppl"]) for r in data["measured_front"]} == {("dense", 9.5), ("searched", 9.61),
                                                                       ("streaming", 9.87)}
    assert len(data["heads"]) == 4 and {h["form"] for h in data["heads"]} <= {"dense", "sink_window",
                                                                            "elastic_window", "block_sparse"}
    assert all(s["dense_ms"] > 0 and s["planned_ms"] > 0 for s in data["latency"]["sites"])
    text = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text) and "<link" not in text  # nothing fetched


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_opens_in_headless_chromium(report, tmp_path):
    rep, plan, paths = report
    url = paths["html"].resolve().as_uri()
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, *FLAGS, "--window-size=1200,2400", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    proc = subprocess.run([CHROMIUM, *FLAGS, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    figures = int(re.search(r'data-figures="(\d+)"', dom).group(1))
    assert figures == 5 and f'data-figures-shown="{figures}"' in dom       # every figure rendered, visible
    for key in ("sites found", f"{plan.density(320):.4f}".rstrip("0"), "KV entries kept at 320",
                "estimated: analytic FLOPs", "attn.0#0", "9.87", "Measured: searched vs uniform"):
        assert key in dom, key


def test_every_form_kind_has_a_colour_in_the_report(tmp_path):
    """A plan with linear and vertical-slash groups (the figure of forms per group raised on them before)."""
    from attnforge.compiler.plan import Plan, SitePlan
    from attnforge.compiler.report import FORM_COLORS
    from attnforge.runtime.forms import FORM_KINDS, Dense, Linear, VerticalSlash

    assert set(FORM_KINDS) <= set(FORM_COLORS)
    plan = Plan("x", "t", (SitePlan("a#0", 4, 2, (Linear("taylor2", 64), VerticalSlash(2, 2))),
                           SitePlan("b#0", 4, 2, (Dense(), Dense()))), {}, (512,))
    rep = build_report(plan, None, command="pytest")
    assert write_report(rep, tmp_path / "r.html", plan=plan)
