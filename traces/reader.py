"""Read rudder traces: the one reader that replay, oracles, analysis and export (pandas, parquet) all go through.

:class:`Trace` opens a trace folder and checks ``trace.json`` and every ``rank{r}/rank.json``; :meth:`Trace.rank`
gives a :class:`RankTrace`, which reads that rank's chunks one at a time, checking each against the format
(``traces/FORMAT.md``) and raising :class:`~rudder.traces.schema.TraceError` with the file, the field, expected and got.
A trace whose writer was not closed (a killed run) is read as the prefix it holds, with one
:class:`~rudder.traces.schema.TraceIncompleteWarning`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .schema import (
    CHUNK_ARRAYS,
    CONDITIONS_FILE,
    DECISION_ARRAYS,
    DEVICE_COLUMNS,
    MINIBATCH_COLUMNS,
    OPTIONAL_ARRAYS,
    PREFETCH_COLUMNS,
    RANK_FILE,
    REMOTE_IDS,
    SCHEMA,
    SEED_ARRAYS,
    SEED_COUNT,
    SEED_IDS,
    STATIC_FILE,
    TRACE_FILE,
    VERSION,
    TraceError,
    TraceIncompleteWarning,
    chunk_file_name,
    delta_decode,
    rank_dir_name,
)


class Trace:
    """A recorded run: run-level meta and one :class:`RankTrace` per trainer rank.

    Attributes:
        directory: the trace folder.
        meta: the run-level dict the recording passed (``trace.json`` ``meta``).
        num_ranks: trainer ranks of the recorded run.
        ranks: ranks that hold at least one minibatch, ascending (all of ``range(num_ranks)`` unless a rank wrote
            nothing or was killed before its first chunk); :meth:`rank` also opens the others.
        empty_ranks: ranks with a ``rank.json`` but no minibatch (left out of ``ranks``).
        complete: every rank is present and closed its writer.

    Raises :class:`TraceError` if ``trace.json`` is missing, is not schema ``rudder-trace`` version 1, or a
    ``rank.json`` is malformed. Warns (:class:`TraceIncompleteWarning`) once if the trace is incomplete.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / TRACE_FILE
        if not path.is_file():
            raise TraceError(f"{self.directory} is not a rudder trace: {TRACE_FILE} missing")
        header = _read_json(path)
        _check_schema(header, path)
        self.num_ranks: int = _int_field(header, "num_ranks", path, low=1)
        self.meta: dict = _dict_field(header, "meta", path)
        self._ranks: dict[int, RankTrace] = {}
        missing = []
        for rank in range(self.num_ranks):
            rank_dir = self.directory / rank_dir_name(rank)
            if (rank_dir / RANK_FILE).is_file():
                self._ranks[rank] = RankTrace(rank_dir, rank)
            else:
                missing.append(rank)
        # a rank that holds no minibatch (killed before its first chunk) has nothing to replay: left out of
        # ``ranks`` so that replays, oracles and evaluate use the others, with the warning below naming it
        self.empty_ranks: list[int] = sorted(r for r, t in self._ranks.items() if t.num_minibatches == 0)
        self.ranks: list[int] = sorted(r for r in self._ranks if r not in self.empty_ranks)
        self.missing_ranks: list[int] = missing
        unclosed = [r for r, rank_trace in self._ranks.items() if not rank_trace.complete]
        self.complete: bool = not missing and not unclosed
        if not self.complete:
            parts = []
            failed = [r for r in unclosed if self._ranks[r].error is not None]
            stopped = [r for r in unclosed if self._ranks[r].stopped is not None and r not in failed]
            killed = [r for r in unclosed if self._ranks[r].stopped is None and r not in failed]
            if failed:
                counts = ", ".join(f"rank {r}: {self._ranks[r].num_minibatches}" for r in failed)
                parts.append(
                    f"recording of rank {_join(failed)} ended by a write error (minibatches kept: {counts}): "
                    f"{self._ranks[failed[0]].error}"
                )
            if stopped:
                why = sorted({str(self._ranks[r].stopped.get("signal", "a stop request")) for r in stopped})
                counts = ", ".join(f"rank {r}: {self._ranks[r].num_minibatches}" for r in stopped)
                parts.append(
                    f"run of rank {_join(stopped)} stopped early by {', '.join(why)} (minibatches kept: {counts})"
                )
            if killed:
                counts = ", ".join(f"rank {r}: {self._ranks[r].num_minibatches}" for r in killed)
                parts.append(f"writer of rank {_join(killed)} never closed (minibatches kept: {counts})")
            if missing:
                parts.append(f"rank {_join(missing)} of {self.num_ranks} wrote nothing")
            if not any(t.num_minibatches for t in self._ranks.values()):
                parts.append("it holds no minibatch (the run ended before its first chunk was written)")
            elif self.empty_ranks:
                parts.append(
                    f"rank {_join(self.empty_ranks)} holds no minibatch and is left out: ranks {_join(self.ranks)} "
                    "are used"
                )
            warnings.warn(
                f"trace {self.directory} is incomplete, a prefix of the run: {'; '.join(parts)}",
                TraceIncompleteWarning,
                stacklevel=2,
            )

    @property
    def partition_fingerprint(self) -> str | None:
        """The fingerprint of the partitioning the run used (``meta.graph.fingerprint``: node ids in the trace are
        ids of that partitioning's numbering); None for traces recorded before it was kept."""
        graph = self.meta.get("graph")
        value = graph.get("fingerprint") if isinstance(graph, dict) else None
        return value if isinstance(value, str) else None

    @property
    def conditions(self) -> dict | None:
        """The conditions the run met (``conditions.json``: a scenario played live on its links, every rate change
        with its time), as the JSON object its launcher wrote; None if the run met no played scenario. Its meaning
        is :func:`rudder.env.scenario.conditions_met`'s."""
        path = self.directory / CONDITIONS_FILE
        return _read_json(path) if path.is_file() else None

    def rank(self, rank: int) -> RankTrace:
        """The trace of trainer ``rank``; :class:`TraceError` if the trace has no such rank."""
        if rank not in self._ranks:
            note = f" (rank {rank} of {self.num_ranks} wrote nothing)" if rank in self.missing_ranks else ""
            raise TraceError(f"rank {rank} not in trace {self.directory}: it has ranks {_join(self.ranks)}{note}")
        return self._ranks[rank]

    def summary(self) -> pd.DataFrame:
        """One row per present rank: ``rank``, ``minibatches``, ``remote_ids`` (total ids over the rank's
        minibatches), ``bytes_per_remote_id`` (chunk bytes over remote ids, NaN without ids), ``complete``.
        Read from the ``rank.json`` files only (cheap).
        """
        rows = [
            {
                "rank": r,
                "minibatches": t.num_minibatches,
                "remote_ids": t.num_remote_ids,
                "bytes_per_remote_id": t.bytes_per_remote_id,
                "complete": t.complete,
            }
            for r, t in sorted(self._ranks.items())
        ]
        columns = ["rank", "minibatches", "remote_ids", "bytes_per_remote_id", "complete"]
        table = pd.DataFrame(rows, columns=columns)
        return table.astype(
            {
                "rank": np.int64,
                "minibatches": np.int64,
                "remote_ids": np.int64,
                "bytes_per_remote_id": np.float64,
                "complete": bool,
            }
        )

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"Trace({str(self.directory)!r}, ranks={self.ranks}, {state})"


