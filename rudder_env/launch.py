"""Running a DistDGL job as MPI ranks: roles from ranks, ip_config from MPI hostnames, self-launch and clean-up.

Two entry points:

- :func:`rank_main` runs inside every rank of ``mpiexec -n N`` / ``srun -n N``. Roles come from the rank: on one
  host, ranks ``0..P-1`` are the graph servers of machines ``0..P-1`` and the next ``P*T`` ranks the trainers
  (``T`` per machine); on several hosts, each host is one machine and its lowest rank is its server. The one-host
  fixes (:mod:`rudder_env.onehost`) apply only when every rank is on one host.
- :func:`launch` is what ``train.py gnn`` does when not started by MPI: partition (cached), check ports, start
  ``mpiexec`` in its own process group, and when the job ends (or fails, or times out, or is interrupted) kill the
  group, remove the job's ``/dev/shm`` segments, and name the rank that died first.

mpi4py is imported only inside :func:`rank_main`: DGL's sampler worker processes re-import the main module and
must not initialise MPI. Waiting on other ranks uses non-blocking calls with a short sleep, because blocking MPI
calls spin a core.
"""

from __future__ import annotations

import atexit
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
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

from rudder_env import onehost
from rudder_env.partition import PartitionError, ensure_partitions, graph_name, partition_dir, read_meta

SHM_DIR = "/dev/shm"
TAG_VAR = onehost.TAG_VAR
RESULT_TAG = 11


@dataclass(frozen=True)
class Role:
    rank: int
    kind: str  # "server" or "trainer"
    machine: int  # partition id
    trainer_rank: int  # index among trainers (torch.distributed rank); -1 for servers
    host: str

    def describe(self) -> str:
        what = "server" if self.kind == "server" else f"trainer {self.trainer_rank}"
        return f"rank {self.rank} ({what} of machine {self.machine} on {self.host})"


