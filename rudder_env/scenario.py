"""Exogenous conditions as data: a versioned, seeded scenario file of processes that replay applies to any trace.

A recorded trace holds one run's link as it was. A *scenario* says what the network and the hosts do instead while a
trace is replayed: a link-rate timeline per host, co-tenant traffic bursts that take a fraction of a link, a
straggler host. :meth:`Scenario.conditions` turns it into the :class:`Conditions` one trainer rank meets, which the
replay time model follows on the replay clock (:class:`~rudder.env.replay_env.ReplayEnv` ``scenario=``): the
per-remote-row cost of a demand pull, and the transfer of every background prefetch chunk
(:class:`~rudder.env.timing.BackgroundLink`), run at the rate the timeline gives at that moment. Results replayed
under a scenario are synthetic: they say so with the scenario's name.

## File format (JSON or YAML, schema version 1)

.. code-block:: yaml

    version: 1                 # schema version (required)
    name: square-8x-2s         # names the results replayed under it (required)
    seed: 0                    # seeds every generated process (default 0)
    duration_s: 120            # generated timelines cover [0, duration_s) and then repeat (default 120)
    feature_bytes_factor: 1    # rows this many times as wide: local and remote per-row costs scale (default 1)
    processes:
      - kind: link             # the link's rate, a multiple of the rate the trace was recorded at
        hosts: all             # "all" or a list of host indices (host i runs trainer rank i)
        timeline: {type: square, period_s: 4, high: 1.0, low: 0.125, duty: 0.5}
      - kind: cotenant         # another job's traffic takes this fraction of the link (0 <= value < 1)
        hosts: [1]
        timeline: {type: markov, mean_high_s: 1.0, mean_low_s: 3.0, high: 0.5, low: 0.0}
      - kind: straggler        # this host's sampling and compute take `factor` times as long
        hosts: [0]
        factor: 2.0

Timelines (``type``), each a piecewise-constant value over the replay clock (seconds from the first minibatch):

- ``piecewise``: ``points: [[t_s, value], ...]`` (times increasing from 0), or ``file: rates.csv`` (two columns
  ``t_s,value``, a header line allowed; a relative path is relative to the scenario file). The last value holds to
  ``duration_s``.
- ``square``: ``period_s``, ``high``, ``low``, ``duty`` (fraction of the period at ``high``, first; default 0.5),
  ``phase_s`` (the wave starts that far into its period; default 0).
- ``markov``: alternating spells at ``high`` and ``low``, exponentially distributed with means ``mean_high_s`` and
  ``mean_low_s``, starting at ``high``; drawn from ``seed`` and the process's position in the list.
- ``drift``: from ``start`` to ``end`` linearly over ``over_s`` seconds in ``steps`` equal steps (default 16),
  then ``end``.
- ``constant``: ``value``.

A host's link rate at time ``t`` is the product of its ``link`` timelines times ``(1 - fraction)`` of each
``cotenant`` timeline; it must stay above 0. Every field is checked on load: a bad one is refused in one line that
names the file, the field, what was expected and what was found (:class:`ScenarioError`).

## What it changes in replay

A demand pull of ``L`` local and ``R`` remote rows starting at ``t`` takes ``c0 + c_local * L`` (per-pull latency
and local copy, unaffected by the link) plus the time the link needs, from ``t``, to carry ``c_remote * R`` seconds
of work at the recorded rate. A background chunk of ``n`` rows likewise takes ``c0`` and then ``c_remote * n`` of
link work. A straggler's recorded sampling and compute seconds are multiplied by its factor. The replay clock starts
at 0 with the first minibatch (the initial fill is not on it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
KINDS = ("link", "cotenant", "straggler")
TIMELINES = {
    "piecewise": (),  # points or file: checked by hand
    "square": ("period_s", "high", "low"),
    "markov": ("mean_high_s", "mean_low_s", "high", "low"),
    "drift": ("start", "end", "over_s"),
    "constant": ("value",),
}
_OPTIONAL = {"square": ("duty", "phase_s"), "drift": ("steps",), "piecewise": ("points", "file")}


class ScenarioError(ValueError):
    """A scenario file that cannot be used, said in one line: file, field, expected, got."""


def _fail(source: str, where: str, expected: str, got) -> ScenarioError:
    return ScenarioError(f"{source}: {where}: expected {expected}, got {got!r}")


def _number(source, where, value, low=None, high=None, low_open=False, high_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise _fail(source, where, f"a number{' ' + rng if rng else ''}", value)
    return float(value)


@dataclass(frozen=True, eq=False)
class Timeline:
    """A piecewise-constant value: ``values[k]`` from ``starts[k]`` to the next start (the last to ``duration``)."""

    starts: np.ndarray  # float64, increasing, starts[0] == 0
    values: np.ndarray  # float64

    def at(self, t: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.starts, t, side="right") - 1]


def _value_bounds(kind: str) -> dict:
    """Allowed values of a timeline of process ``kind``: a link rate > 0, a co-tenant's fraction in [0, 1)."""
    return dict(low=0.0, low_open=True) if kind == "link" else dict(low=0.0, high=1.0, high_open=True)


