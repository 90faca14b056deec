"""Streaming packing (apt_data.loader.stream): no repeat within an epoch, every sample once per pass, full
batches, exact continuation from a saved state. Token counts here are drawn per (pass, sample), as
augmentation makes them; the loader tests run the same logic over real photos."""
from collections import Counter

import numpy as np
import pytest

from apt_data.loader.stream import (Item, SampleStream, StreamPacker, WorkerState, epoch_batches, epoch_length,
                                    partition, worker_quotas)

MAX_TOKENS = 4096


def tokens_of(ref):
    p, s = ref
    return int(np.random.default_rng([p, s]).integers(60, 400))


def process(ref):
    return Item(ref, tokens_of(ref), payload=ref)


def run(n=500, world=2, workers=2, epochs=4, steps=None, seed=0, open_bins=2):
    """Every rank's and worker's emitted batches per epoch, continuing state from epoch to epoch."""
    mean = np.mean([tokens_of((0, s)) for s in range(n)])
    sizes = [len(partition(n, seed, r, world, w, workers)) for r in range(world) for w in range(workers)]
    steps = steps or epoch_length(sizes, mean, MAX_TOKENS, None, workers, open_bins)[0]
    out = []  # out[epoch] = list of batches (lists of refs) over all ranks/workers
    states = {}
    for e in range(epochs):
        batches = []
        for r in range(world):
            for w, q in enumerate(worker_quotas(steps, workers)):
                part = partition(n, seed, r, world, w, workers)
                st = states.get((r, w), WorkerState())
                stream = SampleStream(part, seed, r * workers + w, state=st)
                packer = StreamPacker(MAX_TOKENS, open_bins=open_bins)
                packer.restore([[process((p, s)) for p, s, _ in b] for b in st.bins], st.ready)
                last = st
                for items, last in epoch_batches(stream, packer, q, process):
                    batches.append([it.ref for it in items])
                states[(r, w)] = last.next_epoch()
        out.append(batches)
    return out, states, steps


def test_partitions_cover_every_sample_once():
    parts = [partition(103, 7, r, 3, w, 2) for r in range(3) for w in range(2)]
    allv = np.concatenate(parts)
    assert sorted(allv.tolist()) == list(range(103))


def test_quotas_follow_the_dataloader_round_robin():
    assert worker_quotas(7, 3) == [3, 2, 2]
    assert sum(worker_quotas(11, 4)) == 11


def test_no_repeat_within_an_epoch_and_once_per_pass():
    out, states, steps = run()
    seen_per_pass = Counter()
    for batches in out:
        samples = [s for b in batches for _, s in b]
        assert len(samples) == len(set(samples)), "a sample appears twice in one epoch"
        seen_per_pass.update(batches_refs for b in batches for batches_refs in b)
        assert len(batches) == steps * 2  # every rank emits `steps` batches
    assert max(seen_per_pass.values()) == 1  # a (pass, sample) is emitted at most once
    # pass 0 is complete after 4 epochs of about one pass each: every sample emitted once in it
    assert {s for (p, s) in seen_per_pass if p == 0} == set(range(500))


def test_batches_are_full():
    out, _, _ = run(epochs=3)
    fills = [sum(tokens_of(r) for r in b) / MAX_TOKENS for batches in out for b in batches]
    assert min(fills) > 0.5 and np.mean(fills) > 0.98


def test_deterministic():
    a, _, _ = run(epochs=2)
    b, _, _ = run(epochs=2)
    assert a == b


def test_continuing_from_a_mid_epoch_state_gives_the_same_batches():
    part = partition(300, 1, 0, 1, 0, 1)
    full_stream = SampleStream(part, 1, 0)
    packer = StreamPacker(MAX_TOKENS)
    full = list(epoch_batches(full_stream, packer, 9, process))
    k = 4
    state = full[k - 1][1]
    # a fresh process: replay the draws, re-process the pending samples, continue
    stream = SampleStream(part, 1, 0, state=WorkerState())
    stream.replay(state.draws, state.resets)
    packer = StreamPacker(MAX_TOKENS)
    packer.restore([[process((p, s)) for p, s, _ in b] for b in state.bins], state.ready)
    rest = list(epoch_batches(stream, packer, 9, process, emitted=state.emitted))
    assert [[it.ref for it in b] for b, _ in rest] == [[it.ref for it in b] for b, _ in full[k:]]


def test_an_epoch_longer_than_a_pass_halves_its_bins_before_repeating():
    part = partition(40, 0, 0, 1, 0, 1)
    packer = StreamPacker(MAX_TOKENS)
    resets = []
    # 40 samples fill about 2 batches: 6 are made by halving, still without a repeat
    batches = [b for b, _ in epoch_batches(SampleStream(part, 0, 0), packer, 6, process, on_reset=resets.append)]
    refs = [it.ref[1] for b in batches for it in b]
    assert len(batches) == 6 and sorted(refs) == sorted(part.tolist()) and not resets
    # 50 batches need more than 40 samples: the stream draws its partition again, and says so
    batches = [b for b, _ in epoch_batches(SampleStream(part, 0, 0), StreamPacker(MAX_TOKENS), 50, process,
                                           on_reset=resets.append)]
    assert len(batches) == 50 and all(batches) and resets


def test_eval_pass_sees_every_sample_once():
    part = np.arange(37)
    stream = SampleStream(part, 0, 0, shuffle=False)
    packer = StreamPacker(MAX_TOKENS, max_images=5)
    batches = [b for b, _ in epoch_batches(stream, packer, None, process)]
    refs = sorted(it.ref[1] for b in batches for it in b)
    assert refs == list(range(37))
    assert all(len(b) <= 5 for b in batches)


def test_too_large_sample_is_an_error():
    packer = StreamPacker(100)
    with pytest.raises(ValueError, match="max_tokens=100"):
        packer.add(Item((0, 0), 101))


@pytest.mark.parametrize("n", [40, 60, 80])
def test_a_small_partition_plays_one_whole_pass_spread_evenly(n):
    """A partition of fewer than PASS_BATCHES batches (a third of it in open batches): every epoch is one
    whole pass, nothing carried over, and the last batches as full as the first (no nearly empty tail)."""
    part = partition(n, 3, 0, 1, 0, 1)
    mean = np.mean([tokens_of((0, s)) for s in part])
    steps, whole = epoch_length([n], mean, MAX_TOKENS, None, 1)
    assert whole and steps >= 2
    assert not epoch_length([500], mean, MAX_TOKENS, None, 1)[1]  # a larger one streams
    state = WorkerState()
    for epoch in range(3):
        stream, packer = SampleStream(part, 3, 0, state=state), StreamPacker(MAX_TOKENS)
        out = list(epoch_batches(stream, packer, steps, process, spread=True))
        batches = [[it.ref for it in b] for b, _ in out]
        assert sorted(s for b in batches for _, s in b) == sorted(part.tolist())  # every sample, once
        state = out[-1][1]
        assert not state.pending() and not state.deferred  # nothing carries over
        sizes = [len(b) for b in batches]
        assert len(batches) == steps and max(sizes) - min(sizes) <= 2, sizes  # spread evenly
        fills = [sum(tokens_of(r) for r in b) / MAX_TOKENS for b in batches]
        assert min(fills) > 0.6 and max(fills) <= 1.0, fills
        state = state.next_epoch()
