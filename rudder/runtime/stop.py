"""Graceful stop of a whole DistDGL job on SIGTERM, SIGINT or SIGUSR1 reaching any of its ranks.

Why: a batch system ends a job with a signal (Slurm: SIGTERM at the time limit or on ``scancel``, then SIGKILL
after ``KillWait``, 30 s by default; ``--signal=B:USR1@120`` a chosen time before the limit), and so does a user
(Ctrl+C, ``kill``). Without this module DGL's own handler (installed by ``dgl.distributed`` on servers and
clients) prints "User pressed Ctrl+C, Exiting" and aborts the process: the trace keeps nothing, no summary is
written, shared memory stays behind.

How: :class:`StopRelay` replaces the handlers of those three signals in every rank with one that only records the
signal (no work in signal context), and keeps DGL from installing its own (:func:`keep_dgl_handler_out`). The C
level of Python's handler also writes the signal number to a pipe (``signal.set_wakeup_fd``), so a watcher thread
learns of it at once even while the main thread sits in DGL's C code (a graph server waits in its RPC loop for
minutes); the watcher relays the stop to every other rank over MPI, and takes in stops relayed by others. A signal
to any one rank (Slurm signals them all; ``kill`` may reach one) thus stops the whole job.

The trainers then agree to stop after the *same* minibatch: before each minibatch they all-reduce a stop flag
(:meth:`StopRelay.agreed`, one float over the process group they already share, a fraction of a millisecond), and
when it is set they raise :class:`StopRequested` instead of training it. The rank finalises its trace as incomplete
with what it finished, rank 0 writes the summary marked ``partial``, DGL shuts down in order (clients leave, the
servers' loops return), and every rank leaves through :func:`exit_now`: after a last barrier it removes the
``/dev/shm`` segments it maps and ends with ``os._exit`` — *not* ``MPI_Finalize``, whose PMI barrier was seen to
hang graph servers after a stop (holding the interpreter lock).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

from rudder.runtime.console import _flush_c_stdio
from rudder.runtime.dgl_compat import import_dgl

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_TAG = 7311  # MPI tag of a relayed stop: the payload is (signal name, rank that received it)
_POLL_S = 0.01  # how often the watcher looks for relayed stops and replaced handlers
_NUMBERS = {s.name: int(s) for s in STOP_SIGNALS}
_RANKS = 1 << 20  # ranks per signal number in the trainers' agreement value (exact in a float64)


class StopRequested(Exception):
    """Raised in a trainer's loop when the job agreed to stop before the next minibatch."""

    def __init__(self, info: dict):
        super().__init__(f"stop requested by {info.get('signal')}")
        self.info = info


def keep_dgl_handler_out() -> None:
    """Make DGL's ``register_sig_handler`` (called by ``dgl.distributed`` when a server starts or a client
    connects; its C handler aborts the process on SIGINT/SIGTERM) a no-op, so Python's handlers stay in place."""

    dgl = import_dgl()
    dgl.distributed.rpc.register_sig_handler = lambda: None


