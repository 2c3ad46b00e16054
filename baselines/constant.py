"""The discrete action spaces the shipped agents decide in, and the constant policy of each: one action held throughout.

A constant policy is the reference every adaptive controller must beat: it needs no model and no decision, and a
practitioner can pick it once. Each :class:`ActionSpace` names the buffer settings its agents play with and its
actions, so that one table serves the constant agents (:class:`Constant`), the optimum over action sequences
(:mod:`rudder.evaluation.bound`), headroom and every agent's share of it (:mod:`rudder.evaluation.scoring`):

- ``link-levels``: every window, prefetch ``level`` times the link budget from the top of the lookahead's ranking
  (``levels=``, :class:`rudder.env.episode.PrefetchEpisode`): ``ppo-link``, ``llm-link``, ``level``, ``mpc``.
- ``keep-replace``: every window, admit a fraction of the candidates that have a slot to take (``MultiBinary(K)``
  under the run's ranking, :func:`rudder.env.contract.top_fraction`): 0 keeps the buffer, 1 replaces every
  evictable slot (MassiveGNN's periodic refresh). The LLM's keep/replace is its two ends; ``ppo``, ``hitrate``,
  ``periodic`` and ``random`` play in it too.

Two actions that bring the same number of rows at a decision do the same thing (both admit the top ``n`` ranked
candidates): :meth:`ActionSpace.rows` says how many, so searches try each distinct one once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rudder.agents.base import Agent
from rudder.env.contract import LINK_LEVELS, BufferSettings, admitted, top_fraction
from rudder.env.wrappers import DEFAULT_LEVELS


@dataclass(frozen=True)
class ActionSpace:
    """A discrete action space over one env configuration.

    Attributes:
        name: what tables call it.
        settings: the buffer the agents of this space play with (the env is built from it).
        actions: the values of the actions, in action order: link-budget levels, or fractions of the candidates
            that have a slot to take.
        link: True: the env takes the action's index (``levels=``); False: a ``MultiBinary(K)`` mask admitting the
            top fraction.
        agents: built-in agents that decide in this space (their share of headroom is measured in it).
        search_width: nodes per window the bound search keeps by default (:mod:`rudder.evaluation.bound`): wider
            where a window replays cheaply (the misses ranking), narrower under the lookahead ranking.
    """

    name: str
    settings: BufferSettings
    actions: tuple[float, ...]
    link: bool
    agents: tuple[str, ...]
    search_width: int = 6

    def label(self, i: int) -> str:
        """The action's name in tables: ``level 0.25``, ``keep``, ``fraction 0.5``, ``replace``."""
        x = self.actions[i]
        if self.link:
            return f"level {x:g}"
        return {0.0: "keep", 1.0: "replace"}.get(x, f"fraction {x:g}")

    def env_action(self, i: int, observation: dict, info: dict):
        """The env's action for action ``i`` at the decision ``observation``/``info`` describe."""
        if self.link:
            return int(i)
        return top_fraction(self.actions[i], info, int(np.asarray(observation["candidates"]).shape[0]))

    def rows(self, i: int, observation: dict, info: dict) -> int:
        """Rows action ``i`` prefetches at this decision: two actions with the same count do the same thing."""
        if self.link:
            return int(info["choices"][i]["rows"])
        k = int(np.asarray(observation["candidates"]).shape[0])
        return min(admitted(self.actions[i], info["n_candidates"], info["n_evictable"]), k)

    def constant(self, i: int) -> Constant:
        """The agent holding action ``i`` throughout."""
        return Constant(self, i)


LINK_SPACE = ActionSpace(
    "link-levels",
    BufferSettings(ranking="lookahead", admit_on_miss=True, levels=LINK_LEVELS),
    LINK_LEVELS,
    link=True,
    agents=("ppo-link", "llm-link", "level", "mpc"),
    search_width=6,
)
KEEP_REPLACE_SPACE = ActionSpace(
    "keep-replace",
    BufferSettings(),
    tuple(DEFAULT_LEVELS),
    link=False,
    agents=("llm", "ppo", "periodic", "hitrate", "random"),
    search_width=24,
)
SPACES: dict[str, ActionSpace] = {s.name: s for s in (LINK_SPACE, KEEP_REPLACE_SPACE)}


def space_of(agent_name: str) -> ActionSpace | None:
    """The action space a built-in agent decides in (None: it decides in none of them, e.g. ``static``)."""
    return next((s for s in SPACES.values() if agent_name in s.agents), None)


class Constant(Agent):
    """One action of an :class:`ActionSpace` every window: ``Constant(LINK_SPACE, 1)`` is ``level 0.125`` held
    throughout, ``Constant(KEEP_REPLACE_SPACE, 3)`` replaces every evictable slot every window (periodic)."""

    def __init__(self, space: ActionSpace, index: int):
        if not 0 <= int(index) < len(space.actions):
            raise ValueError(f"{space.name}: action index must be in [0, {len(space.actions)}), got {index!r}")
        self.space, self.index = space, int(index)
        self.settings = space.settings
        self.name = f"{space.name}:{space.label(self.index)}"

    def reset(self) -> None:
        pass

    def act(self, observation, info):
        return self.space.env_action(self.index, observation, info)
