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
