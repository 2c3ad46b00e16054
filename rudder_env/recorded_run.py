"""One trainer rank of a recorded run, loaded and checked once: what ``rudder/Replay-v0`` replays.

:class:`RecordedRun` reads a trace folder (:class:`rudder.traces.Trace`) for one rank, refuses a rank with nothing to
replay, fills the options a trace recorded before they existed with the values such a run had, and derives what the
recording implies: per-minibatch remote ids, rows and seconds, the fetch-time model fitted to the recorded pulls
(:class:`~rudder.env.timing.FetchTimeModel`), the recorded background arrivals, the sampled bytes that sampling ahead
is measured in, and the partition structure the lookahead and the VIP fill need. It holds no episode state: the
driver (:class:`~rudder.env.replay_env.ReplayEnv`) steps through it, and copies of an episode share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rudder.env.defaults import RECORDED_BEFORE_OPTION
from rudder.env.lookahead import SamplerLookahead
from rudder.env.sample_ahead import SampleAhead, sampled_bytes
from rudder.env.scenario import ScenarioError, conditions_met
from rudder.env.settings import check, check_optional
from rudder.env.timing import CopyTimeModel, FetchTimeModel
from rudder.traces import Trace, TraceError
from rudder.traces.schema import CONDITIONS_FILE


@dataclass(frozen=True)
class ReplaySettings:
    """The buffer and decision settings one replay of a recorded run plays with (:meth:`RecordedRun.settings`):
    each the one asked for, else the recorded run's."""

    k: int  # ranked candidates per decision (the action size)
    alpha: float  # score decay per minibatch
    period: int  # minibatches per decision window
    admit_on_miss: bool
    buffer_fraction: float  # of the halo nodes
    capacity: int  # the buffer's slots: round(buffer_fraction * halo nodes)
    buffer_init: str  # "recorded": the recorded initial ids (only at the recorded capacity), else a fill's name
    prefetch: str  # "inline" or "background"
    sample_ahead: SampleAhead  # how far the live trainer had sampled ahead


