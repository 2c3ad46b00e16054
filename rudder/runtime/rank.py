"""One MPI rank of a DistDGL job: its role from its rank, the job's ip_config, and the server or trainer it runs.

:func:`rank_main` runs inside every rank of ``mpiexec -n N`` / ``srun -n N``. Roles come from the rank: on one host,
ranks ``0..P-1`` are the graph servers of machines ``0..P-1`` and the next ``P*T`` ranks the trainers (``T`` per
machine); on several hosts, each host is one machine and its lowest rank is its server. The one-host fixes
(:mod:`rudder.runtime.onehost`) apply only when every rank is on one host.

mpi4py is imported only inside :func:`rank_main`: DGL's sampler worker processes re-import the main module and must
not initialise MPI. Waiting on other ranks uses non-blocking calls with a short sleep, because blocking MPI calls
spin a core.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass

from rudder.env.sample_ahead import SampleAhead
from rudder.runtime import onehost
from rudder.runtime.console import say
from rudder.runtime.dgl_compat import import_dgl
from rudder.runtime.heartbeat import Heartbeat, beat_path
from rudder.runtime.partition import (
    PartitionError,
    check_decisions_partitioning,
    ensure_partitions,
    graph_name,
    partition_dir,
    read_meta,
)
from rudder.runtime.ports import free_port_base, job_ports, port_in_use, release_claims
from rudder.runtime.procs import alive, pidfd_exited, start_time
from rudder.runtime.progress import TrainerProgress, shape_line
from rudder.runtime.stop import StopRelay, StopRequested, exit_now, keep_dgl_handler_out, shm_mapped
from rudder.runtime.summary import CLUSTER_VAR, build_summary, format_table, write_summary
from rudder.testbed.cluster import parse_rate

TAG_VAR = onehost.TAG_VAR
SUPERVISOR_VAR = "RUDDER_SUPERVISOR"  # set by rudder.runtime.launcher: "pid start_time" of the supervisor
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
        raise ValueError(
            f"the job has {n} MPI ranks, expected {expected} = {parts} partitions x "
            f"(1 server + {trainers_per_part} trainers): use mpiexec -n {expected}"
        )
    if len(distinct) == 1:
        roles = [Role(r, "server", r, -1, hosts[r]) for r in range(parts)]
        roles += [
            Role(parts + i, "trainer", i // trainers_per_part, i, hosts[parts + i])
            for i in range(parts * trainers_per_part)
        ]
        return roles, True
    if len(distinct) != parts:
        raise ValueError(
            f"ranks are spread over {len(distinct)} hosts but --parts is {parts}: "
            "use one host, or one host per partition"
        )
    roles: list[Role | None] = [None] * n
    for machine, host in enumerate(distinct):
        ranks = [r for r in range(n) if hosts[r] == host]
        if len(ranks) != 1 + trainers_per_part:
            raise ValueError(
                f"host {host} has {len(ranks)} ranks, expected {1 + trainers_per_part} "
                f"(1 server + {trainers_per_part} trainers): use --ntasks-per-node={1 + trainers_per_part}"
            )
        roles[ranks[0]] = Role(ranks[0], "server", machine, -1, host)
        for i, r in enumerate(ranks[1:]):
            roles[r] = Role(r, "trainer", machine, machine * trainers_per_part + i, host)
    return roles, False


def under_mpi() -> bool:
    """True inside a rank started by mpiexec (MPICH, Open MPI, PMIx) or an ``srun`` job step."""
    if any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        return True
    return (
        "SLURM_PROCID" in os.environ
        and "SLURM_STEP_ID" in os.environ
        and os.environ.get("SLURM_STEP_ID") not in ("batch", "extern", "4294967294")
    )


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


def check_trace_folder(cfg) -> None:
    """``--trace DIR`` must not hold a trace already unless ``--overwrite``: a ValueError in one line, before any
    rank starts (a trainer would otherwise find it only once training is set up)."""
    if not cfg.trace or cfg.overwrite:
        return
    from rudder.traces.schema import RANK_FILE, TRACE_FILE, rank_dir_name

    held = [os.path.join(cfg.trace, TRACE_FILE)] + [
        os.path.join(cfg.trace, rank_dir_name(r), RANK_FILE) for r in range(cfg.num_trainers)
    ]
    found = next((path for path in held if os.path.exists(path)), None)
    if found is not None:
        raise ValueError(
            f"--trace {cfg.trace} holds a trace already ({found}): pass --overwrite to replace it, or another --trace"
        )


def prepare_job(cfg, roles: list[Role], one_host: bool, tag: str, checksums: bool = True) -> Job:
    """Partition if needed (checking the cached files: sizes, and CRC-32s with ``checksums``), write ip_config (one
    line per machine: server address and port)."""
    part_config = ensure_partitions(cfg, checksums=checksums)
    if checksums:  # a user's own mpiexec/srun (launch() checked before any rank started, and passes False)
        check_trace_folder(cfg)
        note = check_decisions_partitioning(cfg, part_config)
        if note:
            say(note, err=True)
    meta = {k: v for k, v in read_meta(partition_dir(cfg)).items() if k != "files"}
    job_dir = os.path.join(cfg.cache_dir, "jobs", tag)
    os.makedirs(os.path.join(job_dir, "status"), exist_ok=True)
    if cfg.port == 0:
        cfg.port = free_port_base(cfg.parts) if one_host else 30050
    server_ports, master_port = job_ports(cfg, one_host)
    lines = []
    for m in range(cfg.parts):
        server = next(r for r in roles if r.kind == "server" and r.machine == m)
        ip = "127.0.0.1" if one_host else _address(server.host, f"the server of machine {m}")
        lines.append(f"{ip} {server_ports[m]}")
    ip_config = os.path.join(job_dir, "ip_config.txt")
    with open(ip_config, "w") as f:
        f.write("\n".join(lines) + "\n")
    trainer0 = next(r for r in roles if r.trainer_rank == 0)
    master_ip = "127.0.0.1" if one_host else _address(trainer0.host, "trainer 0 (the torch.distributed master)")
    return Job(
        tag=tag,
        job_dir=job_dir,
        ip_config=ip_config,
        part_config=part_config,
        graph_name=graph_name(cfg),
        master=f"{master_ip}:{master_port}",
        one_host=one_host,
        meta=meta,
        port=cfg.port,
    )


def _address(host: str, what: str) -> str:
    """The IPv4 address of ``host`` (an MPI rank's hostname); a ValueError naming it and its role if it does not
    resolve (every host must resolve every other's name, e.g. through DNS or /etc/hosts)."""
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(
            f"host {host!r} of {what} does not resolve to an address ({exc}): every host must resolve "
            "the others' hostnames"
        ) from None


def _wait(comm, request=None, poll_s: float = 0.01) -> None:
    """Wait for a non-blocking request (default: a barrier) without spinning a core."""
    request = request if request is not None else comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def _status(job: Job, role: Role, state: str, **extra) -> None:
    path = os.path.join(job.job_dir, "status", f"rank{role.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(
            dict(
                state=state,
                pid=os.getpid(),
                start=start_time(os.getpid()),
                role=asdict(role),
                describe=role.describe(),
                time=time.time(),
                **extra,
            ),
            f,
        )
    os.replace(path + ".tmp", path)


LEAVING = threading.Event()  # set when this rank leaves on its own (finished in order, or stopped)
LEAVE_GRACE_S = 30.0  # a rank that is leaving on its own gets this long before the supervisor watch ends it


def _end_with_supervisor(supervisor: str, poll_s: float = 1.0) -> threading.Thread:
    """End this rank (and its process group: DGL sampler workers) as soon as the supervising launcher is gone.

    Under MPICH every rank runs in a session of its own below a proxy, so when the launcher is killed outright
    (SIGKILL, OOM) nothing else would stop a rank that is training or waiting on a peer. A daemon thread waits on a
    pidfd of the supervisor (no polling, no CPU) and then kills the group. ``supervisor`` is ``"pid start_time"``.

    The watch kills only on proof that the supervisor is gone: the pidfd became readable *and* the pid no longer
    names the process that started at ``start_time`` (a readiness alone is not trusted: a descriptor number can be
    closed by other code and reused). Where no pidfd can be had while the supervisor still runs (a descriptor
    limit, a kernel without pidfds) it checks every ``poll_s`` instead of killing at once, as it once did. A rank
    that is leaving on its own (:data:`LEAVING`: it finished in order or was stopped) is given
    :data:`LEAVE_GRACE_S` to exit before the watch ends it. Returns the watch thread.
    """
    import signal

    pid, start = (int(x) for x in supervisor.split())
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        fd = None
    if fd is not None and not alive(pid, start):  # the pid is another process's now: ours is gone
        os.close(fd)
        fd = None

    def gone() -> bool:
        return not alive(pid, start)

    def watch():
        if fd is not None:
            pidfd_exited(fd, timeout_s=None)  # readable once the process has exited
            if not gone():  # not our supervisor's exit: never kill on that alone
                print(
                    f"rudder: rank {os.getpid()}: the supervisor's pidfd woke while pid {pid} still runs: "
                    "watching it by polling",
                    file=sys.stderr,
                    flush=True,
                )
        while not gone():
            time.sleep(poll_s)
        if LEAVING.is_set():  # leaving on its own: os._exit ends this thread unless the exit hangs
            time.sleep(LEAVE_GRACE_S)
        print(
            f"rudder: rank {os.getpid()}: the supervising launcher (pid {pid}) is gone: ending the job",
            file=sys.stderr,
            flush=True,
        )
        os.killpg(os.getpgrp(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="rudder-supervisor-watch", daemon=True)
    thread.start()
    return thread


def _run_server(cfg, role: Role, job: Job) -> None:

    dgl = import_dgl()
    port = job_ports(cfg, job.one_host)[0][role.machine]
    host = "127.0.0.1" if job.one_host else "0.0.0.0"
    if port_in_use(host, port):
        raise RuntimeError(f"port {port} is in use (another DistDGL job, or a leftover server?): pass --port")
    os.environ.update(DGL_ROLE="server", DGL_GRAPH_FORMAT="csc")
    server = dgl.distributed.DistGraphServer(
        role.machine, job.ip_config, 1, cfg.num_trainers * (1 + cfg.num_samplers), job.part_config, graph_format=["csc"]
    )
    server.start()  # returns when every trainer has exited


def _run_trainer(cfg, role: Role, job: Job, relay=None) -> dict:
    t_start = time.perf_counter()
    os.environ.update(
        DGL_ROLE="client",
        DGL_DIST_MODE="distributed",
        DGL_NUM_SERVER="1",
        DGL_NUM_SAMPLER=str(cfg.num_samplers),
        DGL_GROUP_ID="0",
    )
    import gymnasium as gym

    import rudder.env  # noqa: F401  (registers the environments)
    from rudder.env.contract import buffer_kwargs
    from rudder.evaluation.play import play
    from rudder.evaluation.registry import make_agent
    from rudder.runtime.trainer import DistTrainer

    agent = make_agent(cfg.agent, **cfg.agent_options(role.trainer_rank))
    cfg.resolve_sample_ahead(agent.settings)
    buffer = buffer_kwargs(agent.settings, cfg.buffer_fraction, cfg.admit_on_miss)
    heartbeat = Heartbeat(beat_path(job.job_dir, role.rank))  # read by the supervisor's watchdog
    trainer = DistTrainer(
        cfg,
        role.trainer_rank,
        job.graph_name,
        job.ip_config,
        job.master,
        job.meta,
        part_config=job.part_config,
        buffer_fraction=buffer["buffer_fraction"],
        admit_on_miss=buffer["admit_on_miss"],
        heartbeat=heartbeat,
        buffer_init=buffer.get("buffer_init"),
        stop=relay,
        local_rank=role.trainer_rank if job.one_host else role.trainer_rank % cfg.trainers_per_part,  # picks its GPU
    )
    extra = {}
    if cfg.check_env:
        from gymnasium.utils.env_checker import check_env

        check_env(
            gym.make("rudder/Live-v0", trainer=trainer, candidates=cfg.candidates, reward=cfg.reward).unwrapped,
            skip_render_check=True,
        )
        extra["check_env"] = "passed"
    writer = _trace_writer(cfg, role, job, trainer, agent, buffer) if cfg.trace else None
    env = gym.make(
        "rudder/Live-v0",
        trainer=trainer,
        candidates=cfg.candidates,
        reward=cfg.reward,
        trace=writer,
        ranking=buffer["ranking"],
        levels=buffer.get("levels"),
    )
    in_background = asynchronous(cfg, agent)
    progress = TrainerProgress(cfg, role.trainer_rank)
    progress.ready(trainer, time.perf_counter() - t_start)
    trainer.on_epoch_end = progress.epoch_end
    try:
        played = play(env, agent, seed=cfg.seed, asynchronous=in_background, priority=cfg.decision_priority)
    except StopRequested as stop:  # a signal reached the job: every trainer stops after the same minibatch
        played = None
        stopped = stop.info
    else:
        stopped = None
    result = trainer.result()
    stats = agent.stats()
    result.update(
        extra,
        asynchronous=in_background,
        env_overhead_s=round(env.unwrapped.env_overhead_s, 4),
        env_startup_s=round(env.unwrapped.env_startup_s, 4),
        trace_s=round(env.unwrapped.trace_s, 4),
        **({"model_queries": stats["queries"]} if "queries" in stats else {}),
    )
    if played is not None:
        result.update(
            decisions=played["decisions"],
            latency_p50_s=round(played["latency_p50_s"], 5),
            latency_p95_s=round(played["latency_p95_s"], 5),
        )
    if writer is not None:  # a trace that cannot be written loses the trace, not the run's accuracies and summary
        try:
            writer.close(
                extra_rank_meta=dict(
                    counters=trainer.buffer.counters.as_dict(),
                    # put a played scenario on this rank's clock (rudder.env.recorded_run.RecordedRun.recorded_clock)
                    train_start_unix=trainer.stats.train_start_unix,
                    train_end_unix=trainer.stats.train_end_unix,
                    **trainer.device_stats(),
                ),
                stopped=stopped,
            )
        except OSError as exc:
            writer.failed = writer.failed or str(exc)
        if writer.failed:
            result["trace_error"] = writer.failed
            say(f"rudder: error: trainer {role.trainer_rank}: the trace was cut short: {writer.failed}", err=True)
    if stopped is None:
        accuracy = trainer.evaluate()
    else:  # no evaluation: the batch system's grace period (Slurm's KillWait, 30 s) is for saving what was done
        accuracy = dict(val_acc=None, test_acc=None)
        result["stopped"] = stopped
        say(
            f"rudder: trainer {role.trainer_rank} stopped by {stopped['signal']} after {stopped['after_minibatches']}"
            f" of {stopped['of_minibatches']} minibatches"
            + (f"; trace {cfg.trace} holds them (incomplete)" if writer is not None else ""),
            err=True,
        )
    result.update(accuracy)
    progress.finish({k: v for k, v in accuracy.items() if v is not None})
    trainer.close()
    heartbeat.mark("finishing")
    return result


def asynchronous(cfg, agent) -> bool:
    """Whether decisions run in the background: ``--decisions async``, or ``auto`` for agents that declare slow
    decisions (the LLM)."""
    return agent.asynchronous if cfg.decisions == "auto" else cfg.decisions == "async"


def _trace_writer(cfg, role: Role, job: Job, trainer, agent, buffer: dict):
    import platform

    import dgl
    import torch

    from rudder.traces import TraceWriter

    run_meta = None
    if role.trainer_rank == 0:
        settings = asdict(agent.settings)
        if settings["sample_ahead"] is not None:  # what the run did: a --sample-ahead given overrides the agent's
            settings["sample_ahead"] = str(SampleAhead.parse(cfg.sample_ahead, "--sample-ahead"))
        run_meta = dict(
            config=cfg.as_dict(),
            agent=dict(name=agent.name, settings=settings),
            buffer=buffer,
            graph=job.meta,
            one_host=job.one_host,
            host=platform.node(),
            versions=dict(python=sys.version.split()[0], torch=torch.__version__, dgl=dgl.__version__),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        cluster = json.loads(os.environ.get(CLUSTER_VAR) or "null")
        if cluster and cluster.get("link_rate"):  # emulated hosts on shaped links: what a remote row costs at least
            run_meta["network"] = dict(
                hosts=len(cluster["hosts"]),
                link_rate=cluster["link_rate"],
                link_bits_per_s=parse_rate(cluster["link_rate"]),
                row_bytes=int(trainer.meta["feat_dim"]) * trainer.feat.dtype.itemsize,
            )
    rank_meta = dict(
        trainer_rank=role.trainer_rank,
        partition=int(trainer.partid),
        host=role.host,
        num_nodes=int(trainer.g.num_nodes()),
        halo_nodes=int(trainer.halo_ids.size),
        capacity=trainer.buffer.capacity,
        total_minibatches=trainer.total_minibatches,
        minibatches_per_epoch=trainer.minibatches_per_epoch,
        initial_fill_rows=int(trainer.initial_ids.size),
        initial_fill_s=trainer.initial_fill_s,
        **trainer.device_meta(),
    )
    static = dict(
        halo_ids=trainer.halo_ids,
        halo_degree=trainer.halo_degree,
        initial_ids=trainer.initial_ids,
        **trainer.lookahead.to_static(),
    )
    return TraceWriter(
        cfg.trace,
        rank=role.trainer_rank,
        num_ranks=cfg.num_trainers,
        run_meta=run_meta,
        rank_meta=rank_meta,
        static=static,
        overwrite=cfg.overwrite,
        keep_going_when_full=True,
    )


def slurm_pmi_defaults() -> dict[str, str]:
    """Under ``srun --mpi=pmi2`` (Slurm's PMI server in slurmstepd: ``PMI_FD`` set), send MPICH's start-up address
    exchange through libfabric's TCP provider instead of UCX, unless the user chose (``MPIR_CVAR_CH4_NETMOD``,
    ``FI_PROVIDER``). Returns what it set.

    Why: pip's MPICH talks PMI-1 to Slurm 22.05's pmi2 plugin (its PMI-2 client fails to start there), and that
    plugin reads each PMI-1 request with one ``read()`` of at most 1024 bytes (``handle_pmi1_cmd``: "TODO: read
    until newline"); a request longer than that, or not read whole, is misparsed ("mpi/pmi2: value not properly
    terminated in client request", the message logged when a job once hung at start-up under load; not
    reproduced in 60 starts here). With UCX every rank puts its address as 9 segments of up to ~870 bytes (894
    the longest of 240 seen), close to that limit; with ofi/tcp it is one put of ~60 bytes. rudder's MPI traffic
    is a few control messages (roles, results, stop requests, barriers): the transport does not matter for
    speed."""
    if "PMI_FD" not in os.environ or "SLURM_STEP_ID" not in os.environ or "MPIR_CVAR_CH4_NETMOD" in os.environ:
        return {}
    chosen = dict(MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER=os.environ.get("FI_PROVIDER", "tcp"))
    os.environ.update(chosen)
    return chosen


def rank_main(cfg) -> int:
    """Entry of one MPI rank. Returns the process exit code of a rank that cannot run; a rank that ran does not
    return: it leaves through :func:`_leave_finished`, or after a stop (a signal, :mod:`rudder.runtime.stop`)
    every rank leaves together through :func:`rudder.runtime.stop.exit_now`."""
    slurm_pmi_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    relay = StopRelay(comm, f"rank {rank}")  # first: a signal from here on stops the job in order
    supervised = TAG_VAR in os.environ  # started by launch(), which cleans up after the job
    if os.environ.get(SUPERVISOR_VAR):
        _end_with_supervisor(os.environ[SUPERVISOR_VAR])
    hosts = comm.allgather(socket.gethostname())
    try:
        cfg.validate()
        roles, one_host = assign_roles(hosts, cfg.parts, cfg.trainers_per_part)
    except ValueError as exc:
        if rank == 0:
            say(f"rudder: error: {exc}", err=True)
        return 2
    role = roles[rank]
    relay.describe = role.describe()
    job, error = None, None
    if rank == 0:
        try:
            # under launch() the supervisor has just checked the partitions' checksums: sizes suffice here
            job = prepare_job(
                cfg, roles, one_host, os.environ.get(TAG_VAR) or f"rd{secrets.token_hex(3)}", checksums=not supervised
            )
        except Exception as exc:  # noqa: BLE001 - every rank waits for rank 0: it must always hear back
            error = (
                str(exc)
                if isinstance(exc, (PartitionError, ValueError, OSError, RuntimeError))
                else f"{type(exc).__name__}: {exc}"
            )
        relay.install()  # GKlib's gk_sigthrow (METIS, in libdgl.so) was found on SIGTERM after partitioning
    _wait(comm)
    job, error = comm.bcast((job, error), root=0)
    if error is not None:
        if rank == 0:
            say(f"rudder: error: {error}", err=True)
        return 2
    cfg.port = job.port  # rank 0 may have picked it
    if rank == 0:
        say(shape_line(cfg, job.meta, hosts=len(set(hosts))))
    _status(job, role, "started")
    t0 = time.perf_counter()
    shm: list[str] = []
    try:
        if job.one_host:
            onehost.apply(role.machine, tag=job.tag)
        keep_dgl_handler_out()
        if role.kind == "trainer":
            result = _run_trainer(cfg, role, job, relay)
        else:
            _run_server(cfg, role, job)
            shm = shm_mapped()  # the partition's segments, while still mapped: removed at a stopped exit
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down at once
        message = f"{type(exc).__name__}: {exc}"
        details = traceback.format_exc()
        # under the launcher the traceback travels in the status file, which it copies into the job's log: what a
        # rank prints reaches the log through MPI's proxies, and the abort below can end them before they pass it on
        _status(job, role, "failed", error=message, details=details)
        if not supervised:
            print(f"rudder: {role.describe()} failed: {message}\n{details}", file=sys.stderr, flush=True)
        comm.Abort(1)
        return 1
    if role.kind == "trainer":
        _wait(comm, comm.isend(result, dest=0, tag=RESULT_TAG))
    if rank == 0:
        results = []
        for r in (r.rank for r in roles if r.kind == "trainer"):
            while not comm.iprobe(source=r, tag=RESULT_TAG):
                time.sleep(0.01)
            results.append(comm.recv(source=r, tag=RESULT_TAG))
        summary = build_summary(cfg, job, results, wall_s=time.perf_counter() - t0)
        if cfg.summary:
            write_summary(summary, cfg.summary)
        say(format_table(summary), err=False)
        stopped = summary.get("stopped")
        if stopped:
            say(
                f"rudder: stopped by {stopped['signal']} after {stopped['after_minibatches']} of "
                f"{stopped['of_minibatches']} minibatches per trainer"
                + (f", {time.monotonic() - relay.requested_at:.1f} s after it" if relay.requested_at else "")
                + (f"; trace {cfg.trace} finalised incomplete" if cfg.trace else "")
                + (f"; summary {cfg.summary} marked partial" if cfg.summary else ""),
                err=True,
            )
    # every rank must take the same way out: agree whether any of them learnt of a stop
    import numpy as np

    mine, anyone = np.array([int(relay.requested)], dtype=np.int32), np.zeros(1, dtype=np.int32)
    _wait(comm, comm.Iallreduce(mine, anyone, op=MPI.MAX))
    relay.close()
    trace_error = result.get("trace_error") if role.kind == "trainer" else None
    _status(job, role, "stopped" if anyone[0] else "done", **({"trace_error": trace_error} if trace_error else {}))
    LEAVING.set()  # from here the rank leaves on its own: the supervisor watch does not cut its exit short
    _wait(comm)
    if rank == 0 and not supervised:  # started by the user's mpiexec/srun: nobody else cleans up
        shutil.rmtree(job.job_dir, ignore_errors=True)
    if anyone[0]:  # leave without MPI_Finalize (see rudder.runtime.stop), removing our shared memory
        release_claims()  # os._exit skips atexit, which would remove the port lock
        exit_now(0, shm)
    _leave_finished(MPI, shm)


def _leave_finished(MPI, shm: list[str]) -> None:
    """End a rank whose job finished in order, as a normal exit would but without the interpreter's teardown:
    run the ``atexit`` handlers (DGL's, logging's, multiprocessing's), ``MPI_Finalize`` (every rank of the job
    gets here), then :func:`~rudder.runtime.stop.exit_now`, which unlinks the ``/dev/shm`` segments the process
    maps (what DGL's destructors would unlink: the job is over) and calls ``os._exit(0)``. The teardown skipped
    frees the thousands of modules and objects of torch and DGL one by one: seconds of CPU per rank at the end of
    every job (BENCHMARKS.md, suite time)."""
    import atexit

    atexit._run_exitfuncs()  # what sys.exit runs first; the module has no public way to run them
    if not MPI.Is_finalized():
        MPI.Finalize()
    exit_now(0, shm)
