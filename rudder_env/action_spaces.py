"""Action spaces that can use exogenous conditions, beside today's link-budget levels and keep/replace.

Under a time-varying link (:mod:`rudder.env.scenario`) a decision could pay off by acting *ahead* of a change: stock
rows up while the link is fast, stop queued transfers when it slows. Today's levels cannot: a level never asks for
more than one window's link budget, and the lookahead ranking knows only the minibatches sampled ahead. Each space
below is a replay env option or a wrapper, replayable with snapshot/restore like any other (:func:`make`):

- ``levels``: today's link-budget levels ``(0, 0.125, 0.25, 0.5, 1)`` over the lookahead ranking with admit-on-miss.
- ``stockup``: levels up to 4 link budgets (``(0, 0.125, 0.25, 0.5, 1, 2, 4)``): background prefetch queues what
  does not fit one window and keeps the link busy into the next ones, bounded by the buffer's capacity.
- ``cancel``: :class:`CancelQueued` over ``stockup``: each level, or the same level after dropping the background
  chunks requested but not started (e.g. when the link has slowed and a stocked-up queue would stall demand pulls).
- ``horizon``: ``levels`` with a longer sample-ahead (``sample_ahead=16`` minibatches unless told): the lookahead
  knows more minibatches exactly.
- ``stockup-horizon``: ``stockup``'s levels with ``horizon``'s sample-ahead: rows known further ahead to stock up.
- ``keep-replace``: Rudder's lever over the decayed-misses ranking, no sample-ahead: admit a fraction
  ``(0, 0.25, 0.5, 1)`` of the candidates that have an evictable slot (:class:`~rudder.env.wrappers.FractionBudget`),
  over ``candidates=2048``.
- ``threshold``: :class:`EvictionThreshold` over the misses ranking: per window, the age past which a resident row
  may be evicted (multiples ``(0.5, 1, 2, 4)`` of the decision period), and every candidate with a slot admitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from rudder.env.contract import LINK_LEVELS, top_j
from rudder.env.wrappers import FractionBudget

STOCKUP_LEVELS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
THRESHOLD_PERIODS = (0.5, 1.0, 2.0, 4.0)
MISSES_CANDIDATES = 2048
HORIZON_SAMPLE_AHEAD = 16
SPACES = ("levels", "stockup", "cancel", "horizon", "stockup-horizon", "keep-replace", "threshold")


class CancelQueued(gym.Wrapper):
    """``Discrete(2 * n)`` over an env with ``n`` link-budget levels: action ``a < n`` plays level ``a``; action
    ``n + a`` first drops the background chunks requested but not started
    (:meth:`~rudder.env.replay_env.ReplayEnv.cancel_queued`: their rows become candidates again), then plays level
    ``a``. ``info["cancelled_rows"]`` says how many rows were dropped."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.n = int(env.action_space.n)
        self.action_space = spaces.Discrete(2 * self.n)

    def step(self, action):
        a = int(action)
        if not 0 <= a < 2 * self.n:
            raise ValueError(f"CancelQueued action must be an integer in [0, {2 * self.n}), got {action!r}")
        cancelled = self.env.unwrapped.cancel_queued() if a >= self.n else 0
        obs, reward, terminated, truncated, info = self.env.step(a % self.n)
        info["cancelled_rows"] = cancelled
        return obs, reward, terminated, truncated, info


class EvictionThreshold(gym.Wrapper):
    """``Discrete(len(periods))`` over a ``MultiBinary(K)`` env with the misses ranking: action ``i`` sets the
    buffer's eviction age to ``periods[i]`` decision periods for the next window (a resident not hit for that many
    minibatches may be replaced, by prefetch or admit-on-miss) and admits every top candidate that has such a slot.

    Args:
        env: a ``rudder/Replay-v0`` (or Live) env with ``ranking="misses"`` and no levels.
        periods: eviction ages as multiples of the decision period, increasing.
    """

    def __init__(self, env: gym.Env, periods: Sequence[float] = THRESHOLD_PERIODS):
        super().__init__(env)
        if getattr(env.unwrapped, "ranking", None) != "misses" or getattr(env.unwrapped, "levels", None) is not None:
            raise ValueError("EvictionThreshold wraps an env with ranking='misses' and no levels")
        self.periods = tuple(float(p) for p in periods)
        if not self.periods or any(p <= 0 for p in self.periods):
            raise ValueError(f"EvictionThreshold periods must be positive, got {list(periods)}")
        self.k = int(env.action_space.n)
        self.action_space = spaces.Discrete(len(self.periods))

    def step(self, action):
        a = int(action)
        if not 0 <= a < len(self.periods):
            raise ValueError(f"EvictionThreshold action must be an integer in [0, {len(self.periods)}), got {action!r}")
        base = self.env.unwrapped
        buf = base.episode.buffer
        buf.period = max(1, int(round(self.periods[a] * base.period)))
        buf.threshold = buf.decay**buf.period
        candidates = base.episode.candidate_ids
        j = min(int(np.count_nonzero(candidates >= 0)), int(np.count_nonzero(buf.evictable())))
        return self.env.step(top_j(self.k, j))


def make(space: str, trace, rank: int = 0, scenario=None, sample_ahead=None, **env_kwargs) -> gym.Env:
    """A replay env (``reward="time"``, link model for arrivals) with action space ``space`` (one of
    :data:`SPACES`); ``env_kwargs`` go to :class:`~rudder.env.replay_env.ReplayEnv` (e.g. ``buffer_fraction``)."""
    from rudder.env.replay_env import ReplayEnv

    if space not in SPACES:
        raise ValueError(f"unknown action space {space!r}: expected one of {', '.join(SPACES)}")
    sampled_only = bool(env_kwargs.pop("sampled_only", False))  # the lookahead from sampled-ahead minibatches alone
    common = dict(reward="time", follow_recorded=False, scenario=scenario, **env_kwargs)
    lookahead = dict(ranking="lookahead", admit_on_miss=True, sampled_only=sampled_only)
    if space in ("levels", "horizon"):
        ahead = HORIZON_SAMPLE_AHEAD if (space == "horizon" and sample_ahead is None) else sample_ahead
        return ReplayEnv(trace, rank, levels=LINK_LEVELS, sample_ahead=ahead, **lookahead, **common)
    if space in ("stockup", "stockup-horizon", "cancel"):
        ahead = HORIZON_SAMPLE_AHEAD if (space == "stockup-horizon" and sample_ahead is None) else sample_ahead
        env = ReplayEnv(trace, rank, levels=STOCKUP_LEVELS, sample_ahead=ahead, **lookahead, **common)
        return CancelQueued(env) if space == "cancel" else env
    env = ReplayEnv(trace, rank, candidates=MISSES_CANDIDATES, ranking="misses", admit_on_miss=True, **common)
    return FractionBudget(env) if space == "keep-replace" else EvictionThreshold(env)
