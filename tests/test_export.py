"""ONNX export: one attnforge function node per site, run by ONNX Runtime at several lengths, equal to the
PyTorch run of the same plan; no N x N constant in the file; clear errors."""
import json

import numpy as np
import pytest
import torch

import attnforge as af
from attnforge.compiler.models import tiny
from attnforge.compiler.export import DOMAIN, ExportError, _check_no_square_constants, export_onnx
from attnforge.compiler.plan import Plan, SitePlan, fingerprint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def _llama(layers=2, heads=4, kv_heads=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=1024, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _mixed_plan(model, n=40):
    sites = af.find_attention(model, (_ids(n),))
    entries = (SitePlan(sites[0].id, 4, 2, (af.SinkWindow(2, 8), af.BlockSparse(8, (0,), (0, 2)))),
               SitePlan(sites[1].id, 4, 2, (af.Dense(), af.ElasticWindow(1, 4, 0.2))))
    return Plan(fingerprint(sites), "tiny-llama", entries, {"density": 0.5}, (n,))


def _torch_plan(model, plan, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(ids).logits


def _run(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]


def test_mixed_plan_runs_in_onnxruntime_at_two_lengths_and_matches_pytorch(tmp_path):
    model = _llama()
    plan = _mixed_plan(model)
    res = export_onnx(model, (_ids(40),), tmp_path / "m.onnx", plan=plan)
    assert [s["site"] for s in res.sites] == [sp.site for sp in plan.sites] and not res.declined
    for n in (40, 77):                    # the example length and another one: the length stays dynamic
        ids = _ids(n, seed=n)
        ours = _run(tmp_path / "m.onnx", ids)
        want = _torch_plan(model, plan, ids).numpy()
        with torch.no_grad():
            dense = model(ids).logits.numpy()
        assert np.abs(ours - want).max() < 1e-4
        assert np.abs(ours - dense).max() > 1e-2       # the plan's forms really ran, not dense attention

    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(m, full_check=True)
    nodes = [nd for nd in m.graph.node if nd.domain == DOMAIN]
    assert len(nodes) == 2                              # one named node per site
    functions = {f.name: f for f in m.functions if f.domain == DOMAIN}
    assert {nd.op_type for nd in nodes} == set(functions) == set(res.functions)
    for f in functions.values():                        # the body runs the standard Attention op
        assert [nd.op_type for nd in f.node].count("Attention") == 1
        assert "Range" in {nd.op_type for nd in f.node}
    props = {nd.op_type: {p.key: p.value for p in nd.metadata_props} for nd in nodes}
    assert {p["attnforge.site"] for p in props.values()} == {sp.site for sp in plan.sites}
    meta = {p.key: p.value for p in m.metadata_props}
    assert Plan.from_dict(json.loads(meta["attnforge.plan"])).entries() == plan.entries()
    _check_no_square_constants(m, {40, 77})


def test_linear_hybrid_heads_export_exactly(tmp_path):
    """Linear groups (taylor2, hedgehog with learned maps) decompose into plain ONNX ops next to the
    Attention node of the other groups; ONNX Runtime matches the PyTorch run of the plan at two lengths."""
    from attnforge.runtime.forms import Linear
    from attnforge.runtime.linear import FeatureMaps, register_maps

    model = _llama()
    g = torch.Generator().manual_seed(3)
    key = register_maps(FeatureMaps(torch.eye(16) + 0.3 * torch.randn(16, 16, generator=g), torch.eye(16), 0.6))[0]
    sites = af.find_attention(model, (_ids(40),))
    plan = Plan(fingerprint(sites), "tiny-llama",
                (SitePlan(sites[0].id, 4, 2, (Linear("taylor2", 6, 2), af.SinkWindow(2, 8))),
                 SitePlan(sites[1].id, 4, 2, (af.Dense(), Linear("hedgehog", 5, 1, key)))), {"density": 0.5}, (40,))
    export_onnx(model, (_ids(40),), tmp_path / "l.onnx", plan=plan)
    for n in (40, 77):
        ids = _ids(n, seed=n)
        ours = _run(tmp_path / "l.onnx", ids)
        want = _torch_plan(model, plan, ids).numpy()
        with torch.no_grad():
            dense = model(ids).logits.numpy()
        assert np.abs(ours - want).max() < 1e-4
        assert np.abs(ours - dense).max() > 1e-2
    m = onnx.load(str(tmp_path / "l.onnx"))
    onnx.checker.check_model(m, full_check=True)
    _check_no_square_constants(m, {40, 77})


def _padded(n, pads, seed=0):
    """A batch of len(pads) rows of n tokens, row i left-padded by pads[i]; positions as generate() gives them."""
    ids = torch.cat([_ids(n, seed=seed + i) for i in range(len(pads))])
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _run_all(path, *inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]


def _torch_padded(model, plan, ids, mask, positions):
    import copy

    from attnforge.compiler import hf

    ours = copy.deepcopy(model)
    hf.uses_padding_masks(ours)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(ours, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))
        return compiled(ids, attention_mask=mask, position_ids=positions).logits.numpy()


@pytest.mark.parametrize("linear", [False, True])
def test_a_padded_batch_exports_and_runs_each_row_as_pytorch_does(tmp_path, linear):
    """An attention_mask among the inputs: every site is a padded one in the file (its function takes the
    [B, S] flags and builds each row's positions by CumSum), and ONNX Runtime equals the PyTorch run of the
    plan on padded batches of two lengths, other padding and another batch size, at every position (zeros at padding queries
    feed the same layers in both); the plan really ran, and the model is back on plain SDPA afterwards."""
    from attnforge.runtime.forms import Linear

    model = _llama()
    plan = _mixed_plan(model)
    if linear:
        plan = Plan(plan.fingerprint, plan.model, (SitePlan(plan.sites[0].site, 4, 2, (Linear("taylor2", 6, 2),
                                                                                        af.ElasticWindow(1, 4, 0.2))),
                                                   plan.sites[1]), plan.budget, plan.lengths)
    res = export_onnx(model, _padded(40, (0, 13)), tmp_path / "p.onnx", plan=plan)
    assert model.config._attn_implementation == "sdpa" and not res.declined
    m = onnx.load(str(tmp_path / "p.onnx"))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask", "position_ids"]
    for f in (f for f in m.functions if f.domain == DOMAIN):
        assert list(f.input) == ["Q", "K", "V", "P"] and "CumSum" in {nd.op_type for nd in f.node}
    for n, pads in ((40, (0, 13)), (57, (21, 3, 0))):         # the batch is dynamic too (two example rows)
        inputs = _padded(n, pads, seed=n)
        ours = _run_all(tmp_path / "p.onnx", *inputs)
        want = _torch_padded(model, plan, *inputs)
        with torch.no_grad():
            dense = model(inputs[0], attention_mask=inputs[1], position_ids=inputs[2]).logits.numpy()
        real = inputs[1].bool().numpy()
        assert np.abs(ours - want).max() < 1e-4
        assert np.abs(ours - dense)[real].max() > 1e-2
    _check_no_square_constants(m, {40, 57})


def test_a_padded_dense_export_is_the_models_padded_forward(tmp_path):
    """No plan: the file's padded batch equals Hugging Face's own padded forward at every real position."""
    model = _llama()
    export_onnx(model, _padded(30, (0, 9)), tmp_path / "pd.onnx")
    for n, pads in ((30, (0, 9)), (45, (17, 0))):
        ids, mask, positions = _padded(n, pads, seed=n)
        with torch.no_grad():
            want = model(ids, attention_mask=mask, position_ids=positions).logits.numpy()
        real = mask.bool().numpy()
        assert np.abs(_run_all(tmp_path / "pd.onnx", ids, mask, positions) - want)[real].max() < 1e-4


def test_a_batch_without_position_ids_runs_in_onnx_runtime(tmp_path):
    """Two rows and no position_ids: Hugging Face's rotary embedding gives its cos / sin for one row, which
    ONNX's RotaryEmbedding (fused by the exporter) refuses at run time once the batch is 2 ("cos_cache ...
    expected to have the same shape as input x"). The capture expands the positions to the batch: the file
    runs, and equals the model's own forward without position_ids, at another batch size and length too."""
    model = _llama()
    ids, mask, _ = _padded(24, (0, 7))
    res = export_onnx(model, (ids, mask), tmp_path / "np.onnx", plan=_mixed_plan(model))
    assert res.ort_max_abs_diff is not None and res.ort_max_abs_diff < 1e-4      # the export ran the file itself
    m = onnx.load(str(tmp_path / "np.onnx"))
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert "RotaryEmbedding" in {nd.op_type for nd in m.graph.node}
    for n, pads in ((24, (0, 7)), (33, (11, 0, 4))):
        ids, mask, _ = _padded(n, pads, seed=n)
        want = _torch_padded(model, _mixed_plan(model), ids, mask, None)
        assert np.abs(_run_all(tmp_path / "np.onnx", ids, mask) - want).max() < 1e-4


def test_a_file_that_fails_in_onnx_runtime_is_an_export_error(tmp_path, monkeypatch):
    """The export runs the file it wrote on the example inputs: without the per-row positions above, the
    file checks but fails in ONNX Runtime, which export_onnx reports instead of returning it."""
    import contextlib

    from attnforge.compiler import export as E

    monkeypatch.setattr(E, "_rotary_per_row", lambda model: contextlib.nullcontext())
    model = _llama()
    with pytest.raises(ExportError, match="does not run in ONNX Runtime .* RotaryEmbedding"):
        export_onnx(model, _padded(24, (0, 7))[:2], tmp_path / "bad.onnx")
    assert export_onnx(model, _padded(24, (0, 7))[:2], tmp_path / "unchecked.onnx", check=False).ort_max_abs_diff is None


def test_a_padded_encoder_exports_bidirectional_rows(tmp_path):
    """A BERT-style encoder with right padding (as tokenizers pad encoders): padded bidirectional sites, and
    the file equals Hugging Face's own forward at every real position at two lengths."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    cfg._attn_implementation = "sdpa"
    model = transformers.BertModel(cfg).eval()

    def batch(n, pads):
        ids = torch.randint(1, 256, (len(pads), n), generator=torch.Generator().manual_seed(n))
        mask = torch.ones_like(ids)
        for i, p in enumerate(pads):
            mask[i, n - p:] = 0
        return ids, mask

    res = export_onnx(model, batch(30, (0, 9)), tmp_path / "e.onnx")
    assert len(res.sites) == 2 and not res.declined
    functions = [f for f in onnx.load(str(tmp_path / "e.onnx")).functions if f.domain == DOMAIN]
    assert [list(f.input) for f in functions] == [["Q", "K", "V", "P"]]       # from the flags, no N x S mask input
    for n, pads in ((30, (0, 9)), (47, (20, 3))):
        ids, mask = batch(n, pads)
        with torch.no_grad():
            want = model(ids, attention_mask=mask).last_hidden_state.numpy()
        real = mask.bool().numpy()
        assert np.abs(_run_all(tmp_path / "e.onnx", ids, mask) - want)[real].max() < 1e-4


def test_dense_export_matches_the_model(tmp_path):
    model = _llama()
    res = export_onnx(model, (_ids(24),), tmp_path / "d.onnx")
    assert all(s["forms"] == "dense" for s in res.sites) and len(res.functions) == 1   # both sites share one body
    for n in (24, 61):
        ids = _ids(n, seed=n)
        with torch.no_grad():
            want = model(ids).logits.numpy()
        assert np.abs(_run(tmp_path / "d.onnx", ids) - want).max() < 1e-4


def test_hand_spelled_attention_exports(tmp_path):
    """A model whose attention is spelled by hand (matmul, an additive causal mask from a buffer,
    softmax, repeat_kv), not SDPA: the passes rewrite it, the file runs at two lengths."""
    model, (ids,) = tiny(48)
    sites = af.find_attention(model, (ids,))
    plan = Plan(fingerprint(sites), "tiny", tuple(SitePlan(s.id, 8, 2, (af.SinkWindow(4, 16), af.Dense()))
                                                 for s in sites), {}, (48,))
    export_onnx(model, (ids,), tmp_path / "t.onnx", plan=plan)
    for n in (48, 100):
        x = _ids(n, seed=n)
        torch._dynamo.reset()
        with torch.no_grad():
            want = torch.compile(model, backend=af.Backend(plan=plan, impl="reference", compiler="eager"))(x)
        assert np.abs(_run(tmp_path / "t.onnx", x) - want.numpy()).max() < 1e-4


def test_a_square_constant_is_refused():
    from onnx import helper, numpy_helper

    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.zeros((40, 40), bool), "mask")])
    with pytest.raises(ExportError, match="N x N mask"):
        _check_no_square_constants(helper.make_model(graph), {40})


def test_model_without_attention_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    with pytest.raises(ExportError, match="no attention found"):
        export_onnx(model, (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "x.onnx")


def test_plan_for_another_model_is_refused(tmp_path):
    model = _llama()
    other = _mixed_plan(_llama(layers=3))
    with pytest.raises(af.PlanError):
        export_onnx(model, (_ids(40),), tmp_path / "x.onnx", plan=other)


def test_cli_export(tmp_path, capsys):
    from attnforge.compiler.cli import main

    assert main(["export", "tiny", "--seq-len", "32", "--onnx", str(tmp_path / "c.onnx"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["opset"] == 23 and len(out["sites"]) == 2 and (tmp_path / "c.onnx").exists()
    assert main(["export", "tiny", "--plan", str(tmp_path / "missing.json"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_a_model_that_cannot_be_captured_names_why(tmp_path):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)

        def forward(self, ids):
            x = self.emb(ids)
            if x.sum() > 0:                       # control flow on a tensor's value: no single graph
                x = x * 2
            q = x.view(1, ids.shape[1], 2, 4).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    with pytest.raises(ExportError, match="capturing DataDependent for export failed") as e:
        export_onnx(DataDependent(), (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "x.onnx")
    assert "graph" in str(e.value)
