"""``rudder/Replay-v0``: the prefetch decision game replayed offline from a recorded trace, exactly."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
from rudder.env.buffer import PrefetchBuffer, initial_ids
from rudder.env.defaults import DEFAULTS
from rudder.env.episode import MinibatchRecord, PrefetchEnv, PrefetchEpisode, RunFacts
from rudder.env.lookahead import SamplerLookahead
from rudder.env.ranking import make_ranking
from rudder.env.recorded_run import RecordedRun
from rudder.env.scenario import Scenario
from rudder.env.settings import check, check_link_levels
from rudder.env.spaces import action_space, observation_space
from rudder.env.timing import BackgroundLink
from rudder.env.vip import vertex_inclusion_probability

# background prefetch: what the replay of arrivals tracks; the replay clock (seconds since the first minibatch)
_STATE = ("_link", "_due", "_follow", "_decisions_seen", "_clock_s")


class _Driver:
    """An iterator that calls ``next_record`` every time and is never exhausted for good (unlike a generator): a
    replayed episode can be swapped for a copy and go on."""

    def __init__(self, next_record):
        self.next_record = next_record

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_record()


class _LocalScores:
    """A :class:`SamplerLookahead` whose scores name dense ids (positions in ``id_map``) instead of global ids."""

    def __init__(self, lookahead: SamplerLookahead, id_map: np.ndarray):
        self.lookahead, self.id_map = lookahead, id_map

    def scores(self, upcoming, discount: float = 0.9):
        ids, score = self.lookahead.scores(upcoming, discount)
        return np.searchsorted(self.id_map, ids), score


class ReplayEnv(PrefetchEnv):
    """Prefetching for one trainer rank of a recorded run, driven by the trace instead of DistDGL.

    The trace holds every remote node id each minibatch of that rank needed (:class:`RecordedRun` reads and checks
    it); the env pushes them through the same :class:`~rudder.env.buffer.PrefetchBuffer` the live trainer uses, so
    with the same buffer settings and the same decisions it sees the same hits, misses and remote rows fetched as
    the live run, hundreds of times faster.

    ## Action Space
    ``MultiBinary(K)``: bit ``i`` admits the ``i``-th ranked candidate (``info["candidate_ids"][i]``, the
    non-resident remote nodes missed most often, decayed). The set is fetched with the next minibatch's misses and
    replaces the lowest-score slots. Bits past ``info["n_candidates"]`` are ignored.

    With ``levels`` (e.g. ``(0, 0.125, 0.25, 0.5, 1)``): ``Discrete(len(levels))``, action ``i`` prefetches
    ``levels[i]`` times the link budget of the next window from the top of the ranked candidates
    (:class:`~rudder.env.episode.PrefetchEpisode`); ``info["choices"]`` says what each would do.

    ## Observation Space
    A ``Dict`` of float32 boxes in [0, 1]: buffer state, slot-score histogram, sampler and traffic statistics of
    the last window, the top-K candidate scores, the K lowest resident scores, progress
    (see :mod:`rudder.env.spaces`). Wrap with ``gymnasium.wrappers.FlattenObservation`` for a ``Box``.

    ## Rewards
    ``reward="traffic"``: minus remote rows fetched (on demand + prefetched) over remote rows sampled in the window.
    ``reward="time"``: minus the window's modelled seconds: recorded sampling and compute time plus fetch time from
    a model fitted to the trace's own measurements (``info["time_model"]`` reports its fit).

    ## Starting State
    The buffer filled as in the recorded run (its recorded initial ids) unless ``buffer_fraction``/``buffer_init``
    ask otherwise; ``reset`` runs no minibatch, so the first observation is deterministic.

    ## Episode End
    Terminates when the trace's minibatches are exhausted. Never truncates.

    ## Arguments
    ``trace`` (folder, :class:`traces.Trace` or :class:`RecordedRun`), ``rank`` (trainer rank in the trace),
    ``candidates`` (K), ``reward``, and buffer overrides ``buffer_fraction``, ``buffer_init`` (``recorded``,
    ``degree``, ``random``, ``empty``, ``vip``: highest vertex inclusion probability, :mod:`rudder.env.vip`),
    ``alpha``, ``period``, ``admit_on_miss`` (default: the recorded run's); ``ranking``
    (``"misses"``, or ``"lookahead"`` when the trace recorded seeds and partition structure: see
    :mod:`rudder.env.ranking`) with ``lookahead_horizon`` and ``lookahead_discount``; ``sample_ahead`` (how far
    the live trainer had sampled ahead: a count of minibatches, a budget of sampled bytes such as ``"64MB"``, or
    ``"epoch"``, :mod:`rudder.env.sample_ahead`; default the recorded run's: what the lookahead knows exactly);
    ``sampled_only`` (lookahead ranking from the sampled-ahead minibatches alone, no partition structure or
    seeds: e.g. a synthetic trace, :mod:`rudder.traces.synthetic`); ``dense_ids`` (default True: the buffer and
    rankings index the nodes this rank touches, renumbered densely in id order, so memory follows the ids a rank
    touches, not the graph; decisions are the same either way, and agents see global ids in ``info`` and give
    global ids to ``apply``);
    ``prefetch``
    (``"inline"`` or ``"background"``, default the recorded run's) and ``follow_recorded``: with background
    prefetch, rows arrive when the recording says while the decisions are the recorded ones (so a run replayed
    with its own decisions is exact), else when the link model says (:class:`~rudder.env.timing.BackgroundLink`);
    ``False`` always models them; ``scenario`` (a :class:`~rudder.env.scenario.Scenario` or the path of a scenario
    file): exogenous conditions this rank meets on the replay clock instead of the recorded link (time-varying link
    rate, co-tenant traffic, a straggler: :mod:`rudder.env.scenario`); modelled times are then synthetic
    (``synthetic``), and arrivals always come from the link model. Without one, a trace recorded live under a
    scenario (its ``conditions.json``) is replayed under the rates its rank met, on its replay clock
    (:attr:`RecordedRun.recorded_conditions`): not synthetic.

    Attributes:
        run: the :class:`RecordedRun` replayed (shared by every copy of an episode).
        settings: the :class:`~rudder.env.recorded_run.ReplaySettings` in force, each the argument or else the
            recorded run's; also as attributes: ``k``, ``alpha``, ``period``, ``admit_on_miss``,
            ``buffer_fraction``, ``capacity``, ``buffer_init``, ``prefetch``, ``sample_ahead``.
        reward, ranking, levels: as given.
    """

    def __init__(
        self,
        trace,
        rank: int = 0,
        candidates: int | None = None,
        reward: str = DEFAULTS.reward,
        buffer_fraction: float | None = None,
        buffer_init: str = "recorded",
        alpha: float | None = None,
        period: int | None = None,
        admit_on_miss: bool | None = None,
        ranking: str = DEFAULTS.ranking,
        lookahead_horizon: int | None = None,
        lookahead_discount: float | None = None,
        prefetch: str | None = None,
        follow_recorded: bool = True,
        levels=None,
        sample_ahead=None,
        dense_ids: bool = True,
        sampled_only: bool = False,
        scenario=None,
    ):
        super().__init__()
        self.levels = None if levels is None else check_link_levels(levels)
        self.reward = check("reward", reward)
        self.ranking = check("ranking", ranking)
        self.follow_recorded = follow_recorded
        self.lookahead_horizon, self.lookahead_discount = lookahead_horizon, lookahead_discount
        self.sampled_only = bool(sampled_only)
        if isinstance(trace, RecordedRun):  # already loaded (e.g. shared by the envs of one rank)
            trace = trace if trace.rank == rank else trace.trace
        self.run = run = trace if isinstance(trace, RecordedRun) else RecordedRun(trace, rank)
        self.scenario, self.conditions, self._model, self._cpu = None, None, None, 1.0
        self.synthetic = scenario is not None
        if scenario is None:
            scenario = run.recorded_conditions  # the conditions the live run met, where it met played ones
        if scenario is not None:
            self._apply_scenario(scenario)
        self.rank = rank
        self.settings = run.settings(
            candidates, alpha, period, admit_on_miss, buffer_fraction, buffer_init, prefetch, sample_ahead
        )
        for f in dataclasses.fields(self.settings):  # k, alpha, period, ... as attributes of the env
            setattr(self, f.name, getattr(self.settings, f.name))
        self._vip = None
        if self.buffer_init == "vip":
            self._vip = vertex_inclusion_probability(run.vip_structure(), run.batch_size)
        self._lookahead, self._seeds = None, None
        if self.ranking == "lookahead" and not self.sampled_only:
            self._lookahead, self._seeds = run.lookahead()
        self._ids = run.remote_ids  # per minibatch, the remote ids in the buffer's id space
        self._id_map = None  # dense ids (see dense_ids): sorted global ids of every node this rank touches
        self._scorer = self._lookahead
        if dense_ids:
            self._id_map = run.touched_ids(self._lookahead)
            self._ids = [np.searchsorted(self._id_map, x).astype(np.int32) for x in self._ids]
            if self._lookahead is not None:
                self._scorer = _LocalScores(self._lookahead, self._id_map)
        self.observation_space = observation_space(self.k)
        self.action_space = action_space(self.k, self.levels)

    # the recorded run's facts, under the names agents and tools read
    source = property(lambda self: self.run.trace, doc="The :class:`~rudder.traces.Trace` replayed.")
    rank_trace = property(lambda self: self.run.rank_trace, doc="The replayed rank's part of the trace.")
    time_model = property(
        lambda self: self.run.time_model if self.scenario is None else self._model,
        doc="The fetch-time model fitted to the recording (rows widened by a scenario).",
    )
    copy_model = property(lambda self: self.run.copy_model, doc="A GPU recording's host-to-device copy model, or None.")
    num_nodes = property(lambda self: self.run.num_nodes, doc="Nodes in the graph.")
    halo_ids = property(lambda self: self.run.halo_ids, doc="Global ids of this rank's remote neighbours.")
    fanouts = property(lambda self: self.run.fanouts, doc="The sampler's fanout per layer.")
    batch_size = property(lambda self: self.run.batch_size, doc="Seed nodes per minibatch.")

    def _local(self, ids) -> np.ndarray:
        """The buffer's ids of global ``ids`` (every one among :meth:`RecordedRun.touched_ids`)."""
        ids = np.asarray(ids, dtype=np.int64)
        return ids if self._id_map is None else np.searchsorted(self._id_map, ids)

    @property
    def buffer_nodes(self) -> int:
        """Size of the id space the buffer and rankings index: the nodes this rank touches with dense ids, else
        the graph's."""
        return self.num_nodes if self._id_map is None else int(self._id_map.size)

    def _new_buffer(self) -> PrefetchBuffer:
        buf = PrefetchBuffer(
            self.capacity,
            self.buffer_nodes,
            alpha=self.alpha,
            period=self.period,
            admit_on_miss=self.admit_on_miss,
            prefetch=self.prefetch,
        )
        run = self.run
        if self.buffer_init == "recorded":
            ids = run.initial_ids
        else:
            seed = int(self.np_random.integers(2**31))
            ids = initial_ids(self.buffer_init, run.halo_ids, run.halo_degree, self.capacity, seed, vip=self._vip)
        buf.fill(self._local(ids))
        return buf

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        run = self.run
        facts = dict(
            graph=run.config.get("graph"),
            parts=run.config.get("parts"),
            partitioning=run.config.get("partition"),
            rank=self.rank,
            num_nodes=run.num_nodes,
            source=f"trace {run.trace.directory}",
        )
        buffer = self._new_buffer()
        ranking = make_ranking(
            self.ranking,
            buffer,
            lookahead=self._scorer,
            upcoming=self._upcoming,
            sampled_ahead=self._sampled_ahead,
            horizon=self.lookahead_horizon,
            discount=self.lookahead_discount,
        )
        run_facts = RunFacts(
            run.num_minibatches,
            run.halo_ids.size,
            run.fanouts,
            run.batch_size,
            facts=facts,
            initial_fill=run.initial_fill,
        )
        self.episode = PrefetchEpisode(
            buffer, ranking, self.k, run_facts, reward=self.reward, levels=self.levels, id_map=self._id_map
        )
        self._records = _Driver(self._replay)
        self._clock_s = 0.0
        if self.prefetch == "background":
            self._link = BackgroundLink(self.time_model, self.conditions)
            self._due: list[np.ndarray] = []  # chunks the model delivers before the next minibatch
            self._follow = self.follow_recorded and self.scenario is None and self._as_recorded()
            self._decisions_seen = 0
            self.episode.on_apply = self._check_decision
        obs, info = self._first_observation()
        info["time_model"] = self.time_model.as_dict()
        return obs, info

    def snapshot(self) -> dict:
        """The episode's whole mutable state (buffer, ranking, link model, where the replay is), copied: play on
        from it with :meth:`restore` as often as needed, e.g. to try each action from the same decision. The
        trace and the partition structure are shared, not copied."""
        return self._copy_state(dict(episode=self.episode, **{k: getattr(self, k) for k in _STATE if hasattr(self, k)}))

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`snapshot` (which stays unchanged: a copy of it is restored)."""
        for key, value in self._copy_state(state).items():
            setattr(self, key, value)

    def level_seconds(self, horizon: int) -> list[float]:
        """Modelled seconds of playing each level (``levels=``) for the next ``horizon`` windows from the current
        decision, tried from the same state, which is left as it was: what the best-level oracle and the LLM's
        example mining compare."""
        if self.levels is None:
            raise ValueError("level_seconds needs an env with levels= (link-budget level actions)")
        start = self.snapshot()
        out = []
        for action in range(len(self.levels)):
            self.restore(start)
            seconds = 0.0
            for _ in range(horizon):
                _, _, over, _, info = self.step(action)
                w = info["window"]
                seconds += w["sample_s"] + w["fetch_s"] + w["compute_s"]
                if over:
                    break
            out.append(seconds)
        self.restore(start)
        return out

    def _copy_state(self, state: dict) -> dict:
        run = self.run
        memo = {id(self): self, id(run): run, id(run.trace): run.trace, id(run.rank_trace): run.rank_trace}
        for shared in (self._lookahead, self._scorer, self._id_map):
            if shared is not None:
                memo[id(shared)] = shared
        return copy.deepcopy(state, memo)

    def _replay(self) -> MinibatchRecord:
        """The driver's next minibatch: the next recorded remote ids through the buffer, fetch time modelled.

        It reads the episode afresh every time, so an episode swapped in (e.g. a deep copy to try an option from the
        same state) continues from its own position."""
        ep, run = self.episode, self.run
        if ep.done:
            raise StopIteration
        i = ep.minibatches
        background = self.prefetch == "background"
        if background:
            self._deliver(ep.buffer, i)
        _, counts = ep.buffer.lookup(self._ids[i])
        stall_s = 0.0
        if self.conditions is not None:  # a scenario: the link's rate follows its timeline on the replay clock
            demand_s, stall_s = self._fetch_under_conditions(i, counts.remote_fetched - counts.arrived)
        else:
            demand_s = float(run.time_model.predict(run.local_rows[i], counts.remote_fetched - counts.arrived))
            if background and self._follow:  # the recording's own timing
                stall_s = float(run.recorded_stall_s[i])
            elif background:
                stall_s, self._due = self._link.minibatch(run.sample_s[i] + run.compute_s[i])
        sample_s, compute_s = float(run.sample_s[i]) * self._cpu, float(run.compute_s[i]) * self._cpu
        copy_s, copy_rows = None, 0
        if run.copy_model is not None:
            copy_rows = int(run.local_rows[i]) + (
                counts.remote_fetched if run.buffer_on_device else counts.remote_sampled
            )
            copy_s = float(run.copy_model.predict(copy_rows))
        self._clock_s += sample_s + compute_s + demand_s + stall_s + (copy_s or 0.0)
        return MinibatchRecord(
            epoch=int(run.epoch_of[i]),
            index=i,
            remote_ids=self._ids[i],
            local_rows=int(run.local_rows[i]),
            sample_s=sample_s,
            fetch_s=demand_s + stall_s + (copy_s or 0.0),
            fetch_rows=int(run.local_rows[i]) + counts.remote_fetched - counts.arrived,
            compute_s=compute_s,
            counts=counts,
            stall_s=stall_s,
            h2d_s=copy_s,
            h2d_rows=copy_rows,
        )

    def _apply_scenario(self, scenario) -> None:
        """Replay under ``scenario``: this rank's conditions (:mod:`rudder.env.scenario`); wider rows scale the
        per-row costs and a straggler its sampling and compute here, the link rate minibatch by minibatch."""

        self.scenario = scenario if isinstance(scenario, Scenario) else Scenario.load(scenario)
        self.conditions = self.scenario.conditions(self.run.rank)
        f, m = self.conditions.feature_bytes_factor, self.run.time_model
        self._model = dataclasses.replace(m, c_local=m.c_local * f, c_remote=m.c_remote * f)
        self._cpu = self.conditions.cpu_factor

    def _fetch_under_conditions(self, i: int, remote_rows: int) -> tuple[float, float]:
        """Demand-pull and stall seconds of minibatch ``i`` under the scenario's conditions, from the replay
        clock; with background prefetch, the chunks the link delivers meanwhile go to ``_due``."""
        m, cond, run = self._model, self.conditions, self.run

        def demand_s(t: float) -> float:
            return m.c0 + m.c_local * float(run.local_rows[i]) + cond.transfer_s(t, m.c_remote * remote_rows)

        if self.prefetch != "background":
            return demand_s(self._clock_s), 0.0
        busy_s = float(run.sample_s[i] + run.compute_s[i]) * self._cpu
        stall_s, demand, self._due = self._link.minibatch_at(self._clock_s, demand_s, busy_s)
        return demand, stall_s

    def cancel_queued(self) -> int:
        """Background prefetch: drop the chunks requested but not started yet (their rows become candidates
        again); returns the rows dropped. Inline prefetch: drop the pending set."""
        buf = self.episode.buffer
        if self.prefetch != "background":
            n, buf.pending = int(buf.pending.size), buf.pending[:0]
            return n
        dropped = self._link.cancel()
        if buf.queue.size:
            dropped.append(buf.queue)
            buf.queue = buf.queue[:0]
        for ids in dropped:
            buf.requested[ids] = False
        return int(sum(ids.size for ids in dropped))

    @property
    def clock_s(self) -> float:
        """Modelled seconds of the episode so far (the replay clock a scenario's timelines follow)."""
        return self._clock_s

    def _deliver(self, buffer: PrefetchBuffer, i: int) -> None:
        """Background prefetch before minibatch ``i``: install the chunks that have arrived — as the recording
        delivered them while the decisions are the recorded ones, else as the link model says — then request
        what decisions queued since."""
        if self._follow:
            need = int(self.run.recorded_arrived[i])
            while need > 0 and self._link.queue:
                ids = self._link.queue.pop(0)[0]
                buffer.arrive(ids)
                need -= ids.size
            if need != 0:  # chunk boundaries differ from the recording's: model from here on
                self._follow = False
            self._due = []
        else:
            for ids in self._due:
                buffer.arrive(ids)
            self._due = []
        while (ids := buffer.take()).size:
            self._link.request(ids)

    def _as_recorded(self) -> bool:
        """Whether this episode's buffer starts as the recording's did, so that its arrivals can be followed."""
        run = self.run
        return (
            run.recorded_arrived is not None
            and self.buffer_init == "recorded"
            and self.capacity == run.recorded_capacity
            and self.alpha == run.config.get("alpha")
            and self.period == run.config.get("period")
            and self.admit_on_miss == bool(run.played.get("admit_on_miss"))
            and self.ranking == run.played.get("ranking")
        )

    def _check_decision(self, minibatch: int, ids: np.ndarray) -> None:
        """Stop following the recorded arrivals as soon as a decision differs from the recording's."""
        if not self._follow:
            return
        d = self.run.decisions()
        j = self._decisions_seen
        self._decisions_seen += 1
        if j >= len(d) or int(d["minibatch"].iloc[j]) != minibatch or not np.array_equal(d["ids"].iloc[j], ids):
            self._follow = False

    def _known(self, done: int, first: int, last: int, values: list) -> list:
        """``values[first:last]`` as far as the epochs whose seeds the live trainer had shuffled after ``done``
        minibatches: at the start only the first epoch; then every epoch up to the one of the last minibatch
        sampled (:meth:`SampleAhead.last_sampled`: the trainer samples ahead across epoch boundaries)."""
        n, run = len(values), self.run
        epoch_of = run.epoch_of
        known_epoch = (
            epoch_of[0] if done < 1 else epoch_of[self.sample_ahead.last_sampled(done, run.cum_bytes, run.per_epoch)]
        )
        out = []
        for j in range(first, min(last, n)):
            if epoch_of[j] > known_epoch:
                break
            out.append(values[j])
        return out

    def _upcoming(self, done: int, horizon: int) -> list[np.ndarray]:
        """Seeds of the next ``horizon`` minibatches that the live trainer knew after ``done`` minibatches (DGL
        shuffles an epoch's seeds when its first minibatch is sampled)."""
        if self._seeds is None:
            return []
        return self._known(done, done, done + horizon, self._seeds)

    def _sampled_ahead(self, done: int) -> list[np.ndarray]:
        """Remote ids of the minibatches the live trainer had sampled beyond the next one after ``done``
        minibatches, as far as ``sample_ahead`` reaches (a count, a budget of sampled bytes or an epoch; none
        before the first minibatch)."""
        if done < 1:
            return []
        return self._ids[done + 1 : self.sample_ahead.known_end(done, self.run.cum_bytes, self.run.per_epoch)]

    def sample_ahead_stats(self) -> dict:
        """What sampling ahead as ``sample_ahead`` knew and cost over the whole trace: minibatches known exactly
        beyond the next one (mean, max), the sampled bytes held for them at most (MB; a budget also holds the one
        sampled minibatch that did not fit: ``held_peak_mb``), and the recorded sampling seconds moved earlier (of
        minibatches sampled before the previous one trained)."""
        run, sa = self.run, self.sample_ahead
        n, cum, per_epoch = run.num_minibatches, run.cum_bytes, run.per_epoch
        known, known_mb, held_mb, moved_s = [], 0.0, 0.0, 0.0
        for done in range(1, n):
            end = sa.known_end(done, cum, per_epoch)
            last = sa.last_sampled(done, cum, per_epoch)
            known.append(max(end - done - 1, 0))
            known_mb = max(known_mb, (cum[end] - cum[min(done + 1, n)]) / 2**20)
            held_mb = max(held_mb, (cum[last + 1] - cum[min(done + 1, n)]) / 2**20)
        for j in range(1, n):
            if sa.last_sampled(j - 1, cum, per_epoch) >= j and j - 1 >= 1:
                moved_s += float(run.sample_s[j])
        return dict(
            sample_ahead=str(sa),
            known_mean=float(np.mean(known)) if known else 0.0,
            known_max=int(max(known)) if known else 0,
            known_peak_mb=round(known_mb, 3),
            held_peak_mb=round(held_mb, 3),
            sample_s_moved=round(moved_s, 4),
            sample_s_total=round(float(run.sample_s.sum()), 4),
        )

    @property
    def live_seconds_per_minibatch(self) -> float:
        """Mean measured seconds per minibatch of the recorded run (to turn decision latency into minibatches)."""
        return self.run.seconds_per_minibatch
