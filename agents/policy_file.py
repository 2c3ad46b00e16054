"""The one file format of a saved learned policy: PPO's (:mod:`rudder.agents.ppo`) and any SB3 algorithm's
(:mod:`rudder.agents.sb3`).

A saved policy is two files: the SB3 model (``name.zip``) and a sidecar ``name.json`` beside it. The sidecar holds

- ``format``: :data:`FORMAT`;
- ``sha256``: the zip's SHA-256. Loading a zip runs code (SB3 unpickles parts of it), so :func:`read_policy`
  refuses a zip whose hash is not the recorded one (swapped or damaged since it was saved) unless told to trust it.
  The check binds the zip to its sidecar; it does not authenticate the pair: load policies only from sources you
  trust;
- ``algorithm``, ``module``: the SB3 class that loads the zip (e.g. ``PPO`` from ``stable_baselines3``);
- what acting needs besides the network: ``action`` (the action wrapper, :func:`rudder.env.vector.make_replay_env`),
  ``levels``, ``k`` and ``observation`` (the observation layout, :func:`rudder.env.spaces.observation_layout`),
  and ``observation_normalization`` (the training run's observation statistics, or null);
- ``trained_on``: the content fingerprint of every trace rank it learned from (:mod:`rudder.traces.fingerprint`);
- ``versions`` of the libraries it was trained with, and whatever else the trainer records (PPO: its settings).

Sidecars written before the format was shared (``rudder-ppo-policy/1``, ``rudder-sb3-policy/1``) are read as well.
"""

from __future__ import annotations

import hashlib
import json
import os

FORMAT = "rudder-policy/1"
EARLIER_FORMATS = ("rudder-ppo-policy/1", "rudder-sb3-policy/1")  # the same fields, but per trainer


class UntrustedPolicyError(ValueError):
    """A policy zip whose SHA-256 is not the one its sidecar records (loading it would unpickle unknown code)."""


def zip_path(path: str) -> str:
    """The policy's ``.zip`` (``path`` with or without the suffix)."""
    return path if path.endswith(".zip") else path + ".zip"


def sidecar_path(path: str) -> str:
    """The sidecar ``.json`` beside the policy at ``path``."""
    return (path[:-4] if path.endswith(".zip") else path) + ".json"


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_policy_files(model, path: str, meta: dict) -> tuple[str, str]:
    """Save SB3 ``model`` to ``path`` (``.zip``) and its sidecar: ``meta`` with the format, the zip's SHA-256 and
    the model's class filled in (``meta`` may name them first to keep its key order). Returns both paths."""
    path = zip_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save(path)
    sidecar = dict(format=FORMAT, sha256=None, algorithm=None, module=None)
    sidecar.update(meta)
    sidecar.update(format=FORMAT, sha256=file_sha256(path))
    sidecar["algorithm"] = sidecar["algorithm"] or type(model).__name__
    sidecar["module"] = sidecar["module"] or type(model).__module__
    with open(sidecar_path(path), "w") as f:
        json.dump(sidecar, f, indent=2)
    return path, sidecar_path(path)


def read_policy(path: str, trust: bool = False, hint: str = "") -> tuple[str, dict]:
    """``(zip path, sidecar dict)`` of the policy at ``path``, after checking that both files exist, the sidecar is
    a rudder policy sidecar, and the zip's SHA-256 is the one it records (unless ``trust``). Cheap: it hashes the
    zip and loads nothing. ``hint`` ends the message for a missing file (how to make one).

    Raises:
        FileNotFoundError: the zip or its sidecar is missing. ``ValueError``: a sidecar that is not valid JSON or
        not a rudder one. :class:`UntrustedPolicyError`: the zip's SHA-256 is not the sidecar's (or it records
        none) and ``trust`` is false.
    """
    path = zip_path(path)
    sidecar = sidecar_path(path)
    for p in (path, sidecar):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"policy file {p} not found{f' ({hint})' if hint else ''}")
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{sidecar} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *EARLIER_FORMATS):
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{sidecar} is not a rudder policy sidecar: format expected {FORMAT}, got {got!r}")
    recorded, actual = meta.get("sha256"), file_sha256(path)
    if recorded != actual and not trust:
        said = f"records {recorded}" if recorded else "records no sha256"
        raise UntrustedPolicyError(
            f"{path}: SHA-256 is {actual} but {sidecar} {said}; a policy file is pickled code that loading runs, "
            f"so it is refused: pass --trust-policy (trust=True) only if you trust where it came from"
        )
    return path, meta
