"""Fingerprints of trace ranks by content: what a learned agent learned from, recognised whatever a folder is called.

A learned agent (a PPO policy, the LLM's few-shot examples) records the fingerprint of every trace rank it learned
from; evaluation fingerprints each rank it scores and compares (:func:`provenance`). A fingerprint holds

- ``config``: the run options that decide which minibatches a trainer sees (graph, partitioning, trainers, fanout,
  batch size, seed; :data:`STREAM_CONFIG`), from the trace's ``trace.json``;
- ``ids``: a hash of the rank's whole remote-id stream (each minibatch's id count and sorted ids, in order), and
  ``epochs``: one such hash per epoch, so a run that shares an epoch's minibatches with another (the same options
  and seed, more or fewer epochs) is recognised too;
- for reading only: the trace's folder name, the rank, minibatch and id counts.

The hash streams over the trace's chunks (one chunk in memory at a time): BLAKE2b of the ids as little-endian int64,
so it does not depend on how the ids were chunked or coded on disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np

from .reader import RankTrace, Trace

# run options that decide a trainer's minibatches (the agent, buffer and epochs do not change the first epochs')
STREAM_CONFIG = ("graph", "parts", "partition", "trainers_per_part", "fanout", "batch_size", "seed")

TRAINED_ON = "trained-on"  # the rank's id stream, or one of its epochs, was learned from
SAME_CONFIG = "same-config"  # not its ids, but a rank of a run with the same options and seed (e.g. another rank)
HELD_OUT = "held-out"
UNKNOWN = "unknown"  # the agent learned from traces it cannot name by content (e.g. a policy saved before fingerprints)
NOT_HELD_OUT = (TRAINED_ON, SAME_CONFIG, UNKNOWN)


def stream_config(trace: Trace) -> dict:
    """The run options of ``trace`` that decide its minibatches (those present in its ``trace.json``)."""
    config = trace.meta.get("config", {}) if isinstance(trace.meta.get("config"), dict) else {}
    return {key: config[key] for key in STREAM_CONFIG if key in config}


def _digest() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=16)


def rank_fingerprint(trace: Trace | str | os.PathLike, rank: int) -> dict:
    """The fingerprint of one rank of a trace (see the module docstring); reads the rank's chunks once."""
    trace = trace if isinstance(trace, Trace) else Trace(trace)
    rank_trace: RankTrace = trace.rank(rank)
    whole = _digest()
    epochs: list[str] = []
    epoch, current = None, None
    minibatches = remote_ids = 0
    for row, ids in rank_trace.iter_minibatches():
        if row["epoch"] != epoch:
            if current is not None:
                epochs.append(current.hexdigest())
            epoch, current = row["epoch"], _digest()
        data = np.asarray(ids, dtype="<i8")
        head = np.int64(data.size).astype("<i8").tobytes()
        for h in (whole, current):
            h.update(head)
            h.update(data.tobytes())
        minibatches += 1
        remote_ids += int(data.size)
    if current is not None:
        epochs.append(current.hexdigest())
    return dict(
        trace=os.path.basename(os.path.normpath(str(trace.directory))),
        rank=int(rank),
        config=stream_config(trace),
        minibatches=minibatches,
        remote_ids=remote_ids,
        ids=whole.hexdigest(),
        epochs=epochs,
    )


def trace_fingerprints(trace: Trace | str | os.PathLike, ranks: Iterable[int] | None = None) -> list[dict]:
    """Fingerprints of ``ranks`` of a trace (default: every rank it holds)."""
    trace = trace if isinstance(trace, Trace) else Trace(trace)
    return [rank_fingerprint(trace, r) for r in (trace.ranks if ranks is None else ranks)]


def provenance(learned_from, fingerprint: dict) -> str:
    """How an agent relates to the trace rank with ``fingerprint``: ``""`` (not a learned agent), ``trained-on``,
    ``same-config``, ``held-out`` or ``unknown``.

    ``learned_from`` is the agent's ``trained_on``: None for an agent that learned nothing from traces, else a list
    of fingerprints. Entries without an id hash (a bare trace name, as policies saved before fingerprints recorded)
    can show that a rank was trained on (same folder name) but never that it was held out: ``unknown``.
    """
    if learned_from is None:
        return ""
    unverifiable = False
    config = fingerprint.get("config") or {}
    same_config = False
    for entry in learned_from:
        if isinstance(entry, str):
            entry = dict(trace=entry)
        if not isinstance(entry, dict):
            unverifiable = True
            continue
        if entry.get("ids"):
            if entry["ids"] == fingerprint.get("ids") or set(entry.get("epochs") or ()) & set(fingerprint["epochs"]):
                return TRAINED_ON
            if config and entry.get("config") == config:
                same_config = True
        elif (
            entry.get("trace") == fingerprint.get("trace")
            and entry.get("rank", fingerprint["rank"]) == fingerprint["rank"]
        ):
            return TRAINED_ON
        else:
            unverifiable = True
    if same_config:
        return SAME_CONFIG
    return UNKNOWN if unverifiable else HELD_OUT
