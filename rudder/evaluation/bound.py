"""The optimum over action sequences within the replay model: a bound no policy of the action space can beat.

:func:`optimum` searches the tree of action sequences of one :class:`~rudder.baselines.constant.ActionSpace` on one
trace rank, trying each action from the same state through the replay env's :meth:`snapshot` / :meth:`restore`
(:class:`~rudder.env.replay_env.ReplayEnv`). All windows run the same minibatches whatever was chosen, so nodes
at one depth have run the same minibatches; actions that bring the same rows at a decision are one action
(:meth:`ActionSpace.rows`). It keeps ``width`` nodes per depth (a beam), those with the fewest seconds so far plus
the demand pulls their buffer leaves for the next windows (:class:`_Outlook`: seconds so far alone would drop every
prefetch before it pays off). Callers take the better of it and the best constant
(:func:`rudder.evaluation.scoring.bound_row`).

What it finds is *proved* optimal when nothing was pruned that could have done better: a pruned node's seconds so
far plus a lower bound on every remaining minibatch's (recorded sampling and compute, and a demand pull of the
misses no buffer of this capacity avoids: ``|S_t| - min(capacity, |S_t|)`` rows at the fit's per-row cost; stalls
behind background chunks >= 0) is at least the best found. Otherwise the result is a *reference*: an achievable
time, with no claim that no policy beats it.

:func:`exhaustive` plays every action sequence, for tests on a few windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rudder.baselines.constant import ActionSpace

OUTLOOK_WINDOWS = 2  # windows ahead the beam's order looks (_Outlook)


@dataclass
class SearchResult:
    """The best action sequence found and whether it is proved optimal.

    Attributes:
        time_s: modelled seconds of the windows searched, along ``actions``.
        actions: action indices, one per window.
        proved: True: no action sequence is faster (nothing pruned could beat it); False: a reference.
        windows: decision windows searched.
        nodes: windows played in all.
        pruned_lower_s: the least lower bound of any pruned node (inf: nothing pruned).
    """

    time_s: float
    actions: list[int]
    proved: bool
    windows: int
    nodes: int
    pruned_lower_s: float = float("inf")

    @property
    def kind(self) -> str:
        """``bound`` where proved, else ``reference``."""
        return "bound" if self.proved else "reference"


@dataclass
class _Node:
    time_s: float
    actions: list[int]
    state: dict
    observation: dict
    info: dict
    done: bool
    key: float = 0.0  # the beam's order (_Outlook)


def remaining_lower_s(env) -> np.ndarray:
    """``out[m]``: a lower bound on the modelled seconds of minibatches ``m..end`` of ``env``'s rank under any
    policy (see the module docstring); ``out[end] = 0``."""
    table = env.rank_trace.table()
    sizes = np.fromiter((x.size for x in env.rank_trace.minibatch_ids()), np.int64)
    misses = sizes - np.minimum(env.capacity, sizes)
    per = (
        table["sample_s"].to_numpy(np.float64)
        + table["compute_s"].to_numpy(np.float64)
        + env.time_model.predict(table["local_rows"].to_numpy(), misses)
    )
    return np.append(np.cumsum(per[::-1])[::-1], 0.0)


class _Outlook:
    """The beam's order: seconds so far plus the demand pulls the next ``horizon`` minibatches would need if
    nothing more were prefetched (rows neither resident nor on their way, at the fit's per-row cost). Seconds so
    far alone would drop every prefetch before it pays off; this only orders the beam, every time reported is
    played."""

    def __init__(self, env, horizon: int):
        self.env, self.horizon = env, int(horizon)
        self.c_remote = float(env.time_model.c_remote)
        to_local = env.episode.to_local
        self.ids = [to_local(x) for x in env.rank_trace.minibatch_ids()]

    def __call__(self, time_s: float) -> float:
        ep = self.env.episode
        buf, m = ep.buffer, ep.minibatches
        on_way = buf.requested if buf.requested.size else None
        misses = 0
        for ids in self.ids[m : m + self.horizon]:
            have = buf.contains(ids)
            if on_way is not None:
                have |= on_way[ids]
            misses += int(ids.size - np.count_nonzero(have))
        return time_s + self.c_remote * misses


def _window_s(info: dict) -> float:
    w = info["window"]
    return float(w["sample_s"] + w["fetch_s"] + w["compute_s"])


def optimum(
    env,
    space: ActionSpace,
    width: int | None = None,
    windows: int | None = None,
    seed: int = 0,
    horizon: int = OUTLOOK_WINDOWS,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """The fastest action sequence of ``space`` on ``env`` (a :class:`ReplayEnv` built with ``space.settings``)
    over its first ``windows`` decision windows (None: the whole episode), by beam search of ``width`` nodes per
    depth (None: ``space.search_width``) over snapshots; proved optimal or a reference (:class:`SearchResult`).
    ``progress(depth, depths)`` after each depth."""
    base = env.unwrapped
    width = space.search_width if width is None else int(width)
    obs, info = base.reset(seed=seed)
    period, minibatches = base.period, base.rank_trace.num_minibatches
    depths = -(-minibatches // period)
    if windows is not None:
        depths = min(int(windows), depths)
    lower = remaining_lower_s(base)
    outlook = _Outlook(base, horizon * period)
    n = len(space.actions)
    frontier = [_Node(0.0, [], base.snapshot(), obs, info, False)]
    pruned_lower, played = float("inf"), 0
    for depth in range(1, depths + 1):
        children: list[_Node] = []
        for node in frontier:
            if node.done:
                children.append(node)
                continue
            tried: dict[int, _Node] = {}
            for a in range(n):
                rows = space.rows(a, node.observation, node.info)
                if rows in tried:  # the same rows as an action tried from here: the same child
                    continue
                base.restore(node.state)
                o, _, term, trunc, i = base.step(space.env_action(a, node.observation, node.info))
                played += 1
                child = _Node(
                    node.time_s + _window_s(i),
                    node.actions + [a],
                    base.snapshot(),
                    o,
                    i,
                    term or trunc,
                )
                child.key = outlook(child.time_s)
                tried[rows] = child
                children.append(child)
        children.sort(key=lambda c: c.key)
        frontier = children[:width]
        for c in children[width:]:
            rest = 0.0 if c.done else _rest(lower, c.info["minibatch"], depths - depth, period)
            pruned_lower = min(pruned_lower, c.time_s + rest)
        if progress:
            progress(depth, depths)
    best = min(frontier, key=lambda c: c.time_s)
    return SearchResult(
        time_s=best.time_s,
        actions=best.actions,
        proved=pruned_lower >= best.time_s,
        windows=depths,
        nodes=played,
        pruned_lower_s=pruned_lower,
    )


def _rest(lower: np.ndarray, done_mb: int, windows_left: int, period: int) -> float:
    """Lower bound on the seconds of the next ``windows_left`` windows, from minibatch ``done_mb`` on."""
    end = min(done_mb + windows_left * period, lower.size - 1)
    return float(lower[done_mb] - lower[end])


def exhaustive(env, space: ActionSpace, windows: int, seed: int = 0) -> tuple[float, list[int]]:
    """The fastest of every action sequence of ``space`` over the first ``windows`` windows, each played from the
    episode's start (no snapshots, no pruning): ``(seconds, actions)``. ``len(actions) ** windows`` episodes."""
    base = env.unwrapped
    best = (float("inf"), [])
    for seq in itertools.product(range(len(space.actions)), repeat=windows):
        obs, info = base.reset(seed=seed)
        seconds = 0.0
        for a in seq:
            obs, _, term, trunc, info = base.step(space.env_action(a, obs, info))
            seconds += _window_s(info)
            if term or trunc:
                break
        if seconds < best[0]:
            best = (seconds, list(seq))
    return best
