"""The model-predictive level controller (issue 25): an agent by name, a link estimate that forgets, and decisions
that follow a link whose per-row cost changes mid-run."""

import dataclasses

import numpy as np
import pytest
from rudder.baselines.constant import LINK_SPACE
from rudder.baselines.mpc import forgetting_estimate
from rudder.env.episode import LinkEstimate
from rudder.traces import Trace

from rudder.evaluation.registry import make_agent
from rudder.evaluation.scoring import space_env

EMU = "traces/samples/emu2-metis2-f10x25-400mbit"


def test_the_estimate_forgets_the_link_it_no_longer_has():
    forgetting, whole_run = forgetting_estimate(forget=0.5), LinkEstimate()
    rng = np.random.default_rng(0)
    for step in range(30):
        c_remote = 1e-5 if step < 20 else 8e-5  # the link gets 8x slower per row for the last 10 pulls
        local, remote = int(rng.integers(100, 5000)), int(rng.integers(1000, 20_000))
        for est in (forgetting, whole_run):
            est.add(local, remote, 0.002 + 1e-7 * local + c_remote * remote)
    assert forgetting.coefficients[2] == pytest.approx(8e-5, rel=1e-3)
    assert whole_run.coefficients[2] < 6e-5  # the whole run's fit averages the two links
    with pytest.raises(ValueError, match="forget"):
        forgetting_estimate(forget=0.0)


def _play(factor: float, at_window: int = 7) -> list[int]:
    """MPC's level per window on a replay whose per-row remote cost is ``factor`` times higher from ``at_window``
    on (demand pulls and background chunks alike)."""
    env = space_env(Trace(EMU), 1, LINK_SPACE)
    agent = make_agent("mpc")
    obs, info = env.reset(seed=0)
    agent.reset()
    levels, done = [], False
    while not done:
        if len(levels) == at_window:
            slower = dataclasses.replace(env.time_model, c_remote=env.time_model.c_remote * factor)
            env.run.time_model = env._link.model = slower  # no public setter for the replayed link: a test-only swap
        levels.append(agent.act(obs, info))
        obs, _, done, _, info = env.step(levels[-1])
    return levels


def test_mpc_switches_level_when_the_link_gets_slower_mid_run():
    same, slower = _play(1.0), _play(8.0)
    assert same[:7] == slower[:7] and min(same[3:7]) >= 2  # a quarter of the budget or more while the link is fast
    assert max(slower[9:]) < min(slower[3:7])  # within two windows of the change it prefetches less
    assert max(same[9:]) >= min(same[3:7])  # and not without the change
    assert make_agent("mpc").settings == LINK_SPACE.settings
