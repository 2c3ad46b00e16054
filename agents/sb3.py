"""Any Stable-Baselines3 policy trained on rudder's replay envs, saved, then played as an agent by reference.

    from stable_baselines3 import DQN
    from stable_baselines3.common.vec_env import DummyVecEnv
    from rudder.env.vector import replay_env_fns
    from rudder.agents.sb3 import save_policy

    model = DQN("MlpPolicy", DummyVecEnv(replay_env_fns(traces, action="fraction")), buffer_size=10_000)
    model.learn(5_000)
    save_policy(model, "dqn.zip", action="fraction", trained_on=traces)

    python evaluate.py --agents periodic,rudder.agents.sb3:SB3Agent --agent-kwargs path=dqn.zip

A saved policy is the SB3 model (``.zip``) and a sidecar ``.json`` beside it in rudder's one policy-file format
(:mod:`rudder.agents.policy_file`, as PPO's): the algorithm, the zip's SHA-256 (checked before loading, which runs
pickled code), and what acting needs besides the network: the action wrapper and its levels
(:func:`rudder.env.vector.make_replay_env`), K and the observation layout. Observations must be flattened
(``flatten=True``, the default of the replay envs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from rudder.agents.base import Agent
from rudder.agents.policy_file import read_policy, save_policy_files
from rudder.env.spaces import fit_k, observation_layout, observation_space
from rudder.env.vector import ACTIONS, default_levels

_NO_SCHEDULES = {
    "learning_rate": 0.0,
    "lr_schedule": lambda _: 0.0,
    "exploration_schedule": lambda _: 0.0,
    "clip_range": lambda _: 0.0,
    "clip_range_vf": None,
}  # acting needs none of these


def save_policy(
    model,
    path: str,
    *,
    action: str = "fraction",
    levels: Sequence | None = None,
    trained_on: Sequence[str] = (),
    name: str | None = None,
) -> tuple[str, str]:
    """Save an SB3 ``model`` trained on :func:`rudder.env.vector.make_replay_env` envs (flattened observations)
    to ``path`` (``.zip``) and its sidecar; returns both paths.

    Args:
        action, levels: the action wrapper the envs used and its levels (default: the wrapper's default).
        trained_on: the trace folders it learned from: the sidecar records the content fingerprint of every rank
            of each (:mod:`rudder.traces.fingerprint`), by which ``evaluate.py`` marks what it scores trained-on or held
            out. A name that is not a trace folder is kept as a name (it never shows a rank held out).
        name: the agent's name in tables (default: the algorithm's, lower case).
    """
    import stable_baselines3

    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: expected one of {', '.join(ACTIONS)}")
    if action in ("fraction", "budget"):
        levels = [(float if action == "fraction" else int)(v) for v in (levels or default_levels(action))]
    elif levels is not None:
        raise ValueError(f"action={action!r} takes no levels")
    dim = model.observation_space.shape[0]
    k = (dim - spaces.flatdim(observation_space(0))) // 2
    if k < 1 or spaces.flatdim(observation_space(k)) != dim:
        raise ValueError(f"the model's observation has {dim} entries: not a flattened rudder observation")
    meta = dict(
        algorithm=type(model).__name__,
        module=type(model).__module__,
        name=name or type(model).__name__.lower(),
        action=action,
        levels=levels,
        k=int(k),
        observation=observation_layout(observation_space(k)),
        trained_on=_fingerprints(trained_on),
        observation_normalization=None,
        versions={"stable_baselines3": stable_baselines3.__version__},
    )
    return save_policy_files(model, path, meta)


def _fingerprints(traces: Sequence[str]) -> list:
    """The fingerprint of every rank of each trace folder; a name that is no trace folder, as it is."""
    from rudder.traces.fingerprint import trace_fingerprints

    out: list = []
    for t in traces:
        is_trace = os.path.isfile(os.path.join(str(t), "trace.json"))
        out += trace_fingerprints(str(t)) if is_trace else [os.path.basename(os.path.normpath(str(t)))]
    return out


class SB3Agent(Agent):
    """Plays a policy saved by :func:`save_policy`: flattens the observation as in training (cut or padded to the
    policy's K), asks the model for an action and maps it to the base ``MultiBinary(K)`` action as the training
    wrapper did.

    Args:
        path: the saved ``.zip`` (its sidecar ``.json`` beside it).
        deterministic: act greedily (``model.predict(..., deterministic=True)``).
        trust: load the zip even if its SHA-256 is not the one its sidecar records (or the sidecar records none, as
            one saved before the format was shared): loading unpickles code, trust only a source you trust.
    """

    name = "sb3"

    def __init__(self, path: str, deterministic: bool = True, trust: bool = False):
        import importlib

        zip_path, meta = read_policy(path, trust, hint="save one with rudder.agents.sb3.save_policy")
        self.meta, self.path = meta, zip_path
        self.name = meta.get("name") or self.name
        self.action = meta["action"]
        self.levels = tuple(meta["levels"]) if meta.get("levels") is not None else (0.0, 1.0)
        self.k = int(meta["k"])
        self.trained_on = list(meta.get("trained_on", []))
        self.deterministic = bool(deterministic)
        self._space = observation_space(self.k)
        if observation_layout(self._space) != meta["observation"]:
            raise ValueError(
                f"{zip_path}: the policy's observation layout {meta['observation']} differs "
                f"from this rudder's {observation_layout(self._space)}"
            )
        algorithm = getattr(importlib.import_module(meta.get("module", "stable_baselines3")), meta["algorithm"])
        self.model = algorithm.load(zip_path, device="cpu", custom_objects=_NO_SCHEDULES)

    def reset(self) -> None:
        pass  # a feed-forward policy keeps no state between decisions

    def act(self, observation: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        k_env = int(np.asarray(observation["candidates"]).shape[0])
        flat = spaces.flatten(self._space, fit_k(observation, self.k))
        action, _ = self.model.predict(flat, deterministic=self.deterministic)
        if self.action == "multibinary":
            out = np.zeros(k_env, dtype=np.int8)
            bits = np.asarray(action, dtype=np.int8).reshape(-1)[:k_env]
            out[: bits.size] = bits
            return out
        return ACTIONS[self.action].base_action(self.levels[int(action)], info, k_env)
