"""What a training job shows on the terminal: rudder's own lines, with DGL's and MPI's output kept in a log file.

DGL prints from C++ and Python in every rank (partitioner timings, "Server is waiting for connections", "connect to
server successfuly!", ...) and MPI adds its own. Under the supervisor (``train.py gnn`` run plainly,
:func:`rudder.runtime.launcher.launch`) all of that goes to the job's log file (:class:`JobLog`; ``--verbose``
shows it live too), and the ranks say what a person needs through :func:`say`: the supervisor sets
``RUDDER_CONSOLE`` to a file in the job folder, each said line is appended to it as one JSON record (one ``write``,
so records from several ranks never interleave), and the supervisor relays the records to its terminal as they come.

Under a user's own ``mpiexec``/``srun`` there is no supervisor: :func:`say` prints to the rank's stdout (the final
table) or stderr (progress, errors), beside DGL's output; only rank 0 and trainer 0 say anything, every line
starting with ``rudder:`` (``grep '^rudder:'`` keeps them).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import subprocess
import sys
import threading
import time

CONSOLE_VAR = "RUDDER_CONSOLE"
KEEP_LOGS = 20  # job logs kept in the default log folder (the oldest are removed)


def say(text: str, err: bool = True) -> None:
    """Show ``text`` (a line, or a block such as the final table) on the job's terminal, from any rank: to stderr
    when ``err`` (progress, errors), else stdout (results)."""
    path = os.environ.get(CONSOLE_VAR)
    if path:
        record = (json.dumps(dict(text=text, err=err)) + "\n").encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # never created here: the supervisor's file or nothing
        except OSError:
            pass
        else:
            try:
                os.write(fd, record)
                return
            finally:
                os.close(fd)
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def default_log_path(cache_dir: str, tag: str) -> str:
    return os.path.join(cache_dir, "logs", f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}.log")


def _flush_c_stdio() -> None:
    """Flush C stdio buffers (DGL's C++ printf) into the file descriptor they belong to now."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


class JobLog:
    """The supervisor's side: the job's log file, the terminal, and the relay of the ranks' :func:`say` records.

    Args:
        path: the log file (appended to; its folder is created).
        verbose: also copy everything the log receives to the terminal, live.
        prune: remove all but the newest :data:`KEEP_LOGS` ``*.log`` files in the log's folder (the default folder).

    The path is announced once, before the first line rudder shows (so an error found before anything runs stays
    a single line). :meth:`attach_console` names the file the ranks' records come through, once the job has one.
    """

    def __init__(self, path: str, verbose: bool = False, prune: bool = False):
        self.path = os.path.abspath(path)
        self.console_path: str | None = None
        self.verbose = verbose
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if prune:
            old = sorted(glob.glob(os.path.join(os.path.dirname(self.path), "*.log")), key=os.path.getmtime)
            for stale in old[: max(0, len(old) - KEEP_LOGS + 1)]:
                with contextlib.suppress(OSError):
                    os.remove(stale)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._offset = 0
        self._partial = b""
        self._terminal = {False: 1, True: 2}  # stdout, stderr; other descriptors while capture() redirects them
        self._announced = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the terminal
    def where(self) -> str:
        """`` (log: PATH)``: appended to a failure line."""
        return f" (log: {self.path})"

    def announce(self) -> None:
        if not self._announced:
            self._announced = True
            hint = "" if self.verbose else "; --verbose shows it live"
            self._show(f"rudder: DGL and MPI output goes to {self.path}{hint}\n", err=True)

    def note(self, text: str, err: bool = True) -> None:
        """Show one of rudder's lines (or blocks) on the terminal and record it in the log."""
        self.announce()
        line = text if text.endswith("\n") else text + "\n"
        self._show(line, err)
        self._write(self.fd, line.encode())

    def record(self, text: str) -> None:
        """Write ``text`` into the log only (a failed rank's traceback: the terminal shows its one line)."""
        self._write(self.fd, (text if text.endswith("\n") else text + "\n").encode())

    def _show(self, text: str, err: bool) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._write(self._terminal[err], text.encode())

    def _write(self, fd: int, data: bytes) -> None:
        with self._lock:
            while data:
                try:
                    n = os.write(fd, data)
                except BrokenPipeError:
                    return
                data = data[n:]

    # ------------------------------------------------------------------ the ranks' records
    def attach_console(self, path: str) -> None:
        """Create (empty) the file the ranks append their :func:`say` records to (``RUDDER_CONSOLE``)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb"):
            pass
        self.console_path, self._offset, self._partial = path, 0, b""

    def relay(self) -> None:
        """Show the records the ranks appended since the last call."""
        if self.console_path is None:
            return
        try:
            with open(self.console_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete record: the rest comes with the next read
        for raw in lines:
            try:
                record = json.loads(raw)
                self.note(str(record["text"]), err=bool(record.get("err", True)))
            except (ValueError, KeyError, TypeError):
                self._write(self.fd, raw + b"\n")

    # ------------------------------------------------------------------ other output into the log
    def _tee(self, read_fd: int) -> None:
        """Copy what arrives on ``read_fd`` into the log and (verbose) onto the terminal's stderr, until EOF."""
        try:
            while chunk := os.read(read_fd, 65536):
                self._write(self.fd, chunk)
                self._write(self._terminal[True], chunk)
        finally:
            os.close(read_fd)

    def _start_tee(self, read_fd: int) -> None:
        t = threading.Thread(target=self._tee, args=(read_fd,), name="rudder-log-tee", daemon=True)
        t.start()
        self._threads.append(t)

    @contextlib.contextmanager
    def capture(self):
        """Send this process's own stdout and stderr (file descriptors 1 and 2: Python's and C++'s writes alike) to
        the log while the block runs; :meth:`note` still reaches the terminal."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {1: os.dup(1), 2: os.dup(2)}
        self._terminal = {False: saved[1], True: saved[2]}
        if self.verbose:
            read_fd, write_fd = os.pipe()
            self._start_tee(read_fd)
            target = write_fd
        else:
            target, write_fd = self.fd, None
        os.dup2(target, 1)
        os.dup2(target, 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _flush_c_stdio()
            os.dup2(saved[1], 1)
            os.dup2(saved[2], 2)
            self._terminal = {False: 1, True: 2}
            if write_fd is not None:
                os.close(write_fd)  # the tee sees EOF once the duplicates on 1 and 2 are gone too
                self._join()
            for fd in saved.values():
                os.close(fd)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` with its stdout and stderr going to the log (verbose: to the log and the terminal)."""
        if not self.verbose:
            return subprocess.Popen(cmd, stdout=self.fd, stderr=subprocess.STDOUT, **kwargs)
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(cmd, stdout=write_fd, stderr=subprocess.STDOUT, **kwargs)
        finally:
            os.close(write_fd)
        self._start_tee(read_fd)
        return proc

    def _join(self, timeout_s: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout_s)
        self._threads = [t for t in self._threads if t.is_alive()]

    def empty(self) -> bool:
        """Nothing was written to the log yet."""
        return os.fstat(self.fd).st_size == 0

    def close(self) -> None:
        """Relay the last records, wait for the output copies to end, close the log (removed if it stayed empty)."""
        self.relay()
        self._join()
        empty = self.empty()
        os.close(self.fd)
        if empty:
            with contextlib.suppress(OSError):
                os.remove(self.path)
