"""``rudder/Replay-v0``'s contract on the shipped sample traces (no MPI job): Gymnasium's checks, seeding through
``reset(seed=)``, bounded observations, the documented info, the action wrappers, and one-line errors."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import rudder.env  # noqa: F401  (registers the environments)
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import FlattenObservation
from rudder.baselines.policies import Periodic, StaticBuffer
from rudder.env.contract import DecisionInfo, WindowInfo
from rudder.env.wrappers import Budget, EvictOrKeep, FractionBudget
from rudder.traces import Trace, TraceError

K = 256  # the samples' recorded candidates per decision


def test_replay_env_passes_check_env_and_is_seeded_by_reset(shipped_trace, play_windows):
    env = gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0, buffer_init="random").unwrapped
    check_env(env, skip_render_check=True)
    check_env(
        FlattenObservation(gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0)).unwrapped, skip_render_check=True
    )
    env.reset(seed=3)
    ids_a = env.episode.buffer.resident_ids().copy()
    env.reset(seed=3)
    np.testing.assert_array_equal(ids_a, env.episode.buffer.resident_ids())
    env.reset(seed=4)
    assert not np.array_equal(np.sort(ids_a), np.sort(env.episode.buffer.resident_ids()))
    first = play_windows(env, Periodic(), seed=5)[2]
    again = play_windows(env, Periodic(), seed=5)[2]
    assert first == again and first.prefetched > first.initial_fill


def test_observations_bounded_and_info_as_documented(shipped_trace):
    env = gym.make("rudder/Replay-v0", trace=shipped_trace, rank=1, reward="time")
    obs, info = env.reset(seed=0)
    assert set(DecisionInfo.__required_keys__) <= set(info) and "time_model" in info
    assert set(WindowInfo.__required_keys__) == set(info["window"])
    assert info["candidate_ids"].shape == (K,) and info["n_candidates"] == np.count_nonzero(info["candidate_ids"] >= 0)
    assert np.isfinite(info["time_model"]["r2"]) and info["time_model"]["s_per_remote_row"] >= 0
    obs, reward, *_, info = env.step(np.zeros(K, dtype=np.int8))
    assert reward < 0  # minus modelled seconds
    assert set(DecisionInfo.__required_keys__) | {"applied_ids"} <= set(info)
    assert info["window"]["minibatches"] == env.unwrapped.period
    for key, value in obs.items():
        assert value.dtype == np.float32 and np.all((value >= 0) & (value <= 1)), key
    assert obs["progress"][0] > 0


def test_wrappers_map_to_ranked_prefixes(shipped_trace, play_windows):
    def make():
        return gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0)

    c_periodic = play_windows(make(), Periodic())[2]
    yes = EvictOrKeep(make())
    yes.reset(seed=0)
    done = False
    while not done:
        *_, terminated, truncated, _ = yes.step(1)
        done = terminated or truncated
    assert yes.unwrapped.episode.buffer.counters == c_periodic  # always "yes" is MassiveGNN's periodic policy
    assert EvictOrKeep(make()).spec is not None and isinstance(EvictOrKeep(make()), FractionBudget)
    keep = play_windows(make(), StaticBuffer())[2]
    assert keep.prefetched == keep.initial_fill
    budget = Budget(make(), levels=(0, 4, 64))
    budget.reset(seed=0)
    budget.step(0)  # the first decision has no candidate yet (nothing missed)
    _, _, _, _, info = budget.step(1)
    assert info["applied_ids"].size == 4
    with pytest.raises(ValueError, match=r"Budget action must be an integer in \[0, 3\)"):
        budget.step(7)
    with pytest.raises(ValueError, match=r"EvictOrKeep action must be 0 \(keep\) or 1"):
        yes.reset(seed=0)
        yes.step(2)


def test_wrappers_record_their_constructor_args(shipped_trace):
    """As Gymnasium's own wrappers: the spec stack names each wrapper with its arguments."""
    env = FractionBudget(
        Budget(gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0), levels=(0, 8)), levels=(0.0, 1.0)
    )
    names = [w.name for w in env.spec.additional_wrappers]
    assert names == ["Budget", "FractionBudget"]
    assert env.spec.additional_wrappers[0].kwargs == {"levels": (0, 8)}


def test_bad_actions_are_named(shipped_trace):
    env = gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"MultiBinary\({K}\) array of shape \({K},\), got shape \(3,\)"):
        env.step(np.zeros(3, dtype=np.int8))
    with pytest.raises(ValueError, match="integers or booleans"):
        env.step(np.zeros(K, dtype=np.float32))
    with pytest.raises(ValueError, match=r"0 or 1, got values in \[2, 2\]"):
        env.step(np.full(K, 2))
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0).unwrapped.step(np.zeros(K, dtype=np.int8))


def test_bad_traces_are_named(shipped_trace, tmp_path):
    with pytest.raises(TraceError, match="rank 5 not in trace"):
        gym.make("rudder/Replay-v0", trace=shipped_trace, rank=5)
    broken = tmp_path / "broken"
    shutil.copytree(shipped_trace, broken)
    chunk = sorted((broken / "rank0").glob("chunk-*.npz"))[0]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=chunk.name):
        gym.make("rudder/Replay-v0", trace=str(broken), rank=0)
    meta = json.loads((broken / "trace.json").read_text())
    meta["version"] = 99
    (broken / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(TraceError, match="version 99"):
        Trace(str(broken))


def test_recording_a_trace_is_timed_apart_from_the_env_overhead(shipped_trace):
    """A slow trace writer shows in ``trace_s``, not in ``env_overhead_s`` (the env's own work per decision)."""
    import time

    class SlowWriter:
        def add_minibatch(self, **_):
            time.sleep(0.01)

        def add_decision(self, **_):
            time.sleep(0.01)

    env = gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0).unwrapped
    obs, info = env.reset(seed=0)
    env.trace = SlowWriter()
    agent, steps = Periodic(), 0
    for _ in range(3):
        obs, _, terminated, _, info = env.step(agent.act(obs, info))
        steps += 1
    writes = steps * (1 + env.period)  # one decision and ``period`` minibatches per step
    assert env.trace_s >= 0.01 * writes
    assert env.env_overhead_s < 0.01 * writes / 2
