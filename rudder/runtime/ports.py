"""TCP ports of a DistDGL job: the block each job claims on one host, and which port each machine's server uses."""

from __future__ import annotations

import atexit
import glob
import os
import socket
import tempfile
import time

from rudder.runtime.procs import alive, start_time


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


def _lock_owner_alive(path: str) -> bool:
    """Whether the process a port lock names (``pid start_time``; older locks: ``pid``) still runs. A lock that
    names nobody yet counts as alive for 10 s (its owner is between creating and writing it)."""
    try:
        with open(path) as f:
            fields = [int(x) for x in f.read().split()]
    except ValueError:
        fields = []
    except OSError:
        return False
    if not fields or fields[0] <= 0:
        try:
            return time.time() - os.path.getmtime(path) < 10
        except OSError:
            return False
    return alive(fields[0], fields[1] if len(fields) > 1 else None)


def remove_stale_locks() -> list[str]:
    """Remove the port locks whose owner is gone (a launcher killed outright); returns their paths."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "rudder-ports-*.lock")):
        if not _lock_owner_alive(path):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _claim(base: int) -> bool:
    """Claim a port block for this process (a lock file naming our pid and start time; a dead owner's lock is
    taken over)."""
    path = _port_lock(base)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_owner_alive(path):
                return False
            try:
                os.remove(path)  # stale: its job is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {start_time(os.getpid())}")
        _CLAIMED.append(path)
        atexit.register(release_claims)
        return True
    return False


_CLAIMED: list[str] = []  # port locks this process holds


def release_claims() -> None:
    """Remove the port locks this process claimed (at exit; also called by a rank that leaves with ``os._exit``,
    which skips ``atexit``)."""
    while _CLAIMED:
        path = _CLAIMED.pop()
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


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
