"""The supervisor of a DistDGL job started from a shell (``train.py gnn`` outside MPI).

:func:`launch` cleans up after earlier jobs whose supervisor was killed (:func:`cleanup_stale_jobs`), partitions
(cached, files checked against their recorded sizes and CRC-32s), checks ports, starts ``mpiexec`` in its own
process group, and supervises the job. It ends the job when a rank dies (naming the rank that died first), when a
trainer stops making progress (the watchdog, :mod:`rudder.runtime.heartbeat`: naming the rank and the phase it was
in), at ``--timeout-s``, or on SIGINT/SIGTERM; then it kills the group and every rank, and removes the job's
``/dev/shm`` segments, job folder and port lock. If the supervisor itself is killed outright, ``mpiexec`` gets
SIGKILL from the kernel (a parent-death signal) and every rank ends itself (it watches the supervisor's pid: see
:func:`rudder.runtime.rank.rank_main`); what they leave is removed at the next start. Each rank runs
:func:`rudder.runtime.rank.rank_main`.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from rudder.runtime import llm_service, onehost
from rudder.runtime.console import CONSOLE_VAR, JobLog, default_log_path
from rudder.runtime.heartbeat import FACTOR, PHASES, beat_path, read_beat
from rudder.runtime.partition import check_decisions_partitioning, ensure_partitions
from rudder.runtime.ports import free_port_base, job_ports, port_in_use, remove_stale_locks
from rudder.runtime.procs import alive, signal_process, start_time, state
from rudder.runtime.rank import check_trace_folder
from rudder.runtime.summary import CLUSTER_VAR
from rudder.testbed.cluster import ClusterError, EmulatedCluster, preflight
from rudder.traces.schema import CONDITIONS_FILE, TRACE_FILE

SHM_DIR = "/dev/shm"
TAG_VAR = onehost.TAG_VAR
SUPERVISOR_VAR = "RUDDER_SUPERVISOR"  # "pid start_time" of the supervising launcher, for the ranks to watch
SUPERVISOR_FILE = "supervisor.json"  # in the job folder: who supervises it, and what to clean if it is killed


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
                ours = (
                    name.startswith(("mpich", "sem.mp-", "dgl", "torch_"))
                    and os.stat(path).st_mtime >= since - 1
                    and name not in in_use
                )
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
                fd = None
            if fd is not None and not alive(st["pid"], st.get("start")):  # the pid is another process's by now
                os.close(fd)
                fd = None
            if fd is None:
                if not alive(st["pid"], st.get("start")) and self.first_dead is None:
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


def _exited(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has exited, without reaping it: while it is a zombie its pid, and so the id of the process
    group it leads, cannot be given to another process, and :func:`_kill_group` may signal that group safely."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, ``proc``'s process group (it leads one: ``start_new_session``). Call it before ``proc``
    is reaped (:func:`_exited`, not ``poll``): once reaped, its pid may be another process's group leader's."""
    if proc.returncode is not None:  # reaped already: its group id may be someone else's now
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not _exited(proc):
            time.sleep(0.05)


def _kill_ranks(statuses: dict[int, dict]) -> None:
    """SIGKILL every rank still running, each with its own process group (its DGL sampler workers): the ranks
    run in sessions of their own under MPICH's proxies, so killing mpiexec's group does not reach a rank that is
    stopped or ignores its proxy. The side that closes a TCP connection first keeps its port in TIME_WAIT for a
    minute, so the clients go first: trainers other than trainer 0, then trainer 0 (it hosts torch.distributed's
    store on port-1), then the servers (their ports are the job's)."""

    def order(st):
        role = st["role"]
        return 2 if role["kind"] == "server" else (1 if role["trainer_rank"] == 0 else 0)

    for step in range(3):
        ranks = [st for st in statuses.values() if order(st) == step and alive(st["pid"], st.get("start"))]
        for st in ranks:  # through a pidfd, the start time checked: a pid that wrapped to another process is spared
            signal_process(st["pid"], signal.SIGKILL, st.get("start"), group=True)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(alive(st["pid"], st.get("start")) for st in ranks):
            time.sleep(0.02)


