"""Smaller action spaces and training rewards over the prefetch environments (``rudder/Live-v0``, ``rudder/Replay-v0``).

Every action wrapper maps its ``Discrete`` action to the base env's ``MultiBinary(K)`` "admit the top ``j`` ranked
candidates" (:func:`rudder.env.contract.top_j`):

- :class:`Budget`: action ``i`` admits the top ``levels[i]`` candidates (counts).
- :class:`FractionBudget`: action ``i`` admits ``round(levels[i] * j)`` of the ``j`` candidates that have a slot to
  take (fractions; the PPO agent's action space).
- :class:`EvictOrKeep`: Rudder's yes/no, the two-level :class:`FractionBudget` ``(0, 1)`` (always "yes" is
  MassiveGNN's periodic policy).

:class:`RelativeReward` turns the reward into the difference to always playing the top level. For SB3, flatten the
observation with ``gymnasium.wrappers.FlattenObservation``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from rudder.env.contract import top_fraction, top_j
from rudder.env.defaults import COUNT_LEVELS, FRACTION_LEVELS
from rudder.env.settings import check_count_levels, check_fraction_levels

DEFAULT_LEVELS = FRACTION_LEVELS  # FractionBudget's levels (rudder.env.defaults)


def parse_levels(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5,1"`` -> ``(0.0, 0.25, 0.5, 1.0)``, checked by
    :func:`~rudder.env.settings.check_fraction_levels`."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"levels must be comma-separated fractions such as 0,0.25,0.5,1, got {text!r}") from None
    return check_fraction_levels(values)


class _Levels(gym.Wrapper):
    """Base: ``Discrete(len(levels))`` actions, each turned into a base action from the last ``info``."""

    def __init__(self, env: gym.Env, levels: Sequence):
        gym.Wrapper.__init__(self, env)
        self.levels = tuple(levels)
        self.k = int(env.action_space.n)
        self.action_space = spaces.Discrete(len(self.levels))
        self._info: dict[str, Any] = {}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._info = info
        return obs, info

    @staticmethod
    def base_action(level, info, k: int) -> np.ndarray:
        """The base env's ``MultiBinary(k)`` action for ``level`` at the decision ``info`` describes (an agent that
        plays a policy trained on this wrapper maps its actions the same way)."""
        raise NotImplementedError

    def _base_action(self, level) -> np.ndarray:
        return self.base_action(level, self._info, self.k)

    def _describe_actions(self) -> str:
        return f"an integer in [0, {len(self.levels)})"

    def step(self, action):
        if not self.action_space.contains(np.int64(action)):
            raise ValueError(f"{type(self).__name__} action must be {self._describe_actions()}, got {action!r}")
        obs, reward, terminated, truncated, info = self.env.step(self._base_action(self.levels[int(action)]))
        self._info = info
        return obs, reward, terminated, truncated, info


class Budget(_Levels, gym.utils.RecordConstructorArgs):
    """``Discrete(len(levels))``: action ``i`` admits the top ``levels[i]`` candidates (capped at K).

    Args:
        levels: increasing candidate counts; must start with 0 (do nothing).
    """

    def __init__(self, env: gym.Env, levels=COUNT_LEVELS):
        levels = check_count_levels(levels)
        gym.utils.RecordConstructorArgs.__init__(self, levels=levels)
        _Levels.__init__(self, env, levels)

    @staticmethod
    def base_action(level, info, k: int) -> np.ndarray:
        return top_j(k, level)


class FractionBudget(_Levels, gym.utils.RecordConstructorArgs):
    """``Discrete(len(levels))``: action ``i`` admits the top ``round(levels[i] * j)`` candidates,
    ``j = min(n_candidates, n_evictable)`` at that decision.

    Args:
        env: a ``rudder/Replay-v0`` or ``rudder/Live-v0`` env (``MultiBinary(K)`` actions).
        levels: fractions, strictly increasing from 0 (keep the buffer) to at most 1 (replace every evictable slot).
    """

    def __init__(self, env: gym.Env, levels: Sequence[float] = DEFAULT_LEVELS):
        levels = check_fraction_levels(levels)
        gym.utils.RecordConstructorArgs.__init__(self, levels=levels)
        _Levels.__init__(self, env, levels)

    @staticmethod
    def base_action(level, info, k: int) -> np.ndarray:
        return top_fraction(level, info, k)


class EvictOrKeep(FractionBudget):
    """``Discrete(2)``, Rudder's decision: 0 keeps the buffer; 1 admits every candidate that has a slot to take
    (empty, below the eviction threshold, or needed less) — :class:`FractionBudget` with levels ``(0, 1)``."""

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)  # recreated from its spec without levels (the first call wins)
        FractionBudget.__init__(self, env, (0.0, 1.0))

    def _describe_actions(self) -> str:
        return "0 (keep) or 1 (evict and prefetch)"


class RelativeReward(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Training reward: the window's reward minus the reward of always playing the top level (1.0: the periodic
    policy) in the same window, times ``scale``.

    With ``reward="traffic"``, top level 1.0 and ``scale=1000`` that is remote rows saved versus periodic per 1000
    remote rows sampled. The reference depends only on the window index, so the best policy is unchanged; it
    removes the large, nearly constant part of the return that the value function would otherwise have to fit to
    within the few rows in 10^4 by which the actions differ. The reference is one episode played from the first
    ``reset`` (so with the same initial buffer as that episode).

    On a prefetch env with link-budget levels (``levels=``) the reference is always playing level 0 (no prefetch
    beyond admit-on-miss): with ``reward="time"`` and ``scale=100``, hundredths of a second saved per window by
    what the agent prefetched.

    Args:
        env: a :class:`FractionBudget`-wrapped prefetch env, or one with ``levels=``.
        scale: multiplier of the reward difference.
    """

    def __init__(self, env, scale: float = 1000.0):
        gym.utils.RecordConstructorArgs.__init__(self, scale=scale)
        gym.Wrapper.__init__(self, env)
        if isinstance(env, FractionBudget):
            self._reference_action = len(env.levels) - 1
        elif getattr(env.unwrapped, "levels", None) is not None:
            self._reference_action = 0
        else:
            raise TypeError(
                f"RelativeReward wraps a FractionBudget env or one with link-budget levels, got {type(env).__name__}"
            )
        self.scale = float(scale)
        self.reference: np.ndarray | None = None
        self._window = 0

    def reset(self, **kwargs):
        if self.reference is None:
            rewards, done = [], False
            self.env.reset(**kwargs)
            while not done:
                _, reward, terminated, truncated, _ = self.env.step(self._reference_action)
                rewards.append(reward)
                done = terminated or truncated
            self.reference = np.asarray(rewards, dtype=np.float64)
        self._window = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        ref = self.reference[min(self._window, self.reference.size - 1)]
        self._window += 1
        info["env_reward"] = reward
        return obs, (reward - ref) * self.scale, terminated, truncated, info