class _StaticArrays(dict):
    """A rank's static arrays: a dict whose missing names are a :class:`TraceError` naming the file."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]):
        super().__init__(arrays)
        self.path = path

    def __missing__(self, name: str):
        raise TraceError(f"{self.path} lacks array {name!r} (it has {', '.join(sorted(self)) or 'none'})")


@dataclass
class _Chunk:
    """One validated chunk: per-minibatch columns, optionally the decoded ids, and the decisions."""

    columns: dict[str, np.ndarray]
    ids: np.ndarray | None  # int64, every minibatch's sorted ids concatenated (read-only)
    id_offsets: np.ndarray  # int64[n + 1]: minibatch i's ids are ids[id_offsets[i]:id_offsets[i + 1]]
    decisions: dict[str, np.ndarray]
    seeds: np.ndarray | None = None  # int64, every minibatch's sorted seeds concatenated, when asked and recorded
    seed_offsets: np.ndarray | None = None  # int64[n + 1], like id_offsets
    prefetch: dict[str, np.ndarray] | None = None  # PREFETCH_COLUMNS, when the recording prefetched in the background
    device: dict[str, np.ndarray] | None = None  # DEVICE_COLUMNS, when the recording trained on a GPU


class RankTrace:
    """One trainer rank of a recorded run (get it from :meth:`Trace.rank`).

    Attributes:
        directory: the rank's folder (``rank{r}``).
        rank: the trainer rank.
        meta: the rank-level dict the recording passed (``rank.json`` ``meta``, with what ``close`` added).
        complete: the rank's writer was closed; if False the rank holds a prefix of its run.
        stopped: why the run was stopped before its end, when it was and the writer finalised everything (e.g.
            ``{"signal": "SIGTERM", "after_minibatches": 812, ...}``); None otherwise. Such a rank is incomplete.
        num_minibatches: minibatches recorded.
        num_remote_ids: remote ids recorded, over all minibatches.
        bytes_per_remote_id: chunk bytes on disk per remote id (None without ids).
        static: the rank's arrays given once at start (``static.npz``), loaded on first use.

    Chunks are read in order and validated on every read; :meth:`iter_minibatches` holds one chunk in memory at a
    time, :meth:`minibatch_ids` loads them all and caches the result. Returned id arrays are read-only.
    """

    def __init__(self, directory: str | os.PathLike, rank: int | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / RANK_FILE
        header = _read_json(path)
        _check_schema(header, path)
        self.rank: int = _int_field(header, "rank", path, low=0)
        if rank is not None and self.rank != rank:
            raise TraceError(f"field 'rank' in {path}: expected {rank} (its folder), got {self.rank}")
        complete = header.get("complete")
        if not isinstance(complete, bool):
            raise TraceError(f"field 'complete' in {path}: expected true or false, got {complete!r}")
        self.complete: bool = complete
        stopped = header.get("stopped")
        if stopped is not None and not isinstance(stopped, dict):
            raise TraceError(f"field 'stopped' in {path}: expected an object or null, got {stopped!r}")
        self.stopped: dict | None = stopped
        error = header.get("error")
        self.error: str | None = error if isinstance(error, str) else None  # why the writer stopped (a full disk)
        self.num_minibatches: int = _int_field(header, "minibatches", path, low=0)
        self.num_chunks: int = _int_field(header, "chunks", path, low=0)
        self.num_remote_ids: int = _int_field(header, "remote_ids", path, low=0)
        self.num_bytes: int = _int_field(header, "bytes", path, low=0)
        ratio = header.get("bytes_per_remote_id")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise TraceError(f"field 'bytes_per_remote_id' in {path}: expected a number or null, got {ratio!r}")
        self.bytes_per_remote_id: float | None = None if ratio is None else float(ratio)
        self.meta: dict = _dict_field(header, "meta", path)
        self._static: dict[str, np.ndarray] | None = None
        self._minibatch_ids: list[np.ndarray] | None = None
        self._minibatch_seeds: list[np.ndarray] | None = None

    @property
    def static(self) -> dict[str, np.ndarray]:
        """The rank's static arrays by name (e.g. ``halo_ids``, ``halo_degree``, ``initial_ids``); a name it
        lacks raises :class:`TraceError` naming the file."""
        if self._static is None:
            self._static = _StaticArrays(self.directory / STATIC_FILE, _read_npz(self.directory / STATIC_FILE, None))
        return self._static

    def minibatch_ids(self) -> list[np.ndarray]:
        """Every minibatch's remote ids (sorted, int64, read-only), in minibatch order. Loads all chunks once."""
        if self._minibatch_ids is None:
            ids: list[np.ndarray] = []
            for chunk in self._chunks(with_ids=True):
                if chunk.id_offsets.size > 1:
                    ids.extend(np.split(chunk.ids, chunk.id_offsets[1:-1]))
            self._minibatch_ids = ids
        return self._minibatch_ids

    def prefetch_table(self) -> pd.DataFrame | None:
        """Per minibatch, what a background prefetch did (``arrived`` rows delivered before it, ``stall_s`` its demand
        pull waited), or None when the recording prefetched inline."""
        return self._optional_table("prefetch", PREFETCH_COLUMNS)

    def device_table(self) -> pd.DataFrame | None:
        """Per minibatch, the host-to-device copy (``h2d_s`` seconds of its ``fetch_s``, ``h2d_rows`` rows), or
        None when the recording trained on a CPU."""
        return self._optional_table("device", DEVICE_COLUMNS)

    def _optional_table(self, group: str, columns) -> pd.DataFrame | None:
        """The per-minibatch columns of an optional chunk group (``chunk.<group>``), or None where the recording
        has none (every chunk with minibatches has the group, or none has: :meth:`_chunks` checks it)."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
        for chunk in self._chunks(with_ids=False):
            values = getattr(chunk, group)
            if values is None:
                if chunk.id_offsets.size > 1:
                    return None
                continue  # a decisions-only last chunk
            for name in columns:
                parts[name].append(values[name])
        if not next(iter(parts.values())):
            return None
        return pd.DataFrame({name: np.concatenate(v) for name, v in parts.items()})

    def minibatch_seeds(self) -> list[np.ndarray] | None:
        """Every minibatch's seed ids (sorted int64, read-only), or None when the recording did not store them.
        Loads all chunks once (validated like every read) and caches the result."""
        if self._minibatch_seeds is None:
            seeds: list[np.ndarray] = []
            for chunk in self._chunks(with_ids=False, with_seeds=True):
                if chunk.seeds is None:
                    if chunk.id_offsets.size > 1:  # _chunks saw to it: then no chunk has seeds
                        return None
                    continue  # a decisions-only last chunk
                seeds.extend(np.split(chunk.seeds, chunk.seed_offsets[1:-1]))
            self._minibatch_seeds = seeds
        return self._minibatch_seeds

    def iter_minibatches(self) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
        """Yield ``(row, ids)`` per minibatch in order, one chunk in memory at a time: ``row`` maps the
        :meth:`table` columns to Python scalars, ``ids`` is the minibatch's sorted int64 remote ids (read-only).
        """
        names = list(MINIBATCH_COLUMNS)
        for chunk in self._chunks(with_ids=True):
            values = zip(*(chunk.columns[name].tolist() for name in names))
            for i, row in enumerate(values):
                yield dict(zip(names, row)), chunk.ids[chunk.id_offsets[i] : chunk.id_offsets[i + 1]]

    def table(self) -> pd.DataFrame:
        """One row per minibatch, columns as stored: ``minibatch`` (int64), ``epoch``, ``local_rows``,
        ``remote_count`` (int32), ``sample_s``, ``fetch_s``, ``compute_s`` (float32 seconds), ``fetch_rows``,
        ``hits``, ``remote_fetched``, ``prefetched`` (int32 rows). Does not decode the ids.
        """
        parts: dict[str, list[np.ndarray]] = {name: [] for name in MINIBATCH_COLUMNS}
        for chunk in self._chunks(with_ids=False):
            for name in MINIBATCH_COLUMNS:
                parts[name].append(chunk.columns[name])
        return pd.DataFrame(
            {
                name: np.concatenate(arrays) if arrays else np.zeros(0, MINIBATCH_COLUMNS[name])
                for name, arrays in parts.items()
            }
        )

    def decisions(self) -> pd.DataFrame:
        """One row per prefetch decision, in order: ``minibatch`` (int64: applied after this many minibatches),
        ``latency_s`` (float32 seconds), ``ids`` (object column: each an int64 array in the agent's order).
        """
        minibatch, latency_s, ids = [], [], []
        for chunk in self._chunks(with_ids=False):
            d = chunk.decisions
            minibatch.append(d["decision_minibatch"])
            latency_s.append(d["decision_latency_s"])
            if d["decision_minibatch"].size:
                ids.extend(np.split(d["decision_ids"], d["decision_offsets"][1:-1]))
        id_column = np.empty(len(ids), dtype=object)  # filled one by one: equal lengths must not become 2-D
        for i, decision_ids in enumerate(ids):
            id_column[i] = decision_ids
        return pd.DataFrame(
            {
                "minibatch": np.concatenate(minibatch) if minibatch else np.zeros(0, np.int64),
                "latency_s": np.concatenate(latency_s) if latency_s else np.zeros(0, np.float32),
                "ids": id_column,
            }
        )

    def to_parquet(self, path: str | os.PathLike, row_group_ids: int = 1 << 24) -> None:
        """Write :meth:`table` plus a ``remote_ids`` column (``list<int64>``, sorted ids per minibatch) to a
        parquet file, streaming chunk by chunk; a row group closes once it holds ``row_group_ids`` ids or 65536
        rows. ``pandas.read_parquet(path)`` reads it back (the list column as arrays).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = [pa.field(name, pa.from_numpy_dtype(dtype)) for name, dtype in MINIBATCH_COLUMNS.items()]
        provenance = {"schema": SCHEMA, "version": VERSION, "rank": self.rank, "complete": self.complete}
        schema = pa.schema(
            [*fields, pa.field(REMOTE_IDS, pa.list_(pa.int64()))], metadata={"rudder_trace": json.dumps(provenance)}
        )
        pending: list[pa.RecordBatch] = []
        pending_rows = pending_ids = 0
        with pq.ParquetWriter(path, schema) as out:
            for chunk in self._chunks(with_ids=True):
                if chunk.id_offsets[-1] > np.iinfo(np.int32).max:
                    raise ValueError(f"a chunk of {self.directory} holds over 2**31 ids: too many for list<int64>")
                id_lists = pa.ListArray.from_arrays(pa.array(chunk.id_offsets.astype(np.int32)), pa.array(chunk.ids))
                columns = [pa.array(chunk.columns[name]) for name in MINIBATCH_COLUMNS]
                pending.append(pa.RecordBatch.from_arrays([*columns, id_lists], schema=schema))
                pending_rows += len(chunk.id_offsets) - 1
                pending_ids += int(chunk.id_offsets[-1])
                if pending_rows >= 65536 or pending_ids >= row_group_ids:
                    out.write_table(pa.Table.from_batches(pending, schema=schema))
                    pending, pending_rows, pending_ids = [], 0, 0
            if pending:
                out.write_table(pa.Table.from_batches(pending, schema=schema))

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"RankTrace({str(self.directory)!r}, rank={self.rank}, minibatches={self.num_minibatches}, "
            f"chunks={self.num_chunks}, {state})"
        )

    def _chunks(self, *, with_ids: bool, with_seeds: bool = False) -> Iterator[_Chunk]:
        """Read and validate the chunks listed in ``rank.json``, in order; decode ids only if ``with_ids``, seeds
        only if ``with_seeds``. Seeds are optional, but then in every chunk that has minibatches or in none."""
        names = [*MINIBATCH_COLUMNS, *DECISION_ARRAYS] + ([REMOTE_IDS] if with_ids else [])
        next_minibatch: int | None = None  # where the next chunk must start
        last_decision = 0  # decisions of the next chunk must be >= this
        minibatches = remote_ids = 0
        first: dict[str, tuple[bool, Path]] = {}  # per optional group: whether the first chunk with minibatches had it
        for index in range(self.num_chunks):
            path = self.directory / chunk_file_name(index)
            if not path.is_file():
                raise TraceError(f"{path} missing: {self.directory / RANK_FILE} lists {self.num_chunks} chunks")
            arrays = _read_npz(path, names, optional=OPTIONAL_ARRAYS, known=CHUNK_ARRAYS + OPTIONAL_ARRAYS)
            chunk = _check_chunk(
                arrays,
                path,
                next_minibatch,
                last_decision,
                is_last=index == self.num_chunks - 1,
                with_ids=with_ids,
                with_seeds=with_seeds,
            )
            n = len(chunk.id_offsets) - 1
            if n:
                for group, marker in (
                    ("seeds", SEED_COUNT),
                    ("background prefetch columns", "arrived"),
                    ("device columns", "h2d_s"),
                ):
                    has = marker in arrays
                    seen = first.setdefault(group, (has, path))
                    if seen[0] != has:
                        with_it, without = (path, seen[1]) if has else (seen[1], path)
                        raise TraceError(
                            f"field {marker!r} in {without}: expected {group} as in {with_it} (a trace "
                            f"stores them in every chunk or in none), got none"
                        )
                next_minibatch = int(chunk.columns["minibatch"][-1]) + 1
            if chunk.decisions["decision_minibatch"].size:
                last_decision = int(chunk.decisions["decision_minibatch"][-1])
            last_decision = max(last_decision, next_minibatch or 0)  # later decisions are past this chunk
            minibatches += n
            remote_ids += int(chunk.id_offsets[-1])
            yield chunk
        rank_file = self.directory / RANK_FILE
        if minibatches != self.num_minibatches:
            raise TraceError(
                f"field 'minibatches' in {rank_file}: expected {minibatches} (rows in its "
                f"{self.num_chunks} chunks), got {self.num_minibatches}"
            )
        if remote_ids != self.num_remote_ids:
            raise TraceError(
                f"field 'remote_ids' in {rank_file}: expected {remote_ids} (sum of remote_count in its "
                f"chunks), got {self.num_remote_ids}"
            )