class StopRelay:
    """The stop state of one rank: its own signal handlers, and a watcher thread relaying stops over MPI.

    Args:
        comm: the job's MPI communicator (``MPI.COMM_WORLD``); mpi4py initialises MPI with
            ``MPI_THREAD_MULTIPLE``, so the watcher may use it beside the main thread.
        describe: this rank, for messages (e.g. ``"rank 3 (trainer 1 of machine 1 on h1)"``).

    ``signal`` is the name of the first stop signal this rank learnt of (its own or relayed), ``origin`` the rank
    that received it, ``received_here`` the name of a signal this process itself received (None if only relayed).
    """

    def __init__(self, comm, describe: str = ""):
        from mpi4py import MPI

        self.comm = comm
        self._any = MPI.ANY_SOURCE
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.describe = describe
        self.signal: str | None = None
        self.origin: int | None = None
        self.received_here: str | None = None
        self.requested_at: float | None = None  # time.monotonic() when this rank learnt of the stop
        self.agreed_signal: str | None = None  # what the trainers agreed to name (agreed())
        self.agreed_origin: int | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sends: list = []
        self._replaced: set = set()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self.install()
        self._thread = threading.Thread(target=self._watch, name="rudder-stop-watch", daemon=True)
        self._thread.start()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        """(Re)install this rank's handlers for the stop signals and the wakeup pipe (main thread only)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)  # SA_RESTART: DGL's and gloo's socket calls must not see EINTR
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._ours = {sig: _sigaction(sig) for sig in STOP_SIGNALS}  # Python's C-level handler, as installed

    def keep(self) -> None:
        """Put this rank's handlers back where a library replaced them since (any thread may call it).

        Why: libraries install handlers of their own as they run. In rank 0 of two-host jobs, having partitioned,
        the SIGTERM handler was found to be GKlib's ``gk_sigthrow`` (METIS, linked into libdgl.so), and Slurm's
        SIGTERM ended that rank ("Terminated"). rank 0 reinstalls after preparing the job; besides, the watcher
        calls this every 10 ms and the trainers before every minibatch; each replacement is reported once, naming
        the library and offset of the handler it found (``nm -C`` names the function)."""
        for sig, ours in self._ours.items():
            current = _sigaction(sig)
            if current is None or ours is None or current.sa_handler == ours.sa_handler:
                continue
            _LIBC.sigaction(int(sig), ctypes.byref(ours), None)
            if sig not in self._replaced:
                self._replaced.add(sig)
                who = self.describe or f"rank {self.rank}"
                print(
                    f"rudder: {who}: the {signal.Signals(sig).name} handler had been replaced by "
                    f"{_owner(current.sa_handler)}: rudder's is back",
                    file=sys.stderr,
                    flush=True,
                )

    def _on_signal(self, signum, frame) -> None:
        """Python-level handler: nothing to do, the watcher has the signal from the wakeup pipe already."""

    def _watch(self) -> None:
        while not self._closed.is_set():
            self.keep()
            ready, _, _ = select.select([self._read_fd], [], [], _POLL_S)
            if ready:
                for num in os.read(self._read_fd, 64):
                    if num in [int(s) for s in STOP_SIGNALS]:
                        name = signal.Signals(num).name
                        self.received_here = self.received_here or name
                        if self._learn(name, self.rank):
                            self._relay(name)
            if self._closed.is_set():
                break
            try:
                while self.comm.iprobe(source=self._any, tag=STOP_TAG):
                    name, origin = self.comm.recv(source=self._any, tag=STOP_TAG)
                    self._learn(name, origin)
            except Exception as exc:  # noqa: BLE001 - MPI going away under the watcher at the very end
                print(f"rudder: {self.describe}: the stop watcher ends: {exc!r}", file=sys.stderr, flush=True)
                return

    def _learn(self, name: str, origin: int) -> bool:
        """Record the stop; True when this is the first this rank hears of one."""
        with self._lock:
            if self.signal is not None:
                return False
            self.signal, self.origin, self.requested_at = name, origin, time.monotonic()
        where = "here" if origin == self.rank else f"on rank {origin}"
        print(
            f"rudder: {self.describe or f'rank {self.rank}'}: {name} received {where}: stopping after the current "
            "minibatch",
            file=sys.stderr,
            flush=True,
        )
        return True

    def _relay(self, name: str) -> None:
        for r in range(self.size):
            if r != self.rank:
                self._sends.append(self.comm.isend((name, self.rank), dest=r, tag=STOP_TAG))

    def request(self, name: str = "SIGTERM") -> None:
        """Stop as if ``name`` had been received here (tests, and callers that stop the job themselves)."""
        if self._learn(name, self.rank):
            self._relay(name)

    def agreed(self) -> bool:
        """Whether any trainer has a stop request (a collective over the trainers' process group: every trainer
        must call it at the same point, e.g. before each minibatch). The trainers also agree on which signal
        and rank to name (the highest signal number among those received, then the highest rank), so that every
        trainer's trace and the summary tell the same story even when the relay has not reached one of them yet."""
        import torch
        import torch.distributed as dist

        self.keep()
        mine = 0
        if self.requested and self.signal in _NUMBERS:
            mine = _NUMBERS[self.signal] * _RANKS + (self.origin if self.origin is not None else 0) + 1
        flag = torch.tensor([mine], dtype=torch.float64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value == 0:
            return False
        number, origin = divmod(value - 1, _RANKS)
        self.agreed_signal, self.agreed_origin = signal.Signals(number).name, origin
        if not self.requested:  # another trainer's request, not relayed here yet
            self._learn(self.agreed_signal, origin)
        return True

    def info(self, minibatches: int, of_minibatches: int) -> dict:
        """The ``stopped`` record of traces and summaries (the same on every trainer once :meth:`agreed`)."""
        return dict(
            signal=self.agreed_signal or self.signal,
            origin_rank=self.agreed_origin if self.agreed_signal else self.origin,
            received_here=self.received_here,
            after_minibatches=int(minibatches),
            of_minibatches=int(of_minibatches),
        )

    def close(self) -> None:
        """Stop the watcher (before the last barrier, so no MPI call of it overlaps the exit)."""
        self._closed.set()
        self._thread.join(timeout=2 * _POLL_S + 1)


class _SigactionStruct(ctypes.Structure):
    """glibc's ``struct sigaction`` on Linux (handler, 1024-bit mask, flags, restorer)."""

    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)


def _sigaction(sig: int) -> _SigactionStruct | None:
    """The process's current disposition of ``sig`` (None if it cannot be read)."""
    act = _SigactionStruct()
    return act if _LIBC.sigaction(int(sig), None, ctypes.byref(act)) == 0 else None


def _owner(address: int | None) -> str:
    """The shared object and offset (and exported symbol) a handler address belongs to, e.g. ``libdgl.so+0x719e60``
    (``nm -C`` on the library names the function at that offset)."""
    if not address or address in (1,):
        return {None: "SIG_DFL", 0: "SIG_DFL", 1: "SIG_IGN"}.get(address, "?")
    info = _DlInfo()
    if _LIBC.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
        name = os.path.basename(info.dli_fname.decode(errors="replace"))
        where = f"{name}+{address - (info.dli_fbase or 0):#x}"  # e.g. `nm -C libdgl.so | grep OFFSET` names it
        return f"{where} ({info.dli_sname.decode(errors='replace')})" if info.dli_sname else where
    return f"a handler at {address:#x}"


def shm_mapped() -> list[str]:
    """Paths under ``/dev/shm`` this process maps or holds open (DGL's partition segments, MPICH's ``mpich_shm_*``,
    multiprocessing semaphores)."""
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                    paths.add(parts[5].strip().removesuffix(" (deleted)"))
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                paths.add(target.removesuffix(" (deleted)"))
    except OSError:
        pass
    return sorted(paths)


def remove_shm(paths: list[str]) -> list[str]:
    """Unlink ``paths`` (other processes mapping them keep their memory); returns those removed."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def exit_now(code: int, shm: list[str]) -> None:
    """End the process at once with ``os._exit`` (after a stop: without ``MPI_Finalize``): flush Python's and C's
    output (DGL's and MPICH's printf), unlink ``shm`` and what the process maps now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    _flush_c_stdio()
    remove_shm(sorted(set(shm) | set(shm_mapped())))
    os._exit(code)
