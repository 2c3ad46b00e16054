"""Partitionings told apart: the same METIS options and seed do not give the same partitions (DGL's METIS call is
not deterministic with rudder's node weights), so every partitioning records a fingerprint of its node id mapping,
traces carry it, and ``--decisions-from`` refuses a trace from another partitioning in one line before any rank
starts."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TRAIN, record_fault

from rudder.runtime.config import TrainConfig
from rudder.runtime.partition import (
    FINGERPRINT,
    ORIG_NIDS_FILE,
    ensure_partitions,
    fingerprint,
    partition_dir,
    read_meta,
)

TINY = ["--graph", "synth-tiny", "--parts", "2", "--batch-size", "100", "--fanout", "3,5", "--epochs", "1"]


def _partition(cache: str) -> str:
    cfg = TrainConfig(graph="synth-tiny", parts=2, cache_dir=cache)
    ensure_partitions(cfg, log=lambda msg: None)
    return partition_dir(cfg)


def test_two_partitionings_with_the_same_options_are_told_apart_by_their_fingerprint(tmp_path):
    """Partition synth-tiny twice (same options and seed, two cache folders). Either they number every node alike
    and share a fingerprint, or they do not and the fingerprints differ: the fingerprint follows the mapping."""
    a, b = _partition(str(tmp_path / "a")), _partition(str(tmp_path / "b"))
    fa, fb = read_meta(a)[FINGERPRINT], read_meta(b)[FINGERPRINT]
    assert fa.startswith("sha256:") and len(fa) == len("sha256:") + 16
    same_ids = np.array_equal(np.load(os.path.join(a, ORIG_NIDS_FILE)), np.load(os.path.join(b, ORIG_NIDS_FILE)))
    assert (fa == fb) == same_ids
    assert fingerprint(a) == fa  # recomputed from the files alike


def test_partitions_made_before_the_fingerprint_get_one_when_checked(tmp_path):
    from rudder.runtime.partition import check_partitions

    part_dir = _partition(str(tmp_path))
    meta_path = os.path.join(part_dir, "rudder.json")
    meta = json.load(open(meta_path))
    recorded = meta.pop(FINGERPRINT)
    json.dump(meta, open(meta_path, "w"))
    check_partitions(part_dir, 2)
    assert read_meta(part_dir)[FINGERPRINT] == recorded


def _fake_trace(path, fingerprint_value: str | None, graph_name: str) -> str:
    """A trace folder of 2 trainer ranks recorded (so its meta says) on synth-tiny with 2 METIS partitions."""
    from rudder.traces import TraceWriter

    graph = dict(graph_name=graph_name)
    if fingerprint_value is not None:
        graph[FINGERPRINT] = fingerprint_value
    run_meta = dict(config=dict(parts=2, partition="metis"), graph=graph, agent=dict(name="periodic"))
    for rank in range(2):
        with TraceWriter(path, rank, 2, run_meta if rank == 0 else None, dict(trainer_rank=rank), {}) as w:
            w.add_decision(minibatch=0, ids=np.arange(5), latency_s=0.0)
    return str(path)


@pytest.mark.dist  # on today's code the refused run would start a job
def test_decisions_from_another_partitioning_are_refused_in_one_line_before_the_ranks_start(tmp_path):
    from rudder.runtime.partition import graph_name

    cache = str(tmp_path / "cache")
    part_dir = _partition(cache)
    trace = _fake_trace(tmp_path / "trace", "sha256:0000000000000000", graph_name(TrainConfig(graph="synth-tiny")))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, TRAIN, "gnn", *TINY, "--agent", "recorded", "--decisions-from", trace],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    took = time.monotonic() - t0
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"rudder: error: --decisions-from {trace}: recorded on partitions with fingerprint ")
    assert read_meta(part_dir)[FINGERPRINT] in lines[0]
    assert took < 60  # no rank started
    assert not glob.glob(os.path.join(cache, "jobs", "*"))
    shutil.rmtree(trace)
    record_fault(
        "decisions of another partitioning",
        "--decisions-from a trace recorded on partitions of the same options and seed, cut again (fingerprints differ)",
        took,
        lines[0].replace(trace, "TRACE"),
        left="nothing: no rank started",
    )


def test_a_time_check_from_another_partitioning_does_not_match(tmp_path):
    from rudder.traces import Trace
    from rudder.traces.timecheck import TimeCheck

    trace = Trace(_fake_trace(tmp_path / "trace", "sha256:1111111111111111", "synth_tiny_seed0"))
    config = dict(trace.meta["config"], agent="none")
    same = TimeCheck(agent="none", config=config, source="run", partition_fingerprint="sha256:1111111111111111")
    other = TimeCheck(agent="none", config=config, source="run", partition_fingerprint="sha256:2222222222222222")
    unknown = TimeCheck(agent="none", config=config, source="run")  # recorded before the fingerprint: options only
    assert same.matches(trace) and unknown.matches(trace)
    assert not other.matches(trace)
    path = other.save(tmp_path / "time-check-none.json")
    assert TimeCheck.load(path).partition_fingerprint == "sha256:2222222222222222"