def _check_chunk(
    arrays: dict[str, np.ndarray],
    path: Path,
    next_minibatch: int | None,
    last_decision: int,
    *,
    is_last: bool,
    with_ids: bool,
    with_seeds: bool = False,
) -> _Chunk:
    """Validate one chunk's arrays against the format and the chunks before it; decode its ids (and seeds) if
    asked."""
    for name, dtype in {**MINIBATCH_COLUMNS, **DECISION_ARRAYS}.items():
        array = arrays[name]
        if array.dtype != dtype or array.ndim != 1:
            raise TraceError(f"field {name!r} in {path}: expected 1-D {dtype}, got {array.ndim}-D {array.dtype}")
    minibatch = arrays["minibatch"]
    n = minibatch.size
    for name in MINIBATCH_COLUMNS:
        if arrays[name].size != n:
            raise TraceError(
                f"field {name!r} in {path}: expected {n} values (one per minibatch), got {arrays[name].size}"
            )
    if n:
        if next_minibatch is not None and minibatch[0] != next_minibatch:
            raise TraceError(
                f"field 'minibatch' in {path}: expected the chunk to start at {next_minibatch} "
                f"(after the previous chunk), got {minibatch[0]}"
            )
        gaps = np.flatnonzero(np.diff(minibatch) != 1)
        if gaps.size:
            i = int(gaps[0]) + 1
            raise TraceError(
                f"field 'minibatch' in {path}: expected consecutive indices, got {minibatch[i]} "
                f"after {minibatch[i - 1]}"
            )
    counts = arrays["remote_count"].astype(np.int64)
    if n and counts.min() < 0:
        raise TraceError(f"field 'remote_count' in {path}: expected counts >= 0, got {counts.min()}")
    id_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=id_offsets[1:])

    ids = _decode(arrays, REMOTE_IDS, counts, id_offsets, path) if with_ids else None
    seeds = seed_offsets = None
    if SEED_COUNT in arrays or SEED_IDS in arrays:
        if n == 0:
            raise TraceError(
                f"field {SEED_COUNT!r} in {path}: expected no seeds in a chunk without minibatches, "
                f"got {arrays[SEED_COUNT].size if SEED_COUNT in arrays else 0}"
            )
        for name in SEED_ARRAYS:
            if name not in arrays:
                raise TraceError(f"{path} lacks array {name!r}: {' and '.join(SEED_ARRAYS)} go together")
        seed_counts = arrays[SEED_COUNT]
        if seed_counts.dtype != np.int32 or seed_counts.ndim != 1 or seed_counts.size != n:
            raise TraceError(
                f"field {SEED_COUNT!r} in {path}: expected 1-D int32 with {n} values (one per "
                f"minibatch), got {seed_counts.ndim}-D {seed_counts.dtype} with {seed_counts.size}"
            )
        seed_counts = seed_counts.astype(np.int64)
        if seed_counts.min() < 0:
            raise TraceError(f"field {SEED_COUNT!r} in {path}: expected counts >= 0, got {seed_counts.min()}")
        seed_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(seed_counts, out=seed_offsets[1:])
        if with_seeds:
            seeds = _decode(arrays, SEED_IDS, seed_counts, seed_offsets, path)

    decisions = {name: arrays[name] for name in DECISION_ARRAYS}
    when, offsets = decisions["decision_minibatch"], decisions["decision_offsets"]
    m = when.size
    if decisions["decision_latency_s"].size != m:
        raise TraceError(
            f"field 'decision_latency_s' in {path}: expected {m} values (one per decision), "
            f"got {decisions['decision_latency_s'].size}"
        )
    if (
        offsets.size != m + 1
        or offsets[0] != 0
        or np.any(np.diff(offsets) < 0)
        or offsets[-1] != decisions["decision_ids"].size
    ):
        raise TraceError(
            f"field 'decision_offsets' in {path}: expected {m + 1} non-decreasing offsets from 0 to "
            f"{decisions['decision_ids'].size} (len decision_ids), got {offsets.tolist()[:8]}"
            f"{'...' if offsets.size > 8 else ''}"
        )
    if m:
        if when[0] < last_decision or np.any(np.diff(when) < 0):
            raise TraceError(
                f"field 'decision_minibatch' in {path}: expected non-decreasing values from "
                f">= {last_decision}, got {when.tolist()[:8]}{'...' if m > 8 else ''}"
            )
        end = int(minibatch[-1]) + 1 if n else next_minibatch
        if not is_last and end is not None and when[-1] >= end:
            raise TraceError(
                f"field 'decision_minibatch' in {path}: expected values < {end} (later decisions "
                f"belong to a later chunk), got {when[-1]}"
            )
    prefetch = None
    if any(name in arrays for name in PREFETCH_COLUMNS):
        for name, dtype in PREFETCH_COLUMNS.items():
            a = arrays.get(name)
            if a is None:
                raise TraceError(f"{path} lacks array {name!r}: {' and '.join(PREFETCH_COLUMNS)} go together")
            if a.dtype != dtype or a.shape != (n,):
                raise TraceError(
                    f"field {name!r} in {path}: expected {n} values of {dtype}, got shape {a.shape} of {a.dtype}"
                )
        prefetch = {name: arrays[name] for name in PREFETCH_COLUMNS}
    device = None
    if any(name in arrays for name in DEVICE_COLUMNS):
        for name, dtype in DEVICE_COLUMNS.items():
            a = arrays.get(name)
            if a is None:
                raise TraceError(f"{path} lacks array {name!r}: {' and '.join(DEVICE_COLUMNS)} go together")
            if a.dtype != dtype or a.shape != (n,):
                raise TraceError(
                    f"field {name!r} in {path}: expected {n} values of {dtype}, got shape {a.shape} of {a.dtype}"
                )
        device = {name: arrays[name] for name in DEVICE_COLUMNS}
    return _Chunk(
        {name: arrays[name] for name in MINIBATCH_COLUMNS},
        ids,
        id_offsets,
        decisions,
        seeds,
        seed_offsets,
        prefetch,
        device,
    )


