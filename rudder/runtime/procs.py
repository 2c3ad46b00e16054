"""Small process helpers shared by the per-rank code and the supervisor."""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, ``/proc/PID/stat`` field 22): with the pid it names one
    process for good, where a pid alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not); with ``start``, whether it is still the process that
    started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def state(pid: int) -> str | None:
    """The process's state letter from ``/proc/PID/stat`` (``R``, ``S``, ``D``, ``T`` stopped, ``t`` traced...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def signal_process(pid: int, sig: int, start: int | None = None, group: bool = False) -> bool:
    """Send ``sig`` to process ``pid`` only if it is still the process that started at ``start`` (any process with
    that pid when None); with ``group``, to its process group too (``pid`` must lead it). Returns whether it was
    signalled.

    Why: pids wrap (``pid_max`` is 32768 on many machines, and every thread takes one), so a pid read a moment ago
    may name another process by the time it is signalled: the check and the signal would race. A pidfd names one
    process for good: the identity is checked after taking it, and the signal goes through it. While that process
    has not exited its pid, and so its process group id, cannot be given to another."""
    import signal as _signal

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not alive(pid, start):  # checked after the pidfd was taken: the pid still names that process
            return False
        if pidfd_exited(fd):  # it has exited meanwhile (a zombie): nothing to signal
            return False
        if group:
            try:
                os.killpg(pid, sig)  # the leader is alive (above), so the group id is still its group's
            except (ProcessLookupError, PermissionError):
                pass
        try:
            _signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        os.close(fd)


def pidfd_exited(fd: int, timeout_s: float = 0.0) -> bool:
    """Whether the process of pidfd ``fd`` has exited, waiting up to ``timeout_s`` (None: until it has). ``poll``,
    not ``select``: a descriptor numbered 1024 or more is fine."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout_s is None else int(timeout_s * 1000)))
