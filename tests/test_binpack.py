"""Greedy token-budget bin-packing and the rank split."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_data.binpack import pack_greedy, pack_greedy_reference, split_for_ranks


@given(st.lists(st.integers(1, 600), min_size=0, max_size=300), st.integers(600, 5000),
       st.one_of(st.none(), st.integers(1, 20)), st.integers(1, 10))
@settings(max_examples=200, deadline=None)
def test_every_item_once_within_budget_and_equal_to_reference(counts, budget, max_images, open_bins):
    bins = pack_greedy(counts, budget, max_images, open_bins)
    flat = np.concatenate(bins) if bins else np.array([], int)
    assert sorted(flat.tolist()) == list(range(len(counts)))
    for b in bins:
        assert len(b) > 0 and sum(counts[i] for i in b) <= budget
        assert max_images is None or len(b) <= max_images
        assert (np.diff(b) > 0).all()  # input order kept inside a bin
    ref = pack_greedy_reference(counts, budget, max_images, open_bins)
    assert [b.tolist() for b in bins] == ref


def test_fill_on_realistic_counts():
    """APT token counts of 224-px images (~100-197 tokens): more open bins fill better."""
    rng = np.random.default_rng(0)
    counts = rng.integers(90, 198, 5000)
    fills = {}
    for k in (1, 8):
        bins = pack_greedy(counts, 4096, open_bins=k)
        fills[k] = counts.sum() / (len(bins) * 4096)
    assert fills[8] > 0.99 and fills[8] >= fills[1]


def test_oversized_sample_names_itself():
    with pytest.raises(ValueError, match=r"sample b\.jpg needs 700 tokens.*max_tokens=600"):
        pack_greedy([100, 700], 600, names=["a.jpg", "b.jpg"])
    with pytest.raises(ValueError, match="max_tokens"):
        pack_greedy([1], 0)


@given(st.lists(st.integers(1, 50), min_size=4, max_size=80), st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_split_for_ranks_gives_equal_counts(counts, world):
    bins = pack_greedy(counts, 120)
    if len(counts) < world:
        return
    try:
        split = split_for_ranks(bins, world)
    except ValueError as e:
        assert "single-image" in str(e)
        return
    assert len(split) % world == 0
    assert sorted(np.concatenate(split).tolist()) == list(range(len(counts)))
    per_rank = [split[r::world] for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