def _decode(
    arrays: dict[str, np.ndarray], name: str, counts: np.ndarray, offsets: np.ndarray, path: Path
) -> np.ndarray:
    """The delta-coded ids in ``arrays[name]`` (``counts`` per minibatch) as read-only int64, checked."""
    codes = arrays[name]
    if codes.dtype.kind != "u" or codes.ndim != 1:
        raise TraceError(
            f"field {name!r} in {path}: expected 1-D uint16, uint32 or uint64, got {codes.ndim}-D {codes.dtype}"
        )
    if codes.size != offsets[-1]:
        count = "remote_count" if name == REMOTE_IDS else SEED_COUNT
        raise TraceError(f"field {name!r} in {path}: expected {offsets[-1]} ids (sum of {count}), got {codes.size}")
    try:
        ids = delta_decode(codes, counts)
    except ValueError as exc:
        raise TraceError(f"field {name!r} in {path}: expected ids below 2**63, got {exc}") from None
    ids.setflags(write=False)
    return ids


# What damage to an .npz (a zip of .npy files) raises while reading it: zip structure (BadZipFile; a member's
# compression method or flags -> NotImplementedError, or RuntimeError "encrypted"; a size -> EOFError), deflate data
# (zlib.error), an .npy header (ValueError, SyntaxError, tokenize.TokenError from numpy's header parser), I/O.
_NPZ_DAMAGE = (
    zipfile.BadZipFile,
    zlib.error,
    ValueError,
    EOFError,
    OSError,
    RuntimeError,
    SyntaxError,
    tokenize.TokenError,
    struct.error,
    OverflowError,
)


