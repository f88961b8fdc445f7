"""The TMA variants of the forward kernels (K and V tiles through Hopper's tensor memory accelerator: host
TensorDescriptors, which Triton's interpreter runs too) against float64, against the same tile through
pointer loads, and where a tensor cannot have a descriptor (the pointer loads run instead)."""
import pytest
import torch

from attnforge import codegen
from attnforge.runtime import attention_reference, blockmeta, kernels
from attnforge.runtime.forms import BlockSparse, Dense, ElasticWindow, SinkWindow, forms_to_json
from conftest import assert_closer

pytestmark = pytest.mark.skipif(not kernels.interpreter_enabled(), reason="needs TRITON_INTERPRET=1")
pytest.importorskip("triton.tools.tensor_descriptor")

FORMS = (BlockSparse(64, (0, 2), (0, 1)), SinkWindow(4, 70), ElasticWindow(8, 16, 0.25))


def _module(plan):
    key = kernels.register_source(codegen.render_attention(codegen.KernelSpec(causal=True, plan=plan)).source)
    return kernels.load_kernel(key, torch.device("cpu"))


def _counting(monkeypatch, loaded):
    """Count the launches that got descriptors (the kernel then takes its TMA branch)."""
    made = []
    real = loaded.module._descriptors

    def descriptors(*args):
        d = real(*args)
        made.append(d is not None)
        return d

    monkeypatch.setattr(loaded.module, "_descriptors", descriptors)
    return made


def _launch(loaded, plan, q, k, v, config, lens=None):
    out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype)
    if plan:
        from attnforge.runtime import padding

        per_row = lens is not None                 # each row's elastic span from its own length
        meta = blockmeta.block_meta(forms_to_json(FORMS), q.shape[1] // k.shape[1], q.shape[2], k.shape[2],
                                    config[0], config[1], "cpu", per_row)
        windows = padding.row_windows(FORMS, lens) if per_row else None
        loaded.launch(q, k, v, out, 0.2, meta, config=config, lens=lens, windows=windows)
    else:
        loaded.launch(q, k, v, None, out, 0.2, 0, config=config, lens=lens)
    return out


def _reference(q, k, v, plan):
    forms = FORMS if plan else ()
    return (attention_reference(q.double(), k.double(), v.double(), None, True, 0.2, forms=forms),
            attention_reference(q.float(), k.float(), v.float(), None, True, 0.2, forms=forms))


@pytest.mark.parametrize("plan", [False, True], ids=["dense", "plan"])
@pytest.mark.parametrize("d", [32, 40])
def test_every_tma_config_equals_its_pointer_twin_and_float64(plan, d, monkeypatch):
    """Each TMA config in CONFIGS: descriptors made and the same output, bit for bit, as the same tile through
    pointer loads (keys past S read as zeros either way; head dim 40 pads its tile with zeros either way), and
    within PyTorch's own float32 error of float64; N, S not multiples of any tile, queries at the end of S."""
    loaded = _module(plan)
    made = _counting(monkeypatch, loaded)
    g = torch.Generator().manual_seed(d)
    q = torch.randn(1, 6, 130, d, generator=g)
    k, v = torch.randn(1, 3, 258, d, generator=g), torch.randn(1, 3, 258, d, generator=g)
    ref64, eager = _reference(q, k, v, plan)
    tma = [c for c in loaded.module.CONFIGS if c[4]]
    assert len(tma) >= 3
    for config in tma:
        out = _launch(loaded, plan, q, k, v, config)
        assert made[-1], f"{config}: no descriptors were made"
        assert torch.equal(out, _launch(loaded, plan, q, k, v, (*config[:4], False))), config
        assert_closer(out, eager, ref64)


@pytest.mark.parametrize("plan", [False, True], ids=["dense", "plan"])
def test_a_compacted_row_with_nan_past_its_length_stays_finite(plan, monkeypatch):
    """A padded batch compacted (runtime.padding): row 1 holds 90 of 200 tokens and its slots past them are
    anything (NaN here). TMA loads them (they are inside the tensor), so V is zeroed there before P @ V:
    the row's output equals that row alone."""
    loaded = _module(plan)
    made = _counting(monkeypatch, loaded)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, h, 200, 32, generator=g) for h in (6, 3, 3))
    for t in (q, k, v):
        t[1, :, 90:] = float("nan")
    lens = torch.tensor([200, 90], dtype=torch.int32)
    config = next(c for c in loaded.module.CONFIGS if c[4] and c[:2] == (128, 64))
    out = _launch(loaded, plan, q, k, v, config, lens=lens)
    assert made == [True]
    assert torch.isfinite(out[1, :, :90]).all() and torch.isfinite(out[0]).all()
    forms = FORMS if plan else ()
    for row, n in ((0, 200), (1, 90)):
        alone = [t[row:row + 1, :, :n] for t in (q, k, v)]
        ref64 = attention_reference(*(t.double() for t in alone), None, True, 0.2, forms=forms)
        eager = attention_reference(*alone, None, True, 0.2, forms=forms)
        assert_closer(out[row:row + 1, :, :n], eager, ref64)


def test_tensors_without_a_descriptor_take_the_pointer_loads(monkeypatch):
    """A head dim whose rows are not a multiple of 16 bytes (36 fp16: 72 bytes) or a head dim that is not
    innermost cannot have a TMA descriptor: a TMA config then runs the same tile with pointer loads."""
    loaded = _module(False)
    made = _counting(monkeypatch, loaded)
    g = torch.Generator().manual_seed(4)
    config = next(c for c in loaded.module.CONFIGS if c[4])
    q, k, v = (torch.randn(1, h, 70, 36, generator=g).half() for h in (4, 2, 2))
    kt = torch.randn(1, 2, 32, 70, generator=g).half().transpose(-1, -2)   # head dim strided
    for keys, values in ((k, v), (kt, kt.clone())):
        out = _launch(loaded, False, q[..., :keys.shape[-1]], keys, values, config)
        assert made[-1] is False
        ref64, eager = _reference(q[..., :keys.shape[-1]], keys, values, False)
        assert_closer(out, eager.to(out.dtype), ref64, slack=4.0, floor=1e-3)
