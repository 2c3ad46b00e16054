"""Scenario files (exogenous conditions) and the action spaces that can use them, in replay on constructed traces."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from rudder.env.action_spaces import STOCKUP_LEVELS, make
from rudder.env.replay_env import ReplayEnv
from rudder.env.scenario import Conditions, Scenario, ScenarioError, square_wave
from rudder.traces import TraceWriter

SQUARE = {
    "version": 1,
    "name": "sq",
    "seed": 3,
    "duration_s": 30,
    "processes": [
        {"kind": "link", "hosts": "all", "timeline": {"type": "square", "period_s": 2.0, "high": 1.0, "low": 0.25}},
        {
            "kind": "cotenant",
            "hosts": [1],
            "timeline": {"type": "markov", "mean_high_s": 1.0, "mean_low_s": 2.0, "high": 0.5, "low": 0.0},
        },
        {"kind": "straggler", "hosts": [0], "factor": 1.5},
        {"kind": "link", "hosts": [0], "timeline": {"type": "piecewise", "points": [[0, 1.0], [10, 0.5]]}},
    ],
}


def _write_trace(directory, remote_ids, *, fetch_s, compute_s=0.2, sample_s=0.01, prefetch="inline", halo=None):
    """A one-rank trace whose minibatch ``i`` needs ``remote_ids[i]`` and whose measured fetch seconds are
    ``fetch_s(remote_rows)``: the replay's time model is fitted to exactly that."""
    ids_all = np.unique(np.concatenate(remote_ids)) if halo is None else halo
    run = dict(
        graph="toy", parts=2, fanout="10,25", batch_size=10, buffer_fraction=0.5, buffer_init="empty",
        alpha=0.05, period=4, admit_on_miss=False, candidates=16, prefetch=prefetch, sample_ahead=4,
    )  # fmt: skip
    static = dict(halo_ids=ids_all, halo_degree=np.ones(ids_all.size, np.float32), initial_ids=np.zeros(0, np.int64))
    writer = TraceWriter(directory, 0, 1, dict(config=run), dict(num_nodes=int(ids_all.max()) + 1), static)
    for i, ids in enumerate(remote_ids):
        local = 50 + (i % 3) * 10
        writer.add_minibatch(
            minibatch=i, epoch=0, remote_ids=ids, local_rows=local, sample_s=sample_s, fetch_s=fetch_s(ids.size),
            compute_s=compute_s, fetch_rows=local + ids.size, hits=0, remote_fetched=ids.size, prefetched=0,
            **(dict(arrived=0, stall_s=0.0) if prefetch == "background" else {}),
        )  # fmt: skip
    writer.close()
    return str(directory)


# ------------------------------------------------------------------------------------------------ the file


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_scenario_file_round_trips(tmp_path, suffix):
    scenario = Scenario.from_dict(SQUARE)
    path = str(tmp_path / f"s{suffix}")
    scenario.save(path)
    again = Scenario.load(path)
    assert again.to_dict() == scenario.to_dict()
    for host in (0, 1, 2):
        a, b = scenario.conditions(host), again.conditions(host)
        assert np.array_equal(a.starts, b.starts) and np.array_equal(a.rates, b.rates)
        assert a.cpu_factor == b.cpu_factor
    # seeded: the same file draws the same Markov bursts; another seed others
    assert np.array_equal(Scenario.from_dict(SQUARE).conditions(1).rates, scenario.conditions(1).rates)
    other = Scenario.from_dict({**SQUARE, "seed": 4}).conditions(1)
    assert not np.array_equal(other.starts, scenario.conditions(1).starts)


def test_conditions_compose_the_processes_per_host():
    s = Scenario.from_dict(SQUARE)
    c0, c1, c2 = s.conditions(0), s.conditions(1), s.conditions(2)
    assert c0.cpu_factor == 1.5 and c1.cpu_factor == 1.0
    # host 0: square x the piecewise halving from 10 s; host 2: the square alone
    assert c2.rate_at(0.5) == 1.0 and c2.rate_at(1.5) == 0.25 and c2.rate_at(12.5) == 1.0
    assert c0.rate_at(0.5) == 1.0 and c0.rate_at(12.5) == 0.5 and c0.rate_at(13.5) == 0.125
    # host 1: the co-tenant takes half the link during its bursts, never more
    assert set(np.round(c1.rates, 6)) <= {1.0, 0.5, 0.25, 0.125}


