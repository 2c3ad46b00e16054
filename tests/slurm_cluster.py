"""A real Slurm (Debian's slurm-wlm 22.05 + munge) on the emulated hosts of :mod:`rudder.testbed.cluster`, for
tests: one ``slurmctld`` in the root namespace (listening on the cluster's bridge address), one ``slurmd`` inside
each emulated host (its own hostname, address, ``/dev/shm``), ``munged`` for authentication.

Two partitions: ``one`` (the first host: single-node jobs) and ``two`` (both hosts). Jobs run as root with the
environment of the test (``SLURM_CONF`` points at this cluster's configuration). Everything lives in one folder
(configuration, state, logs: ``slurmd`` paths carry ``%n``, the node name) and goes at :meth:`SlurmCluster.down`.

:func:`slurm_missing` says why Slurm cannot run here (not root, no namespaces, packages absent and not
installable); :func:`ensure_installed` installs ``slurm-wlm`` and ``munge`` with apt when they are absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from rudder.testbed.cluster import ClusterError, EmulatedCluster, preflight

# Every daemon of the test cluster runs with the machine's own Slurm configuration folder hidden under an empty
# tmpfs: on a machine that is itself a Slurm node (an /etc/slurm/slurm.conf), a part of Slurm that falls back to the
# default configuration file would take the machine's (nodes of another cluster: srun's signal forwarding failed
# with "fwd_tree_thread: can't find address for host rd-...-h0, check slurm.conf"). Clients get SLURM_CONF (they
# were checked to read only it); the daemons get -f and SLURM_CONF, and cannot see the default if anything asks.
HIDE_SYSTEM_CONF = 'if [ -d "$0" ]; then mount -t tmpfs -o size=1m,mode=755 rudder-no-slurm-conf "$0"; fi; exec "$@"'
SYSTEM_CONF_DIR = "/etc/slurm"

DAEMONS = ("slurmctld", "slurmd", "munged", "srun", "sbatch", "scancel", "squeue", "scontrol", "sacct")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def ensure_installed() -> str | None:
    """Install Debian's ``slurm-wlm`` and ``munge`` if a daemon or client is missing (quietly, tolerating
    failure); returns None when all are there, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"],
        ["sh", "-c", "apt-get update -q && apt-get install -y -q slurm-wlm munge"],
    ):
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if not missing:
            return None
    return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get could not install slurm-wlm munge"


def slurm_missing() -> str | None:
    """Why a Slurm cluster on emulated hosts cannot run here, or None."""
    try:
        preflight()  # root, namespaces, ip/tc/nsenter
    except ClusterError as exc:
        return f"no emulated hosts here: {exc}"
    return ensure_installed()


