"""The live and replay environments: a recorded live run replays exactly; Gymnasium's checks; bad input."""

import json
import os
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import FlattenObservation

import rudder_env  # noqa: F401  (registers the environments)
from baselines.policies import Lookahead
from baselines.policies import Periodic, StaticBuffer
from rudder_env.wrappers import Budget, EvictOrKeep
from traces import Trace, TraceError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_dist import free_port_block  # noqa: E402


def record_live(tmp_path_factory, agent, *extra):
    out = tmp_path_factory.mktemp(f"live-{agent}")
    cache = str(tmp_path_factory.getbasetemp() / "cache")
    trace = out / "trace"
    summary = out / "run.json"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "gnn", "--graph", "synth-tiny", "--parts", "2",
           "--epochs", "2", "--batch-size", "100", "--fanout", "3,5", "--period", "4", "--candidates", "64",
           "--agent", agent, *extra, "--trace", str(trace), "--summary", str(summary),
           "--port", str(free_port_block())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(trace=str(trace), summary=json.loads(summary.read_text()))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A real 2-partition run with the periodic agent, recorded, with check_env run on each trainer's live env."""
    return record_live(tmp_path_factory, "periodic", "--check-env")


@pytest.fixture(scope="module")
def live_lookahead(tmp_path_factory):
    """A real run with the lookahead agent (seed order, partition structure, admit-on-miss by predicted need)."""
    return record_live(tmp_path_factory, "lookahead")


def play(env, agent, seed=0):
    obs, info = env.reset(seed=seed)
    agent.reset()
    windows, applied, done = [], [], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        windows.append(info["window"])
        applied.append(info["applied_ids"])
        done = terminated or truncated
    return windows, applied, env.unwrapped.episode.buffer.counters


def test_live_env_passes_check_env_on_every_trainer(live):
    assert [r["check_env"] for r in live["summary"]["ranks"]] == ["passed", "passed"]