def test_conditions_finish_integrates_the_rate():
    c = square_wave("sq", 2.0, 0.25).conditions(0)
    # 1 s of work from t=0: 1 s at full rate
    assert c.finish(0.0, 1.0) == pytest.approx(1.0)
    # from 0.5: 0.5 s of work by 1.0, then 0.5 s at a quarter rate takes 2 s... but the slow phase ends at 2.0:
    # 0.25 s of work by 2.0, then 0.25 s at full rate
    assert c.finish(0.5, 1.0) == pytest.approx(2.25)
    assert c.transfer_s(1.0, 0.25) == pytest.approx(1.0)
    # repeats past duration_s
    assert c.finish(c.period_s + 0.5, 1.0) == pytest.approx(c.period_s + 2.25)
    assert Conditions.stationary().finish(3.0, 2.0) == pytest.approx(5.0)


@pytest.mark.parametrize(
    "change, field, expected",
    [
        (lambda d: d.update(version=2), "version", "expected 1, got 2"),
        (lambda d: d["processes"][0].update(kind="flood"), "processes[0].kind", "expected one of link"),
        (lambda d: d["processes"][0]["timeline"].update(low=0), "processes[0].timeline.low", "expected a number > 0"),
        (
            lambda d: d["processes"][1]["timeline"].update(high=1.0),
            "processes[1].timeline.high",
            "expected a number >= 0 and < 1, got 1.0",
        ),
        (lambda d: d["processes"][2].update(factor="2x"), "processes[2].factor", "got '2x'"),
        (
            lambda d: d["processes"][0]["timeline"].update(period="2"),
            "processes[0].timeline.period",
            "expected a field",
        ),
        (
            lambda d: d["processes"][3]["timeline"].update(points=[[0, 1.0], [0, 0.5]]),
            "processes[3].timeline.points",
            "expected times strictly increasing from 0",
        ),
        (lambda d: d.update(seed=-1), "seed", "expected an integer >= 0, got -1"),
    ],
)
def test_a_bad_field_is_refused_in_one_line_naming_file_field_expected_and_got(tmp_path, change, field, expected):
    data = json.loads(json.dumps(SQUARE))
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScenarioError) as err:
        Scenario.load(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: ")
    assert expected in msg


def test_a_piecewise_timeline_from_a_csv_file(tmp_path):
    (tmp_path / "rates.csv").write_text("t_s,rate\n0,1.0\n4,0.5\n6,2\n")
    data = dict(version=1, name="csv", processes=[dict(kind="link", timeline=dict(type="piecewise", file="rates.csv"))])
    (tmp_path / "s.json").write_text(json.dumps(data))
    c = Scenario.load(str(tmp_path / "s.json")).conditions(0)
    assert [c.rate_at(t) for t in (1, 5, 7)] == [1.0, 0.5, 2.0]
    (tmp_path / "rates.csv").write_text("t_s,rate\n0,1.0\n4,fast\n")
    with pytest.raises(ScenarioError, match=r"rates.csv: line 3: expected two numbers t_s,value, got '4,fast'"):
        Scenario.load(str(tmp_path / "s.json"))


# ------------------------------------------------------------------------------------------------ in replay

C_REMOTE = 1e-4  # seconds per remote row in the constructed traces


def _expected_seconds(remote_rows, compute_s, sample_s, rate, dt=1e-5):
    """Run time of a no-buffer replay by plain numerical integration: each minibatch's demand pull carries
    ``C_REMOTE * rows`` seconds of work at ``rate(t)``, then sampling and compute follow."""
    t = 0.0
    for rows in remote_rows:
        work = C_REMOTE * rows
        while work > 1e-12:
            step = min(dt, work / rate(t))
            work -= step * rate(t)
            t += step
        t += sample_s + compute_s
    return t


def test_replay_under_a_square_wave_is_slower_by_the_expected_amount(tmp_path):
    rows = [400, 800, 1200] * 8  # 24 minibatches, every remote row fresh: all misses, no buffer decision matters
    starts = np.cumsum([0] + rows[:-1])
    ids = [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, rows)]
    trace = _write_trace(tmp_path / "t", ids, fetch_s=lambda n: C_REMOTE * n)
    square = square_wave("sq", 1.0, 0.125)

    def seconds(scenario):
        env = ReplayEnv(trace, buffer_fraction=0.0, scenario=scenario, reward="time")
        env.reset(seed=0)
        done = False
        while not done:
            _, _, done, _, _ = env.step(np.zeros(env.k, dtype=np.int8))
        return env.clock_s, env.time_model

    stationary, model = seconds(None)
    assert model.c_remote == pytest.approx(C_REMOTE, rel=1e-6) and model.c0 == pytest.approx(0.0, abs=1e-9)
    slowed, _ = seconds(square)
    assert stationary == pytest.approx(_expected_seconds(rows, 0.2, 0.01, lambda t: 1.0), rel=1e-6)
    expected = _expected_seconds(rows, 0.2, 0.01, lambda t: 1.0 if t % 1.0 < 0.5 else 0.125)
    assert slowed == pytest.approx(expected, rel=1e-3)
    assert slowed > stationary * 1.5  # the slow half-periods cost: not a rounding difference


