"""Observation and action spaces of the prefetch environments, and the observation built from a buffer's state.

Observation (``gymnasium.spaces.Dict`` of float32 ``Box`` es, every entry in [0, 1]):

=============== ===== =================================================================================
key             shape what it holds
=============== ===== =================================================================================
``buffer``      (5,)  occupancy / capacity; hit rate over the last window; hit rate since the start;
                      fraction of slots below the eviction threshold ``(1-alpha)**period``;
                      capacity / halo nodes
``score_hist``  (8,)  histogram of resident slot scores over [0, 1] in 8 equal bins, as fractions of capacity
``sampler``     (6,)  per minibatch of the window: input rows, remote rows sampled (both ``lg``-scaled);
                      distinct remote rows of the window / remote rows sampled; local fraction of input rows;
                      product of the fanouts and the batch size (``lg``-scaled)
``traffic``     (5,)  per minibatch of the window: rows fetched on demand, rows prefetched (``lg``-scaled);
                      fetch and compute milliseconds (``lg``-scaled); remote rows fetched / remote rows sampled
                      over the window (halved, clipped to 1)
``candidates``  (K,)  scores of the top-K non-resident candidates, best first (0: none), scaled by the ranking's
                      ``score_scale`` x alpha: decayed miss counts x alpha² (misses), predicted need x
                      (1-discount) x alpha (lookahead)
``residents``   (K,)  scores of the K lowest-score residents, lowest first (empty slot: 0; no slot: 1)
``progress``    (1,)  fraction of the run's minibatches done
``link``        (8,)  the link and the prefetch pipeline (:class:`rudder.env.episode.LinkEstimate`): link
                      utilisation over the last window (modelled busy seconds of every pull, background
                      chunks included, over the window's seconds); stall and hideable (sampling + compute)
                      milliseconds per minibatch (``lg``-scaled); the link budget of the next window (remote
                      rows it can carry while the trainer samples and computes) / capacity, clipped; predicted
                      need of the candidates the full budget would bring over that plus the need of the
                      residents they would replace (0.5: equal); late misses over rows requested in the
                      window; prefetched rows evicted unused over rows that arrived; 1 when no candidate can be
                      admitted (nothing to decide), else 0
=============== ===== =================================================================================

``lg(x) = log1p(x) / log1p(1e7)`` clipped to [0, 1]. The decision is a ``MultiBinary(K)`` over the ranked
candidates whose node ids are ``info["candidate_ids"]`` (``-1`` past the last candidate; bits set there are
ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces
from rudder.env.buffer import EMPTY, MinibatchCounts, PrefetchBuffer

HIST_BINS = 8
LINK_FEATURES = 8
_LG_TOP = np.log1p(1e7)


def lg(x: float) -> float:
    return float(np.clip(np.log1p(max(x, 0.0)) / _LG_TOP, 0.0, 1.0))


def observation_space(k: int) -> spaces.Dict:
    def box(n):
        return spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)

    return spaces.Dict(
        {
            "buffer": box(5),
            "score_hist": box(HIST_BINS),
            "sampler": box(6),
            "traffic": box(5),
            "candidates": box(k),
            "residents": box(k),
            "progress": box(1),
            "link": box(LINK_FEATURES),
        }
    )


def observation_layout(space: spaces.Dict) -> list[list]:
    """``[[key, size], ...]`` in the order ``gymnasium.spaces.flatten`` concatenates a ``Dict`` observation."""
    return [[key, int(spaces.flatdim(sub))] for key, sub in space.spaces.items()]


def fit_k(observation: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """``observation`` with ``candidates`` and ``residents`` cut or padded to ``k`` entries, for a policy trained
    with another K (missing candidates read 0: none; missing residents 1: no slot)."""
    obs = dict(observation)
    for key, pad in (("candidates", 0.0), ("residents", 1.0)):
        v = np.asarray(obs[key], dtype=np.float32)
        if v.size != k:
            obs[key] = np.concatenate([v[:k], np.full(max(k - v.size, 0), pad, np.float32)])
    return obs


def action_space(k: int, levels=None) -> spaces.Space:
    """``MultiBinary(k)`` over the top-k candidates, or ``Discrete(len(levels))`` with link-budget levels."""
    return spaces.MultiBinary(k) if levels is None else spaces.Discrete(len(levels))


@dataclass
class WindowStats:
    """Sums over the minibatches of one decision window: the one declaration of what ``info["window"]`` holds
    (:data:`rudder.env.contract.WindowInfo` is its ``as_dict``, typed from these fields)."""

    minibatches: int = 0
    input_rows: int = 0  # local + remote input rows sampled
    local_rows: int = 0
    remote_sampled: int = 0  # remote input rows needed
    hits: int = 0  # of which served from the buffer
    misses: int = 0  # of which pulled on demand
    remote_fetched: int = 0  # rows pulled over RPC: misses + prefetched
    prefetched: int = 0  # rows pulled only because a prefetch set asked for them
    sample_s: float = 0.0
    fetch_s: float = 0.0  # measured live; modelled in replay
    compute_s: float = 0.0
    distinct_remote: int = 0  # remote ids seen for the first time in this window
    stall_s: float = 0.0  # of fetch_s: demand pulls waiting behind a background prefetch chunk
    late: int = 0  # misses on rows requested by a prefetch and not delivered yet
    arrived: int = 0  # of prefetched: rows background prefetch delivered

    def add(
        self,
        remote_ids: np.ndarray,
        local_rows: int,
        counts: MinibatchCounts,
        sample_s: float,
        fetch_s: float,
        compute_s: float,
        new_distinct: int,
        stall_s: float = 0.0,
    ) -> None:
        self.minibatches += 1
        self.input_rows += local_rows + remote_ids.size
        self.local_rows += local_rows
        self.remote_sampled += counts.remote_sampled
        self.hits += counts.hits
        self.misses += counts.misses
        self.remote_fetched += counts.remote_fetched
        self.prefetched += counts.prefetched
        self.sample_s += sample_s
        self.fetch_s += fetch_s
        self.compute_s += compute_s
        self.distinct_remote += new_distinct
        self.stall_s += stall_s
        self.late += counts.late
        self.arrived += counts.arrived

    @property
    def seconds(self) -> float:
        return self.sample_s + self.fetch_s + self.compute_s

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def build_observation(
    buffer: PrefetchBuffer,
    window: WindowStats,
    cum_hits: int,
    cum_remote: int,
    progress: float,
    candidate_scores: np.ndarray,
    halo_nodes: int,
    fanouts: list[int],
    batch_size: int,
    link=None,
) -> dict[str, np.ndarray]:
    """The observation at a decision point (see the module docstring for every entry)."""
    cap = max(buffer.capacity, 1)
    scores = buffer.slot_scores()
    resident = buffer.slot_ids != EMPTY
    occupancy = int(resident.sum())
    below = int(np.count_nonzero(resident & (scores < buffer.threshold)))
    bins = np.minimum((scores[resident] * HIST_BINS).astype(np.int64), HIST_BINS - 1)  # scores are in [0, 1]
    hist = np.bincount(bins, minlength=HIST_BINS) / cap
    w, mb = window, max(window.minibatches, 1)
    k = candidate_scores.size
    low = np.where(resident, scores, 0.0)
    low = np.sort(np.partition(low, k - 1)[:k] if 0 < k < low.size else low)[:k]  # the k lowest, ascending
    residents = np.ones(k, dtype=np.float32)
    residents[: low.size] = low
    obs = {
        "buffer": [
            occupancy / cap,
            w.hits / max(w.remote_sampled, 1),
            cum_hits / max(cum_remote, 1),
            below / cap,
            buffer.capacity / max(halo_nodes, 1),
        ],
        "score_hist": hist,
        "sampler": [
            lg(w.input_rows / mb),
            lg(w.remote_sampled / mb),
            w.distinct_remote / max(w.remote_sampled, 1),
            w.local_rows / max(w.input_rows, 1),
            lg(float(np.prod(fanouts)) * batch_size),
            lg(batch_size),
        ],
        "traffic": [
            lg(w.misses / mb),
            lg(w.prefetched / mb),
            lg(1000 * w.fetch_s / mb),
            lg(1000 * w.compute_s / mb),
            w.remote_fetched / max(w.remote_sampled, 1) / 2,
        ],
        "candidates": candidate_scores,
        "residents": residents,
        "progress": [progress],
        "link": np.zeros(LINK_FEATURES) if link is None else link,
    }
    return {key: np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) for key, v in obs.items()}


def check_action(action, k: int) -> np.ndarray:
    """The action as a bool mask of length ``k``; a clear error for anything else."""
    arr = np.asarray(action)
    if arr.shape != (k,):
        raise ValueError(f"action must be a MultiBinary({k}) array of shape ({k},), got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise ValueError(f"action must hold integers or booleans (0/1), got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"action entries must be 0 or 1, got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(bool)