def _die_with_parent() -> None:
    """``preexec_fn`` of mpiexec: the kernel sends it SIGKILL when the supervisor dies (PR_SET_PDEATHSIG)."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def cleanup_stale_jobs(cache_dir: str) -> list[str]:
    """Remove what jobs whose supervisor was killed left behind: their job folders, ``/dev/shm`` segments and port
    locks. A job counts as stale when its supervisor is gone and none of its ranks runs (for a job started by the
    user's mpiexec, which has no supervisor: when none of its ranks runs and its folder is over a minute old).
    Returns one line per thing removed."""
    removed = [f"port lock {path}" for path in remove_stale_locks()]
    for job_dir in sorted(glob.glob(os.path.join(cache_dir, "jobs", "*"))):
        try:
            with open(os.path.join(job_dir, SUPERVISOR_FILE)) as f:
                sup = json.load(f)
        except FileNotFoundError:
            sup = None
        except (OSError, ValueError):
            sup = {}
        statuses = _read_statuses(job_dir)
        if any(alive(st["pid"], st.get("start")) for st in statuses.values()):
            continue
        if sup is None:
            try:
                if time.time() - os.path.getmtime(job_dir) < 60:
                    continue
            except OSError:
                continue
        elif sup and alive(sup.get("pid", 0), sup.get("start")):
            continue
        tag = os.path.basename(job_dir)
        shm = cleanup_shm(
            tag,
            since=sup.get("started") if sup else None,
            before=set(sup["shm_before"]) if sup and "shm_before" in sup else None,
        )
        shutil.rmtree(job_dir, ignore_errors=True)
        removed.append(f"job folder {job_dir}" + (f" and {len(shm)} /dev/shm segment(s)" if shm else ""))
    return removed


def _unanswered(job_dir: str, statuses: dict[int, dict], timeout_s: float = 1.0) -> list[str]:
    """The job's graph servers that do not accept a TCP connection within ``timeout_s`` (a cut link, a host gone),
    probed all at once from here; for the watchdog's verdict, so that it names the host a stalled job lost. Only
    probed once the job is to be ended: a stray connection is nothing a server expects."""
    try:
        with open(os.path.join(job_dir, "ip_config.txt")) as f:
            servers = [line.split() for line in f if line.strip()]
    except OSError:
        return []
    hosts = {st["role"]["machine"]: st["role"]["host"] for st in statuses.values() if st["role"]["kind"] == "server"}
    answers: dict[int, bool] = {}

    def probe(machine: int, ip: str, port: str) -> None:
        try:
            socket.create_connection((ip, int(port)), timeout=timeout_s).close()
            answers[machine] = True
        except (OSError, ValueError):
            answers[machine] = False

    threads = [threading.Thread(target=probe, args=(m, *addr[:2]), daemon=True) for m, addr in enumerate(servers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 1.0)
    return [
        f"machine {m}'s server {ip}:{port}{' on ' + hosts[m] if m in hosts else ''} does not answer"
        for m, (ip, port, *_) in enumerate(servers)
        if answers.get(m) is False
    ]


def _stall(
    watchdog_s: float,
    startup_timeout_s: float,
    job_dir: str,
    statuses: dict[int, dict],
    launched: float,
    expected_trainers: int,
) -> str | None:
    """The watchdog's verdict: a one-line reason naming the rank to blame if a trainer made no progress within its
    bound, else None. A rank whose process is stopped (SIGSTOP, a debugger) is blamed first: the others then wait
    on it."""
    now = time.monotonic()
    overdue = []
    trainers = {r: st for r, st in statuses.items() if st["role"]["kind"] == "trainer"}
    for rank, st in trainers.items():
        beat = read_beat(beat_path(job_dir, rank))
        if beat is None:
            continue
        bound = beat.bound_s(watchdog_s, startup_timeout_s)
        idle = now - beat.last_mark
        if bound and idle > bound:
            overdue.append((beat.last_mark, rank, beat, bound, idle))
    beats = sum(1 for r in trainers if os.path.exists(beat_path(job_dir, r)))
    if not overdue:
        if startup_timeout_s and beats < expected_trainers and now - launched > startup_timeout_s:
            return (
                f"only {beats} of {expected_trainers} trainers started within --startup-timeout-s "
                f"{startup_timeout_s:g} (ranks that reported: {', '.join(map(str, sorted(statuses))) or 'none'})"
            )
        return None
    _, rank, beat, bound, idle = min(overdue)
    st = trainers[rank]
    if beat.phase == PHASES[0]:
        how = f"--startup-timeout-s {startup_timeout_s:g}"
    else:
        how = f"max(--watchdog-s {watchdog_s:g}, {FACTOR:g} x its slowest step {beat.slowest_step_s:.3f} s)"
    hung = f"no progress for {idle:.1f} s while {beat.phase} (bound {bound:.1f} s = {how})"
    unanswered = _unanswered(job_dir, statuses)
    if unanswered:
        hung += "; " + "; ".join(unanswered)
    stopped = [
        s
        for s in sorted(statuses.values(), key=lambda s: s["role"]["rank"])
        if alive(s["pid"], s.get("start")) and state(s["pid"]) in ("T", "t")
    ]
    if stopped:
        s0 = stopped[0]
        if s0["role"]["rank"] == rank:
            return f"{st['describe']}: process {st['pid']} is stopped (SIGSTOP or a debugger): {hung}"
        return (
            f"{s0['describe']}: process {s0['pid']} is stopped (SIGSTOP or a debugger); "
            f"{st['describe']} waits on it: {hung}"
        )
    return f"{st['describe']}: {hung}"


def pin_agent_reference(cfg, argv: list[str]) -> list[str]:
    """Make a file reference ``--agent path/to/file.py:Class`` absolute in ``cfg`` and in the ranks' ``argv`` (the
    last ``--agent`` wins), so that every rank resolves the same file whatever its working folder."""
    from rudder.evaluation.registry import absolute_reference

    pinned = absolute_reference(cfg.agent)
    if pinned == cfg.agent:
        return argv
    cfg.agent = pinned
    return [*argv, "--agent", pinned]


def launch(cfg, argv: list[str]) -> int:
    """Start ``mpiexec -n N python -m rudder.train argv`` for ``cfg`` and supervise it. Returns the exit code.

    With ``--hosts N`` (or ``--cluster NAME``) the ranks run on emulated hosts (:mod:`rudder.testbed.cluster`),
    one partition per host, in DGL's several-host mode; a cluster brought up here is torn down when the job ends,
    fails or is interrupted.

    Every rank's stdout and stderr (DGL's and MPI's messages) and the partitioner's go to the job's log
    (:class:`~rudder.runtime.console.JobLog`); the terminal shows what the ranks :func:`~rudder.runtime.console.say`
    and the supervisor's own lines."""
    cfg.validate()  # once here, before any rank starts (an agent that cannot be found is named as given)
    check_trace_folder(cfg)
    for line in cleanup_stale_jobs(cfg.cache_dir):
        print(f"rudder: removed what a killed job left: {line}", file=sys.stderr, flush=True)
    argv = pin_agent_reference(cfg, argv)
    argv = [a for a in argv if a not in ("--repartition", "--no-repartition")]  # done here, not again per rank
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the one pip's mpich put next to python
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH: install MPI (pip install mpich mpi4py)")
    log = JobLog(
        cfg.log or default_log_path(cfg.cache_dir, secrets.token_hex(3)), verbose=cfg.verbose, prune=cfg.log is None
    )
    try:
        if cfg.hosts or cfg.cluster:
            return _launch_on_cluster(cfg, argv, mpiexec, log)
        return _launch_here(cfg, argv, mpiexec, log)
    except (ValueError, RuntimeError, OSError) as exc:  # bad input: one line, naming the log if it holds anything
        if log.empty():
            raise
        raise RuntimeError(f"{exc}{log.where()}") from exc
    finally:
        log.close()


