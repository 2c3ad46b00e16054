"""Slow decisions: the async runner applies them late, by the latency they took, and stale decisions cost."""

import os
import time

import numpy as np
import pytest
from rudder.baselines.policies import HitRateRule, Periodic, Recorded
from rudder.env.replay_env import ReplayEnv

from rudder.evaluation.play import lower_priority, play, play_episode, run_async

TRACE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "traces", "samples", "small-metis2-f10x25"
)


class SlowPeriodic(Periodic):
    def __init__(self, sleep_s):
        self.sleep_s = sleep_s

    def act(self, observation, info):
        time.sleep(self.sleep_s)
        return super().act(observation, info)


def test_instant_decisions_land_at_the_next_minibatch():
    env = ReplayEnv(TRACE, rank=0)
    fast = run_async(env, Periodic(), latency_s=0.0)
    sync = play_episode(ReplayEnv(TRACE, rank=0), Periodic())
    assert fast["delay_minibatches"] and set(fast["delay_minibatches"]) == {0}
    for key in ("remote_sampled", "hits", "remote_fetched", "prefetched"):
        assert fast[key] == sync[key]


def test_replay_turns_latency_into_minibatches_of_the_recorded_run():
    env = ReplayEnv(TRACE, rank=0)
    s_mb = env.live_seconds_per_minibatch
    res = run_async(env, Periodic(), latency_s=2.5 * s_mb)
    # every decision lands 3 minibatches after it was asked for; while one is in flight none is asked
    assert set(res["delay_minibatches"]) == {3}
    assert res["decisions"] == len(res["delay_minibatches"]) > 0
    very_late = run_async(ReplayEnv(TRACE, rank=0), Periodic(), latency_s=20 * s_mb)
    assert set(very_late["delay_minibatches"]) == {20}
    assert very_late["decisions"] < res["decisions"]


def test_measured_latency_is_used_and_recorded():
    env = ReplayEnv(TRACE, rank=1)
    sleep = 0.05
    res = run_async(env, SlowPeriodic(sleep))
    s_mb = env.live_seconds_per_minibatch
    assert res["latency_p50_s"] >= sleep
    expected = int(np.ceil(res["latency_p50_s"] / s_mb))
    assert min(res["delay_minibatches"]) >= int(np.ceil(sleep / s_mb))
    assert expected in res["delay_minibatches"]


def test_hit_rate_rule_keeps_when_nothing_is_stale():
    rule = HitRateRule(drop=0.02, stale_fraction=0.5)
    obs = {"candidates": np.zeros(8, np.float32), "buffer": np.array([1, 0.5, 0.5, 0, 0.25], np.float32)}
    info = dict(n_candidates=8, n_evictable=3, capacity=100)
    assert rule.act(obs, info).sum() == 0
    obs["buffer"][1] = 0.3  # the window's hit rate fell below the run's
    assert rule.act(obs, info).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert rule.act(obs, dict(info, n_evictable=60)).sum() == 8


@pytest.mark.parametrize("agent", [HitRateRule(), Periodic()])
def test_agents_play_sample_traces(agent):
    res = play_episode(ReplayEnv(TRACE, rank=0), agent)
    assert res["remote_fetched"] < res["remote_sampled"]


def test_background_thread_gets_idle_priority_and_training_keeps_its_own():
    import threading

    seen = {}

    def worker():
        seen["how"] = lower_priority()
        seen["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["how"] == "SCHED_IDLE" and seen["policy"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only that thread
    with pytest.raises(ValueError, match="unknown decision priority 'low'"):
        run_async(ReplayEnv(TRACE, rank=0), Periodic(), priority="low")


def test_recorded_decisions_replay_the_recording_run_exactly():
    """The shipped trace was recorded with the periodic agent: playing its decisions back at their minibatches
    gives its counters, and the buffer settings follow the recording agent."""
    from rudder.traces import Trace

    for rank in (0, 1):
        rec = Recorded(TRACE, rank=rank)
        assert rec.source_agent == "periodic" and sum(len(v) for v in rec.schedule.values()) > 0
        res = play(ReplayEnv(TRACE, rank=rank), rec)
        counters = Trace(TRACE).rank(rank).meta["counters"]
        for key in ("remote_sampled", "hits", "remote_fetched", "prefetched"):
            assert res[key] == counters[key], key
        assert res["decisions"] == len(Trace(TRACE).rank(rank).decisions()["minibatch"].unique())
    with pytest.raises(ValueError, match="no trainer rank 5"):
        Recorded(TRACE, rank=5)
