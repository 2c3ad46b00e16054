"""``rudder/Live-v0``: the prefetch decision game stepped by real DistDGL training on one trainer rank."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np

from rudder_env.episode import PrefetchEpisode, require_running
from rudder_env.replay_env import DEFAULT_CANDIDATES
from rudder_env.spaces import action_space, observation_space


class LiveEnv(gym.Env):
    """Prefetching for one trainer rank of a running DistDGL job (one env per trainer; all step in lockstep).

    ``step(action)`` schedules the prefetch set and runs the next ``period`` minibatches of real training
    (sampling, buffered feature pulls over DGL RPC, forward/backward, DDP all-reduce). Every trainer of the job must
    make the same calls (``reset``/``step``) since DDP synchronises their minibatches.

    ## Action Space
    ``MultiBinary(K)`` over the ranked candidates in ``info["candidate_ids"]`` (as in ``rudder/Replay-v0``).

    ## Observation Space
    As ``rudder/Replay-v0`` (:mod:`rudder_env.spaces`); times are measured, not modelled.

    ## Rewards
    ``"traffic"``: minus remote rows fetched over remote rows sampled in the window; ``"time"``: minus the window's
    measured seconds (sampling + feature fetch + compute).

    ## Starting State
    ``reset(seed=)`` restarts training from scratch (weights, optimizer, buffer filled per ``--buffer-init``,
    sampling order, all fixed by the seed) and runs no minibatch, so the first observation is deterministic.

    ## Episode End
    Terminates after the run's last minibatch (``epochs`` x minibatches per epoch).

    ## Arguments
    ``trainer`` (a :class:`~rudder_env.trainer.DistTrainer` inside a DistDGL job), ``candidates`` (K), ``reward``,
    ``trace`` (an optional :class:`traces.TraceWriter` recording every minibatch and decision), ``ranking``
    (``"misses"`` or ``"lookahead"``, see :class:`~rudder_env.episode.PrefetchEpisode`) with
    ``lookahead_horizon`` and ``lookahead_discount``.
    """

    metadata = {"render_modes": []}

    def __init__(self, trainer, candidates: int = DEFAULT_CANDIDATES, reward: str = "traffic", trace=None,
                 ranking: str = "misses", lookahead_horizon: int | None = None,
                 lookahead_discount: float | None = None):
        self.trainer = trainer
        self.k = int(candidates)
        self.reward = reward
        self.trace = trace
        self.ranking = ranking
        self.lookahead_horizon, self.lookahead_discount = lookahead_horizon, lookahead_discount
        self.period = trainer.cfg.period
        self.observation_space = observation_space(self.k)
        self.action_space = action_space(self.k)
        self.episode: PrefetchEpisode | None = None
        self._records = None
        self._observed_at = None
        self.env_overhead_s = 0.0  # time spent building observations and applying actions (start-up included)
        self.env_startup_s = 0.0  # of which in reset(): the first observation (e.g. the lookahead's first scores)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        t = self.trainer
        seed = t.cfg.seed if seed is None else seed
        if t.minibatch_index > 0 or seed != t.seed:
            t.start(seed)
        self._records = t.minibatches()
        t0 = time.perf_counter()
        cfg = t.cfg
        facts = dict(graph=cfg.graph, parts=cfg.parts, partitioning=cfg.partition, rank=t.trainer_rank,
                     num_nodes=int(t.g.num_nodes()), model=cfg.model, source="live DistDGL training")
        self.episode = PrefetchEpisode(t.buffer, self.k, t.total_minibatches, t.halo_ids.size, cfg.fanouts,
                                       cfg.batch_size, reward=self.reward, facts=facts, ranking=self.ranking,
                                       lookahead=t.lookahead, upcoming=lambda done, h: t.upcoming_seeds(h),
                                       sampled_ahead=lambda done: t.sampled_ahead(),
                                       horizon=self.lookahead_horizon, discount=self.lookahead_discount)
        obs, info = self.episode.observe()
        self.env_overhead_s = self.env_startup_s = time.perf_counter() - t0
        self._observed_at = time.perf_counter()
        return obs, info

    def start_together(self) -> None:
        """Wait until every trainer of the job gets here (after agent start-up work of unequal length)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def step(self, action):
        require_running(self.episode)
        t0 = time.perf_counter()
        latency_s = t0 - self._observed_at  # the agent's decision time
        ids = self.episode.decide(action)
        if self.trace is not None:
            self.trace.add_decision(minibatch=self.episode.minibatches, ids=ids, latency_s=latency_s)
        self.env_overhead_s += time.perf_counter() - t0
        obs, reward, terminated, truncated, info = self.run_window()
        info["applied_ids"] = ids
        info["decision_latency_s"] = latency_s
        return obs, reward, terminated, truncated, info

    def run_window(self, poll=None):
        """Run the next ``period`` minibatches of training with no new decision, except what ``poll`` returns.

        ``poll(minibatch)`` is called before each minibatch; a non-None return ``(ids, latency_s)`` is a prefetch
        set applied there, e.g. a decision an agent finished in the background (:mod:`agents.runner`).
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
            ep.record(rec.remote_ids, rec.local_rows, rec.step, rec.sample_s, rec.fetch_s, rec.compute_s)
            if self.trace is not None:
                self.trace.add_minibatch(minibatch=rec.index, epoch=rec.epoch, remote_ids=rec.remote_ids,
                                         local_rows=rec.local_rows, sample_s=rec.sample_s, fetch_s=rec.fetch_s,
                                         compute_s=rec.compute_s, fetch_rows=rec.fetch_rows, hits=rec.step.hits,
                                         remote_fetched=rec.step.remote_fetched, prefetched=rec.step.prefetched,
                                         seeds=rec.seeds)
            overhead += time.perf_counter() - t1
        t2 = time.perf_counter()
        if ep.done:
            for _ in self._records:  # run the generator to its end: closes the last epoch's timing
                raise RuntimeError("the trainer produced more minibatches than it announced")
        reward, _ = ep.end_window()
        obs, info = ep.observe()
        info["applied_ids"] = np.concatenate(late) if late else np.zeros(0, dtype=np.int64)
        self.env_overhead_s += overhead + time.perf_counter() - t2
        self._observed_at = time.perf_counter()
        return obs, reward, ep.done, False, info
