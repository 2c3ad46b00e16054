"""Sampler lookahead: expected remote needs from the partition's structure and the known seed order."""

import numpy as np
import pytest
from rudder.env.buffer import PrefetchBuffer
from rudder.env.lookahead import SamplerLookahead

# A partition with inner nodes 0..3 (train seeds 0 and 1) and halo nodes 10, 11, 12, over 20 global ids.
# In-edges (src -> dst): 2->0, 10->0, 11->0, 3->0   (indeg 0 = 4)
#                        10->1                     (indeg 1 = 1)
#                        12->2, 11->2              (indeg 2 = 2)
#                        12->3                     (indeg 3 = 1)
GID = np.array([0, 1, 2, 3, 10, 11, 12])
INNER = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)
IN_EDGES = {0: [2, 10, 11, 3], 1: [10], 2: [12, 11], 3: [12]}  # dst local -> src local ids (local == position)


def lookahead(fanouts):
    local = {g: i for i, g in enumerate(GID)}
    indptr, indices = [0], []
    for dst in range(len(GID)):
        indices += [local[s] for s in IN_EDGES.get(dst, [])]
        indptr.append(len(indices))
    return SamplerLookahead.from_partition(20, GID, INNER, np.array(indptr), np.array(indices), [0, 1], fanouts)


def test_expected_remote_needs_by_hand():
    # fanouts [f2, f1] = [1, 2]: seeds sample 2 in-neighbours (hop 1), the hop-1 frontier samples 1 (hop 2)
    la = lookahead([1, 2])
    ids, score = la.scores([np.array([0])], discount=1.0)
    got = dict(zip(ids.tolist(), score.tolist()))
    # hop 1 from seed 0: p = 2/4 to each of 2, 10, 11, 3 -> halo 10: 0.5, halo 11: 0.5
    # hop 2: frontier = {0: 1, 2: 0.5, 3: 0.5}; q = 1/indeg: node 0 -> 1/4 to 10 and 11; node 2 -> 1/2 to 12, 11;
    #        node 3 -> 1/1 to 12
    expected = {10: 0.5 + 0.25, 11: 0.5 + 0.25 + 0.5 * 0.5, 12: 0.5 * 0.5 + 0.5 * 1.0}
    assert got == pytest.approx(expected)


def test_upcoming_minibatches_are_discounted_and_summed():
    la = lookahead([1, 2])
    ids, score = la.scores([np.array([1]), np.array([0])], discount=0.5)
    got = dict(zip(ids.tolist(), score.tolist()))
    # seed 1 (now): hop 1 p = min(1, 2/1) = 1 -> 10; hop 2: node 1 samples 10 with 1 -> 10 gets 2.0
    assert got[10] == pytest.approx(2.0 + 0.5 * 0.75)
    assert got[12] == pytest.approx(0.5 * 0.75)


def test_static_round_trip_is_exact():
    la = lookahead([3, 2])
    again = SamplerLookahead.from_static(la.to_static(), 20)
    for seeds in ([np.array([0, 1])], [np.array([1]), np.array([0])]):
        a, b = la.scores(seeds), again.scores(seeds)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1])
    assert SamplerLookahead.from_static({"halo_ids": np.zeros(1)}, 20) is None


def test_priority_admission_replaces_only_lower_need():
    buf = PrefetchBuffer(capacity=2, num_nodes=20, alpha=0.5, period=2, admit_on_miss=True)
    buf.fill([10, 14])  # slot 0: 10, slot 1: 14
    buf.set_priority([10, 14, 12, 13], [0.1, 0.9, 0.5, 0.05])
    buf.lookup([12, 13])  # 12 beats 10 (0.5 > 0.1) and takes slot 0; 13 beats nobody
    assert buf.slot_ids.tolist() == [12, 14]
    buf.set_priority([13], [2.0])  # the others drop to 0
    buf.lookup([13])
    # 12 and 14 now tie at priority 0. The documented order (priority_victims: lowest priority, then least recent,
    # then lower slot) evicts 14, untouched since the fill (minibatch 0), not 12, admitted at minibatch 1. Breaking
    # the tie by lower slot or lower id would evict 12 instead.
    assert buf.slot_ids.tolist() == [12, 13]
    assert buf.counters.evicted == 2


