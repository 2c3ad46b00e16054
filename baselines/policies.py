"""Non-learning prefetch policies as agents: no prefetch, static buffer, periodic (MassiveGNN)."""

from __future__ import annotations

import numpy as np


class _Fixed:
    name = "fixed"
    uses_buffer = True  # False: the run keeps no buffer at all (capacity 0)
    static = False  # True: the buffer is filled once and never changed (no admit-on-miss either)

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> np.ndarray:
        return np.zeros(observation["candidates"].shape[0], dtype=np.int8)


class NoPrefetch(_Fixed):
    """No buffer: every remote row is pulled on demand."""

    name = "none"
    uses_buffer = False


class StaticBuffer(_Fixed):
    """The buffer filled once at the start (``--buffer-init``), never changed."""

    name = "static"
    static = True


class Periodic(_Fixed):
    """MassiveGNN: every window, every slot below the eviction threshold (or empty) takes the next most-missed
    candidate, up to the K candidates offered."""

    name = "periodic"

    def act(self, observation, info) -> np.ndarray:
        action = np.zeros(observation["candidates"].shape[0], dtype=np.int8)
        action[: min(info["n_candidates"], info["n_evictable"])] = 1
        return action
