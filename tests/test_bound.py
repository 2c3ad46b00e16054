"""The optimum over action sequences within the replay model (issue 25): equal to exhaustive search where the search
is exhaustive, called a reference where it pruned, and beaten by no agent on any shipped trace."""

import glob
import os

import numpy as np
import pytest
from rudder.baselines.constant import KEEP_REPLACE_SPACE, LINK_SPACE, SPACES
from rudder.baselines.policies import RandomBudget
from rudder.traces import HELDOUT_DIR, SAMPLES_DIR, TRAIN_DIR, Trace

from rudder.evaluation.bound import exhaustive, optimum, remaining_lower_s
from rudder.evaluation.play import play
from rudder.evaluation.registry import make_agent
from rudder.evaluation.scoring import constant_rows, space_env
from rudder.headroom import measure

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


SHIPPED = sorted(glob.glob(f"{SAMPLES_DIR}/*/") + glob.glob(f"{TRAIN_DIR}/*/") + glob.glob(f"{HELDOUT_DIR}/*/"))
AGENTS = {  # every built-in agent that decides in a space but the LLM ones and mpc (measured by `measure`)
    "link-levels": ["ppo-link", "level"],
    "keep-replace": ["ppo", "periodic", "hitrate", "random"],  # random levels: RandomBudget
}


def test_no_agent_beats_the_bound_on_any_rank_of_any_shipped_trace(tmp_path):
    df = measure(SHIPPED)  # what `rudder headroom` prints for every shipped trace
    df.to_csv(tmp_path / "headroom.csv", index=False)  # kept with the test's files, for reading
    timed = df[df["bound_s"].notna()]
    assert len(timed) == 2 * 14  # both spaces on every rank whose time fit separates remote rows
    assert (timed["bound_s"] <= timed["best_constant_s"]).all()
    link = timed[timed["space"] == "link-levels"]
    assert (link["mpc_s"] >= link["bound_s"] * (1 - 1e-9)).all()
    folders = {os.path.basename(os.path.normpath(f)): f for f in SHIPPED}
    for _, row in timed.iterrows():
        space = SPACES[row["space"]]
        env = space_env(Trace(folders[row["trace"]]), int(row["rank"]), space)
        for spec in AGENTS[space.name]:
            agent = RandomBudget(seed=0) if spec == "random" else make_agent(spec)
            assert agent.settings == space.settings
            t = play(env, agent)["time_s"]
            assert t >= row["bound_s"] * (1 - 1e-9), (row["trace"], row["rank"], spec, t, row["bound_s"])