def _check_partitioning(cfg, part_config: str, log: JobLog) -> None:
    """Before any rank starts: a ``--decisions-from`` trace must come from these very partitions (one line)."""
    note = check_decisions_partitioning(cfg, part_config)
    if note:
        log.note(note)


#: Processes per core of this machine past which a job is refused: its ranks would miss DistDGL's connection and
#: RPC timeouts (and the watchdog's bound) rather than train slowly.
MAX_PROCESSES_PER_CORE = 8


def check_cores(cfg) -> None:
    """Every rank of a job started here runs on this machine's cores (emulated hosts share them too): refuse, in
    one line, a job of more than :data:`MAX_PROCESSES_PER_CORE` processes (servers, trainers, sampler workers) per
    core."""
    cores = len(os.sched_getaffinity(0))
    processes = cfg.world_size + cfg.num_trainers * cfg.num_samplers
    if processes > MAX_PROCESSES_PER_CORE * cores:
        raise ValueError(
            f"--parts {cfg.parts} with --trainers-per-part {cfg.trainers_per_part} and --num-samplers "
            f"{cfg.num_samplers} starts {processes} processes on the {cores} cores this job may use: more than "
            f"{MAX_PROCESSES_PER_CORE} per core would time out rather than train (use fewer, or start the job on "
            "several machines with mpiexec or srun)"
        )


