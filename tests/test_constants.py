"""The constant policies as evaluation rows (issue 25): best-constant and tuned-constant per action space, the bound
beside them, and every agent row carrying its space's best constant, bound and the replay model's error band."""

import numpy as np
import pytest
from rudder.baselines.constant import KEEP_REPLACE_SPACE, LINK_SPACE, SPACES, Constant, space_of
from rudder.traces import Trace

from rudder.evaluation.registry import make_agent
from rudder.evaluation.scoring import constant_rows, evaluate_trace, space_env, tuned_constants

SMALL = "traces/samples/small-random2-f5x10"  # timed, 2 ranks of 8 windows
EMU = "traces/samples/emu2-metis2-f10x25-400mbit"


def test_spaces_name_their_agents_and_their_constants_are_the_fixed_policies():
    assert space_of("ppo-link") is LINK_SPACE and space_of("llm") is KEEP_REPLACE_SPACE and space_of("static") is None
    for name, space in SPACES.items():
        for spec in space.agents:
            if spec not in ("llm", "llm-link", "ppo", "ppo-link", "random"):  # those load models or draw levels
                assert make_agent(spec).settings == space.settings, (name, spec)
    assert KEEP_REPLACE_SPACE.label(0) == "keep" and KEEP_REPLACE_SPACE.label(3) == "replace"
    env = space_env(Trace(SMALL), 0, KEEP_REPLACE_SPACE)
    replace, periodic = constant_rows(env, KEEP_REPLACE_SPACE)[-1], None
    from rudder.evaluation.play import play_episode

    periodic = play_episode(env, make_agent("periodic"))
    assert replace["time_s"] == periodic["time_s"] and replace["remote_fetched"] == periodic["remote_fetched"]
    with pytest.raises(ValueError, match="action index"):
        Constant(LINK_SPACE, 5)


def test_evaluation_rows_carry_the_constants_the_bound_and_the_error_band():
    agents = {n: (lambda n: lambda trace, rank: make_agent(n))(n) for n in ("none", "periodic", "mpc")}
    rows = evaluate_trace(SMALL, agents, oracles=("best-constant", "bound"))
    by = {(r["agent"], r["rank"]): r for r in rows}
    trace = Trace(SMALL)
    for rank in trace.ranks:
        for name, space in SPACES.items():
            times = [r["time_s"] for r in constant_rows(space_env(trace, rank, space), space)]
            best = by[(f"best-constant:{name}", rank)]
            assert best["time_s"] == min(times) and best["constant_action"] == space.label(int(np.argmin(times)))
            found = by[(f"bound:{name}", rank)]
            assert found["time_s"] <= min(times) and found["bound_kind"] in ("bound", "reference")
        periodic, mpc, none = by[("periodic", rank)], by[("mpc", rank)], by[("none", rank)]
        assert periodic["action_space"] == "keep-replace" and mpc["action_space"] == "link-levels"
        assert periodic["best_constant_s"] == by[("best-constant:keep-replace", rank)]["time_s"]
        assert mpc["bound_s"] == by[("bound:link-levels", rank)]["time_s"]
        assert none["action_space"] == "" and "best_constant_s" not in none
        assert periodic["time_error_band"] == pytest.approx(abs(periodic["time_oos_time_error"]))
        assert 0.3 < periodic["time_error_band"] < 1.0  # this sample's time check: -64.6% / -66.2%


def test_the_tuned_constant_is_chosen_elsewhere_and_applied_unchanged():
    tuned = tuned_constants((EMU,))
    emu = Trace(EMU)
    for name, space in SPACES.items():
        totals = sum(
            np.asarray([r["time_s"] for r in constant_rows(space_env(emu, rank, space), space)]) for rank in emu.ranks
        )
        assert tuned[name]["index"] == int(np.argmin(totals)) and len(tuned[name]["trained_on"]) == 2
    rows = evaluate_trace(SMALL, {}, oracles=("tuned-constant",), tuned_on=(EMU,))
    for r in rows:
        space = SPACES[r["agent"].split(":")[1]]
        i = tuned[space.name]["index"]
        assert r["constant_action"] == space.label(i) and r["provenance"] == "held-out"
        assert r["time_s"] == constant_rows(space_env(Trace(SMALL), r["rank"], space), space)[i]["time_s"]
