"""rudder under a real Slurm (slurmctld, munged, one slurmd per emulated host): docs/cluster.md's srun recipe and the
shipped sbatch script on two hosts, and a job stopped by its time limit, by scancel, by a signal to one graph server
and by the batch script's SIGUSR1 (``--signal=B:USR1@...``). A stopped job must keep every minibatch it finished
(the count its ranks print), finalise the trace as incomplete, write the summary marked partial and leave no
shared memory and no process.

One Slurm cluster for the module (partition ``one``: the first host; ``two``: both), one job at a time. Skipped
where Slurm cannot run (not root, no network namespaces, slurm-wlm not installable), with the reason.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from rudder.traces import Trace, TraceIncompleteWarning
from slurm_cluster import SlurmCluster, slurm_missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SBATCH = os.path.join(ROOT, "examples", "perlmutter.sbatch")
SMALL = ["--batch-size", "50", "--fanout", "3,5", "--period", "4"]
LONG = "100000"  # epochs: a job that only a signal ends

REASON = slurm_missing() if hasattr(os, "geteuid") else "not Linux"
pytestmark = [
    pytest.mark.dist,
    pytest.mark.slurm,
    pytest.mark.skipif(REASON is not None, reason=f"no Slurm here: {REASON}"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(2, tmp_path_factory.mktemp("slurm")) as s:
        yield s


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rudder-cache"))


def job_env(cache: str) -> dict:
    return dict(RUDDER_CACHE=cache, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def srun(slurm, args: list[str], cache: str, out, partition: str, nodes: int, tasks_per_node: int, *opts):
    """``srun --mpi=pmi2 --kill-on-bad-exit=1 python train.py gnn ...`` (docs/cluster.md's recipe) into ``out``."""
    return slurm.popen(
        [
            "srun",
            "-p",
            partition,
            "-N",
            str(nodes),
            f"--ntasks-per-node={tasks_per_node}",
            "--mpi=pmi2",
            "--kill-on-bad-exit=1",
            *opts,
            sys.executable,
            TRAIN,
            "gnn",
            *args,
        ],
        env=job_env(cache),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def wait_for(path, pattern: str, timeout_s: float, proc=None) -> re.Match:
    """The first match of ``pattern`` in the file ``path`` (a job's output), waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = open(path).read() if os.path.exists(path) else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in the job's output after {timeout_s} s:\n{text[-3000:]}")


def job_id_of(slurm, name_part: str) -> str:
    out = slurm.command(["squeue", "-h", "-o", "%i %j"]).stdout.split("\n")
    ids = [line.split()[0] for line in out if line.strip() and name_part in line]
    assert len(ids) == 1, out
    return ids[0]


def check_stopped(slurm, output: str, trace, summary, signame: str | None = None, shm_before=None) -> int:
    """What a stopped job must leave, checked; returns the minibatches each trainer finished."""
    text = open(output).read()
    counts = {
        int(t): (int(n), int(m))
        for t, _, n, m in re.findall(r"rudder: trainer (\d+) stopped by (\w+) after (\d+) of (\d+) minibatches", text)
    }
    assert sorted(counts) == [0, 1], text[-3000:]
    ((done, total),) = set(counts.values())  # every trainer stopped after the same minibatch
    assert 0 < done < total, text[-3000:]
    s = json.load(open(summary))
    assert s["partial"] is True and s["stopped"]["after_minibatches"] == done and s["val_acc"] is None
    assert [r["minibatches"] for r in s["ranks"]] == [done, done]
    if signame:
        assert s["stopped"]["signal"] == signame, s["stopped"]
    assert re.search(rf"rudder: stopped by \w+ after {done} of {total} minibatches per trainer", text), text[-2000:]
    with pytest.warns(TraceIncompleteWarning, match="stopped early"):
        t = Trace(str(trace))
    assert not t.complete
    for rank in range(2):
        r = t.rank(rank)
        assert r.num_minibatches == done and not r.complete and r.stopped["after_minibatches"] == done
    assert "User pressed Ctrl+C" not in text and "Abort" not in text and "Terminated" not in text, text[-3000:]
    assert_nothing_left(slurm, shm_before)
    return done


def assert_nothing_left(slurm, shm_before: dict | None, timeout_s: float = 15) -> None:
    """No process of a job in the hosts (slurmstepd may take a moment after srun returns), no /dev/shm entry the
    job made (``shm_before``: what the hosts held before it; an earlier test's failure is not this one's)."""
    deadline = time.monotonic() + timeout_s
    while slurm.job_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.job_processes() == []
    before = shm_before or {}
    new = {h: sorted(set(files) - set(before.get(h, []))) for h, files in slurm.shm().items()}
    assert all(files == [] for files in new.values()), new
    from rudder.runtime.ports import _lock_owner_alive

    locks = [
        p for p in glob.glob(os.path.join(tempfile.gettempdir(), "rudder-ports-*.lock")) if not _lock_owner_alive(p)
    ]
    assert locks == [], locks  # a rank leaving with os._exit still removes its port lock


def test_srun_recipe_on_two_hosts_stopped_by_the_time_limit(slurm, cache, tmp_path):
    """docs/cluster.md's recipe on 2 nodes (several-host mode) with ``--time=1``, stopped by Slurm's own time-limit
    enforcement: once training is under way the job's end time is moved to now (``scontrol update EndTime=now``:
    the limit has minutes' granularity), and slurmctld's periodic check (every 30 s at most) ends the step with
    SIGTERM "DUE TO TIME LIMIT", then SIGKILL after KillWait (30 s)."""
    out, trace, summary = tmp_path / "out.txt", tmp_path / "trace", tmp_path / "run.json"
    shm_before = slurm.shm()
    with open(out, "w") as f:
        proc = srun(
            slurm,
            [
                "--graph",
                "synth-tiny",
                "--parts",
                "2",
                "--epochs",
                LONG,
                *SMALL,
                "--trace",
                str(trace),
                "--summary",
                str(summary),
            ],
            cache,
            f,
            "two",
            2,
            2,
            "--time=1",
            "-J",
            "recipe",
        )
    try:
        wait_for(out, r"rudder: epoch 1/", 120, proc)
        job = job_id_of(slurm, "recipe")
        assert slurm.command(["scontrol", "update", f"JobId={job}", "EndTime=now"]).returncode == 0
        t0 = time.monotonic()
        wait_for(out, r"DUE TO TIME LIMIT", 60, proc)
        t_signal = time.monotonic()
        proc.wait(timeout=60)
        ended_s = time.monotonic() - t_signal
    finally:
        proc.kill()
    text = out.read_text()
    assert "DUE TO TIME LIMIT" in text, text[-3000:]
    done = check_stopped(slurm, out, trace, summary, "SIGTERM", shm_before)
    assert json.loads(summary.read_text())["one_host"] is False
    assert ended_s < 30, ended_s  # within KillWait
    print(
        f"time limit: {done} minibatches per trainer kept; signal {t_signal - t0:.1f} s after the limit moved, "
        f"srun gone {ended_s:.1f} s after it"
    )
    # the several-host trace replays like any other
    ev = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "evaluate.py"),
            "--traces",
            str(trace),
            "--agents",
            "none,periodic",
            "--oracles",
            "belady",
            "--no-progress",
            "--out",
            str(tmp_path / "res"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "periodic" in ev.stdout and "belady" in ev.stdout.lower()


def long_job_on_one_host(slurm, cache, tmp_path, name: str):
    """A job only a signal ends, 4 tasks on the first host, started and training (its first epoch line printed):
    ``(proc, output, trace, summary, shm_before)``."""
    out, trace, summary = tmp_path / "out.txt", tmp_path / "trace", tmp_path / "run.json"
    shm_before = slurm.shm()
    with open(out, "w") as f:
        proc = srun(
            slurm,
            [
                "--graph",
                "synth-tiny",
                "--parts",
                "2",
                "--epochs",
                LONG,
                *SMALL,
                "--trace",
                str(trace),
                "--summary",
                str(summary),
            ],
            cache,
            f,
            "one",
            1,
            4,
            "-J",
            name,
        )
    try:
        wait_for(out, r"rudder: epoch 1/", 120, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, out, trace, summary, shm_before


def test_scancel_stops_a_job_in_order(slurm, cache, tmp_path):
    proc, out, trace, summary, shm_before = long_job_on_one_host(slurm, cache, tmp_path, "cancelme")
    try:
        job = job_id_of(slurm, "cancelme")
        t0 = time.monotonic()
        assert slurm.command(["scancel", job]).returncode == 0
        proc.wait(timeout=60)
        ended_s = time.monotonic() - t0
    finally:
        proc.kill()
    check_stopped(slurm, out, trace, summary, "SIGTERM", shm_before)
    assert ended_s < 30, ended_s  # within Slurm's KillWait
    print(f"scancel: job gone {ended_s:.1f} s after it")


def test_a_signal_to_one_graph_server_stops_the_whole_job(slurm, cache, tmp_path):
    proc, out, trace, summary, shm_before = long_job_on_one_host(slurm, cache, tmp_path, "server")
    try:
        servers = [st for st in _statuses(cache) if st["role"]["kind"] == "server" and st["state"] == "started"]
        assert servers, "no graph server found"
        os.kill(servers[-1]["pid"], signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out.read_text()[-3000:]
    check_stopped(slurm, out, trace, summary, "SIGUSR1", shm_before)


def _statuses(cache: str) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(cache, "jobs", "*", "status", "rank*.json")):
        try:
            out.append(json.load(open(path)))
        except (OSError, ValueError):
            pass
    return out


def test_sbatch_example_runs_to_the_end_on_two_hosts(slurm, cache, tmp_path):
    """examples/perlmutter.sbatch as shipped, scaled down through its environment variables and the command line
    (2 nodes, 5 minutes, 1 CPU per task; the nodes here have Perlmutter's "cpu" feature)."""
    out = tmp_path / "slurm.out"
    shm_before = slurm.shm()
    env = dict(
        job_env(cache),
        RUDDER_GRAPH="synth-tiny",
        RUDDER_EPOCHS="2",
        RUDDER_OUT=str(tmp_path / "run"),
        RUDDER_PYTHON=sys.executable,
        RUDDER_ARGS=" ".join(SMALL),
    )
    sub = slurm.command(
        ["sbatch", "--parsable", "-p", "two", "-N", "2", "-t", "5", "--cpus-per-task=1", "-o", str(out), SBATCH],
        cwd=ROOT,
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    state = slurm.wait_job(job, 240)
    text = out.read_text()
    assert state == "COMPLETED", text[-3000:]
    s = json.loads((tmp_path / "run" / "run.json").read_text())
    assert s["partial"] is False and s["one_host"] is False and s["val_acc"] > 0.2
    t = Trace(str(tmp_path / "run" / "trace"))
    assert t.complete and [t.rank(r).num_minibatches for r in range(2)] == [r["minibatches"] for r in s["ranks"]]
    assert_nothing_left(slurm, shm_before)


def test_sbatch_usr1_before_the_limit_stops_and_saves(slurm, cache, tmp_path):
    """What ``#SBATCH --signal=B:USR1@120`` does at 120 s before the limit, sent now: SIGUSR1 to the batch shell
    only (``scancel --batch``); its trap hands it to srun, srun to every rank."""
    out = tmp_path / "slurm.out"
    shm_before = slurm.shm()
    env = dict(
        job_env(cache),
        RUDDER_GRAPH="synth-tiny",
        RUDDER_EPOCHS=LONG,
        RUDDER_OUT=str(tmp_path / "run"),
        RUDDER_PYTHON=sys.executable,
        RUDDER_ARGS=" ".join(SMALL),
        RUDDER_PARTS="2",
    )
    sub = slurm.command(
        [
            "sbatch",
            "--parsable",
            "-p",
            "one",
            "-N",
            "1",
            "--ntasks-per-node=4",
            "-t",
            "5",
            "--cpus-per-task=1",
            "-o",
            str(out),
            SBATCH,
        ],
        cwd=ROOT,
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    wait_for(out, r"rudder: epoch 1/", 120)
    assert slurm.command(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    state = slurm.wait_job(job, 90)
    assert state == "COMPLETED", out.read_text()[-3000:]
    assert "SIGUSR1 (time limit near)" in out.read_text()
    check_stopped(slurm, out, tmp_path / "run" / "trace", tmp_path / "run" / "run.json", "SIGUSR1", shm_before)
