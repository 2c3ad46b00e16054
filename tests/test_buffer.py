"""The prefetch buffer's semantics on small hand-worked cases, and served rows equal to the source rows."""

import numpy as np
import pytest
from rudder.env.buffer import EMPTY, PrefetchBuffer

N = 100
D = 3
FEAT = np.repeat(np.arange(N, dtype=np.float32)[:, None], D, axis=1) + np.array([0.0, 0.25, 0.5], np.float32)


class RecordingFetch:
    """Pulls rows of FEAT and records each pull's ids (one call = one RPC round)."""

    def __init__(self):
        self.calls = []

    def __call__(self, ids):
        self.calls.append(np.asarray(ids).tolist())
        return FEAT[ids]


def test_hits_and_misses_serve_the_source_rows():
    buf = PrefetchBuffer(capacity=4, num_nodes=N, alpha=0.5, period=2, feat_dim=D)
    fetch = RecordingFetch()
    buf.fill([10, 11], fetch)
    assert fetch.calls == [[10, 11]]
    rows, step = buf.lookup([11, 20, 10, 30], fetch)
    np.testing.assert_array_equal(rows, FEAT[[11, 20, 10, 30]])
    assert (step.hits, step.misses, step.remote_fetched, step.prefetched) == (2, 2, 2, 0)
    assert fetch.calls[-1] == [20, 30]  # only the misses are pulled
    c = buf.counters
    assert (c.remote_sampled, c.hits, c.misses, c.remote_fetched, c.prefetched, c.initial_fill) == (4, 2, 2, 4, 2, 2)


def test_scores_decay_per_minibatch_and_hits_restore_them():
    buf = PrefetchBuffer(capacity=2, num_nodes=N, alpha=0.5, period=2)
    buf.fill([10, 11])  # both admitted at minibatch 0
    buf.lookup([10])  # minibatch 1: 10 hit, score back to 1
    buf.lookup([])  # 2
    buf.lookup([])  # 3
    # ages at minibatch 3: slot of 10 -> 2, slot of 11 -> 3; scores 0.5**age; threshold 0.5**2 = 0.25
    np.testing.assert_allclose(buf.slot_scores(), [0.25, 0.125])
    assert buf.threshold == pytest.approx(0.25)
    # below the threshold means strictly below: 10 (score == threshold) stays, 11 is evictable
    np.testing.assert_array_equal(buf.evictable(), [False, True])


def test_miss_counts_decay_and_rank_candidates():
    buf = PrefetchBuffer(capacity=1, num_nodes=N, alpha=0.5, period=2)
    buf.lookup([5, 6])  # minibatch 1: misses 5, 6 -> counts 1, 1
    buf.lookup([6, 7])  # 2: 6 -> 0.5 + 1 = 1.5; 7 -> 1; 5 decays to 0.5
    buf.lookup([7])  # 3: 7 -> 0.5 + 1 = 1.5; 6 -> 0.75; 5 -> 0.25
    ids, counts = buf.candidates(3)
    assert ids.tolist() == [7, 6, 5]
    np.testing.assert_allclose(counts, [1.5, 0.75, 0.25])
    ids, _ = buf.candidates(1)
    assert ids.tolist() == [7]


def test_candidate_ties_break_by_lower_id_and_exclude_residents():
    buf = PrefetchBuffer(capacity=1, num_nodes=N, alpha=0.1, period=4)
    buf.fill([8])
    buf.lookup([9, 3, 8, 5])  # 3, 5, 9 missed once each; 8 is resident (a hit)
    ids, _ = buf.candidates(5)
    assert ids.tolist() == [3, 5, 9]


def test_apply_fetches_with_the_next_misses_and_replaces_lowest_scores():
    buf = PrefetchBuffer(capacity=3, num_nodes=N, alpha=0.5, period=2, feat_dim=D)
    fetch = RecordingFetch()
    buf.fill([5, 6], fetch)  # slots 0, 1 at minibatch 0; slot 2 empty
    buf.lookup([5], fetch)  # minibatch 1: hit 5 (slot 0 last hit 1); slot 1 (6) last hit 0
    assert buf.apply([7, 8, 5]) == 2  # 5 is resident already: dropped
    assert len(fetch.calls) == 2  # nothing pulled yet
    rows, step = buf.lookup([7, 40], fetch)  # minibatch 2
    assert fetch.calls[-1] == [7, 40, 8]  # one pull: misses first, then the prefetch ids not already missed
    np.testing.assert_array_equal(rows, FEAT[[7, 40]])
    assert (step.hits, step.misses, step.remote_fetched, step.prefetched) == (0, 2, 3, 1)
    # victims: the empty slot 2 first, then the lowest score: slot 1 (6, older than 5)
    assert buf.slot_ids.tolist() == [5, 8, 7]
    assert buf.counters.evicted == 1
    np.testing.assert_array_equal(buf.rows[[1, 2]], FEAT[[8, 7]])
    rows, step = buf.lookup([8, 7, 6], fetch)
    assert (step.hits, step.misses) == (2, 1)
    np.testing.assert_array_equal(rows, FEAT[[8, 7, 6]])


