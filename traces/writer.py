"""Record one trainer rank of a live run as a rudder trace, streaming chunks of minibatches to disk.

Each trainer rank opens its own :class:`TraceWriter` on the shared trace folder; rank 0 also writes the run-level
``trace.json``. Minibatches are buffered in memory and written as one compressed ``chunk-NNNNNN.npz`` every
``chunk_minibatches`` minibatches or ``flush_every_s`` seconds, whichever comes first; after each chunk
``rank.json`` is rewritten, so a run killed at any point (SIGKILL included) leaves a readable prefix marked
``complete: false`` that lacks at most the minibatches of the last ``flush_every_s`` seconds. A run stopped on
purpose (a signal, :mod:`rudder.runtime.stop`) writes everything and finalises with :meth:`TraceWriter.close`
``(stopped=...)``: the trace stays marked incomplete, with the reason. Every file is written to ``<name>.tmp``,
synced, then renamed over ``<name>``, so a reader never sees a half-written file. The layout is in
``traces/FORMAT.md``.
"""

from __future__ import annotations

import json
import operator
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .schema import (
    DECISION_ARRAYS,
    DEVICE_COLUMNS,
    MAX_NODE_ID,
    MINIBATCH_COLUMNS,
    PREFETCH_COLUMNS,
    RANK_FILE,
    REMOTE_IDS,
    SCHEMA,
    SEED_COUNT,
    SEED_IDS,
    STATIC_FILE,
    TMP_SUFFIX,
    TRACE_FILE,
    VERSION,
    chunk_file_name,
    delta_encode,
    rank_dir_name,
)

_INT32_MAX = int(np.iinfo(np.int32).max)


