"""``evaluate.py --scenario`` and ``rudder headroom --scenario`` (issue 26, item 1): every replay of an evaluation
runs under one scenario of exogenous conditions, every row says so (``scenario``, ``synthetic``), the report says
so once at the top, and a bad scenario file is refused in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rudder.baselines.constant import LINK_SPACE, SPACES
from rudder.env.scenario import Scenario
from rudder.traces import Trace
from test_scenario import _recorded_under

from rudder.evaluate import main
from rudder.evaluation.registry import make_agent
from rudder.evaluation.report import format_report
from rudder.evaluation.scoring import constant_rows, evaluate_trace, load_scenario, space_env
from rudder.headroom import format_table, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "traces", "samples", "small-random2-f5x10")  # timed, 2 ranks of 30 minibatches
SQUARE = os.path.join(ROOT, "bench", "scenarios", "square-8x-2s.json")
STATIONARY = os.path.join(ROOT, "bench", "scenarios", "stationary.json")


def _none(trace, rank):
    return make_agent("none")


def test_evaluate_under_a_scenario_marks_every_row_and_slows_no_prefetch(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--traces",
            SMALL,
            "--agents",
            "none,lookahead",
            "--oracles",
            "belady,best-constant",
            "--scenario",
            SQUARE,
            "--llm-gates",
            "0",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv")
    oracles = {"belady", "best-constant:link-levels", "best-constant:keep-replace"}
    assert set(df["agent"]) == {"none", "lookahead", *oracles}
    assert (df["scenario"] == "square-8x-2s").all() and df["synthetic"].all()
    assert proc.stdout.count("replayed under scenario square-8x-2s (synthetic)") == 1
    assert proc.stdout.startswith("replayed under scenario square-8x-2s (synthetic)")
    assert "recorded conditions only" in proc.stdout
    # the same replay without the scenario: the recorded link, rows not synthetic
    plain = pd.DataFrame(evaluate_trace(SMALL, {"none": _none}, oracles=()))
    assert (plain["scenario"] == "").all() and not plain["synthetic"].any()
    under = df[df["agent"] == "none"].set_index("rank")["time_s"]
    recorded = plain.set_index("rank")["time_s"]
    # half of every 2 s at an eighth of the link: no prefetch waits longer on every rank
    assert (under > recorded * 1.1).all(), (under, recorded)
    # an agent that prefetches gains more from a slow link than under the recorded one
    look = df[df["agent"] == "lookahead"].set_index("rank")["time_s"]
    assert (look < under).all()


def test_every_replay_of_a_rank_follows_the_scenario_exactly(tmp_path):
    """Under a link at a quarter of its recorded rate throughout, no prefetch's demand pulls of ``R`` remote rows
    take ``3 * c_remote * R`` more than under the stationary scenario (same clock, nothing else changes), and the
    best constant's row is the constant replayed under the scenario."""
    quarter = tmp_path / "quarter.json"
    quarter.write_text(
        json.dumps(
            dict(
                version=1,
                name="quarter",
                processes=[dict(kind="link", hosts="all", timeline=dict(type="constant", value=0.25))],
            )
        )
    )
    slow, same = load_scenario(str(quarter)), load_scenario(STATIONARY)
    rows = {
        s.name: pd.DataFrame(evaluate_trace(SMALL, {"none": _none}, oracles=("best-constant",), scenario=s))
        for s in (slow, same)
    }
    trace = Trace(SMALL)
    for rank in trace.ranks:
        c_remote = space_env(trace, rank, LINK_SPACE).time_model.c_remote
        a = rows["quarter"].query(f"agent == 'none' and rank == {rank}").iloc[0]
        b = rows["stationary"].query(f"agent == 'none' and rank == {rank}").iloc[0]
        assert a["remote_fetched"] == b["remote_fetched"] == b["remote_sampled"]
        assert a["time_s"] - b["time_s"] == pytest.approx(3 * c_remote * b["remote_fetched"], rel=1e-9)
        # the oracle's constants were replayed under the scenario too: its best level is at least as slow
        const = rows["quarter"].query(f"agent == 'best-constant:link-levels' and rank == {rank}").iloc[0]
        base = rows["stationary"].query(f"agent == 'best-constant:link-levels' and rank == {rank}").iloc[0]
        assert const["time_s"] > base["time_s"] and const["scenario"] == "quarter" and const["synthetic"]
        env = space_env(trace, rank, LINK_SPACE, scenario=slow)
        assert env.scenario is slow and np.isfinite(const["time_error_band"])  # the recorded band, kept


