"""Replay envs for one's own RL code: many traces x ranks x buffer sizes as Gymnasium envs, vectorised.

    from rudder.env.vector import make_replay_vector_env, replay_env_fns

    envs = make_replay_vector_env(["traces/samples/small-metis2-f10x25"], buffer_fractions=(None, 0.05))
    obs, infos = envs.reset(seed=0)                     # a gymnasium.vector.SyncVectorEnv (or AsyncVectorEnv)
    obs, rewards, terminations, truncations, infos = envs.step(envs.action_space.sample())

    from stable_baselines3.common.vec_env import DummyVecEnv    # SB3 takes the env factories
    venv = DummyVecEnv(replay_env_fns(["traces/samples/small-metis2-f10x25"], action="budget"))

Each env is one ``rudder/Replay-v0`` (one trainer rank of one trace, at one buffer size and initial fill) behind an
action wrapper (:mod:`rudder.env.wrappers`) and, by default, ``FlattenObservation``: the same envs ``train.py ppo``
trains on. An episode is one replay of the trace; every env passes Gymnasium's ``check_env``. A policy trained on
them is played by :class:`rudder.agents.sb3.SB3Agent` (saved with :func:`rudder.agents.sb3.save_policy`), or by one's
own agent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import gymnasium as gym
import rudder.env  # noqa: F401  (registers the environments)
from gymnasium.wrappers import FlattenObservation
from rudder.env.defaults import COUNT_LEVELS, DEFAULTS, FRACTION_LEVELS, LINK_LEVELS, RECORDED_BEFORE_OPTION
from rudder.env.wrappers import Budget, EvictOrKeep, FractionBudget, RelativeReward

# action name -> wrapper (None: the base env's own action: MultiBinary(K), or link-budget levels for "link")
ACTIONS = {"multibinary": None, "budget": Budget, "fraction": FractionBudget, "evict": EvictOrKeep, "link": None}


def default_levels(action: str) -> tuple | None:
    """The levels an action wrapper takes by default (None: it takes none)."""
    return {"budget": COUNT_LEVELS, "fraction": FRACTION_LEVELS, "link": LINK_LEVELS}.get(action)


def make_replay_env(
    trace,
    rank: int = 0,
    *,
    action: str = "fraction",
    levels: Sequence | None = None,
    flatten: bool = True,
    buffer_fraction: float | None = None,
    buffer_init: str = "recorded",
    candidates: int | None = None,
    reward: str = DEFAULTS.reward,
    relative_reward: float | None = None,
    seed: int | None = None,
) -> gym.Env:
    """One replay env ready for an RL library.

    Args:
        trace, rank: the trace folder (or :class:`traces.Trace`) and the trainer rank to replay.
        action: ``"fraction"`` (:class:`~rudder.env.wrappers.FractionBudget`, PPO's), ``"budget"``
            (:class:`~rudder.env.wrappers.Budget`), ``"evict"`` (:class:`~rudder.env.wrappers.EvictOrKeep`) or
            ``"multibinary"`` (the base ``MultiBinary(K)`` action) or ``"link"`` (the env's own link-budget levels,
            ``levels=``, over the lookahead's candidates with admit-on-miss: the level agents' setting).
        levels: the wrapper's levels (default :func:`default_levels`).
        flatten: flatten the ``Dict`` observation into a ``Box`` (``gymnasium.spaces.flatten`` order).
        buffer_fraction, buffer_init, candidates, reward: passed to ``rudder/Replay-v0`` (``None``: the recorded
            run's).
        relative_reward: train on :class:`~rudder.env.wrappers.RelativeReward` with this scale (``"fraction"``
            only; ``None``: the env's own reward).
        seed: when given, seeds the action space and resets the env once with it (later resets continue that
            stream); a vector env's ``reset(seed=s)`` seeds env ``i`` with ``s + i`` instead.
    """

    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
    if relative_reward is not None and action not in ("fraction", "link"):
        raise ValueError(f"relative_reward needs action='fraction' or 'link', got action={action!r}")
    link = {}
    if action == "link":
        link = dict(
            levels=tuple(levels) if levels is not None else LINK_LEVELS, ranking="lookahead", admit_on_miss=True
        )
    env = gym.make(
        "rudder/Replay-v0",
        trace=trace,
        rank=rank,
        candidates=candidates,
        reward=reward,
        buffer_fraction=buffer_fraction,
        buffer_init=buffer_init,
        **link,
    )
    wrapper = ACTIONS[action]
    if action in ("budget", "fraction"):
        env = wrapper(env, tuple(levels) if levels is not None else default_levels(action))
    elif wrapper is not None or action == "multibinary":
        if levels is not None:
            raise ValueError(f"action={action!r} takes no levels")
        if wrapper is not None:
            env = wrapper(env)
    if relative_reward is not None:
        env = RelativeReward(env, relative_reward)
    if flatten:
        env = FlattenObservation(env)
    if seed is not None:
        env.action_space.seed(seed)
        env.reset(seed=seed)
    return env


def replay_env_specs(
    traces: Sequence[str],
    ranks: Sequence[int] | None = None,
    buffer_fractions: Sequence[float | None] = (None,),
    buffer_inits: Sequence[str] = ("recorded",),
    n_envs: int | None = None,
) -> list[dict]:
    """One ``{trace, rank, buffer_fraction, buffer_init}`` per env: every trace x rank (all of a trace's ranks
    unless ``ranks`` picks some) x buffer fraction (``None``: the recorded run's) x initial fill. ``n_envs`` cycles
    through those combinations to that many envs instead."""
    from rudder.traces import Trace

    if not traces:
        raise ValueError("no traces to build envs on")
    specs = []
    for trace in traces:
        t = Trace(trace)
        use = t.ranks if ranks is None else [r for r in t.ranks if r in set(ranks)]
        if not use:
            raise ValueError(f"{trace} has no rank among {list(ranks)} (it has {list(t.ranks)})")
        for rank in use:
            for fraction in buffer_fractions:
                for init in buffer_inits:
                    specs.append(dict(trace=str(trace), rank=int(rank), buffer_fraction=fraction, buffer_init=init))
    if n_envs is not None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        specs = [specs[i % len(specs)] for i in range(n_envs)]
    return specs


def _common_candidates(traces: Sequence[str], candidates: int | None) -> int | None:
    """Envs of one vector env need one K: the traces' recorded K when they agree, else an error."""
    from rudder.traces import Trace

    if candidates is not None:
        return candidates
    before = RECORDED_BEFORE_OPTION["candidates"]
    recorded = {int(Trace(t).meta.get("config", {}).get("candidates", before)) for t in traces}
    if len(recorded) > 1:
        raise ValueError(
            f"the traces were recorded with different K ({sorted(recorded)}): pass candidates=K so that "
            "every env has the same spaces"
        )
    return None


def replay_env_fns(
    traces: Sequence[str],
    *,
    ranks: Sequence[int] | None = None,
    buffer_fractions: Sequence[float | None] = (None,),
    buffer_inits: Sequence[str] = ("recorded",),
    n_envs: int | None = None,
    seed: int | None = 0,
    **env_options,
) -> list[Callable[[], gym.Env]]:
    """Factories of the envs of :func:`replay_env_specs` (picklable: ``functools.partial`` of
    :func:`make_replay_env`), env ``i`` seeded with ``seed + i``; ``env_options`` go to :func:`make_replay_env`.
    What SB3's ``DummyVecEnv``/``SubprocVecEnv`` and Gymnasium's vector envs take."""
    specs = replay_env_specs(traces, ranks, buffer_fractions, buffer_inits, n_envs)
    env_options["candidates"] = _common_candidates([s["trace"] for s in specs], env_options.get("candidates"))
    return [
        functools.partial(
            make_replay_env,
            s["trace"],
            s["rank"],
            buffer_fraction=s["buffer_fraction"],
            buffer_init=s["buffer_init"],
            seed=None if seed is None else seed + i,
            **env_options,
        )
        for i, s in enumerate(specs)
    ]


class ListAppliedIds(gym.Wrapper):
    """``info["applied_ids"]`` (a window's prefetch ids, of varying length) as a list: Gymnasium's vector envs stack
    an array info into one array per key, which ids of unequal length cannot fill; a list goes into an object
    array instead."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "applied_ids" in info:
            info = dict(info, applied_ids=[int(i) for i in info["applied_ids"]])
        return obs, reward, terminated, truncated, info


def _listing_ids(fn: Callable[[], gym.Env]) -> gym.Env:
    return ListAppliedIds(fn())


def make_replay_vector_env(traces: Sequence[str], *, vectorization: str = "sync", **options) -> gym.vector.VectorEnv:
    """A Gymnasium vector env over :func:`replay_env_fns` ``(traces, **options)``: ``vectorization="sync"`` (one
    process, ``SyncVectorEnv``) or ``"async"`` (a process per env, ``AsyncVectorEnv``). Finished episodes reset
    on the next step (Gymnasium's default ``AutoresetMode.NEXT_STEP``); infos are stacked per key as Gymnasium does
    (``applied_ids`` as lists, :class:`ListAppliedIds`)."""
    fns = [functools.partial(_listing_ids, fn) for fn in replay_env_fns(traces, **options)]
    if vectorization == "sync":
        return gym.vector.SyncVectorEnv(fns)
    if vectorization == "async":
        return gym.vector.AsyncVectorEnv(fns)
    raise ValueError(f"vectorization must be 'sync' or 'async', got {vectorization!r}")