class TraceWriter:
    """Streams one trainer rank's minibatches and prefetch decisions into a trace folder.

    Arguments:
        directory: the trace folder, shared by all ranks (created if missing).
        rank: this trainer's rank, ``0 <= rank < num_ranks``; it writes only ``directory/rank{rank}/``.
        num_ranks: number of trainer ranks of the run.
        run_meta: run-level dict (graph, partitioning, fanout, batch size, seed, buffer config, versions, host...),
            given on rank 0 only and ``None`` on the other ranks; rank 0 writes it to ``trace.json``.
        rank_meta: this rank's dict (partition id, halo size, capacity, ...), stored in ``rank.json``.
        static: this rank's 1-D numpy arrays given once (e.g. ``halo_ids``, ``halo_degree``, ``initial_ids``),
            stored in ``static.npz``.
        chunk_minibatches: minibatches per chunk file at most.
        flush_every_s: write the pending minibatches as a chunk once the oldest of them is this many seconds old
            (checked at each minibatch), so a killed run loses at most this much; None: by count only.
        overwrite: replace an existing trace of this rank (and ``trace.json`` on rank 0) instead of raising
            ``FileExistsError``.

    Meta dicts must be JSON-serializable; numpy scalars and arrays and paths are converted. Argument errors raise
    ``ValueError`` / ``TypeError`` at the call that made them.

    Use as a context manager: a clean exit calls :meth:`close`; an exception only flushes the pending chunk and
    leaves the trace marked incomplete.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rank: int,
        num_ranks: int,
        run_meta: dict | None,
        rank_meta: dict,
        static: dict[str, np.ndarray],
        chunk_minibatches: int = 256,
        *,
        overwrite: bool = False,
        flush_every_s: float | None = 30.0,
    ) -> None:
        num_ranks = _check_int("num_ranks", num_ranks, 1)
        rank = _check_int("rank", rank, 0, num_ranks - 1)
        self.chunk_minibatches = _check_int("chunk_minibatches", chunk_minibatches, 1)
        if flush_every_s is not None and (
            isinstance(flush_every_s, bool) or not isinstance(flush_every_s, (int, float)) or not flush_every_s > 0
        ):
            raise ValueError(f"flush_every_s must be a positive number of seconds or None, got {flush_every_s!r}")
        self.flush_every_s = None if flush_every_s is None else float(flush_every_s)
        if rank != 0 and run_meta is not None:
            raise ValueError(f"run_meta is written by rank 0 only: pass None on rank {rank}")
        if run_meta is not None and not isinstance(run_meta, dict):
            raise TypeError(f"run_meta must be a dict or None, got {type(run_meta).__name__}")
        if not isinstance(rank_meta, dict):
            raise TypeError(f"rank_meta must be a dict, got {type(rank_meta).__name__}")
        self.directory = Path(directory)
        self.rank = rank
        self.num_ranks = num_ranks
        self.rank_dir = self.directory / rank_dir_name(rank)
        self._rank_meta = dict(rank_meta)
        _to_json(self._rank_meta, "rank_meta")  # fail now, not at the first flush hours later
        static_arrays = _check_static(static)

        self._closed = False
        self._chunks = 0
        self._minibatches = 0
        self._remote_ids = 0
        self._with_seeds: bool | None = None
        self._pending_seeds: list[np.ndarray] = []
        self._with_prefetch: bool | None = None
        self._pending_prefetch: dict[str, list] = {name: [] for name in PREFETCH_COLUMNS}
        self._with_device: bool | None = None
        self._pending_device: dict[str, list] = {name: [] for name in DEVICE_COLUMNS}
        self._decisions = 0
        self._chunk_bytes = 0
        self._next_minibatch: int | None = None  # index the next add_minibatch must carry
        self._flushed_end: int | None = None  # index after the last minibatch already on disk
        self._pending: dict[str, list] = {name: [] for name in MINIBATCH_COLUMNS}
        self._pending_ids: list[np.ndarray] = []
        self._pending_since: float | None = None  # time.monotonic() of the oldest pending minibatch
        self._stopped: dict | None = None
        self._decision_minibatch: list[int] = []
        self._decision_latency_s: list[float] = []
        self._decision_ids: list[np.ndarray] = []

        self.directory.mkdir(parents=True, exist_ok=True)
        trace_file = self.directory / TRACE_FILE
        if rank == 0:
            if trace_file.exists() and not overwrite:
                raise FileExistsError(f"{trace_file} exists: pass overwrite=True to replace the trace")
            trace_json = _to_json(
                {"schema": SCHEMA, "version": VERSION, "meta": run_meta or {}, "num_ranks": num_ranks}, "run_meta"
            )
            _write_atomically(trace_file, lambda f: f.write(trace_json))
        if (self.rank_dir / RANK_FILE).exists():
            if not overwrite:
                raise FileExistsError(f"{self.rank_dir / RANK_FILE} exists: pass overwrite=True to replace the trace")
            _remove_rank_files(self.rank_dir)
        self.rank_dir.mkdir(exist_ok=True)
        _write_atomically(self.rank_dir / STATIC_FILE, lambda f: np.savez_compressed(f, **static_arrays))
        self._write_rank_json(complete=False)

    # -- recording ------------------------------------------------------------------------------------------------

    def add_minibatch(
        self,
        *,
        minibatch: int,
        epoch: int,
        remote_ids: np.ndarray,
        local_rows: int,
        sample_s: float,
        fetch_s: float,
        compute_s: float,
        fetch_rows: int,
        hits: int,
        remote_fetched: int,
        prefetched: int,
        seeds: np.ndarray | None = None,
        arrived: int | None = None,
        stall_s: float | None = None,
        h2d_s: float | None = None,
        h2d_rows: int | None = None,
    ) -> None:
        """Record one minibatch; writes a chunk when ``chunk_minibatches`` are pending or the oldest pending one is
        ``flush_every_s`` old.

        ``minibatch`` is the global minibatch index over the run (consecutive: each call one more than the last);
        ``remote_ids`` are all remote node ids the minibatch needed, hits included, in any order (any integer dtype,
        non-negative). ``sample_s``, ``fetch_s``, ``compute_s`` are seconds; ``local_rows`` and ``fetch_rows`` are
        rows (local input rows, rows pulled over RPC); ``hits``, ``remote_fetched``, ``prefetched`` are row counts
        as the recording run's buffer saw them. ``seeds`` (optional, but then for every minibatch of the rank) are
        the minibatch's seed node ids, for sampler lookahead in replay. ``arrived`` and ``stall_s`` (optional, both
        or neither, for every minibatch of a rank or for none): rows a background prefetch delivered before the
        minibatch, and seconds its demand pull waited behind a prefetch chunk. ``h2d_s`` and ``h2d_rows``
        (optional, likewise both or neither, for every minibatch or none): seconds of ``fetch_s`` copying input
        rows host-to-device and the rows copied, when the recording trained on a GPU.
        """
        self._check_open()
        minibatch = _check_int("minibatch", minibatch, 0, MAX_NODE_ID)
        if self._next_minibatch is not None and minibatch != self._next_minibatch:
            raise ValueError(f"minibatch indices must be consecutive: expected {self._next_minibatch}, got {minibatch}")
        ids = np.sort(_check_ids("remote_ids", remote_ids))
        if ids.size > _INT32_MAX:
            raise ValueError(f"remote_ids: {ids.size} ids do not fit the int32 remote_count")
        row = {
            "minibatch": minibatch,
            "epoch": _check_int("epoch", epoch, 0, _INT32_MAX),
            "local_rows": _check_int("local_rows", local_rows, 0, _INT32_MAX),
            "remote_count": int(ids.size),
            "sample_s": float(sample_s),
            "fetch_s": float(fetch_s),
            "compute_s": float(compute_s),
            "fetch_rows": _check_int("fetch_rows", fetch_rows, 0, _INT32_MAX),
            "hits": _check_int("hits", hits, 0, _INT32_MAX),
            "remote_fetched": _check_int("remote_fetched", remote_fetched, 0, _INT32_MAX),
            "prefetched": _check_int("prefetched", prefetched, 0, _INT32_MAX),
        }
        if (h2d_s is None) != (h2d_rows is None):  # checked before anything is kept: a refused row leaves no trace
            raise ValueError("h2d_s and h2d_rows go together")
        if self._with_device is not None and self._with_device != (h2d_s is not None):
            raise ValueError("h2d_s and h2d_rows must be given for every minibatch of a rank or for none")
        if h2d_rows is not None:
            h2d_rows = _check_int("h2d_rows", h2d_rows, 0, _INT32_MAX)
        self._with_device = h2d_s is not None
        for name, value in row.items():
            self._pending[name].append(value)
        if self._with_seeds is None:
            self._with_seeds = seeds is not None
        if self._with_seeds != (seeds is not None):
            raise ValueError("seeds must be given for every minibatch of a rank or for none")
        if seeds is not None:
            self._pending_seeds.append(np.sort(_check_ids("seeds", seeds)))
        if (arrived is None) != (stall_s is None):
            raise ValueError("arrived and stall_s go together")
        if self._with_prefetch is None:
            self._with_prefetch = arrived is not None
        if self._with_prefetch != (arrived is not None):
            raise ValueError("arrived and stall_s must be given for every minibatch of a rank or for none")
        if arrived is not None:
            self._pending_prefetch["arrived"].append(_check_int("arrived", arrived, 0, _INT32_MAX))
            self._pending_prefetch["stall_s"].append(float(stall_s))
        if h2d_s is not None:
            self._pending_device["h2d_s"].append(float(h2d_s))
            self._pending_device["h2d_rows"].append(h2d_rows)
        self._pending_ids.append(ids)
        self._next_minibatch = minibatch + 1
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        if len(self._pending_ids) >= self.chunk_minibatches or (
            self.flush_every_s is not None and now - self._pending_since >= self.flush_every_s
        ):
            self._write_chunk(all_decisions=False)

    def add_decision(self, *, minibatch: int, ids: np.ndarray, latency_s: float) -> None:
        """Record one prefetch decision, applied after ``minibatch`` minibatches (i.e. before minibatch index
        ``minibatch``); ``ids`` is the prefetch set in the agent's order (kept as given), ``latency_s`` the seconds
        the agent took. Decisions must come in non-decreasing ``minibatch`` order.
        """
        self._check_open()
        minibatch = _check_int("minibatch", minibatch, 0, MAX_NODE_ID)
        if self._decision_minibatch and minibatch < self._decision_minibatch[-1]:
            raise ValueError(
                f"decisions must come in minibatch order: got {minibatch} after {self._decision_minibatch[-1]}"
            )
        if self._flushed_end is not None and minibatch < self._flushed_end:
            raise ValueError(
                f"decision for minibatch {minibatch} arrives after its chunk was written "
                f"(minibatches before {self._flushed_end} are on disk)"
            )
        self._decision_minibatch.append(minibatch)
        self._decision_latency_s.append(float(latency_s))
        self._decision_ids.append(_check_ids("ids", ids).copy())

    def flush(self) -> None:
        """Write the pending minibatches as a chunk (and the decisions they cover); no-op when none are pending."""
        self._check_open()
        if self._pending_ids:
            self._write_chunk(all_decisions=False)

    def close(self, extra_rank_meta: dict | None = None, *, stopped: dict | None = None) -> None:
        """Write what is pending and mark this rank complete; ``extra_rank_meta`` is merged into the rank meta
        (e.g. final buffer counters). Idempotent: later calls do nothing.

        ``stopped`` (a JSON-able dict, e.g. ``{"signal": "SIGTERM", "after_minibatches": 812}``): the run was
        stopped before its end; everything recorded is written, but the rank stays ``complete: false`` (a prefix
        of the run) and ``rank.json`` carries ``stopped`` to say why.
        """
        if self._closed:
            return
        if extra_rank_meta:
            merged = {**self._rank_meta, **extra_rank_meta}
            _to_json(merged, "extra_rank_meta")
            self._rank_meta = merged
        if stopped is not None:
            if not isinstance(stopped, dict):
                raise TypeError(f"stopped must be a dict or None, got {type(stopped).__name__}")
            _to_json(stopped, "stopped")
            self._stopped = dict(stopped)
        if self._pending_ids or self._decision_ids:
            self._write_chunk(all_decisions=True)
        self._write_rank_json(complete=stopped is None)
        self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._closed:
            return
        try:
            self.flush()  # keep what was recorded; the trace stays incomplete
        except Exception as flush_error:  # do not mask the exception that ended the run
            exc.add_note(f"rudder trace: flushing rank {self.rank} on exit also failed: {flush_error!r}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"TraceWriter({str(self.directory)!r}, rank={self.rank}, {state}, minibatches={self._minibatches}, "
            f"chunks={self._chunks})"
        )

    # -- internals ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"trace writer of rank {self.rank} in {self.directory} is closed")

    def _write_chunk(self, *, all_decisions: bool) -> None:
        n = len(self._pending_ids)
        start = self._pending["minibatch"][0] if n else (self._flushed_end or 0)
        end = start + n
        m = len(self._decision_ids) if all_decisions else bisect_left(self._decision_minibatch, end)

        arrays = {name: np.asarray(values, dtype=MINIBATCH_COLUMNS[name]) for name, values in self._pending.items()}
        ids = np.concatenate(self._pending_ids) if n else np.zeros(0, dtype=np.int64)
        arrays[REMOTE_IDS] = delta_encode(ids, arrays["remote_count"].astype(np.int64))
        if self._with_seeds and n:
            counts = np.asarray([x.size for x in self._pending_seeds], dtype=np.int32)
            arrays[SEED_COUNT] = counts
            arrays[SEED_IDS] = delta_encode(np.concatenate(self._pending_seeds), counts.astype(np.int64))
        self._pending_seeds.clear()
        if self._with_prefetch and n:
            for name, dtype in PREFETCH_COLUMNS.items():
                arrays[name] = np.asarray(self._pending_prefetch[name], dtype=dtype)
        for values in self._pending_prefetch.values():
            values.clear()
        if self._with_device and n:
            for name, dtype in DEVICE_COLUMNS.items():
                arrays[name] = np.asarray(self._pending_device[name], dtype=dtype)
        for values in self._pending_device.values():
            values.clear()
        decision_ids = self._decision_ids[:m]
        dtypes = DECISION_ARRAYS
        arrays["decision_minibatch"] = np.asarray(self._decision_minibatch[:m], dtype=dtypes["decision_minibatch"])
        arrays["decision_latency_s"] = np.asarray(self._decision_latency_s[:m], dtype=dtypes["decision_latency_s"])
        arrays["decision_offsets"] = np.concatenate(
            [[0], np.cumsum([d.size for d in decision_ids], dtype=np.int64)]
        ).astype(np.int64)
        arrays["decision_ids"] = np.concatenate(decision_ids) if m else np.zeros(0, dtype=np.int64)

        path = self.rank_dir / chunk_file_name(self._chunks)
        self._chunk_bytes += _write_atomically(path, lambda f: np.savez_compressed(f, **arrays))
        self._chunks += 1
        self._minibatches += n
        self._remote_ids += int(ids.size)
        self._decisions += m
        self._flushed_end = end
        for values in self._pending.values():
            values.clear()
        self._pending_ids.clear()
        self._pending_since = None
        del self._decision_minibatch[:m], self._decision_latency_s[:m], self._decision_ids[:m]
        self._write_rank_json(complete=False)

    def _write_rank_json(self, *, complete: bool) -> None:
        header = {
            "schema": SCHEMA,
            "version": VERSION,
            "rank": self.rank,
            "complete": complete,
            "minibatches": self._minibatches,
            "chunks": self._chunks,
            "remote_ids": self._remote_ids,
            "bytes": self._chunk_bytes,
            "bytes_per_remote_id": self._chunk_bytes / self._remote_ids if self._remote_ids else None,
            "decisions": self._decisions,
            "chunk_minibatches": self.chunk_minibatches,
            "meta": self._rank_meta,
        }
        if self._stopped is not None:
            header["stopped"] = self._stopped
        text = _to_json(header, "rank_meta")
        _write_atomically(self.rank_dir / RANK_FILE, lambda f: f.write(text))


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> int:
    """Write ``path`` through ``<path>.tmp`` (synced, then renamed over it); returns the file's size in bytes."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _remove_rank_files(rank_dir: Path) -> None:
    """Delete the files a previous trace of this rank left (only names the format uses)."""
    for path in rank_dir.iterdir():
        name = path.name.removesuffix(TMP_SUFFIX)
        if name in (RANK_FILE, STATIC_FILE) or (name.startswith("chunk-") and name.endswith(".npz")):
            path.unlink()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-serializable")


