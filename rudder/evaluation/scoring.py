"""Scoring agents and oracles on recorded traces: one row per agent x trace x rank, as in ``results.csv``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import gymnasium as gym
import numpy as np

import rudder.env  # noqa: F401  (registers the environments)
from rudder.agents.base import as_agent
from rudder.baselines.oracles import belady_min, hindsight_static, hit_ceiling
from rudder.baselines.policies import FixedLevel, Periodic, RandomBudget, StaticBuffer
from rudder.env.contract import LINK_LEVELS, buffer_kwargs
from rudder.env.replay_env import ReplayEnv
from rudder.env.timing import FetchTimeModel, out_of_sample
from rudder.evaluation.play import play, play_best_level, play_episode
from rudder.traces import Trace
from rudder.traces.fingerprint import HELD_OUT, provenance, rank_fingerprint
from rudder.traces.timecheck import TimeCheck
from rudder.traces.timecheck import time_checks as find_time_checks

ORACLES = ("belady", "hindsight", "best-level")
LEVEL_ORACLE_HORIZON = 3  # windows the best-level oracle plays each level ahead before choosing

#: What a row of ``results.csv`` holds, in order: who played where (``agent``, ``trace``, ``rank``, the buffer's
#: ``capacity``, whether it decided in the background, its provenance), then what the buffer did and what it cost
#: (:data:`PLAYED`); then columns each source adds (the time model, the hit-rate ceiling, the level oracle...).
WHO = ("agent", "trace", "rank", "capacity", "asynchronous", "provenance", "held_out", "invalid_answers")
PLAYED = (
    "remote_sampled",  # remote input rows needed
    "hits",  # of which served from the buffer
    "remote_fetched",  # rows pulled over RPC: misses + prefetched
    "prefetched",  # rows pulled only because a prefetch set (or the initial fill) asked for them
    "initial_fill",  # of prefetched: the initial fill's
    "admitted_on_miss",  # missed rows that entered the buffer at no extra traffic
    "time_s",  # modelled in replay (NaN for a traffic oracle), measured live
    "decisions",
    "latency_p50_s",
    "latency_p95_s",
    "window_hit_rate",  # hit rate per decision window
)


def result_row(
    agent: str,
    trace: str,
    rank: int,
    capacity: int,
    played: dict,
    *,
    asynchronous: bool = False,
    provenance: str = "",
    held_out: bool | None = None,
    invalid_answers: int = 0,
    **more,
) -> dict:
    """One row of ``results.csv``: :data:`WHO` then ``played`` (what :func:`~rudder.evaluation.play.play` returns,
    or the same :data:`PLAYED` keys from an oracle or a live run: every one of them must be there) then ``more``.
    The one place a results row is put together, for replayed agents, oracles and live runs alike."""
    missing = [k for k in PLAYED if k not in played]
    if missing:
        raise ValueError(f"a results row for {agent} on {trace} rank {rank} lacks {', '.join(missing)}")
    who = dict(zip(WHO, (agent, trace, rank, capacity, asynchronous, provenance, held_out, invalid_answers)))
    return dict(who, **played, **more)


def evaluate_trace(
    trace_dir: str,
    agents: dict[str, Callable[[str, int], object]],
    buffer_fraction: float | None = None,
    oracles: Iterable[str] = ORACLES,
    candidates: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    time_checks: Sequence[TimeCheck] = (),
) -> list[dict]:
    """Score every agent and oracle on every rank of one trace.

    ``agents`` maps a name to a factory ``(trace_name, rank) -> agent``. Asynchronous agents decide in the
    background, their latency simulated as a delay (:func:`rudder.evaluation.play.run_async`).

    Each row's ``provenance`` says, by content, whether a learned agent learned from that rank
    (:func:`rudder.traces.fingerprint.provenance`: ``trained-on``, ``same-config``, ``held-out``, ``unknown``; empty for
    agents that learn nothing from traces); ``held_out`` is True only for ``held-out``.

    Each row carries the rank's hit-rate ceiling for its buffer size (:func:`rudder.baselines.oracles.hit_ceiling`):
    ``ceiling_hits`` over the rank and ``window_hit_ceiling`` per decision window, the most hits any policy could
    have (Belady MIN bounds traffic, not hit rate).

    Each row also carries the rank's replay time model (:func:`time_model_columns`), checked out of sample on the
    first of the trace's own ``time-check-*.json`` files and ``time_checks`` that fits it.

    The ``best-level`` oracle (:func:`level_oracle`) runs only on ranks whose time fit separates remote rows (time
    is what it optimises); every row of such a rank carries ``level_oracle_s`` and ``worst_level_s`` for regret and
    headroom.
    """
    trace = Trace(trace_dir)
    name = os.path.basename(os.path.normpath(trace_dir))
    checks = find_time_checks(trace, list(time_checks))
    rows = []
    for rank in trace.ranks:
        ref = ReplayEnv(trace, rank=rank, candidates=candidates, buffer_fraction=buffer_fraction)
        timing = time_model_columns(trace, rank, ref.time_model, checks)
        fingerprint = None  # computed once per rank, when a learned agent needs it
        ids = trace.rank(rank).minibatch_ids()
        sampled = np.asarray([x.size for x in ids], dtype=np.int64)
        ceiling = hit_ceiling(ids, ref.capacity)
        bound = dict(ceiling_hits=int(ceiling.sum()), window_hit_ceiling=_window_rates(ceiling, sampled, ref.period))
        for agent_name, factory in agents.items():
            agent = as_agent(factory(name, rank))
            env = ReplayEnv(trace, rank=rank, candidates=candidates, **buffer_kwargs(agent.settings, buffer_fraction))
            if progress:
                progress(f"{name} rank {rank}: {agent_name}")
            r = play(env, agent, seed=seed, asynchronous=agent.asynchronous)
            r.pop("delay_minibatches", None)
            if agent.trained_on is not None and fingerprint is None:
                fingerprint = rank_fingerprint(trace, rank)
            origin = provenance(agent.trained_on, fingerprint) if agent.trained_on is not None else ""
            rows.append(
                result_row(
                    agent_name,
                    name,
                    rank,
                    env.capacity,
                    r,
                    asynchronous=agent.asynchronous,
                    provenance=origin,
                    held_out=(origin == HELD_OUT) if origin else None,
                    invalid_answers=agent.stats().get("invalid_answers", 0),
                    **timing,
                    **bound,
                )
            )
        rank_rows = [r for r in rows if r["rank"] == rank and r["trace"] == name]
        for oracle in oracles:
            if progress:
                progress(f"{name} rank {rank}: {oracle}")
            if oracle == "best-level":
                if not timing["time_fit_ok"]:
                    continue
                res = level_oracle(trace, rank, buffer_fraction, candidates, seed)
                for r in rank_rows:
                    r.update(level_oracle_s=res["time_s"], worst_level_s=res["worst_level_s"])
                played = {k: v for k, v in res.items() if k not in ("levels_chosen", "fixed_level_s")}
                rows.append(
                    result_row(
                        oracle, name, rank, ref.capacity, played, level_oracle_s=res["time_s"], **timing, **bound
                    )
                )
                continue
            fn = {"belady": belady_min, "hindsight": hindsight_static}[oracle]
            res = fn(ids, ref.capacity)
            played = dict(
                remote_sampled=res.remote_sampled,
                hits=res.hits,
                remote_fetched=res.remote_fetched,
                prefetched=res.prefetched,
                initial_fill=res.initial_fill,
                admitted_on_miss=0,
                time_s=float("nan"),
                decisions=0,
                latency_p50_s=0.0,
                latency_p95_s=0.0,
                window_hit_rate=_window_rates(res.per_minibatch_hits, sampled, ref.period),
            )
            rows.append(result_row(oracle, name, rank, ref.capacity, played, **timing, **bound))
    return rows


def level_oracle(
    trace: Trace,
    rank: int,
    buffer_fraction: float | None = None,
    candidates: int | None = None,
    seed: int = 0,
    levels=LINK_LEVELS,
    horizon: int = LEVEL_ORACLE_HORIZON,
) -> dict:
    """The best-in-action-space oracle over link-budget levels with the lookahead's candidates (the misses' where
    the trace has no lookahead structure): the better of the greedy search
    (:func:`~rudder.evaluation.play.play_best_level`) and the best level held throughout (``oracle_policy``
    says which), with the modelled time of each fixed level: ``worst_level_s`` (the worst of them),
    ``fixed_level_s``, and the greedy search's own ``greedy_s``."""
    probe = FixedLevel(levels[0], levels=levels)
    kwargs = buffer_kwargs(probe.settings, buffer_fraction)
    try:
        env = ReplayEnv(trace, rank=rank, candidates=candidates, **kwargs)
    except ValueError:  # no seeds or partition structure in the trace
        kwargs.update(ranking="misses", admit_on_miss=None)
        env = ReplayEnv(trace, rank=rank, candidates=candidates, **kwargs)
    fixed = [play_episode(env, FixedLevel(x, ranking=kwargs["ranking"], levels=levels), seed) for x in levels]
    greedy = play_best_level(env, horizon=horizon, seed=seed)
    times = [r["time_s"] for r in fixed]
    # the greedy search can miss what one level held throughout does: the oracle is the better of the two
    best = int(np.argmin(times))
    res = greedy if greedy["time_s"] <= times[best] else dict(fixed[best], levels_chosen=None)
    res = dict(
        res,
        oracle_policy="greedy" if res is greedy else f"level {levels[best]:g}",
        worst_level_s=max(times),
        fixed_level_s=times,
        greedy_s=greedy["time_s"],
        level_ranking=kwargs["ranking"],
    )
    return res