def test_a_straggler_scales_sampling_and_compute_and_wider_rows_the_row_cost(tmp_path):
    rows = [400, 800, 1200] * 4
    starts = np.cumsum([0] + rows[:-1])
    ids = [np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, rows)]
    trace = _write_trace(tmp_path / "t", ids, fetch_s=lambda n: C_REMOTE * n)
    straggler = Scenario.from_dict(
        dict(version=1, name="st", feature_bytes_factor=2.0, processes=[dict(kind="straggler", hosts=[0], factor=3.0)])
    )
    env = ReplayEnv(trace, buffer_fraction=0.0, scenario=straggler, reward="time")
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(np.zeros(env.k, dtype=np.int8))
    assert env.clock_s == pytest.approx(len(rows) * 3 * 0.21 + 2 * C_REMOTE * sum(rows), rel=1e-6)


# ------------------------------------------------------------------------------------------------ stock-up


def _stockup_trace(tmp_path, row_s=4e-4):
    """Every minibatch needs 300 fresh rows; the measured pull costs ``row_s`` per row (one window's link budget
    is then well below the buffer), compute 0.2 s."""
    ids = [np.arange(i * 300, (i + 1) * 300, dtype=np.int64) for i in range(48)]
    return _write_trace(tmp_path / "stock", ids, fetch_s=lambda n: 0.002 + row_s * n, prefetch="background")


def _headroom(trace, scenario):
    from rudder.bench.headroom_map import best_constant, rollout

    env = make(
        "stockup", trace, scenario=scenario, buffer_fraction=0.5, buffer_init="empty", sample_ahead="epoch",
        sampled_only=True,
    )  # fmt: skip
    a, const_s, _ = best_constant(env)
    ref_s, chosen = rollout(env, a, horizon=3)
    return 1.0 - min(ref_s, const_s) / const_s, a, chosen


def test_stocking_up_beats_the_best_constant_when_a_slow_phase_follows_a_fast_one(tmp_path):
    trace = _stockup_trace(tmp_path)
    fast_then_slow = Scenario.from_dict(
        dict(
            version=1,
            name="fast-then-slow",
            processes=[dict(kind="link", timeline=dict(type="square", period_s=4.0, high=1.0, low=1 / 8))],
        )
    )
    headroom, constant, chosen = _headroom(trace, fast_then_slow)
    assert headroom > 0.05, (headroom, constant, chosen)
    assert max(chosen) > STOCKUP_LEVELS.index(1.0)  # it asked for more than one window's link budget
    stationary, _, chosen = _headroom(trace, None)
    assert stationary < 0.005, (stationary, chosen)


# ------------------------------------------------------------------------------------------------ the other spaces


