"""evaluate.py on the shipped sample traces, the oracles beside agents, and the replay time model."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rudder_env.timing import FetchTimeModel
from traces import Trace

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


@pytest.mark.llm
def test_evaluate_end_to_end_with_every_agent_and_the_real_llm(tmp_path):
    """The main job on one shipped trace: every default agent (the real SmolLM2 and the shipped PPO policy
    included) beside the oracles; results.csv, plots and the LLM's decision log."""
    trace = os.path.join(SAMPLES, "small-metis2-f10x25")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--traces", trace, "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv")
    for col in ("agent", "trace", "rank", "remote_sampled", "hits", "remote_fetched", "prefetched"):
        assert col in df
    assert set(df["agent"]) == {"none", "static", "periodic", "hitrate", "lookahead", "ppo", "llm", "belady",
                                "hindsight"}
    llm = df[df["agent"] == "llm"]
    assert (llm["decisions"] > 0).all() and (llm["invalid_answers"] == 0).all()
    assert (tmp_path / "llm-small-metis2-f10x25-rank0.jsonl").stat().st_size > 0
    assert (tmp_path / "hit_rate.png").stat().st_size > 10_000 and (tmp_path / "traffic.png").stat().st_size > 10_000
    assert not df.loc[df["agent"] == "ppo", "held_out"].any()  # the shipped policy was trained on this trace
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
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--traces", str(tmp_path),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is not a rudder trace" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--agents", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown agent 'nope': built-in agents are none, static" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--oracles", "nope",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
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


@pytest.mark.dist
def test_evaluate_live_runs_agents_through_real_training(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--live", "--graph", "synth-tiny",
                           "--parts", "2", "--agents", "none,periodic", "--train-args",
                           "--batch-size 100 --fanout 3,5 --period 4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RUDDER_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "results.csv").set_index(["agent", "rank"])
    assert sorted(df.index.get_level_values("agent").unique()) == ["none", "periodic"]
    assert (df.loc["none", "remote_fetched"] == df.loc["none", "remote_sampled"]).all()
    assert (df.loc["periodic", "hits"] > 0).all()
    assert (df["time_s"] > 0).all()  # measured epoch seconds
    assert "live-synth-tiny" in proc.stdout
