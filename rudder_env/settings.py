"""The settings a user gives rudder, checked in one place with one message each.

``train.py``, ``evaluate.py``, the environments (``rudder/Replay-v0``, ``rudder/Live-v0``) and the action wrappers
take some of the same settings (the buffer fraction, K candidates, the decay, the window...). Each is checked here by
:func:`check`, so a bad value gets the same one-line message whichever door it came in by, naming the setting as a
keyword and as a command-line option: ``candidates (--candidates) must be an integer >= 1, got 0``.

Types are strict: an integer setting takes a Python or numpy integer (not ``1.5``, not ``"1"``, not ``True``); a
number takes any integer or float. Nothing is silently rounded or converted from text.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class SettingError(ValueError):
    """A setting out of its range or of the wrong type; the message is one line naming the setting."""


REWARDS = ("traffic", "time")
RANKINGS = ("misses", "lookahead")
BUFFER_INITS = ("degree", "random", "empty", "vip")
PREFETCH_MODES = ("inline", "background")


@dataclass(frozen=True)
class _Rule:
    kind: str  # "int", "number", "bool" or "choice"
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()


RULES: dict[str, _Rule] = {
    "parts": _Rule("int", 1),
    "trainers_per_part": _Rule("int", 1),
    "batch_size": _Rule("int", 1),
    "epochs": _Rule("int", 1),
    "hidden": _Rule("int", 1),
    "period": _Rule("int", 1),
    "candidates": _Rule("int", 1),
    "sample_ahead": _Rule("int", 0),
    "num_samplers": _Rule("int", 0),
    "steps": _Rule("int", 1),
    "buffer_fraction": _Rule("number", 0.0, 1.0),
    "alpha": _Rule("number", 0.0, 1.0, low_open=True, high_open=True),
    "lr": _Rule("number", 0.0, None, low_open=True),
    "timeout_s": _Rule("number", 0.0),
    "watchdog_s": _Rule("number", 0.0),
    "startup_timeout_s": _Rule("number", 0.0),
    "admit_on_miss": _Rule("bool"),
    "reward": _Rule("choice", choices=REWARDS),
    "ranking": _Rule("choice", choices=RANKINGS),
    "buffer_init": _Rule("choice", choices=BUFFER_INITS),
    "prefetch": _Rule("choice", choices=PREFETCH_MODES),
}


def option(name: str) -> str:
    """The command-line spelling of setting ``name``: ``buffer_fraction`` -> ``--buffer-fraction``."""
    return "--" + name.replace("_", "-")


def _label(name: str) -> str:
    return f"{name} ({option(name)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _range_text(rule: _Rule) -> str:
    if rule.high is None:
        return f"{'>' if rule.low_open else '>='} {rule.low:g}"
    left, right = "(" if rule.low_open else "[", ")" if rule.high_open else "]"
    return f"in {left}{rule.low:g}, {rule.high:g}{right}"


def check(name: str, value: Any, *, extra_choices: Sequence[str] = ()) -> Any:
    """``value`` if it is valid for setting ``name`` (ints as ``int``, numbers as ``float``); else
    :class:`SettingError`. ``extra_choices`` widens a choice setting where one door takes more (e.g. the replay
    env's ``buffer_init="recorded"``)."""
    rule = RULES[name]
    if rule.kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise SettingError(f"{_label(name)} must be true or false, got {value!r}")
        return bool(value)
    if rule.kind == "choice":
        choices = (*rule.choices, *extra_choices)
        if value not in choices:
            raise SettingError(f"{_label(name)} must be one of {', '.join(choices)}, got {value!r}")
        return value
    ok_type = _is_int(value) if rule.kind == "int" else _is_number(value)
    what = "an integer" if rule.kind == "int" else "a number"
    if ok_type:
        v = float(value)
        below = rule.low is not None and (v <= rule.low if rule.low_open else v < rule.low)
        above = rule.high is not None and (v >= rule.high if rule.high_open else v > rule.high)
        if not (below or above):
            return int(value) if rule.kind == "int" else float(value)
    raise SettingError(f"{_label(name)} must be {what} {_range_text(rule)}, got {value!r}")


def check_optional(name: str, value: Any, **kwargs) -> Any:
    """:func:`check`, with ``None`` (meaning "the recorded run's" or "the default") passed through."""
    return None if value is None else check(name, value, **kwargs)


def check_fanout(text: str) -> list[int]:
    """``"10,25"`` -> ``[10, 25]``: comma-separated integers >= 1."""
    try:
        fanouts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise SettingError(f"{_label('fanout')} must be comma-separated integers, got {text!r}") from None
    if not fanouts or min(fanouts) < 1:
        raise SettingError(f"{_label('fanout')} needs positive integers, got {text!r}")
    return fanouts


def _as_tuple(levels: Any) -> tuple:
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise SettingError(f"levels must be a sequence of numbers, got {levels!r}")
    return tuple(levels)


def check_count_levels(levels: Sequence) -> tuple[int, ...]:
    """Levels of a count budget (:class:`rudder.env.wrappers.Budget`): integers, strictly increasing from 0."""
    levels = _as_tuple(levels)
    if not levels or not all(_is_int(v) for v in levels):
        raise SettingError(f"levels must be integers (candidate counts), got {list(levels)!r}")
    out = tuple(int(v) for v in levels)
    if out[0] != 0 or any(b <= a for a, b in zip(out, out[1:])):
        raise SettingError(f"levels must be candidate counts strictly increasing from 0, got {list(out)}")
    return out


def check_fraction_levels(levels: Sequence) -> tuple[float, ...]:
    """Levels of a fraction budget (:class:`rudder.env.wrappers.FractionBudget`): at least two numbers, strictly
    increasing from 0 to at most 1."""
    levels = _as_tuple(levels)
    if not all(_is_number(v) for v in levels):
        raise SettingError(f"levels must be numbers (fractions), got {list(levels)!r}")
    out = tuple(float(v) for v in levels)
    if len(out) < 2 or out[0] != 0.0 or any(b <= a for a, b in zip(out, out[1:])) or out[-1] > 1.0:
        raise SettingError(
            f"levels must be at least two fractions, strictly increasing from 0 to at most 1, got {list(levels)}"
        )
    return out


LINK_LEVELS_MAX = 4.0  # a level past this asks the link for four windows' worth in one: nothing to learn there


def check_link_levels(levels: Sequence) -> tuple[float, ...]:
    """Levels of the link-budget action (``levels=`` of the prefetch envs): at least two numbers, strictly
    increasing from 0, each a multiple of what the link can carry in the next window (1: all of it; more than 1
    asks for more than it can hide, up to :data:`LINK_LEVELS_MAX`)."""
    levels = _as_tuple(levels)
    if not all(_is_number(v) for v in levels):
        raise SettingError(f"levels (--levels) must be numbers (multiples of the link budget), got {list(levels)!r}")
    out = tuple(float(v) for v in levels)
    if len(out) < 2 or out[0] != 0.0 or any(b <= a for a, b in zip(out, out[1:])) or out[-1] > LINK_LEVELS_MAX:
        raise SettingError(
            f"levels (--levels) must be at least two numbers strictly increasing from 0 to at most "
            f"{LINK_LEVELS_MAX:g} (multiples of the link budget), got {list(levels)}"
        )
    return out
