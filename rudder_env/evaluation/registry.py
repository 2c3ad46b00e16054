"""Agents by name: the registry ``train.py gnn --agent`` and ``evaluate.py --agents`` take names from.

Modules are imported when an agent is built, so a heuristic run never imports torch models or transformers.
"""

from __future__ import annotations

import importlib

from agents.base import Agent, as_agent
from rudder_env.contract import BufferSettings

# name -> (module, class)
REGISTRY = {
    "none": ("baselines.policies", "NoPrefetch"),
    "static": ("baselines.policies", "StaticBuffer"),
    "periodic": ("baselines.policies", "Periodic"),
    "hitrate": ("baselines.policies", "HitRateRule"),
    "lookahead": ("baselines.policies", "Lookahead"),
    "ppo": ("agents.ppo", "PPOAgent"),
    "llm": ("agents.llm", "LLMAgent"),
    "recorded": ("baselines.policies", "Recorded"),  # the decisions of a recorded run, replayed
}


def agent_class(name: str) -> type:
    """The class registered under ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown agent {name!r}: expected one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def settings_of(name: str) -> BufferSettings:
    """The buffer settings the agent registered under ``name`` declares (without building it)."""
    return agent_class(name).settings


def make_agent(name: str, **kwargs) -> Agent:
    """Build the agent registered under ``name``. ``recorded`` plays with the buffer settings of the agent that
    recorded its trace."""
    cls = agent_class(name)
    if name == "recorded" and "settings" not in kwargs:
        from traces import Trace

        source = Trace(kwargs["trace"]).meta.get("config", {}).get("agent")
        if source in REGISTRY and source != "recorded":
            kwargs["settings"] = settings_of(source)
    return as_agent(cls(**kwargs))