@pytest.mark.parametrize(
    "content, field",
    [
        ({"name": "x", "processes": []}, "version: expected 1, got None"),
        (
            {
                "version": 1,
                "name": "x",
                "processes": [{"kind": "link", "timeline": {"type": "sine", "period_s": 2}}],
            },
            "processes[0].timeline.type: expected one of piecewise, square, markov, drift, constant, got 'sine'",
        ),
        (None, "no such scenario file"),
    ],
    ids=["no-version", "bad-timeline-type", "missing-file"],
)
@pytest.mark.parametrize("command", ["evaluate", "headroom"])
def test_a_bad_scenario_file_is_refused_in_one_line(tmp_path, content, field, command):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(json.dumps(content))
    proc = subprocess.run(
        [sys.executable, "-m", "rudder.cli", command, *([SMALL] if command == "headroom" else ["--traces", SMALL])]
        + ["--scenario", str(path), *(["--out", str(tmp_path)] if command == "evaluate" else [])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == f"rudder {command}: error: {path}: {field}"
    assert not (tmp_path / "results.csv").exists()


def test_evaluate_refuses_a_scenario_live(tmp_path):
    assert main(["--live", "--agents", "none", "--scenario", SQUARE, "--out", str(tmp_path)]) == 2


def test_headroom_under_a_scenario_names_it():
    df = measure([SMALL], width=1, scenario=Scenario.load(SQUARE))
    assert (df["scenario"] == "square-8x-2s").all() and df["bound_s"].notna().all()
    trace = Trace(SMALL)
    for _, r in df.iterrows():  # each best constant is slower than the same rank's under the recorded link
        space = SPACES[r["space"]]
        recorded = min(x["time_s"] for x in constant_rows(space_env(trace, r["rank"], space), space))
        assert r["best_constant_s"] > recorded * 1.05, (r["space"], r["best_constant_s"], recorded)
    assert format_table(df).startswith("replayed under scenario square-8x-2s (synthetic)")
    assert "replayed under scenario" not in format_table(df.assign(scenario=""))


def test_a_trace_recorded_under_played_conditions_names_them_but_is_not_synthetic(tmp_path):
    """Without --scenario, a trace whose live run met played conditions (its conditions.json) is replayed under what
    its rank met: the rows name those conditions and are not synthetic, and the report says nothing of a scenario;
    with one, the given scenario replaces them and the rows are synthetic."""
    changes = [[2.0 * k, 0, 1.0 if k % 2 == 0 else 0.125] for k in range(10)]
    trace, _ = _recorded_under(tmp_path / "live", [100, 200] * 8, lambda t: 1.0, 0.5, changes=changes)
    met = pd.DataFrame(evaluate_trace(str(trace), {"none": _none}, oracles=("belady",)))
    assert (met["scenario"] == "sq-live-as-played").all() and not met["synthetic"].any()
    assert "replayed under scenario" not in format_report(met)
    given = pd.DataFrame(
        evaluate_trace(str(trace), {"none": _none}, oracles=("belady",), scenario=load_scenario(SQUARE))
    )
    assert (given["scenario"] == "square-8x-2s").all() and given["synthetic"].all()
    assert format_report(given).startswith("replayed under scenario square-8x-2s (synthetic)")
