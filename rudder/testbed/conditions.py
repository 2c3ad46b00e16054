"""A scenario's link timelines played live on the emulated cluster, and what was played kept as a conditions file.

:class:`ConditionsPlayer` changes each host's egress shaping (``tc ... tbf`` through
:meth:`~rudder.testbed.cluster.EmulatedCluster.set_rate`) on the schedule a :class:`~rudder.env.scenario.Scenario`
gives, from a background thread, while a job runs: at each change of a host's rate factor the host is set to
``base rate x factor``. Every change it made is logged with the time it took effect (seconds since
:meth:`ConditionsPlayer.start`); :meth:`ConditionsPlayer.scenario` turns that log into a ``piecewise`` scenario, so
replay of the recorded trace follows the conditions the live run met (save it beside the trace with
:meth:`~rudder.env.scenario.Scenario.save`).

A co-tenant is played as real traffic where the cluster can start it (:meth:`EmulatedCluster.competing_flow
<rudder.testbed.cluster.EmulatedCluster.competing_flow>`, two hosts or more): a UDP flow from the host to the next
one through the same shaped egress, paced at the co-tenant's share of the link's rate at that moment and served
first by the shaper, so the job gets the rest of the token bucket, queued behind it, as behind another job's. The
log (and replay) counts a burst as the rate it leaves the job (``1 - share``); the record says it was a flow and how
many bytes each flow carried. Elsewhere (one host, or a cluster without flows) a co-tenant is played as that rate
change. Stragglers are capped by the launcher before the job starts (:meth:`EmulatedCluster.cap_cpu
<rudder.testbed.cluster.EmulatedCluster.cap_cpu>`), not here.

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
        # per host, the rate its co-tenant leaves the job over time (None: no co-tenant on that host)
        cotenant = [scenario.conditions(h, kinds=("cotenant",)) for h in range(hosts)]
        cotenant = [c if (c.rates < 1).any() else None for c in cotenant]
        self.flows_played = hosts >= 2 and hasattr(cluster, "competing_flow") and any(c is not None for c in cotenant)
        if self.flows_played:  # links by rate changes, co-tenants by flows
            self.conditions = [scenario.conditions(h, kinds=("link",)) for h in range(hosts)]
            self.cotenant = cotenant
        else:  # both as rate changes
            self.conditions = [scenario.conditions(h) for h in range(hosts)]
            self.cotenant = [None] * hosts
        self.flows: list = []
        self.flow_bytes: list[int] = []
        self.duration_s = float(duration_s if duration_s is not None else scenario.duration_s)
        self.log: list[tuple[float, int, float]] = []  # (seconds since start, host, rate factor) as applied
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._when, self._poll_s = None, 0.02
        self.started_unix = 0.0  # wall clock when playing started (ranks' trace times are on it)

    def _times(self, c) -> list[tuple[float, float]]:
        out, n = [], 0
        while n * c.period_s < self.duration_s:
            for start, rate in zip(c.starts, c.rates):
                t = n * c.period_s + float(start)
                if t < self.duration_s:
                    out.append((t, float(rate)))
            n += 1
        return out

    def _events(self) -> list[tuple[float, int, float, float]]:
        """Every change to make, in time order: (seconds from start, host, link factor, co-tenant share), one where
        either changes."""
        out = []
        for host, (link, cot) in enumerate(zip(self.conditions, self.cotenant)):
            at = {t: [r, None] for t, r in self._times(link)}
            for t, r in [] if cot is None else self._times(cot):
                at.setdefault(t, [None, None])[1] = 1.0 - r
            now = [1.0, 0.0]
            for t in sorted(at):
                now = [now[k] if v is None else v for k, v in enumerate(at[t])]
                out.append((t, host, now[0], now[1]))
        out.sort()
        last: dict[int, tuple] = {}
        kept = []
        for t, host, link, share in out:
            if last.get(host) != (link, share):
                kept.append((t, host, link, share))
                last[host] = (link, share)
        return kept

    def schedule(self) -> list[tuple[float, int, float]]:
        """Every change to make, in time order: (seconds from start, host, rate factor left to the job)."""
        kept, last = [], {}
        for t, host, link, share in self._events():
            rate = link * (1.0 - share)
            if last.get(host) != rate:
                kept.append((t, host, rate))
                last[host] = rate
        return kept

    def start(self, when=None, poll_s: float = 0.02) -> ConditionsPlayer:
        """Start playing, from a background thread: at once, or once ``when()`` (polled every ``poll_s``) is
        true, e.g. when a job's training begins, so that every run under the scenario meets the same timeline
        from its first minibatch on."""
        self._when, self._poll_s = when, poll_s
        if self.flows_played:  # connected and idle before the timeline starts
            n = len(self.conditions)
            self.flows = [
                None if c is None else self.cluster.competing_flow(h, (h + 1) % n) for h, c in enumerate(self.cotenant)
            ]
        self._thread = threading.Thread(target=self._run, name="rudder-conditions", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop playing and give every host its base rate back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flow_bytes = [0 if f is None else f.close() for f in self.flows]
        for host in range(len(self.conditions)):
            self.cluster.set_rate(host, self.base_rate)

    def _run(self) -> None:
        while self._when is not None and not self._when():
            if self._stop.wait(self._poll_s):
                return
        self._t0, self.started_unix = time.monotonic(), time.time()
        links: dict[int, float] = {}
        left: dict[int, float] = {}
        for t, host, link, share in self._events():
            if self._stop.wait(max(0.0, t - (time.monotonic() - self._t0))):
                return
            if links.get(host) != link:
                self.cluster.set_rate(host, _rate_text(self.base_bits * link))
                links[host] = link
            if self.flows and self.flows[host] is not None:
                self.flows[host].set_rate(self.base_bits * link * share)
            rate = link * (1.0 - share)
            if left.get(host) != rate:  # the log: what the job was left, as replay models it
                self.log.append((time.monotonic() - self._t0, host, rate))
                left[host] = rate

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
        played_as = dict(cotenant="flow", cotenant_bytes=self.flow_bytes) if self.flows_played else {}
        return conditions_record(
            self.scenario_played, self.base_rate, len(self.conditions), self.started_unix, self.log, **played_as
        )