def assign_roles(hosts: list[str], parts: int, trainers_per_part: int) -> tuple[list[Role], bool]:
    """Role of every rank given each rank's host name; returns ``(roles, one_host)``."""
    n = len(hosts)
    expected = parts * (1 + trainers_per_part)
    distinct = list(dict.fromkeys(hosts))  # in order of first rank
    if n != expected:
        raise ValueError(f"the job has {n} MPI ranks, expected {expected} = {parts} partitions x "
                         f"(1 server + {trainers_per_part} trainers): use mpiexec -n {expected}")
    if len(distinct) == 1:
        roles = [Role(r, "server", r, -1, hosts[r]) for r in range(parts)]
        roles += [Role(parts + i, "trainer", i // trainers_per_part, i, hosts[parts + i])
                  for i in range(parts * trainers_per_part)]
        return roles, True
    if len(distinct) != parts:
        raise ValueError(f"ranks are spread over {len(distinct)} hosts but --parts is {parts}: "
                         "use one host, or one host per partition")
    roles: list[Role | None] = [None] * n
    for machine, host in enumerate(distinct):
        ranks = [r for r in range(n) if hosts[r] == host]
        if len(ranks) != 1 + trainers_per_part:
            raise ValueError(f"host {host} has {len(ranks)} ranks, expected {1 + trainers_per_part} "
                             f"(1 server + {trainers_per_part} trainers): use --ntasks-per-node={1 + trainers_per_part}")
        roles[ranks[0]] = Role(ranks[0], "server", machine, -1, host)
        for i, r in enumerate(ranks[1:]):
            roles[r] = Role(r, "trainer", machine, machine * trainers_per_part + i, host)
    return roles, False


def under_mpi() -> bool:
    """True inside a rank started by mpiexec (MPICH, Open MPI, PMIx) or an ``srun`` job step."""
    if any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        return True
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and os.environ.get("SLURM_STEP_ID") not in (
        "batch", "extern", "4294967294")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _port_lock(base: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"rudder-ports-{base}.lock")


def _claim(base: int) -> bool:
    """Claim a port block for this process (a lock file naming our pid; a dead owner's lock is taken over)."""
    path = _port_lock(base)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                return False
            try:
                os.remove(path)  # stale: its job is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: os.path.exists(path) and os.remove(path))
        return True
    return False


def free_port_base(parts: int, host: str = "127.0.0.1", start: int = 30050) -> int:
    """The first base port from ``start`` (in steps of 100) whose server ports and master port are free and that
    no other rudder job on this host has claimed; claims it until this process exits."""
    for base in range(start, 65000 - 10 * parts, 100):
        ports = [base - 1] + [base + 10 * m for m in range(parts)]
        if not any(port_in_use(host, p) for p in ports) and _claim(base):
            return base
    raise RuntimeError(f"no free block of ports from {start} on {host}: pass --port")


def job_ports(cfg, one_host: bool) -> tuple[list[int], int]:
    """Server port of each machine, and the torch.distributed master port."""
    servers = [cfg.port + (10 * m if one_host else 0) for m in range(cfg.parts)]
    return servers, cfg.port - 1


@dataclass(frozen=True)
class Job:
    tag: str
    job_dir: str
    ip_config: str
    part_config: str
    graph_name: str
    master: str
    one_host: bool
    meta: dict
    port: int


def prepare_job(cfg, roles: list[Role], one_host: bool, tag: str) -> Job:
    """Partition if needed, write ip_config (one line per machine: server address and port)."""
    part_config = ensure_partitions(cfg)
    meta = read_meta(partition_dir(cfg))
    job_dir = os.path.join(cfg.cache_dir, "jobs", tag)
    os.makedirs(os.path.join(job_dir, "status"), exist_ok=True)
    if cfg.port == 0:
        cfg.port = free_port_base(cfg.parts) if one_host else 30050
    server_ports, master_port = job_ports(cfg, one_host)
    lines = []
    for m in range(cfg.parts):
        server = next(r for r in roles if r.kind == "server" and r.machine == m)
        ip = "127.0.0.1" if one_host else socket.gethostbyname(server.host)
        lines.append(f"{ip} {server_ports[m]}")
    ip_config = os.path.join(job_dir, "ip_config.txt")
    with open(ip_config, "w") as f:
        f.write("\n".join(lines) + "\n")
    trainer0 = next(r for r in roles if r.trainer_rank == 0)
    master_ip = "127.0.0.1" if one_host else socket.gethostbyname(trainer0.host)
    return Job(tag=tag, job_dir=job_dir, ip_config=ip_config, part_config=part_config, graph_name=graph_name(cfg),
               master=f"{master_ip}:{master_port}", one_host=one_host, meta=meta, port=cfg.port)


def _wait(comm, request=None, poll_s: float = 0.01) -> None:
    """Wait for a non-blocking request (default: a barrier) without spinning a core."""
    request = request if request is not None else comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def _status(job: Job, role: Role, state: str, **extra) -> None:
    path = os.path.join(job.job_dir, "status", f"rank{role.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(state=state, pid=os.getpid(), role=asdict(role), describe=role.describe(), time=time.time(),
                       **extra), f)
    os.replace(path + ".tmp", path)


def _run_server(cfg, role: Role, job: Job) -> None:
    from rudder_env.dgl_compat import import_dgl

    dgl = import_dgl()
    port = job_ports(cfg, job.one_host)[0][role.machine]
    host = "127.0.0.1" if job.one_host else "0.0.0.0"
    if port_in_use(host, port):
        raise RuntimeError(f"port {port} is in use (another DistDGL job, or a leftover server?): pass --port")
    os.environ.update(DGL_ROLE="server", DGL_GRAPH_FORMAT="csc")
    server = dgl.distributed.DistGraphServer(
        role.machine, job.ip_config, 1, cfg.num_trainers * (1 + cfg.num_samplers), job.part_config,
        graph_format=["csc"])
    server.start()  # returns when every trainer has exited