def test_cancel_drops_the_queued_chunks_and_saves_the_stalls_behind_them(tmp_path):
    trace = _stockup_trace(tmp_path, row_s=1e-4)
    slows = Scenario.from_dict(
        dict(
            version=1,
            name="slows",
            processes=[dict(kind="link", timeline=dict(type="piecewise", points=[[0, 1.0], [1.2, 1 / 16]]))],
        )
    )
    env = make(
        "cancel", trace, scenario=slows, buffer_fraction=1.0, buffer_init="empty", sample_ahead="epoch",
        sampled_only=True,
    )  # fmt: skip
    base = env.unwrapped
    n = len(base.levels)
    assert env.action_space.n == 2 * n
    env.reset(seed=0)
    env.step(0)
    env.step(base.levels.index(4.0))  # four link budgets asked for as the link slows 16x: chunks wait in the queue
    queued = sum(c[0].size for c in base._link.queue if not c[-1])
    assert queued > 2048
    start = base.snapshot()
    env.step(0)  # keep the queue
    kept_s = base.clock_s
    base.restore(start)
    _, _, _, _, info = env.step(n)  # drop it, then level 0
    assert info["cancelled_rows"] == queued
    assert base.clock_s < kept_s - 2.0  # each queued chunk would have stalled a demand pull for seconds


def test_the_eviction_threshold_sets_what_may_be_replaced(tmp_path):
    ids = [np.arange(i * 50, i * 50 + 100, dtype=np.int64) for i in range(24)]  # each row needed twice
    trace = _write_trace(tmp_path / "t", ids, fetch_s=lambda n: 0.002 + C_REMOTE * n)
    env = make("threshold", trace, buffer_fraction=0.25, buffer_init="empty")
    assert env.action_space.n == 4
    secs = []
    for a in range(env.action_space.n):
        env.reset(seed=0)
        done = False
        while not done:
            _, _, done, _, _ = env.step(a)
        secs.append(env.unwrapped.clock_s)
        assert env.unwrapped.episode.buffer.period == max(1, round([0.5, 1, 2, 4][a] * env.unwrapped.period))
    assert len(set(np.round(secs, 9))) > 1  # the threshold changes what the run costs


@pytest.mark.parametrize("space", ["levels", "stockup", "horizon", "stockup-horizon", "keep-replace"])
def test_every_space_replays_under_a_scenario(tmp_path, space):
    trace = _stockup_trace(tmp_path)
    env = make(space, trace, scenario=square_wave("sq", 2.0, 0.25), buffer_fraction=0.25, buffer_init="empty",
               **({} if space == "keep-replace" else dict(sampled_only=True)))  # fmt: skip
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(env.action_space.n - 1)
    assert env.unwrapped.clock_s > 0 and env.unwrapped.conditions.varies


# ------------------------------------------------------------------------------------------------ live


class _FakeCluster:
    """Records set_rate calls with their time (the real one runs tc in network namespaces)."""

    def __init__(self):
        self.calls = []
        self.t0 = time.monotonic()

    def set_rate(self, host, rate):
        self.calls.append((time.monotonic() - self.t0, host, rate))


def test_the_player_changes_each_hosts_rate_on_schedule_and_keeps_what_it_played():
    from rudder.testbed.conditions import ConditionsPlayer

    scenario = Scenario.from_dict(
        dict(
            version=1, name="sq", duration_s=1.2,
            processes=[
                dict(kind="link", hosts=[0], timeline=dict(type="square", period_s=0.4, high=1.0, low=0.25)),
                dict(kind="link", hosts=[1], timeline=dict(type="constant", value=0.5)),
            ],
        )
    )  # fmt: skip
    cluster = _FakeCluster()
    player = ConditionsPlayer(cluster, scenario, base_bits=400_000_000, hosts=2)
    assert [(round(t, 3), h, r) for t, h, r in player.schedule()] == [
        (0.0, 0, 1.0), (0.0, 1, 0.5), (0.2, 0, 0.25), (0.4, 0, 1.0), (0.6, 0, 0.25), (0.8, 0, 1.0), (1.0, 0, 0.25),
    ]  # fmt: skip
    player.start()
    time.sleep(1.4)
    player.stop()
    applied = cluster.calls[:-2]  # the last two give the base rate back
    assert [(h, r) for _, h, r in applied] == [
        (0, "400000000bit"), (1, "200000000bit"), (0, "100000000bit"), (0, "400000000bit"), (0, "100000000bit"),
        (0, "400000000bit"), (0, "100000000bit"),
    ]  # fmt: skip
    assert all(
        0 <= t - s[0] < 0.1 for (t, _, _), s in zip(applied, player.schedule())
    )  # on time, give or take a wakeup
    assert cluster.calls[-2:] == [(cluster.calls[-2][0], 0, "400000000bit"), (cluster.calls[-1][0], 1, "400000000bit")]
    # what was played, as a scenario replay can follow: within timing jitter of the square wave
    played = player.scenario()
    c0 = played.conditions(0)
    assert [c0.rate_at(t) for t in (0.15, 0.35, 0.55, 0.75)] == [1.0, 0.25, 1.0, 0.25]
    assert played.conditions(1).rate_at(0.5) == 0.5


