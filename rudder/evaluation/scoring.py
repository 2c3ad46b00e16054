"""Scoring agents and oracles on recorded traces: one row per agent x trace x rank, as in ``results.csv``."""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence

import gymnasium as gym
import numpy as np

import rudder.env  # noqa: F401  (registers the environments)
from rudder.agents.base import as_agent
from rudder.agents.ppo import PPOAgent
from rudder.baselines.constant import SPACES, ActionSpace, space_of
from rudder.baselines.oracles import belady_min, hindsight_static, hit_ceiling
from rudder.baselines.policies import Periodic, RandomBudget, StaticBuffer
from rudder.env.contract import LINK_LEVELS, BufferSettings, buffer_kwargs
from rudder.env.replay_env import ReplayEnv
from rudder.env.scenario import Scenario
from rudder.env.timing import FetchTimeModel, out_of_sample
from rudder.evaluation.bound import optimum
from rudder.evaluation.play import play, play_best_level, play_episode
from rudder.traces import TRAIN_DIR, Trace
from rudder.traces.fingerprint import HELD_OUT, provenance, rank_fingerprint
from rudder.traces.timecheck import TimeCheck
from rudder.traces.timecheck import time_checks as find_time_checks

CONSTANT_ORACLES = ("best-constant", "tuned-constant", "bound")  # one row per action space (:data:`SPACES`)
ORACLES = ("belady", "hindsight", "best-level", *CONSTANT_ORACLES)
LEVEL_ORACLE_HORIZON = 3  # windows the best-level oracle plays each level ahead before choosing

