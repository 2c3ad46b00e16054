"""Non-learning prefetch policies as agents: no prefetch, static buffer (``--buffer-init`` fill, or SALIENT++'s VIP
fill), periodic (MassiveGNN), the periodic policy under the sampler lookahead's ranking, a hit-rate rule, random
budget levels, a fixed link-budget level, and a recorded run's decisions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rudder.agents.base import Agent
from rudder.env.contract import LINK_LEVELS, BufferSettings, admissible, top_fraction, top_j
from rudder.env.defaults import LOOKAHEAD_SAMPLE_AHEAD
from rudder.env.settings import check_fraction_levels
from rudder.env.wrappers import DEFAULT_LEVELS


class _Keep(Agent):
    """Never prefetches anything."""

    name = "keep"

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> np.ndarray:
        return np.zeros(observation["candidates"].shape[0], dtype=np.int8)


class NoPrefetch(_Keep):
    """No buffer: every remote row is pulled on demand."""

    name = "none"
    settings = BufferSettings(uses_buffer=False)


class StaticBuffer(_Keep):
    """The buffer filled once at the start (``--buffer-init``), never changed."""

    name = "static"
    settings = BufferSettings(static=True)


class VIPStatic(_Keep):
    """SALIENT++'s cache: the buffer filled once with the remote nodes of highest vertex inclusion probability for
    this trainer (:mod:`rudder.env.vip`), never changed. The strongest cheap static baseline."""

    name = "vip"
    settings = BufferSettings(static=True, buffer_init="vip")


class Periodic(_Keep):
    """MassiveGNN: every window, every slot below the eviction threshold (or empty) takes the next most-missed
    candidate, up to the K candidates offered."""

    name = "periodic"

    def act(self, observation, info) -> np.ndarray:
        return top_j(observation["candidates"].shape[0], admissible(info))


class Lookahead(Periodic):
    """The periodic policy under the sampler lookahead's ranking (ours, :mod:`rudder.env.ranking`): every window,
    admit each candidate needed more than the resident it would replace, and let missed rows in on the same terms
    (admit-on-miss by predicted need). An online approximation of Belady's MIN; what it decides comes from the
    ranking, so this policy is buffer settings on top of :class:`Periodic`."""

    name = "lookahead"
    settings = BufferSettings(
        ranking="lookahead", admit_on_miss=True, buffer_init="empty", sample_ahead=LOOKAHEAD_SAMPLE_AHEAD
    )

    def __init__(self, sample_ahead: int | str | None = LOOKAHEAD_SAMPLE_AHEAD, buffer_init: str | None = "empty"):
        """``sample_ahead``: how far the trainer samples ahead, a count, a budget such as ``"64MB"`` or ``"epoch"``
        (:mod:`rudder.env.sample_ahead`); by default far enough for the ranking to approach Belady MIN, which a
        live run with no ``--sample-ahead`` then uses too; None: the recorded run's (replay) or the run's option.
        ``buffer_init``: the initial fill; by default ``"empty"``: with the future known that far, a guessed fill
        costs rows Belady MIN does not pay (it saves some fetch time early on instead: BENCHMARKS.md, P1); None:
        the run's ``--buffer-init``."""
        self.settings = BufferSettings(
            ranking="lookahead",
            admit_on_miss=True,
            buffer_init=buffer_init,
            sample_ahead=None if sample_ahead is None else str(sample_ahead),
        )


class HitRateRule(_Keep):
    """Every window, admit the candidates that have a slot to take (like :class:`Periodic`) only if

    - the last window's hit rate fell more than ``drop`` below the hit rate since the start, or
    - at least ``stale_fraction`` of the buffer's slots are empty or below the eviction threshold;

    otherwise keep the buffer (and its prefetch traffic) as it is.
    """

    name = "hitrate"

    def __init__(self, drop: float = 0.02, stale_fraction: float = 0.25):
        self.drop = drop
        self.stale_fraction = stale_fraction

    def act(self, observation, info) -> np.ndarray:
        window_hit_rate, cumulative_hit_rate = observation["buffer"][1], observation["buffer"][2]
        stale = info["n_evictable"] / max(info["capacity"], 1)
        refresh = window_hit_rate < cumulative_hit_rate - self.drop or stale >= self.stale_fraction
        return top_j(observation["candidates"].shape[0], admissible(info) if refresh else 0)


class RandomBudget(_Keep):
    """A random level every window (seeded): the reference a learned level policy has to beat."""

    name = "random"

    def __init__(self, seed: int = 0, levels: Sequence[float] = DEFAULT_LEVELS):
        self.levels = check_fraction_levels(levels)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def act(self, observation, info) -> np.ndarray:
        level = self.levels[int(self._rng.integers(len(self.levels)))]
        return top_fraction(level, info, observation["candidates"].shape[0])


class FixedLevel(Agent):
    """The same link-budget level every window (``levels=`` actions, :class:`rudder.env.episode.PrefetchEpisode`):
    e.g. ``level=1`` prefetches, every window, all the link can carry while the trainer samples and computes.

    The best of the fixed levels is the constant a level policy must beat; headroom is measured from it to the optimum
    over level sequences (:mod:`rudder.evaluation.bound`), never from the worst level.

    Args:
        level: one of ``levels``.
        ranking: where candidates come from (``"lookahead"``: predicted need, admit-on-miss by it; ``"misses"``:
            decayed miss counts).
        levels: the action's levels.
    """

    name = "level"

    def __init__(self, level: float = 0.5, ranking: str = "lookahead", levels: Sequence[float] = LINK_LEVELS):
        self.settings = BufferSettings(ranking=ranking, admit_on_miss=ranking == "lookahead", levels=tuple(levels))
        if level not in self.settings.levels:
            raise ValueError(f"level must be one of the levels {list(self.settings.levels)}, got {level!r}")
        self.level = float(level)
        self.index = self.settings.levels.index(self.level)

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> int:
        return self.index


class Recorded(_Keep):
    """The prefetch decisions of a recorded run, applied again at the same minibatches, instantly.

    Replaying another agent's decisions separates what they cost to *take* from what they *do*: a run of an
    LLM agent in the background against this playback of its decisions measures the cost of the LLM alone.

    Args:
        trace: folder of a trace recorded with ``--trace`` (any agent).
        rank: the trainer rank whose decisions to play.
        settings: the buffer settings of the agent that recorded the trace (the registry passes them).
    """

    name = "recorded"

    def __init__(self, trace: str, rank: int = 0, settings: BufferSettings | None = None):
        from rudder.traces import Trace

        t = Trace(trace)
        if rank not in t.ranks:
            raise ValueError(f"{trace}: no trainer rank {rank} in this trace (it has ranks {list(t.ranks)})")
        decisions = t.rank(rank).decisions()
        schedule: dict[int, np.ndarray] = {}
        for minibatch, ids in zip(decisions["minibatch"], decisions["ids"]):
            prev = schedule.get(int(minibatch))
            schedule[int(minibatch)] = ids if prev is None else np.concatenate([prev, ids])
        self.schedule = schedule
        self.source_agent = t.meta.get("config", {}).get("agent")
        if settings is not None:
            self.settings = settings
