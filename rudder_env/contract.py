"""The contract between agents and the prefetch environments.

- :class:`BufferSettings`: what an agent declares about the buffer it plays with (one frozen dataclass);
  :func:`buffer_kwargs` turns it, with the run's own options, into the keyword arguments both the live trainer and
  the replay env take, so an agent gets the same buffer live and offline.
- :class:`DecisionInfo` / :class:`WindowInfo`: what ``info`` holds at every decision (``reset``, ``step``,
  ``run_window``).
- :func:`admissible`, :func:`admitted`, :func:`top_j` and :func:`top_fraction`: the one rule "admit the top ``j``
  ranked candidates", where ``j`` is at most the candidates that have a slot to take (MassiveGNN's periodic refresh
  admits exactly that many; budget policies a fraction of it).
"""

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, get_type_hints

import numpy as np
from rudder.env.defaults import LINK_LEVELS as LINK_LEVELS  # part of the agents' contract (the level agents' levels)
from rudder.env.sample_ahead import SampleAhead
from rudder.env.settings import check, check_link_levels
from rudder.env.spaces import WindowStats


@dataclass(frozen=True)
class BufferSettings:
    """The buffer an agent plays with.

    Attributes:
        uses_buffer: False keeps no buffer at all (capacity 0: every remote row is pulled on demand).
        static: the buffer is filled once and never changes (no prefetch set is applied, no admit-on-miss).
        admit_on_miss: let missed rows (fetched anyway) enter empty or evictable slots; None: the run's option
            (``--admit-on-miss``, or the recorded run's in replay).
        ranking: how candidates are ranked and victims chosen (:mod:`rudder.env.ranking`): ``"misses"``
            (MassiveGNN / Rudder: decayed miss counts, lowest score evicted) or ``"lookahead"`` (the sampler
            lookahead's predicted need).
        buffer_init: the initial fill (``degree``, ``random``, ``empty``, ``vip``); None: the run's
            (``--buffer-init``, or the recorded run's in replay).
        levels: None: the agent acts with a ``MultiBinary(K)`` mask over the top-K candidates; else it picks one of
            these multiples of the link budget every window (``Discrete``; see
            :class:`rudder.env.episode.PrefetchEpisode`).
        sample_ahead: in replay, how far the live trainer had sampled ahead (``4``, ``"64MB"``, ``"epoch"``:
            :mod:`rudder.env.sample_ahead`), emulated from the recorded ids; None: the recorded run's. A live run
            takes its own ``--sample-ahead``.
    """

    uses_buffer: bool = True
    static: bool = False
    admit_on_miss: bool | None = None
    ranking: str = "misses"
    levels: tuple[float, ...] | None = None
    buffer_init: str | None = None
    sample_ahead: str | None = None  # replay: how far the trainer had sampled ahead (rudder.env.sample_ahead)

    def __post_init__(self):
        check("ranking", self.ranking)
        if self.levels is not None:
            object.__setattr__(self, "levels", check_link_levels(self.levels))
        if self.buffer_init is not None:
            check("buffer_init", self.buffer_init)
        if self.sample_ahead is not None:
            object.__setattr__(self, "sample_ahead", str(SampleAhead.parse(self.sample_ahead, "sample_ahead")))
        if self.static and self.admit_on_miss:
            raise ValueError("a static buffer cannot admit on miss: it never changes after the initial fill")


def buffer_kwargs(
    settings: BufferSettings, buffer_fraction: float | None = None, admit_on_miss: bool | None = None
) -> dict[str, Any]:
    """``buffer_fraction``, ``admit_on_miss`` and ``ranking`` for an env (live trainer or replay) of an agent with
    ``settings``, given the run's own ``buffer_fraction`` and ``admit_on_miss`` (None: the recorded run's, in replay),
    and ``buffer_init`` where the agent sets one.

    No buffer means capacity 0; a static buffer never admits; otherwise the agent's admit-on-miss choice, if it
    makes one, overrides the run's; so does its initial fill. ``levels`` is there only for an agent that acts by
    link-budget levels.
    """
    admit = admit_on_miss if settings.admit_on_miss is None else settings.admit_on_miss
    out = dict(
        buffer_fraction=buffer_fraction if settings.uses_buffer else 0.0,
        admit_on_miss=False if settings.static else admit,
        ranking=settings.ranking,
    )
    if settings.buffer_init is not None:
        out["buffer_init"] = settings.buffer_init
    if settings.levels is not None:
        out["levels"] = settings.levels
    if settings.sample_ahead is not None:
        out["sample_ahead"] = settings.sample_ahead
    return out