class SlurmCluster:
    """Slurm on ``hosts`` emulated hosts (``with SlurmCluster(2, workdir) as s: s.srun(...)``).

    ``workdir`` holds ``slurm.conf``, the controller's state and every daemon's log. ``env`` is the environment
    for Slurm commands (``SLURM_CONF`` set). Each node declares ``cpus`` CPUs (``SlurmdParameters=config_overrides``:
    the hosts share this machine's cores, so the node's real count is not checked).
    """

    def __init__(self, hosts: int, workdir: str | os.PathLike, cpus: int = 4, kill_wait_s: int = 30):
        self.workdir = Path(workdir)
        self.cluster = EmulatedCluster(hosts)
        self.cpus = cpus
        self.kill_wait_s = kill_wait_s
        self.conf = self.workdir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._ctld: subprocess.Popen | None = None
        self._munged_pid: int | None = None

    # -- life cycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def nodes(self) -> list[str]:
        return self.cluster.hostnames

    def up(self) -> None:
        self.cluster.up()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        self._start_munge()
        self.conf.write_text(self._slurm_conf())
        for node in self.nodes:
            (self.workdir / f"spool-{node}").mkdir(exist_ok=True)
        # slurmd loads a cgroup plugin whatever the proctrack and task plugins: cgroup v1 here (no controller used)
        (self.workdir / "cgroup.conf").write_text("CgroupPlugin=autodetect\nCgroupAutomount=no\n")
        hide = ["sh", "-c", HIDE_SYSTEM_CONF, SYSTEM_CONF_DIR]
        self._ctld = subprocess.Popen(  # a mount namespace of its own: the tmpfs hides /etc/slurm from it alone
            ["unshare", "--mount", "--propagation", "private", *hide, "slurmctld", "-D", "-i", "-f", str(self.conf)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for i in range(len(self.nodes)):
            self.cluster.run(  # in the host's own mount namespace: its processes (steps, tasks) see the tmpfs
                i,
                [*hide, "slurmd", "-D", "-f", str(self.conf)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_idle(60)

    def down(self) -> None:
        """Cancel jobs, stop the daemons (slurmd with the hosts), tear the hosts down; the work folder stays
        (the logs) until the test's tmp folder goes."""
        if self._ctld is not None and self._ctld.poll() is None:
            try:
                subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self._ctld.terminate()
            try:
                self._ctld.wait(10)
            except subprocess.TimeoutExpired:
                self._ctld.kill()
                self._ctld.wait(5)
        self._ctld = None
        try:
            self.cluster.down()  # kills every process in the hosts: slurmd, slurmstepd, tasks
        finally:
            self._stop_munge()

    def _stop_munge(self) -> None:
        if self._munged_pid is not None:
            try:
                os.kill(self._munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._munged_pid = None

    def _start_munge(self) -> None:
        """Use the running munged, or start one (as root it needs ``--force``)."""
        if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--force"], capture_output=True, check=True)
        pidfile = self.workdir / "munged.pid"
        subprocess.run(["munged", "--force", f"--pid-file={pidfile}"], capture_output=True, check=True, timeout=20)
        deadline = time.monotonic() + 10
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not start")
            time.sleep(0.1)
        self._munged_pid = int(pidfile.read_text().split()[0])

    def _slurm_conf(self) -> str:
        w = self.workdir
        nodes = "\n".join(
            f"NodeName={h} NodeAddr={a} CPUs={self.cpus} RealMemory=2000 Features=cpu State=UNKNOWN"
            for h, a in zip(self.nodes, self.cluster.addresses)
        )
        return f"""# written by tests/slurm_cluster.py
ClusterName=rudder
SlurmctldHost={socket.gethostname()}({self.cluster.bridge_address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool-%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait={self.kill_wait_s}
OverTimeLimit=0
InactiveLimit=0
MinJobAge=600
MessageTimeout=20
SlurmdTimeout=60
{nodes}
PartitionName=one Nodes={self.nodes[0]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=two Nodes={",".join(self.nodes)} MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            out = proc.stdout + proc.stderr
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        logs = "; ".join(f"{p.name}: {p.read_text().strip().splitlines()[-1:]}" for p in self.workdir.glob("*.log"))
        raise RuntimeError(f"Slurm nodes not idle in {timeout_s} s: {out.strip()!r}; {logs}")

    # -- using it ------------------------------------------------------------------------------------------------

    def command(self, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (``sbatch``, ``scancel``, ``scontrol`` ...) run here, with this cluster's
        configuration and ``env`` added."""
        return subprocess.run(
            argv, env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=60, **kwargs
        )

    def popen(self, argv: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` (e.g. ``srun ...``) here with this cluster's configuration and ``env`` added."""
        kwargs = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), **kwargs)
        return subprocess.Popen(argv, env=dict(self.env, **(env or {})), start_new_session=True, **kwargs)

    def job_state(self, job_id: str) -> str:
        """The job's state as ``scontrol`` sees it (``RUNNING``, ``COMPLETED``, ``TIMEOUT``, ``CANCELLED`` ...)."""
        out = self.command(["scontrol", "show", "job", job_id]).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job has ended; returns its final state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
                if not self.job_processes():
                    return state
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still {self.job_state(job_id)} after {timeout_s} s")

    def job_processes(self) -> list[str]:
        """Processes of jobs still running in the hosts (slurmstepd and tasks): ``"pid cmdline"`` each."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("slurmstepd") or (
                "train.py" in cmd and "gnn" in cmd and str(self.conf) not in cmd and self._in_hosts(pid)
            ):
                out.append(f"{pid} {cmd.strip()}")
        return out

    def _in_hosts(self, pid: str) -> bool:
        try:
            net = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return False
        return net in {os.stat(f"/run/netns/{h}").st_ino for h in self.nodes}

    def shm(self) -> dict[str, list[str]]:
        """What each host's ``/dev/shm`` holds."""
        out = {}
        for i, h in enumerate(self.nodes):
            proc = subprocess.run(self.cluster.command(i, ["ls", "-A", "/dev/shm"]), capture_output=True, text=True)
            out[h] = proc.stdout.split()
        return out

    def system_conf_seen(self) -> dict[str, list[str]]:
        """What each daemon sees of the machine's Slurm configuration folder (empty lists: hidden)."""
        seen = {}
        pids = {"slurmctld": self._ctld.pid if self._ctld else None}
        for i, node in enumerate(self.nodes):
            pids[f"slurmd on {node}"] = self.cluster._holder(i)  # the host's mount namespace, slurmd's too
        for what, pid in pids.items():
            try:
                seen[what] = sorted(os.listdir(f"/proc/{pid}/root{SYSTEM_CONF_DIR}"))
            except OSError:
                seen[what] = []
        return seen

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text() if path.exists() else ""
