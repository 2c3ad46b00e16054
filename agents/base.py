"""The one protocol every prefetching agent follows: what it must do, and the optional hooks it may declare.

An agent must have a ``name``, ``act(observation, info) -> action`` and ``reset()``. Everything else has a default
in :class:`Agent`; a class that subclasses :class:`Agent` inherits those defaults, and :func:`as_agent` gives any
object with the three required members the same defaults, so callers read every hook directly.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from rudder.env.contract import BufferSettings, DecisionInfo

REQUIRED = ("name", "act", "reset")


@runtime_checkable
class Agent(Protocol):
    """Decides a prefetch set every decision window.

    Required:
        name: a short name (tables, logs).
        act(observation, info): the environment's observation (a dict, see :mod:`rudder.env.spaces`) and info
            (:class:`~rudder.env.contract.DecisionInfo`) -> a ``MultiBinary(K)`` action, an int8 array of shape
            ``(K,)`` over ``info["candidate_ids"]``.
        reset(): called at the start of every episode.

    Optional (defaults here):
        settings: the buffer the agent plays with (:class:`~rudder.env.contract.BufferSettings`).
        asynchronous: decisions slow enough that training should not wait for them (run in the background live;
            their latency charged as a delay in replay).
        schedule: ``{minibatch: prefetch ids}`` applied at those minibatches instead of asking ``act``
            (a recorded run's decisions).
        trained_on: what a learned agent learned from, by content: a list of trace-rank fingerprints
            (:func:`rudder.traces.fingerprint.rank_fingerprint`); ``[]`` for one that learned from no trace; None (the
            default) for an agent that does not learn from traces. Evaluation compares these with the fingerprint
            of every rank it scores (:func:`rudder.traces.fingerprint.provenance`), so a renamed copy of a training
            trace
            is still recognised. A bare trace name is accepted (older policies) but can never show a rank held out.
        warm_up(info): start-up work before the first decision (not counted as decision latency); returns seconds.
        stats(): counters to report beside the agent's results (e.g. invalid answers of an LLM).
    """

    name: str
    settings: BufferSettings = BufferSettings()
    asynchronous: bool = False
    schedule: dict[int, np.ndarray] | None = None
    trained_on: list[dict | str] | None = None

    def act(self, observation: dict[str, np.ndarray], info: DecisionInfo) -> np.ndarray: ...

    def reset(self) -> None: ...

    def warm_up(self, info: DecisionInfo) -> float:
        return 0.0

    def stats(self) -> dict[str, Any]:
        return {}


class _WithDefaults(Agent):
    """An object with the required members, given the optional hooks it lacks."""

    def __init__(self, inner):
        self._inner = inner
        self.name = inner.name

    def act(self, observation, info):
        return self._inner.act(observation, info)

    def reset(self) -> None:
        self._inner.reset()

    def __getattr__(self, attr):  # the inner agent's own attributes stay reachable
        return getattr(self._inner, attr)


def as_agent(obj) -> Agent:
    """``obj`` with every hook of :class:`Agent` (its own where it has them); one clear error when a required member
    is missing."""
    missing = [m for m in REQUIRED if not hasattr(obj, m)]
    if missing:
        raise TypeError(
            f"{type(obj).__name__} is not an agent: it lacks {', '.join(missing)} "
            f"(an agent needs name, act(observation, info) and reset())"
        )
    if not callable(obj.act) or not callable(obj.reset):
        raise TypeError(f"{type(obj).__name__} is not an agent: act and reset must be methods")
    if isinstance(obj, Agent):
        return obj
    wrapped = _WithDefaults(obj)
    for hook in ("settings", "asynchronous", "schedule", "trained_on"):
        if hasattr(obj, hook):
            setattr(wrapped, hook, getattr(obj, hook))
    for hook in ("warm_up", "stats"):
        if hasattr(obj, hook):
            setattr(wrapped, hook, getattr(obj, hook))
    if not isinstance(wrapped.settings, BufferSettings):
        raise TypeError(
            f"{type(obj).__name__}.settings must be a rudder.env.contract.BufferSettings, "
            f"got {type(wrapped.settings).__name__}"
        )
    return wrapped
