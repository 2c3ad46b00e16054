"""Time checks: the measured timings of another run of a trace's configuration, to test the replay time model on.

Replay models a policy's fetch time with a model fitted to the trace's own measurements
(:mod:`rudder.env.timing`). Whether it predicts a *different* policy's time is only known by comparing with a run of
that policy: the same options and seed (so the same minibatches), another agent. A time check is that run's
per-minibatch timings and row counts, small enough to ship beside a sample trace:
``DIR/time-check-<agent>.json`` (the trace reader ignores files it does not know)::

    {"schema": "rudder-time-check", "version": 1, "agent": "none", "config": {...}, "source": "...",
     "created": "...", "host": "...",
     "ranks": [{"rank": 0, "local_rows": [...], "remote_fetched": [...], "fetch_s": [...], "sample_s": [...],
                "compute_s": [...], "initial_fill_rows": 0, "initial_fill_s": 0.0}, ...]}

``python -m rudder.traces.timecheck OTHER_RUN_TRACE --into TRACE`` writes one from a trace of the other run; a full
trace
of another run can also serve directly (:meth:`TimeCheck.from_trace`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .fingerprint import stream_config
from .reader import Trace
from .schema import TraceError

SCHEMA = "rudder-time-check"
VERSION = 1
COLUMNS = ("local_rows", "remote_fetched", "fetch_s", "sample_s", "compute_s")
NETWORK_CONFIG = ("hosts", "link_rate")  # options of the run's network that a check run must share


@dataclass
class TimeCheck:
    """Measured per-minibatch timings of one run: ``ranks[r]`` maps :data:`COLUMNS` to arrays (and
    ``initial_fill_rows``/``initial_fill_s`` to numbers); ``agent`` and ``config`` (the run's options) say what
    ran."""

    agent: str
    config: dict
    source: str
    ranks: dict[int, dict] = field(default_factory=dict)
    partition_fingerprint: str | None = None  # the run's partitioning (None: not recorded)

    @classmethod
    def from_trace(cls, trace: Trace | str | os.PathLike) -> TimeCheck:
        """The timings a trace recorded."""
        trace = trace if isinstance(trace, Trace) else Trace(trace)
        config = trace.meta.get("config", {})
        ranks = {}
        for r in trace.ranks:
            rt = trace.rank(r)
            table = rt.table()
            ranks[r] = {c: table[c].to_numpy(dtype=np.float64) for c in COLUMNS}
            ranks[r]["initial_fill_rows"] = int(rt.meta.get("initial_fill_rows", 0) or 0)
            ranks[r]["initial_fill_s"] = float(rt.meta.get("initial_fill_s", 0.0) or 0.0)
        return cls(
            agent=str(config.get("agent", "?")),
            config=config,
            source=str(trace.directory),
            ranks=ranks,
            partition_fingerprint=trace.partition_fingerprint,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> TimeCheck:
        """Read a ``time-check-*.json``; :class:`~traces.TraceError` naming the file and field when malformed."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise TraceError(f"time check {path} cannot be read: {exc}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
            got = (doc.get("schema"), doc.get("version")) if isinstance(doc, dict) else type(doc).__name__
            raise TraceError(f"field 'schema' in {path}: expected {SCHEMA!r} version {VERSION}, got {got}")
        ranks = {}
        for entry in doc.get("ranks", []):
            try:
                columns = {c: np.asarray(entry[c], dtype=np.float64) for c in COLUMNS}
            except (KeyError, TypeError, ValueError) as exc:
                raise TraceError(
                    f"rank entry in {path}: expected arrays {', '.join(COLUMNS)}, got {type(exc).__name__}: {exc}"
                ) from None
            if len({v.size for v in columns.values()}) != 1:
                raise TraceError(
                    f"rank {entry.get('rank')} in {path}: expected equal-length columns, got "
                    f"{ {c: v.size for c, v in columns.items()} }"
                )
            columns["initial_fill_rows"] = int(entry.get("initial_fill_rows", 0))
            columns["initial_fill_s"] = float(entry.get("initial_fill_s", 0.0))
            ranks[int(entry["rank"])] = columns
        return cls(
            agent=str(doc.get("agent", "?")),
            config=dict(doc.get("config", {})),
            source=str(path),
            ranks=ranks,
            partition_fingerprint=doc.get("partition_fingerprint"),
        )

    def save(self, path: str | os.PathLike, **extra) -> str:
        """Write as ``time-check`` JSON (atomically); ``extra`` keys (e.g. ``created``, ``host``) are kept."""
        doc = dict(
            schema=SCHEMA,
            version=VERSION,
            agent=self.agent,
            config=self.config,
            source=self.source,
            **({"partition_fingerprint": self.partition_fingerprint} if self.partition_fingerprint else {}),
            **extra,
            ranks=[
                dict(
                    rank=r,
                    **{
                        c: [round(float(x), 6) for x in cols[c]] if c.endswith("_s") else [int(x) for x in cols[c]]
                        for c in COLUMNS
                    },
                    initial_fill_rows=cols["initial_fill_rows"],
                    initial_fill_s=cols["initial_fill_s"],
                )
                for r, cols in sorted(self.ranks.items())
            ],
        )
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.write("\n")
        os.replace(tmp, path)
        return str(path)

    def matches(self, trace: Trace) -> bool:
        """Whether this run can check ``trace``'s time model: the same options that decide the minibatches
        (:data:`rudder.traces.fingerprint.STREAM_CONFIG`), the same epochs and network (:data:`NETWORK_CONFIG`: emulated
        hosts, link rate; absent = not emulated), the same partitioning where both record it (the same options
        need not give the same partitions: its node ids, and so its minibatches, would differ), and another agent."""
        config = trace.meta.get("config", {})
        theirs = trace.partition_fingerprint
        if self.partition_fingerprint and theirs and self.partition_fingerprint != theirs:
            return False
        ours = stream_config(trace)
        same_network = all((self.config.get(k) or None) == (config.get(k) or None) for k in NETWORK_CONFIG)
        return (
            bool(ours)
            and all(self.config.get(k) == v for k, v in ours.items())
            and same_network
            and self.config.get("epochs") == config.get("epochs")
            and self.agent != config.get("agent")
        )


def time_checks(trace: Trace | str | os.PathLike, extra: list[TimeCheck] = ()) -> list[TimeCheck]:
    """The time checks that fit ``trace``: its ``time-check-*.json`` files and those of ``extra`` that match."""
    trace = trace if isinstance(trace, Trace) else Trace(trace)
    found = [TimeCheck.load(p) for p in sorted(glob.glob(os.path.join(trace.directory, "time-check-*.json")))]
    return [c for c in [*found, *extra] if c.matches(trace)]


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rudder.traces.timecheck",
        description="Store another run's timings beside a trace, to check its time model.",
    )
    p.add_argument("source", help="trace of the other run (same options and seed, another agent)")
    p.add_argument("--into", required=True, help="the trace whose time model it checks")
    args = p.parse_args(argv)
    try:
        target = Trace(args.into)
        check = TimeCheck.from_trace(args.source)
        if not check.matches(target):
            raise TraceError(
                f"{args.source} (agent {check.agent}) cannot check {args.into}: it needs the same "
                f"{', '.join(sorted(stream_config(target)))} and epochs and another agent"
            )
    except TraceError as exc:
        print(f"rudder.traces.timecheck: error: {exc}", file=sys.stderr)
        return 2
    source = Trace(args.source)
    check.source = os.path.basename(os.path.normpath(args.source))
    path = check.save(
        os.path.join(args.into, f"time-check-{check.agent}.json"),
        created=source.meta.get("created"),
        host=source.meta.get("host"),
    )
    print(f"wrote {path} ({len(check.ranks)} ranks, agent {check.agent})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
