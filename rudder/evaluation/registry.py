"""Agents by name or by reference: what ``train.py gnn --agent``, ``evaluate.py --agents`` and the benchmarks take.

An agent is given as one of

- a built-in name (:data:`REGISTRY`: ``none``, ``static``, ``periodic``, ...);
- a name an installed package registers in the ``rudder.agents`` entry-point group
  (``[project.entry-points."rudder.agents"] my_agent = "my_pkg.policies:MyAgent"`` in its ``pyproject.toml``);
- a reference ``module.path:Class`` (imported from the Python path) or ``path/to/file.py:Class`` (a file, relative
  to the current folder; :func:`absolute_reference` pins it before other processes, e.g. MPI ranks, resolve it).

Every failure to find the agent (no such module, file, class, or a class that is not an agent) raises
:class:`AgentError`, a ``ValueError`` whose message is one line naming what was not found. Modules are imported when
an agent is resolved, so a heuristic run never imports torch models or transformers.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from rudder.agents.base import REQUIRED, Agent, as_agent
from rudder.env.contract import BufferSettings

# name -> (module, class)
REGISTRY = {
    "none": ("rudder.baselines.policies", "NoPrefetch"),
    "static": ("rudder.baselines.policies", "StaticBuffer"),
    "periodic": ("rudder.baselines.policies", "Periodic"),
    "hitrate": ("rudder.baselines.policies", "HitRateRule"),
    "lookahead": ("rudder.baselines.policies", "Lookahead"),
    "vip": ("rudder.baselines.policies", "VIPStatic"),  # SALIENT++'s static cache by vertex inclusion probability
    "level": ("rudder.baselines.policies", "FixedLevel"),  # one link-budget level every window (level=...)
    "mpc": ("rudder.baselines.mpc", "MPC"),  # model-predictive control over link-budget levels
    "ppo": ("rudder.agents.ppo", "PPOAgent"),
    "ppo-link": ("rudder.agents.ppo", "PPOLinkAgent"),  # PPO choosing link-budget levels (time as the reward)
    "llm": ("rudder.agents.llm.agent", "LLMAgent"),
    "llm-link": ("rudder.agents.llm.link", "LLMLinkAgent"),  # the LLM choosing link-budget levels (time as the goal)
    "recorded": ("rudder.baselines.policies", "Recorded"),  # the decisions of a recorded run, replayed
}
ENTRY_POINT_GROUP = "rudder.agents"


class AgentError(ValueError):
    """An agent name, reference or its options cannot be used; the message is one line naming what is missing."""


def is_reference(spec: str) -> bool:
    """Whether ``spec`` is a ``module:Class`` or ``file.py:Class`` reference rather than a name."""
    return ":" in spec or spec.endswith(".py")


def _split(spec: str) -> tuple[str, str, bool]:
    """``(target, attribute, is_file)`` of a reference."""
    target, _, attr = spec.rpartition(":") if ":" in spec else (spec, "", "")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    return target, attr, is_file


def absolute_reference(spec: str, cwd: str | None = None) -> str:
    """``spec`` with a file reference's path made absolute (against ``cwd``, default the current folder), so that
    a process with another working folder (an MPI rank) resolves the same file; names and module references are
    returned as they are."""
    if not is_reference(spec):
        return spec
    target, attr, is_file = _split(spec)
    if not is_file:
        return spec
    path = os.path.abspath(os.path.join(cwd or os.getcwd(), os.path.expanduser(target)))
    return f"{path}:{attr}" if attr else path


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Agents installed packages register under the ``rudder.agents`` entry-point group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def agent_names() -> list[str]:
    """Every agent name: the built-in ones, then the installed entry points (a built-in name wins a clash)."""
    return list(REGISTRY) + [n for n in entry_points() if n not in REGISTRY]


def _unknown(spec: str) -> AgentError:
    installed = [n for n in entry_points() if n not in REGISTRY]
    where = (
        f"installed ({ENTRY_POINT_GROUP} entry points): {', '.join(installed)}"
        if installed
        else f"no {ENTRY_POINT_GROUP} entry points are installed"
    )
    return AgentError(
        f"unknown agent {spec!r}: built-in agents are {', '.join(REGISTRY)}; {where}; or give a "
        "reference module.path:Class or path/to/file.py:Class"
    )


def _where(frames: traceback.StackSummary) -> str:
    return f" ({os.path.basename(frames[-1].filename)} line {frames[-1].lineno})" if frames else ""


_file_modules: dict[str, Any] = {}


def _load_file(spec: str, path: str):
    """Import the Python file ``path`` once per process, under a module name unique to its absolute path (its
    folder is appended to ``sys.path`` so that it can import modules beside it)."""
    path = os.path.abspath(os.path.expanduser(path))
    if path in _file_modules:
        return _file_modules[path]
    if not os.path.exists(path):
        raise AgentError(f"agent {spec!r}: no file {path}")
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise AgentError(f"agent {spec!r}: {path} is not a Python file (.py)")
    stem = re.sub(r"\W", "_", os.path.basename(path)[:-3])
    name = f"rudder_agent_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.append(folder)
    sys.modules[name] = module  # before running it, as a dataclass or pickle in it needs
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise AgentError(f"agent {spec!r}: {path} line {exc.lineno}: SyntaxError: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import: one line saying where and why
        del sys.modules[name]
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
        raise AgentError(
            f"agent {spec!r}: importing {path} failed{_where(frames)}: {type(exc).__name__}: {exc}"
        ) from None
    _file_modules[path] = module
    return module


def _load_module(spec: str, target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        missing = exc.name or target
        if target == missing or target.startswith(missing + "."):
            raise AgentError(
                f"agent {spec!r}: no module named {missing!r} on the Python path (install it, add its "
                "folder to PYTHONPATH, or give a file: path/to/file.py:Class)"
            ) from None
        raise AgentError(f"agent {spec!r}: importing {target} failed: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        frames = traceback.extract_tb(exc.__traceback__)
        raise AgentError(
            f"agent {spec!r}: importing {target} failed{_where(frames)}: {type(exc).__name__}: {exc}"
        ) from None


def _resolve_reference(spec: str):
    target, attr, is_file = _split(spec)
    if not attr:
        raise AgentError(f"agent {spec!r}: name the class too, as {target}:ClassName")
    module = _load_file(spec, target) if is_file else _load_module(spec, target)
    where = module.__file__ if is_file else target
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = sorted(
                n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__
            )
            raise AgentError(
                f"agent {spec!r}: {where} has no class {attr} (it defines {', '.join(classes) or 'no classes'})"
            )
        obj = getattr(obj, part)
    return obj


def _check_protocol(spec: str, obj, what: str) -> type:
    if not isinstance(obj, type):
        raise AgentError(
            f"agent {spec!r}: {what} is not a class but a {type(obj).__name__} (an agent is a class "
            "with name, act(observation, info) and reset())"
        )
    # a subclass of the Agent protocol inherits a stub act that returns nothing: it does not count
    missing = [m for m in REQUIRED if m != "name" and not callable(getattr(obj, m, None))]
    if "act" not in missing and getattr(obj, "act") is Agent.act:
        missing.insert(0, "act")
    if missing:
        raise AgentError(
            f"agent {spec!r}: {obj.__name__} is not an agent: it lacks {' and '.join(missing)} "
            "(an agent needs name, act(observation, info) and reset())"
        )
    settings = getattr(obj, "settings", None)
    if settings is not None and not isinstance(settings, BufferSettings):
        raise AgentError(
            f"agent {spec!r}: {obj.__name__}.settings must be a rudder.env.contract.BufferSettings, "
            f"got {type(settings).__name__}"
        )
    return obj


def agent_class(spec: str) -> type:
    """The class an agent name or reference stands for (see the module's docstring); :class:`AgentError` if it
    cannot be found or is not an agent (``act`` and ``reset`` are checked on the class; ``name`` may be set by
    the constructor and is checked when the agent is built)."""
    spec = str(spec).strip()
    if spec in REGISTRY:
        module, cls = REGISTRY[spec]
        return getattr(importlib.import_module(module), cls)
    if is_reference(spec):
        return _check_protocol(spec, _resolve_reference(spec), _split(spec)[1])
    eps = entry_points()
    if spec not in eps:
        raise _unknown(spec)
    ep = eps[spec]
    try:
        obj = ep.load()
    except ModuleNotFoundError as exc:
        raise AgentError(
            f"agent {spec!r}: its {ENTRY_POINT_GROUP} entry point points at {ep.value}, but there is "
            f"no module named {exc.name!r}"
        ) from None
    except AttributeError:
        raise AgentError(
            f"agent {spec!r}: its {ENTRY_POINT_GROUP} entry point points at {ep.value}, which does not exist"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the package's module failed to import
        raise AgentError(
            f"agent {spec!r}: importing its entry point {ep.value} failed: {type(exc).__name__}: {exc}"
        ) from None
    return _check_protocol(spec, obj, ep.value)


def check_options(spec: str, cls: type, kwargs: dict[str, Any], partial: bool = False) -> None:
    """:class:`AgentError` unless ``cls(**kwargs)`` binds to the constructor (a misspelt or missing option)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to check (a C extension): the constructor will tell
        return
    try:
        (signature.bind_partial if partial else signature.bind)(**kwargs)
    except TypeError as exc:
        takes = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise AgentError(
            f"agent {spec!r}: options {json.dumps(kwargs, default=str)} do not fit {cls.__name__}"
            f"({', '.join(takes)}): {exc}"
        ) from None


def check_agent(spec: str, kwargs: dict[str, Any] | None = None, partial: bool = False) -> type:
    """Resolve ``spec`` and check its options without building it (up-front validation); returns the class."""
    cls = agent_class(spec)
    check_options(spec, cls, dict(kwargs or {}), partial=partial)
    return cls


def settings_of(spec: str) -> BufferSettings:
    """The buffer settings the agent ``spec`` declares on its class (without building it)."""
    return getattr(agent_class(spec), "settings", None) or BufferSettings()


def agent_labels(specs: Iterable[str], names: dict[str, str] | None = None) -> list[str]:
    """How each agent is labelled in tables and plots: a name as it is; a reference by its ``name`` (``names[spec]``
    where given, e.g. from a built agent, else its class's) unless that is a built-in or installed name or already
    taken by an earlier agent, then by the reference as written."""
    taken = set(agent_names())
    names = names or {}
    labels = []
    for spec in specs:
        label = spec
        if is_reference(spec):
            name = names.get(spec) or getattr(agent_class(spec), "name", None)
            if isinstance(name, str) and name and name not in taken and name not in labels:
                label = name
        labels.append(label)
    return labels


def make_agent(spec: str, **kwargs) -> Agent:
    """Build the agent ``spec`` (a name or reference) with constructor options ``kwargs``. ``recorded`` plays with
    the buffer settings of the agent that recorded its trace."""
    cls = agent_class(spec)
    if spec == "recorded" and "settings" not in kwargs:
        kwargs["settings"] = _recorded_settings(kwargs["trace"])
    check_options(spec, cls, kwargs)
    obj = cls(**kwargs)
    try:
        return as_agent(obj)
    except TypeError as exc:
        raise AgentError(f"agent {spec!r}: {exc}") from None


def _recorded_settings(trace: str) -> BufferSettings | None:
    """The buffer settings of the agent that recorded ``trace``: as the trace states them, else as its agent
    declares them (when that agent can still be found)."""
    from rudder.traces import Trace

    meta = Trace(trace).meta
    stated = meta.get("agent", {}).get("settings")
    if stated is not None:
        return BufferSettings(**stated)
    source = meta.get("config", {}).get("agent")
    if not source or source == "recorded":
        return None
    try:
        return settings_of(source)
    except AgentError:
        return None


# --- agent options from the command line ---------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_]\w*")
_NEXT_KEY = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")


def parse_agent_kwargs(text: str | None, flag: str = "--agent-kwargs") -> dict[str, Any]:
    """Constructor options from the command line: a JSON object (``'{"threshold": 0.3}'``) or
    ``key=value,key2=value2`` (each value read as JSON where it parses, e.g. ``3``, ``0.5``, ``true``,
    ``[0,1]``, else as a string)."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AgentError(f"{flag} {text!r}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not all(isinstance(k, str) and _KEY.fullmatch(k) for k in value):
            raise AgentError(f"{flag} {text!r}: option names must be identifiers")
        return value
    out = {}
    for part in _NEXT_KEY.split(text):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key):
            raise AgentError(f"{flag} {text!r}: expected a JSON object or key=value,key2=value2, got {part!r}")
        raw = raw.strip()
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def agent_kwargs_for(values: Iterable[str], specs: list[str], flag: str = "--agent-kwargs") -> dict[str, dict]:
    """Options per agent from several ``--agent-kwargs`` values, for a list of agents (``evaluate.py``).

    ``AGENT@OPTIONS`` gives ``OPTIONS`` to ``AGENT`` (as written in the agent list, or its label); plain ``OPTIONS``
    go to every agent given by reference or entry point (built-in agents have their own options, e.g.
    ``--ppo-policy``; give them options with ``hitrate@drop=0.05``). Later values override earlier ones.
    """
    out: dict[str, dict] = {s: {} for s in specs}
    labels = dict(zip(agent_labels(specs), specs))
    targets = sorted({**labels, **{s: s for s in specs}}.items(), key=lambda kv: -len(kv[0]))
    for value in values or ():
        value = value.strip()
        match = next(((key, spec) for key, spec in targets if value.startswith(key + "@")), None)
        if match is not None:
            key, spec = match
            out[spec].update(parse_agent_kwargs(value[len(key) + 1 :], flag))
            continue
        own = [s for s in specs if s not in REGISTRY]
        if not own:
            raise AgentError(
                f"{flag} {value!r}: plain options go to agents given by reference or entry point, and "
                f"there is none; give a built-in agent options as AGENT@OPTIONS (e.g. hitrate@drop=0.05)"
            )
        options = parse_agent_kwargs(value, flag)
        for s in own:
            out[s].update(options)
    return out