def test_apply_keeps_order_caps_at_capacity_and_merges_until_pulled():
    buf = PrefetchBuffer(capacity=2, num_nodes=N, alpha=0.5, period=2)
    assert buf.apply([3, 1, 3]) == 2
    assert buf.apply([2]) == 2  # merged with the pending set, still capped at capacity
    assert buf.pending.tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"prefetch ids must lie in \[0, 100\)"):
        buf.apply([100])


def test_admit_on_miss_uses_free_and_evictable_slots_only():
    buf = PrefetchBuffer(capacity=2, num_nodes=N, alpha=0.5, period=1, feat_dim=D, admit_on_miss=True)
    fetch = RecordingFetch()
    _, step = buf.lookup([1, 2, 3], fetch)  # two free slots: the 2 most-missed (tie -> lower ids) enter
    assert step.remote_fetched == 3 and step.prefetched == 0
    assert sorted(buf.resident_ids().tolist()) == [1, 2]
    assert buf.counters.admitted_on_miss == 2
    _, step = buf.lookup([1, 4], fetch)  # slot of 2 has age 1 == period: not evictable -> 4 stays out
    assert sorted(buf.resident_ids().tolist()) == [1, 2]
    _, step = buf.lookup([1, 4], fetch)  # now 2 has age 2 > period: 4 (missed twice) replaces it
    assert sorted(buf.resident_ids().tolist()) == [1, 4]
    assert fetch.calls[-1] == [4]  # no extra traffic for admission
    np.testing.assert_array_equal(buf.rows[buf.slot_of[4]], FEAT[4])


def test_capacity_zero_is_no_prefetch():
    buf = PrefetchBuffer(capacity=0, num_nodes=N, feat_dim=D)
    assert buf.apply([1, 2]) == 0
    rows, step = buf.lookup([1, 2], RecordingFetch())
    assert (step.hits, step.misses, step.remote_fetched) == (0, 2, 2)
    np.testing.assert_array_equal(rows, FEAT[[1, 2]])


def test_bad_fetched_rows_are_rejected():
    buf = PrefetchBuffer(capacity=2, num_nodes=N, feat_dim=D)
    buf.begin([1, 2])
    with pytest.raises(ValueError, match=r"fetched rows have shape \(1, 3\), expected \(2, 3\)"):
        buf.finish(FEAT[[1]])


@pytest.mark.parametrize("admit_on_miss", [False, True])
def test_random_stream_rows_exact_and_ids_only_buffer_identical(admit_on_miss):
    """Over a random run with periodic prefetching, every served row is the source row, and a buffer that keeps
    ids only (replay) makes exactly the same decisions and counts."""
    rng = np.random.default_rng(0)
    kw = dict(capacity=12, num_nodes=N, alpha=0.2, period=3, admit_on_miss=admit_on_miss)
    live, replay = PrefetchBuffer(feat_dim=D, **kw), PrefetchBuffer(**kw)
    fetch = RecordingFetch()
    hot = rng.choice(N, 20, replace=False)
    for buf in (live, replay):
        buf.fill(hot[:6], fetch)
    for t in range(1, 200):
        ids = np.unique(np.concatenate([rng.choice(hot, 5), rng.choice(N, 4)]))
        rng.shuffle(ids)
        rows, a = live.lookup(ids, fetch)
        _, b = replay.lookup(ids)
        np.testing.assert_array_equal(rows, FEAT[ids])
        assert a == b
        if t % 3 == 0:
            n = int(live.evictable().sum())
            for buf in (live, replay):
                buf.apply(buf.candidates(n)[0])
        np.testing.assert_array_equal(live.slot_ids, replay.slot_ids)
        res = live.slot_ids[live.slot_ids != EMPTY]
        np.testing.assert_array_equal(live.rows[live.slot_ids != EMPTY], FEAT[res])
    assert live.counters == replay.counters
    c = live.counters
    assert c.hits + c.misses == c.remote_sampled
    assert c.remote_fetched == c.misses + c.prefetched
    assert c.hits > 0
    # with admit-on-miss, misses take the evictable slots first, so periodic prefetch finds none left
    assert (c.admitted_on_miss > 0) if admit_on_miss else (c.prefetched > c.initial_fill and not c.admitted_on_miss)