def _run_trainer(cfg, role: Role, job: Job) -> dict:
    os.environ.update(DGL_ROLE="client", DGL_DIST_MODE="distributed", DGL_NUM_SERVER="1",
                      DGL_NUM_SAMPLER=str(cfg.num_samplers), DGL_GROUP_ID="0")
    import gymnasium as gym

    import rudder_env  # noqa: F401  (registers the environments)
    from agents.base import make_agent
    from rudder_env.trainer import DistTrainer

    agent = make_agent(cfg.agent, **agent_options(cfg, role))
    trainer = DistTrainer(cfg, role.trainer_rank, job.graph_name, job.ip_config, job.master, job.meta,
                          part_config=job.part_config, use_buffer=getattr(agent, "uses_buffer", True),
                          static_buffer=getattr(agent, "static", False),
                          admit_on_miss=getattr(agent, "admit_on_miss", None))
    extra = {}
    if cfg.check_env:
        from gymnasium.utils.env_checker import check_env

        check_env(gym.make("rudder/Live-v0", trainer=trainer, candidates=cfg.candidates, reward=cfg.reward).unwrapped,
                  skip_render_check=True)
        extra["check_env"] = "passed"
    writer = _trace_writer(cfg, role, job, trainer) if cfg.trace else None
    env = gym.make("rudder/Live-v0", trainer=trainer, candidates=cfg.candidates, reward=cfg.reward, trace=writer,
                   ranking=getattr(agent, "ranking", "misses"))
    from agents.runner import play

    played = play(env, agent, seed=cfg.seed, asynchronous=asynchronous(cfg, agent), priority=cfg.decision_priority)
    result = trainer.result()
    result.update(extra, decisions=played["decisions"], latency_p50_s=round(played["latency_p50_s"], 5),
                  latency_p95_s=round(played["latency_p95_s"], 5), asynchronous=asynchronous(cfg, agent),
                  env_overhead_s=round(env.unwrapped.env_overhead_s, 4),
                  env_startup_s=round(env.unwrapped.env_startup_s, 4),
                  **({"model_queries": agent.queries} if hasattr(agent, "queries") else {}))
    if writer is not None:
        writer.close(extra_rank_meta=dict(counters=trainer.buffer.counters.as_dict()))
    result.update(trainer.evaluate())
    trainer.close()
    return result


def agent_options(cfg, role: Role) -> dict:
    """Constructor arguments an agent takes from the run: the recorded decisions to play, for ``recorded``."""
    if cfg.agent == "recorded":
        return dict(trace=cfg.decisions_from, rank=role.trainer_rank)
    return {}


def asynchronous(cfg, agent) -> bool:
    """Whether decisions run in the background: ``--decisions async``, or ``auto`` for slow agents (LLM)."""
    from agents.base import is_slow

    return is_slow(agent) if cfg.decisions == "auto" else cfg.decisions == "async"


