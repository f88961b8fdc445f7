"""Packed batches (runtime.padding with integer labels): several sequences in one row, each computed as that
sequence alone, through the same kernels (one compacted row per sequence).

The oracle is the sequence alone (padding.attention_rows: a host loop over rows and labels, each sequence cut
out and run through attention_reference on its own), itself checked against plain calls of the op."""
import pytest
import torch

import attnforge as af
from attnforge.compiler import hf
from attnforge.runtime import kernels
from attnforge.runtime import padding as P
from attnforge.runtime.forms import ElasticWindow, SinkWindow, forms_to_json

from conftest import assert_closer
from test_padding import MIXES, _key, _llama, _plan, backward_against_alone, interpreted


def _labels(s=150):
    """Row 0: three packed sequences (60, 70, 20 tokens); row 1: left padding, then sequences of 40, 1 and 89
    tokens, labels not starting at 1; row 2: one sequence with a hole (a 0/1 row, as an attention_mask)."""
    lab = torch.zeros(3, s, dtype=torch.long)
    lab[0, :60], lab[0, 60:130], lab[0, 130:] = 1, 2, 3
    lab[1, 10:50], lab[1, 50], lab[1, 51:140] = 5, 6, 7
    lab[2, :100] = 1
    lab[2, 3] = 0
    return lab


def _data(s=150, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, x, s, 16, generator=gen).to(dtype) for x in (4, 2, 2))
    return q, k, v, _labels() if s == 150 else None


def test_sequences_alone_is_the_op_on_each_sequence():
    """The oracle itself: each labelled sequence equals the op on that sequence's tokens alone (forms at its own
    positions and length), zeros at padding queries, for N = S and N < S; a label that comes back after other
    tokens (1, 1, 0, 1) is still one sequence."""
    q, k, v, _ = _data(s=40, dtype=torch.float64)
    lab = torch.zeros(3, 40, dtype=torch.long)
    lab[0, :12], lab[0, 12:35], lab[0, 35:] = 1, 2, 1   # sequence 1 resumes after sequence 2
    lab[1, 4:20], lab[1, 20], lab[1, 21:] = 5, 6, 7
    lab[2, :] = 1
    lab[2, 3] = 0
    forms = (SinkWindow(2, 7), ElasticWindow(1, 3, 0.25))
    for n in (40, 6):
        got = P.attention_rows(q[:, :, -n:], k, v, lab, True, 0.3, forms)
        for r in range(3):
            for label in set(lab[r].tolist()) - {0}:
                slots = (lab[r] == label).nonzero().squeeze(1)
                qs = slots[slots >= 40 - n]
                if not len(qs):
                    continue
                alone = torch.ops.attnforge.attention(q[r:r + 1, :, qs], k[r:r + 1, :, slots], v[r:r + 1, :, slots],
                                                      None, False, 0, 0.3, "reference", "", forms_to_json(forms))
                assert torch.allclose(got[r:r + 1, :, qs - (40 - n)], alone, atol=1e-12)
        if n == 40:
            assert not got[2, :, 3].any() and not got[1, :, :4].any()


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_packed_reference_equals_the_sequences_alone(mix):
    """The op's PyTorch path (device ops only, one mask over each row's compacted keys) is the oracle, causal
    and not, N = S and N < S; the same rows read as padding only (every token one sequence) differ."""
    forms = MIXES[mix]
    q, k, v, lab = _data(dtype=torch.float64)
    for causal in ((True, False) if not forms else (True,)):
        for n in (150, 20):
            want = P.attention_rows(q[:, :, -n:], k, v, lab, causal, 0.25, forms)
            got = torch.ops.attnforge.attention(q[:, :, -n:], k, v, None, causal, 0, 0.25, "reference", "",
                                                forms_to_json(forms), lab)
            assert torch.allclose(got, want, atol=1e-12)
            merged = P.attention_rows(q[:, :, -n:], k, v, lab != 0, causal, 0.25, forms)
            assert (merged - want)[:2].abs().max() > 0.1        # the labels are what separates the sequences
    assert af.runtime.counters["padded"] == af.runtime.counters["reference"] > 0


def test_segments_of_compacts_one_row_per_sequence():
    lab = _labels()
    rows = P.segments_of(lab)
    assert rows.src.tolist() == [0, 0, 0, 1, 1, 1, 2] and rows.lens.tolist() == [60, 70, 20, 40, 1, 89, 99] and \
        rows.order.shape == (7, 99)
    assert rows.order[4, 0] == 50 and rows.order[5, :89].tolist() == list(range(51, 140)) and \
        3 not in rows.order[6].tolist()
    assert P.segments_of(lab[2:]).src is None                 # one sequence per row: the per-row compaction
    assert P.segments_of(lab != 0).src is None                # a bool vector never packs (and never syncs)
    x = torch.randn(3, 2, 150, 4)
    back = P.scatter(P.gather(x, rows), rows)
    assert torch.equal(back, x * (lab != 0)[:, None, :, None])    # every token back in its slot, padding zeros
    lse = torch.randn(3, 2, 150)
    assert torch.equal(P.scatter_rows(P.gather_rows(lse, rows), rows, float("inf")),
                       lse.masked_fill((lab == 0)[:, None], float("inf")))


