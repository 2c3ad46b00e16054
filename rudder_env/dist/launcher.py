"""The supervisor of a DistDGL job started from a shell (``train.py gnn`` outside MPI).

:func:`launch` partitions (cached), checks ports, starts ``mpiexec`` in its own process group, and when the job ends
(or fails, or times out, or is interrupted) kills the group, removes the job's ``/dev/shm`` segments, and names the
rank that died first. Each rank runs :func:`rudder_env.dist.rank.rank_main`.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time

from rudder_env.dist import onehost
from rudder_env.dist.console import CONSOLE_VAR, JobLog, default_log_path
from rudder_env.dist.partition import ensure_partitions
from rudder_env.dist.ports import free_port_base, job_ports, port_in_use
from rudder_env.dist.procs import alive

SHM_DIR = "/dev/shm"
TAG_VAR = onehost.TAG_VAR
CLUSTER_VAR = "RUDDER_EMULATED_CLUSTER"  # JSON facts of the emulated cluster a job runs on, for its summary


def _read_statuses(job_dir: str) -> dict[int, dict]:
    out = {}
    for path in glob.glob(os.path.join(job_dir, "status", "rank*.json")):
        try:
            with open(path) as f:
                st = json.load(f)
            out[st["role"]["rank"]] = st
        except (OSError, ValueError, KeyError):
            pass
    return out


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process has mapped or open."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if SHM_DIR in line:
                        names.add(os.path.basename(line.split()[-1]))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM_DIR + "/"):
                    names.add(os.path.basename(target))
        except OSError:
            continue
    return names


def cleanup_shm(tag: str, since: float | None = None, before: set[str] | None = None) -> list[str]:
    """Remove this job's shared-memory segments: names carrying ``tag``, and MPI/multiprocessing ones that appeared
    during the job and that no live process uses (another job's are left alone)."""
    removed = []
    in_use = _shm_in_use() if before is not None else set()
    for path in glob.glob(os.path.join(SHM_DIR, "*")):
        name = os.path.basename(path)
        ours = tag and name.startswith(tag)
        if not ours and before is not None and name not in before and since is not None:
            try:
                ours = (name.startswith(("mpich", "sem.mp-", "dgl")) and os.stat(path).st_mtime >= since - 1
                        and name not in in_use)
            except OSError:
                continue
        if ours:
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass
    return removed


class _DeathWatch:
    """Notices the first rank of a job to exit without finishing, as it happens (Linux pidfds).

    The launcher is not the ranks' parent, and mpiexec kills every other rank right after the first dies, so
    polling would often name the wrong one; a pidfd becomes readable the moment its process exits.
    """

    def __init__(self, job_dir: str):
        self.job_dir = job_dir
        self.poller = select.poll()
        self.fds: dict[int, dict] = {}  # pidfd -> status of the rank
        self.seen: set[int] = set()
        self.first_dead: dict | None = None

    def _register_new(self) -> None:
        for rank, st in _read_statuses(self.job_dir).items():
            if rank in self.seen or st["state"] != "started":
                continue
            self.seen.add(rank)
            try:
                fd = os.pidfd_open(st["pid"])
            except (ProcessLookupError, OSError):
                if not alive(st["pid"]) and self.first_dead is None:
                    self.first_dead = dict(st, time=time.time())
                continue
            self.fds[fd] = st
            self.poller.register(fd, select.POLLIN)

    def wait(self, timeout_s: float) -> None:
        self._register_new()
        events = self.poller.poll(timeout_s * 1000)
        for fd, _ in sorted(events, key=lambda e: self.fds[e[0]]["role"]["rank"]):
            st = self.fds[fd]
            self.poller.unregister(fd)
            os.close(fd)
            del self.fds[fd]
            now = _read_statuses(self.job_dir).get(st["role"]["rank"], st)
            if now["state"] == "started" and self.first_dead is None:
                self.first_dead = dict(now, time=time.time())

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)