def _trace_writer(cfg, role: Role, job: Job, trainer):
    import platform

    import dgl
    import torch

    from traces import TraceWriter

    run_meta = None
    if role.trainer_rank == 0:
        run_meta = dict(config=cfg.as_dict(), graph=job.meta, one_host=job.one_host, host=platform.node(),
                        versions=dict(python=sys.version.split()[0], torch=torch.__version__, dgl=dgl.__version__),
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    rank_meta = dict(trainer_rank=role.trainer_rank, partition=int(trainer.partid), host=role.host,
                     num_nodes=int(trainer.g.num_nodes()), halo_nodes=int(trainer.halo_ids.size),
                     capacity=trainer.buffer.capacity, total_minibatches=trainer.total_minibatches,
                     minibatches_per_epoch=trainer.minibatches_per_epoch,
                     initial_fill_rows=int(trainer.initial_ids.size), initial_fill_s=trainer.initial_fill_s)
    static = dict(halo_ids=trainer.halo_ids, halo_degree=trainer.halo_degree, initial_ids=trainer.initial_ids,
                  **trainer.lookahead.to_static())
    return TraceWriter(cfg.trace, rank=role.trainer_rank, num_ranks=cfg.num_trainers, run_meta=run_meta,
                       rank_meta=rank_meta, static=static)


def rank_main(cfg) -> int:
    """Entry of one MPI rank. Returns the process exit code."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    supervised = TAG_VAR in os.environ  # started by launch(), which cleans up after the job
    hosts = comm.allgather(socket.gethostname())
    try:
        cfg.validate()
        roles, one_host = assign_roles(hosts, cfg.parts, cfg.trainers_per_part)
    except ValueError as exc:
        if rank == 0:
            print(f"rudder: error: {exc}", file=sys.stderr, flush=True)
        return 2
    role = roles[rank]
    job, error = None, None
    if rank == 0:
        try:
            job = prepare_job(cfg, roles, one_host, os.environ.get(TAG_VAR) or f"rd{secrets.token_hex(3)}")
        except Exception as exc:  # noqa: BLE001 - every rank waits for rank 0: it must always hear back
            error = str(exc) if isinstance(exc, (PartitionError, ValueError, OSError, RuntimeError)) else \
                f"{type(exc).__name__}: {exc}"
    _wait(comm)
    job, error = comm.bcast((job, error), root=0)
    if error is not None:
        if rank == 0:
            print(f"rudder: error: {error}", file=sys.stderr, flush=True)
        return 2
    cfg.port = job.port  # rank 0 may have picked it
    _status(job, role, "started")
    t0 = time.perf_counter()
    try:
        if job.one_host:
            onehost.apply(role.machine, tag=job.tag)
        result = _run_trainer(cfg, role, job) if role.kind == "trainer" else _run_server(cfg, role, job)
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down at once
        message = f"{type(exc).__name__}: {exc}"
        print(f"rudder: {role.describe()} failed: {message}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        _status(job, role, "failed", error=message)
        comm.Abort(1)
        return 1
    if role.kind == "trainer":
        _wait(comm, comm.isend(result, dest=0, tag=RESULT_TAG))
    if rank == 0:
        from rudder_env.summary import build_summary, print_table, write_summary

        results = []
        for r in (r.rank for r in roles if r.kind == "trainer"):
            while not comm.iprobe(source=r, tag=RESULT_TAG):
                time.sleep(0.01)
            results.append(comm.recv(source=r, tag=RESULT_TAG))
        summary = build_summary(cfg, job, results, wall_s=time.perf_counter() - t0)
        if cfg.summary:
            write_summary(summary, cfg.summary)
        print_table(summary)
    _status(job, role, "done")
    _wait(comm)
    if rank == 0 and not supervised:  # started by the user's mpiexec/srun: nobody else cleans up
        shutil.rmtree(job.job_dir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------- the launcher (no MPI around us)
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


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
                if not _alive(st["pid"]) and self.first_dead is None:
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


def launch(cfg, argv: list[str], script: str) -> int:
    """Start ``mpiexec -n N python script argv`` for ``cfg`` and supervise it. Returns the exit code."""
    cfg.validate()
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the one pip's mpich put next to python
    mpiexec = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH: install MPI (pip install mpich mpi4py)")
    ensure_partitions(cfg)
    if cfg.port == 0:
        cfg.port = free_port_base(cfg.parts)
        argv = [*argv, "--port", str(cfg.port)]  # the ranks use the block found here
    server_ports, master_port = job_ports(cfg, one_host=True)
    for port in server_ports + [master_port]:
        if port_in_use("127.0.0.1", port):
            raise RuntimeError(f"port {port} is in use (another DistDGL job, or a leftover server?): pass --port")
    tag = f"rd{secrets.token_hex(3)}"
    job_dir = os.path.join(cfg.cache_dir, "jobs", tag)
    env = dict(os.environ, **{TAG_VAR: tag})
    env.setdefault("DGL_DIST_MAX_TRY_TIMES", "20")  # trainers give up on an absent server after ~60 s, not 50 min
    env.setdefault("OMP_NUM_THREADS", "1")
    shm_before = set(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else set()
    started = time.time()
    cmd = [mpiexec, "-n", str(cfg.world_size), sys.executable, script, *argv]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    watch = _DeathWatch(job_dir)
    interrupted = None

    def on_signal(signum, _frame):
        nonlocal interrupted
        interrupted = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            watch.wait(0.2)
            if interrupted is not None:
                print(f"rudder: interrupted (signal {interrupted}): stopping the job", file=sys.stderr, flush=True)
                break
            if cfg.timeout_s and time.time() - started > cfg.timeout_s:
                print(f"rudder: job exceeded --timeout-s {cfg.timeout_s:g}: stopping it", file=sys.stderr, flush=True)
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
            print(f"rudder: job failed: {culprit['describe']}: {why}", file=sys.stderr, flush=True)
        else:
            print(f"rudder: job failed: mpiexec exited with {rc}", file=sys.stderr, flush=True)
        return rc if rc else 1
    return 0
