"""Mistakes found before any rank starts, each in one line: more partitions than the graph can feed, a ``--trace``
folder that holds a trace already (``--overwrite`` replaces it); and a partitioning's temporary folder never left
behind (removed on any exit, and a killed partitioning's at the next start)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TRAIN, record_fault

from rudder.runtime.config import TrainConfig

TINY = ["--graph", "synth-tiny", "--batch-size", "100", "--fanout", "3,5", "--epochs", "1"]


def _train(args: list[str], cache: str) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, TRAIN, "gnn", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
    )
    proc.took = time.monotonic() - t0
    return proc


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_more_partitions_than_the_graph_can_feed_is_one_line(tmp_path):
    proc = _train([*TINY, "--parts", "1000"], str(tmp_path / "cache"))
    assert proc.returncode != 0
    errors = [line for line in _lines(proc.stderr) if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("rudder: error: --parts 1000: synth-tiny has 4000 nodes, 2400 of them training nodes")
    assert errors[0].split(" (log: ")[0].endswith("use fewer partitions")
    record_fault(
        "more partitions than the graph feeds",
        "train.py gnn --graph synth-tiny --parts 1000",
        proc.took,
        errors[0].split(" (log: ")[0][:160] + " ...",
        left="nothing: no rank started, no partition folder",
    )
    assert not os.path.isdir(tmp_path / "cache" / "jobs") or not os.listdir(tmp_path / "cache" / "jobs")


def test_more_ranks_than_the_cores_can_run_is_one_line(tmp_path):
    """Servers, trainers and sampler workers past 8 per core of this machine: refused before any rank starts (the
    partitioning is checked first); one partition fewer starts."""
    from rudder.runtime.launcher import MAX_PROCESSES_PER_CORE

    cores = len(os.sched_getaffinity(0))
    parts = MAX_PROCESSES_PER_CORE * cores // 3 + 1  # 3 processes per partition: over the limit
    proc = _train([*TINY, "--parts", str(parts), "--partition", "random", "--num-samplers", "1"], str(tmp_path))
    assert proc.returncode == 2
    errors = [line for line in _lines(proc.stderr) if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"rudder: error: --parts {parts} with --trainers-per-part 1 and --num-samplers 1 ")
    assert f"starts {3 * parts} processes on the {cores} cores" in errors[0]
    assert not os.path.isdir(tmp_path / "jobs") or not os.listdir(tmp_path / "jobs")
    record_fault(
        "more ranks than the cores run",
        f"train.py gnn --graph synth-tiny --parts {parts} --num-samplers 1 (on {cores} cores)",
        proc.took,
        errors[0].split(" (log: ")[0][:160] + " ...",
        left="nothing: no rank started",
    )


def test_an_existing_trace_folder_is_refused_before_launch_unless_overwrite(tmp_path):
    from rudder.runtime.rank import check_trace_folder

    trace = tmp_path / "trace"
    (trace / "rank1").mkdir(parents=True)
    (trace / "rank1" / "rank.json").write_text("{}")
    proc = _train([*TINY, "--parts", "2", "--trace", str(trace)], str(tmp_path / "cache"))
    assert proc.returncode != 0
    lines = _lines(proc.stderr)
    assert lines == [
        f"rudder: error: --trace {trace} holds a trace already ({trace}/rank1/rank.json): pass --overwrite to "
        "replace it, or another --trace"
    ], proc.stderr[-3000:]
    assert proc.took < 12  # imports only: no partitioning, no rank (it used to fail 13.5 s in, ranks started)
    record_fault(
        "existing --trace folder",
        "train.py gnn --trace DIR where DIR holds a trace",
        proc.took,
        lines[0].replace(str(trace), "DIR"),
        left="nothing: no rank started; the trace untouched",
    )
    check_trace_folder(TrainConfig(graph="synth-tiny", parts=2, trace=str(trace), overwrite=True))  # no error
    check_trace_folder(TrainConfig(graph="synth-tiny", parts=2, trace=str(tmp_path / "new")))


def test_a_partitionings_temporary_folder_goes_on_failure_and_a_killed_ones_at_the_next_start(tmp_path, monkeypatch):
    from rudder.runtime import partition
    from rudder.runtime.dgl_compat import import_dgl

    cache = str(tmp_path / "cache")
    cfg = TrainConfig(graph="synth-tiny", parts=2, cache_dir=cache)
    parts = os.path.join(cache, "partitions")
    os.makedirs(parts)
    killed = os.path.join(parts, "synth-tiny-seed0-metis2.tmp99999999")  # no such pid: its process is gone
    os.makedirs(os.path.join(killed, "part0"))
    open(os.path.join(killed, "part0", "node_feat.dgl"), "wb").write(b"\0" * 4096)
    dgl = import_dgl()
    real = dgl.distributed.partition_graph

    def fails_half_way(g, name, parts_, out, **kw):
        real(g, name, parts_, out, **kw)
        raise MemoryError("killed half way")

    monkeypatch.setattr(dgl.distributed, "partition_graph", fails_half_way)
    with pytest.raises(MemoryError):
        partition.ensure_partitions(cfg, log=lambda msg: None)
    assert os.listdir(parts) == []  # the killed one's removed at this start, this one's on its failure
    monkeypatch.setattr(dgl.distributed, "partition_graph", real)
    partition.ensure_partitions(cfg, log=lambda msg: None)
    assert os.listdir(parts) == [os.path.basename(partition.partition_dir(cfg))]
    record_fault(
        "killed partitioning",
        "a partitioning failing half way; a killed one's temporary folder left from before",
        None,
        "(both temporary folders removed: on the failure, and at the next start)",
        left="nothing",
    )
