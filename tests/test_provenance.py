"""Provenance by content: trace fingerprints, what learned agents learned from, and evaluation that leaves out the
(agent, trace, rank) pairs an agent was not held out on."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
from rudder.baselines.policies import NoPrefetch, Periodic
from rudder.traces import Trace, TraceWriter
from rudder.traces.fingerprint import (
    HELD_OUT,
    SAME_CONFIG,
    TRAINED_ON,
    UNKNOWN,
    provenance,
    rank_fingerprint,
    trace_fingerprints,
)

from rudder.evaluation.report import format_report, headline
from rudder.evaluation.scoring import evaluate_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "traces", "samples")
TRAIN = os.path.join(ROOT, "traces", "train", "small-metis2-f10x25-s2")
RANDOM2 = os.path.join(SAMPLES, "small-random2-f5x10")
METIS4 = os.path.join(SAMPLES, "small-metis4-f10x25")


def rewrite(source: str, dest: str, chunk_minibatches: int, epochs=None, meta_changes=None) -> str:
    """A copy of ``source`` written again by TraceWriter: other chunking, optionally only some epochs and other
    run options (``meta_changes`` merged into the run config)."""
    trace = Trace(source)
    meta = json.loads(json.dumps(trace.meta))
    meta.setdefault("config", {}).update(meta_changes or {})
    for r in trace.ranks:
        rt = trace.rank(r)
        with TraceWriter(
            dest,
            rank=r,
            num_ranks=trace.num_ranks,
            run_meta=meta if r == 0 else None,
            rank_meta=rt.meta,
            static={k: rt.static[k] for k in ("halo_ids", "halo_degree", "initial_ids")},
            chunk_minibatches=chunk_minibatches,
        ) as w:
            index = 0
            for row, ids in rt.iter_minibatches():
                if epochs is not None and row["epoch"] not in epochs:
                    continue
                w.add_minibatch(
                    minibatch=index,
                    epoch=row["epoch"],
                    remote_ids=ids,
                    local_rows=row["local_rows"],
                    sample_s=row["sample_s"],
                    fetch_s=row["fetch_s"],
                    compute_s=row["compute_s"],
                    fetch_rows=row["fetch_rows"],
                    hits=row["hits"],
                    remote_fetched=row["remote_fetched"],
                    prefetched=row["prefetched"],
                )
                index += 1
    return dest


def test_fingerprint_follows_content_not_folder_name_or_chunking(tmp_path):
    original = trace_fingerprints(RANDOM2)
    copy = rewrite(RANDOM2, str(tmp_path / "renamed"), chunk_minibatches=7)
    again = trace_fingerprints(copy)
    assert [f["ids"] for f in again] == [f["ids"] for f in original]
    assert [f["epochs"] for f in again] == [f["epochs"] for f in original]
    assert again[0]["trace"] == "renamed" and again[0]["config"] == original[0]["config"]
    assert original[0]["ids"] != original[1]["ids"]  # ranks differ
    assert original[0]["minibatches"] == Trace(RANDOM2).rank(0).num_minibatches
    assert original[0]["config"] == {
        "graph": "synth-small",
        "parts": 2,
        "partition": "random",
        "trainers_per_part": 1,
        "fanout": "5,10",
        "batch_size": 1000,
        "seed": 0,
    }


def test_provenance_by_content(tmp_path):
    learned = [rank_fingerprint(TRAIN, 0)]
    # a renamed, re-chunked copy is the same content
    renamed = rewrite(TRAIN, str(tmp_path / "small-metis2-f10x25"), chunk_minibatches=16)
    assert provenance(learned, rank_fingerprint(renamed, 0)) == TRAINED_ON
    # a run that shares only its first epoch (same options and seed, fewer epochs) is recognised by the epoch hash
    first_epoch = rewrite(
        TRAIN, str(tmp_path / "one-epoch"), chunk_minibatches=256, epochs={0}, meta_changes={"epochs": 1}
    )
    fp = rank_fingerprint(first_epoch, 0)
    assert fp["ids"] != learned[0]["ids"] and provenance(learned, fp) == TRAINED_ON
    # another rank of the same run: not the same minibatches, but the same run options and seed
    assert provenance(learned, rank_fingerprint(TRAIN, 1)) == SAME_CONFIG
    # the sample traces evaluate.py scores: another graph (seed) and other minibatches
    for sample in os.listdir(SAMPLES):
        for f in trace_fingerprints(os.path.join(SAMPLES, sample)):
            assert provenance(learned, f) == HELD_OUT
    # a bare name (a policy saved before fingerprints) can show trained-on but never held-out
    assert provenance(["small-random2-f5x10"], rank_fingerprint(RANDOM2, 1)) == TRAINED_ON
    assert provenance(["small-random2-f5x10"], rank_fingerprint(METIS4, 0)) == UNKNOWN
    assert provenance([], rank_fingerprint(METIS4, 0)) == HELD_OUT  # learned from nothing
    assert provenance(None, rank_fingerprint(METIS4, 0)) == ""  # not a learned agent


class _Learned(Periodic):
    """A stand-in learned agent: periodic's decisions, with what it learned from."""

    name = "learned"

    def __init__(self, trained_on):
        self.trained_on = trained_on