class _FakeFlow:
    def __init__(self, calls, host):
        self.calls, self.host = calls, host

    def set_rate(self, bits):
        self.calls.append(("flow", self.host, int(bits)))

    def close(self):
        return 1000 + self.host


class _FlowCluster(_FakeCluster):
    def set_rate(self, host, rate):
        self.calls.append(("tc", host, rate))

    def competing_flow(self, src, dst):
        assert src != dst
        return _FakeFlow(self.calls, src)


def test_a_co_tenant_is_played_as_a_competing_flow_paced_at_its_share_of_the_link_it_meets():
    """With a cluster that can start flows, a co-tenant burst is another job's traffic, not a rate cut: the link
    keeps the rate its link timeline gives, the flow is paced at the co-tenant's share of that rate, and the log
    (what replay follows) and the record count the rate the burst leaves the job."""
    from rudder.testbed.conditions import ConditionsPlayer

    scenario = Scenario.from_dict(
        dict(
            version=1, name="ct", duration_s=0.8,
            processes=[
                dict(kind="link", hosts="all", timeline=dict(type="square", period_s=0.8, high=1.0, low=0.5)),
                dict(kind="cotenant", hosts=[1], timeline=dict(type="square", period_s=0.4, high=0.0, low=0.75)),
            ],
        )
    )  # fmt: skip
    cluster = _FlowCluster()
    player = ConditionsPlayer(cluster, scenario, base_bits=400_000_000, hosts=2)
    assert [(round(t, 3), h, r) for t, h, r in player.schedule()] == [
        (0.0, 0, 1.0), (0.0, 1, 1.0), (0.2, 1, 0.25), (0.4, 0, 0.5), (0.4, 1, 0.5), (0.6, 1, 0.125),
    ]  # fmt: skip
    player.start()
    time.sleep(1.0)
    player.stop()
    calls = cluster.calls
    assert [c for c in calls if c[0] == "tc"][:4] == [
        ("tc", 0, "400000000bit"), ("tc", 1, "400000000bit"), ("tc", 0, "200000000bit"), ("tc", 1, "200000000bit"),
    ]  # fmt: skip
    assert [c for c in calls if c[0] == "flow"] == [
        ("flow", 1, 0),
        ("flow", 1, 300_000_000),
        ("flow", 1, 0),
        ("flow", 1, 150_000_000),
    ]  # only host 1 has a co-tenant: 3/4 of 400mbit, then of 200mbit
    assert [(h, r) for _, h, r in player.log] == [(h, r) for _, h, r in player.schedule()]
    record = player.record()
    assert record["cotenant"] == "flow" and record["cotenant_bytes"] == [0, 1001]
    assert played_rates(record) == {0: [1.0, 0.5], 1: [1.0, 0.25, 0.5, 0.125]}


def played_rates(record):
    return {h: [r for _, hh, r in record["changes"] if hh == h] for h in range(record["hosts"])}


def test_without_flows_a_co_tenant_is_played_as_the_rate_it_leaves():
    from rudder.testbed.conditions import ConditionsPlayer

    cot = dict(kind="cotenant", hosts="all", timeline=dict(type="constant", value=0.75))
    scenario = Scenario.from_dict(dict(version=1, name="ct1", duration_s=1.0, processes=[cot]))
    player = ConditionsPlayer(_FakeCluster(), scenario, base_bits=400_000_000, hosts=2)
    assert not player.flows_played
    assert [(h, r) for _, h, r in player.schedule()] == [(0, 0.25), (1, 0.25)]
    flows = ConditionsPlayer(_FlowCluster(), scenario, base_bits=400_000_000, hosts=1)
    assert not flows.flows_played  # one host: nowhere to send to


# ------------------------------------------------------------------------------------------------ met live, replayed


