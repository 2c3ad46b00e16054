"""Gates for LLM agents: does the agent read its input, or answer from its prior and the examples' order?

Four measurements on labelled decision points (a point is a dict with ``metrics`` (and ``history`` for
keep/replace) and the ``decision`` a replay measured as best, as the agents' ``examples_from_trace`` write them):

- **copy** (:func:`copy_gate`): the agent is asked about its own in-context examples, whose exact text and label
  are in its prompt; an agent that reads them reproduces at least :data:`COPY_MIN` of 6.
- **sensitivity** (:func:`sensitivity_gate`): pairs of points that differ in one number, built from held-out points
  (:func:`link_pairs`, :func:`keep_pairs`), where one side should get strictly more prefetch than the other (a link
  much slower per row, evictions of rows still needed, many more misses, many more stale slots); the answer must
  move that way in at least :data:`SENSITIVITY_MIN` of them. A constant answer moves in none.
- **entropy** of the answers over held-out points (bits; 0 = one answer everywhere).
- **accuracy** on held-out points against the best constant answer, with a paired bootstrap 95% interval of the
  difference (:func:`accuracy_vs_constant`); with each option's modelled seconds, the *seconds regret* against the
  best constant and against other link-level agents asked at the same points (PPO, MPC: ``ask`` of
  :func:`heldout_points`), each with a paired bootstrap 95% interval.

An agent that fails copy or sensitivity, or gives one answer everywhere, is reported as "does not read its input"
(:attr:`GateReport.reads_input`). ``evaluate.py`` prints :func:`gate_agent`'s report for every LLM agent.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

COPY_MIN = 5 / 6  # share of the in-context points reproduced
SENSITIVITY_MIN = 0.8  # share of the pairs moved the expected way
MIN_MARGIN = 0.005  # held-out points whose options differ by less than this share are left out (replay model noise)
NOT_READING = "does not read its input"
REFERENCES = ("ppo-link", "mpc")  # registry names of the link-level agents asked at the same held-out points


# ---------------------------------------------------------------------------------------------- the gates
def copy_gate(answer: Callable[[dict], str], points: list[dict]) -> tuple[int, int]:
    """(points whose answer is their own label, points)."""
    return sum(answer(p) == p["decision"] for p in points), len(points)


def sensitivity_gate(
    answer: Callable[[dict], str], pairs: list[tuple[dict, dict, str]], level: dict[str, float]
) -> tuple[int, int]:
    """(pairs whose answers move the expected way, pairs). A pair ``(less, more, what)``: ``more`` should get a
    strictly higher ``level`` (fraction admitted, link-budget level) than ``less``."""
    moved = 0
    for less, more, _ in pairs:
        moved += level[answer(more)] > level[answer(less)]
    return moved, len(pairs)


def entropy_bits(answers: list[str]) -> float:
    """Shannon entropy of the answers' distribution, in bits."""
    if not answers:
        return 0.0
    counts = np.array(list(Counter(answers).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


def _interval(x: np.ndarray, y: np.ndarray, resamples: int, seed: int, ratio: bool = False) -> tuple[float, float]:
    """Paired bootstrap 95% interval of mean(x) - mean(y) (or sum(x) / sum(y) - 1 with ``ratio``)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    if ratio:
        stats = x[idx].sum(axis=1) / np.maximum(y[idx].sum(axis=1), 1e-12) - 1
    else:
        stats = (x[idx] - y[idx]).mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def accuracy_vs_constant(
    answers: list[str],
    labels: list[str],
    options: list[str],
    resamples: int = 2000,
    seed: int = 0,
    seconds: list[list[float]] | None = None,
    references: dict[str, list[str]] | None = None,
) -> dict:
    """Accuracy of ``answers`` against ``labels``, the best constant answer's (chosen on these labels: the
    hardest reference), and a paired bootstrap 95% interval of the difference (agent - constant).

    With ``seconds`` (per point, each option's modelled seconds, in ``options`` order) also the *seconds regret*
    (chosen seconds over the best option's, summed over the points, minus 1) of the agent and of the constant with
    the least regret, and an interval of the agent's seconds over that constant's (-1). With ``references`` too
    (name -> another agent's answers at the same points, e.g. PPO's and MPC's), ``vs``: name -> that agent's
    ``regret``, its ``accuracy``, and ``ci``, the interval of this agent's seconds over its (-1)."""
    n = len(labels)
    counts = Counter(labels)
    const = max(options, key=lambda o: (counts.get(o, 0), -options.index(o)))
    if n == 0:
        return dict(n=0, accuracy=math.nan, constant=const, constant_accuracy=math.nan, ci=(math.nan, math.nan))
    a = np.array([x == y for x, y in zip(answers, labels)], dtype=float)
    c = np.array([y == const for y in labels], dtype=float)
    out = dict(
        n=n,
        accuracy=float(a.mean()),
        constant=const,
        constant_accuracy=float(c.mean()),
        ci=_interval(a, c, resamples, seed),
    )
    if seconds is not None:
        t = np.array(seconds, dtype=float)
        best = t.min(axis=1)
        got = t[np.arange(n), [options.index(x) for x in answers]]
        regret = {o: float(t[:, i].sum() / best.sum() - 1) for i, o in enumerate(options)}
        k = min(options, key=lambda o: (regret[o], options.index(o)))
        out.update(
            regret=float(got.sum() / best.sum() - 1),
            regret_constant=k,
            constant_regret=regret[k],
            regret_vs_constant_ci=_interval(got, t[:, options.index(k)], resamples, seed, ratio=True),
        )
        vs = {}
        for name, theirs in (references or {}).items():
            if len(theirs) != n:
                raise ValueError(f"reference {name!r}: {len(theirs)} answers for {n} points")
            ref = t[np.arange(n), [options.index(x) for x in theirs]]
            vs[name] = dict(
                regret=float(ref.sum() / best.sum() - 1),
                accuracy=float(np.mean([x == y for x, y in zip(theirs, labels)])),
                ci=_interval(got, ref, resamples, seed, ratio=True),
            )
        if references:
            out["vs"] = vs
    return out


# ---------------------------------------------------------------------------------------------- constructed pairs
def _scaled_choices(metrics: dict, **factors) -> dict:
    m = copy.deepcopy(metrics)
    for c in m["choices"]:
        for key, f in factors.items():
            c[key] = f(c) if callable(f) else c[key] * f
    return m


def link_pairs(points: list[dict], n: int = 5) -> list[tuple[dict, dict, str]]:
    """Pairs for the link-budget agent from the first ``n`` points where the options differ: the link 16x faster
    per row vs 16x slower (every option's link seconds x 1/4 vs x 4: prefetch more on the fast link), and no
    eviction of a row still needed vs every eviction of one (prefetch more when nothing needed is evicted)."""
    base = [p for p in points if len({c["rows"] for c in p["metrics"]["choices"]}) > 1][:n]
    pairs = []
    for p in base:
        fast = dict(metrics=_scaled_choices(p["metrics"], link_s=0.25))
        slow = dict(metrics=_scaled_choices(p["metrics"], link_s=4.0))
        pairs.append((slow, fast, "link seconds per row x4 vs x1/4"))
        cold = dict(metrics=_scaled_choices(p["metrics"], evicts_hot=lambda c: 0))
        hot = dict(metrics=_scaled_choices(p["metrics"], evicts_hot=lambda c: c["evicts"]))
        pairs.append((hot, cold, "evictions of rows still needed: all vs none"))
    return pairs


def keep_pairs(points: list[dict], n: int = 5) -> list[tuple[dict, dict, str]]:
    """Pairs for the keep/replace agent from the first ``n`` points: misses per minibatch x1/4 vs x4 (traffic and
    hit rate follow; refresh more when misses are many), and 5% vs 90% of the slots stale (refresh more when
    most slots are stale)."""
    pairs = []
    for p in points[:n]:
        few, many = copy.deepcopy(p), copy.deepcopy(p)
        for q, f in ((few, 0.25), (many, 4.0)):
            m = q["metrics"]
            misses = m["misses_per_mb"] * f
            m["fetched_per_mb"] = misses + m["prefetched_per_mb"]
            m["misses_per_mb"] = misses
            m["hit_rate"] = max(0.0, 1 - misses / max(m["sampled_per_mb"], 1e-9)) if m["sampled_per_mb"] else 0.0
        pairs.append((few, many, "misses per minibatch x1/4 vs x4"))
        fresh, stale = copy.deepcopy(p), copy.deepcopy(p)
        fresh["metrics"]["stale_fraction"], stale["metrics"]["stale_fraction"] = 0.05, 0.9
        pairs.append((fresh, stale, "stale slots 5% vs 90%"))
    return pairs


# ---------------------------------------------------------------------------------------------- held-out points
def heldout_points(
    kind: str, traces: list[str], limit: int | None = None, min_margin: float = MIN_MARGIN, ask: dict | None = None
):
    """Labelled points from ``traces`` (rank 0 of each; traces the agent's examples were not mined from), with a
    margin of at least ``min_margin``, at most ``limit`` (spread over the traces). ``kind``: ``"link"`` or
    ``"keep"``. ``ask`` (link points only): name -> a link-level agent (PPO, MPC) asked at every window of the
    replays, its answers in each point's ``asked`` (:func:`rudder.agents.llm.link.examples_from_trace`)."""
    if ask and kind != "link":
        raise ValueError(f"reference agents are asked at link points only, not {kind!r} points")
    out: list[dict] = []
    for trace in traces:
        if kind == "link":
            from rudder.agents.llm.link import examples_from_trace

            pts = examples_from_trace(trace, rank=0, n=None, ask=ask)
        else:
            from rudder.agents.llm.prompt import examples_from_trace

            pts = examples_from_trace(trace, rank=0, n=10**6)
        out += [dict(p, trace=os.path.basename(os.path.normpath(trace))) for p in pts if p["margin"] >= min_margin]
    if limit is not None and len(out) > limit:
        keep = np.linspace(0, len(out) - 1, limit).round().astype(int)
        out = [out[i] for i in keep]
    return out


# ---------------------------------------------------------------------------------------------- report
@dataclass
class GateReport:
    agent: str
    copy: tuple[int, int]
    sensitivity: tuple[int, int]
    entropy_bits: float
    accuracy: dict
    answers: dict = field(default_factory=dict)  # answer -> count over the held-out points
    settings: dict = field(default_factory=dict)

    @property
    def copy_ok(self) -> bool:
        hits, n = self.copy
        return n > 0 and hits / n >= COPY_MIN - 1e-9

    @property
    def sensitivity_ok(self) -> bool:
        moved, n = self.sensitivity
        return n > 0 and moved / n >= SENSITIVITY_MIN - 1e-9

    @property
    def reads_input(self) -> bool:
        return self.copy_ok and self.sensitivity_ok and self.entropy_bits > 0

    @property
    def beats_constant(self) -> bool:
        return self.accuracy.get("n", 0) > 0 and self.accuracy["ci"][0] > 0

    def line(self) -> str:
        acc = self.accuracy
        verdict = "reads its input" if self.reads_input else NOT_READING
        lo, hi = acc["ci"]
        return (
            f"{self.agent}: copy {self.copy[0]}/{self.copy[1]} ({'pass' if self.copy_ok else 'fail'}, >= 5/6), "
            f"sensitivity {self.sensitivity[0]}/{self.sensitivity[1]} "
            f"({'pass' if self.sensitivity_ok else 'fail'}, >= {SENSITIVITY_MIN:.0%}), "
            f"entropy {self.entropy_bits:.2f} bits over {acc['n']} held-out points, accuracy {acc['accuracy']:.0%} "
            f"vs always {acc['constant']!r} {acc['constant_accuracy']:.0%} (difference 95% CI "
            f"[{100 * lo:+.0f}, {100 * hi:+.0f}] points)"
            + (
                f", seconds regret {acc['regret']:+.2%} vs always {acc['regret_constant']!r} "
                f"{acc['constant_regret']:+.2%} (agent / constant - 1, 95% CI "
                f"[{acc['regret_vs_constant_ci'][0]:+.2%}, {acc['regret_vs_constant_ci'][1]:+.2%}])"
                if "regret" in acc
                else ""
            )
            + "".join(
                f"; vs {name} {ref['regret']:+.2%} (agent / {name} - 1, 95% CI "
                f"[{ref['ci'][0]:+.2%}, {ref['ci'][1]:+.2%}])"
                for name, ref in acc.get("vs", {}).items()
            )
            + f": {verdict}"
        )

    def as_dict(self) -> dict:
        return dict(
            agent=self.agent,
            copy=list(self.copy),
            sensitivity=list(self.sensitivity),
            entropy_bits=self.entropy_bits,
            accuracy=_lists(self.accuracy),
            answers=self.answers,
            settings=self.settings,
            reads_input=self.reads_input,
        )


def _lists(d: dict) -> dict:
    """``d`` with tuples (intervals) as lists, nested dicts too (JSON's shape)."""
    return {k: _lists(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def agent_kind(agent) -> str:
    """``"link"`` for a link-budget agent (one with ``link_options``), else ``"keep"``."""
    return "link" if hasattr(agent, "link_options") else "keep"


def gate_agent(agent, points: list[dict], name: str | None = None, pairs_per_kind: int = 5) -> GateReport:
    """Run every gate on ``agent`` (anything with ``answer_point``, ``in_context_points`` and ``options``) over
    the held-out ``points`` of its kind."""
    kind = agent_kind(agent)
    level = dict(agent.link_options) if kind == "link" else dict(agent.options)
    answer = agent.answer_point
    copied = copy_gate(answer, agent.in_context_points())
    pairs = (link_pairs if kind == "link" else keep_pairs)(points, pairs_per_kind)
    moved = sensitivity_gate(answer, pairs, level)
    answers = [answer(p) for p in points]
    seconds = [p["seconds"] for p in points] if points and all("seconds" in p for p in points) else None
    names = list(points[0].get("asked", {})) if points else []
    references = {n: [p["asked"][n] for p in points] for n in names} if seconds else None
    acc = accuracy_vs_constant(
        answers, [p["decision"] for p in points], list(level), seconds=seconds, references=references
    )
    return GateReport(
        agent=name or getattr(agent, "name", type(agent).__name__),
        copy=copied,
        sensitivity=moved,
        entropy_bits=entropy_bits(answers),
        accuracy=acc,
        answers=dict(Counter(answers)),
        settings=dict(getattr(agent, "debias", {}) or {}),
    )


def gate_section(
    agents: list[tuple[str, object]],
    traces: list[str],
    limit: int = 12,
    pairs: int = 3,
    out=None,
    references: dict[str, object] | None = None,
) -> str:
    """The gates of every ``(label, agent)`` on up to ``limit`` held-out points of ``traces`` (``pairs`` base
    points per pair kind), as lines to print; with ``out``, the figures also go to that JSON file. ``references``:
    name -> a link-level agent (PPO, MPC) asked at the same link points, whose seconds regret each link agent's is
    compared with (:func:`accuracy_vs_constant`)."""
    import json

    points: dict[str, list[dict]] = {}
    reports = []
    for label, agent in agents:
        kind = agent_kind(agent)
        if kind not in points:
            points[kind] = heldout_points(kind, traces, limit, ask=references if kind == "link" else None)
        reports.append(gate_agent(agent, points[kind], label, pairs))
    if out is not None:
        with open(out, "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
            f.write("\n")
    head = (
        "\nLLM gates (copy: its own in-context points; sensitivity: state pairs differing in one number; entropy and "
        "accuracy vs the best constant answer"
        + (f" and {', '.join(references)}" if references else "")
        + " on held-out labelled points of these traces):"
    )
    return "\n".join([head] + [f"- {r.line()}" for r in reports])
