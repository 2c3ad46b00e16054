"""Scoring agents and oracles on recorded traces: one row per agent x trace x rank, as in ``results.csv``."""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import numpy as np

from rudder_env.replay_env import ReplayEnv

ORACLES = ("belady", "hindsight")


def play_episode(env, agent, seed: int = 0) -> dict:
    """Run ``agent`` through one episode of ``env``; returns counters, modelled seconds, per-window hit rates and
    decision latencies."""
    from agents.runner import warm_up

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
    return tally.result(env)


class EpisodeTally:
    """What every way of playing an episode keeps: each window's seconds and hit rate, and decision latencies."""

    def __init__(self):
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.window_hit_rate: list[float] = []

    def add_window(self, info: dict) -> None:
        """Count the window that ``info`` (returned by ``step`` or ``run_window``) describes."""
        w = info["window"]
        self.seconds += w["sample_s"] + w["fetch_s"] + w["compute_s"]
        self.window_hit_rate.append(w["hits"] / max(w["remote_sampled"], 1))

    def result(self, env, **extra) -> dict:
        """The row of the played episode: the buffer's counters, time (``time_s``: modelled in replay, measured
        live), decisions and their latency percentiles."""
        c = env.unwrapped.episode.buffer.counters
        lat = self.latencies
        return dict(remote_sampled=c.remote_sampled, hits=c.hits, remote_fetched=c.remote_fetched,
                    prefetched=c.prefetched, initial_fill=c.initial_fill, admitted_on_miss=c.admitted_on_miss,
                    time_s=self.seconds, decisions=len(lat),
                    latency_p50_s=float(np.percentile(lat, 50)) if lat else 0.0,
                    latency_p95_s=float(np.percentile(lat, 95)) if lat else 0.0,
                    window_hit_rate=self.window_hit_rate, **extra)


def evaluate_trace(trace_dir: str, agents: dict[str, Callable[[str, int], object]],
                   buffer_fraction: float | None = None, oracles: Iterable[str] = ORACLES,
                   candidates: int | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> list[dict]:
    """Score every agent and oracle on every rank of one trace.

    ``agents`` maps a name to a factory ``(trace_name, rank) -> agent``. Slow agents (:func:`agents.base.is_slow`)
    decide in the background, their latency simulated as a delay (:func:`agents.runner.run_async`).
    """
    from agents.base import is_slow
    from agents.runner import play
    from baselines.oracles import belady_min, hindsight_static
    from traces import Trace

    trace = Trace(trace_dir)
    name = os.path.basename(os.path.normpath(trace_dir))
    rows = []
    for rank in trace.ranks:
        ref = ReplayEnv(trace, rank=rank, candidates=candidates, buffer_fraction=buffer_fraction)
        for agent_name, factory in agents.items():
            agent = factory(name, rank)
            env = ReplayEnv(trace, rank=rank, candidates=candidates, buffer_fraction=(
                buffer_fraction if getattr(agent, "uses_buffer", True) else 0.0),
                admit_on_miss=False if getattr(agent, "static", False) else getattr(agent, "admit_on_miss", None),
                ranking=getattr(agent, "ranking", "misses"))
            if progress:
                progress(f"{name} rank {rank}: {agent_name}")
            slow = is_slow(agent)
            r = play(env, agent, seed=seed, asynchronous=slow)
            r.pop("delay_minibatches", None)
            trained_on = getattr(agent, "trained_on", None)
            rows.append(dict(agent=agent_name, trace=name, rank=rank, capacity=env.capacity, asynchronous=slow,
                             held_out=(name not in trained_on) if trained_on is not None else None,
                             invalid_answers=getattr(agent, "invalid_answers", 0), **r))
        ids = trace.rank(rank).minibatch_ids()
        sampled = np.asarray([x.size for x in ids], dtype=np.int64)
        for oracle in oracles:
            if progress:
                progress(f"{name} rank {rank}: {oracle}")
            fn = {"belady": belady_min, "hindsight": hindsight_static}[oracle]
            res = fn(ids, ref.capacity)
            rows.append(dict(agent=oracle, trace=name, rank=rank, capacity=ref.capacity, asynchronous=False,
                             held_out=None, invalid_answers=0, remote_sampled=res.remote_sampled, hits=res.hits,
                             remote_fetched=res.remote_fetched, prefetched=res.prefetched,
                             initial_fill=res.initial_fill, admitted_on_miss=0, time_s=float("nan"),
                             decisions=0, latency_p50_s=0.0, latency_p95_s=0.0,
                             window_hit_rate=_window_rates(res.per_minibatch_hits, sampled, ref.period)))
    return rows


def _window_rates(per_minibatch_hits: np.ndarray, per_minibatch_sampled: np.ndarray, period: int) -> list[float]:
    if per_minibatch_hits.size == 0:
        return []
    starts = np.arange(0, per_minibatch_hits.size, period)
    hits = np.add.reduceat(per_minibatch_hits, starts)
    sampled = np.add.reduceat(per_minibatch_sampled, starts)
    return [float(h / s) if s else 0.0 for h, s in zip(hits, sampled)]
