"""Non-learning prefetch policies as agents: no prefetch, static buffer, periodic (MassiveGNN), and the decisions
of a recorded run played back."""

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


class Recorded:
    """The prefetch decisions of a recorded run, applied again at the same minibatches, instantly.

    Replaying another agent's decisions separates what they cost to *take* from what they *do*: a run of an
    LLM agent in the background against this playback of its decisions measures the cost of the LLM alone.
    Buffer settings (ranking, admit-on-miss, static, no buffer) follow the agent that recorded the trace.

    Args:
        trace: folder of a trace recorded with ``--trace`` (any agent).
        rank: the trainer rank whose decisions to play.
    """

    name = "recorded"

    def __init__(self, trace: str, rank: int = 0):
        from agents.base import REGISTRY
        from traces import Trace

        t = Trace(trace)
        if rank not in t.ranks:
            raise ValueError(f"{trace}: no trainer rank {rank} in this trace (it has ranks {list(t.ranks)})")
        decisions = t.rank(rank).decisions()
        self.schedule: dict[int, np.ndarray] = {}
        for minibatch, ids in zip(decisions["minibatch"], decisions["ids"]):
            prev = self.schedule.get(int(minibatch))
            self.schedule[int(minibatch)] = ids if prev is None else np.concatenate([prev, ids])
        self.source_agent = t.meta.get("config", {}).get("agent")
        if self.source_agent in REGISTRY and self.source_agent != self.name:
            import importlib

            module, cls = REGISTRY[self.source_agent]
            source = getattr(importlib.import_module(module), cls)
            for attr in ("uses_buffer", "static", "admit_on_miss", "ranking"):
                if hasattr(source, attr):
                    setattr(self, attr, getattr(source, attr))

    def reset(self) -> None:
        pass

    def act(self, observation, info) -> np.ndarray:  # decisions come from the schedule, not from observations
        return np.zeros(observation["candidates"].shape[0], dtype=np.int8)