def _launch_here(cfg, argv: list[str], mpiexec: str, log: JobLog) -> int:
    """Run the job with every rank on this host."""
    with log.capture():
        part_config = ensure_partitions(cfg, log=log.note)
    _check_partitioning(cfg, part_config, log)
    check_cores(cfg)
    if cfg.port == 0:
        cfg.port = free_port_base(cfg.parts)
        argv = [*argv, "--port", str(cfg.port)]  # the ranks use the block found here
    server_ports, master_port = job_ports(cfg, one_host=True)
    for port in server_ports + [master_port]:
        if port_in_use("127.0.0.1", port):
            raise RuntimeError(f"port {port} is in use (another DistDGL job, or a leftover server?): pass --port")

    with llm_service.Services(cfg.agent_options().get("model"), cfg.decision_priority, log.note) as services:
        if llm_service.wanted(cfg):
            argv = [*argv, "--llm-endpoint", services.start_here()]
        log.note(
            f"rudder: starting {cfg.world_size} ranks ({cfg.parts} servers, {cfg.num_trainers} trainers) on this host"
        )
        cmd = [mpiexec, "-n", str(cfg.world_size), sys.executable, "-m", "rudder.train", *argv]
        return _supervise(cfg, cmd, log, extra_env=services.rank_env())  # the services' token, if any


def _launch_on_cluster(cfg, argv: list[str], mpiexec: str, log: JobLog) -> int:
    """Run the job across emulated hosts: one partition (its server and trainers) per host."""

    try:
        preflight()
        # held while the job runs: `list`, `down` and `up` leave a cluster in use alone
        attached = EmulatedCluster.attach(cfg.cluster, use="a job", adopt=cfg.adopt_cluster) if cfg.cluster else None
    except ClusterError as exc:
        raise RuntimeError(str(exc)) from None
    if attached is not None:
        hosts = len(attached.hostnames)
        if "--parts" in argv and cfg.parts != hosts:
            raise ValueError(
                f"cluster {cfg.cluster} has {hosts} hosts: one partition each, so --parts must be "
                f"{hosts} (or left out), got {cfg.parts}"
            )
        cfg.parts = hosts
        argv = [*argv, "--parts", str(hosts)]
    with log.capture():
        part_config = ensure_partitions(cfg, log=log.note)  # before the hosts come up: partitioning takes a while
    _check_partitioning(cfg, part_config, log)
    check_cores(cfg)
    if cfg.port == 0:
        cfg.port = 30050  # every host has its own network namespace: no other job's ports to avoid
        argv = [*argv, "--port", str(cfg.port)]
    try:
        cluster = attached or EmulatedCluster(cfg.hosts, cfg.link_rate).up()
    except ClusterError as exc:
        raise RuntimeError(str(exc)) from None
    try:
        rate = cluster.link_rate or "unshaped"
        log.note(
            f"rudder: {len(cluster.hostnames)} emulated hosts ({', '.join(cluster.hostnames)}), links {rate}; "
            f"starting {cfg.world_size} ranks ({cfg.parts} servers, {cfg.num_trainers} trainers)"
        )
        info = dict(
            name=cluster.name, hosts=cluster.hostnames, addresses=cluster.addresses, link_rate=cluster.link_rate
        )
        from rudder.runtime import llm_service

        with llm_service.Services(cfg.agent_options().get("model"), cfg.decision_priority, log.note) as services:
            if llm_service.wanted(cfg):
                argv = [*argv, "--llm-endpoint", services.start_on(cluster, cluster.hostnames)]
            cmd = [
                mpiexec,
                *cluster.mpiexec_args(1 + cfg.trainers_per_part),
                "-n",
                str(cfg.world_size),
                sys.executable,
                "-m",
                "rudder.train",
                *argv,
            ]
            with _Conditions(cfg, cluster, log) as conditions:
                env = {CLUSTER_VAR: json.dumps(info), **services.rank_env()}
                return _supervise(cfg, cmd, log, extra_env=env, on_start=conditions.start)
    finally:
        if attached is None or attached.adopted:
            cluster.down()  # brought up here, or adopted: this job owns it
        else:
            attached.release()


