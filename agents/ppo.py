"""A PPO prefetch agent: Stable-Baselines3 PPO choosing what fraction of the admissible candidates to prefetch.

Every decision window the policy picks one of a few *levels*, fractions of ``j = min(n_candidates, n_evictable)``
(the candidates that have an empty or evictable slot to replace), and the top ``round(level * j)`` ranked
candidates are admitted. Fractions rather than counts transfer across traces and buffer sizes: level 1.0 is
MassiveGNN's periodic policy, level 0 keeps the buffer as it is.

    from rudder.agents.ppo import train_ppo, PPOAgent
    train_ppo(["traces/samples/small-metis2-f10x25"], steps=20_000, out="ppo.zip")
    agent = PPOAgent("ppo.zip")          # or make_agent("ppo") for the shipped agents/policies/ppo-small.zip

A saved policy is the SB3 model (``out``, a ``.zip``) and a sidecar ``out.json`` in rudder's one policy-file format
(:mod:`rudder.agents.policy_file`): what acting needs besides the network (levels, K, the observation layout and
its normalisation), what it was trained on (the content fingerprint of every trace rank it replayed), the zip's
SHA-256, and PPO's settings.

Loading a policy runs code: SB3 unpickles parts of the ``.zip``. :class:`PPOAgent` refuses a zip whose SHA-256 is
not the one its sidecar records (a file swapped or damaged since it was saved) unless told to trust it
(``trust=True``; ``--trust-policy`` on the command line). The check binds the zip to its sidecar; it does not
authenticate the pair: load policies only from sources you trust.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from rudder.agents.base import Agent
from rudder.agents.policy_file import UntrustedPolicyError as UntrustedPolicyError  # raised by PPOAgent
from rudder.agents.policy_file import file_sha256 as file_sha256
from rudder.agents.policy_file import read_policy, save_policy_files, sidecar_path
from rudder.env.contract import LINK_LEVELS, BufferSettings, top_fraction
from rudder.env.settings import check_fraction_levels, check_link_levels
from rudder.env.spaces import fit_k, observation_layout, observation_space
from rudder.env.vector import make_replay_env, replay_env_fns, replay_env_specs
from rudder.env.wrappers import DEFAULT_LEVELS

DEFAULT_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies", "ppo-small.zip")
LINK_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies", "ppo-link.zip")
OBS_EPSILON = 1e-4  # floor of the observation variance in normalisation: std >= 0.01
OBS_CLIP = 10.0


def make_env(
    trace: str,
    rank: int,
    levels: Sequence[float] = DEFAULT_LEVELS,
    buffer_fraction: float | None = None,
    seed: int = 0,
    buffer_init: str = "recorded",
    candidates: int | None = None,
    relative_reward: float | None = None,
) -> gym.Env:
    """A ``rudder/Replay-v0`` env ready for SB3: :class:`FractionBudget` actions, a flat ``Box`` observation
    (:func:`rudder.env.vector.make_replay_env` with ``action="fraction"``, seeded and reset once).

    The observation is the env's whole ``Dict`` flattened by ``gymnasium.spaces.flatten`` (keys in the space's
    order, see :func:`observation_layout`).

    Args:
        trace, rank: the trace folder and trainer rank to replay.
        levels: action levels, see :class:`FractionBudget`.
        buffer_fraction, buffer_init, candidates: passed to ``rudder/Replay-v0`` (``None``: the recorded run's).
        seed: seeds the action space and the first ``reset``; later resets continue that stream (so
            ``buffer_init="random"`` gives a new random initial buffer every episode).
        relative_reward: a scale for :class:`RelativeReward` (``None``: the env's own reward).
    """
    return make_replay_env(
        trace,
        rank,
        action="fraction",
        levels=levels,
        buffer_fraction=buffer_fraction,
        buffer_init=buffer_init,
        candidates=candidates,
        relative_reward=relative_reward,
        seed=seed,
    )


@dataclass
class TrainResult:
    """What :func:`train_ppo` did: the files it wrote, each finished training episode's return (in the order the
    episodes ended) and the wall time."""

    path: str
    sidecar: str
    episode_returns: list[float] = field(default_factory=list)
    episode_envs: list[int] = field(default_factory=list)  # index of the vectorised env each episode ran in
    env_specs: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


def train_ppo(
    traces: Sequence[str],
    steps: int,
    out: str,
    seed: int = 0,
    levels: Sequence[float] = DEFAULT_LEVELS,
    n_envs: int | None = None,
    progress: bool = True,
    buffer_fractions: Sequence[float | None] = (None,),
    buffer_inits: Sequence[str] = ("recorded",),
    ranks: Sequence[int] | None = None,
    n_steps: int = 16,
    batch_size: int = 64,
    n_epochs: int = 10,
    learning_rate: float = 3e-4,
    gamma: float = 0.99,
    ent_coef: float = 0.0,
    net_arch: Sequence[int] = (32, 32),
    relative_reward: float | None = 1000.0,
    normalize_observation: bool = True,
    tensorboard_log: str | None = None,
    action: str = "fraction",
    reward: str = "traffic",
) -> TrainResult:
    """Train PPO on replayed traces and save it to ``out`` (``.zip``) and ``out.json`` (the sidecar).

    One env per (trace, rank, buffer fraction, buffer init), stepped together in a ``DummyVecEnv``; ``n_envs``
    cycles through those combinations to that many envs instead (repeats run other random initial buffers when
    ``buffer_inits`` holds ``"random"``). An episode is one trace (``total minibatches / period`` decisions), so the
    rollout per env (``n_steps``) spans a few episodes.

    Args:
        traces: trace folders; every rank of each is used unless ``ranks`` picks some.
        steps: total env steps (decisions) across all envs.
        out: model path; ``.zip`` is appended if missing.
        seed: seeds PPO, the envs and their random initial buffers.
        levels: action levels (fractions of the admissible candidates), see :class:`FractionBudget`.
        buffer_fractions: buffer sizes as fractions of the halo (``None``: the recorded run's).
        buffer_inits: initial fills (``recorded``, ``degree``, ``random``, ``empty``).
        progress: show a progress bar (tqdm + rich).
        relative_reward: train on :class:`RelativeReward` with this scale (``None``: the env's own reward).
        normalize_observation: standardise observations with running statistics (``VecNormalize``, variance
            floored at ``OBS_EPSILON``); the final statistics go into the sidecar for :class:`PPOAgent`.
        n_steps, batch_size, n_epochs, learning_rate, gamma, ent_coef, net_arch: PPO's settings (the default
            ``net_arch`` keeps the saved zip near 0.5 MB with K=256).
        tensorboard_log: SB3's ``tensorboard_log``: training curves (episode reward, losses) go to a new ``PPO_N``
            run folder under it.
        action: ``"fraction"`` (:class:`FractionBudget` levels) or ``"link"`` (link-budget levels over the
            lookahead's candidates, :class:`rudder.env.episode.PrefetchEpisode`; :class:`RelativeReward` is then
            relative to always playing level 0).
        reward: the env's reward, ``"traffic"`` or ``"time"`` (minus the window's modelled seconds).

    Returns:
        a :class:`TrainResult`; ``episode_returns`` sums the env's own reward whatever the training reward.
    """
    import stable_baselines3
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    if action not in ("fraction", "link"):
        raise ValueError(f"action must be 'fraction' or 'link', got {action!r}")
    if action == "link":
        levels = check_link_levels(LINK_LEVELS if levels is DEFAULT_LEVELS else levels)
    else:
        levels = check_fraction_levels(levels)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not traces:
        raise ValueError("no traces to train on")
    grid = dict(ranks=ranks, buffer_fractions=buffer_fractions, buffer_inits=buffer_inits, n_envs=n_envs)
    specs = replay_env_specs(traces, **grid)
    out = out if out.endswith(".zip") else out + ".zip"
    vec = DummyVecEnv(
        replay_env_fns(
            traces, **grid, seed=seed, action=action, levels=levels, reward=reward, relative_reward=relative_reward
        )
    )
    k = int(vec.envs[0].unwrapped.k)
    dict_space = vec.envs[0].unwrapped.observation_space
    if normalize_observation:
        vec = VecNormalize(vec, norm_obs=True, norm_reward=False, clip_obs=OBS_CLIP, epsilon=OBS_EPSILON)

    class _Returns(BaseCallback):
        """Sums the env's own reward (not the training reward) over every finished episode."""

        def __init__(self, result: TrainResult, n: int):
            super().__init__()
            self.result = result
            self.running = np.zeros(n)

        def _on_step(self) -> bool:
            for i, (info, reward, done) in enumerate(
                zip(self.locals["infos"], self.locals["rewards"], self.locals["dones"])
            ):
                self.running[i] += info.get("env_reward", reward)
                if done:
                    self.result.episode_returns.append(float(self.running[i]))
                    self.result.episode_envs.append(i)
                    self.running[i] = 0.0
            return True

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: more threads only contend with the replay
    model = PPO(
        "MlpPolicy",
        vec,
        n_steps=n_steps,
        batch_size=min(batch_size, n_steps * len(specs)),
        n_epochs=n_epochs,
        learning_rate=learning_rate,
        gamma=gamma,
        ent_coef=ent_coef,
        seed=seed,
        policy_kwargs=dict(net_arch=list(net_arch)),
        device="cpu",
        verbose=0,
        tensorboard_log=tensorboard_log,
    )
    result = TrainResult(path=out, sidecar=out[:-4] + ".json", env_specs=specs)
    t0 = time.perf_counter()
    try:
        model.learn(total_timesteps=int(steps), callback=_Returns(result, len(specs)), progress_bar=progress)
    finally:
        torch.set_num_threads(threads)
    result.wall_s = time.perf_counter() - t0
    obs_norm = None
    if normalize_observation:
        obs_norm = dict(
            mean=vec.obs_rms.mean.astype(np.float32).tolist(),
            var=vec.obs_rms.var.astype(np.float32).tolist(),
            epsilon=OBS_EPSILON,
            clip=OBS_CLIP,
        )
    vec.close()

    sidecar = dict(
        algorithm="PPO",
        module="stable_baselines3",
        action=action,
        reward=reward,
        levels=list(levels),
        k=k,
        observation=observation_layout(dict_space),
        observation_normalization=obs_norm,
        trained_on=_fingerprints(specs),
        envs=[dict(s, trace=os.path.basename(os.path.normpath(s["trace"]))) for s in specs],
        steps=int(model.num_timesteps),
        seed=int(seed),
        ppo=dict(
            n_steps=n_steps,
            batch_size=model.batch_size,
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            gamma=gamma,
            ent_coef=ent_coef,
            net_arch=list(net_arch),
            relative_reward=relative_reward,
        ),
        versions={
            "stable_baselines3": stable_baselines3.__version__,
            "torch": torch.__version__,
            "gymnasium": gym.__version__,
        },
        wall_s=round(result.wall_s, 2),
    )
    save_policy_files(model, out, sidecar)
    return result


def _fingerprints(specs: list[dict]) -> list[dict]:
    """The content fingerprint of every (trace, rank) the envs replayed, once each, in order."""
    from rudder.traces.fingerprint import rank_fingerprint

    seen: dict[tuple[str, int], dict] = {}
    for s in specs:
        key = (os.path.abspath(s["trace"]), s["rank"])
        if key not in seen:
            seen[key] = rank_fingerprint(s["trace"], s["rank"])
    return list(seen.values())


def read_policy_meta(path: str | None, trust: bool = False) -> tuple[str, dict]:
    """``(zip path, sidecar dict)`` of the PPO policy at ``path`` (default: the shipped one), checked by
    :func:`rudder.agents.policy_file.read_policy` (both files there, a rudder sidecar, the zip's SHA-256 the recorded
    one unless ``trust``). Cheap: :class:`PPOAgent` calls it, and ``train.py`` before any process starts."""
    return read_policy(path or DEFAULT_POLICY, trust, hint="train one with: python train.py ppo")


class PPOAgent(Agent):
    """Plays a policy saved by :func:`train_ppo` (default: the shipped ``agents/policies/ppo-small.zip``).

    ``act`` flattens the observation as in training, asks the network for a level and admits the top
    ``round(level * min(n_candidates, n_evictable))`` candidates; observations are standardised with the
    training run's statistics when it used them. An observation with a different K than the policy's is cut or
    padded to the policy's K (missing candidates read 0, missing residents 1: no slot).

    Args:
        path: the policy ``.zip`` (its sidecar ``.json`` beside it); default the shipped one.
        deterministic: act on the policy's most likely level.
        trust: load the zip even if its SHA-256 differs from the sidecar's record (or the sidecar has none).
            Loading unpickles code from the zip: trust only a file from a source you trust.

    Attributes:
        trained_on: fingerprints of the trace ranks the policy was trained on (:mod:`rudder.traces.fingerprint`;
            evaluation marks what it scores trained-on or held-out by them). A sidecar from before fingerprints
            lists trace names only: those ranks show as trained-on, every other one as unknown.
        levels, k: the policy's action levels and candidates per decision.

    Raises:
        FileNotFoundError: the zip or its sidecar is missing. :class:`UntrustedPolicyError`: the zip's SHA-256
        is not the sidecar's (and ``trust`` is false). ``ValueError``: a sidecar that is not a rudder one.
    """

    name = "ppo"

    def __init__(self, path: str | None = None, deterministic: bool = True, trust: bool = False):
        from stable_baselines3 import PPO

        path, meta = read_policy_meta(path, trust)
        self.meta = meta
        self.path = path
        self.action = meta.get("action", "fraction")
        if self.action == "link":  # link-budget levels over the lookahead's candidates, as trained
            self.levels = check_link_levels(meta["levels"])
            self.settings = BufferSettings(ranking="lookahead", admit_on_miss=True, levels=self.levels)
        else:
            self.levels = check_fraction_levels(meta["levels"])
        self.k = int(meta["k"])
        self.trained_on = list(meta.get("trained_on", []))
        self.deterministic = bool(deterministic)
        full = observation_space(self.k)
        # the keys the policy was trained on (a policy from before an observation key was added reads without it)
        keys = [key for key, _ in meta["observation"]]
        self._space = spaces.Dict({key: full[key] for key in keys if key in full.spaces})
        if observation_layout(self._space) != meta["observation"]:
            raise ValueError(
                f"{sidecar_path(path)}: the policy's observation layout {meta['observation']} differs "
                f"from this rudder's {observation_layout(self._space)}"
            )
        # schedules are not needed to act; replacing them avoids unpickling the training-time closures
        self.model = PPO.load(
            path,
            device="cpu",
            custom_objects={"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0},
        )
        norm = meta.get("observation_normalization")
        self._norm = (
            None
            if norm is None
            else (
                np.asarray(norm["mean"], np.float64),
                np.asarray(norm["var"], np.float64),
                float(norm["epsilon"]),
                float(norm["clip"]),
            )
        )
        self.last_level: float | None = None

    def reset(self) -> None:
        self.last_level = None

    def act(self, observation: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        k_env = int(np.asarray(observation["candidates"]).shape[0])
        obs = fit_k(observation, self.k)
        flat = spaces.flatten(self._space, {key: obs[key] for key in self._space.spaces})
        if self._norm is not None:
            mean, var, eps, clip = self._norm
            flat = np.clip((flat - mean) / np.sqrt(var + eps), -clip, clip).astype(np.float32)
        level_index, _ = self.model.predict(flat, deterministic=self.deterministic)
        self.last_level = self.levels[int(level_index)]
        if self.action == "link":
            return int(level_index)
        return top_fraction(self.last_level, info, k_env)


class PPOLinkAgent(PPOAgent):
    """:class:`PPOAgent` with the shipped link-budget-level policy (``agents/policies/ppo-link.zip``: trained with
    time as the reward on the emulated-cluster training traces, ``traces/train/emu2-*``)."""

    name = "ppo-link"

    def __init__(self, path: str | None = None, deterministic: bool = True, trust: bool = False):
        super().__init__(LINK_POLICY if path is None else path, deterministic, trust)