def _read_npz(
    path: Path, names: list[str] | None, optional: tuple[str, ...] = (), known: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """The arrays ``names`` (all if None) and those of ``optional`` present, from an ``.npz`` file.

    Every member read is read whole, so zip's CRC-32 checks it: damage anywhere in its bytes is an error, never a
    silently different array. With ``known``, an array of any other name is an error too (a damaged member name
    must not pass for an absent optional array). Raises :class:`TraceError` naming the file and the array.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
            strangers = [
                name
                for name in archive.namelist()
                if known is not None and (not name.endswith(".npy") or name[:-4] not in known)
            ]
            if strangers:
                raise TraceError(
                    f"{path} holds an array this format does not have: {strangers[0]!r} (damaged, or "
                    f"not a rudder chunk)"
                )
            wanted = list(members) if names is None else names
            missing = [name for name in wanted if name not in members]
            if missing:
                raise TraceError(f"{path} lacks required array {missing[0]!r} (missing: {', '.join(missing)})")
            arrays = {}
            for name in [*wanted, *(n for n in optional if n in members and n not in wanted)]:
                try:
                    arrays[name] = np.lib.format.read_array(io.BytesIO(archive.read(members[name])), allow_pickle=False)
                except _NPZ_DAMAGE as exc:
                    raise TraceError(
                        f"field {name!r} in {path}: the array is truncated or corrupt: {type(exc).__name__}: {exc}"
                    ) from None
    except TraceError:
        raise
    except FileNotFoundError:
        raise TraceError(f"{path} missing") from None
    except _NPZ_DAMAGE as exc:
        raise TraceError(f"{path} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    return arrays


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; :class:`TraceError` if missing, not JSON, or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise TraceError(f"{path} missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_schema(header: dict, path: Path) -> None:
    """Raise :class:`TraceError` unless ``header`` declares schema ``rudder-trace`` version 1."""
    schema = header.get("schema")
    if schema != SCHEMA:
        raise TraceError(f"field 'schema' in {path}: expected {SCHEMA!r}, got {schema!r}")
    version = header.get("version")
    if type(version) is not int:
        raise TraceError(f"field 'version' in {path}: expected an integer, got {version!r}")
    if version != VERSION:
        raise TraceError(f"unknown schema version {version} in {path}: this rudder reads version {VERSION}")


def _int_field(header: dict, name: str, path: Path, *, low: int) -> int:
    value = header.get(name)
    if type(value) is not int or value < low:
        raise TraceError(f"field {name!r} in {path}: expected an integer >= {low}, got {value!r}")
    return value


def _dict_field(header: dict, name: str, path: Path) -> dict:
    value = header.get(name)
    if not isinstance(value, dict):
        raise TraceError(f"field {name!r} in {path}: expected a JSON object, got {value!r}")
    return value


def _join(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"
