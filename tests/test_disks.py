"""Full disks and partial traces: the trace writer names the file and the disk when it runs out of space, never
leaves a rank marked complete over a chunk it could not write whole, and a live run keeps its summary and
accuracies when its trace's disk fills; a trace with some ranks killed before their first chunk replays the
others, with a warning naming the rest. The full disk is a small tmpfs mounted here (root only)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import METIS2, ROOT, TRAIN, end_job, record_fault
from rudder.traces import Trace, TraceIncompleteWarning, TraceWriter

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounts a small tmpfs: needs root"
)


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of ``size`` at ``path`` (created), unmounted and removed afterwards."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "rudder-full", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def _writer(directory, rank=0, num_ranks=1, **kw) -> TraceWriter:
    return TraceWriter(
        directory,
        rank,
        num_ranks,
        {"config": {}} if rank == 0 else None,
        {"num_nodes": 10},
        {"halo_ids": np.arange(4), "halo_degree": np.ones(4), "initial_ids": np.arange(1)},
        **{"chunk_minibatches": 4, **kw},
    )


def _add(w: TraceWriter, i: int, rng, ids: int = 20000) -> None:
    w.add_minibatch(
        minibatch=i,
        epoch=0,
        remote_ids=rng.choice(1 << 40, size=ids, replace=False),
        local_rows=1,
        sample_s=0.1,
        fetch_s=0.1,
        compute_s=0.1,
        fetch_rows=1,
        hits=0,
        remote_fetched=1,
        prefetched=0,
        seeds=np.arange(3) + i,
    )


@needs_root
def test_a_full_trace_disk_is_named_with_its_file_system(tmp_path):
    from rudder.traces import TraceDiskFullError

    rng = np.random.default_rng(0)
    with small_disk(tmp_path / "disk", "256k") as disk:
        w = _writer(os.path.join(disk, "trace"))
        with pytest.raises(TraceDiskFullError) as got:
            for i in range(1000):
                _add(w, i, rng)
        message = str(got.value)
        assert got.value.errno == errno.ENOSPC
        assert message.startswith(f"trace file {disk}/trace/rank0/chunk-")
        assert f"the file system at {disk} (rudder-full, tmpfs) is full" in message
        assert not [n for n in os.listdir(os.path.join(disk, "trace", "rank0")) if n.endswith(".tmp")]
        record_fault(
            "full trace disk",
            "a trace written to a 256 KiB tmpfs until it is full (TraceWriter)",
            0.0,
            message.replace(disk, "DISK"),
            left="nothing: the .tmp removed; the chunks before it readable",
        )


@needs_root
def test_a_live_writer_keeps_going_when_full_and_leaves_a_readable_prefix(tmp_path):
    rng = np.random.default_rng(1)
    with small_disk(tmp_path / "disk", "256k") as disk:
        w = _writer(os.path.join(disk, "trace"), keep_going_when_full=True)
        for i in range(200):
            _add(w, i, rng, ids=2000)
        w.close()
        assert w.failed is not None and "No space left on device" in w.failed
        with pytest.warns(TraceIncompleteWarning, match="ended by a write error"):
            trace = Trace(os.path.join(disk, "trace"))
        kept = trace.rank(0)
        assert not kept.complete and 0 < kept.num_minibatches < 200
        assert kept.num_minibatches % 4 == 0  # whole chunks only
        assert len(kept.minibatch_ids()) == kept.num_minibatches  # every chunk it names reads


def test_a_failed_chunk_write_and_a_retry_never_leave_an_unreadable_complete_rank(tmp_path, monkeypatch):
    """The first chunk write fails (a full disk), the caller frees space and closes: the chunk must hold all its
    columns (seeds too: they used to be dropped by the failed write, the retry wrote a chunk that does not read)."""
    from rudder.traces import writer as writer_module

    rng = np.random.default_rng(2)
    w = _writer(tmp_path, chunk_minibatches=1000)
    for i in range(6):
        _add(w, i, rng, ids=50)
    real = writer_module._write_atomically
    calls = []

    def full_once(path, write):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(writer_module, "_write_atomically", full_once)
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.setattr(writer_module, "_write_atomically", real)
    w.close()
    trace = Trace(tmp_path)
    rank = trace.rank(0)
    assert rank.complete and rank.num_minibatches == 6
    assert [len(x) for x in rank.minibatch_ids()] == [50] * 6
    assert [list(s) for s in rank.minibatch_seeds()] == [list(np.arange(3) + i) for i in range(6)]


def _partial_copy(tmp_path) -> str:
    """The shipped 2-rank trace with rank 0 as a trainer SIGKILLed before its first chunk leaves it."""
    trace = str(tmp_path / "partial")
    shutil.copytree(METIS2, trace)
    rank0 = os.path.join(trace, "rank0")
    header = json.load(open(os.path.join(rank0, "rank.json")))
    header.update(complete=False, minibatches=0, chunks=0, remote_ids=0, bytes=0, decisions=0)
    json.dump(header, open(os.path.join(rank0, "rank.json"), "w"))
    for name in os.listdir(rank0):
        if name.startswith("chunk-"):
            os.remove(os.path.join(rank0, name))
    open(os.path.join(rank0, "chunk-000000.npz.tmp"), "wb").write(b"half a chunk")
    return trace


def test_a_partial_trace_replays_its_usable_ranks_with_a_warning_for_the_rest(tmp_path):
    trace = _partial_copy(tmp_path)
    with pytest.warns(TraceIncompleteWarning, match="rank 0 holds no minibatch and is left out: ranks 1 are used"):
        t = Trace(trace)
    assert t.ranks == [1] and t.empty_ranks == [0]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--traces", trace, "--agents", "none,periodic"]
        + ["--oracles", "", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 holds no minibatch and is left out" in proc.stderr
    assert "nothing to replay" not in proc.stderr
    record_fault(
        "partial trace",
        "a 2-rank trace whose rank 0 was killed before its first chunk (a stale .tmp beside it), evaluated",
        None,
        "TraceIncompleteWarning: ... rank 0 holds no minibatch and is left out: ranks 1 are used",
        left="(rank 1 replayed and scored)",
    )


@needs_root
@pytest.mark.dist
def test_a_job_whose_trace_disk_fills_keeps_its_summary_and_accuracies(tmp_path):
    """The trace's disk fills while the job trains (a file takes the rest of it once both writers have started):
    the chunk written at the end fails; the run still evaluates and writes its summary, and the job fails in one
    line naming the trace file and the disk."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        trace = os.path.join(disk, "trace")
        summary = tmp_path / "run.json"
        proc = subprocess.Popen(
            [sys.executable, TRAIN, "gnn", "--graph", "synth-tiny", "--parts", "2", "--batch-size", "100"]
            + ["--fanout", "3,5", "--epochs", "3", "--agent", "periodic", "--trace", trace, "--summary", str(summary)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, RUDDER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"),
        )
        try:
            deadline = time.monotonic() + 240
            while not all(os.path.exists(os.path.join(trace, f"rank{r}", "rank.json")) for r in (0, 1)):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
                time.sleep(0.05)
            with open(os.path.join(disk, "filler"), "wb") as f:  # the disk fills up
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            out, err = proc.communicate(timeout=300)
        finally:
            end_job(proc)
        assert proc.returncode == 1, err[-3000:]
        failed = [line for line in err.splitlines() if "job failed" in line]
        assert len(failed) == 1, err[-3000:]
        assert f"its trace was cut short: trace file {trace}/rank" in failed[0]
        assert f"the file system at {disk} (rudder-full, tmpfs) is full" in failed[0]
        result = json.loads(summary.read_text())
        assert result["val_acc"] is not None and result["test_acc"] is not None
        assert "val_acc=" in out  # the table and accuracies were shown
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = Trace(trace)
        assert not kept.complete
        record_fault(
            "full trace disk",
            "the trace's tmpfs filled while a 2-trainer job trained (its last chunk cannot be written)",
            None,
            failed[0].replace(disk, "DISK").split(" (log: ")[0],
            left="the trace's whole chunks; summary and accuracies written; no process, /dev/shm, job folder",
        )