def test_second_hop_through_halo_nodes():
    # halo 10's own in-edges (from the graph servers): 15 -> 10, 16 -> 10 (remote), 2 -> 10 (ours: ignored)
    owner = lambda ids: np.where(np.asarray(ids) < 4, 0, 1)  # noqa: E731  inner nodes 0..3 are partition 0
    la = lookahead([1, 2]).with_halo_in_edges([15, 16, 2], [10, 10, 10], owner)
    ids, score = la.scores([np.array([0])], discount=1.0)
    got = dict(zip(ids.tolist(), score.tolist()))
    # hop 1 reaches halo 10 with 0.5; it then samples 1 of its 3 in-neighbours: 0.5 / 3 to each of 15 and 16
    assert got[15] == pytest.approx(0.5 / 3) and got[16] == pytest.approx(0.5 / 3)
    assert got[10] == pytest.approx(0.75)  # unchanged: first-hop and inner second-hop terms only
    again = SamplerLookahead.from_static(la.to_static(), 20)
    np.testing.assert_allclose(again.scores([np.array([0])])[1], la.scores([np.array([0])])[1])


def test_top_candidates_match_a_full_sort_with_ties():
    from rudder.env.buffer import first_in_order

    def _top(ids, score, k):  # the lookahead's candidates: most needed first, ties by lower id
        return first_in_order(k, -score, ids)

    rng = np.random.default_rng(1)
    ids = rng.permutation(500)
    score = rng.integers(0, 6, ids.size).astype(np.float32)  # many ties: broken by lower id
    full = np.lexsort((ids, -score))
    for k in (1, 7, 100, 499, 500, 800):
        np.testing.assert_array_equal(_top(ids, score, k), full[:k])
    # few of many (the path that first narrows by a sample): continuous, tied, sorted and clustered scores
    n = 60_000
    for score in (
        rng.random(n).astype(np.float32),
        rng.integers(0, 3, n).astype(np.float32),
        np.sort(rng.random(n)),
        np.repeat(rng.random(n // 100), 100),
    ):
        ids = rng.permutation(n)
        full = np.lexsort((ids, -score))
        for k in (1, 64, 256, 900):
            np.testing.assert_array_equal(_top(ids, score, k), full[:k])


def test_both_rankings_are_complete_rankings():
    # what the episode asks of a ranking (rudder.env.ranking.Ranking), with no hasattr or name checks
    from rudder.env.ranking import LookaheadRanking, MissRanking, Ranking

    buf = PrefetchBuffer(capacity=2, num_nodes=20, admit_on_miss=True)
    buf.fill(np.array([3, 5]))
    misses = MissRanking(buf)
    ahead = LookaheadRanking(buf, None, lambda done, h: [], lambda done: [np.array([7, 3])], horizon=4, discount=0.5)
    for ranking in (misses, ahead):
        assert isinstance(ranking, Ranking)
        ranked = ranking.rank(1, 4)
        need, hot = ranking.slot_need(np.arange(2), 1)
        assert need.shape == hot.shape == (2,) and hot.dtype == bool
    assert (misses.levels_need_a_slot, ahead.levels_need_a_slot) == (False, True)
    assert misses.candidate_need(np.array([2.0, 4.0], dtype=np.float32)) == pytest.approx(3.0 * buf.alpha)
    assert ahead.candidate_need(np.array([2.0, 4.0], dtype=np.float32)) == 3.0
    need, hot = ahead.slot_need(np.arange(2), 1)
    assert ranked.candidate_ids[0] == 7 and list(hot) == [True, False]  # id 3 is needed again, id 5 is not