@interpreted
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_kernels_match_float64(mix, dtype):
    """The generated kernels over one compacted row per sequence (the `packed` counter says that path ran):
    within PyTorch's own error of the float64 sequences alone."""
    forms = MIXES[mix]
    q, k, v, lab = _data(dtype=dtype)
    for causal in ((True, False) if not forms else (True,)):
        af.runtime.reset_counters()
        out = torch.ops.attnforge.attention(q, k, v, None, causal, 0, 0.25, "triton", _key(causal=causal, plan=bool(forms)),
                                            forms_to_json(forms), lab)
        assert af.runtime.counters["packed"] == af.runtime.counters["triton_interpreter"] == 1
        assert af.runtime.counters["reference"] == 0
        ref = P.attention_rows(q.double(), k.double(), v.double(), lab, causal, 0.25, forms)
        assert_closer(out, P.reference(q, k, v, lab, causal, 0.25, forms), ref)
        assert not out[1, :, :10].any() and not out[2, :, 100:].any() and not out[2, :, 3].any()


@interpreted
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_packed_backward_matches_float64(mix):
    """attention_train + backward through the plan kernel's backward, compacted per sequence like the forward:
    gradients within PyTorch's own error of the float64 sequences alone."""
    q, k, v, lab = _data(seed=1)
    leaves, lse = backward_against_alone(q, k, v, lab, MIXES[mix])
    assert af.runtime.counters["packed"] == 1
    assert not leaves[1].grad[1, :, :10].any() and torch.isinf(lse[1, :, :10]).all() and torch.isfinite(lse[0]).all()


def test_linear_forms_take_each_sequence_alone_and_a_trace_says_why_not():
    """Linear hybrids run causal self-attention over one compacted row per sequence (the count is read on the
    host, at run time); traced on fake tensors, the compaction says what to do instead of a data-dependent
    error (a compiled step with impl='auto' keeps it in an op: tests/test_linear_backward.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnforge.runtime.forms import Linear

    q, k, v, lab = _data(dtype=torch.float64)
    forms = (Linear("taylor2", 16), Linear("taylor2", 8))
    got = torch.ops.attnforge.attention(q, k, v, None, True, 0, 0.25, "reference", "", forms_to_json(forms), lab)
    assert torch.allclose(got, P.attention_rows(q, k, v, lab, True, 0.25, forms), atol=1e-10)
    with FakeTensorMode() as mode, pytest.raises(NotImplementedError, match="linear_backward op reads it at run time"):
        P.segments_of(mode.from_tensor(lab))


@pytest.mark.parametrize("keys", ["padding", "labels"])
def test_linear_and_elastic_groups_take_each_sequences_own_length(keys):
    """A site mixing a Linear group with an elastic window: the window's span is the sequence's own length
    in the reference, its backward and the kernels (the linear path used to run every group over the
    compacted width, so the elastic span came from the longest row: error 0.85 on a left-padded row)."""
    from attnforge.runtime.forms import Linear

    import test_padding

    q, k, v, lab = _data(dtype=torch.float64)
    vector = test_padding._data()[3] if keys == "padding" else lab
    forms = (Linear("taylor2", 6, 2), ElasticWindow(1, 4, 0.2))
    want = P.attention_rows(q, k, v, vector, True, 0.25, forms)
    assert torch.allclose(P.reference(q, k, v, vector, True, 0.25, forms), want, atol=1e-10)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    P.attention_rows(*leaves, vector, True, 0.25, forms).backward(grad)
    for got, leaf in zip(P.reference_backward(grad, q, k, v, vector, True, 0.25, forms), leaves):
        assert torch.allclose(got, leaf.grad, atol=1e-10)
    if kernels.interpreter_enabled():
        af.runtime.reset_counters()
        out = torch.ops.attnforge.attention(q.float(), k.float(), v.float(), None, True, 0, 0.25, "triton",
                                            _key(causal=True, plan=True), forms_to_json(forms), vector)
        assert af.runtime.counters["triton_linear"] == 1 and af.runtime.counters["reference"] == 0
        assert (out.double() - want).abs().max() < 1e-5


def test_a_cache_refuses_a_packed_prompt():
    from attnforge.compiler.decode import KVCacheError
    from attnforge.runtime.kvcache import SiteKVCache

    cache = SiteKVCache((af.Dense(), af.Dense()), max_length=64)
    k = torch.randn(2, 2, 10, 16)
    labels = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]])
    with pytest.raises(KVCacheError, match="several sequences"):
        cache.append(k, k, labels)
    cache.append(k, k, labels.clamp(max=1))                     # one sequence per row (left padding) is fine
    assert list(cache.lens) == [8, 10]


# ----------------------------------------------------------------------------------- Hugging Face models

def _packed(lengths, seed=1, rows=1):
    """Token ids and positions of these sequences packed end to end into each row (as DataCollatorWithFlattening
    packs a batch), with the sequences alone."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[torch.randint(1, 256, (n,), generator=g) for n in lengths] for _ in range(rows)]
    ids = torch.stack([torch.cat(row) for row in seqs])
    positions = torch.cat([torch.arange(n) for n in lengths])[None].repeat(rows, 1)
    return seqs, ids, positions


