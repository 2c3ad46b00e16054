"""Fixtures and helpers shared by the test modules: ports for real DistDGL jobs, live runs recorded as traces, and
the shipped sample traces (replay needs no MPI job)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SAMPLES = os.path.join(ROOT, "traces", "samples")
METIS2 = os.path.join(SAMPLES, "small-metis2-f10x25")
METIS4 = os.path.join(SAMPLES, "small-metis4-f10x25")
RANDOM2 = os.path.join(SAMPLES, "small-random2-f5x10")


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (as servers do, with SO_REUSEADDR: a port whose last
    connection is in TIME_WAIT counts as free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port_block(width: int = 30) -> int:
    """A base port with ``width`` free ports above it and one below (torch.distributed's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + width < 65535 and all(port_is_free(p) for p in range(base - 1, base + width)):
            return base
    raise RuntimeError("no free port block")


def _record_live(tmp_path_factory, agent: str, *extra: str) -> dict:
    """A real 2-partition synth-tiny run (2 epochs, period 4, K=64) with ``agent``, recorded as a trace; returns the
    trace folder, the run summary and what the run printed."""
    out = tmp_path_factory.mktemp(f"live-{agent}")
    cache = str(tmp_path_factory.getbasetemp() / "cache")
    trace = out / "trace"
    summary = out / "run.json"
    cmd = [
        sys.executable,
        TRAIN,
        "gnn",
        "--graph",
        "synth-tiny",
        "--parts",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "100",
        "--fanout",
        "3,5",
        "--period",
        "4",
        "--candidates",
        "64",
        "--agent",
        agent,
        *extra,
        "--trace",
        str(trace),
        "--summary",
        str(summary),
        "--port",
        str(_free_port_block()),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(trace=str(trace), summary=json.loads(summary.read_text()), stdout=proc.stdout)


def other_workers() -> bool:
    """Whether other pytest-xdist workers run tests beside this one (they share the cores)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1


def _cores_lock_paths() -> tuple[str, str] | None:
    """The lock files shared by the workers of this test run (pytest-xdist names the run): the cores lock and its
    turnstile; None without xdist."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not (run and other_workers()):
        return None
    return tuple(os.path.join("/tmp", f"rudder-pytest-{what}-{run}.lock") for what in ("cores", "turnstile"))


@contextlib.contextmanager
def _cores_lock(exclusive: bool):
    """The cores lock, shared or exclusive, with the exclusive side first in line: Linux ``flock`` keeps granting a
    shared lock while an exclusive one waits, so each taker passes a turnstile first, and the exclusive taker holds it
    until it has the lock (no new test starts beside it meanwhile)."""
    paths = _cores_lock_paths()
    if paths is None:
        yield
        return
    with open(paths[0], "a") as cores, open(paths[1], "a") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(cores, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(cores, fcntl.LOCK_UN)


def cores_to_itself():
    """Run a live job whose measured times are checked against the time model with no other worker's test running:
    the tests beside the job group hold this lock shared while they run (:func:`_share_the_cores`), so taking it
    exclusively waits for the running one to end and starts no new one until the job is done."""
    return _cores_lock(exclusive=True)


@pytest.fixture(autouse=True)
def _share_the_cores(request):
    """Tests outside the job group run under the shared side of :func:`cores_to_itself`."""
    group = request.node.get_closest_marker("xdist_group")
    if group is not None and group.args and group.args[0] == JOBS:
        yield
        return
    with _cores_lock(exclusive=False):
        yield


if other_workers():
    # one compute thread per worker and per process it starts (evaluate.py, the LLM): workers share the cores, and
    # torch's default of one thread per core on each would oversubscribe them (jobs' ranks already run with 1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# pytest-xdist (`-n auto --dist loadgroup`, pyproject's addopts). Every test that runs a DistDGL job, emulated hosts
# or Slurm is in one group, "jobs", run on one worker one at a time as without xdist: jobs' timing bounds, their
# clean-up checks and the tests that kill whole namespaces never meet another job. The other tests (replay, oracles,
# the LLM, PPO, traces) run beside them on the other workers, each module whole on one worker.
JOBS = "jobs"
JOB_MARKERS = ("dist", "slurm")
# modules whose tests run jobs (test_envs asks for its live runs by name, test_stop starts mpiexec) or kill namespaces
JOB_MODULES = ("test_cluster", "test_cluster_job", "test_slurm", "test_envs", "test_stop")
JOB_FIXTURES = ("record_live", "free_port_block", "wait_for_rank")  # what job tests ask for


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Put every test in an ``xdist_group``: :data:`JOBS` for job tests (:data:`JOB_MARKERS`,
    :data:`JOB_MODULES`, :data:`JOB_FIXTURES`), else its module; the jobs group first (the longest: workers take
    groups in this order), each group's tests in collection order."""
    groups: dict[str, list] = {}
    for item in items:
        module = getattr(item, "module", None)
        module = module.__name__.rsplit(".", 1)[-1] if module is not None else item.nodeid
        job = (
            module in JOB_MODULES
            or any(item.get_closest_marker(m) for m in JOB_MARKERS)
            or bool(set(getattr(item, "fixturenames", ())) & set(JOB_FIXTURES))
        )
        group = JOBS if job else module
        item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    # tests that time live runs alone go last among the jobs, when the other workers have most likely finished
    groups[JOBS] = sorted(groups.get(JOBS, []), key=lambda it: it.get_closest_marker("timed_alone") is not None)
    items[:] = [it for g in sorted(groups, key=lambda g: g != JOBS) for it in groups[g]]


@pytest.fixture(scope="session")
def shipped_trace() -> str:
    """The first shipped sample trace (METIS, 2 partitions, recorded with seeds and partition structure)."""
    return METIS2


@pytest.fixture(scope="session")
def free_port_block():
    """``free_port_block(width=30)``: a base port with ``width`` free ports above it and one below."""
    return _free_port_block


@pytest.fixture(scope="session")
def free_port():
    """``free_port(port)``: whether ``port`` can be bound on 127.0.0.1."""
    return port_is_free


@pytest.fixture(scope="session")
def record_live(tmp_path_factory):
    """``record_live(agent, *train_args)``: a real 2-partition synth-tiny run with ``agent``, recorded as a trace
    (2 epochs, period 4, K=64); returns ``{"trace": folder, "summary": run summary, "stdout": what it printed}``.
    A run asked for twice with the same arguments in one session is recorded once (modules share it)."""
    runs: dict[tuple, dict] = {}

    def record(agent, *extra, alone: bool = False):
        """``alone``: a run of its own, recorded with no other worker's test running (:func:`cores_to_itself`), for
        checks on measured time."""
        key = (agent, *extra, alone)
        if key not in runs:
            with cores_to_itself() if alone else contextlib.nullcontext():
                runs[key] = _record_live(tmp_path_factory, agent, *extra)
        return runs[key]

    return record


@pytest.fixture(scope="session")
def id_graph(tmp_path_factory):
    """synth-tiny with feature column 0 holding each node's id, to check every served row."""
    import torch

    from rudder.runtime.datasets import PRESETS, generate_synthetic
    from rudder.runtime.dgl_compat import import_dgl

    dgl = import_dgl()
    g = generate_synthetic(PRESETS["synth-tiny"], seed=0)
    g.ndata["feat"][:, 0] = torch.arange(g.num_nodes(), dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("graphs") / "idgraph.dgl")
    dgl.save_graphs(path, [g])
    return path


def _wait_for_rank(cache: str, kind: str, machine: int | None = None, deadline_s: float = 90) -> dict:
    """The status of the first rank of ``kind`` ("server" or "trainer"; of ``machine`` if given) that a job
    under ``cache`` has started (the launcher's status files)."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        for path in glob.glob(os.path.join(cache, "jobs", "*", "status", "rank*.json")):
            try:
                st = json.load(open(path))
            except (OSError, ValueError):
                continue
            role = st["role"]
            if role["kind"] == kind and st["state"] == "started" and machine in (None, role["machine"]):
                return st
        time.sleep(0.2)
    raise AssertionError(f"no {kind} started within {deadline_s} s")


@pytest.fixture(scope="session")
def wait_for_rank():
    """``wait_for_rank(cache, kind, machine=None, deadline_s=90)``: the status of a rank a job has started."""
    return _wait_for_rank


def _play_windows(env, agent, seed: int = 0):
    """One episode of ``agent`` stepping ``env``: every window's stats, the ids applied, and the buffer's
    counters at the end."""
    obs, info = env.reset(seed=seed)
    agent.reset()
    windows, applied, done = [], [], False
    while not done:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        windows.append(info["window"])
        applied.append(info["applied_ids"])
        done = terminated or truncated
    return windows, applied, env.unwrapped.episode.buffer.counters


@pytest.fixture(scope="session")
def play_windows():
    """``play_windows(env, agent, seed=0)`` -> (window stats, applied ids per step, final buffer counters)."""
    return _play_windows


FAULT_REPORT_VAR = "RUDDER_FAULT_REPORT"


def end_job(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """A test's clean-up of a job it started that is still running (the test failed): SIGTERM first, so that the
    supervisor (or the ranks, under a plain ``mpiexec``) stop the job in order and remove its shared memory, ports
    and job folder; SIGKILL only if it has not ended within ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def record_fault(
    fault: str,
    injected: str,
    detect_s: float | None,
    seen: str,
    left: str = "nothing",
    tried: int = 1,
    detected: int | None = None,
    lost_bytes: int = 0,
    input_checked: int = 0,
    clean: int = 0,
) -> dict:
    """One row of the Reliability table (``python -m rudder.bench --only faults``), written by a fault test once its
    assertions have passed: the fault, how it was injected, seconds from injection to the job's end or the error
    (``None`` where the fault is not an error: the job goes on), what was left behind as checked by the test, the
    line the user sees, how many faults were tried and detected, how many of the others the test checked to leave
    the data exactly as it was (``clean``: damage on bytes the reader does not use), the bytes of data lost or
    silently changed (by the fault test's own check), and the bytes of the job's partition files found intact
    afterwards (their sizes and CRC-32s checked: :func:`partition_bytes_checked`). Printed always (``-s`` shows
    it); appended as JSON to ``$RUDDER_FAULT_REPORT`` when set."""
    row = dict(
        fault=fault,
        injected=injected,
        detect_s=None if detect_s is None else round(float(detect_s), 2),
        left=left,
        seen=seen,
        tried=int(tried),
        detected=int(tried if detected is None else detected),
        clean=int(clean),
        lost_bytes=int(lost_bytes),
        input_checked=int(input_checked),
        test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
    )
    print(f"fault: {json.dumps(row)}")
    path = os.environ.get(FAULT_REPORT_VAR)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def partition_bytes_checked(cache: str) -> int:
    """The bytes of every partition file under ``cache``, after checking each against the sizes and CRC-32s
    recorded when partitioning (raises if one differs): a fault that ends a job must leave its input intact."""
    from rudder.runtime.partition import check_partitions, read_meta

    total = 0
    for part_dir in sorted(glob.glob(os.path.join(cache, "partitions", "*"))):
        with open(os.path.join(part_dir, str(read_meta(part_dir)["part_config"]))) as f:
            check_partitions(part_dir, json.load(f)["num_parts"])
        total += sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(part_dir) for name in names
        )
    return total
