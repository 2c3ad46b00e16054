"""The scenario suite (``bench/suite.py``): its recorded traces and scenario files, and the export of a link-level
action sequence as decisions that ``--decisions-from`` (and ``Recorded`` in replay) applies again."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from rudder.baselines.constant import SPACES
from rudder.baselines.policies import Recorded
from rudder.bench import suite
from rudder.env.scenario import Scenario
from rudder.traces import Trace

from rudder.evaluation.play import play_episode, play_schedule
from rudder.evaluation.registry import make_agent
from rudder.evaluation.scoring import _Sequence, space_env


def test_every_family_has_training_and_held_out_runs_recorded_with_what_they_met():
    for family, splits in suite.FAMILIES.items():
        assert len(splits["train"]) >= 2 and len(splits["heldout"]) >= 1, family
        names = [s["name"] for s in splits["train"] + splits["heldout"]]
        assert len(set(names)) == len(names)
    for _, split, scenario in suite.runs():
        path = os.path.join(suite.SCENARIOS, f"{scenario['name']}.json")
        assert Scenario.load(path).to_dict() == Scenario.from_dict(scenario).to_dict()
        trace = suite.trace_dir(split, scenario)
        record = json.load(open(os.path.join(trace, "conditions.json")))
        assert record["scenario"]["name"] == scenario["name"] and len(record["changes"]) >= 4
        assert Trace(trace).complete
        if any(p["kind"] == "cotenant" for p in scenario["processes"]):  # another job's traffic, really sent
            assert record["cotenant"] == "flow" and min(record["cotenant_bytes"]) > 1e7, trace


def test_an_exported_sequence_played_back_is_the_sequence(tmp_path):
    """decisions_trace: the ids a link-level action sequence queues in replay, written as the trace's decisions;
    played back at the same minibatches (as --decisions-from does live) the episode is the sequence's, exactly."""
    src = suite.trace_dir("heldout", suite.FAMILIES["square-2s"]["heldout"][0])
    space = SPACES["link-levels"]
    labels = [space.label(a).split()[-1] for a in range(len(space.actions))]
    windows = 16
    seq = {r: [(i + 2 * r) % len(labels) for i in range(windows)] for r in (0, 1)}
    out = suite.decisions_trace(src, {r: " ".join(labels[a] for a in s) for r, s in seq.items()}, str(tmp_path / "d"))
    assert os.path.isfile(os.path.join(out, "conditions.json"))
    # live, --agent recorded plays them with the settings they were played with here, not the recording agent's
    assert Trace(src).meta["config"]["agent"] != "level"
    assert make_agent("recorded", trace=out).settings == space.settings
    for rank in (0, 1):
        played = play_episode(space_env(Trace(src), rank, space), _Sequence(space, seq[rank]))
        again = play_schedule(space_env(Trace(out), rank, space), Recorded(out, rank).schedule)
        keys = ("hits", "remote_fetched", "prefetched", "time_s")
        assert {k: again[k] for k in keys} == {k: played[k] for k in keys}
        assert played["prefetched"] > 0


def test_the_bound_confirmed_live_plays_what_replay_scored(monkeypatch):
    """``suite_live --bound``: the bound arm's exported decisions, played back in replay at the minibatches where
    ``--decisions-from`` applies them live, take the seconds replay gave the bound's sequence; the constant arms are
    the levels they are named after; the rows keep the fit's R², which on these runs is under the gate (the search
    ran past it, and only the live runs say whether its sequence is worth anything)."""
    from rudder.bench import suite_live
    from rudder.env.timing import MIN_R2

    arms = {}

    def measure(scenario, reps, played):
        arms.update(played)
        return pd.DataFrame([dict(scenario=os.path.basename(scenario), arm=a, rep=0, train_s=1.0) for a in played])

    monkeypatch.setattr(suite_live, "measure", measure)
    scenario = suite.FAMILIES["square-2s"]["heldout"][0]
    df = suite_live.confirm_bound(os.path.join(suite.SCENARIOS, f"{scenario['name']}.json"), reps=1)
    assert list(arms) == ["bound", "level-0.125 as decisions", "level-0", "level-0.125"]
    assert arms["level-0.125"][-1] == "level=0.125"
    modelled = df.set_index("arm")["replay_s"]
    out = arms["bound"][arms["bound"].index("--decisions-from") + 1]
    src, space = Trace(suite.trace_dir("heldout", scenario)), SPACES["link-levels"]
    again = [play_schedule(space_env(Trace(out), r, space), Recorded(out, r).schedule)["time_s"] for r in src.ranks]
    assert max(again) == pytest.approx(modelled["bound"], rel=1e-9)
    labels = [space.label(a).split()[-1] for a in range(len(space.actions))]
    held = [play_episode(space_env(src, r, space), space.constant(labels.index("0.125")))["time_s"] for r in src.ranks]
    assert max(held) == pytest.approx(modelled["level-0.125"], rel=1e-9)
    out = arms["level-0.125 as decisions"][-1]  # the control: the level played back as the bound is
    again = [play_schedule(space_env(Trace(out), r, space), Recorded(out, r).schedule)["time_s"] for r in src.ranks]
    assert max(again) == pytest.approx(modelled["level-0.125"], rel=1e-9)
    assert modelled["bound"] < min(modelled["level-0"], modelled["level-0.125"])
    assert (df["fit_r2_min"] < MIN_R2).all()
