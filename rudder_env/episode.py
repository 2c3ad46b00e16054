"""The decision game both environments play: one episode's state, and the one loop that runs a decision window.

An episode is one training run (or one trace). A *driver* yields one :class:`MinibatchRecord` per minibatch after
pushing its remote ids through the buffer: the live trainer (real training) or the trace (replay). Every ``period``
minibatches the env calls :meth:`PrefetchEpisode.observe`, hands the observation to the agent, and turns its
``MultiBinary(K)`` action into a prefetch set with :meth:`PrefetchEpisode.decide`. :class:`PrefetchEnv` is the
Gymnasium env both ``rudder/Live-v0`` and ``rudder/Replay-v0`` derive from: the same ``step`` and ``run_window`` on
either driver, so the same agent sees the same thing live and offline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import gymnasium as gym
import numpy as np

from rudder_env.buffer import MinibatchCounts, PrefetchBuffer
from rudder_env.contract import DecisionInfo
from rudder_env.ranking import Ranking
from rudder_env.spaces import WindowStats, build_observation, check_action

REWARDS = ("traffic", "time")


@dataclass
class MinibatchRecord:
    """What one minibatch needed and cost (one trace row), after its remote ids went through the buffer."""

    epoch: int
    index: int  # minibatch index over the whole run
    remote_ids: np.ndarray  # global ids of remote input nodes (all of them, hits included)
    local_rows: int
    sample_s: float
    fetch_s: float  # measured live, modelled in replay
    fetch_rows: int  # rows pulled: local + misses + prefetched
    compute_s: float
    counts: MinibatchCounts  # what the buffer did
    loss: float = float("nan")
    seeds: np.ndarray | None = None  # the minibatch's seed (output) node ids, where known
    stall_s: float = 0.0  # of fetch_s: waiting behind a background prefetch chunk


@dataclass(frozen=True)
class RunFacts:
    """Fixed facts of the run an episode plays: sizes for the observation, and ``facts`` passed to agents."""

    total_minibatches: int
    halo_nodes: int
    fanouts: list[int]
    batch_size: int
    facts: dict = field(default_factory=dict)  # graph, partitioning, rank, source, ...


def require_running(episode: PrefetchEpisode | None) -> PrefetchEpisode:
    """The env's episode, or a clear error when ``reset()`` was not called or the episode has ended."""
    if episode is None:
        raise RuntimeError("call reset() before step()")
    if episode.done:
        raise RuntimeError("the episode has ended: call reset()")
    return episode


class PrefetchEpisode:
    """State of one episode on one trainer.

    Args:
        buffer: the trainer's buffer (already filled).
        ranking: ranks the candidates and picks victims (:mod:`rudder_env.ranking`).
        k: number of ranked candidates per decision (action size).
        run: the run's fixed facts.
        reward: ``"traffic"`` (minus remote rows fetched / remote rows sampled over the window) or ``"time"``
            (minus the window's seconds).
    """

    def __init__(self, buffer: PrefetchBuffer, ranking: Ranking, k: int, run: RunFacts, reward: str = "traffic"):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}: expected one of {', '.join(REWARDS)}")
        if k < 1:
            raise ValueError(f"the number of candidates must be >= 1, got {k}")
        self.buffer, self.ranking, self.k, self.run = buffer, ranking, k, run
        self.total_minibatches = run.total_minibatches
        self.reward_kind = reward
        self.window = WindowStats()  # the window being run
        self.last_window = WindowStats()  # the window the next observation describes
        self.minibatches = 0
        self.windows = 0
        self.decisions = 0
        self.facts = dict(run.facts, halo_nodes=run.halo_nodes, capacity=buffer.capacity, alpha=buffer.alpha,
                          period=buffer.period, fanout=",".join(map(str, run.fanouts)), batch_size=run.batch_size,
                          total_minibatches=run.total_minibatches, candidates=k)
        self._seen_in_window = np.full(buffer.num_nodes, -1, dtype=np.int32)  # window index of an id's last use
        self.candidate_ids = np.full(k, -1, dtype=np.int64)
        self._victims = None
        self.on_apply: Callable[[int, np.ndarray], None] | None = None  # told of every prefetch set applied

    @property
    def done(self) -> bool:
        return self.minibatches >= self.total_minibatches

    def before_minibatch(self) -> None:
        """Called before each minibatch's lookup: the ranking refreshes what admission and eviction read."""
        self.ranking.advance(self.minibatches)

    def record(self, rec: MinibatchRecord) -> None:
        """Count a minibatch the driver ran."""
        new = np.count_nonzero(self._seen_in_window[rec.remote_ids] != self.windows)
        self._seen_in_window[rec.remote_ids] = self.windows
        self.window.add(rec.remote_ids, rec.local_rows, rec.counts, rec.sample_s, rec.fetch_s, rec.compute_s,
                        int(new))
        self.minibatches += 1

    def observe(self) -> tuple[dict, DecisionInfo]:
        """Observation and info at a decision point; refreshes the candidate list the next action refers to."""
        ranked = self.ranking.rank(self.minibatches, self.k)
        self.candidate_ids, self._victims = ranked.candidate_ids, ranked.victims
        c = self.buffer.counters
        # alpha scales once more here for either ranking: the shipped PPO policy was trained on these values
        scores = ranked.candidate_scores * self.ranking.score_scale * self.buffer.alpha
        obs = build_observation(self.buffer, self.last_window, c.hits, c.remote_sampled,
                                self.minibatches / max(self.total_minibatches, 1), scores,
                                self.run.halo_nodes, self.run.fanouts, self.run.batch_size)
        info = DecisionInfo(candidate_ids=self.candidate_ids.copy(),
                            candidate_scores=ranked.candidate_scores.copy(),
                            n_candidates=int(np.count_nonzero(self.candidate_ids >= 0)),
                            n_evictable=ranked.n_evictable, capacity=self.buffer.capacity,
                            minibatch=self.minibatches, decision=self.decisions, window=self.last_window.as_dict(),
                            counters=c.as_dict(), facts=dict(self.facts))
        return obs, info

    def decide(self, action) -> np.ndarray:
        """Turn a ``MultiBinary(K)`` action into the prefetch set (ids, in rank order) and schedule it."""
        mask = check_action(action, self.k) & (self.candidate_ids >= 0)
        return self.apply(self.candidate_ids[mask])

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Schedule a prefetch set of node ids (e.g. a late decision taken on an earlier candidate list)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.on_apply is not None:
            self.on_apply(self.minibatches, ids)
        self.buffer.apply(ids, victim_order=self._victims)
        self.decisions += 1
        return ids

    def end_window(self) -> tuple[float, WindowStats]:
        """Reward of the window just run, and its stats; the next observation describes it."""
        w = self.window
        reward = -w.remote_fetched / max(w.remote_sampled, 1) if self.reward_kind == "traffic" else -w.seconds
        self.last_window, self.window = w, WindowStats()
        self.windows += 1
        return float(reward), w


