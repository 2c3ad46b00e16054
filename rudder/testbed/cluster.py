"""An emulated cluster on one machine: N hosts with their own network, hostname, /dev/shm and /etc/hosts.

Why: jobs that span several hosts (DistDGL's multi-host mode under MPI) need hosts with a network between them, and
on one machine every "remote" fetch otherwise goes over loopback, where it costs CPU, not wire time. This module
brings up N emulated hosts on this machine (root only) so that a real ``mpiexec`` job runs across them.

Each emulated host is
  * a network namespace ``rd-<name>-h<i>`` holding one interface ``eth0`` with address ``198.18.<k>.<11+i>/24``,
    whose veth peer ``rd-<name>-v<i>`` sits on the bridge ``rd-<name>-br`` in the root namespace; the bridge has
    ``198.18.<k>.1`` (MPICH hydra's ``mpiexec`` runs in the root namespace and listens for its proxies there).
    Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking), one /24 per cluster. A host has no default route:
    it reaches its loopback, the other hosts of its cluster and the bridge address, nothing else;
  * a UTS namespace with hostname ``rd-<name>-h<i>``, a mount namespace (private propagation) with its own tmpfs
    on ``/dev/shm`` and an ``/etc/hosts`` (bind mount) naming every host of the cluster, and an IPC namespace.
    These are created once per host by a long-lived holder process (``sleep infinity``); every command on the
    host enters the holder's namespaces (``nsenter -t HOLDER --net --uts --mount --ipc``), so all processes of
    one host (a graph server and its trainers) share one /dev/shm.

Links: each host's egress (``eth0``) goes through a token bucket (``tc ... tbf``) at ``link_rate``; traffic a host
receives is not limited separately, so a host fed by k peers at once can receive up to k times the rate (a switch
with a full-rate port per host, not a shared medium). The kernel here has no ``netem``: no per-packet delay, loss
or jitter can be added, so the round trip stays that of a veth (tens of microseconds). ``set_rate``, ``link_down``
and ``link_up`` change a host's link while jobs run; ``kill_processes`` kills everything a host runs.

Not emulated: the hosts share this machine's CPUs, memory, file systems (like a cluster's shared file system; only
/dev/shm and /etc/hosts are per host) and process ids (no PID namespace: ``ps`` in a host lists every process).
Each host gets its own SysV IPC namespace and boot id, so that MPICH's UCX transport treats the hosts as separate
machines and sends between them over the network rather than through shared memory.

Use, as root::

    with EmulatedCluster(2, link_rate="500mbit") as c:
        subprocess.run(["mpiexec", *c.mpiexec_args(ranks_per_host=2), "-n", "4", "python", "job.py"])

or by hand::

    python -m rudder.testbed.cluster up --hosts 2 --link-rate 500mbit [--name NAME] [--ranks-per-host N]
    python -m rudder.testbed.cluster list
    python -m rudder.testbed.cluster exec rd-NAME-h0 -- hostname
    python -m rudder.testbed.cluster measure NAME
    python -m rudder.testbed.cluster down NAME | --all

Teardown: ``down()`` (also on leaving the ``with`` block) kills every process still inside the hosts' namespaces,
removes veths, bridge, namespaces (and with them each host's /dev/shm) and the run directory
``/run/rudder-cluster/<name>/`` (state, ``/etc/hosts`` file, ssh stand-in). The process that called ``up()`` owns
the cluster: an ``atexit`` hook tears down what it still owns when it exits, and while it owns a cluster SIGTERM
(if it had the default action) raises ``SystemExit`` so that ``with`` blocks and the hook run; SIGINT raises
``KeyboardInterrupt`` as usual. An owner killed outright (SIGKILL) leaves its cluster behind: ``cleanup_stale()``
(also run by ``up`` and ``list`` on the command line) removes every cluster whose owner is gone.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations only

RUN_ROOT = Path("/run/rudder-cluster")
NETNS_DIR = Path("/run/netns")
MAX_HOSTS = 99  # interface names: "rd-" + 8-char name + "-v" + 2 digits = 15 characters, the kernel's limit
HOST_IF = "eth0"
TOOLS = ("ip", "tc", "unshare", "nsenter", "mount", "hostname", "sleep", "bash")
_NAME_RE = re.compile(r"[a-z0-9]{1,8}")
_OWN_NAME_RE = re.compile(r"rd-([a-z0-9]{1,8})-(?:h\d+|v\d+|br)")
_SUBNETS = 512  # 198.18.0.0/15 in /24s
_TBF_LATENCY_MS = 100  # longest a packet may wait in the shaper before tbf drops it


class ClusterError(RuntimeError):
    """A cluster could not be brought up, used or torn down; the message is one line."""


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def parse_rate(rate: str) -> int:
    """``"500mbit"`` -> 500_000_000 (bits/s; units bit, kbit, mbit, gbit, tbit, decimal as in tc)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)bit\s*", str(rate).lower())
    if not m:
        raise ClusterError(f"bad link rate {rate!r}: give e.g. 100mbit, 500mbit, 1gbit")
    bits = int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)])
    if bits < 8_000:
        raise ClusterError(f"link rate {rate!r} is below 8kbit")
    return bits


def tbf_args(bits: int) -> list[str]:
    """tc arguments for a token bucket at ``bits``/s.

    The bucket holds 4 ms of traffic and at least 64 KiB, one full-size GSO packet (tbf splits packets larger
    than its bucket). tbf counts Ethernet, IP and TCP headers: with a 1500-byte MTU one TCP stream carries about
    95.6% of the set rate as payload, whatever the bucket size.
    """
    return ["tbf", "rate", f"{bits}bit", "burst", str(_tbf_burst(bits)), "latency", f"{_TBF_LATENCY_MS}ms"]


