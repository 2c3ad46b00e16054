"""The rudder trace format, schema "rudder-trace" version 1: names, file layout, chunk arrays and id delta coding.

:mod:`rudder.traces.writer` and :mod:`rudder.traces.reader` take every constant of the format from this module, so the
layout
described in ``traces/FORMAT.md`` is defined once in code. Bump :data:`VERSION` on any change a version-1 reader
would misread (renamed or retyped arrays, a different coding); adding optional JSON keys does not need a bump,
since readers ignore keys they do not know.
"""

from __future__ import annotations

import numpy as np

SCHEMA = "rudder-trace"
VERSION = 1

TRACE_FILE = "trace.json"  # run-level meta, written by trainer rank 0
RANK_FILE = "rank.json"  # per-rank header, rewritten at every chunk flush
CONDITIONS_FILE = "conditions.json"  # optional: the exogenous conditions a live run met (its launcher writes it)
STATIC_FILE = "static.npz"  # per-rank arrays given once at start
TMP_SUFFIX = ".tmp"  # every file is written as <name>.tmp, then renamed over <name>


class TraceError(ValueError):
    """A trace on disk does not follow the format; the message names the file, the field, expected and got."""


class TraceIncompleteWarning(UserWarning):
    """A trace's writer was never closed (killed run): the trace holds a readable prefix of the run."""


def rank_dir_name(rank: int) -> str:
    """Folder of one trainer rank inside the trace folder, e.g. ``rank3``."""
    return f"rank{rank}"


def chunk_file_name(index: int) -> str:
    """File of the ``index``-th chunk of a rank, e.g. ``chunk-000012.npz`` (wider past 999999)."""
    return f"chunk-{index:06d}.npz"


# One entry per minibatch, in table column order; the dtype each is stored as.
MINIBATCH_COLUMNS: dict[str, np.dtype] = {
    "minibatch": np.dtype(np.int64),  # global minibatch index over the run, consecutive
    "epoch": np.dtype(np.int32),
    "local_rows": np.dtype(np.int32),  # input rows owned by this rank's partition
    "remote_count": np.dtype(np.int32),  # remote ids of the minibatch (length of its remote_ids slice)
    "sample_s": np.dtype(np.float32),  # seconds sampling the minibatch
    "fetch_s": np.dtype(np.float32),  # seconds getting its input features (buffer + RPC)
    "compute_s": np.dtype(np.float32),  # seconds forward + backward + optimizer step
    "fetch_rows": np.dtype(np.int32),  # rows pulled over RPC in the minibatch
    "hits": np.dtype(np.int32),  # remote ids served from the recording run's buffer
    "remote_fetched": np.dtype(np.int32),  # rows the recording run's buffer pulled (misses + prefetched)
    "prefetched": np.dtype(np.int32),  # rows pulled only because a prefetch set asked for them
}

REMOTE_IDS = "remote_ids"  # per-minibatch sorted ids, delta-coded, concatenated
REMOTE_ID_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))

# One entry per decision (m of them), except offsets (m + 1) and ids (offsets[-1]).
DECISION_ARRAYS: dict[str, np.dtype] = {
    "decision_minibatch": np.dtype(np.int64),  # applied after this many minibatches (before minibatch k)
    "decision_latency_s": np.dtype(np.float32),  # seconds the agent took to decide
    "decision_offsets": np.dtype(np.int64),  # decision j's ids are decision_ids[offsets[j]:offsets[j + 1]]
    "decision_ids": np.dtype(np.int64),  # prefetch sets in the agent's order, concatenated
}

CHUNK_ARRAYS: tuple[str, ...] = (*MINIBATCH_COLUMNS, REMOTE_IDS, *DECISION_ARRAYS)

# Optional, per chunk, when the recording knew each minibatch's seed nodes (for sampler lookahead):
SEED_COUNT = "seed_count"  # int32[n]: seeds of each minibatch
SEED_IDS = "seed_ids"  # each minibatch's sorted seed ids, delta-coded like remote_ids, concatenated
SEED_ARRAYS: tuple[str, ...] = (SEED_COUNT, SEED_IDS)

# Optional, per chunk, when the recording prefetched in the background (one value per minibatch, in every chunk
# of the rank or in none):
PREFETCH_COLUMNS: dict[str, np.dtype] = {
    "arrived": np.dtype(np.int32),  # rows a background prefetch delivered into the buffer before the minibatch
    "stall_s": np.dtype(np.float32),  # seconds the minibatch's demand pull waited behind a prefetch chunk
}

# Optional, per chunk, when the recording trained on a GPU (one value per minibatch, in every chunk of the rank or
# in none); a trace without them trained on a CPU, where nothing is copied:
DEVICE_COLUMNS: dict[str, np.dtype] = {
    "h2d_s": np.dtype(np.float32),  # seconds of fetch_s copying the minibatch's input rows host-to-device
    "h2d_rows": np.dtype(np.int32),  # rows copied host-to-device (all input rows, or the pulled ones with the
    # buffer's rows on the device)
}

OPTIONAL_ARRAYS: tuple[str, ...] = (
    *SEED_ARRAYS,
    *PREFETCH_COLUMNS,
    *DEVICE_COLUMNS,
)  # a chunk holds no array but these and CHUNK_ARRAYS

MAX_NODE_ID = int(np.iinfo(np.int64).max)  # ids are read back as int64


def remote_id_dtype(max_value: int) -> np.dtype:
    """The smallest of uint16 / uint32 / uint64 that holds ``max_value`` (a non-negative int)."""
    for dtype in REMOTE_ID_DTYPES:
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"value {max_value} does not fit in uint64")


def delta_encode(sorted_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Delta-code the concatenated ids of consecutive minibatches.

    ``sorted_ids`` (int64, non-negative) is each minibatch's ids in ascending order, concatenated; ``counts`` gives
    each minibatch's number of ids. The first id of a minibatch is kept absolute, every other id becomes its
    difference to the previous id of the same minibatch. Returns the codes in the smallest unsigned dtype that holds
    the largest code (:func:`remote_id_dtype`).
    """
    codes = np.empty(sorted_ids.shape, dtype=np.int64)
    if sorted_ids.size == 0:
        return codes.astype(REMOTE_ID_DTYPES[0])
    codes[0] = sorted_ids[0]
    np.subtract(sorted_ids[1:], sorted_ids[:-1], out=codes[1:])
    starts = np.cumsum(counts, dtype=np.int64) - counts  # index of each minibatch's first id
    starts = starts[counts > 0]
    codes[starts] = sorted_ids[starts]
    return codes.astype(remote_id_dtype(int(codes.max())))


def delta_decode(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Invert :func:`delta_encode`: the concatenated sorted ids as int64, given the codes and per-minibatch counts.

    ``counts.sum()`` must equal ``codes.size`` (the caller checks it). Uses a running uint64 sum, whose wrap-around
    cancels when each minibatch's base is subtracted, so any id below 2**63 decodes exactly. Raises ``ValueError``
    if a decoded id does not fit in int64 (corrupt codes).
    """
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    running = np.cumsum(codes, dtype=np.uint64)
    ends = np.cumsum(counts, dtype=np.int64)
    before_start = ends - counts - 1  # index of the last code before each minibatch, -1 for the first
    base = np.where(before_start >= 0, running[np.maximum(before_start, 0)], np.uint64(0)).astype(np.uint64)
    running -= np.repeat(base, counts)
    if int(running.max()) > MAX_NODE_ID:
        raise ValueError(f"decoded id {int(running.max())} does not fit in int64")
    return running.view(np.int64)