def test_packed_labels_mask_is_hugging_faces_packed_mask():
    """The 4-D mask af.optimize gives a packed call equals the one Hugging Face builds from the same positions."""
    from transformers.masking_utils import create_causal_mask

    model = _llama()
    _, ids, positions = _packed((7, 1, 12), rows=2)
    positions[1] = torch.cat([torch.arange(5), torch.arange(15)])
    embeds = torch.zeros(2, 20, 64)
    want = create_causal_mask(model.config, embeds, None, None, position_ids=positions)
    got = torch.ops.attnforge.padding_mask(hf.packed_labels(positions, 2), 20, True)
    assert want.shape == got.shape and torch.equal(want, got)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_an_optimized_model_runs_packed_sequences_each_alone(impl):
    """af.optimize, use_cache=False, a packed row (positions restart per sequence): the sites are packed ones
    that keep the plan, and every sequence's logits equal that sequence run alone; with no plan they equal
    Hugging Face's own packed forward."""
    if impl == "triton" and not kernels.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    seqs, ids, positions = _packed((30, 17, 24), rows=2)
    model = _llama()
    model.config.use_cache = False
    with torch.no_grad():
        hf_packed = model(ids, position_ids=positions).logits
    af.optimize(model, _plan(model), impl=impl, compiler="eager")
    af.runtime.reset_counters()
    with torch.no_grad():
        out = model(ids, position_ids=positions).logits
        record = model.attnforge_backend.records[-1]
        assert [s.mask for s in record.sites] == ["padding", "padding"] and record.planned and not record.unplanned
        assert af.runtime.counters["padded"] == 2
        if impl == "triton":
            assert af.runtime.counters["packed"] == af.runtime.counters["triton_interpreter"] == 2
        start = 0
        for i, n in enumerate((30, 17, 24)):
            for r in range(2):
                alone = model(seqs[r][i][None]).logits
                assert (out[r, start:start + n] - alone[0]).abs().max() < 1e-4
            start += n
        assert (out - hf_packed).abs().max() > 1e-3               # the plan ran (not the dense forward)
    dense = _llama()
    dense.config.use_cache = False
    af.optimize(dense, _plan(dense, ((af.Dense(), af.Dense()),) * 2), impl=impl, compiler="eager")
    with torch.no_grad():
        assert (dense(ids, position_ids=positions).logits - hf_packed).abs().max() < 1e-4


def test_packed_training_step_through_inductor():
    """A compiled training step on packed rows: loss and every weight's gradient equal eager Hugging Face's on
    the same packed batch (its own packed-sequence mask), and differ from the same rows unpacked."""
    seqs, ids, positions = _packed((30, 17, 24), rows=2)
    positions[1] = torch.cat([torch.arange(40), torch.arange(31)])
    eager = _llama()
    eager.config.use_cache = False
    loss = eager(ids, position_ids=positions, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        unpacked = eager(ids, labels=ids).loss
    model = _llama()
    model.config.use_cache = False
    be = af.Backend(impl="reference")
    hf.uses_padding_masks(model)
    ours = torch.compile(hf.with_masks(model.forward, model), backend=be)(ids, position_ids=positions, labels=ids).loss
    ours.backward()
    assert [s.mask for s in be.records[0].sites] == ["padding", "padding"]
    assert abs(ours.item() - loss.item()) < 1e-5 and abs(unpacked.item() - loss.item()) > 1e-3
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-5, name


def test_models_with_sliding_layers_keep_hugging_faces_packed_mask():
    """A 4-D mask given to the model is handed to every layer: only a model whose every layer is full causal
    gets the packed labels' mask; others are called as given (Hugging Face builds each layer's mask)."""
    import transformers

    seen = []

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        seen.append(attention_mask)

    _, ids, positions = _packed((5, 6))
    for config, packs in ((transformers.LlamaConfig(use_cache=False), True),
                          (transformers.MistralConfig(use_cache=False, sliding_window=4), False),
                          (transformers.Qwen2Config(use_cache=False, layer_types=["full_attention", "sliding_attention"],
                                                    num_hidden_layers=2), False)):
        seen.clear()
        hf.with_masks(forward, type("M", (), {"config": config})())(ids, position_ids=positions)
        assert (seen[0] is not None and seen[0].dim() == 4) == packs, type(config).__name__
        hf.with_masks(forward, type("M", (), {"config": config})())(ids, position_ids=positions, use_cache=True)
        assert seen[-1] is None                                  # a cache: no packing (as Hugging Face decides)
    # checkpointed training keeps no cache even where the config says use_cache (Hugging Face's own rule)
    config = transformers.LlamaConfig(use_cache=True)
    for checkpointing, training, packs in ((True, True, True), (False, True, False), (True, False, False)):
        model = type("M", (), {"config": config, "is_gradient_checkpointing": checkpointing, "training": training})()
        hf.with_masks(forward, model)(ids, position_ids=positions)
        assert (seen[-1] is not None) == packs