def _timeline(spec, kind: str, where: str, source: str, duration: float, rng: np.random.Generator, base_dir: str):
    """Build and check the :class:`Timeline` of ``spec`` over ``[0, duration)``."""
    if not isinstance(spec, dict):
        raise _fail(source, where, "a mapping with a 'type'", spec)
    kind_of = spec.get("type")
    if kind_of not in TIMELINES:
        raise _fail(source, f"{where}.type", f"one of {', '.join(TIMELINES)}", kind_of)
    allowed = {"type", *TIMELINES[kind_of], *_OPTIONAL.get(kind_of, ())}
    for key in spec:
        if key not in allowed:
            raise _fail(
                source, f"{where}.{key}", f"a field of a {kind_of} timeline ({', '.join(sorted(allowed))})", key
            )
    for key in TIMELINES[kind_of]:
        if key not in spec:
            raise _fail(source, f"{where}.{key}", f"a value (required by a {kind_of} timeline)", None)
    bounds = _value_bounds(kind)

    def value(key):
        return _number(source, f"{where}.{key}", spec[key], **bounds)

    if kind_of == "constant":
        return Timeline(np.zeros(1), np.array([value("value")]))
    if kind_of == "square":
        period = _number(source, f"{where}.period_s", spec["period_s"], low=0.0, low_open=True)
        duty = _number(source, f"{where}.duty", spec.get("duty", 0.5), low=0.0, high=1.0, low_open=True, high_open=True)
        phase = _number(source, f"{where}.phase_s", spec.get("phase_s", 0.0), low=0.0)
        high, low = value("high"), value("low")
        n = int(np.ceil((duration + phase) / period)) + 1
        edges = np.sort(np.concatenate([np.arange(n) * period, np.arange(n) * period + duty * period])) - phase
        vals = np.tile([high, low], n)[: edges.size]
        keep = edges > 0
        starts = np.concatenate([[0.0], edges[keep]])
        first = vals[~keep][-1] if (~keep).any() else vals[0]
        return Timeline(starts, np.concatenate([[first], vals[keep]]))
    if kind_of == "markov":
        m_high = _number(source, f"{where}.mean_high_s", spec["mean_high_s"], low=0.0, low_open=True)
        m_low = _number(source, f"{where}.mean_low_s", spec["mean_low_s"], low=0.0, low_open=True)
        high, low = value("high"), value("low")
        starts, vals, t, at_high = [], [], 0.0, True
        while t < duration:
            starts.append(t)
            vals.append(high if at_high else low)
            t += float(rng.exponential(m_high if at_high else m_low))
            at_high = not at_high
        return Timeline(np.array(starts), np.array(vals))
    if kind_of == "drift":
        over = _number(source, f"{where}.over_s", spec["over_s"], low=0.0, low_open=True)
        steps = spec.get("steps", 16)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise _fail(source, f"{where}.steps", "an integer >= 1", steps)
        start, end = value("start"), value("end")
        starts = np.arange(steps + 1) * over / steps
        vals = np.concatenate([start + (end - start) * np.arange(steps) / steps, [end]])
        return Timeline(starts, vals)
    # piecewise
    if ("points" in spec) == ("file" in spec):
        raise _fail(source, f"{where}", "exactly one of 'points' or 'file'", sorted(k for k in spec if k != "type"))
    if "file" in spec:
        path = spec["file"]
        if not isinstance(path, str):
            raise _fail(source, f"{where}.file", "a path to a CSV of t_s,value", path)
        full = path if os.path.isabs(path) else os.path.join(base_dir, path)
        if not os.path.exists(full):
            raise _fail(source, f"{where}.file", "an existing CSV file", full)
        points = []
        with open(full, newline="") as f:
            for n, row in enumerate(csv.reader(f)):
                if not row or (n == 0 and not _is_float(row[0])):
                    continue
                if len(row) != 2 or not all(_is_float(x) for x in row):
                    raise _fail(full, f"line {n + 1}", "two numbers t_s,value", ",".join(row))
                points.append([float(row[0]), float(row[1])])
        where_pts = f"{where}.file ({full})"
    else:
        points, where_pts = spec["points"], f"{where}.points"
    if not isinstance(points, list) or not points:
        raise _fail(source, where_pts, "a non-empty list of [t_s, value] pairs", points)
    for j, p in enumerate(points):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise _fail(source, f"{where_pts}[{j}]", "a [t_s, value] pair", p)
        _number(source, f"{where_pts}[{j}][0]", p[0], low=0.0)
        _number(source, f"{where_pts}[{j}][1]", p[1], **bounds)
    starts = np.array([float(p[0]) for p in points])
    if starts[0] != 0.0 or np.any(np.diff(starts) <= 0):
        raise _fail(source, where_pts, "times strictly increasing from 0", starts.tolist())
    return Timeline(starts, np.array([float(p[1]) for p in points]))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class Conditions:
    """What one trainer rank meets under a scenario: its link's rate over time (a multiple of the recorded rate,
    piecewise constant over ``[0, period_s)`` and repeating) and its CPU slowdown.

    ``finish(t, work_s)`` is when the link, starting at ``t``, has carried ``work_s`` seconds of transfer at the
    recorded rate; ``transfer_s(t, work_s)`` is that minus ``t``.
    """

    starts: np.ndarray  # float64, starts[0] == 0, all < period_s
    rates: np.ndarray  # float64 > 0
    period_s: float
    cpu_factor: float = 1.0
    feature_bytes_factor: float = 1.0
    name: str = "stationary"
    _cum: np.ndarray = field(default=None, repr=False)  # link work done by each start (within one period)

    def __post_init__(self):
        lengths = np.diff(np.append(self.starts, self.period_s))
        object.__setattr__(self, "_cum", np.concatenate([[0.0], np.cumsum(self.rates * lengths)]))

    @classmethod
    def stationary(cls, cpu_factor: float = 1.0, feature_bytes_factor: float = 1.0) -> Conditions:
        return cls(np.zeros(1), np.ones(1), 1.0, cpu_factor, feature_bytes_factor)

    @property
    def varies(self) -> bool:
        return bool(np.any(self.rates != 1.0))

    def rate_at(self, t: float) -> float:
        return float(self.rates[np.searchsorted(self.starts, t % self.period_s, side="right") - 1])

    def work_by(self, t: float) -> float:
        """Link work (seconds at the recorded rate) carried from 0 to ``t``."""
        n, r = divmod(max(t, 0.0), self.period_s)
        k = int(np.searchsorted(self.starts, r, side="right") - 1)
        return n * self._cum[-1] + self._cum[k] + self.rates[k] * (r - self.starts[k])

    def finish(self, t: float, work_s: float) -> float:
        if work_s <= 0:
            return t
        target = self.work_by(t) + work_s
        n, r = divmod(target, self._cum[-1])
        k = int(np.clip(np.searchsorted(self._cum, r, side="right") - 1, 0, self.rates.size - 1))
        return n * self.period_s + self.starts[k] + (r - self._cum[k]) / self.rates[k]

    def transfer_s(self, t: float, work_s: float) -> float:
        return max(float(self.finish(t, work_s)) - t, 0.0)

    def mean_rate(self) -> float:
        return float(self._cum[-1] / self.period_s)


