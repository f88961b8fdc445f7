"""Forms: keep masks, closed-form pair counts, serialization, decoding alignment."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnforge.runtime.forms import (BlockSparse, Dense, ElasticWindow, FormError, SinkWindow, form_from_dict,
                                     forms_from_json, forms_to_json, keep_mask, kept_pairs)

forms_st = st.one_of(
    st.just(Dense()),
    st.builds(SinkWindow, st.integers(0, 40), st.integers(1, 90)),
    st.builds(ElasticWindow, st.integers(0, 40), st.integers(1, 50), st.floats(0, 0.9)),
    st.builds(BlockSparse, st.integers(1, 16), st.lists(st.integers(0, 10), max_size=4).map(tuple),
              st.lists(st.integers(0, 10), max_size=4).map(tuple)),
)


@settings(max_examples=150, deadline=None)
@given(forms_st, st.integers(1, 150))
def test_kept_pairs_counts_the_mask(form, n):
    assert kept_pairs(form, n) == int(keep_mask([form], n, n).sum())


@settings(max_examples=100, deadline=None)
@given(forms_st)
def test_json_round_trip(form):
    assert forms_from_json(forms_to_json([form, Dense()])) == (form, Dense())


def test_every_row_sees_itself_and_nothing_in_the_future():
    for form in (SinkWindow(2, 1), ElasticWindow(0, 1, 0.0), BlockSparse(4, (), ())):
        keep = keep_mask([form], 33, 33)[0]
        assert keep.diagonal().all() and not keep.triu(1).any()


def test_decoding_rows_are_the_last_positions():
    form = SinkWindow(2, 3)
    full = keep_mask([form], 20, 20)[0]
    assert torch.equal(keep_mask([form], 1, 20)[0], full[-1:])
    assert torch.equal(keep_mask([form], 5, 20)[0], full[-5:])


@pytest.mark.parametrize("bad,msg", [({"kind": "magic"}, "unknown form kind"), ({"window": 3}, "'kind'"),
                                     ({"kind": "sink_window", "sink": 1}, "missing"),
                                     ({"kind": "sink_window", "sink": 1, "window": 0}, "window >= 1"),
                                     ({"kind": "dense", "x": 1}, "unexpected")])
def test_bad_forms_are_named(bad, msg):
    with pytest.raises(FormError, match=msg):
        form_from_dict(bad)


@pytest.mark.parametrize("form", [Dense(), SinkWindow(4, 7), SinkWindow(0, 300),
                                  ElasticWindow(3, 5, 0.25), BlockSparse(8, (0, 5), (0, 2))])
@pytest.mark.parametrize("n", [1, 9, 64, 100])
def test_kv_tokens_is_what_the_cache_holds_and_covers_every_later_read(form, n):
    """kv_tokens = the slots attnforge's KV cache allocates for the form; every key that any query at
    position >= n - 1 will still read is among them; windows hold exactly what the newest query reads."""
    from attnforge.runtime.forms import keep_mask, kv_read, kv_tokens
    from attnforge.runtime.kvcache import layout_for

    assert kv_read(form, n) == int(keep_mask([form], n, n)[0, -1].sum())
    assert kv_tokens(form, n) == layout_for(form, n).capacity(n)
    later = keep_mask([form], 64, n + 63)[0, :, :n].any(0)          # keys < n read by queries n-1 .. n+62
    assert kv_tokens(form, n, max_length=n + 63) >= int(later.sum())     # elastic spans: sized for the end
    if form.kind != "block_sparse":
        assert kv_tokens(form, n) == kv_read(form, n)