def _tbf_burst(bits: int) -> int:
    return max(65536, bits // 8 * 4 // 1000)


def _tbf_queue_bytes(bits: int) -> int:
    """The bytes :func:`tbf_args`' tbf queues at ``bits``/s: its latency's worth of the rate plus its bucket, as tc
    computes its limit."""
    return bits // 8 * _TBF_LATENCY_MS // 1000 + _tbf_burst(bits)


def _cmd(argv: list[str], check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as e:
        raise ClusterError(f"{argv[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"`{shlex.join(argv)}` timed out") from e
    if check and res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise ClusterError(f"`{shlex.join(argv)}` failed: {why}")
    return res


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a process from a later one with its pid); None when
    there is no such process or it has exited (a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    st = _start_time(pid)
    return st is not None and (start is None or st == start)


def _netns_names() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except OSError:
        return []


def _link_names() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises name and subnet allocation and stale-cluster removal between processes."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state(name: str) -> dict | None:
    try:
        return json.loads((RUN_ROOT / name / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict) -> None:
    d = RUN_ROOT / state["name"]
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, d / "state.json")


def _names(name: str, hosts: int) -> tuple[list[str], list[str], str]:
    return [f"rd-{name}-h{i}" for i in range(hosts)], [f"rd-{name}-v{i}" for i in range(hosts)], f"rd-{name}-br"


def _subnet(k: int) -> str:
    return f"198.{18 + k // 256}.{k % 256}"


# ---------------------------------------------------------------------------------------------------------------
# preflight, teardown, stale clusters


def preflight() -> None:
    """Raise ClusterError (one line) unless this process can build a cluster: root, the tools, namespaces, links."""
    if os.geteuid() != 0:
        raise ClusterError("the emulated cluster needs root (network namespaces, veth links, tc)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ClusterError(f"the emulated cluster needs {', '.join(missing)} (not found on PATH)")
    probe = (
        "ip link add rdpfa type veth peer name rdpfb && ip link add rdpfbr type bridge && "
        f"tc qdisc add dev rdpfa root {' '.join(tbf_args(10**8))}"
    )
    try:
        res = subprocess.run(
            ["unshare", "--net", "--uts", "--mount", "--ipc", "--propagation", "private", "sh", "-c", probe],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ClusterError("cannot create namespaces: the probe timed out") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise ClusterError(f"cannot create namespaces, veth links or tbf here: {why}")


def _members(net_inodes: set[int], mnt_inodes: set[int]) -> list[int]:
    """Pids of processes inside the given network or mount namespaces."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        pid = int(d)
        if _ns_inode(pid, "net") in net_inodes or (mnt_inodes and _ns_inode(pid, "mnt") in mnt_inodes):
            out.append(pid)
    return out


def _signal_member(pid: int, sig: int, net_inodes: set[int], mnt_inodes: set[int]) -> bool:
    """Send ``sig`` to ``pid`` only if it is still inside one of the namespaces: through a pidfd, the namespace
    checked after taking it. Pids wrap (every thread takes one; ``pid_max`` may be 32768), so the pid of a member
    that exited since :func:`_members` listed it may already name a process of another job, outside the cluster.
    Returns whether it was signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        inside = _ns_inode(pid, "net") in net_inodes or bool(mnt_inodes and _ns_inode(pid, "mnt") in mnt_inodes)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not inside or poller.poll(0):  # another process's pid now, or the member has exited: leave it
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _kill_members(net_inodes: set[int], mnt_inodes: set[int], reap: list[subprocess.Popen]) -> None:
    """SIGTERM everything inside the namespaces, SIGKILL what is left after a second, until none is left."""
    grace_end = time.monotonic() + 1.0
    hard_end = time.monotonic() + 10.0
    sig = signal.SIGTERM
    signalled: set[int] = set()
    while True:
        for p in reap:
            p.poll()
        pids = _members(net_inodes, mnt_inodes)
        if not pids or time.monotonic() > hard_end:
            return
        if sig == signal.SIGTERM and time.monotonic() > grace_end:
            sig = signal.SIGKILL
            signalled.clear()
        for pid in pids:
            if pid not in signalled or sig == signal.SIGKILL:
                _signal_member(pid, sig, net_inodes, mnt_inodes)
                signalled.add(pid)
        time.sleep(0.02)


def _leftovers(name: str) -> list[str]:
    own = re.compile(rf"rd-{re.escape(name)}-(?:h\d+|v\d+|br)")
    left = [f"netns {n}" for n in _netns_names() if own.fullmatch(n)]
    left += [f"link {n}" for n in _link_names() if own.fullmatch(n)]
    if (RUN_ROOT / name).exists():
        left.append(f"dir {RUN_ROOT / name}")
    left += [f"cgroup {g}" for g in _cpu_groups(name)]
    return left


def _teardown(name: str, state: dict | None, reap: list[subprocess.Popen] = ()) -> None:
    """Remove everything of cluster ``name`` that exists, whatever state it is in; ClusterError if some is left."""
    if not _NAME_RE.fullmatch(name):
        raise ClusterError(f"bad cluster name {name!r}: 1-8 characters a-z, 0-9")
    own = re.compile(rf"rd-{re.escape(name)}-(?:h\d+|v\d+|br)")
    netns = [n for n in _netns_names() if own.fullmatch(n)]
    # Namespaces are told by inode number, and the kernel gives a freed namespace's number to the next one made:
    # an open descriptor keeps each namespace (and its number) alive until every process in it is gone, so that
    # processes of a cluster coming up meanwhile are never taken for this one's.
    fds: list[int] = []

    def hold(path: str | Path) -> int | None:
        with contextlib.suppress(OSError):
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            return os.fstat(fds[-1]).st_ino
        return None

    try:
        net_inodes = {hold(NETNS_DIR / n) for n in netns}
        mnt_inodes = set()
        for h in (state or {}).get("holders", []):
            net, mnt = hold(f"/proc/{h['pid']}/ns/net"), hold(f"/proc/{h['pid']}/ns/mnt")
            if net == h["netns_inode"] and _alive(h["pid"], h["start"]):  # still that holder, in its namespace
                net_inodes.add(net)
                mnt_inodes.add(mnt)
        mnt_inodes -= {None, _ns_inode(os.getpid(), "mnt"), _ns_inode(1, "mnt")}
        net_inodes -= {None, _ns_inode(os.getpid(), "net"), _ns_inode(1, "net")}
        _kill_members(net_inodes, mnt_inodes, list(reap))
    finally:
        for fd in fds:
            os.close(fd)
    for group in _cpu_groups(name):  # its processes are gone: the group can go
        with contextlib.suppress(OSError):
            group.rmdir()
    for link in _link_names():
        if own.fullmatch(link) and not link.endswith("-br"):
            _cmd(["ip", "link", "del", link], check=False)
    for link in _link_names():
        if own.fullmatch(link):
            _cmd(["ip", "link", "del", link], check=False)
    for n in netns:
        _cmd(["ip", "netns", "del", n], check=False)
    shutil.rmtree(RUN_ROOT / name, ignore_errors=True)
    left = _leftovers(name)
    if left:
        raise ClusterError(f"cluster {name}: could not remove {', '.join(left)}")


def _owner_alive(state: dict) -> bool:
    return _alive(state["owner_pid"], state.get("owner_start"))


USERS_DIR = "users"  # in a cluster's run dir: one file per process using the cluster (a job attached to it)


def _users(name: str) -> list[dict]:
    """The live processes using cluster ``name`` (jobs attached to it), each ``{"pid", "start", "what"}``; files of
    users that are gone are removed."""
    out = []
    for path in sorted((RUN_ROOT / name / USERS_DIR).glob("*.json")):
        try:
            user = json.loads(path.read_text())
            live = _alive(int(user["pid"]), user.get("start"))
        except (OSError, ValueError, KeyError, TypeError):
            live = False
            user = None
        if live:
            out.append(user)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


def _in_use(name: str) -> str | None:
    """Why cluster ``name`` must not be torn down now (a job uses it), or None."""
    users = _users(name)
    if not users:
        return None
    return ", ".join(f"{u.get('what') or 'a process'} (pid {u['pid']})" for u in users)


def cleanup_stale() -> list[str]:
    """Tear down every cluster whose owning process is gone (and stray rd-* links/namespaces with no run dir).

    Returns the names removed.
    """
    removed, errors = [], []
    with _global_lock():
        live = set()
        stale: list[tuple[str, dict | None]] = []
        for d in sorted(RUN_ROOT.iterdir()):
            if d.is_dir() and _NAME_RE.fullmatch(d.name):
                state = _read_state(d.name)
                if state is not None and (_owner_alive(state) or _in_use(d.name)):
                    live.add(d.name)  # an orphan a job still runs on stays until that job is done
                else:
                    stale.append((d.name, state))
        strays = set()
        for n in _netns_names() + _link_names():
            m = _OWN_NAME_RE.fullmatch(n)
            if m and m.group(1) not in live and not (RUN_ROOT / m.group(1)).exists():
                strays.add(m.group(1))
        stale += [(name, None) for name in sorted(strays)]
        for name, state in stale:
            try:
                _teardown(name, state)
                removed.append(name)
            except ClusterError as e:
                errors.append(str(e))
    if errors:
        raise ClusterError("; ".join(errors))
    return removed


def list_clusters() -> list[dict]:
    """The state of every cluster with a run dir, each with ``alive`` (its owner runs)."""
    out = []
    if not RUN_ROOT.is_dir():
        return out
    for d in sorted(RUN_ROOT.iterdir()):
        if d.is_dir() and _NAME_RE.fullmatch(d.name):
            state = _read_state(d.name)
            if state is not None:
                out.append(dict(state, alive=_owner_alive(state), users=_users(d.name)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# owner bookkeeping: atexit and SIGTERM

_owned: list[EmulatedCluster] = []
_owned_lock = threading.Lock()
_prev_sigterm: object = None
_atexit_registered = False


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


def _down_all_owned() -> None:
    for c in _owned.copy():  # down() removes c from _owned
        if c._owner_pid != os.getpid():  # a forked child exiting: the cluster is its parent's
            continue
        try:
            c.down()
        except Exception as e:  # noqa: BLE001 - at exit: report, carry on with the others
            print(f"rudder: warning: {e}", file=sys.stderr)


def _register(c: EmulatedCluster) -> None:
    global _prev_sigterm, _atexit_registered
    with _owned_lock:
        if not _atexit_registered:
            atexit.register(_down_all_owned)
            _atexit_registered = True
        if (
            not _owned
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _sigterm_to_exit)
            _prev_sigterm = signal.SIG_DFL
        _owned.append(c)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (main thread only) and deliver them afterwards: a teardown is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        for signum in got:
            signal.raise_signal(signum)


def _unregister(c: EmulatedCluster) -> None:
    global _prev_sigterm
    with _owned_lock:
        if c in _owned:
            _owned.remove(c)
        if not _owned and _prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _sigterm_to_exit:
                signal.signal(signal.SIGTERM, _prev_sigterm)
            _prev_sigterm = None


# ---------------------------------------------------------------------------------------------------------------
# the cluster

_HOLDER = (
    # inside the host's new UTS, mount and IPC namespaces: hostname, private /dev/shm, /etc/hosts, a boot id of its
    # own (UCX, MPICH's transport, takes one boot id for one machine and would pass messages through shared memory
    # and cross-memory attach between hosts); hide the netns bind mounts so that this mount namespace holds no
    # reference to other hosts' namespaces; report ready; wait
    'set -e; hostname "$1"; mount -t tmpfs -o mode=1777 rudder-shm /dev/shm; mount --bind "$2" /etc/hosts; '
    'mount --bind "$4" /proc/sys/kernel/random/boot_id; umount -l /run/netns 2>/dev/null || true; '
    'echo ready > "$3"; exec sleep infinity'
)

_SSH = """#!{bash}
# ssh stand-in for MPICH hydra (-launcher ssh -launcher-exec THIS), cluster {name}, generated by {module}.
# Called as: THIS [ssh options] HOST COMMAND...; runs the command (a shell string, as ssh does) inside HOST.
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -[bcDEeFIiJLlmOopQRSWw]) shift; [ $# -gt 0 ] && shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1; shift || true
case "$host" in
{cases}
  *) echo "rudder cluster {name}: no host '$host'" >&2; exit 255 ;;
esac
if [ "$(readlink /proc/$pid/ns/net 2>/dev/null)" != "net:[$ns]" ]; then
  echo "rudder cluster {name}: host $host is down" >&2; exit 255
fi
cg="{cpu_root}/$host"  # a CPU cap on the host (EmulatedCluster.cap_cpu): its processes start inside it
if [ -n "{cpu_root}" ] && [ -d "$cg" ]; then echo $$ > "$cg/cgroup.procs"; fi
exec {nsenter} -t "$pid" --net --uts --mount --ipc -- {bash} -c "cd -- $(printf %q "$PWD") 2>/dev/null || cd /; $*"
"""


def cpu_cgroup_root() -> str | None:
    """Where this machine's CPU controller lets a host's processes be capped: cgroup v1's ``cpu`` hierarchy, or
    the cgroup v2 root where it offers ``cpu`` to its children; None where neither is writable."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and os.access(v1, os.W_OK):
        return str(v1)
    v2 = Path("/sys/fs/cgroup")
    try:
        offered = (v2 / "cgroup.subtree_control").read_text().split()
    except OSError:
        return None
    return str(v2) if "cpu" in offered and os.access(v2, os.W_OK) else None


def _cpu_groups(name: str) -> list[Path]:
    root = cpu_cgroup_root()
    if root is None:
        return []
    own = re.compile(rf"rd-{re.escape(name)}-h\d+")
    return [p for p in Path(root).iterdir() if p.is_dir() and own.fullmatch(p.name)]


_RECEIVER = r"""
import socket, sys, time
addr, limit = sys.argv[1], float(sys.argv[2])
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(1); srv.settimeout(limit)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(limit)
buf = bytearray(1 << 20); n = 0; t0 = t1 = None; end = time.monotonic() + limit
while time.monotonic() < end:
    k = conn.recv_into(buf)
    if not k:
        break
    t1 = time.monotonic()
    if t0 is None:
        t0 = t1
    else:
        n += k
print(n, (t1 or 0) - (t0 or 0), flush=True)
"""

_SENDER = r"""
import socket, sys, time
addr, port, seconds, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((addr, port), timeout=10)
buf = memoryview(bytes(1 << 20)); sent = 0; end = time.monotonic() + seconds
while sent < cap and time.monotonic() < end:
    sent += s.send(buf)
s.close()
"""

# A co-tenant's competing flow: UDP datagrams to the sink at ADDR:PORT, paced here at the rate last given on stdin
# (bits/s, one number a line; 0 pauses it), until stdin closes. Sent at socket priority 6, which the host's shaper
# serves first (pfifo_fast under the tbf), so the flow takes its rate's worth of the link's tokens whatever the
# job's TCP streams do, as a co-tenant that holds its share would; the job gets the rest, behind the same shaper.
_COTENANT = r"""
import os, select, socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((addr, port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 6)  # the shaper's first band (EmulatedCluster.competing_flow)
size = 8192; buf = bytes(size); rate = 0.0; pending = b""; credit = 0.0; last = time.monotonic()
while True:
    r, _, _ = select.select([0], [], [], 0.002 if rate > 0 else None)
    if r:
        got = os.read(0, 4096)
        if not got:
            break
        *lines, pending = (pending + got).split(b"\n")
        if lines:
            rate = float(lines[-1]) / 8
    now = time.monotonic()
    credit = min(credit + rate * (now - last), 0.01 * rate + size) if rate > 0 else 0.0; last = now
    while credit >= size:
        try:
            s.send(buf)
        except OSError:
            pass
        credit -= size
"""

# The flow's sink: counts the bytes that arrive until its stdin closes, then prints them.
_COTENANT_SINK = r"""
import os, select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
n = 0
while True:
    r, _, _ = select.select([s, 0], [], [])
    if s in r:
        n += len(s.recv(65536))
    if 0 in r and not os.read(0, 4096):
        break
print(n, flush=True)
"""


class CompetingFlow:
    """Another job's bulk traffic from one emulated host to another (:meth:`EmulatedCluster.competing_flow`): UDP
    through the source host's shaped egress at the rate last set (0: idle), which it keeps whatever else sends."""

    def __init__(self, sender: subprocess.Popen, sink: subprocess.Popen, where: str, on_close=None):
        self.sender, self.sink, self.where, self.rate_bits, self._on_close = sender, sink, where, 0, on_close

    def set_rate(self, bits: float) -> None:
        """Send at ``bits``/s from now on (0: stop sending, keep the connection)."""
        bits = max(0, int(bits))
        if bits != self.rate_bits:
            try:
                self.sender.stdin.write(f"{bits}\n")
                self.sender.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise ClusterError(f"competing flow {self.where}: its sender is gone") from None
            self.rate_bits = bits

    def close(self, timeout: float = 10) -> int:
        """Stop the flow; the bytes its sink received."""
        for p in (self.sender, self.sink):
            try:
                p.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        try:
            self.sender.wait(timeout)
            self.sink.wait(timeout)
            out = self.sink.stdout.read()
        except subprocess.TimeoutExpired:
            for p in (self.sender, self.sink):
                p.kill()
                p.wait()
            out = ""
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None
        words = out.split()
        return int(words[0]) if words and words[0].isdigit() else 0


class EmulatedCluster:
    """N emulated hosts on this machine (see the module docstring); root only.

    ``hosts``: number of hosts (1..99); ``link_rate``: each host's egress rate as tc writes it ("500mbit",
    "1gbit"), None for unshaped veths; ``name``: 1-8 characters [a-z0-9] naming the cluster's namespaces, links
    and run dir (default: a fresh random one). ``name``, ``hostnames`` (also the network namespaces' names),
    ``addresses``, ``bridge``, ``bridge_address``, ``launcher_exec`` (the ssh stand-in for hydra) and ``run_dir``
    are final once ``up()`` returns (addresses are allocated there).
    """

    def __init__(self, hosts: int, link_rate: str | None = None, name: str | None = None):
        if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ClusterError(f"hosts must be 1..{MAX_HOSTS}, not {hosts!r}")
        if name is not None and not _NAME_RE.fullmatch(name):
            raise ClusterError(f"bad cluster name {name!r}: 1-8 characters a-z, 0-9")
        self.link_rate = link_rate
        self._bits = parse_rate(link_rate) if link_rate is not None else None
        self._auto_name = name is None
        self.name = name or ("c" + secrets.token_hex(2))
        self.hostnames: list[str] = []
        self.addresses: list[str] = []
        self.bridge = ""
        self.bridge_address = ""
        self.launcher_exec = ""
        self.run_dir = RUN_ROOT / self.name
        self._hosts = hosts
        self._state: dict | None = None
        self._holders: list[subprocess.Popen] = []
        self._procs: list[subprocess.Popen] = []
        self._prio: set[int] = set()  # hosts whose shaper serves a co-tenant's flow first (competing_flow)
        self._use: Path | None = None  # this process's hold on the cluster (attach(use=...))
        self.adopted = False  # attach(adopt=True) took over a cluster whose owner was gone
        self._owner_pid = os.getpid()
        self._set_names(self.name, hosts, None)

    def _set_names(self, name: str, hosts: int, subnet: int | None) -> None:
        self.hostnames, self._veths, self.bridge = _names(name, hosts)
        if subnet is not None:
            net = _subnet(subnet)
            self.bridge_address = f"{net}.1"
            self.addresses = [f"{net}.{11 + i}" for i in range(hosts)]
        self.launcher_exec = str(RUN_ROOT / name / "ssh")

    # -- life cycle --------------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, name: str, use: str | None = None, adopt: bool = False, orphan_ok: bool = False) -> Self:
        """The cluster ``name`` brought up by another process (e.g. the CLI's ``up``); this one does not own it,
        so nothing is torn down at exit, but ``down()`` still removes it.

        ``use`` (e.g. ``"job rd3f2a1"``): hold the cluster for this process until :meth:`release` or its exit:
        ``list``, ``down`` and ``up`` (their stale-cluster sweep) leave a cluster in use alone, even once its owner
        is gone. A cluster whose owner is gone (its ``up`` process killed outright) is refused, in one line that
        says so, unless ``adopt``: this process then owns it and tears it down when it exits (``orphan_ok``: a
        look inside it, as ``exec`` and ``measure`` take, neither refused nor adopted)."""
        with _global_lock():  # against a sweep between the check and the hold
            state = _read_state(name) if _NAME_RE.fullmatch(name) else None
            if state is None or not state.get("holders"):
                raise ClusterError(f"no cluster {name!r} is up")
            orphan = not _owner_alive(state) and not orphan_ok
            if orphan and not adopt:
                raise ClusterError(
                    f"cluster {name}'s owner (pid {state['owner_pid']}) is gone: it would be torn down by the next "
                    f"`list` or `up`; pass --adopt-cluster to run on it (this job then owns it and tears it down at "
                    f"its end), or `down {name}`"
                )
            c = cls(state["hosts"], state["link_rate"], name)
            c._state = state
            c._set_names(name, state["hosts"], state["subnet"])
            if orphan:  # adopted: this process owns it now
                c.adopted = True
                state.update(owner_pid=os.getpid(), owner_start=_start_time(os.getpid()), owner_cli=False)
                _write_state(state)
                c._owner_pid = os.getpid()
                _register(c)
            if use is not None:
                users = RUN_ROOT / name / USERS_DIR
                users.mkdir(exist_ok=True)
                c._use = users / f"{os.getpid()}.json"
                me = dict(pid=os.getpid(), start=_start_time(os.getpid()), what=use)
                c._use.write_text(json.dumps(me))
        return c

    def release(self) -> None:
        """Stop holding the cluster (see :meth:`attach`); safe to repeat."""
        use, self._use = self._use, None
        if use is not None:
            with contextlib.suppress(OSError):
                use.unlink()

    def up(self) -> Self:
        """Create namespaces, bridge, veths, shapers, holders and the ssh stand-in; on any failure tear down what
        was made and raise ClusterError."""
        if self._state is not None:
            raise ClusterError(f"cluster {self.name} is already up")
        preflight()
        with _global_lock():
            while self._auto_name and ((RUN_ROOT / self.name).exists() or _leftovers(self.name)):
                self.name = "c" + secrets.token_hex(2)
                self.run_dir = RUN_ROOT / self.name
            if (RUN_ROOT / self.name).exists() or _leftovers(self.name):
                raise ClusterError(f"a cluster named {self.name} exists (`down {self.name}` or cleanup_stale())")
            used = {s["subnet"] for s in list_clusters()}
            addrs = _cmd(["ip", "-4", "-o", "addr", "show"]).stdout
            used |= {k for k in range(_SUBNETS) if f" {_subnet(k)}." in addrs}
            free = [k for k in range(_SUBNETS) if k not in used]
            if not free:
                raise ClusterError("no free /24 left in 198.18.0.0/15")
            self._set_names(self.name, self._hosts, free[0])
            self.run_dir.mkdir(mode=0o755)
            self._state = {
                "name": self.name,
                "hosts": self._hosts,
                "link_rate": self.link_rate,
                "subnet": free[0],
                "owner_pid": os.getpid(),
                "owner_start": _start_time(os.getpid()),
                "owner_cli": False,
                "holders": [],
                "created": time.time(),
            }
            _write_state(self._state)
        self._owner_pid = os.getpid()
        _register(self)
        try:
            self._build()
        except BaseException as e:
            try:
                self.down()
            except ClusterError as e2:
                print(f"rudder: warning: {e2}", file=sys.stderr)
            if isinstance(e, ClusterError) or not isinstance(e, Exception):
                raise
            raise ClusterError(f"cluster {self.name}: {e}") from e
        return self

    def _build(self) -> None:
        hosts_file = self.run_dir / "hosts"
        lines = ["127.0.0.1\tlocalhost", f"{self.bridge_address}\trd-{self.name}-root"]
        lines += [f"{a}\t{h}" for a, h in zip(self.addresses, self.hostnames)]
        hosts_file.write_text("\n".join(lines) + "\n")
        hosts_file.chmod(0o644)

        _cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
        _cmd(["ip", "link", "set", self.bridge, "addrgenmode", "none"], check=False)
        _cmd(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _cmd(["ip", "link", "set", self.bridge, "up"])
        for ns, veth, addr in zip(self.hostnames, self._veths, self.addresses):
            _cmd(["ip", "netns", "add", ns])
            _cmd(["ip", "link", "add", veth, "type", "veth", "peer", "name", HOST_IF, "netns", ns])
            _cmd(["ip", "link", "set", veth, "addrgenmode", "none"], check=False)
            _cmd(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _cmd(["ip", "-n", ns, "link", "set", HOST_IF, "addrgenmode", "none"], check=False)
            _cmd(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", HOST_IF])
            _cmd(["ip", "-n", ns, "link", "set", HOST_IF, "up"])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self._bits is not None:
                _cmd(["tc", "-n", ns, "qdisc", "replace", "dev", HOST_IF, "root", *tbf_args(self._bits)])

        holders = []
        for i, ns in enumerate(self.hostnames):
            ready = self.run_dir / f"holder{i}.ready"
            boot_id = self.run_dir / f"boot_id{i}"
            boot_id.write_text(str(uuid.uuid4()) + "\n")
            with open(self.run_dir / f"holder{i}.log", "w") as log:
                p = subprocess.Popen(
                    [
                        "nsenter",
                        f"--net={NETNS_DIR / ns}",
                        "--",
                        "unshare",
                        "--uts",
                        "--mount",
                        "--ipc",
                        "--propagation",
                        "private",
                        "--",
                        "sh",
                        "-c",
                        _HOLDER,
                        "holder",
                        ns,
                        str(hosts_file),
                        str(ready),
                        str(boot_id),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self._holders.append(p)
            holders.append((p, ready, os.stat(NETNS_DIR / ns).st_ino, i))
        deadline = time.monotonic() + 15
        for p, ready, ino, i in holders:
            while not ready.exists():
                if p.poll() is not None or time.monotonic() > deadline:
                    why = (self.run_dir / f"holder{i}.log").read_text().strip().splitlines()
                    raise ClusterError(f"host {self.hostnames[i]} did not come up: {why[-1] if why else 'timeout'}")
                time.sleep(0.01)
            self._state["holders"].append({"pid": p.pid, "start": _start_time(p.pid), "netns_inode": ino})
        _write_state(self._state)

        cases = "\n".join(
            f"  {h}) pid={s['pid']}; ns={s['netns_inode']} ;;" for h, s in zip(self.hostnames, self._state["holders"])
        )
        ssh = Path(self.launcher_exec)
        ssh.write_text(
            _SSH.format(
                bash=shutil.which("bash"),
                nsenter=shutil.which("nsenter"),
                name=self.name,
                module="rudder.testbed.cluster",
                cases=cases,
                cpu_root=cpu_cgroup_root() or "",
            )
        )
        ssh.chmod(0o755)

    def down(self) -> None:
        """Tear everything down (processes in the hosts, veths, bridge, namespaces, run dir); safe to repeat.
        SIGINT and SIGTERM arriving meanwhile take effect once it is done."""
        self.release()
        try:
            with _deferred_signals():
                _teardown(self.name, self._state or _read_state(self.name), self._holders + self._procs)
        finally:
            for p in self._holders + self._procs:
                p.poll()
            self._holders, self._procs = [], []
            self._state = None
            _unregister(self)

    def __enter__(self) -> Self:
        return self.up() if self._state is None else self

    def __exit__(self, *exc) -> None:
        self.down()

    # -- using it ----------------------------------------------------------------------------------------------

    def _holder(self, host: int | str) -> int:
        if self._state is None:
            raise ClusterError(f"cluster {self.name} is not up")
        i = self._index(host)
        h = self._state["holders"][i]
        if not _alive(h["pid"], h["start"]) or _ns_inode(h["pid"], "net") != h["netns_inode"]:
            raise ClusterError(f"host {self.hostnames[i]} is down (its holder process is gone)")
        return h["pid"]

    def _index(self, host: int | str) -> int:
        if isinstance(host, int) and 0 <= host < len(self.hostnames):
            return host
        if host in self.hostnames:
            return self.hostnames.index(host)
        raise ClusterError(f"cluster {self.name} has no host {host!r}")

    def command(self, host: int | str, argv: list[str], cwd: str | None = None) -> list[str]:
        """The argv that runs ``argv`` inside ``host`` (its network, UTS, mount and IPC namespaces) in ``cwd``
        (default: this process's)."""
        return [
            "nsenter",
            "-t",
            str(self._holder(host)),
            "--net",
            "--uts",
            "--mount",
            "--ipc",
            "--",
            "sh",
            "-c",
            'cd -- "$0" && exec "$@"',
            cwd or os.getcwd(),
            *argv,
        ]

    def run(self, host: int | str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (index or host name); keyword arguments go to ``subprocess.Popen``
        (``cwd`` is applied inside the host). Whatever it still runs at ``down()`` is killed."""
        cwd = popen_kwargs.pop("cwd", None)
        p = subprocess.Popen(self.command(host, list(argv), str(cwd) if cwd else None), **popen_kwargs)
        self._procs.append(p)
        return p

    def mpiexec_args(self, ranks_per_host: int) -> list[str]:
        """Arguments for MPICH's ``mpiexec`` (hydra) placing ``ranks_per_host`` ranks on each host in order."""
        if self._state is None:
            raise ClusterError(f"cluster {self.name} is not up")
        hosts = ",".join(f"{h}:{ranks_per_host}" for h in self.hostnames)
        return ["-launcher", "ssh", "-launcher-exec", self.launcher_exec, "-hosts", hosts, "-iface", self.bridge]

    def cap_cpu(self, host: int | str, cores: float | None) -> None:
        """Let the processes started in ``host`` from now on (by :attr:`launcher_exec`, as ``mpiexec`` starts a
        job's ranks) use at most ``cores`` CPUs together (a cgroup of the CPU controller, CFS quota); None lifts
        the cap. A straggler host, live."""
        root = cpu_cgroup_root()
        if root is None:
            raise ClusterError(
                "no writable CPU cgroup controller here (cgroup v1 cpu, or v2 with cpu): cannot cap a host"
            )
        group = Path(root) / self.hostnames[self._index(host)]
        if cores is not None and not cores > 0:
            raise ClusterError(f"a CPU cap must be > 0 cores, got {cores}")
        try:
            group.mkdir(exist_ok=True)
            period = 100_000
            quota = -1 if cores is None else max(1000, int(cores * period))
            if (group / "cpu.cfs_quota_us").exists():
                (group / "cpu.cfs_period_us").write_text(str(period))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {period}")
        except OSError as exc:
            raise ClusterError(f"cannot cap {group.name}'s CPU in {root}: {exc.strerror}") from None

    def competing_flow(self, src: int | str, dst: int | str) -> CompetingFlow:
        """A co-tenant's traffic from ``src`` to ``dst`` (:class:`CompetingFlow`), idle until given a rate: a
        sender inside ``src`` and a sink inside ``dst`` (Python, standard library only), killed at ``down()`` if
        still running."""
        i, j = self._index(src), self._index(dst)
        if i == j:
            raise ClusterError("a competing flow needs two different hosts")
        py = [sys.executable, "-I", "-S", "-c"]
        where = f"{self.hostnames[i]} -> {self.hostnames[j]}"
        sink = self.run(
            j,
            py + [_COTENANT_SINK, self.addresses[j]],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.PIPE,
            text=True,
        )
        port = _read_line(sink.stdout, 10).strip()
        if not port.isdigit():
            sink.kill()
            sink.wait()
            raise ClusterError(f"competing flow {where}: its sink did not start")
        self._prioritise(i)
        sender = self.run(
            i,
            py + [_COTENANT, self.addresses[j], port],
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        return CompetingFlow(sender, sink, where, on_close=lambda: self._unprioritise(i))

    def _rate_of(self, i: int) -> str:
        """Host ``i``'s egress rate in force (tc text)."""
        rates = (self._state or {}).get("host_rates") or [self.link_rate] * len(self.hostnames)
        return rates[i] or self.link_rate

    def _shaper(self, i: int) -> str:
        """Host ``i``'s tbf handle (``8001:``)."""
        ns = self.hostnames[i]
        shown = _cmd(["tc", "-n", ns, "qdisc", "show", "dev", HOST_IF]).stdout
        m = re.search(r"qdisc tbf (\S+) root", shown)
        if not m:
            raise ClusterError(f"host {ns} has no shaped link (tbf) for a competing flow to share")
        return m.group(1)

    def _prioritise(self, i: int) -> None:
        """Host ``i``'s tbf serves socket priority 6 (a co-tenant's flow) first: pfifo_fast under it (its first
        band takes that priority, the second everything else), holding as many full-size packets as the tbf's own
        queue holds bytes (the device's queue length, kept in step by :meth:`set_rate`)."""
        handle = self._shaper(i)
        ns = self.hostnames[i]
        _cmd(["tc", "-n", ns, "qdisc", "add", "dev", HOST_IF, "parent", f"{handle}1", "handle", "10:", "pfifo_fast"])
        self._prio.add(i)
        self._queue_packets(i, _tbf_queue_bytes(parse_rate(self._rate_of(i))))

    def _queue_packets(self, i: int, limit_bytes: int) -> None:
        packets = max(64, limit_bytes // 1514)
        _cmd(["ip", "-n", self.hostnames[i], "link", "set", HOST_IF, "txqueuelen", str(packets)], check=False)

    def _unprioritise(self, i: int) -> None:
        """Host ``i``'s tbf back to its own queue (the change recreates it once the bands are gone)."""
        if i not in self._prio:
            return
        self._prio.discard(i)
        handle = self._shaper(i)
        _cmd(["tc", "-n", self.hostnames[i], "qdisc", "del", "dev", HOST_IF, "parent", f"{handle}1"], check=False)
        self.set_rate(i, self._rate_of(i))

    def measure_throughput(self, src: int | str, dst: int | str, seconds: float = 2.0) -> float:
        """Payload bits/s that one TCP stream carries from ``src`` to ``dst`` over ``seconds`` (about 95.6% of a
        shaped link's rate, the rest being headers). A Python sender and receiver inside the two hosts; the
        sender stops after ``seconds`` or 16 GiB, the receiver at end of stream or after ``seconds`` + 10 s."""
        i, j = self._index(src), self._index(dst)
        if i == j:
            raise ClusterError("measure_throughput needs two different hosts")
        limit = seconds + 10
        py = [sys.executable, "-I", "-S", "-c"]
        recv = self.run(
            j,
            py + [_RECEIVER, self.addresses[j], str(limit)],
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        send = None
        try:
            port = _read_line(recv.stdout, 10)
            if not port.strip().isdigit():
                recv.kill()
                why = (recv.communicate()[1].strip().splitlines() or ["no port"])[-1]
                raise ClusterError(f"throughput receiver on {self.hostnames[j]} failed: {why}")
            send = self.run(
                i,
                py + [_SENDER, self.addresses[j], port.strip(), str(seconds), str(16 << 30)],
                cwd="/",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            out, err = recv.communicate(timeout=limit + 5)
            send_err = send.communicate(timeout=10)[1]
            if recv.returncode != 0 or send.returncode != 0:
                raise ClusterError(
                    f"throughput {self.hostnames[i]} -> {self.hostnames[j]} failed: "
                    f"{(err + send_err).strip().splitlines()[-1:]}"
                )
            nbytes, secs = out.split()
            return 8 * int(nbytes) / float(secs) if float(secs) > 0 else 0.0
        finally:
            for p in (recv, send):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()

    # -- faults ------------------------------------------------------------------------------------------------

    def set_rate(self, host: int | str, rate: str | None) -> None:
        """Change ``host``'s egress rate while it runs (None: unshaped). The cluster's recorded ``link_rate``
        follows when every host has the same rate again."""
        i = self._index(host)
        ns = self.hostnames[i]
        if rate is None:
            _cmd(["tc", "-n", ns, "qdisc", "del", "dev", HOST_IF, "root"], check=False)
            self._prio.discard(i)
        else:
            # in place where a tbf is there already: a replaced qdisc drops the packets queued in the old one, and
            # each drop costs a TCP stream a retransmission timeout (~1 s) that the rate change alone would not
            args = ["dev", HOST_IF, "root", *tbf_args(parse_rate(rate))]
            if _cmd(["tc", "-n", ns, "qdisc", "change", *args], check=False).returncode != 0:
                _cmd(["tc", "-n", ns, "qdisc", "replace", *args])
                self._prio.discard(i)  # a replaced tbf has its own queue again
            if i in self._prio:  # the bands' queue follows the rate, as the tbf's own would
                self._queue_packets(i, _tbf_queue_bytes(parse_rate(rate)))
        if self._state is not None:
            rates = self._state.setdefault("host_rates", [self._state.get("link_rate")] * len(self.hostnames))
            rates[i] = rate
            self._state["link_rate"] = rates[0] if len(set(rates)) == 1 else "mixed"
            self.link_rate = self._state["link_rate"]
            _write_state(self._state)

    def set_rate_all(self, rate: str | None) -> None:
        """Every host's egress rate (None: unshaped)."""
        for i in range(len(self.hostnames)):
            self.set_rate(i, rate)

    def link_down(self, host: int | str) -> None:
        """Pull ``host``'s cable: its link loses carrier, packets either way are dropped, connections stall
        (TCP retries) rather than fail at once."""
        _cmd(["ip", "link", "set", self._veths[self._index(host)], "down"])

    def link_up(self, host: int | str) -> None:
        """Plug ``host``'s cable back in."""
        _cmd(["ip", "link", "set", self._veths[self._index(host)], "up"])

    def kill_processes(self, host: int | str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process running inside ``host`` but its holder (a host whose processes all crash
        at once, e.g. out of memory); the host itself stays up. Returns the pids signalled."""
        holder = self._holder(host)
        net = {_ns_inode(holder, "net")} - {None}
        return [pid for pid in _members(net, set()) if pid != holder and _signal_member(pid, sig, net, set())]


def _read_line(f: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([f], [], [], timeout)
    return f.readline() if ready else ""


# ---------------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        _fail(message)


def _fail(message: str):
    print(f"rudder: error: {message}", file=sys.stderr)
    sys.exit(2)


def _find_host(host: str) -> EmulatedCluster:
    m = _OWN_NAME_RE.fullmatch(host)
    if not m or not host.split("-")[-1].startswith("h"):
        raise ClusterError(f"{host!r} is not an emulated host name (rd-NAME-hN)")
    return EmulatedCluster.attach(m.group(1), orphan_ok=True)


def _cli_up(args) -> None:
    cleanup_stale()
    c = EmulatedCluster(args.hosts, args.link_rate, args.name)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    c.up()
    try:
        c._state["owner_cli"] = True
        _write_state(c._state)
        rate = args.link_rate or "unshaped"
        print(
            f"cluster {c.name}: {args.hosts} hosts, link {rate} (egress per host), bridge {c.bridge} "
            f"{c.bridge_address}, run dir {c.run_dir}"
        )
        for h, a in zip(c.hostnames, c.addresses):
            print(f"  {h}  {a}")
        mpiexec = Path(sys.executable).parent / "mpiexec"  # the pip mpich's, where installed
        mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
        print(f"{mpiexec} " + shlex.join(c.mpiexec_args(args.ranks_per_host)) + " -n N ...")
        print(
            f"run a command on a host: python -m {__spec__.name if __spec__ else 'rudder.testbed.cluster'} "
            f"exec {c.hostnames[0]} -- CMD"
        )
        print(f"up; Ctrl-C or `down {c.name}` tears it down", flush=True)
        while not stop.wait(1.0):
            if _read_state(c.name) is None:  # torn down from elsewhere
                break
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        c.down()
        print(f"cluster {c.name}: down", flush=True)


def _cli_down(args) -> None:
    if args.all == bool(args.name):
        raise ClusterError("give a cluster name or --all")
    if args.name and not _NAME_RE.fullmatch(args.name):
        raise ClusterError(f"bad cluster name {args.name!r}: 1-8 characters a-z, 0-9")
    names = [s["name"] for s in list_clusters()] if args.all else [args.name]
    if args.name and _read_state(args.name) is None and not _leftovers(args.name):
        raise ClusterError(f"no cluster {args.name!r}")
    busy = {name: _in_use(name) for name in names}
    if args.name and busy[args.name] and not args.force:
        raise ClusterError(f"cluster {args.name} is in use by {busy[args.name]}: stop it first, or pass --force")
    for name in names:
        if busy[name] and not args.force:
            print(f"cluster {name}: kept, in use by {busy[name]}")
            continue
        state = _read_state(name)
        if state and state.get("owner_cli") and _owner_alive(state):
            os.kill(state["owner_pid"], signal.SIGTERM)  # the `up` process tears down and exits
            end = time.monotonic() + 15
            while _alive(state["owner_pid"], state.get("owner_start")) and time.monotonic() < end:
                time.sleep(0.05)
        _teardown(name, _read_state(name))
        print(f"cluster {name}: down")
    if args.all:
        cleanup_stale()


def _cli_list(args) -> None:
    cleanup_stale()
    clusters = list_clusters()
    if not clusters:
        print("no emulated clusters")
    for s in clusters:
        hostnames, _, bridge = _names(s["name"], s["hosts"])
        net = _subnet(s["subnet"])
        hosts = " ".join(f"{h}={net}.{11 + i}" for i, h in enumerate(hostnames))
        users = "".join(f", in use by {u.get('what') or 'a process'} (pid {u['pid']})" for u in s["users"])
        owner = f"owner pid {s['owner_pid']}" + ("" if s["alive"] else " (gone)")
        print(
            f"{s['name']}: {s['hosts']} hosts, link {s['link_rate'] or 'unshaped'}, {owner}{users}"
            f"{'' if s['holders'] else ' (coming up)'}, bridge {bridge} {net}.1, hosts {hosts}"
        )


def _cli_exec(args) -> None:
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise ClusterError("exec needs a command: exec HOST -- CMD...")
    c = _find_host(args.host)
    cmd = c.command(args.host, argv)
    os.execvp(cmd[0], cmd)


def _cli_measure(args) -> None:
    c = EmulatedCluster.attach(args.name, orphan_ok=True)
    if len(c.hostnames) < 2:
        raise ClusterError("measure needs at least 2 hosts")
    for i in range(len(c.hostnames)):
        j = (i + 1) % len(c.hostnames)
        bits = c.measure_throughput(i, j, args.seconds)
        print(
            f"{c.hostnames[i]} -> {c.hostnames[j]}: {bits / 1e6:.0f} Mbit/s (set {c.link_rate or 'unshaped'})",
            flush=True,
        )
        if len(c.hostnames) == 2:
            break


def main(argv: list[str] | None = None, prog: str = "python -m rudder.testbed.cluster") -> None:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="bring a cluster up and keep it up until Ctrl-C/SIGTERM or `down NAME`")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--link-rate", default=None, help="egress rate per host, e.g. 500mbit, 1gbit (default unshaped)")
    up.add_argument("--name", default=None, help="1-8 characters a-z0-9 (default random)")
    up.add_argument("--ranks-per-host", type=int, default=1, help="for the printed mpiexec arguments")
    down = sub.add_parser("down", help="tear a cluster down (or all of them)")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true")
    down.add_argument("--force", action="store_true", help="tear down even a cluster a job is running on")
    sub.add_parser("list", help="list clusters (removing those whose owner is gone)")
    ex = sub.add_parser("exec", help="run a command inside an emulated host: exec HOST -- CMD...")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    me = sub.add_parser("measure", help="TCP throughput between the hosts of a cluster")
    me.add_argument("name")
    me.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        if args.action != "exec":
            preflight()
        {"up": _cli_up, "down": _cli_down, "list": _cli_list, "exec": _cli_exec, "measure": _cli_measure}[args.action](
            args
        )
    except ClusterError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted")


if __name__ == "__main__":
    main()