@dataclass(frozen=True)
class Scenario:
    """A checked scenario file (see the module docstring for the format)."""

    name: str
    seed: int
    duration_s: float
    processes: tuple[dict, ...]
    feature_bytes_factor: float = 1.0
    source: str = "<scenario>"
    base_dir: str = "."

    @classmethod
    def load(cls, path: str) -> Scenario:
        """Read and check a scenario file (``.json``, or ``.yaml``/``.yml``)."""
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ScenarioError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ScenarioError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, data, source: str = "<scenario>", base_dir: str = ".") -> Scenario:
        if not isinstance(data, dict):
            raise _fail(source, "(top level)", "a mapping", type(data).__name__)
        known = {"version", "name", "seed", "duration_s", "feature_bytes_factor", "processes", "description"}
        for key in data:
            if key not in known:
                raise _fail(source, key, f"a scenario field ({', '.join(sorted(known))})", key)
        if data.get("version") != SCHEMA_VERSION:
            raise _fail(source, "version", f"{SCHEMA_VERSION}", data.get("version"))
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(source, "name", "a non-empty string", name)
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise _fail(source, "seed", "an integer >= 0", seed)
        duration = _number(source, "duration_s", data.get("duration_s", 120.0), low=0.0, low_open=True)
        fbf = _number(source, "feature_bytes_factor", data.get("feature_bytes_factor", 1.0), low=0.0, low_open=True)
        procs = data.get("processes", [])
        if not isinstance(procs, list):
            raise _fail(source, "processes", "a list", procs)
        scenario = cls(name, seed, duration, tuple(procs), fbf, source, base_dir)
        for host in (0, 1):  # check every process (the timelines of any host are built the same way)
            scenario.conditions(host)
        return scenario

    def to_dict(self) -> dict:
        return dict(
            version=SCHEMA_VERSION,
            name=self.name,
            seed=self.seed,
            duration_s=self.duration_s,
            feature_bytes_factor=self.feature_bytes_factor,
            processes=[dict(p) for p in self.processes],
        )

    def save(self, path: str) -> None:
        """Write as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        with open(path, "w") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                yaml.safe_dump(self.to_dict(), f, sort_keys=False)
            else:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")

    def conditions(self, host: int, kinds: tuple[str, ...] = KINDS) -> Conditions:
        """The :class:`Conditions` host ``host`` (trainer rank ``host``) meets, from the processes of ``kinds``
        (every process is checked whichever are kept; live, link and co-tenant processes are played apart)."""
        timelines, cpu = [], 1.0
        for i, proc in enumerate(self.processes):
            where = f"processes[{i}]"
            if not isinstance(proc, dict):
                raise _fail(self.source, where, "a mapping with a 'kind'", proc)
            kind = proc.get("kind")
            if kind not in KINDS:
                raise _fail(self.source, f"{where}.kind", f"one of {', '.join(KINDS)}", kind)
            allowed = {"kind", "hosts", "factor"} if kind == "straggler" else {"kind", "hosts", "timeline"}
            for key in proc:
                if key not in allowed:
                    raise _fail(
                        self.source,
                        f"{where}.{key}",
                        f"a field of a {kind} process ({', '.join(sorted(allowed))})",
                        key,
                    )
            hosts = proc.get("hosts", "all")
            if hosts != "all" and not (
                isinstance(hosts, list)
                and all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hosts)
            ):
                raise _fail(self.source, f"{where}.hosts", "'all' or a list of host indices >= 0", hosts)
            applies = hosts == "all" or host in hosts
            if kind == "straggler":
                if "factor" not in proc:
                    raise _fail(self.source, f"{where}.factor", "a value (required by a straggler)", None)
                factor = _number(self.source, f"{where}.factor", proc["factor"], low=0.0, low_open=True)
                cpu *= factor if applies and kind in kinds else 1.0
                continue
            if "timeline" not in proc:
                raise _fail(self.source, f"{where}.timeline", f"a timeline (required by a {kind} process)", None)
            rng = np.random.default_rng([self.seed, i])  # per process: adding one leaves the others' draws alone
            tl = _timeline(
                proc["timeline"], kind, f"{where}.timeline", self.source, self.duration_s, rng, self.base_dir
            )
            if applies and kind in kinds:
                timelines.append((kind, tl))
        if not timelines:
            return Conditions(np.zeros(1), np.ones(1), self.duration_s, cpu, self.feature_bytes_factor, self.name)
        edges = np.unique(np.concatenate([tl.starts for _, tl in timelines]))
        edges = edges[edges < self.duration_s]
        rate = np.ones(edges.size)
        for kind, tl in timelines:
            v = tl.at(edges)
            rate *= v if kind == "link" else 1.0 - v
        keep = np.concatenate([[True], rate[1:] != rate[:-1]])
        return Conditions(edges[keep], rate[keep], self.duration_s, cpu, self.feature_bytes_factor, self.name)


def square_wave(name: str, period_s: float, slow: float, duty: float = 0.5, **extra) -> Scenario:
    """A scenario of one link process on every host: the recorded rate, then ``slow`` times it (e.g. 0.125), each
    for its share of ``period_s``."""
    proc = dict(
        kind="link", hosts="all", timeline=dict(type="square", period_s=period_s, high=1.0, low=slow, duty=duty)
    )
    return Scenario.from_dict(dict(version=SCHEMA_VERSION, name=name, processes=[proc], **extra))


# ------------------------------------------------------------------------------------------------ as played live

CONDITIONS_SCHEMA = "rudder-conditions"
#: A played timeline's last rate holds this long (seconds): replay running past the live run's end does not wrap
#: around to the start of what was played.
HOLD_S = 1e7


def played_scenario(
    changes, hosts: int, name: str, offset_s: float = 0.0, seed: int = 0, feature_bytes_factor: float = 1.0
) -> Scenario:
    """The link rates a live run met, as a ``piecewise`` scenario (one link process per host): ``changes`` are
    ``(seconds since playing started, host, rate factor)`` in time order, each host at factor 1 until its first;
    times are shifted ``offset_s`` earlier (a rank's replay clock starts at its first minibatch, after playing
    started) and the last rate of each host holds for :data:`HOLD_S`."""
    procs = []
    for host in range(hosts):
        points: list[list[float]] = []
        for t, h, rate in changes:
            if int(h) != host:
                continue
            t = max(0.0, float(t) - offset_s)
            if points and t <= points[-1][0]:
                points[-1][1] = float(rate)  # a later change at the same replay time supersedes
            else:
                points.append([round(t, 6), float(rate)])
        if not points or points[0][0] > 0:
            points.insert(0, [0.0, 1.0])
        procs.append(dict(kind="link", hosts=[host], timeline=dict(type="piecewise", points=points)))
    last = max((p[0] for pr in procs for p in pr["timeline"]["points"]), default=0.0)
    return Scenario.from_dict(
        dict(
            version=SCHEMA_VERSION,
            name=name,
            seed=seed,
            duration_s=last + HOLD_S,
            feature_bytes_factor=feature_bytes_factor,
            processes=procs,
        )
    )


def conditions_record(
    scenario: Scenario, base_rate: str, hosts: int, started_unix: float, changes, **played_as
) -> dict:
    """The ``conditions.json`` of a trace recorded live under ``scenario``: the scenario as given, the base link
    rate its factors multiply, the wall-clock time playing started, and every rate change as applied (a co-tenant's
    share counted as the rate it leaves the job); ``played_as``: how it was played, e.g. ``cotenant="flow"`` and
    the bytes each host's competing flow carried."""
    return dict(
        schema=CONDITIONS_SCHEMA,
        version=SCHEMA_VERSION,
        scenario=scenario.to_dict(),
        base_rate=base_rate,
        hosts=int(hosts),
        played_from_unix=float(started_unix),
        changes=[[round(float(t), 6), int(h), float(r)] for t, h, r in changes],
        **played_as,
    )


