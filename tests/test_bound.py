"""The optimum over action sequences within the replay model (issue 25): equal to exhaustive search where the search
is exhaustive, called a reference where it pruned, and beaten by no agent on any shipped trace."""

import glob

import numpy as np
import pytest
from rudder.baselines.constant import KEEP_REPLACE_SPACE, LINK_SPACE, SPACES
from rudder.baselines.policies import RandomBudget
from rudder.traces import HELDOUT_DIR, SAMPLES_DIR, TRAIN_DIR, Trace

from rudder.evaluation.bound import exhaustive, optimum, remaining_lower_s
from rudder.evaluation.play import play
from rudder.evaluation.registry import make_agent
from rudder.evaluation.scoring import bound_row, constant_rows, space_env

EMU = "traces/samples/emu2-metis2-f10x25-400mbit"


@pytest.mark.parametrize(
    "space, windows", [(LINK_SPACE, 3), (KEEP_REPLACE_SPACE, 4)], ids=lambda x: getattr(x, "name", x)
)
def test_the_search_equals_exhaustive_search_on_a_few_windows(space, windows):
    env = space_env(Trace(EMU), 1, space)
    best_s, best_actions = exhaustive(env, space, windows)  # every sequence, each played from the start
    wide = optimum(env, space, width=10**6, windows=windows)  # nothing pruned
    assert wide.proved and wide.kind == "bound" and wide.windows == windows
    assert wide.time_s == pytest.approx(best_s, rel=1e-12)
    assert wide.nodes < sum(len(space.actions) ** d for d in range(1, windows + 1))  # equal actions tried once
    narrow = optimum(env, space, width=1, windows=windows)
    assert narrow.time_s >= best_s - 1e-12
    if narrow.time_s > best_s + 1e-12:  # pruned past the optimum: never called a bound
        assert not narrow.proved and narrow.kind == "reference"


def test_the_lower_bound_is_below_every_constant_and_the_search_proves_nothing_it_cannot():
    env = space_env(Trace(EMU), 0, LINK_SPACE)
    lower = remaining_lower_s(env)
    assert np.all(np.diff(lower) <= 0) and lower[-1] == 0
    assert all(lower[0] <= r["time_s"] for r in constant_rows(env, LINK_SPACE))
    res = optimum(env, LINK_SPACE, width=2)
    assert res.kind == "reference" and res.pruned_lower_s < res.time_s  # too weak a bound to prove the beam here


def _timed_ranks():
    for folder in sorted(
        glob.glob(f"{SAMPLES_DIR}/*/") + glob.glob(f"{TRAIN_DIR}/*/") + glob.glob(f"{HELDOUT_DIR}/*/")
    ):
        trace = Trace(folder)
        for rank in trace.ranks:
            yield trace, rank


AGENTS = {  # every built-in agent that decides in a space but the LLM ones, and random levels (RandomBudget)
    "link-levels": ["ppo-link", "level", "mpc"],
    "keep-replace": ["ppo", "periodic", "hitrate", "random"],
}


def test_no_agent_beats_the_bound_on_any_rank_of_any_shipped_trace():
    checked = 0
    for trace, rank in _timed_ranks():
        for name, space in SPACES.items():
            env = space_env(trace, rank, space)
            if not env.time_model.separates_remote_rows:  # modelled time does not depend on the actions
                break
            fixed = constant_rows(env, space)
            found = bound_row(env, space, fixed)
            assert found["time_s"] <= min(r["time_s"] for r in fixed)
            for spec in AGENTS[name]:
                agent = RandomBudget(seed=0) if spec == "random" else make_agent(spec)
                assert agent.settings == space.settings
                t = play(env, agent)["time_s"]
                assert t >= found["time_s"] * (1 - 1e-9), (trace.directory, rank, spec, t, found)
                checked += 1
    assert checked >= 14 * 7  # every timed rank of the shipped traces (14) x the agents
