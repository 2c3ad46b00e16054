"""Playing an agent over one episode of a prefetch env, the way the agent needs.

- :func:`play_episode`: step by step (``act``, then ``step``), decision latency recorded.
- :func:`run_async`: decisions that take time, computed in the background while training goes on (as Rudder does),
  applied when ready; in replay the same latency becomes a delay in minibatches.
- :func:`play_schedule`: decisions recorded earlier, applied at their minibatches, instantly.
- :func:`play`: whichever of the three the agent's contract asks for (:class:`rudder.agents.base.Agent`).

Live (``rudder/Live-v0``): at a decision point the agent's ``act`` starts in a worker thread and training carries on;
before each minibatch the runner checks whether the decision is ready and, if so, schedules its prefetch set there.
While a decision is in flight the agent is not asked again. Replay (``rudder/Replay-v0``): ``act`` runs at once and
its measured latency (or a fixed ``latency_s``) is turned into ``ceil(latency / s_per_minibatch)`` minibatches of the
recorded run, after which the set is applied: a stale decision costs offline what it costs live.

Either way the decision refers to the candidate list it was taken on.

Live, the worker thread runs at the operating system's idle priority (``SCHED_IDLE`` on Linux, else the lowest
nice value) unless ``priority="normal"``: the agent then gets CPU time only when training leaves a core unused
(waits on remote pulls, all-reduces), so busy cores make decisions later rather than training slower (what it
still costs: BENCHMARKS.md, P3). :func:`play_schedule` run against an asynchronous run of the same decisions
isolates what taking them cost.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rudder.agents.base import as_agent


class _Pending:
    def __init__(self, resolve, observed_minibatch: int):
        self.resolve = resolve  # action -> prefetch ids, on the candidates of the observation it was taken on
        self.observed_minibatch = observed_minibatch
        self.submitted = time.perf_counter()
        self.future = None
        self.action = None
        self.latency_s = None
        self.due_minibatch = None


def warm_up(agent, info, env=None) -> float:
    """Start-up work an agent may have (e.g. the LLM prefilling its fixed prompt prefix), done before the first
    decision and not counted as decision latency; then, live, every trainer waits for the others (their start-up
    takes unequal time, and the first all-reduce would charge the difference to training). Returns its seconds."""
    seconds = float(agent.warm_up(info) or 0.0) if agent is not None else 0.0
    if env is not None and env.unwrapped.live:
        env.unwrapped.start_together()
    return seconds


PRIORITIES = ("idle", "normal")


def lower_priority() -> str:
    """Put the calling thread (and threads it starts later, e.g. torch's) at idle priority; returns how."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # Linux: this thread only
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        try:
            import threading

            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per thread
            return "nice 19"
        except (AttributeError, OSError):
            return "normal (could not lower)"


def play_episode(env, agent, seed: int = 0) -> dict:
    """Run ``agent`` through one episode of ``env``; returns counters, modelled seconds, per-window hit rates and
    decision latencies."""
    agent = as_agent(agent)
    obs, info = env.reset(seed=seed)
    agent.reset()
    warm_up(agent, info, env)
    tally = EpisodeTally()
    done = False
    while not done:
        t0 = time.perf_counter()
        action = agent.act(obs, info)
        tally.latencies.append(time.perf_counter() - t0)
        obs, _, terminated, truncated, info = env.step(action)
        tally.add_window(info)
        done = terminated or truncated
    return tally.result()


def play_best_level(env, horizon: int = 3, seed: int = 0) -> dict:
    """The best-in-action-space oracle of a replay env with ``levels``: at every decision, try each level from the
    same state (:meth:`~rudder.env.replay_env.ReplayEnv.snapshot`), play it for ``horizon`` windows, and take the
    one with the fewest modelled seconds (ties: the lower level, less traffic). It knows the future of the trace,
    so no online agent can be expected to beat it by much; it is greedy over a short horizon, not a proven optimum.
    Returns :func:`play_episode`'s row, with ``levels_chosen`` (how often each level was taken)."""
    base = env.unwrapped
    if getattr(base, "levels", None) is None:
        raise ValueError("the best-level oracle needs an env with levels= (link-budget level actions)")
    n = len(base.levels)
    obs, info = env.reset(seed=seed)
    tally = EpisodeTally()
    chosen = np.zeros(n, dtype=np.int64)
    done = False
    while not done:
        best = int(np.argmin(base.level_seconds(horizon)))  # first minimum: the lowest level among equals
        chosen[best] += 1
        tally.latencies.append(0.0)
        obs, _, terminated, truncated, info = env.step(best)
        tally.add_window(info)
        done = terminated or truncated
    return tally.result(levels_chosen=chosen.tolist())


#: The buffer counters (``info["counters"]``) a played episode's row reports.
COUNTERS = ("remote_sampled", "hits", "remote_fetched", "prefetched", "initial_fill", "admitted_on_miss")


class EpisodeTally:
    """What every way of playing an episode keeps: each window's seconds and hit rate, and decision latencies."""

    def __init__(self):
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.parts = dict(sample_s=0.0, fetch_s=0.0, compute_s=0.0, stall_s=0.0)  # where the time went
        self.window_hit_rate: list[float] = []
        self.counters: dict[str, int] = {}  # the buffer's counters as of the last window (``info["counters"]``)

    def add_window(self, info: dict) -> None:
        """Count the window that ``info`` (returned by ``step`` or ``run_window``) describes."""
        self.counters = info["counters"]
        w = info["window"]
        self.seconds += w["sample_s"] + w["fetch_s"] + w["compute_s"]
        for key in self.parts:
            self.parts[key] += float(w.get(key, 0.0))
        self.window_hit_rate.append(w["hits"] / max(w["remote_sampled"], 1))

    def result(self, **extra) -> dict:
        """The row of the played episode: the buffer's counters at its end, time (``time_s``: modelled in replay,
        measured live), decisions and their latency percentiles."""
        c = self.counters
        lat = self.latencies
        return dict(
            **{k: c[k] for k in COUNTERS},
            time_s=self.seconds,
            **{f"time_{k}": v for k, v in self.parts.items()},
            decisions=len(lat),
            latency_p50_s=float(np.percentile(lat, 50)) if lat else 0.0,
            latency_p95_s=float(np.percentile(lat, 95)) if lat else 0.0,
            window_hit_rate=self.window_hit_rate,
            **extra,
        )


def run_async(env, agent, seed: int = 0, latency_s: float | None = None, priority: str = "idle") -> dict:
    """Play one episode of ``env`` (live or replay) with ``agent`` deciding in the background.

    Args:
        latency_s: replay only: take every decision as this slow instead of its measured latency.
        priority: live only: ``"idle"`` runs the agent's thread at idle priority, ``"normal"`` as training.

    Returns counters, per-window hit rates, decision latencies (s) and delays (minibatches between the observation
    and the minibatch the set was applied before).
    """
    if priority not in PRIORITIES:
        raise ValueError(f"unknown decision priority {priority!r}: expected one of {', '.join(PRIORITIES)}")
    agent = as_agent(agent)
    base = env.unwrapped
    live = base.live
    s_per_mb = None if live else max(base.live_seconds_per_minibatch, 1e-9)
    obs, info = env.reset(seed=seed)
    agent.reset()
    warm_up(agent, info, env)
    pending: _Pending | None = None
    tally, delays = EpisodeTally(), []
    pool = None
    if live:
        init = lower_priority if priority == "idle" else None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rudder-agent", initializer=init)

    def poll(minibatch: int):
        nonlocal pending
        p = pending
        if p is None:
            return None
        if live:
            if not p.future.done():
                return None
            p.action = p.future.result()
            p.latency_s = time.perf_counter() - p.submitted
        elif minibatch < p.due_minibatch:
            return None
        tally.latencies.append(p.latency_s)
        delays.append(minibatch - p.observed_minibatch)
        pending = None
        return p.resolve(p.action), p.latency_s

    done = False
    try:
        while not done:
            if pending is None:
                pending = _Pending(base.resolver(), info["minibatch"])
                if live:
                    pending.future = pool.submit(agent.act, obs, info)
                else:
                    t0 = time.perf_counter()
                    pending.action = agent.act(obs, info)
                    pending.latency_s = time.perf_counter() - t0 if latency_s is None else latency_s
                    pending.due_minibatch = pending.observed_minibatch + math.ceil(pending.latency_s / s_per_mb)
            obs, _, terminated, truncated, info = base.run_window(poll)
            tally.add_window(info)
            done = terminated or truncated
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return tally.result(delay_minibatches=delays)


def play_schedule(env, schedule: dict[int, np.ndarray], seed: int = 0) -> dict:
    """Play one episode applying ``schedule`` (minibatch -> prefetch ids, e.g.
    :class:`rudder.baselines.policies.Recorded`)
    before those minibatches, at no decision cost; no other decision is taken."""
    base = env.unwrapped
    obs, info = env.reset(seed=seed)
    warm_up(None, info, env)
    tally = EpisodeTally()

    def poll(minibatch: int):
        ids = schedule.get(minibatch)
        if ids is None:
            return None
        tally.latencies.append(0.0)
        return np.asarray(ids, dtype=np.int64), 0.0

    done = False
    while not done:
        obs, _, terminated, truncated, info = base.run_window(poll)
        tally.add_window(info)
        done = terminated or truncated
    return tally.result()


def play(env, agent, seed: int = 0, asynchronous: bool = False, priority: str = "idle") -> dict:
    """Play one episode the way ``agent`` needs: its recorded schedule, in the background, or step by step."""
    agent = as_agent(agent)
    if agent.schedule is not None:
        agent.reset()
        return play_schedule(env, agent.schedule, seed=seed)
    if asynchronous:
        return run_async(env, agent, seed=seed, priority=priority)
    return play_episode(env, agent, seed=seed)
