"""Progress heartbeats of a job's trainer ranks, and the watchdog that reads them.

A rank that hangs (stopped, deadlocked in an all-reduce, waiting forever on a server that no longer answers) does
not die, so nothing else notices it: the job would wait until ``--timeout-s`` or forever. Each trainer therefore
marks its progress in a small file, ``status/rank{r}.beat`` in the job folder, memory-mapped, so a mark is a few
stores to memory and no system call (a handful per minibatch: sampling, fetching, compute and all-reduce, the
agent's decision). The supervisor (:mod:`rudder.runtime.launcher`) reads the files a few times a second
(:class:`Watchdog`).

The bound comes from the run itself: until a trainer's first step after start-up, ``startup_timeout_s``; after it,
``max(watchdog_s, FACTOR x the slowest step the trainer has taken so far)``, a step being the time from one mark
to the next. A trainer past its bound ends the job, named with the phase it was in (what it was waiting for).

File layout (little-endian, 64 bytes): at 0 ``seq`` (u64); at 8 ``steps`` (u64, marks since start-up ended),
``phase`` (u32, index into :data:`PHASES`), padding, ``last_mark`` (f64, ``time.monotonic()`` of the last mark: one
clock for every process of the host),
``slowest_step_s`` (f64), ``started`` (f64, when the rank created the file); at 56 ``seq_end`` (u64). A
seqlock: the writer makes both sequence numbers odd, writes the fields, then makes both even again, the trailer
first each time; a reader that copies the 64 bytes in one read takes them only when ``seq == seq_end`` and even,
so it never takes a half-written mark.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

PHASES = (
    "start-up",
    "sampling",
    "fetching",
    "compute and all-reduce",
    "deciding",
    "evaluating",
    "closing",
    "finishing",
)
FACTOR = 20.0  # a step may take this many times the slowest step so far before the trainer counts as hung
_FIELDS = "<QI4xddd"  # at offset 8
_SEQ, _SEQ_END, _SIZE = 0, 56, 64


def beat_path(job_dir: str, rank: int) -> str:
    return os.path.join(job_dir, "status", f"rank{rank}.beat")


class Heartbeat:
    """The writing side, in a trainer rank: ``mark(phase)`` says the previous phase finished and ``phase`` began.

    Marks are cheap (no system call), so they may come at every minibatch phase. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._seq = 0
        self._steps = 0
        self._slowest_s = 0.0
        self._started = time.monotonic()
        self._last = self._started
        self._phase = 0
        self._write()

    def _write(self) -> None:
        for seq in (self._seq + 1, None, self._seq + 2):  # odd: being written; then the fields; even: complete
            if seq is None:
                struct.pack_into(
                    _FIELDS, self._map, 8, self._steps, self._phase, self._last, self._slowest_s, self._started
                )
            else:
                struct.pack_into("<Q", self._map, _SEQ_END, seq)
                struct.pack_into("<Q", self._map, _SEQ, seq)
        self._seq += 2

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        if self._phase != 0:  # the step that ends start-up is not a step of the run's pace
            self._slowest_s = max(self._slowest_s, now - self._last)
            self._steps += 1
        elif phase != PHASES[0]:
            self._steps += 1
        self._last = now
        self._phase = PHASES.index(phase)
        self._write()

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Beat:
    """One reading of a heartbeat file."""

    phase: str
    steps: int
    last_mark: float
    slowest_step_s: float
    started: float

    def bound_s(self, watchdog_s: float, startup_timeout_s: float) -> float:
        """Seconds this trainer may go without a mark: the start-up timeout until it has started, then
        ``max(watchdog_s, FACTOR x slowest step)``; 0 means no bound."""
        if self.phase == PHASES[0]:
            return startup_timeout_s
        if watchdog_s <= 0:
            return 0.0
        return max(watchdog_s, FACTOR * self.slowest_step_s)


def read_beat(path: str, tries: int = 5) -> Beat | None:
    """The last complete mark in ``path``; None if the file is absent or never held a complete mark."""
    for _ in range(tries):
        try:
            with open(path, "rb") as f:
                data = f.read(_SIZE)
        except OSError:
            return None
        if len(data) < _SIZE:
            return None
        (seq,), (seq_end,) = struct.unpack_from("<Q", data, _SEQ), struct.unpack_from("<Q", data, _SEQ_END)
        steps, phase, last, slowest, started = struct.unpack_from(_FIELDS, data, 8)
        if seq % 2 == 0 and seq == seq_end and seq > 0 and phase < len(PHASES):
            return Beat(PHASES[phase], steps, last, slowest, started)
        time.sleep(0.001)
    return None