class RecordedRun:
    """One rank of a recorded run (read-only once built).

    Args:
        trace: a trace folder or a :class:`~rudder.traces.Trace`.
        rank: the trainer rank to read; a rank whose recording holds no minibatch is refused (:class:`TraceError`).

    Attributes:
        trace, rank_trace: the trace and this rank's part of it.
        config: the run's options as recorded (``trace.meta["config"]``); :meth:`option` fills the missing ones.
        played: the buffer settings the recording's agent played with (``trace.meta["buffer"]``).
        num_nodes, halo_ids, halo_degree: the graph's node count and this rank's remote neighbourhood.
        recorded_capacity: the recorded buffer's slots (-1 where the trace does not say).
        fanouts, batch_size: the sampler's settings.
        local_rows, sample_s, compute_s, fetch_s, epoch_of: per-minibatch arrays, as recorded.
        recorded_arrived, recorded_stall_s: per minibatch, background-prefetched rows delivered and the demand pull's
            wait behind a chunk (None for a run that prefetched inline).
        initial_fill: ``(remote rows, seconds)`` of the timed initial fill, or None.
        time_model: the fetch-time model fitted to the recorded demand pulls (and the initial fill).
        copy_model: for a run recorded on a GPU, the host-to-device copy's time per minibatch (:class:`CopyTimeModel`),
            modelled apart from the pulls; None for a CPU recording.
        buffer_on_device: whether the recording held the buffer's rows on the GPU (then only pulled rows are copied).
        cum_bytes: cumulative sampled bytes (``cum_bytes[i]``: of minibatches ``0..i-1``), what a sample-ahead
            budget is measured in (:mod:`rudder.env.sample_ahead`).
        per_epoch: minibatches per epoch.
    """

    def __init__(self, trace, rank: int = 0):
        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        self.rank = rank
        self.rank_trace = self.trace.rank(rank)
        if self.rank_trace.num_minibatches == 0:
            raise TraceError(
                f"rank {rank} of trace {self.trace.directory} holds no minibatch (the run ended before "
                f"its first chunk was written): nothing to replay"
            )
        self.config = self.trace.meta.get("config", {})
        self.played = self.trace.meta.get("buffer") or {}
        rmeta = self.rank_trace.meta
        self.num_nodes = int(rmeta["num_nodes"])
        self.recorded_capacity = int(rmeta.get("capacity", -1))
        self.halo_ids = np.asarray(self.rank_trace.static["halo_ids"], dtype=np.int64)
        self.halo_degree = np.asarray(self.rank_trace.static["halo_degree"])
        self.fanouts = [int(x) for x in str(self.option("fanout")).split(",")]
        self.batch_size = int(self.option("batch_size"))
        table = self.rank_trace.table()
        self.local_rows = table["local_rows"].to_numpy()
        self.sample_s = table["sample_s"].to_numpy(dtype=np.float64)
        self.compute_s = table["compute_s"].to_numpy(dtype=np.float64)
        self.fetch_s = table["fetch_s"].to_numpy(dtype=np.float64)
        self.epoch_of = table["epoch"].to_numpy()
        recorded = self.rank_trace.prefetch_table()  # background recordings: arrivals and stalls per minibatch
        self.recorded_arrived = recorded["arrived"].to_numpy() if recorded is not None else None
        self.recorded_stall_s = recorded["stall_s"].to_numpy(np.float64) if recorded is not None else None
        fill = rmeta.get("initial_fill_rows")
        self.initial_fill = (int(fill), float(rmeta["initial_fill_s"])) if fill else None
        # recorded on a GPU: the host-to-device copy, modelled apart (a CPU recording's columns are not read)
        self._device = self.rank_trace.device_table() if self.config.get("device", "cpu") != "cpu" else None
        self.copy_model = (
            None if self._device is None else CopyTimeModel.fit(self._device["h2d_rows"], self._device["h2d_s"])
        )
        self.buffer_on_device = bool(self.config.get("buffer_on_device", False))
        # wall clock at the rank's first minibatch and at the end of its training (recorded since --scenario)
        self.start_unix, self.end_unix = rmeta.get("train_start_unix"), rmeta.get("train_end_unix")
        self.recorded_conditions = self._conditions_met(rmeta)
        self.time_model = self._fit_time_model(table)
        ids = self.remote_ids
        rows = self.local_rows + np.fromiter((x.size for x in ids), np.int64, len(ids))
        self.cum_bytes = np.concatenate([[0], np.cumsum(sampled_bytes(rows))])
        self.per_epoch = int(np.count_nonzero(self.epoch_of == self.epoch_of[0]))
        self._decisions = None
        self._structure = None

    def settings(
        self,
        candidates: int | None = None,
        alpha: float | None = None,
        period: int | None = None,
        admit_on_miss: bool | None = None,
        buffer_fraction: float | None = None,
        buffer_init: str = "recorded",
        prefetch: str | None = None,
        sample_ahead=None,
    ) -> ReplaySettings:
        """The settings of a replay asking for these (checked, :func:`rudder.env.settings.check`; ``None``: the
        recorded run's). ``buffer_init="recorded"`` at another capacity than the recording's fills the buffer the
        way the recorded agent did. Sampling ahead does not change the batches, so any count, budget or ``"epoch"``
        is emulated from the recorded ids."""
        candidates, alpha = check_optional("candidates", candidates), check_optional("alpha", alpha)
        period, admit_on_miss = check_optional("period", period), check_optional("admit_on_miss", admit_on_miss)
        buffer_fraction = check_optional("buffer_fraction", buffer_fraction)
        buffer_init = check("buffer_init", buffer_init, extra_choices=("recorded",))
        prefetch = check_optional("prefetch", prefetch)
        fraction = float(buffer_fraction if buffer_fraction is not None else self.config.get("buffer_fraction"))
        capacity = int(round(fraction * self.halo_ids.size))
        if buffer_init == "recorded" and capacity != self.recorded_capacity:
            buffer_init = self.played_buffer_init
        return ReplaySettings(
            k=int(candidates if candidates is not None else self.option("candidates")),
            alpha=float(alpha if alpha is not None else self.option("alpha")),
            period=int(period if period is not None else self.option("period")),
            admit_on_miss=bool(admit_on_miss if admit_on_miss is not None else self.option("admit_on_miss")),
            buffer_fraction=fraction,
            capacity=capacity,
            buffer_init=buffer_init,
            prefetch=check("prefetch", prefetch or self.option("prefetch")),
            sample_ahead=SampleAhead.parse(
                sample_ahead if sample_ahead is not None else self.option("sample_ahead"), "sample_ahead"
            ),
        )

    def option(self, name: str):
        """The recorded run's option ``name``, or for a trace recorded before it existed, the value such a run had
        (:data:`rudder.env.defaults.RECORDED_BEFORE_OPTION`)."""
        return self.config.get(name, RECORDED_BEFORE_OPTION[name])

    @property
    def remote_ids(self) -> list[np.ndarray]:
        """Per minibatch, the global ids of the remote rows it needed (read once and kept by the rank's trace)."""
        return self.rank_trace.minibatch_ids()

    @property
    def num_minibatches(self) -> int:
        return len(self.local_rows)

    @property
    def initial_ids(self) -> np.ndarray:
        """The ids the recorded buffer started with."""
        return self.rank_trace.static["initial_ids"]

    @property
    def played_buffer_init(self) -> str:
        """The initial fill the recorded agent played with (its settings may override the run's ``--buffer-init``)."""
        return self.played.get("buffer_init") or self.option("buffer_init")

    def _conditions_met(self, rmeta: dict):
        """The link rates this rank met live (a scenario played on the run's emulated links, the trace's
        ``conditions.json``) on its replay clock, as a scenario; None for a run on a link left as it was."""
        record = self.trace.conditions
        if record is None:
            return None
        source = str(self.trace.directory / CONDITIONS_FILE)
        try:
            return conditions_met(record, int(rmeta.get("partition", self.rank)), self.start_unix, source)
        except ScenarioError as exc:
            raise TraceError(str(exc)) from None

    def recorded_clock(self) -> np.ndarray:
        """Seconds from the first minibatch to the start of each, as recorded: sampling, fetch and compute summed,
        stretched evenly to the rank's training wall time where the trace has it (``train_start_unix`` and
        ``train_end_unix``: what the three leave out, the agent's turn and the buffer's bookkeeping, adds up over a
        run); where each recorded pull sits on the clock the recorded conditions are given on."""
        busy = self.sample_s + self.fetch_s + self.compute_s
        start, end = self.start_unix, self.end_unix
        if start is not None and end is not None and end - start > busy.sum() > 0:
            busy = busy * ((end - start) / busy.sum())
        return np.concatenate([[0.0], np.cumsum(busy)[:-1]])

    def _fit_time_model(self, table) -> FetchTimeModel:
        """The fetch-time model fitted to the recorded demand pulls: without delivered chunks and the wait behind
        them; the initial fill (a pull of remote rows only, which pins their cost) as one more sample. Under
        recorded conditions a pull's remote rows count divided by the link's mean rate factor while it ran, so that
        ``c_remote`` is the cost per row at the base rate (the rate the conditions' factors multiply)."""
        local, remote, secs = self.local_rows, table["remote_fetched"].to_numpy(), table["fetch_s"].to_numpy()
        if self.recorded_arrived is not None:
            remote, secs = remote - self.recorded_arrived, secs - self.recorded_stall_s
        if self._device is not None:  # the pull alone, without the host-to-device copy
            secs = secs - self._device["h2d_s"].to_numpy()
        fill_rate = 1.0
        if self.recorded_conditions is not None:
            met = self.recorded_conditions.conditions(0)  # the rank's own host's (every host's, as given)
            mean_rate = [  # the link's mean rate over the recorded pull (it may span a change)
                (met.work_by(t + f) - met.work_by(t)) / f if f > 0 else met.rate_at(t)
                for t, f in zip(self.recorded_clock(), self.fetch_s)
            ]
            remote = remote / np.asarray(mean_rate)
            fill_rate = met.rate_at(0.0)
        if self.initial_fill is not None:
            local, remote = np.append(local, 0), np.append(remote, self.initial_fill[0] / fill_rate)
            secs = np.append(secs, self.initial_fill[1])
        return FetchTimeModel.fit(local, remote, secs, remote_floor=self.remote_floor_s)

    @property
    def remote_floor_s(self) -> float:
        """The least seconds a remote row can take over the recorded link (at the base rate, under recorded
        conditions): its bytes over the link's rate, for a run on emulated hosts whose trace records both
        (``meta.network``); 0 where the link is not known (a real cluster's)."""
        net = self.trace.meta.get("network") or {}
        bits, row_bytes = net.get("link_bits_per_s"), net.get("row_bytes")
        return 8.0 * float(row_bytes) / float(bits) if bits and row_bytes else 0.0

    def decisions(self):
        """The recorded prefetch decisions (a table with ``minibatch`` and ``ids``), or None; read once."""
        if self._decisions is None:
            self._decisions = (self.rank_trace.decisions(),)
        return self._decisions[0]

    def structure(self) -> SamplerLookahead | None:
        """The partition structure around this rank's seeds (:class:`SamplerLookahead`, read once), or None for a
        trace recorded without it."""
        if self._structure is None:
            self._structure = (SamplerLookahead.from_static(self.rank_trace.static, self.num_nodes),)
        return self._structure[0]

    def lookahead(self) -> tuple[SamplerLookahead, list[np.ndarray]]:
        """The partition structure and each minibatch's seed node ids: what the lookahead ranking scores from;
        a trace recorded without them is refused in one line."""
        structure, seeds = self.structure(), self.rank_trace.minibatch_seeds()
        if structure is None or seeds is None:
            raise ValueError(
                f"ranking='lookahead' needs a trace recorded with seeds and partition structure; "
                f"{self.trace.directory} has none (re-record it with this rudder)"
            )
        return structure, seeds

    def vip_structure(self) -> SamplerLookahead:
        """The partition structure the VIP fill (:mod:`rudder.env.vip`) computes from; a trace recorded without it
        is refused in one line."""
        structure = self.structure()
        if structure is None:
            raise ValueError(
                f"buffer_init='vip' needs a trace recorded with partition structure; "
                f"{self.trace.directory} has none (re-record it with this rudder)"
            )
        return structure

    def touched_ids(self, lookahead: SamplerLookahead | None = None) -> np.ndarray:
        """Every global id a replay of this rank can name, sorted: the remote ids it needs, its halo, the recorded
        initial fill and decisions, and the remote nodes ``lookahead`` scores. Built chunk by chunk (unique per
        group of minibatches, then once over those)."""
        parts, group = [], 64
        for i in range(0, len(self.remote_ids), group):
            batch = self.remote_ids[i : i + group]
            if batch:
                parts.append(np.unique(np.concatenate(batch)))
        parts += [self.halo_ids, np.asarray(self.rank_trace.static.get("initial_ids", []), dtype=np.int64)]
        decisions = self.decisions()
        if decisions is not None and len(decisions):
            parts += [np.asarray(x, dtype=np.int64) for x in decisions["ids"]]
        if lookahead is not None:
            parts.append(lookahead.remote_ids)
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    @property
    def seconds_per_minibatch(self) -> float:
        """Mean measured seconds per minibatch (sampling + fetch + compute)."""
        n = max(self.num_minibatches, 1)
        return float((self.sample_s.sum() + self.compute_s.sum() + self.fetch_s.sum()) / n)
