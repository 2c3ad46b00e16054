"""evaluate.py on the shipped sample traces, the oracles beside agents, and the replay time model."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from rudder.env.timing import FetchTimeModel, out_of_sample
from rudder.traces import Trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "traces", "samples")


def test_shipped_samples_are_complete_small_real_traces():
    names = sorted(os.listdir(SAMPLES))
    assert len(names) >= 2
    total = 0
    for name in names:
        trace = Trace(os.path.join(SAMPLES, name))
        assert trace.complete
        assert trace.meta["config"]["graph"] == "synth-small"
        for r in trace.ranks:
            rt = trace.rank(r)
            assert rt.num_minibatches > 0 and rt.bytes_per_remote_id < 2.0
            assert rt.meta["initial_fill_rows"] == rt.static["initial_ids"].size
        for root, _, files in os.walk(os.path.join(SAMPLES, name)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total < 20 * 2**20
    for name in names:  # each sample carries a time check: a run of its options with another agent
        check = os.path.join(SAMPLES, name, "time-check-none.json")
        assert json.load(open(check))["config"]["agent"] == "none"
    # the training traces: the shipped policy's one-host trace and three on the emulated cluster (3.5-6.2 MB each)
    train = os.path.join(ROOT, "traces", "train")
    assert sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(train) for f in fs) < 20 * 2**20
    for name in sorted(os.listdir(train)):
        assert Trace(os.path.join(train, name)).complete, name


@pytest.mark.llm
def test_evaluate_end_to_end_with_every_agent_and_the_real_llm(tmp_path):
    """The main job on one shipped trace: every default agent (the real SmolLM2 and the shipped PPO policy
    included) beside the oracles; results.csv, plots and the LLM's decision log."""
    trace = os.path.join(SAMPLES, "small-metis2-f10x25")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--traces", trace, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv")
    for col in ("agent", "trace", "rank", "remote_sampled", "hits", "remote_fetched", "prefetched"):
        assert col in df
    assert set(df["agent"]) == {
        "none",
        "static",
        "vip",
        "periodic",
        "hitrate",
        "lookahead",
        "ppo",
        "llm",
        "ppo-link",
        "llm-link",
        "mpc",
        "belady",
        "hindsight",
    }  # the time oracles (best-level, best-constant, tuned-constant, bound): not where the time fit fails
    assert "best-level" in proc.stdout  # named among the oracles all the same
    llm = df[df["agent"] == "llm"]
    assert (llm["decisions"] > 0).all() and (llm["invalid_answers"] == 0).all()
    assert (tmp_path / "llm-small-metis2-f10x25-rank0.jsonl").stat().st_size > 0
    assert (tmp_path / "hit_rate.png").stat().st_size > 10_000 and (tmp_path / "traffic.png").stat().st_size > 10_000
    # the shipped policy and examples learned from traces/train, not from this trace: held out, by content
    learned = df[df["agent"].isin(["ppo", "llm", "ppo-link", "llm-link"])]
    assert (learned["provenance"] == "held-out").all() and learned["held_out"].all()
    assert "held-out (rank 0, 1)" in proc.stdout
    for line in (tmp_path / "llm-small-metis2-f10x25-rank0.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "decision" and not record["forced"]:  # the answer is the best-scored option
            assert record["decision"] == max(record["option_scores"], key=record["option_scores"].get)
    for rank, rows in df.groupby("rank"):
        by = rows.set_index("agent")
        assert by.loc["none", "remote_fetched"] == by.loc["none", "remote_sampled"]
        assert (by["remote_sampled"] == by.loc["none", "remote_sampled"]).all()
        assert (by["hits"] + by["remote_fetched"] - by["prefetched"] == by["remote_sampled"]).all()
        assert (by["remote_fetched"] >= by.loc["belady", "remote_fetched"]).all()  # nobody beats MIN
        assert by.loc["static", "remote_fetched"] < by.loc["none", "remote_fetched"]
        assert by.loc["lookahead", "remote_fetched"] < by.loc["periodic", "remote_fetched"]
    assert "fetched_vs_min" in proc.stdout and "belady" in proc.stdout


def test_evaluate_rejects_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--traces", str(tmp_path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "is not a rudder trace" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--agents", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown agent 'nope': built-in agents are none, static" in proc.stderr
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--oracles", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown oracle 'nope': oracles are belady, hindsight" in proc.stderr


def test_time_model_recovers_known_costs():
    rng = np.random.default_rng(0)
    local = rng.integers(1000, 5000, 200)
    remote = rng.integers(100, 8000, 200)
    fetch = 0.002 + 1e-6 * local + 5e-6 * remote + rng.normal(0, 1e-4, 200)
    m = FetchTimeModel.fit(local, remote, fetch)
    assert m.c_remote == pytest.approx(5e-6, rel=0.05) and m.c_local == pytest.approx(1e-6, rel=0.2)
    assert m.r2 > 0.95 and abs(m.total_error) < 0.01
    # a negative least-squares coefficient is dropped, not reported
    m = FetchTimeModel.fit(local, remote, 0.01 - 1e-7 * local + 5e-6 * remote)
    assert m.c_local == 0.0 and m.c_remote > 0


def test_time_model_out_of_sample_and_when_it_cannot_separate_remote_rows():
    rng = np.random.default_rng(1)
    # run A: remote rows vary (a prefetching agent), fetch = 2 ms + 1 us/local row + 5 us/remote row + noise
    local, remote = rng.integers(3000, 3500, 120), rng.integers(2000, 9000, 120)
    fit = FetchTimeModel.fit(local, remote, 0.002 + 1e-6 * local + 5e-6 * remote + rng.normal(0, 2e-4, 120))
    assert fit.separates_remote_rows
    # run B, another agent: fewer remote rows; its measured fetch time is predicted out of sample
    local_b, remote_b = rng.integers(3000, 3500, 120), rng.integers(500, 1500, 120)
    fetch_b = 0.002 + 1e-6 * local_b + 5e-6 * remote_b + rng.normal(0, 2e-4, 120)
    other_b = np.full(120, 0.03)
    res = out_of_sample(fit, local_b, remote_b, fetch_b, other_s=other_b, modelled_other_s=float(other_b.sum()))
    assert abs(res["fetch_error"]) < 0.02 and abs(res["time_error"]) < 0.01 and res["minibatches"] == 120
    # a run whose remote rows hardly vary and whose noise swamps them: R² ~ 0, remote rows get no usable cost
    flat = rng.integers(5000, 5050, 120)
    blind = FetchTimeModel.fit(local, flat, 0.03 + 1e-6 * flat + rng.normal(0, 5e-3, 120))
    assert not blind.separates_remote_rows and blind.as_dict()["separates_remote_rows"] is False
    off = out_of_sample(blind, local_b, remote_b, fetch_b)
    assert off["fetch_error"] > 1.0 and np.isnan(off["time_error"])  # it badly overestimates run B
    assert not FetchTimeModel(0.01, 0.0, 0.0, 0.9, 0.0, 0.0, 10).separates_remote_rows  # c_remote 0


def test_report_prints_time_only_where_the_fit_separates_remote_rows():
    from rudder.evaluation.report import format_report

    def row(agent, rank, time_s, ok):
        return dict(
            agent=agent,
            trace="t",
            rank=rank,
            remote_sampled=100,
            hits=0,
            remote_fetched=100,
            prefetched=0,
            time_s=time_s,
            latency_p50_s=0.0,
            latency_p95_s=0.0,
            invalid_answers=0,
            provenance="",
            time_r2=0.5 if ok else 0.01,
            time_s_per_remote_row=2e-6 if ok else 0.0,
            time_fit_ok=ok,
            time_check_agent="none",
            time_oos_fetch_error=-0.12,
            time_oos_time_error=0.034,
            time_check_compute_ratio=1.05,
        )

    ranks = [row("none", 0, 10.0, True), row("x", 0, 8.0, True), row("none", 1, 10.0, False), row("x", 1, 2.0, False)]
    text = format_report(pd.DataFrame(ranks))
    x_line = next(line for line in text.splitlines() if line.startswith("x "))
    assert x_line.split()[3] == "0.800"  # rank 0 only: rank 1's fit ignores remote rows
    assert "-12.0%" in text and "+3.4%" in text and "1.05" in text
    text = format_report(pd.DataFrame([row("none", 1, 10.0, False), row("x", 1, 2.0, False)]))
    assert next(line for line in text.splitlines() if line.startswith("x ")).split()[3] == "-"


@pytest.mark.dist
def test_evaluate_live_runs_agents_through_real_training(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--live",
            "--graph",
            "synth-tiny",
            "--parts",
            "2",
            "--agents",
            "none,periodic",
            "--train-args",
            "--batch-size 100 --fanout 3,5 --period 4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RUDDER_CACHE=str(tmp_path / "cache")),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv").set_index(["agent", "rank"])
    assert sorted(df.index.get_level_values("agent").unique()) == ["none", "periodic"]
    assert (df.loc["none", "remote_fetched"] == df.loc["none", "remote_sampled"]).all()
    assert (df.loc["periodic", "hits"] > 0).all()
    assert (df["time_s"] > 0).all()  # measured epoch seconds
    assert "live-synth-tiny" in proc.stdout


@pytest.mark.dist
@pytest.mark.timed_alone
def test_time_model_checked_on_another_real_run(record_live, tmp_path):
    """Two real runs of the same options with different agents (periodic, lookahead; recorded alone): the
    model fitted to one predicts the other's measured time, evaluate.py reports that error per rank, and hides
    modelled time where the fit cannot separate remote rows.

    On a small host (synth-tiny, ~150 remote rows of 100 floats per minibatch) fetch time is mostly per-call cost
    and machine noise (R² ~ 0), so fits rarely separate remote rows; the out-of-sample run-time error stays within
    the bound asserted (|error| < 50%) with the suite in one process and also under pytest-xdist: both live runs are
    recorded with no other worker's test running (conftest's ``cores_to_itself``), since beside other workers the
    error can exceed the bound (BENCHMARKS.md, "Test suite time")."""
    from rudder.env.replay_env import ReplayEnv
    from rudder.traces.timecheck import TimeCheck

    fitted, other = record_live("periodic", alone=True), record_live("lookahead", alone=True)
    check = TimeCheck.from_trace(other["trace"])
    assert check.matches(Trace(fitted["trace"]))  # same options and seed, another agent
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--traces",
            fitted["trace"],
            "--time-check",
            other["trace"],
            "--agents",
            "none,periodic",
            "--oracles",
            "",
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
    trace = Trace(fitted["trace"])
    for rank in trace.ranks:
        model = ReplayEnv(trace, rank=rank).time_model
        cols, table = check.ranks[rank], trace.rank(rank).table()
        expected = out_of_sample(
            model,
            cols["local_rows"],
            cols["remote_fetched"],
            cols["fetch_s"],
            other_s=cols["sample_s"] + cols["compute_s"],
            modelled_other_s=float(table["sample_s"].sum() + table["compute_s"].sum()),
        )
        row = df[(df["rank"] == rank) & (df["agent"] == "periodic")].iloc[0]
        assert row["time_check_agent"] == "lookahead"
        assert row["time_oos_fetch_error"] == pytest.approx(expected["fetch_error"])
        assert row["time_oos_time_error"] == pytest.approx(expected["time_error"])
        assert row["time_oos_fetch_error"] != pytest.approx(model.total_error)  # not the in-sample error
        assert abs(row["time_oos_time_error"]) < 0.5
        assert bool(row["time_fit_ok"]) == model.separates_remote_rows
    shown = [line for line in proc.stdout.splitlines() if line.startswith("periodic ")][0].split()[3]
    assert (shown == "-") == (not df["time_fit_ok"].any())
    assert "check_run" in proc.stdout and "lookahead" in proc.stdout
