"""The one protocol every prefetching agent follows, and the registry that builds agents by name."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Agent(Protocol):
    """Decides a prefetch set every decision window.

    ``act`` gets the environment's observation (a dict, see :mod:`rudder_env.spaces`) and info (with
    ``candidate_ids``, ``n_candidates``, ``n_evictable``, ``capacity``) and returns a ``MultiBinary(K)`` action:
    an int8 array of shape ``(K,)``. ``reset`` is called at the start of every episode.
    """

    name: str

    def act(self, observation: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray: ...

    def reset(self) -> None: ...


# name -> (module, class); imported lazily so that a heuristic run never imports torch models or transformers
REGISTRY = {
    "none": ("baselines.policies", "NoPrefetch"),
    "static": ("baselines.policies", "StaticBuffer"),
    "periodic": ("baselines.policies", "Periodic"),
    "hitrate": ("agents.heuristic", "HitRateRule"),
    "lookahead": ("agents.heuristic", "Lookahead"),
    "ppo": ("agents.ppo", "PPOAgent"),
    "llm": ("agents.llm", "LLMAgent"),
    "recorded": ("baselines.policies", "Recorded"),  # the decisions of a recorded run, replayed
}


ASYNC_BY_DEFAULT = ("llm",)  # agents whose decisions take long enough that training should not wait for them


def is_slow(agent) -> bool:
    """Whether ``agent``'s decisions should run in the background (``asynchronous`` attribute, or the LLM)."""
    return bool(getattr(agent, "asynchronous", False)) or getattr(agent, "name", "") in ASYNC_BY_DEFAULT


def make_agent(name: str, **kwargs) -> Agent:
    """Build the agent registered under ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown agent {name!r}: expected one of {', '.join(REGISTRY)}")
    import importlib

    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(**kwargs)