@pytest.mark.parametrize("agent, rank", [("periodic", 0), ("periodic", 1), ("lookahead", 0), ("lookahead", 1)])
def test_replay_of_a_live_run_is_exact(agent, rank, request):
    live = request.getfixturevalue("live" if agent == "periodic" else "live_lookahead")
    trace = Trace(live["trace"])
    rt = trace.rank(rank)
    table = rt.table()
    player = Periodic() if agent == "periodic" else Lookahead()
    env = gym.make("rudder/Replay-v0", trace=live["trace"], rank=rank, ranking=getattr(player, "ranking", "misses"),
                   admit_on_miss=getattr(player, "admit_on_miss", None))
    windows, applied, counters = play(env, player)
    period = trace.meta["config"]["period"]
    assert len(windows) == -(-len(table) // period)
    for w, (start, window) in zip(windows, table.groupby(np.arange(len(table)) // period)):
        assert w["hits"] == window["hits"].sum()
        assert w["remote_fetched"] == window["remote_fetched"].sum()
        assert w["prefetched"] == window["prefetched"].sum()
        assert w["remote_sampled"] == window["remote_count"].sum()
    recorded = rt.decisions()
    assert len(recorded) == len(applied)
    for ids, rec in zip(applied, recorded["ids"]):
        np.testing.assert_array_equal(ids, rec)
    live_rank = live["summary"]["ranks"][rank]
    for key in ("remote_sampled", "hits", "remote_fetched", "prefetched"):
        assert getattr(counters, key) == live_rank[key], key
    assert live_rank["prefetched"] > live_rank["initial_fill"] or live_rank["admitted_on_miss"] > 0  # it mattered


def test_recorded_agent_applies_a_live_runs_decisions_again_live(live, tmp_path_factory):
    """``--agent recorded`` re-applies a live run's decisions at the same minibatches in a new live run (how P3
    measures what taking the LLM's decisions costs), and a replay of that run with them is exact."""
    from rudder_env.evaluation.play import play as play_agent
    from baselines.policies import Recorded

    again = record_live(tmp_path_factory, "recorded", "--decisions-from", live["trace"])
    for rank in (0, 1):
        first, second = Trace(live["trace"]).rank(rank).decisions(), Trace(again["trace"]).rank(rank).decisions()
        assert len(first) > 0
        np.testing.assert_array_equal(first["minibatch"], second["minibatch"])
        for a, b in zip(first["ids"], second["ids"]):
            np.testing.assert_array_equal(a, b)
        live_rank = again["summary"]["ranks"][rank]
        assert live_rank["decisions"] == len(first)
        res = play_agent(gym.make("rudder/Replay-v0", trace=again["trace"], rank=rank),
                         Recorded(again["trace"], rank=rank))
        for key in ("remote_sampled", "hits", "remote_fetched", "prefetched"):
            assert res[key] == live_rank[key], key


def test_replay_env_checks_and_is_deterministic(live):
    env = gym.make("rudder/Replay-v0", trace=live["trace"], rank=0, buffer_init="random").unwrapped
    check_env(env, skip_render_check=True)
    check_env(FlattenObservation(gym.make("rudder/Replay-v0", trace=live["trace"], rank=0)).unwrapped,
              skip_render_check=True)
    a, _ = env.reset(seed=3)
    ids_a = env.episode.buffer.resident_ids().copy()
    b, _ = env.reset(seed=3)
    np.testing.assert_array_equal(ids_a, env.episode.buffer.resident_ids())
    env.reset(seed=4)
    assert not np.array_equal(np.sort(ids_a), np.sort(env.episode.buffer.resident_ids()))
    first = play(env, Periodic(), seed=5)[2]
    again = play(env, Periodic(), seed=5)[2]
    assert first == again


def test_observations_are_bounded_float32_and_time_model_reported(live):
    env = gym.make("rudder/Replay-v0", trace=live["trace"], rank=1, reward="time")
    obs, info = env.reset(seed=0)
    assert np.isfinite(info["time_model"]["r2"])
    assert info["time_model"]["s_per_remote_row"] >= 0
    obs, reward, *_ = env.step(np.zeros(64, dtype=np.int8))
    assert reward < 0  # minus modelled seconds
    for key, value in obs.items():
        assert value.dtype == np.float32 and np.all((value >= 0) & (value <= 1)), key
    assert obs["progress"][0] > 0


def test_wrappers_map_to_ranked_prefixes(live):
    base = gym.make("rudder/Replay-v0", trace=live["trace"], rank=0)
    yes = EvictOrKeep(gym.make("rudder/Replay-v0", trace=live["trace"], rank=0))
    c_periodic = play(base, Periodic())[2]
    yes.reset(seed=0)
    done = False
    while not done:
        *_, terminated, truncated, _ = yes.step(1)
        done = terminated or truncated
    assert yes.unwrapped.episode.buffer.counters == c_periodic  # always "yes" is MassiveGNN's periodic policy
    keep = play(gym.make("rudder/Replay-v0", trace=live["trace"], rank=0), StaticBuffer())[2]
    assert keep.prefetched == keep.initial_fill
    budget = Budget(gym.make("rudder/Replay-v0", trace=live["trace"], rank=0), levels=(0, 4, 64))
    budget.reset(seed=0)
    _, _, _, _, info = budget.step(1)
    assert info["applied_ids"].size <= 4
    with pytest.raises(ValueError, match=r"Budget action must be an integer in \[0, 3\)"):
        budget.step(7)


def test_bad_actions_are_named(live):
    env = gym.make("rudder/Replay-v0", trace=live["trace"], rank=0).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"MultiBinary\(64\) array of shape \(64,\), got shape \(3,\)"):
        env.step(np.zeros(3, dtype=np.int8))
    with pytest.raises(ValueError, match="integers or booleans"):
        env.step(np.zeros(64, dtype=np.float32))
    with pytest.raises(ValueError, match=r"0 or 1, got values in \[2, 2\]"):
        env.step(np.full(64, 2))


def test_bad_traces_are_named(live, tmp_path):
    with pytest.raises(TraceError, match="rank 5 not in trace"):
        gym.make("rudder/Replay-v0", trace=live["trace"], rank=5)
    broken = tmp_path / "broken"
    shutil.copytree(live["trace"], broken)
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