def pin_agent_reference(cfg, argv: list[str]) -> list[str]:
    """Make a file reference ``--agent path/to/file.py:Class`` absolute in ``cfg`` and in the ranks' ``argv`` (the
    last ``--agent`` wins), so that every rank resolves the same file whatever its working folder."""
    from rudder_env.evaluation.registry import absolute_reference

    pinned = absolute_reference(cfg.agent)
    if pinned == cfg.agent:
        return argv
    cfg.agent = pinned
    return [*argv, "--agent", pinned]


def launch(cfg, argv: list[str], script: str) -> int:
    """Start ``mpiexec -n N python script argv`` for ``cfg`` and supervise it. Returns the exit code.

    With ``--hosts N`` (or ``--cluster NAME``) the ranks run on emulated hosts (:mod:`rudder_env.dist.cluster`),
    one partition per host, in DGL's several-host mode; a cluster brought up here is torn down when the job ends,
    fails or is interrupted.

    Every rank's stdout and stderr (DGL's and MPI's messages) and the partitioner's go to the job's log
    (:class:`~rudder_env.dist.console.JobLog`); the terminal shows what the ranks :func:`~rudder_env.dist.console.say`
    and the supervisor's own lines."""
    cfg.validate()  # once here, before any rank starts (an agent that cannot be found is named as given)
    argv = pin_agent_reference(cfg, argv)
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the one pip's mpich put next to python
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH: install MPI (pip install mpich mpi4py)")
    log = JobLog(cfg.log or default_log_path(cfg.cache_dir, secrets.token_hex(3)), verbose=cfg.verbose,
                 prune=cfg.log is None)
    try:
        if cfg.hosts or cfg.cluster:
            return _launch_on_cluster(cfg, argv, script, mpiexec, log)
        return _launch_here(cfg, argv, script, mpiexec, log)
    except (ValueError, RuntimeError, OSError) as exc:  # bad input: one line, naming the log if it holds anything
        if log.empty():
            raise
        raise RuntimeError(f"{exc}{log.where()}") from exc
    finally:
        log.close()


def _launch_here(cfg, argv: list[str], script: str, mpiexec: str, log: JobLog) -> int:
    """Run the job with every rank on this host."""
    with log.capture():
        ensure_partitions(cfg, log=log.note)
    if cfg.port == 0:
        cfg.port = free_port_base(cfg.parts)
        argv = [*argv, "--port", str(cfg.port)]  # the ranks use the block found here
    server_ports, master_port = job_ports(cfg, one_host=True)
    for port in server_ports + [master_port]:
        if port_in_use("127.0.0.1", port):
            raise RuntimeError(f"port {port} is in use (another DistDGL job, or a leftover server?): pass --port")
    log.note(f"rudder: starting {cfg.world_size} ranks ({cfg.parts} servers, {cfg.num_trainers} trainers) on this host")
    return _supervise(cfg, [mpiexec, "-n", str(cfg.world_size), sys.executable, script, *argv], log)