#: Sums over the minibatches of the last decision window (``info["window"]``): the fields of
#: :class:`rudder.env.spaces.WindowStats`, declared there once (with what each counts), typed here for agents.
WindowInfo = TypedDict("WindowInfo", get_type_hints(WindowStats))


class LinkInfo(TypedDict):
    """The trainer's link as the episode estimates it (:class:`rudder.env.episode.LinkEstimate`)."""

    s_per_row: float  # seconds per remote row pulled (0: not known yet)
    s_per_pull: float  # fixed seconds per pull
    hide_s: float  # sampling + compute seconds of the last window: what a background prefetch can hide in
    budget_rows: int  # remote rows the link can carry in that time (capacity when unknown)
    utilisation: float  # modelled busy seconds of the link over the last window's seconds
    stall_s: float  # demand pulls waiting behind prefetch chunks, last window
    n_admissible: int  # ranked candidates the level actions may bring (0: nothing to decide)


class Choice(TypedDict):
    """What one level of the link-budget action would do (``info["choices"]``, envs with ``levels=``)."""

    level: float  # multiple of the link budget
    rows: int  # candidates it prefetches
    link_s: float  # modelled seconds those rows keep the link busy
    evicts: int  # residents replaced
    evicts_hot: int  # of which hit in the last window (or, under the lookahead, predicted to be needed)
    need_in: float  # mean predicted need (ranking's scale) of the rows it brings
    need_out: float  # mean predicted need of the residents it replaces (empty slots: 0)


class DecisionInfo(TypedDict):
    """``info`` at a decision point: what the next action refers to, and what the last window did.

    ``candidate_ids[i]`` is the node id bit ``i`` of a ``MultiBinary(K)`` action admits (-1 past the last
    candidate); ``n_evictable`` is how many of the top candidates have a slot to take (an empty slot, one below
    the eviction threshold, or, under the lookahead ranking, a resident predicted to be needed less).
    """

    candidate_ids: np.ndarray  # (K,) int64
    candidate_scores: np.ndarray  # (K,) float32: decayed miss counts, or predicted need
    n_candidates: int
    n_evictable: int
    capacity: int
    minibatch: int  # minibatches run so far
    decision: int  # decisions applied so far
    window: WindowInfo
    counters: dict[str, int]  # the buffer's counters since the start (:class:`rudder.env.buffer.BufferCounters`)
    facts: dict[str, Any]  # fixed facts of the run: graph, partitioning, buffer settings, sampler
    applied_ids: NotRequired[np.ndarray]  # after step/run_window: the prefetch ids applied during the window
    decision_latency_s: NotRequired[float]  # live, after step: seconds between the observation and the action
    time_model: NotRequired[dict[str, float]]  # replay, after reset: the fetch-time model's fit
    link: LinkInfo  # the link estimate and the budget of the next window
    choices: NotRequired[list[Choice]]  # envs with ``levels=``: what each action would do, in action order


def admissible(info: DecisionInfo) -> int:
    """How many top candidates can be admitted: those that exist and have a slot to take."""
    return admitted(1.0, info["n_candidates"], info["n_evictable"])


def top_j(k: int, j: int) -> np.ndarray:
    """The ``MultiBinary(k)`` action admitting the top ``j`` ranked candidates (``j`` clipped to [0, k])."""
    action = np.zeros(k, dtype=np.int8)
    action[: max(0, min(int(j), k))] = 1
    return action


def admitted(fraction: float, n_candidates: int, n_evictable: int) -> int:
    """Candidates a fraction of the admissible ones admits: ``round(fraction * min(n_candidates, n_evictable))``."""
    return int(round(fraction * max(min(int(n_candidates), int(n_evictable)), 0)))


def top_fraction(fraction: float, info: DecisionInfo, k: int) -> np.ndarray:
    """The ``MultiBinary(k)`` action admitting :func:`admitted` top candidates (a level of a budget policy)."""
    return top_j(k, admitted(fraction, info["n_candidates"], info["n_evictable"]))