class _Conditions:
    """``--scenario``: play the scenario's link rates on the emulated hosts while the job runs
    (:class:`~rudder.testbed.conditions.ConditionsPlayer`), give every link its rate back at the end, and write what
    was played into the job's trace folder (``conditions.json``) once its ranks have closed their traces."""

    def __init__(self, cfg, cluster: EmulatedCluster, log: JobLog):
        self.cfg, self.cluster, self.log, self.player = cfg, cluster, log, None
        self.cpu_cores: list[float | None] = []  # a straggler's CPU cap per host (None: uncapped)

    def __enter__(self) -> _Conditions:
        """Check the scenario and set up its player (it starts with the job's training: :meth:`start`)."""
        if self.cfg.scenario is None:
            return self
        from rudder.env.scenario import Scenario
        from rudder.testbed.cluster import parse_rate
        from rudder.testbed.conditions import ConditionsPlayer

        if self.cluster.link_rate is None:
            raise ValueError(
                f"--scenario changes link rates as factors of the cluster's link rate: cluster {self.cluster.name} "
                "has unshaped links (bring it up with --link-rate)"
            )
        scenario = Scenario.load(self.cfg.scenario)
        hosts = len(self.cluster.hostnames)
        longest = self.cfg.timeout_s or 6 * 3600.0  # the schedule is laid out this far ahead
        base = self.cluster.link_rate
        self.player = ConditionsPlayer(self.cluster, scenario, parse_rate(base), hosts, longest, base_rate=base)
        self.log.note(
            f"rudder: playing scenario {scenario.name} on the {hosts} links from the first minibatch (rates as "
            f"factors of {base})"
        )
        # a straggler: its host's processes share 1/factor of the host's even share of this machine's CPUs, capped
        # before the job's ranks start (they start inside the cap)
        share = (os.cpu_count() or 1) / hosts
        for h in range(hosts):
            factor = scenario.conditions(h, kinds=("straggler",)).cpu_factor
            cores = share / factor if factor > 1 else None
            self.cpu_cores.append(cores)
            if cores is not None:
                self.cluster.cap_cpu(h, cores)
                self.log.note(f"rudder: straggler: host {h}'s processes capped at {cores:.2f} CPUs")
        return self

    def start(self, job_dir: str) -> None:
        """The job's folder exists: play from the moment a trainer takes its first step of training (its
        heartbeat, :mod:`rudder.runtime.heartbeat`), so that the timeline meets every run under this scenario
        from its first minibatch, as it meets the replay of its trace."""
        if self.player is None:
            return

        def training() -> bool:
            for path in glob.glob(os.path.join(job_dir, "status", "rank*.beat")):
                beat = read_beat(path)
                if beat is not None and beat.steps > 0:
                    return True
            return False

        self.player.start(when=training)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.player is None:
            return
        self.player.stop()
        for h, cores in enumerate(self.cpu_cores):
            if cores is not None:
                self.cluster.cap_cpu(h, None)
        trace = self.cfg.trace
        played = self.player.started_unix > 0  # not if the job ended before training began
        if played and trace and os.path.isfile(os.path.join(trace, TRACE_FILE)):
            record = self.player.record()
            if any(c is not None for c in self.cpu_cores):  # in the recorded times already: replay adds nothing
                record["cpu_cores"] = self.cpu_cores
            tmp = os.path.join(trace, f".{CONDITIONS_FILE}.tmp")
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            os.replace(tmp, os.path.join(trace, CONDITIONS_FILE))
            self.log.note(
                f"rudder: {len(record['changes'])} link-rate changes played; kept in {trace}/{CONDITIONS_FILE}"
            )