def time_model_columns(trace: Trace, rank: int, model: FetchTimeModel, checks: Sequence[TimeCheck]) -> dict:
    """The rank's fetch-time fit (``time_r2``, ``time_s_per_remote_row``, ``time_fit_ok``: it separates remote
    rows, see :meth:`~rudder.env.timing.FetchTimeModel.separates_remote_rows`) and its out-of-sample error on the
    first check run that has this rank (``time_check_agent``, ``time_oos_fetch_error``, ``time_oos_time_error``:
    modelled minus measured, over measured; NaN without a check run), with ``time_check_compute_ratio``, the check
    run's compute seconds per minibatch over the trace's: far from 1, the two runs met different machine load, and
    that drift is part of the error."""
    out = dict(
        time_r2=model.r2,
        time_s_per_remote_row=model.c_remote,
        time_fit_ok=model.separates_remote_rows,
        time_check_agent="",
        time_oos_fetch_error=float("nan"),
        time_oos_time_error=float("nan"),
        time_check_compute_ratio=float("nan"),
    )
    for check in checks:
        if rank not in check.ranks:
            continue
        cols = check.ranks[rank]
        table = trace.rank(rank).table()
        same_length = len(table) == cols["fetch_s"].size
        res = out_of_sample(
            model,
            cols["local_rows"],
            cols["remote_fetched"],
            cols["fetch_s"],
            other_s=cols["sample_s"] + cols["compute_s"] if same_length else None,
            modelled_other_s=float(table["sample_s"].sum() + table["compute_s"].sum()) if same_length else None,
        )
        out.update(
            time_check_agent=check.agent,
            time_oos_fetch_error=res["fetch_error"],
            time_oos_time_error=res["time_error"],
            time_check_compute_ratio=float(np.mean(cols["compute_s"]) / max(table["compute_s"].mean(), 1e-12)),
        )
        break
    return out