def _to_json(obj: dict, what: str) -> bytes:
    """``obj`` as UTF-8 JSON text (strict: no NaN / Infinity); errors name ``what`` was being written."""
    try:
        return (json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools and floats are rejected."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_ids(name: str, ids: Any) -> np.ndarray:
    """Node ids as a 1-D int64 array (a copy when converted); non-negative integers below 2**63."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype.kind == "i" and array.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {array.min()}")
    if array.dtype == np.uint64 and array.max() > MAX_NODE_ID:
        raise ValueError(f"{name} must be below 2**63, got {array.max()}")
    return array.astype(np.int64, copy=False)


def _check_static(static: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The static arrays as given, checked: identifier names, 1-D, numeric or bool (no objects)."""
    if not isinstance(static, dict):
        raise TypeError(f"static must be a dict of 1-D numpy arrays, got {type(static).__name__}")
    arrays = {}
    for name, value in static.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"static array names must be identifiers, got {name!r}")
        array = np.asarray(value)
        if array.ndim != 1:
            raise ValueError(f"static[{name!r}] must be 1-D, got shape {array.shape}")
        if array.dtype.kind not in "biuf":
            raise TypeError(f"static[{name!r}] must be bool, integer or float, got dtype {array.dtype}")
        arrays[name] = array
    return arrays
