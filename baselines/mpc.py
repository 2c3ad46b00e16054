"""A model-predictive controller over link-budget levels: the baseline any learned level controller must beat.

Every window :class:`MPC` re-estimates the link from the windows it has seen, recent ones weighing most
(:func:`forgetting_estimate`), and picks the level whose predicted seconds over the ranking's reach are fewest.
It knows what the env tells every agent at a decision (``info["choices"]``: the rows each level brings and their
predicted need against the residents they replace, from the sampler lookahead over what has been sampled) and
nothing about the future beyond that.

Predicted seconds of a level bringing ``n`` rows, with ``c0, c_remote`` the estimate's per-pull and per-row costs and
``hide_s`` the sampling and compute time of a window (what background chunks can hide in):

- saved: ``c_remote * n * (need_in - need_out)``: demand pulls the rows avoid (expected uses of the rows brought,
  less those of the residents they replace);
- spent: the link busy ``link_s = c0 * chunks + c_remote * n`` over the next ``horizon`` windows; a demand pull
  meets a chunk in progress in the busy fraction ``u = min(1, link_s / (horizon * hide_s))`` of minibatches and
  waits half a chunk on average; and what the link cannot carry in time arrives too late to save anything
  (``saved`` scaled by ``1 / max(1, link_s / (horizon * hide_s))``).

A level that brings no more rows than a lower one is never preferred to it.
"""

from __future__ import annotations

import math

import numpy as np
from rudder.agents.base import Agent
from rudder.baselines.constant import LINK_SPACE
from rudder.env.buffer import PREFETCH_CHUNK
from rudder.env.episode import LinkEstimate
from rudder.env.timing import prefetch_net_s


def forgetting_estimate(forget: float) -> LinkEstimate:
    """The env's :class:`~rudder.env.episode.LinkEstimate` whose past weighs ``forget`` less with every sample added
    (1: the whole run counts alike): under a link whose cost changes, the fit follows the recent samples."""
    if not 0.0 < forget <= 1.0:
        raise ValueError(f"forget must be in (0, 1], got {forget!r}")
    return LinkEstimate(half_life=None if forget == 1.0 else math.log(0.5) / math.log(forget))


class MPC(Agent):
    """Model-predictive control over link-budget levels (``levels=``, the ``link-levels`` action space).

    Args:
        forget: weight of the past per window in the link estimate (1: the whole run counts alike).
        horizon: windows over which prefetched rows are expected to be used and the link to carry them.
    """

    name = "mpc"
    settings = LINK_SPACE.settings

    def __init__(self, forget: float = 0.5, horizon: int = 2):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 window, got {horizon!r}")
        self.forget, self.horizon = float(forget), int(horizon)
        self.reset()

    def reset(self) -> None:
        self.link = forgetting_estimate(self.forget)
        self.last_predicted_s: list[float] = []

    def observe(self, info) -> None:
        """Add the last window's demand pulls (per minibatch, without the waits behind chunks) to the estimate."""
        w = info.get("window") or {}
        mb = int(w.get("minibatches", 0))
        if mb <= 0:
            return
        demand = w["remote_fetched"] - w.get("arrived", 0)
        self.link.add(w["local_rows"] / mb, demand / mb, (w["fetch_s"] - w.get("stall_s", 0.0)) / mb)

    def predicted_s(self, info) -> list[float]:
        """Predicted seconds (spent less saved, over ``horizon`` windows) of each level at this decision."""
        c0, _, c_remote = self.link.coefficients
        link, w = info["link"], info.get("window") or {}
        mb = max(int(w.get("minibatches", 0)), 1)
        hide_s = max(float(link["hide_s"]), 1e-9) * self.horizon
        out = []
        for choice in info["choices"]:
            n = int(choice["rows"])
            if n == 0:
                out.append(0.0)
                continue
            chunks = int(np.ceil(n / PREFETCH_CHUNK))
            link_s = c0 * chunks + c_remote * n
            chunk_s = c0 + c_remote * min(n, PREFETCH_CHUNK)
            gain = choice["need_in"] - choice["need_out"]
            out.append(prefetch_net_s(link_s, chunk_s, c_remote * n, gain, hide_s, mb, self.horizon))
        return out

    def act(self, observation, info) -> int:
        self.observe(info)
        choices = info.get("choices")
        if not choices or self.link.samples < 2:
            return 0  # nothing known of the link yet: admit-on-miss only
        self.last_predicted_s = self.predicted_s(info)
        best, best_rows = 0, 0
        for i, (s, c) in enumerate(zip(self.last_predicted_s, choices)):
            if c["rows"] > best_rows and s < self.last_predicted_s[best]:
                best, best_rows = i, c["rows"]
        return best
