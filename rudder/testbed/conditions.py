"""A scenario's link timelines played live on the emulated cluster, and what was played kept as a conditions file.

:class:`ConditionsPlayer` changes each host's egress shaping (``tc ... tbf`` through
:meth:`~rudder.testbed.cluster.EmulatedCluster.set_rate`) on the schedule a :class:`~rudder.env.scenario.Scenario`
gives, from a background thread, while a job runs: at each change of a host's rate factor the host is set to
``base rate x factor``. Every change it made is logged with the time it took effect (seconds since
:meth:`ConditionsPlayer.start`); :meth:`ConditionsPlayer.scenario` turns that log into a ``piecewise`` scenario, so
replay of the recorded trace follows the conditions the live run met (save it beside the trace with
:meth:`~rudder.env.scenario.Scenario.save`). Stragglers and co-tenant flows are not played here (a CPU cap and a
competing flow need the job's processes); the scenario's link and co-tenant timelines are, as rate changes.

Live, the clock starts when the player starts (before the job's first minibatch), so a replay's clock, which starts
at the first minibatch, runs a start-up's length behind it: pass ``offset_s`` to :meth:`scenario` to align them.
"""

from __future__ import annotations

import threading
import time

from rudder.env.scenario import Scenario, conditions_record, played_scenario


def _rate_text(bits: float) -> str:
    return f"{max(int(round(bits)), 8000)}bit"


class ConditionsPlayer:
    """Plays ``scenario``'s link rates on ``cluster`` (anything with ``set_rate(host, rate)``) at ``base_bits``
    (the rate the run would otherwise have; ``base_rate``, the same as tc text, is what :meth:`stop` sets back) for
    ``hosts`` hosts, for at most ``duration_s`` seconds."""

    def __init__(
        self,
        cluster,
        scenario: Scenario,
        base_bits: int,
        hosts: int,
        duration_s: float | None = None,
        base_rate: str | None = None,
    ):
        self.cluster, self.scenario_played, self.base_bits = cluster, scenario, int(base_bits)
        self.base_rate = base_rate or _rate_text(base_bits)  # what each link gets back, as the cluster wrote it
        self.conditions = [scenario.conditions(h) for h in range(hosts)]
        self.duration_s = float(duration_s if duration_s is not None else scenario.duration_s)
        self.log: list[tuple[float, int, float]] = []  # (seconds since start, host, rate factor) as applied
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._when, self._poll_s = None, 0.02
        self.started_unix = 0.0  # wall clock when playing started (ranks' trace times are on it)

    def schedule(self) -> list[tuple[float, int, float]]:
        """Every change to make, in time order: (seconds from start, host, rate factor)."""
        out = []
        for host, c in enumerate(self.conditions):
            n = 0
            while n * c.period_s < self.duration_s:
                for start, rate in zip(c.starts, c.rates):
                    t = n * c.period_s + float(start)
                    if t < self.duration_s:
                        out.append((t, host, float(rate)))
                n += 1
        out.sort()
        last: dict[int, float] = {}
        kept = []
        for t, host, rate in out:  # a change only where the rate changes
            if last.get(host) != rate:
                kept.append((t, host, rate))
                last[host] = rate
        return kept

    def start(self, when=None, poll_s: float = 0.02) -> ConditionsPlayer:
        """Start playing, from a background thread: at once, or once ``when()`` (polled every ``poll_s``) is
        true, e.g. when a job's training begins, so that every run under the scenario meets the same timeline
        from its first minibatch on."""
        self._when, self._poll_s = when, poll_s
        self._thread = threading.Thread(target=self._run, name="rudder-conditions", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop playing and give every host its base rate back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for host in range(len(self.conditions)):
            self.cluster.set_rate(host, self.base_rate)

    def _run(self) -> None:
        while self._when is not None and not self._when():
            if self._stop.wait(self._poll_s):
                return
        self._t0, self.started_unix = time.monotonic(), time.time()
        for t, host, rate in self.schedule():
            if self._stop.wait(max(0.0, t - (time.monotonic() - self._t0))):
                return
            self.cluster.set_rate(host, _rate_text(self.base_bits * rate))
            self.log.append((time.monotonic() - self._t0, host, rate))

    def scenario(self, name: str | None = None, offset_s: float = 0.0) -> Scenario:
        """What was played, as a ``piecewise`` scenario (one link process per host), shifted ``offset_s`` earlier
        (e.g. the job's start-up before its first minibatch)."""
        return played_scenario(
            self.log,
            len(self.conditions),
            name or f"{self.scenario_played.name}-as-played",
            offset_s=offset_s,
            seed=self.scenario_played.seed,
            feature_bytes_factor=self.scenario_played.feature_bytes_factor,
        )

    def record(self) -> dict:
        """What was played, as the ``conditions.json`` a trace recorded under it keeps
        (:func:`~rudder.env.scenario.conditions_record`), its factors multiplying ``base_rate``."""
        return conditions_record(
            self.scenario_played, self.base_rate, len(self.conditions), self.started_unix, self.log
        )
