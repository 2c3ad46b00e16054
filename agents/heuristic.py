"""A hit-rate rule: replace the buffer's stale entries only when the hit rate is slipping or many slots are stale."""

from __future__ import annotations

import numpy as np


class HitRateRule:
    """Every window, admit the candidates that have an evictable slot (like MassiveGNN's periodic policy) only if

    - the last window's hit rate fell more than ``drop`` below the hit rate since the start, or
    - at least ``stale_fraction`` of the buffer's slots are empty or below the eviction threshold;

    otherwise keep the buffer (and its prefetch traffic) as it is.
    """

    name = "hitrate"

    def __init__(self, drop: float = 0.02, stale_fraction: float = 0.25):
        self.drop = drop
        self.stale_fraction = stale_fraction

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> np.ndarray:
        k = observation["candidates"].shape[0]
        action = np.zeros(k, dtype=np.int8)
        window_hit_rate, cumulative_hit_rate = observation["buffer"][1], observation["buffer"][2]
        stale = info["n_evictable"] / max(info["capacity"], 1)
        if window_hit_rate < cumulative_hit_rate - self.drop or stale >= self.stale_fraction:
            action[: min(info["n_candidates"], info["n_evictable"])] = 1
        return action


class Lookahead:
    """Sampler lookahead (ours): candidates and victims ranked by the remote rows the next minibatches will probably
    need, from the epoch's known seed order and the partition's structure (:mod:`rudder_env.lookahead`); every
    window, admit each candidate needed more than the resident it would replace, and let missed rows in on the
    same terms (admit-on-miss by predicted need). An online approximation of Belady's MIN."""

    name = "lookahead"
    ranking = "lookahead"
    admit_on_miss = True  # missed rows enter in place of residents predicted to be needed less

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> np.ndarray:
        action = np.zeros(observation["candidates"].shape[0], dtype=np.int8)
        action[: min(info["n_candidates"], info["n_evictable"])] = 1
        return action
