"""``rudder/Live-v0``: the prefetch decision game stepped by real DistDGL training on one trainer rank."""

from __future__ import annotations

import time

from rudder.env.defaults import DEFAULTS
from rudder.env.episode import PrefetchEnv, PrefetchEpisode, RunFacts
from rudder.env.ranking import make_ranking
from rudder.env.settings import check, check_link_levels
from rudder.env.spaces import action_space, observation_space


class LiveEnv(PrefetchEnv):
    """Prefetching for one trainer rank of a running DistDGL job (one env per trainer; all step in lockstep).

    ``step(action)`` schedules the prefetch set and runs the next ``period`` minibatches of real training
    (sampling, buffered feature pulls over DGL RPC, forward/backward, DDP all-reduce). Every trainer of the job must
    make the same calls (``reset``/``step``) since DDP synchronises their minibatches.

    ## Action Space
    ``MultiBinary(K)`` over the ranked candidates in ``info["candidate_ids"]``, or with ``levels`` a
    ``Discrete`` link-budget level (as in ``rudder/Replay-v0``).

    ## Observation Space
    As ``rudder/Replay-v0`` (:mod:`rudder.env.spaces`); times are measured, not modelled.

    ## Rewards
    ``"traffic"``: minus remote rows fetched over remote rows sampled in the window; ``"time"``: minus the window's
    measured seconds (sampling + feature fetch + compute).

    ## Starting State
    ``reset(seed=)`` restarts training from scratch (weights, optimizer, buffer filled per ``--buffer-init``,
    sampling order, all fixed by the seed) and runs no minibatch, so the first observation is deterministic.

    ## Episode End
    Terminates after the run's last minibatch (``epochs`` x minibatches per epoch).

    ## Arguments
    ``trainer`` (a :class:`~rudder.runtime.trainer.DistTrainer` inside a DistDGL job), ``candidates`` (K), ``reward``,
    ``trace`` (an optional :class:`traces.TraceWriter` recording every minibatch and decision), ``ranking``
    (``"misses"`` or ``"lookahead"``, see :mod:`rudder.env.ranking`) with
    ``lookahead_horizon`` and ``lookahead_discount``.
    """

    live = True

    def __init__(
        self,
        trainer,
        candidates: int = DEFAULTS.candidates,
        reward: str = DEFAULTS.reward,
        trace=None,
        ranking: str = DEFAULTS.ranking,
        lookahead_horizon: int | None = None,
        lookahead_discount: float | None = None,
        levels=None,
    ):
        super().__init__()
        self.levels = None if levels is None else check_link_levels(levels)
        self.trainer = trainer
        self.k = check("candidates", candidates)
        self.reward = check("reward", reward)
        self.trace = trace
        self.ranking = check("ranking", ranking)
        self.lookahead_horizon, self.lookahead_discount = lookahead_horizon, lookahead_discount
        self.period = trainer.cfg.period
        self.observation_space = observation_space(self.k)
        self.action_space = action_space(self.k, self.levels)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        t = self.trainer
        seed = t.cfg.seed if seed is None else seed
        if t.minibatch_index > 0 or seed != t.seed:
            t.start(seed)
        self._records = t.minibatches()
        cfg = t.cfg
        run = RunFacts(
            t.total_minibatches,
            t.halo_ids.size,
            cfg.fanouts,
            cfg.batch_size,
            facts=dict(
                graph=cfg.graph,
                parts=cfg.parts,
                partitioning=cfg.partition,
                rank=t.trainer_rank,
                num_nodes=int(t.g.num_nodes()),
                model=cfg.model,
                source="live DistDGL training",
            ),
            initial_fill=(int(t.initial_ids.size), float(t.initial_fill_s)) if t.initial_ids.size else None,
        )
        t0 = time.perf_counter()
        ranking = make_ranking(
            self.ranking,
            t.buffer,
            lookahead=t.lookahead,
            upcoming=lambda done, h: t.upcoming_seeds(h),
            sampled_ahead=lambda done: t.sampled_ahead(),
            horizon=self.lookahead_horizon,
            discount=self.lookahead_discount,
        )
        self.episode = PrefetchEpisode(t.buffer, ranking, self.k, run, reward=self.reward, levels=self.levels)
        ranking_s = time.perf_counter() - t0
        obs, info = self._first_observation()
        self.env_overhead_s += ranking_s
        self.env_startup_s += ranking_s
        return obs, info

    def start_together(self) -> None:
        """Wait until every trainer of the job gets here (after agent start-up work of unequal length)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
