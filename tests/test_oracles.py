"""The offline oracles: hand-worked streams, Belady's MIN against an exhaustive optimum, and the oracles' ordering."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from rudder.baselines import oracles
from rudder.baselines.oracles import (
    OracleResult,
    belady_min,
    belady_min_curve,
    hindsight_static,
    hindsight_static_ids,
    no_prefetch,
)
from rudder.env.buffer import PrefetchBuffer

METIS4 = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "traces", "samples", "small-metis4-f10x25"
)


def mbs(*sets: list[int]) -> list[np.ndarray]:
    return [np.array(s, dtype=np.int64) for s in sets]


def random_stream(rng: np.random.Generator, num_ids: int, num_minibatches: int, max_size: int) -> list[np.ndarray]:
    return [
        rng.choice(num_ids, size=int(rng.integers(0, max_size + 1)), replace=False).astype(np.int64)
        for _ in range(num_minibatches)
    ]


def check_consistent(res: OracleResult, stream: list[np.ndarray]) -> None:
    sizes = np.array([m.size for m in stream], dtype=np.int64)
    assert res.per_minibatch_hits.shape == res.per_minibatch_fetched.shape == (len(stream),)
    assert res.per_minibatch_hits.dtype == res.per_minibatch_fetched.dtype == np.int64
    np.testing.assert_array_equal(res.per_minibatch_hits + res.per_minibatch_fetched, sizes)
    assert res.remote_sampled == sizes.sum() == res.hits + res.misses
    assert res.hits == res.per_minibatch_hits.sum()
    assert res.remote_fetched == res.misses + res.prefetched == res.initial_fill + res.per_minibatch_fetched.sum()
    assert res.prefetched == res.initial_fill


def exhaustive_min_fetched(stream: list[np.ndarray], capacity: int, num_ids: int) -> int:
    """The exact optimum over every schedule of resident sets, prefetching allowed, by DP over buffer states.

    States are the bitmasks of at most ``capacity`` ids; after minibatch ``t`` (misses ``S_t \\ R`` pulled) the
    buffer may become any state ``R'``, paying one row per id of ``R'`` neither resident nor just pulled.
    """
    states = np.array(
        [sum(1 << i for i in c) for k in range(capacity + 1) for c in itertools.combinations(range(num_ids), k)],
        dtype=np.int64,
    )
    cost = np.full(states.size, np.iinfo(np.int64).max // 4, dtype=np.int64)
    cost[states == 0] = 0  # starts empty
    for ids in stream:
        need = int(sum(1 << int(i) for i in ids))
        miss = np.bitwise_count(need & ~states).astype(np.int64)  # per old state
        have = states | need  # rows on hand after the minibatch, per old state
        extra = np.bitwise_count(states[None, :] & ~have[:, None]).astype(np.int64)  # [old, new] prefetch rows
        cost = np.min((cost + miss)[:, None] + extra, axis=0)
    return int(cost.min())


# ---------------------------------------------------------------------------------------------------- belady


def test_belady_bypass_keeps_the_sooner_rows():
    stream = mbs([1, 2], [3], [1, 2], [3])
    # capacity 2. mb0: 1, 2 missed (2 rows), both kept (next use mb2).
    # mb1: 3 missed (1 row); its next use mb3 is later than both residents' (mb2): bypass, buffer stays {1, 2}.
    # mb2: 1, 2 hit (never used again: slots freed). mb3: 3 missed (1 row). Total 4.
    # Forced admission would evict 1 or 2 at mb1 and pull it again at mb2: 5.
    res = belady_min(stream, 2)
    assert (res.remote_fetched, res.hits, res.prefetched) == (4, 2, 0)
    np.testing.assert_array_equal(res.per_minibatch_hits, [0, 0, 2, 0])
    np.testing.assert_array_equal(res.per_minibatch_fetched, [2, 1, 0, 1])
    check_consistent(res, stream)
    # capacity 1 on 1 | 2 | 1 | 2: keep 1 (next mb2), bypass 2 (next mb3): 1 + 1 + 0 + 1 = 3 rows (LRU: 4).
    assert belady_min(mbs([1], [2], [1], [2]), 1).remote_fetched == 3


def test_belady_evicts_the_row_needed_furthest_ahead():
    stream = mbs([1, 2], [3], [1], [3], [1], [2])
    # capacity 2. mb0: 1, 2 missed (2), kept: next uses 1 -> mb2, 2 -> mb5.
    # mb1: 3 missed (1), next use mb3 < mb5: evict 2, keep 3. mb2: 1 hit (next mb4). mb3: 3 hit (never again).
    # mb4: 1 hit. mb5: 2 missed (1). Total 4 rows, 3 hits.
    # Evicting 1 instead at mb1 would miss 1 at mb2 as well: 5 rows.
    res = belady_min(stream, 2)
    assert (res.remote_fetched, res.hits) == (4, 3)
    np.testing.assert_array_equal(res.per_minibatch_hits, [0, 0, 1, 1, 1, 0])
    assert exhaustive_min_fetched(stream, 2, 4) == 4


def test_belady_counts_a_minibatch_as_one_moment_whatever_the_order_of_its_ids():
    # capacity 1: mb0 pulls 1; mb1 needs {2, 1}: 1 is a hit, 2 pulled and kept (1 never needed again);
    # mb2: 2 hit. 2 rows. Request by request (1, 2, 1, 2) MIN would pull 3: the minibatch is not a sequence.
    for mb1 in ([2, 1], [1, 2]):
        res = belady_min(mbs([1], mb1, [2]), 1)
        assert (res.remote_fetched, res.hits) == (2, 2)
    assert exhaustive_min_fetched(mbs([1], [2, 1], [2]), 1, 3) == 2


def test_belady_matches_the_exhaustive_optimum_on_tiny_streams():
    rng = np.random.default_rng(7)
    num_ids = 6
    for case in range(400):
        stream = random_stream(rng, num_ids, num_minibatches=int(rng.integers(4, 7)), max_size=4)
        capacity = int(rng.integers(1, 4))
        res = belady_min(stream, capacity)
        check_consistent(res, stream)
        assert res.prefetched == 0
        assert res.remote_fetched == exhaustive_min_fetched(stream, capacity, num_ids), (case, capacity, stream)
        shuffled = [rng.permutation(m) for m in stream]  # order inside a minibatch does not matter
        assert belady_min(shuffled, capacity).remote_fetched == res.remote_fetched


def test_belady_capacity_limits():
    rng = np.random.default_rng(1)
    for _ in range(50):
        stream = random_stream(rng, num_ids=30, num_minibatches=12, max_size=8)
        zero, ref = belady_min(stream, 0), no_prefetch(stream)
        assert (zero.remote_fetched, zero.hits) == (ref.remote_fetched, 0)
        np.testing.assert_array_equal(zero.per_minibatch_fetched, ref.per_minibatch_fetched)
        distinct = np.unique(np.concatenate(stream)).size
        for capacity in (distinct, distinct + 5):  # everything fits: each id pulled once
            assert belady_min(stream, capacity).remote_fetched == distinct
        if distinct > 1:  # just below: the general path, still each id at least once
            assert belady_min(stream, distinct - 1).remote_fetched >= distinct


def test_belady_curve_matches_single_runs_and_never_rises():
    rng = np.random.default_rng(2)
    stream = random_stream(rng, num_ids=200, num_minibatches=80, max_size=40)
    capacities = [0, 1, 5, 20, 60, 150, 400]
    curve = belady_min_curve(stream, capacities)
    assert list(curve) == capacities
    fetched = [curve[c].remote_fetched for c in capacities]
    assert fetched == sorted(fetched, reverse=True)
    for c in capacities:
        single = belady_min(stream, c)
        assert single.remote_fetched == curve[c].remote_fetched
        np.testing.assert_array_equal(single.per_minibatch_hits, curve[c].per_minibatch_hits)


def test_belady_heap_rebuilds_keep_results(monkeypatch):
    # Rebuild the heap after nearly every minibatch (dead entries tolerated: num_ids // 4 = 1) on a long stream.
    rng = np.random.default_rng(3)
    stream = random_stream(rng, num_ids=6, num_minibatches=60, max_size=4)
    usual = belady_min(stream, 3)
    monkeypatch.setattr(oracles, "_HEAP_SLACK_MIN", 0)
    rebuilt = belady_min(stream, 3)
    assert rebuilt.remote_fetched == usual.remote_fetched == exhaustive_min_fetched(stream, 3, 6)
    np.testing.assert_array_equal(rebuilt.per_minibatch_hits, usual.per_minibatch_hits)


def test_results_do_not_depend_on_the_id_values():
    # Ids far apart (too wide for the one-key sort: the stable-sort path) or negative give the same counts.
    rng = np.random.default_rng(8)
    stream = random_stream(rng, num_ids=12, num_minibatches=20, max_size=6)
    for relabel in (np.arange(12) * (2**59) + 3, np.arange(12) - 6, rng.permutation(12) * 1000):
        other = [relabel[m] for m in stream]
        for capacity in (2, 5):
            a, b = belady_min(stream, capacity), belady_min(other, capacity)
            np.testing.assert_array_equal(a.per_minibatch_hits, b.per_minibatch_hits)
        if np.all(np.diff(relabel) > 0):  # order kept: the same static set, ties included
            np.testing.assert_array_equal(hindsight_static_ids(other, 4), relabel[hindsight_static_ids(stream, 4)])


def test_belady_input_checks():
    with pytest.raises(ValueError, match="unique within a minibatch"):
        belady_min(mbs([1, 2, 1]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        belady_min(mbs([1]), -1)
    empty = belady_min([], 4)
    assert empty.remote_fetched == 0 and empty.per_minibatch_hits.size == 0
    res = belady_min(mbs([], [5], [], [5]), 1)  # empty minibatches are fine
    np.testing.assert_array_equal(res.per_minibatch_hits, [0, 0, 0, 1])


# ---------------------------------------------------------------------------------------------------- static


def test_hindsight_static_hand_worked():
    stream = mbs([1, 2], [1, 3], [1, 2], [4])
    # minibatches needing each id: 1 -> 3, 2 -> 2, 3 -> 1, 4 -> 1. capacity 2 fills {1, 2}: 2 rows up front.
    # hits: mb0 2, mb1 1, mb2 2, mb3 0 = 5; misses 3 (mb1) and 4 (mb3): 2 rows. Fetched 2 + 2 = 4.
    res = hindsight_static(stream, 2)
    assert (res.remote_fetched, res.prefetched, res.initial_fill, res.hits, res.misses) == (4, 2, 2, 5, 2)
    np.testing.assert_array_equal(res.per_minibatch_fetched, [0, 1, 0, 1])
    check_consistent(res, stream)
    np.testing.assert_array_equal(hindsight_static_ids(stream, 3), [1, 2, 3])  # tie 3 / 4: lower id
    np.testing.assert_array_equal(hindsight_static_ids(stream, 10), [1, 2, 3, 4])  # fewer ids than slots
    assert hindsight_static(stream, 0).remote_fetched == no_prefetch(stream).remote_fetched == 7
    # Short stream, ids used once: the fill is paid up front and saves nothing beyond itself.
    once = mbs([5], [6])
    assert hindsight_static(once, 1).remote_fetched == 2 == no_prefetch(once).remote_fetched
    np.testing.assert_array_equal(hindsight_static_ids(once, 1), [5])


def test_hindsight_static_equals_the_buffer_filled_and_left_alone():
    rng = np.random.default_rng(4)
    for capacity in (0, 3, 10, 50):
        stream = random_stream(rng, num_ids=40, num_minibatches=30, max_size=12)
        res = hindsight_static(stream, capacity)
        check_consistent(res, stream)
        buf = PrefetchBuffer(capacity=capacity, num_nodes=40)
        buf.fill(hindsight_static_ids(stream, capacity))
        per_minibatch_hits = [buf.lookup(ids)[1].hits for ids in stream]
        c = buf.counters
        assert (c.remote_sampled, c.hits, c.misses, c.remote_fetched, c.prefetched, c.initial_fill) == (
            res.remote_sampled,
            res.hits,
            res.misses,
            res.remote_fetched,
            res.prefetched,
            res.initial_fill,
        )
        np.testing.assert_array_equal(per_minibatch_hits, res.per_minibatch_hits)


# ---------------------------------------------------------------------------------------------------- ordering


def test_no_prefetch_equals_a_zero_capacity_buffer():
    stream = random_stream(np.random.default_rng(5), num_ids=20, num_minibatches=10, max_size=6)
    res = no_prefetch(stream)
    check_consistent(res, stream)
    buf = PrefetchBuffer(capacity=0, num_nodes=20)
    for ids in stream:
        buf.lookup(ids)
    assert (res.remote_fetched, res.hits, res.prefetched) == (buf.counters.remote_fetched, 0, 0)


def test_belady_is_below_the_static_buffer_and_no_buffer():
    rng = np.random.default_rng(6)
    for _ in range(200):
        num_ids = int(rng.integers(2, 30))
        stream = random_stream(rng, num_ids, num_minibatches=int(rng.integers(1, 15)), max_size=num_ids)
        capacity = int(rng.integers(0, num_ids + 2))
        best = belady_min(stream, capacity).remote_fetched
        # MIN can hold the static set from each id's first use: same cost as the up-front fill, same misses.
        assert best <= hindsight_static(stream, capacity).remote_fetched
        assert best <= no_prefetch(stream).remote_fetched


def test_no_buffer_policy_pulls_fewer_rows_than_belady():
    # Any run of the real buffer (random prefetch sets, admit-on-miss or not, a random initial fill) is a legal
    # schedule of the cost model, so it can only pull as many rows as MIN or more.
    rng = np.random.default_rng(9)
    for _ in range(40):
        num_ids, capacity = 30, int(rng.integers(1, 12))
        stream = random_stream(rng, num_ids, num_minibatches=25, max_size=10)
        buf = PrefetchBuffer(
            capacity=capacity,
            num_nodes=num_ids,
            alpha=0.3,
            period=int(rng.integers(1, 5)),
            admit_on_miss=bool(rng.integers(2)),
        )
        buf.fill(rng.choice(num_ids, size=int(rng.integers(0, capacity + 1)), replace=False))
        for ids in stream:
            if rng.random() < 0.3:
                buf.apply(rng.choice(num_ids, size=int(rng.integers(0, capacity + 1)), replace=False))
            buf.lookup(ids)
        assert belady_min(stream, capacity).remote_fetched <= buf.counters.remote_fetched


def test_priority_mode_buffer_pulls_no_fewer_rows_than_belady():
    # The path the lookahead runs: a predicted need per node (set_priority, renewed every minibatch), admission on a
    # miss only in place of a resident needed less, prefetch sets replacing the lowest-priority residents in the
    # order priority_victims gives. Any predictions make a legal schedule, so MIN is still a lower bound.
    rng = np.random.default_rng(10)
    for _ in range(60):
        num_ids, capacity = 30, int(rng.integers(1, 12))
        stream = random_stream(rng, num_ids, num_minibatches=25, max_size=10)
        buf = PrefetchBuffer(
            capacity=capacity, num_nodes=num_ids, alpha=0.3, period=int(rng.integers(1, 5)), admit_on_miss=True
        )
        buf.fill(rng.choice(num_ids, size=int(rng.integers(0, capacity + 1)), replace=False))
        for ids in stream:
            known = rng.choice(num_ids, size=int(rng.integers(0, num_ids + 1)), replace=False)
            buf.set_priority(known, rng.random(known.size).astype(np.float32))
            if rng.random() < 0.3:
                buf.apply(
                    rng.choice(num_ids, size=int(rng.integers(0, capacity + 1)), replace=False),
                    victim_order=buf.priority_victims(),
                )
            buf.lookup(ids)
        assert buf.priority is not None
        assert belady_min(stream, capacity).remote_fetched <= buf.counters.remote_fetched


def _true_next_use_run(stream: list[np.ndarray], capacity: int, num_ids: int) -> int:
    """The buffer's priority path fed the true next uses instead of predictions: before minibatch t every node's
    priority is 1 / (its next use after t), 0 if never used again; admit-on-miss, no prefetching, empty start."""
    buf = PrefetchBuffer(capacity=capacity, num_nodes=num_ids, admit_on_miss=True)
    next_use = np.full(num_ids, np.inf)
    after = []  # after[t]: each node's next use after minibatch t
    for t in range(len(stream) - 1, -1, -1):
        after.append(next_use.copy())
        next_use[np.asarray(stream[t], dtype=np.int64)] = t
    after.reverse()
    for t, ids in enumerate(stream):
        buf.set_dense_priority((1.0 / after[t]).astype(np.float32))
        buf.lookup(ids)
    return buf.counters.remote_fetched


def test_priority_path_fed_the_true_next_uses_is_belady_min():
    # The mechanism the lookahead uses (admission on a miss by priority, eviction of the lowest priority), fed
    # exact next uses instead of predicted need, is an online Belady: it fetches exactly MIN's rows. So the
    # lookahead's distance to MIN is its prediction error (BENCHMARKS.md, P1).
    rng = np.random.default_rng(11)
    for _ in range(150):
        num_ids = int(rng.integers(2, 25))
        stream = random_stream(rng, num_ids, num_minibatches=int(rng.integers(1, 20)), max_size=num_ids)
        capacity = int(rng.integers(0, num_ids + 2))
        assert _true_next_use_run(stream, capacity, num_ids) == belady_min(stream, capacity).remote_fetched


def test_priority_path_fed_the_true_next_uses_is_belady_min_on_a_real_trace():
    from rudder.traces import Trace

    rank = Trace(METIS4).rank(1)
    stream = rank.minibatch_ids()
    num_ids = int(rank.meta["num_nodes"])
    for capacity in (round(0.05 * rank.static["halo_ids"].size), int(rank.meta["capacity"])):
        assert _true_next_use_run(stream, capacity, num_ids) == belady_min(stream, capacity).remote_fetched


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_lookahead_replay_pulls_no_fewer_rows_than_belady(fraction):
    # The real lookahead path end to end (rudder.env.ranking.LookaheadRanking on a recorded trace's seeds and
    # partition structure, priorities renewed every minibatch, prefetch sets at every window) against MIN.
    import gymnasium as gym
    import rudder.env  # noqa: F401  (registers the environments)
    from rudder.baselines.policies import Lookahead
    from rudder.env.contract import buffer_kwargs
    from rudder.traces import Trace

    from rudder.evaluation.play import play_episode

    env = gym.make("rudder/Replay-v0", trace=METIS4, rank=2, **buffer_kwargs(Lookahead.settings, fraction))
    result = play_episode(env, Lookahead(), seed=0)
    assert env.unwrapped.episode.buffer.priority is not None  # it ran in priority mode
    assert result["prefetched"] > result["initial_fill"]  # and prefetched at the windows
    best = belady_min(Trace(METIS4).rank(2).minibatch_ids(), env.unwrapped.capacity).remote_fetched
    assert best <= result["remote_fetched"] < 1.25 * best


# ------------------------------------------------------------------------------------------------ hit-rate ceiling


def test_hit_ceiling_hand_worked():
    from rudder.baselines.oracles import hit_ceiling

    stream = mbs([1, 2, 3], [], [4], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(hit_ceiling(stream, 2), [2, 0, 1, 2])
    np.testing.assert_array_equal(hit_ceiling(stream, 0), [0, 0, 0, 0])
    np.testing.assert_array_equal(hit_ceiling(stream, 10), [3, 0, 1, 5])
    with pytest.raises(ValueError):
        hit_ceiling(stream, -1)


def test_the_hit_rate_ceiling_bounds_every_agent_where_belady_min_does_not():
    """On a shipped trace: the buffer that fetches the fewest rows (MIN) is not the one that hits most (the
    lookahead, a filled buffer admitting by predicted need, hits more), so MIN is no hit-rate ceiling; every agent
    and oracle stays under the ceiling, window by window."""
    from rudder.baselines.policies import Lookahead, NoPrefetch, Periodic, StaticBuffer

    from rudder.evaluation.report import format_report, hit_rate_ceiling
    from rudder.evaluation.scoring import evaluate_trace

    agents = {
        "none": lambda t, r: NoPrefetch(),
        "static": lambda t, r: StaticBuffer(),
        "periodic": lambda t, r: Periodic(),
        "lookahead": lambda t, r: Lookahead(),
    }
    rows = evaluate_trace(METIS4, agents)
    by = {(r["agent"], r["rank"]): r for r in rows}
    for r in rows:
        assert r["hits"] <= r["ceiling_hits"] <= r["remote_sampled"]
        assert len(r["window_hit_rate"]) == len(r["window_hit_ceiling"])
        assert all(h <= c + 1e-12 for h, c in zip(r["window_hit_rate"], r["window_hit_ceiling"])), r["agent"]
    ranks = sorted({r["rank"] for r in rows})
    lookahead = sum(by[("lookahead", k)]["hits"] for k in ranks)
    belady = sum(by[("belady", k)]["hits"] for k in ranks)
    sampled = sum(by[("none", k)]["remote_sampled"] for k in ranks)
    assert lookahead > belady  # more hits than the traffic bound's schedule ...
    assert by[("belady", 0)]["remote_fetched"] <= by[("lookahead", 0)]["remote_fetched"]  # ... yet no fewer rows
    import pandas as pd

    df = pd.DataFrame(rows)
    ceiling = hit_rate_ceiling(df)
    assert lookahead / sampled < ceiling == pytest.approx(sum(by[("none", k)]["ceiling_hits"] for k in ranks) / sampled)
    assert f"hit-rate ceiling {ceiling:.1%}" in format_report(df)