def conditions_met(record: dict, host: int, start_unix: float | None, source: str) -> Scenario:
    """What one rank met, from a trace's ``conditions.json`` (``record``): the played link rates on its replay
    clock (which starts at the rank's first minibatch, ``start_unix``; the record's start if unknown), as a
    scenario named ``<scenario>-as-played`` whose one link process applies to every host (it is this rank's
    host's). A malformed record is refused in one line (:class:`ScenarioError`)."""
    if not isinstance(record, dict) or record.get("schema") != CONDITIONS_SCHEMA:
        raise _fail(source, "schema", CONDITIONS_SCHEMA, record.get("schema") if isinstance(record, dict) else record)
    if record.get("version") != SCHEMA_VERSION:
        raise _fail(source, "version", f"{SCHEMA_VERSION}", record.get("version"))
    hosts = record.get("hosts")
    if not isinstance(hosts, int) or isinstance(hosts, bool) or hosts < 1:
        raise _fail(source, "hosts", "an integer >= 1", hosts)
    if not 0 <= host < hosts:
        raise _fail(source, "hosts", f"more than host {host} (the rank's partition)", hosts)
    t0 = _number(source, "played_from_unix", record.get("played_from_unix"), low=0.0)
    changes = record.get("changes")
    if not isinstance(changes, list) or not all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, (int, float)) for v in c) for c in changes
    ):
        raise _fail(source, "changes", "a list of [seconds, host, rate factor]", type(changes).__name__)
    for i, (t, h, r) in enumerate(changes):
        _number(source, f"changes[{i}][0]", t, low=0.0)
        _number(source, f"changes[{i}][2]", r, low=0.0, low_open=True)
    played = Scenario.from_dict(record.get("scenario"), source=f"{source}: scenario")
    offset = 0.0 if start_unix is None else max(0.0, float(start_unix) - t0)
    name = f"{played.name}-as-played"
    every = played_scenario(changes, hosts, name, offset, played.seed, played.feature_bytes_factor)
    mine = dict(every.processes[host], hosts="all")  # the rank's own host: whichever trainer rank reads it
    return dataclasses.replace(every, processes=(mine,), source=source)