def test_partial_victim_order_is_a_prefix_of_the_full_one():
    """``priority_victims(n)`` (a partial sort) is exactly the first ``n`` of the full eviction order, ties
    (equal priority and equal last hit) included."""
    rng = np.random.default_rng(3)
    buf = PrefetchBuffer(capacity=40, num_nodes=N, alpha=0.2, period=3)
    buf.fill(rng.choice(N, 30, replace=False))  # 10 slots stay empty
    buf.set_priority(np.arange(N), rng.integers(0, 4, N).astype(np.float32))  # few distinct values: many ties
    buf.slot_last_hit[:] = rng.integers(0, 3, buf.capacity)
    full = buf.priority_victims()
    assert sorted(full.tolist()) == list(range(buf.capacity))
    assert set(full[:10].tolist()) == set(np.flatnonzero(buf.slot_ids == EMPTY).tolist())  # empty slots first
    for n in (0, 1, 5, 10, 11, 25, 39, 40, 100):
        np.testing.assert_array_equal(buf.priority_victims(n), full[:n])


# ---------------------------------------------------------------------------------------------- background prefetch
def test_background_prefetch_queues_takes_chunks_and_installs_on_arrival():
    buf = PrefetchBuffer(capacity=3, num_nodes=N, alpha=0.5, period=1, feat_dim=D, prefetch="background")
    fetch = RecordingFetch()
    buf.fill([1, 2, 3], fetch)
    assert buf.apply([7, 8, 2, 7, 9]) == 3  # resident 2 and the repeated 7 are dropped
    assert buf.in_flight == 3 and buf.pending.size == 0
    _, first = buf.lookup([4], fetch)  # nothing arrived: the set is not pulled with the misses
    assert fetch.calls[-1] == [4] and (first.prefetched, first.arrived) == (0, 0)
    assert buf.apply([8, 10]) == 1  # 8 is on its way already
    chunks = [buf.take(max_rows=2), buf.take(max_rows=2), buf.take(max_rows=2)]
    assert [c.tolist() for c in chunks] == [[7, 8], [9, 10], []]
    assert buf.candidates(10)[0].tolist() == [4]  # requested rows are no candidates
    assert buf.arrive(chunks[0], FEAT[chunks[0]]) == 2  # replace the two lowest-score slots
    _, counts = buf.lookup([8, 9], fetch)  # 8 arrived (a used prefetch); 9 was requested, not delivered: late
    assert (counts.hits, counts.misses, counts.late, counts.arrived, counts.prefetched) == (1, 1, 1, 2, 2)
    assert counts.remote_fetched == 1 + 2  # the miss, plus the delivered chunk
    c = buf.counters
    assert (c.prefetch_used, c.late, c.prefetched, c.remote_fetched) == (1, 1, 3 + 2, 3 + 1 + 2 + 1)
    rows, _ = buf.lookup([7, 8], fetch)
    np.testing.assert_array_equal(rows, FEAT[[7, 8]])  # delivered rows are served
    assert buf.counters.prefetch_used == 2
    buf.arrive(chunks[1], FEAT[chunks[1]])  # the late 9 was pulled on demand but not admitted: it installs now
    assert buf.in_flight == 0 and set(buf.resident_ids().tolist()) >= {9, 10}


def test_background_take_skips_rows_that_became_resident():
    buf = PrefetchBuffer(capacity=4, num_nodes=N, alpha=0.5, period=1, admit_on_miss=True, prefetch="background")
    buf.apply([5, 6, 7])
    buf.lookup([6])  # a miss on 6 admits it (an empty slot), so it is not requested again
    assert buf.take().tolist() == [5, 7] and buf.in_flight == 2
    with pytest.raises(ValueError, match=r"prefetch \(--prefetch\) must be one of inline, background, got 'later'"):
        PrefetchBuffer(capacity=1, num_nodes=N, prefetch="later")