def _recorded_under(directory, rows, rate, lag_s, played_from=1_000_000.0, changes=None):
    """A one-rank trace as a live run under link rate ``rate(t)`` (t on the rank's clock, from its first
    minibatch) would record it: each demand pull carries ``C_REMOTE * rows`` seconds of work at that rate, the
    rank's first minibatch ``lag_s`` after playing started; with its ``conditions.json`` (``changes`` on the
    player's clock)."""
    from rudder.env.scenario import conditions_record

    starts = np.cumsum([0] + rows[:-1])
    run = dict(
        graph="toy", parts=2, fanout="10,25", batch_size=10, buffer_fraction=0.5, buffer_init="empty",
        alpha=0.05, period=4, admit_on_miss=False, candidates=16, prefetch="inline", sample_ahead=4,
    )  # fmt: skip
    halo = np.arange(int(sum(rows)), dtype=np.int64)
    static = dict(halo_ids=halo, halo_degree=np.ones(halo.size, np.float32), initial_ids=np.zeros(0, np.int64))
    meta = dict(num_nodes=int(halo.size), partition=0, train_start_unix=played_from + lag_s)
    writer = TraceWriter(directory, 0, 1, dict(config=run), meta, static)
    t = 0.0
    for i, (s, n) in enumerate(zip(starts, rows)):
        fetch = _expected_seconds([n], 0.0, 0.0, lambda u: rate(t + u))
        writer.add_minibatch(
            minibatch=i, epoch=0, remote_ids=np.arange(s, s + n, dtype=np.int64), local_rows=0, sample_s=0.01,
            fetch_s=fetch, compute_s=0.2, fetch_rows=n, hits=0, remote_fetched=n, prefetched=0,
        )  # fmt: skip
        t += 0.01 + fetch + 0.2
    writer.close()
    if changes is not None:
        record = conditions_record(square_wave("sq-live", 4.0, 0.125), "400mbit", 2, played_from, changes)
        (directory / "conditions.json").write_text(json.dumps(record))
    return directory, t


def test_a_trace_recorded_under_played_conditions_is_replayed_under_what_its_rank_met(tmp_path):
    """conditions.json puts the played rate changes on the rank's clock (its first minibatch 3.3 s after playing
    started); the time model is fitted per row at the base rate (each pull's rows divided by the rate in force),
    and replay follows the rates met: the run's recorded time comes back, which a stationary replay misses."""
    lag = 3.3

    def rate(t):  # on the rank's clock: fast for 2 s, then 8x slower for 2 s, ...
        return 1.0 if (t + lag) % 4.0 < 2.0 else 0.125

    changes = [[2.0 * k, 0, 1.0 if k % 2 == 0 else 0.125] for k in range(40)]  # the player's clock
    changes += [[0.0, 1, 0.5]]  # another host's link: not this rank's
    rows = [150, 300, 450] * 30
    trace, recorded_s = _recorded_under(tmp_path / "live", rows, rate, lag, changes=sorted(changes))
    env = ReplayEnv(str(trace), buffer_fraction=0.0, reward="time")
    assert not env.synthetic and env.scenario.name == "sq-live-as-played"
    met = env.run.recorded_conditions.conditions(0)
    assert [met.rate_at(t) for t in (0.1, 0.8, 2.8, 4.8)] == [0.125, 1.0, 0.125, 1.0]
    assert env.time_model.c_remote == pytest.approx(C_REMOTE, rel=0.03)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, _ = env.step(np.zeros(env.k, dtype=np.int8))
    assert env.clock_s == pytest.approx(recorded_s, rel=0.02)

    # the same pulls without conditions.json: one cost per row blends both phases, and replay cannot know when
    blind, _ = _recorded_under(tmp_path / "blind", rows, rate, lag)
    assert ReplayEnv(str(blind)).time_model.c_remote > 2 * C_REMOTE


def test_a_bad_conditions_file_is_named_in_one_line(tmp_path):
    from rudder.traces import TraceError

    trace, _ = _recorded_under(tmp_path / "t", [100] * 8, lambda t: 1.0, 1.0, changes=[[0.0, 0, 1.0]])
    record = json.loads((trace / "conditions.json").read_text())
    record["changes"][0][2] = 0
    (trace / "conditions.json").write_text(json.dumps(record))
    with pytest.raises(TraceError) as err:
        ReplayEnv(str(trace))
    assert str(err.value).splitlines() == [str(err.value)]
    assert "conditions.json" in str(err.value) and "changes[0][2]" in str(err.value) and "0" in str(err.value)
