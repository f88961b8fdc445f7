"""The command line, run in-process as a user would type it."""
import json

import pytest

from attnforge.compiler.cli import main


def test_detect_json_tiny(capsys):
    assert main(["detect", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["num_heads"] for s in data["sites"]] == [8, 8]
    assert {s["num_kv_heads"] for s in data["sites"]} == {2}


def test_run_reports_rewrites(capsys):
    assert main(["run", "tiny-sdpa", "--compiler", "eager", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sites_rewritten"] == 2 and data["calls"] == {"reference": 2}
    assert data["rel_diff"] < 1e-5 and data["top1_agreement"] == 1.0


def test_model_without_attention_says_so(tmp_path, capsys):
    f = tmp_path / "mlp.py"
    f.write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 4), (torch.randn(2, 4),)\n")
    assert main(["detect", f"{f}:make"]) == 0
    assert "No attention found" in capsys.readouterr().out


@pytest.mark.parametrize("spec,msg", [("nosuchmodel", "unknown model"), ("missing.py:make", "does not exist"),
                                      ("json:nope", "has no callable")])
def test_bad_model_spec_exits_nonzero_with_one_line(spec, msg, capsys):
    assert main(["detect", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "detect" in out and "run" in out


def test_detect_shows_near_misses(tmp_path, capsys):
    f = tmp_path / "router.py"
    f.write_text(
        "import torch\n"
        "class Router(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.gate = torch.nn.Linear(8, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.softmax(self.gate(x), dim=-1).topk(2, dim=-1).values\n"
        "def make():\n"
        "    return Router(), (torch.randn(2, 5, 8),)\n")
    assert main(["detect", f"{f}:make", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sites"] == [] and len(data["declined"]) == 1
    assert "not multiplied with values" in data["declined"][0]["reason"]
    assert main(["detect", f"{f}:make"]) == 0
    out = capsys.readouterr().out
    assert "No attention found" in out and "1 near misses declined" in out


def test_profile_search_optimize_on_tiny(tmp_path, capsys):
    prof = tmp_path / "p.npz"
    assert main(["profile", "tiny", "--block", "16", "-o", str(prof)]) == 0
    plan = tmp_path / "plan.json"
    assert main(["search", str(prof), "--density", "0.6", "-o", str(plan), "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["predicted"]["density"]["64"] <= 0.6 and summary["pareto"]
    import attnforge as af
    assert len(af.Plan.load(plan).sites) == 2
    assert main(["search", str(prof), "--density", "0.6", "--baseline", "streaming", "-o", str(tmp_path / "b.json")]) == 0
    # tiny's example input is not text: no recall windows, so a recall floor is reported and not applied
    assert main(["search", str(prof), "--density", "0.6", "--recall", "0.5", "-o", str(tmp_path / "r.json")]) == 0
    assert "recall floor not applied" in capsys.readouterr().err
    assert "recall" not in af.Plan.load(tmp_path / "r.json").budget
    folder = tmp_path / "out"
    assert main(["optimize", "tiny", "--block", "16", "--density", "0.6", "-o", str(folder)]) == 0
    for name in ("plan.json", "profile.npz", "summary.json", "kernels/manifest.json", "report.html", "report.md",
                 "report.json", "report.assets/heatmap.svg", "model.onnx"):
        assert (folder / name).exists(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert "model.onnx" in summary["files"] and len(summary["onnx"]["sites"]) == 2
    assert set(summary["seconds"]) >= {"profile", "search", "ONNX export"}
    planned = [s for s in summary["onnx"]["sites"] if s["forms"] != "dense"]
    assert all(s["function"].startswith("PlanAttention_") for s in planned)
    # a report from a profile alone (before any search): per-head statistics, no plan section
    assert main(["report", str(prof), "-o", str(tmp_path / "prof_report.html")]) == 0
    text = (tmp_path / "prof_report.html").read_text()
    assert "Per KV group: profile" in text and "Per KV group: plan" not in text
    manifest = json.loads((folder / "kernels" / "manifest.json").read_text())
    assert len(manifest["kernels"]) == 2 and (folder / manifest["kernels"][0]["file"]).exists()
    for k in manifest["kernels"]:                    # a site with non-dense forms gets the per-head plan kernel
        assert ("plan" in k["kernel"]) == (k["forms"] != "dense" and any(f["kind"] != "dense" for f in k["forms"]))


def test_search_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a profile")
    assert main(["search", str(bad), "--density", "0.5", "-o", str(tmp_path / "x.json")]) == 2
    assert "not a readable attnforge profile" in capsys.readouterr().err


def test_generate_refuses_what_it_cannot_run(capsys):
    """A model that is not a Hugging Face causal LM, a prompt for a model without a tokenizer, two prompts:
    exit 2 with the reason on one line."""
    for argv, msg in ((["generate", "tiny"], "needs a Hugging Face causal LM"),
                      (["generate", "tiny", "--prompt", "hi"], "has no tokenizer here"),
                      (["generate", "tiny", "--prompt", "a", "--prompt-file", "b"], "not both"),
                      (["generate", "tiny", "--max-new-tokens", "0"], "at least 1"),
                      (["generate", "tiny", "--num-beams", "2", "--prompt-lookup", "3"], "do not go together")):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
