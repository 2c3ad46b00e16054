"""Smaller action spaces over the prefetch environments: a budget of top candidates, and Rudder's yes/no.

Both map their action to the base env's ``MultiBinary(K)`` over the ranked candidates. For SB3, flatten the
observation with ``gymnasium.wrappers.FlattenObservation``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class _RankedPrefix(gym.Wrapper):
    """Base: remembers the last info and turns "admit the top j candidates" into the base action."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.k = env.action_space.n
        self._info: dict = {}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._info = info
        return obs, info

    def _top(self, j: int) -> np.ndarray:
        action = np.zeros(self.k, dtype=np.int8)
        action[: max(0, min(int(j), self.k))] = 1
        return action

    def _step_top(self, j: int):
        obs, reward, terminated, truncated, info = self.env.step(self._top(j))
        self._info = info
        return obs, reward, terminated, truncated, info


class Budget(_RankedPrefix):
    """``Discrete(len(levels))``: action ``i`` admits the top ``levels[i]`` candidates (capped at K).

    Args:
        levels: increasing candidate counts; must start with 0 (do nothing).
    """

    def __init__(self, env: gym.Env, levels=(0, 16, 64, 256)):
        super().__init__(env)
        levels = [int(v) for v in levels]
        if not levels or levels[0] != 0 or sorted(set(levels)) != levels:
            raise ValueError(f"Budget levels must be strictly increasing and start at 0, got {levels}")
        self.levels = levels
        self.action_space = spaces.Discrete(len(levels))

    def step(self, action):
        if not self.action_space.contains(np.int64(action)):
            raise ValueError(f"Budget action must be an integer in [0, {len(self.levels)}), got {action!r}")
        return self._step_top(self.levels[int(action)])


class EvictOrKeep(_RankedPrefix):
    """``Discrete(2)``, Rudder's decision: 0 keeps the buffer; 1 admits every candidate that has a slot below the
    eviction threshold (or empty) to replace — the top ``min(n_candidates, n_evictable)`` candidates."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.action_space = spaces.Discrete(2)

    def step(self, action):
        if not self.action_space.contains(np.int64(action)):
            raise ValueError(f"EvictOrKeep action must be 0 (keep) or 1 (evict and prefetch), got {action!r}")
        j = min(self._info.get("n_candidates", 0), self._info.get("n_evictable", 0)) if int(action) else 0
        return self._step_top(j)