def test_evaluation_leaves_out_pairs_not_held_out(tmp_path):
    renamed = rewrite(RANDOM2, str(tmp_path / "totally-new-trace"), chunk_minibatches=5)
    learned = [rank_fingerprint(RANDOM2, 0)]
    agents = {
        "none": lambda t, r: NoPrefetch(),
        "periodic": lambda t, r: Periodic(),
        "learned": lambda t, r: _Learned(learned),
    }
    rows = pd.DataFrame(evaluate_trace(renamed, agents, oracles=("belady",)))
    by = rows.set_index(["agent", "rank"])
    assert by.loc[("learned", 0), "provenance"] == TRAINED_ON and not by.loc[("learned", 0), "held_out"]
    assert by.loc[("learned", 1), "provenance"] == SAME_CONFIG
    assert by.loc[("periodic", 0), "provenance"] == "" and pd.isna(by.loc[("periodic", 0), "held_out"])
    assert list(headline(rows)["agent"]).count("learned") == 0
    report = format_report(rows)
    table = report.split("\n\n")[0].splitlines()
    learned_row = next(line for line in table if line.startswith("learned"))
    assert "0.5" not in learned_row and learned_row.split()[1] == "-"  # no figure over pairs it learned from
    assert "learned: 2 of 2 (trace, rank) pairs left out of this table" in report
    assert "learned    totally-new-trace" in report and "trained-on (rank 0); same-config (rank 1)" in report
    kept = format_report(rows, include_trained_on=True).split("\n\n")[0].splitlines()
    learned_row = next(line for line in kept if line.startswith("learned"))
    periodic_row = next(line for line in kept if line.startswith("periodic"))
    assert learned_row.split()[1] == periodic_row.split()[1] != "-"  # periodic's decisions: the same traffic
    # on a sample it did not learn from, the same agent is held out and in the headline
    held = pd.DataFrame(evaluate_trace(METIS4, {"learned": lambda t, r: _Learned(learned)}, oracles=()))
    assert (held["provenance"] == HELD_OUT).all() and held["held_out"].all() and len(headline(held)) == 4


def test_evaluate_cli_marks_a_renamed_training_trace_trained_on(tmp_path):
    """The shipped PPO policy on a renamed copy of the trace it was trained on: every rank is trained-on, the
    tables leave it out (and say so), --include-trained-on brings it back; results.csv keeps every row."""
    renamed = tmp_path / "fresh-looking-trace"
    shutil.copytree(TRAIN, renamed)

    def run(*extra):
        return subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "evaluate.py"),
                "--traces",
                str(renamed),
                "--agents",
                "none,ppo",
                "--oracles",
                "",
                "--out",
                str(tmp_path / "out"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )

    proc = run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    ppo = df[df["agent"] == "ppo"]
    assert list(ppo["provenance"]) == [TRAINED_ON, TRAINED_ON] and not ppo["held_out"].any()
    assert "ppo: 2 of 2 (trace, rank) pairs left out of this table" in proc.stdout
    ppo_line = next(line for line in proc.stdout.splitlines() if line.startswith("ppo "))
    assert ppo_line.split()[1] == "-" and "trained-on" in ppo_line
    proc = run("--include-trained-on")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppo_line = next(line for line in proc.stdout.splitlines() if line.startswith("ppo "))
    assert float(ppo_line.split()[1]) < 1.0  # its traffic over no prefetch, shown on request
    assert np.isfinite(df["remote_fetched"]).all()