def _supervise(cfg, cmd: list[str], log: JobLog, extra_env: dict | None = None, on_start=None) -> int:
    """Run the job's ``mpiexec`` command in its own process group, its output into ``log``, relay what its ranks say,
    watch its ranks, clean up; the exit code. ``on_start(job_dir)`` is called once the job's folder exists."""
    tag = f"rd{secrets.token_hex(3)}"
    job_dir = os.path.join(cfg.cache_dir, "jobs", tag)
    me = f"{os.getpid()} {start_time(os.getpid())}"
    os.makedirs(os.path.join(job_dir, "status"), exist_ok=True)
    log.attach_console(os.path.join(job_dir, "console.jsonl"))
    env = dict(os.environ, **{TAG_VAR: tag, SUPERVISOR_VAR: me, CONSOLE_VAR: log.console_path}, **(extra_env or {}))
    env.setdefault("DGL_DIST_MAX_TRY_TIMES", "20")  # trainers give up on an absent server after ~60 s, not 50 min
    env.setdefault("OMP_NUM_THREADS", "1")
    shm_before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    started = time.time()
    with open(os.path.join(job_dir, SUPERVISOR_FILE), "w") as f:
        json.dump(
            dict(pid=os.getpid(), start=start_time(os.getpid()), started=started, shm_before=sorted(shm_before)), f
        )
    if on_start is not None:
        on_start(job_dir)
    launched = time.monotonic()
    proc = log.popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    watch = _DeathWatch(job_dir)
    interrupted = stalled = None

    def on_signal(signum, _frame):
        nonlocal interrupted
        interrupted = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not _exited(proc):
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
                _kill_ranks(_read_statuses(job_dir))
                _kill_group(proc, grace_s=2.0)
                break
            stalled = _stall(
                cfg.watchdog_s, cfg.startup_timeout_s, job_dir, _read_statuses(job_dir), launched, cfg.num_trainers
            )
            if stalled is not None:
                log.note(f"rudder: job failed: {stalled}{log.where()}")
                break
    finally:
        if not _exited(proc):
            # the launcher ends the job (interrupted, a dead or hung rank, --timeout-s): SIGKILL the ranks first. A
            # rank given SIGTERM would stop in order (rudder.runtime.stop), which is for signals from outside
            _kill_ranks(_read_statuses(job_dir))
        _kill_group(proc)  # before reaping mpiexec: its group id stays ours until then
        rc = proc.wait()
        statuses = _read_statuses(job_dir)
        _kill_ranks(statuses)  # any rank mpiexec's proxies did not reach
        for st in sorted((st for st in statuses.values() if st["state"] == "failed"), key=lambda st: st["time"]):
            log.record(f"rudder: {st['describe']} failed: {st.get('error')}\n{st.get('details', '')}")
        for s, handler in old.items():
            signal.signal(s, handler)
        cleanup_shm(tag, since=started, before=shm_before)
        log.relay()
        shutil.rmtree(job_dir, ignore_errors=True)
    if interrupted is not None:
        return 124 if interrupted == "timeout" else 130
    watch.close()
    if stalled is not None:
        return 1
    finished = len(statuses) == cfg.world_size and all(st["state"] == "done" for st in statuses.values())
    cut = [st for st in sorted(statuses.values(), key=lambda st: st["role"]["rank"]) if st.get("trace_error")]
    if finished and cut:  # the run, its summary and accuracies are whole; its trace is not
        log.note(f"rudder: job failed: {cut[0]['describe']}: its trace was cut short: {cut[0]['trace_error']}")
        return 1
    if rc != 0 and finished and watch.first_dead is None:
        # every rank recorded "done" after the summary and the trace were written and MPI agreed on the way out:
        # the job's results are whole. Whatever ended a rank after that (mpiexec names the signal in the log) is
        # reported, not turned into a failed job
        log.note(
            f"rudder: warning: every rank finished in order, but mpiexec exited with {rc} afterwards (a rank ended "
            f"by a signal while leaving?){log.where()}"
        )
        return 0
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
