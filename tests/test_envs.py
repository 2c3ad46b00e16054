"""The live environment inside real DistDGL jobs: Gymnasium's checks on every trainer, and a recorded live run
replays exactly (same hits, misses, rows fetched and decisions per window)."""

import gymnasium as gym
import numpy as np
import pytest
import rudder.env  # noqa: F401  (registers the environments)
from rudder.baselines.policies import Lookahead, Periodic
from rudder.env.contract import buffer_kwargs
from rudder.traces import Trace


@pytest.fixture(scope="module")
def live(record_live):
    """A real 2-partition run with the periodic agent, recorded, with check_env run on each trainer's live env."""
    return record_live("periodic", "--check-env")


@pytest.fixture(scope="module")
def live_lookahead(record_live):
    """A real run with the lookahead agent (seed order, partition structure, admit-on-miss by predicted need)."""
    return record_live("lookahead")


def test_live_env_passes_check_env_on_every_trainer(live):
    assert [r["check_env"] for r in live["summary"]["ranks"]] == ["passed", "passed"]


@pytest.mark.parametrize("agent, rank", [("periodic", 0), ("periodic", 1), ("lookahead", 0), ("lookahead", 1)])
def test_replay_of_a_live_run_is_exact(agent, rank, request, play_windows):
    live = request.getfixturevalue("live" if agent == "periodic" else "live_lookahead")
    trace = Trace(live["trace"])
    rt = trace.rank(rank)
    table = rt.table()
    player = Periodic() if agent == "periodic" else Lookahead()
    env = gym.make("rudder/Replay-v0", trace=live["trace"], rank=rank, **buffer_kwargs(player.settings))
    windows, applied, counters = play_windows(env, player)
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
    # it mattered: rows entered the buffer by the agent's prefetch decisions, beyond the initial fill (admissions
    # on a miss, which any admitting agent makes, do not count)
    assert sum(len(ids) for ids in applied) > 0
    assert live_rank["prefetched"] > live_rank["initial_fill"]


def test_recorded_agent_applies_a_live_runs_decisions_again_live(live, record_live):
    """``--agent recorded`` re-applies a live run's decisions at the same minibatches in a new live run (how P3
    measures what taking the LLM's decisions costs), and a replay of that run with them is exact."""
    from rudder.baselines.policies import Recorded

    from rudder.evaluation.play import play as play_agent

    again = record_live("recorded", "--decisions-from", live["trace"])
    for rank in (0, 1):
        first, second = Trace(live["trace"]).rank(rank).decisions(), Trace(again["trace"]).rank(rank).decisions()
        assert len(first) > 0
        np.testing.assert_array_equal(first["minibatch"], second["minibatch"])
        for a, b in zip(first["ids"], second["ids"]):
            np.testing.assert_array_equal(a, b)
        live_rank = again["summary"]["ranks"][rank]
        assert live_rank["decisions"] == len(first)
        res = play_agent(
            gym.make("rudder/Replay-v0", trace=again["trace"], rank=rank), Recorded(again["trace"], rank=rank)
        )
        for key in ("remote_sampled", "hits", "remote_fetched", "prefetched"):
            assert res[key] == live_rank[key], key