def _window_rates(per_minibatch_hits: np.ndarray, per_minibatch_sampled: np.ndarray, period: int) -> list[float]:
    if per_minibatch_hits.size == 0:
        return []
    starts = np.arange(0, per_minibatch_hits.size, period)
    hits = np.add.reduceat(per_minibatch_hits, starts)
    sampled = np.add.reduceat(per_minibatch_sampled, starts)
    return [float(h / s) if s else 0.0 for h, s in zip(hits, sampled)]


def compare_policy(
    policy: str,
    traces: Sequence[str],
    buffer_fractions: Sequence[float | None] = (None,),
    random_seeds: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Remote rows fetched by a saved PPO policy beside periodic, static and :class:`RandomBudget` (mean over
    ``random_seeds`` seeds), one replay episode each, per trace x rank x buffer fraction (``None``: recorded)."""
    from rudder.agents.ppo import PPOAgent

    agent = PPOAgent(policy)
    rows = []
    for trace in traces:
        t = Trace(trace)
        name = os.path.basename(os.path.normpath(trace))
        for rank in t.ranks:
            for fraction in buffer_fractions:
                env = gym.make("rudder/Replay-v0", trace=t, rank=rank, buffer_fraction=fraction)
                # as evaluate.py scores it: a static buffer admits nothing on a miss either
                static_env = gym.make(
                    "rudder/Replay-v0", trace=t, rank=rank, **buffer_kwargs(StaticBuffer.settings, fraction)
                )
                ppo = play_episode(env, agent, seed)
                random = [
                    play_episode(env, RandomBudget(seed + s, agent.levels), seed)["remote_fetched"]
                    for s in range(random_seeds)
                ]
                origin = provenance(agent.trained_on, rank_fingerprint(t, rank))
                rows.append(
                    dict(
                        trace=name,
                        rank=rank,
                        buffer_fraction=env.unwrapped.buffer_fraction,
                        capacity=env.unwrapped.capacity,
                        provenance=origin,
                        held_out=origin == HELD_OUT,
                        remote_sampled=ppo["remote_sampled"],
                        ppo=ppo["remote_fetched"],
                        periodic=play_episode(env, Periodic(), seed)["remote_fetched"],
                        static=play_episode(static_env, StaticBuffer(), seed)["remote_fetched"],
                        random=float(np.mean(random)),
                    )
                )
    return rows