#: What a row of ``results.csv`` holds, in order: who played where (``agent``, ``trace``, ``rank``, the buffer's
#: ``capacity``, whether it decided in the background, its provenance, the scenario it was replayed under and so
#: whether its time is ``synthetic``), then what the buffer did and what it cost (:data:`PLAYED`); then columns each
#: source adds (the time model, the hit-rate ceiling, the level oracle...).
WHO = (
    "agent",
    "trace",
    "rank",
    "capacity",
    "asynchronous",
    "provenance",
    "held_out",
    "invalid_answers",
    "scenario",
    "synthetic",
)
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
    scenario: str = "",
    synthetic: bool = False,
    **more,
) -> dict:
    """One row of ``results.csv``: :data:`WHO` then ``played`` (what :func:`~rudder.evaluation.play.play` returns,
    or the same :data:`PLAYED` keys from an oracle or a live run: every one of them must be there) then ``more``.
    The one place a results row is put together, for replayed agents, oracles and live runs alike. ``scenario``:
    the name of the conditions the row was replayed under (:mod:`rudder.env.scenario`): a scenario given for the
    evaluation (``synthetic``: conditions no run met), or those a live run met and its trace recorded (not
    synthetic); empty for a run on a link left as it was, or a live run."""
    missing = [k for k in PLAYED if k not in played]
    if missing:
        raise ValueError(f"a results row for {agent} on {trace} rank {rank} lacks {', '.join(missing)}")
    values = (agent, trace, rank, capacity, asynchronous, provenance, held_out, invalid_answers, scenario, synthetic)
    who = dict(zip(WHO, values))
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
    tuned_on: Sequence[str] | None = None,
    scenario: Scenario | None = None,
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

    Time oracles run only on ranks whose time fit separates remote rows (time is what they optimise): ``best-level``
    (:func:`level_oracle`, every row of the rank then carries ``level_oracle_s``), and per action space
    (:data:`rudder.baselines.constant.SPACES`) ``best-constant:SPACE`` (the action held throughout that is fastest
    on this rank), ``tuned-constant:SPACE`` (the one fastest over ``tuned_on``, default the training traces:
    :func:`tuned_constants`) and ``bound:SPACE`` (the optimum over action sequences, :func:`bound_row`;
    ``bound_kind`` says whether proved). An agent's row carries ``action_space`` (where it decides) and that space's
    ``best_constant_s``, ``bound_s`` and ``bound_kind``, for headroom and its share of it. Every row carries
    ``time_error_band``: the replay model's out-of-sample |error| of total time on this rank (NaN without a time
    check), inside which differences are ties.

    ``scenario`` (a loaded :class:`~rudder.env.scenario.Scenario`): every replay — agents, oracles, the constants
    and bound, the tuned constants' training traces — runs under it instead of the recorded link, and every row
    says so (``scenario``, ``synthetic``). The time model's columns and ``time_error_band`` stay those of the fit to
    the recording: no run measured the scenario, so the band is the model's error under the recorded conditions.
    Without one, a trace recorded live under played conditions is replayed under those (its rows name them, not
    synthetic).
    """
    trace = Trace(trace_dir)
    name = os.path.basename(os.path.normpath(trace_dir))
    checks = find_time_checks(trace, list(time_checks))
    rows = []
    for rank in trace.ranks:
        ref = ReplayEnv(trace, rank=rank, candidates=candidates, buffer_fraction=buffer_fraction, scenario=scenario)
        met = dict(scenario=ref.scenario.name if ref.scenario is not None else "", synthetic=scenario is not None)
        timing = time_model_columns(trace, rank, ref.run.time_model, checks)
        fingerprint = None  # computed once per rank, when a learned agent needs it
        ids = trace.rank(rank).minibatch_ids()
        sampled = np.asarray([x.size for x in ids], dtype=np.int64)
        ceiling = hit_ceiling(ids, ref.capacity)
        ceiling_cols = dict(
            ceiling_hits=int(ceiling.sum()), window_hit_ceiling=_window_rates(ceiling, sampled, ref.period)
        )
        for agent_name, factory in agents.items():
            agent = as_agent(factory(name, rank))
            kwargs = buffer_kwargs(agent.settings, buffer_fraction)
            env = ReplayEnv(trace, rank=rank, candidates=candidates, scenario=scenario, **kwargs)
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
                    **met,
                    **timing,
                    **ceiling_cols,
                )
            )
        rank_rows = [r for r in rows if r["rank"] == rank and r["trace"] == name]
        band = abs(timing["time_oos_time_error"])
        for r in rank_rows:
            r.update(time_error_band=band, action_space=getattr(space_of(r["agent"]), "name", ""))
        fixed: dict[str, list[dict]] = {}  # constant_rows per space, played once for every oracle that needs them
        best_s: dict[str, float] = {}  # per space: the best constant's seconds
        found: dict[str, tuple[float, str]] = {}  # per space: the bound's (or reference's) seconds and kind

        def constants(space: ActionSpace) -> tuple[ReplayEnv, list[dict]]:
            env = space_env(trace, rank, space, buffer_fraction, candidates, scenario)
            if space.name not in fixed:
                fixed[space.name] = constant_rows(env, space, seed)
            return env, fixed[space.name]

        for oracle in oracles:
            if progress:
                progress(f"{name} rank {rank}: {oracle}")
            if oracle in CONSTANT_ORACLES:
                if not timing["time_fit_ok"]:  # modelled time does not depend on what is fetched: nothing to rank
                    continue
                for space in SPACES.values():
                    env, rows_fixed = constants(space)
                    times = [r["time_s"] for r in rows_fixed]
                    origin = ""
                    if oracle == "best-constant":
                        i = int(np.argmin(times))
                        res = dict(rows_fixed[i], constant_action=space.label(i))
                    elif oracle == "tuned-constant":
                        tuned_traces = None if tuned_on is None else tuple(tuned_on)
                        tuned = tuned_constants(tuned_traces, buffer_fraction, candidates, seed, scenario)[space.name]
                        res = dict(rows_fixed[tuned["index"]], constant_action=tuned["label"])
                        if fingerprint is None:
                            fingerprint = rank_fingerprint(trace, rank)
                        origin = provenance(tuned["trained_on"], fingerprint)
                    else:
                        res = bound_row(env, space, rows_fixed, seed=seed)
                        found[space.name] = (res["time_s"], res["bound_kind"])
                    if oracle == "best-constant":
                        best_s[space.name] = res["time_s"]
                    res.pop("levels_chosen", None)
                    rows.append(
                        result_row(
                            f"{oracle}:{space.name}",
                            name,
                            rank,
                            ref.capacity,
                            res,
                            provenance=origin,
                            held_out=(origin == HELD_OUT) if origin else None,
                            **met,
                            action_space=space.name,
                            time_error_band=band,
                            **timing,
                            **ceiling_cols,
                        )
                    )
                continue
            if oracle == "best-level":
                if not timing["time_fit_ok"]:
                    continue
                res = level_oracle(
                    trace,
                    rank,
                    buffer_fraction,
                    candidates,
                    seed,
                    fixed=constants(SPACES["link-levels"])[1],
                    scenario=scenario,
                )
                for r in rank_rows:
                    r.update(level_oracle_s=res["time_s"])
                played = {k: v for k, v in res.items() if k not in ("levels_chosen", "fixed_level_s")}
                rows.append(
                    result_row(
                        oracle,
                        name,
                        rank,
                        ref.capacity,
                        played,
                        **met,
                        action_space="link-levels",
                        time_error_band=band,
                        level_oracle_s=res["time_s"],
                        **timing,
                        **ceiling_cols,
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
            rows.append(
                result_row(
                    oracle,
                    name,
                    rank,
                    ref.capacity,
                    played,
                    **met,
                    time_error_band=band,
                    **timing,
                    **ceiling_cols,
                )
            )
        for r in rows:  # every row of this rank that decides in a space: its best constant and bound
            space = r.get("action_space") if r["trace"] == name and r["rank"] == rank else None
            if space in best_s:
                r["best_constant_s"] = best_s[space]
            if space in found:
                r["bound_s"], r["bound_kind"] = found[space]
    return rows


def load_scenario(path: str | None) -> Scenario | None:
    """The scenario file ``path`` read and checked, once per command (None for none); raises ``ValueError`` in one
    line naming the file (a :class:`~rudder.env.scenario.ScenarioError` also names the field, what was expected
    and what was found)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such scenario file")
    try:
        return Scenario.load(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (a scenario is JSON or YAML)") from None


def space_env(
    trace: Trace,
    rank: int,
    space: ActionSpace,
    buffer_fraction: float | None = None,
    candidates: int | None = None,
    scenario: Scenario | None = None,
) -> ReplayEnv:
    """The replay env the agents of ``space`` play on this rank (under ``scenario`` where one is given). A trace
    without seeds or partition structure has no lookahead ranking: its link-level space ranks by misses instead (no
    admit-on-miss)."""
    kwargs = buffer_kwargs(space.settings, buffer_fraction)
    try:
        return ReplayEnv(trace, rank=rank, candidates=candidates, scenario=scenario, **kwargs)
    except ValueError:
        if kwargs.get("ranking") != "lookahead":
            raise
        kwargs.update(ranking="misses", admit_on_miss=None)
        return ReplayEnv(trace, rank=rank, candidates=candidates, scenario=scenario, **kwargs)


def constant_rows(env: ReplayEnv, space: ActionSpace, seed: int = 0) -> list[dict]:
    """:func:`play_episode`'s row of each action of ``space`` held throughout, in action order: the one replay of
    the constant policies that the best-level oracle, best-constant, tuned-constant and headroom share."""
    return [play_episode(env, space.constant(i), seed) for i in range(len(space.actions))]


def level_oracle(
    trace: Trace,
    rank: int,
    buffer_fraction: float | None = None,
    candidates: int | None = None,
    seed: int = 0,
    levels=LINK_LEVELS,
    horizon: int = LEVEL_ORACLE_HORIZON,
    fixed: list[dict] | None = None,
    scenario: Scenario | None = None,
) -> dict:
    """The best-level oracle over link-budget levels with the lookahead's candidates (the misses' where the trace
    has no lookahead structure): the better of the greedy search (:func:`~rudder.evaluation.play.play_best_level`)
    and the best level held throughout (``oracle_policy`` says which), with the modelled time of each fixed level
    (``fixed_level_s``) and the greedy search's own ``greedy_s``. A heuristic that knows the future, not a bound
    (:mod:`rudder.evaluation.bound` is). ``fixed``: :func:`constant_rows` of the link levels, where already played
    (under the same ``scenario``)."""
    space = _link_space(levels)
    env = space_env(trace, rank, space, buffer_fraction, candidates, scenario)
    if fixed is None:
        fixed = constant_rows(env, space, seed)
    greedy = play_best_level(env, horizon=horizon, seed=seed)
    times = [r["time_s"] for r in fixed]
    # the greedy search can miss what one level held throughout does: the oracle is the better of the two
    best = int(np.argmin(times))
    res = greedy if greedy["time_s"] <= times[best] else dict(fixed[best], levels_chosen=None)
    return dict(
        res,
        oracle_policy="greedy" if res is greedy else f"level {levels[best]:g}",
        fixed_level_s=times,
        greedy_s=greedy["time_s"],
        level_ranking=env.ranking,
    )


def _link_space(levels) -> ActionSpace:
    space = SPACES["link-levels"]
    if tuple(levels) == space.actions:
        return space
    settings = BufferSettings(ranking="lookahead", admit_on_miss=True, levels=tuple(levels))
    return ActionSpace(space.name, settings, tuple(settings.levels), link=True, agents=space.agents)


def bound_row(
    env: ReplayEnv, space: ActionSpace, fixed: list[dict], seed: int = 0, width: int | None = None, progress=None
) -> dict:
    """The optimum over ``space``'s action sequences on this rank (:func:`rudder.evaluation.bound.optimum`), as a
    row: the episode of the best sequence found, or of the best constant where that is faster (``fixed``:
    :func:`constant_rows`). ``bound_kind`` is ``bound`` where proved optimal, else ``reference``; ``bound_actions``
    the sequence (action labels, one per window)."""
    res = optimum(env, space, width=width, seed=seed, progress=progress)
    times = [r["time_s"] for r in fixed]
    best = int(np.argmin(times))
    if times[best] <= res.time_s:
        row, actions = fixed[best], [best] * res.windows
    else:
        row, actions = play_episode(env, _Sequence(space, res.actions), seed), res.actions
    proved = res.pruned_lower_s >= row["time_s"]
    return dict(
        row,
        bound_kind="bound" if proved else "reference",
        bound_actions=" ".join(space.label(a).split()[-1] for a in actions),
        bound_nodes=res.nodes,
    )


class _Sequence:
    """Plays a given action sequence of a space, one action per window (the bound's, to get its full row)."""

    name = "sequence"

    def __init__(self, space: ActionSpace, actions: list[int]):
        self.space, self.actions, self.settings, self._i = space, list(actions), space.settings, 0

    def reset(self) -> None:
        self._i = 0

    def act(self, observation, info):
        a = self.actions[min(self._i, len(self.actions) - 1)]
        self._i += 1
        return self.space.env_action(a, observation, info)


def tuned_constants(
    traces: tuple[str, ...] | None = None,
    buffer_fraction: float | None = None,
    candidates: int | None = None,
    seed: int = 0,
    scenario: Scenario | None = None,
) -> dict[str, dict]:
    """Per action space, the constant action a practitioner would deploy: the one fastest summed over the ranks of
    ``traces`` (default: the shipped training traces, ``traces/train/*``) whose time fit separates remote rows,
    replayed under ``scenario`` where one is given (tuned for the conditions it is deployed in).
    ``{space: dict(index=, label=, trained_on=[rank fingerprints])}``; the choice is applied unchanged elsewhere.
    Remembered per arguments (a scenario by its content)."""
    return _tuned_constants(traces, buffer_fraction, candidates, seed, None if scenario is None else _Key(scenario))


class _Key:
    """A scenario as a cache key: equal to another when their checked content and folder are (a frozen
    :class:`Scenario` holds dicts, so it has no hash of its own)."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.key = (json.dumps(scenario.to_dict(), sort_keys=True), scenario.base_dir)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and self.key == other.key


@functools.lru_cache(maxsize=8)
def _tuned_constants(traces, buffer_fraction, candidates, seed, key: _Key | None) -> dict[str, dict]:
    scenario = None if key is None else key.scenario
    if traces is None:
        traces = tuple(sorted(glob.glob(os.path.join(TRAIN_DIR, "*", ""))))
    totals = {name: np.zeros(len(space.actions)) for name, space in SPACES.items()}
    learned_from = []
    for folder in traces:
        trace = Trace(folder)
        for rank in trace.ranks:
            envs = {
                name: space_env(trace, rank, space, buffer_fraction, candidates, scenario)
                for name, space in SPACES.items()
            }
            if not next(iter(envs.values())).time_model.separates_remote_rows:  # time does not depend on actions
                continue
            for name, space in SPACES.items():
                totals[name] += [r["time_s"] for r in constant_rows(envs[name], space, seed)]
            learned_from.append(rank_fingerprint(trace, rank))
    out = {}
    for name, space in SPACES.items():
        i = int(np.argmin(totals[name]))
        out[name] = dict(index=i, label=space.label(i), trained_on=learned_from)
    return out


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
