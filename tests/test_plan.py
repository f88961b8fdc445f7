"""Plan files: round trip, and every kind of bad input gives a PlanError that says what is wrong."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnforge as af
from attnforge.compiler.plan import SitePlan, fingerprint


class _Site:
    def __init__(self, id, h=4, hk=2, d=16, causal=True):
        self.id, self.num_heads, self.num_kv_heads, self.head_dim, self.causal = id, h, hk, d, causal


SITES = [_Site("m.layers.0.attn#0"), _Site("m.layers.1.attn#0")]


def _plan():
    sites = tuple(SitePlan(s.id, 4, 2, (af.Dense(), af.SinkWindow(4, 16))) for s in SITES)
    return af.Plan(fingerprint(SITES), "toy", sites, {"density": 0.5}, (64,), {"loss": {"64": 0.1}})


def test_round_trip(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    back = af.Plan.load(tmp_path / "plan.json")
    assert back == plan
    back.check(SITES)
    assert 0 < back.density(64) < 1


def _write(tmp_path, data):
    p = tmp_path / "plan.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(version=99), "schema version 99"),
    (lambda d: d.pop("schema"), "not an attnforge plan"),
    (lambda d: d.pop("fingerprint"), "missing the field 'fingerprint'"),
    (lambda d: d["sites"][0].update(num_kv_heads="2"), r"sites\[0\].num_kv_heads must be int"),
    (lambda d: d["sites"][0].update(num_heads=5), "do not group"),
    (lambda d: d["sites"][0]["forms"].pop(), "1 forms for 2 KV head groups"),
    (lambda d: d["sites"][1]["forms"][0].update(kind="lsh"), r"sites\[1\].forms: unknown form kind 'lsh'"),
    (lambda d: d["sites"].append(dict(d["sites"][0])), "appears twice"),
])
def test_bad_plans_are_named(tmp_path, mutate, msg):
    data = _plan().to_dict()
    mutate(data)
    with pytest.raises(af.PlanError, match=msg):
        af.Plan.load(_write(tmp_path, data))


def test_malformed_json_and_missing_file(tmp_path):
    with pytest.raises(af.PlanError, match="not valid JSON"):
        af.Plan.load(_write(tmp_path, '{"schema": "attnforge.plan", '))
    with pytest.raises(af.PlanError, match="cannot read plan"):
        af.Plan.load(tmp_path / "nope.json")


def test_plan_for_another_model_is_refused():
    plan = _plan()
    with pytest.raises(af.PlanError, match="sites the model does not have"):
        plan.check([_Site("other#0")])
    with pytest.raises(af.PlanError, match="expects 4 heads / 2 KV heads"):
        plan.check([_Site(SITES[0].id, h=8, hk=8), SITES[1]])
    with pytest.raises(af.PlanError, match="fingerprint"):
        plan.check([_Site(SITES[0].id, d=32), SITES[1]])


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20))
def test_fuzzed_documents_raise_only_plan_errors(doc):
    base = _plan().to_dict()
    for candidate in (doc, {**base, "sites": doc}, {**base, "sites": [doc]},
                      {**base, "sites": [{**base["sites"][0], "forms": doc}]}):
        try:
            af.Plan.from_dict(candidate)
        except af.PlanError:
            pass