def _launch_on_cluster(cfg, argv: list[str], script: str, mpiexec: str, log: JobLog) -> int:
    """Run the job across emulated hosts: one partition (its server and trainers) per host."""
    from rudder_env.dist.cluster import ClusterError, EmulatedCluster, preflight

    try:
        preflight()
        attached = EmulatedCluster.attach(cfg.cluster) if cfg.cluster else None
    except ClusterError as exc:
        raise RuntimeError(str(exc)) from None
    if attached is not None:
        hosts = len(attached.hostnames)
        if "--parts" in argv and cfg.parts != hosts:
            raise ValueError(f"cluster {cfg.cluster} has {hosts} hosts: one partition each, so --parts must be "
                             f"{hosts} (or left out), got {cfg.parts}")
        cfg.parts = hosts
        argv = [*argv, "--parts", str(hosts)]
    with log.capture():
        ensure_partitions(cfg, log=log.note)  # before the hosts come up: partitioning a large graph takes a while
    if cfg.port == 0:
        cfg.port = 30050  # every host has its own network namespace: no other job's ports to avoid
        argv = [*argv, "--port", str(cfg.port)]
    try:
        cluster = attached or EmulatedCluster(cfg.hosts, cfg.link_rate).up()
    except ClusterError as exc:
        raise RuntimeError(str(exc)) from None
    try:
        rate = cluster.link_rate or "unshaped"
        log.note(f"rudder: {len(cluster.hostnames)} emulated hosts ({', '.join(cluster.hostnames)}), links {rate}; "
                 f"starting {cfg.world_size} ranks ({cfg.parts} servers, {cfg.num_trainers} trainers)")
        info = dict(name=cluster.name, hosts=cluster.hostnames, addresses=cluster.addresses,
                    link_rate=cluster.link_rate)
        cmd = [mpiexec, *cluster.mpiexec_args(1 + cfg.trainers_per_part), "-n", str(cfg.world_size),
               sys.executable, script, *argv]
        return _supervise(cfg, cmd, log, extra_env={CLUSTER_VAR: json.dumps(info)})
    finally:
        if attached is None:
            cluster.down()


def _supervise(cfg, cmd: list[str], log: JobLog, extra_env: dict | None = None) -> int:
    """Run the job's ``mpiexec`` command in its own process group, its output into ``log``, relay what its ranks say,
    watch its ranks, clean up; the exit code."""
    tag = f"rd{secrets.token_hex(3)}"
    job_dir = os.path.join(cfg.cache_dir, "jobs", tag)
    log.attach_console(os.path.join(job_dir, "console.jsonl"))
    env = dict(os.environ, **{TAG_VAR: tag, CONSOLE_VAR: log.console_path}, **(extra_env or {}))
    env.setdefault("DGL_DIST_MAX_TRY_TIMES", "20")  # trainers give up on an absent server after ~60 s, not 50 min
    env.setdefault("OMP_NUM_THREADS", "1")
    shm_before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    started = time.time()
    proc = log.popen(cmd, env=env, start_new_session=True)
    watch = _DeathWatch(job_dir)
    interrupted = None

    def on_signal(signum, _frame):
        nonlocal interrupted
        interrupted = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            watch.wait(0.2)
            log.relay()
            if interrupted is not None:
                log.note(f"rudder: interrupted (signal {interrupted}): stopping the job{log.where()}")
                break
            if cfg.timeout_s and time.time() - started > cfg.timeout_s:
                log.note(f"rudder: job exceeded --timeout-s {cfg.timeout_s:g}: stopping it{log.where()}")
                interrupted = "timeout"
                break
            if watch.first_dead is not None:  # mpiexec may not notice (e.g. a server gone): stop the job now
                time.sleep(1.0)  # let a rank that failed with an error record it first
                _kill_group(proc, grace_s=2.0)
                break
        rc = proc.poll()
    finally:
        _kill_group(proc)
        for s, handler in old.items():
            signal.signal(s, handler)
        cleanup_shm(tag, since=started, before=shm_before)
    log.relay()
    statuses = _read_statuses(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    if interrupted is not None:
        return 124 if interrupted == "timeout" else 130
    watch.close()
    if rc != 0 or watch.first_dead is not None:
        # the earliest event: a rank that recorded an error, or one that died without a word (killed, crashed)
        events = [st for st in statuses.values() if st["state"] == "failed"] + [watch.first_dead]
        culprit = min((e for e in events if e is not None), key=lambda e: e["time"], default=None)
        if culprit is not None:
            why = culprit.get("error", f"process {culprit['pid']} exited without finishing")
            log.note(f"rudder: job failed: {culprit['describe']}: {why}{log.where()}")
        else:
            log.note(f"rudder: job failed: mpiexec exited with {rc}{log.where()}")
        return rc if rc else 1
    return 0