Poll = Callable[[int], "tuple[np.ndarray, float] | None"]


class PrefetchEnv(gym.Env):
    """What ``rudder/Live-v0`` and ``rudder/Replay-v0`` share: ``step`` and ``run_window`` over a driver.

    A subclass sets ``episode`` and ``_records`` (the driver's iterator of :class:`MinibatchRecord`) in ``reset``
    and may set ``trace`` (a :class:`traces.TraceWriter` recording every minibatch and decision).
    """

    metadata = {"render_modes": []}
    live = False  # True: real training, times measured; False: replay, times modelled
    period: int
    trace = None

    def __init__(self):
        self.episode: PrefetchEpisode | None = None
        self._records: Iterator[MinibatchRecord] | None = None
        self._observed_at = time.perf_counter()
        self.env_overhead_s = 0.0  # time spent building observations and applying actions (start-up included)
        self.env_startup_s = 0.0  # of which in reset(): the first observation (e.g. the lookahead's first scores)

    def _first_observation(self) -> tuple[dict, DecisionInfo]:
        """The observation that ``reset`` returns, timed as start-up."""
        t0 = time.perf_counter()
        obs, info = self.episode.observe()
        self.env_overhead_s = self.env_startup_s = time.perf_counter() - t0
        self._observed_at = time.perf_counter()
        return obs, info

    def step(self, action):
        """Schedule the action's prefetch set, then run the next ``period`` minibatches."""
        ep = require_running(self.episode)
        t0 = time.perf_counter()
        latency_s = t0 - self._observed_at  # the agent's decision time
        ids = ep.decide(action)
        if self.trace is not None:
            self.trace.add_decision(minibatch=ep.minibatches, ids=ids, latency_s=latency_s)
        self.env_overhead_s += time.perf_counter() - t0
        obs, reward, terminated, truncated, info = self.run_window()
        info["applied_ids"] = ids
        if self.live:  # offline the agent's wall-clock time is not part of the (deterministic) replay
            info["decision_latency_s"] = latency_s
        return obs, reward, terminated, truncated, info

    def run_window(self, poll: Poll | None = None):
        """Run the next ``period`` minibatches with no new decision, except what ``poll`` returns.

        ``poll(minibatch)`` is called before each minibatch with the number of minibatches run so far; a non-None
        return ``(ids, latency_s)`` is a prefetch set applied there, e.g. a decision an agent finished in the
        background (:mod:`rudder_env.evaluation.play`). Returns ``step``'s tuple.
        """
        ep = require_running(self.episode)
        late, overhead = [], 0.0
        for _ in range(self.period):
            if ep.done:
                break
            t1 = time.perf_counter()
            if poll is not None:
                got = poll(ep.minibatches)
                if got is not None:
                    ids, latency_s = got
                    late.append(ep.apply(ids))
                    if self.trace is not None:
                        self.trace.add_decision(minibatch=ep.minibatches, ids=late[-1], latency_s=latency_s)
            ep.before_minibatch()
            overhead += time.perf_counter() - t1
            rec = next(self._records)
            t1 = time.perf_counter()
            ep.record(rec)
            if self.trace is not None:
                self.trace.add_minibatch(minibatch=rec.index, epoch=rec.epoch, remote_ids=rec.remote_ids,
                                         local_rows=rec.local_rows, sample_s=rec.sample_s, fetch_s=rec.fetch_s,
                                         compute_s=rec.compute_s, fetch_rows=rec.fetch_rows, hits=rec.counts.hits,
                                         remote_fetched=rec.counts.remote_fetched,
                                         prefetched=rec.counts.prefetched, seeds=rec.seeds,
                                         **(dict(arrived=rec.counts.arrived, stall_s=rec.stall_s)
                                            if ep.buffer.prefetch == "background" else {}))
            overhead += time.perf_counter() - t1
        t2 = time.perf_counter()
        if ep.done:
            for _ in self._records:  # run the driver to its end (live: closes the last epoch's timing)
                raise RuntimeError("the driver produced more minibatches than it announced")
        reward, _ = ep.end_window()
        obs, info = ep.observe()
        info["applied_ids"] = np.concatenate(late) if late else np.zeros(0, dtype=np.int64)
        self.env_overhead_s += overhead + time.perf_counter() - t2
        self._observed_at = time.perf_counter()
        return obs, reward, ep.done, False, info
