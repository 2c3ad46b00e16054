"""The decision game both environments play: one episode's state, and the one loop that runs a decision window.

An episode is one training run (or one trace). A *driver* yields one :class:`MinibatchRecord` per minibatch after
pushing its remote ids through the buffer: the live trainer (real training) or the trace (replay). Every ``period``
minibatches the env calls :meth:`PrefetchEpisode.observe`, hands the observation to the agent, and turns its
``MultiBinary(K)`` action into a prefetch set with :meth:`PrefetchEpisode.decide`, or, with ``levels``, its
``Discrete`` choice of how much the link should bring (:meth:`PrefetchEpisode.choices`). :class:`PrefetchEnv` is the
Gymnasium env both ``rudder/Live-v0`` and ``rudder/Replay-v0`` derive from: the same ``step`` and ``run_window`` on
either driver, so the same agent sees the same thing live and offline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from rudder.env.buffer import EMPTY, PREFETCH_CHUNK, MinibatchCounts, PrefetchBuffer
from rudder.env.contract import Choice, DecisionInfo, LinkInfo
from rudder.env.defaults import DEFAULTS
from rudder.env.ranking import Ranked, Ranking
from rudder.env.settings import check, check_link_levels
from rudder.env.spaces import LINK_FEATURES, WindowStats, build_observation, check_action, lg
from rudder.env.timing import LinkFit


@dataclass
class MinibatchRecord:
    """What one minibatch needed and cost (one trace row), after its remote ids went through the buffer."""

    epoch: int
    index: int  # minibatch index over the whole run
    remote_ids: np.ndarray  # global ids of remote input nodes (all of them, hits included)
    local_rows: int
    sample_s: float
    fetch_s: float  # measured live, modelled in replay
    fetch_rows: int  # rows pulled: local + misses + prefetched
    compute_s: float
    counts: MinibatchCounts  # what the buffer did
    loss: float = float("nan")
    seeds: np.ndarray | None = None  # the minibatch's seed (output) node ids, where known
    stall_s: float = 0.0  # of fetch_s: waiting behind a background prefetch chunk
    h2d_s: float | None = None  # of fetch_s: copying input rows host-to-device (None: trained on a CPU)
    h2d_rows: int = 0  # rows copied host-to-device


@dataclass(frozen=True)
class RunFacts:
    """Fixed facts of the run an episode plays: sizes for the observation, and ``facts`` passed to agents."""

    total_minibatches: int
    halo_nodes: int
    fanouts: list[int]
    batch_size: int
    facts: dict = field(default_factory=dict)  # graph, partitioning, rank, source, ...
    initial_fill: tuple[int, float] | None = None  # (remote rows, seconds) of the initial fill, where timed


class LinkEstimate:
    """What a pull costs on this trainer's link: ``seconds = c0 + c_local * local_rows + c_remote * remote_rows``,
    fitted online to every demand pull of the run so far (its fetch seconds minus any stall behind a prefetch chunk)
    by the link law's fitter (:class:`~rudder.env.timing.LinkFit`), seeded with the initial fill when it was timed.

    Live it learns from measured pulls, in replay from modelled ones, by the same code: an agent sees the link the
    same way in both. It gives the *link budget* of a window: the remote rows background prefetch can bring while
    the trainer samples and computes, ``hide_s / (c_remote + c0 / chunk)``. ``half_life`` (pulls; None: the whole
    run weighs the same) forgets old pulls, see :class:`~rudder.env.timing.LinkFit`.
    """

    def __init__(self, initial_fill: tuple[int, float] | None = None, half_life: float | None = None):
        self.fit = LinkFit(half_life)
        if initial_fill is not None and initial_fill[0] > 0 and initial_fill[1] > 0:
            self.add(0, initial_fill[0], initial_fill[1])

    def add(self, local_rows: int, remote_rows: int, seconds: float) -> None:
        self.fit.add(local_rows, remote_rows, seconds)

    @property
    def samples(self) -> int:
        return self.fit.samples

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(c0, c_local, c_remote)`` in seconds per pull and per row (zeros before two pulls were seen)."""
        return self.fit.coefficients

    def seconds(self, remote_rows: int, chunk: int = PREFETCH_CHUNK) -> float:
        """Modelled seconds background prefetch of ``remote_rows`` keeps the link busy (chunks of ``chunk``)."""
        c0, _, c_remote = self.coefficients
        return c0 * int(np.ceil(remote_rows / chunk)) + c_remote * remote_rows if remote_rows > 0 else 0.0

    def budget(self, hide_s: float, chunk: int = PREFETCH_CHUNK) -> int | None:
        """Remote rows the link carries in ``hide_s`` seconds; None while a remote row's cost is unknown."""
        c0, _, c_remote = self.coefficients
        if c_remote <= 0:
            return None
        return int(max(hide_s, 0.0) / (c_remote + c0 / chunk))

    def busy_s(self, window: WindowStats) -> float:
        """Modelled seconds the link was busy in ``window``: its demand pulls and the background chunks delivered."""
        c0, c_local, c_remote = self.coefficients
        demand = window.remote_fetched - window.arrived
        return c0 * window.minibatches + c_local * window.local_rows + c_remote * demand + self.seconds(window.arrived)


def check_level(action, n: int) -> int:
    """A level action as an index in ``[0, n)``; a clear error for anything else."""
    arr = np.asarray(action)
    if arr.shape not in ((), (1,)) or arr.dtype.kind not in "iu" or not 0 <= int(arr.reshape(-1)[0]) < n:
        raise ValueError(f"with levels the action must be an integer in [0, {n}) (a level index), got {action!r}")
    return int(arr.reshape(-1)[0])


def require_running(episode: PrefetchEpisode | None) -> PrefetchEpisode:
    """The env's episode, or a clear error when ``reset()`` was not called or the episode has ended."""
    if episode is None:
        raise RuntimeError("call reset() before step()")
    if episode.done:
        raise RuntimeError("the episode has ended: call reset()")
    return episode


class PrefetchEpisode:
    """State of one episode on one trainer.

    Args:
        buffer: the trainer's buffer (already filled).
        ranking: ranks the candidates and picks victims (:mod:`rudder.env.ranking`).
        k: number of ranked candidates per decision (action size).
        run: the run's fixed facts.
        reward: ``"traffic"`` (minus remote rows fetched / remote rows sampled over the window) or ``"time"``
            (minus the window's seconds).
        levels: None: the action is ``MultiBinary(K)`` over the top-K candidates. Else the action is an index into
            ``levels``, multiples of the *link budget* (the remote rows the link can carry while the next window
            samples and computes, :class:`LinkEstimate`): level ``x`` prefetches the top ``round(x * budget)``
            admissible candidates of the run's ranking, however many that is. Admissible: under the lookahead, those
            needed more than the resident they would replace; under the misses ranking, any candidate, up to the
            capacity (the eviction threshold does not limit a level: evicting rows still needed is a consequence
            the agent must weigh). ``info["choices"]`` says what each level would do.
    """

    def __init__(
        self,
        buffer: PrefetchBuffer,
        ranking: Ranking,
        k: int,
        run: RunFacts,
        reward: str = DEFAULTS.reward,
        levels=None,
        id_map: np.ndarray | None = None,
    ):
        check("reward", reward)
        check("candidates", k)
        self.buffer, self.ranking, self.k, self.run = buffer, ranking, k, run
        # dense ids: the buffer and ranking see id i for node id_map[i] (sorted global ids a replayed rank touches:
        # memory follows them, not the graph); agents see global ids (candidates, resolver, apply) either way
        self.id_map = None if id_map is None else np.asarray(id_map, dtype=np.int64)
        self.levels = None if levels is None else check_link_levels(levels)
        self.link = LinkEstimate(run.initial_fill)
        self._unused_at = buffer.counters.prefetch_unused
        self.last_unused = 0  # prefetched rows evicted unused during the last window
        self._ranked: Ranked | None = None
        self._choices: list[Choice] = []
        self.total_minibatches = run.total_minibatches
        self.reward_kind = reward
        self.window = WindowStats()  # the window being run
        self.last_window = WindowStats()  # the window the next observation describes
        self.minibatches = 0
        self.windows = 0
        self.decisions = 0
        self.facts = dict(
            run.facts,
            halo_nodes=run.halo_nodes,
            capacity=buffer.capacity,
            alpha=buffer.alpha,
            period=buffer.period,
            fanout=",".join(map(str, run.fanouts)),
            batch_size=run.batch_size,
            total_minibatches=run.total_minibatches,
            candidates=k,
        )
        self._seen_in_window = np.full(buffer.num_nodes, -1, dtype=np.int32)  # window index of an id's last use
        self.candidate_ids = np.full(k, -1, dtype=np.int64)
        self._victims = None
        self.on_apply: Callable[[int, np.ndarray], None] | None = None  # told of every prefetch set applied

    @property
    def done(self) -> bool:
        return self.minibatches >= self.total_minibatches

    def before_minibatch(self) -> None:
        """Called before each minibatch's lookup: the ranking refreshes what admission and eviction read."""
        self.ranking.advance(self.minibatches)

    def record(self, rec: MinibatchRecord) -> None:
        """Count a minibatch the driver ran."""
        new = np.count_nonzero(self._seen_in_window[rec.remote_ids] != self.windows)
        self._seen_in_window[rec.remote_ids] = self.windows
        self.window.add(
            rec.remote_ids,
            rec.local_rows,
            rec.counts,
            rec.sample_s,
            rec.fetch_s,
            rec.compute_s,
            int(new),
            stall_s=rec.stall_s,
        )
        self.link.add(rec.local_rows, rec.counts.remote_fetched - rec.counts.arrived, rec.fetch_s - rec.stall_s)
        self.minibatches += 1

    def observe(self) -> tuple[dict, DecisionInfo]:
        """Observation and info at a decision point; refreshes the candidate list the next action refers to."""
        w, buf = self.last_window, self.buffer
        hide_s = w.sample_s + w.compute_s
        budget = self.link.budget(hide_s)
        budget_rows = buf.capacity if budget is None else min(budget, buf.capacity)
        k_rank = self.k
        if self.levels is not None:  # rank as far as the largest level can reach
            k_rank = max(self.k, min(int(np.ceil(self.levels[-1] * budget_rows)), buf.capacity))
        ranked = self._ranked = self.ranking.rank(self.minibatches, k_rank)
        self.candidate_ids, self._victims = ranked.candidate_ids[: self.k], ranked.victims
        n_candidates = int(np.count_nonzero(ranked.candidate_ids >= 0))
        if self.levels is None or self.ranking.levels_need_a_slot:
            n_admissible = min(n_candidates, ranked.n_evictable)
        else:
            n_admissible = min(n_candidates, buf.capacity)
        full = self._choice(1.0, min(budget_rows, n_admissible))
        levels = self.levels if self.levels is not None else ()
        self._choices = [self._choice(x, min(int(round(x * budget_rows)), n_admissible)) for x in levels]
        c = buf.counters
        mb = max(w.minibatches, 1)
        seconds = w.seconds
        need = full["need_in"] + full["need_out"]
        link_obs = np.array(
            [
                self.link.busy_s(w) / seconds if seconds > 0 else 0.0,
                lg(1000 * w.stall_s / mb),
                lg(1000 * hide_s / mb),
                budget_rows / max(buf.capacity, 1),
                full["need_in"] / need if need > 0 else 0.5,
                w.late / max(w.late + w.prefetched, 1),
                self.last_unused / max(w.arrived if buf.prefetch == "background" else w.prefetched, 1),
                float(n_admissible == 0),
            ],
            dtype=np.float64,
        )
        assert link_obs.size == LINK_FEATURES
        # alpha scales once more here for either ranking: the shipped PPO policy was trained on these values
        scores = ranked.candidate_scores[: self.k] * self.ranking.score_scale * buf.alpha
        obs = build_observation(
            buf,
            w,
            c.hits,
            c.remote_sampled,
            self.minibatches / max(self.total_minibatches, 1),
            scores,
            self.run.halo_nodes,
            self.run.fanouts,
            self.run.batch_size,
            link=link_obs,
        )
        c0, _, c_remote = self.link.coefficients
        link = LinkInfo(
            s_per_row=c_remote,
            s_per_pull=c0,
            hide_s=hide_s,
            budget_rows=int(budget_rows),
            utilisation=float(link_obs[0]),
            stall_s=w.stall_s,
            n_admissible=int(n_admissible),
        )
        info = DecisionInfo(
            candidate_ids=self.to_global(self.candidate_ids),
            candidate_scores=ranked.candidate_scores[: self.k].copy(),
            n_candidates=int(np.count_nonzero(self.candidate_ids >= 0)),
            n_evictable=ranked.n_evictable,
            capacity=buf.capacity,
            minibatch=self.minibatches,
            decision=self.decisions,
            window=w.as_dict(),
            counters=c.as_dict(),
            facts=dict(self.facts),
            link=link,
        )
        if self.levels is not None:
            info["choices"] = [dict(ch) for ch in self._choices]
        return obs, info

    def _choice(self, level: float, rows: int) -> Choice:
        """What prefetching the top ``rows`` ranked candidates would do (:class:`~rudder.env.contract.Choice`)."""
        buf, ranked = self.buffer, self._ranked
        rows = max(int(rows), 0)
        need_in = self.ranking.candidate_need(ranked.candidate_scores[:rows]) if rows else 0.0
        victims = self._victim_slots(rows)
        resident = buf.slot_ids[victims] != EMPTY
        out, hot = self.ranking.slot_need(victims, self.minibatches)  # as the candidates' need, and still in use
        return Choice(
            level=float(level),
            rows=rows,
            link_s=self.link.seconds(rows),
            evicts=int(resident.sum()),
            evicts_hot=int(hot.sum()),
            need_in=need_in,
            need_out=float(out.mean()) if rows else 0.0,
        )

    def _victim_slots(self, n: int) -> np.ndarray:
        """The slots ``n`` prefetched rows would replace (as the buffer would choose them now)."""
        n = min(n, self.buffer.capacity)
        victims = self._ranked.victims
        if victims is not None and victims.size >= n:
            return victims[:n]
        return self.buffer._prefetch_victims(n) if n else np.zeros(0, dtype=np.int64)

    def decide(self, action) -> np.ndarray:
        """Turn the action into the prefetch set (ids, in rank order) and schedule it: a ``MultiBinary(K)`` mask
        over the top-K candidates, or, with ``levels``, the index of a level (:meth:`choices`)."""
        return self.apply(self.resolver()(action))

    def resolver(self) -> Callable[[object], np.ndarray]:
        """A function turning an action taken on the current observation into its prefetch ids; it keeps this
        decision's candidates, so it also serves a decision an agent finishes later, in the background."""
        if self.levels is None:
            ids, k = self.to_global(self.candidate_ids), self.k
            return lambda action: ids[check_action(action, k) & (ids >= 0)]
        ranked, n = self._ranked.candidate_ids, len(self.levels)
        rows = [c["rows"] for c in self._choices]
        ids = self.to_global(ranked[: max(rows)])
        return lambda action: ids[: rows[check_level(action, n)]]

    def to_global(self, ids: np.ndarray) -> np.ndarray:
        """Global node ids of the buffer's ``ids`` (a copy; -1 stays -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.id_map is None:
            return ids.copy()
        return np.where(ids >= 0, self.id_map[np.maximum(ids, 0)], -1)

    def to_local(self, ids: np.ndarray) -> np.ndarray:
        """The buffer's ids of global node ``ids``; a node the replayed rank never touches is refused."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.id_map is None or ids.size == 0:
            return ids
        pos = np.minimum(np.searchsorted(self.id_map, ids), self.id_map.size - 1)
        bad = self.id_map[pos] != ids
        if bad.any():
            raise ValueError(
                f"prefetch id {int(ids[bad][0])} is no node this rank's trace touches (needed, halo, "
                f"initial fill or recorded decision): it cannot be prefetched in this replay"
            )
        return pos

    def choices(self) -> list[Choice]:
        """What each level would do at the current decision (levels mode; empty otherwise)."""
        return [dict(ch) for ch in self._choices]

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Schedule a prefetch set of node ids (e.g. a late decision taken on an earlier candidate list)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.on_apply is not None:
            self.on_apply(self.minibatches, ids)
        self.buffer.apply(self.to_local(ids), victim_order=self._victims)
        self.decisions += 1
        return ids

    def end_window(self) -> tuple[float, WindowStats]:
        """Reward of the window just run, and its stats; the next observation describes it."""
        w = self.window
        reward = -w.remote_fetched / max(w.remote_sampled, 1) if self.reward_kind == "traffic" else -w.seconds
        self.last_window, self.window = w, WindowStats()
        unused = self.buffer.counters.prefetch_unused
        self.last_unused, self._unused_at = unused - self._unused_at, unused
        self.windows += 1
        return float(reward), w


Poll = Callable[[int], "tuple[np.ndarray, float] | None"]


class PrefetchEnv(gym.Env):
    """What ``rudder/Live-v0`` and ``rudder/Replay-v0`` share: ``step`` and ``run_window`` over a driver.

    A subclass sets ``episode`` and ``_records`` (the driver's iterator of :class:`MinibatchRecord`) in ``reset``
    and may set ``trace`` (a :class:`traces.TraceWriter` recording every minibatch and decision).
    """

    metadata = {"render_modes": []}
    live = False  # True: real training, times measured; False: replay, times modelled
    period: int
    trace = None

    def __init__(self):
        self.episode: PrefetchEpisode | None = None
        self._records: Iterator[MinibatchRecord] | None = None
        self._observed_at = time.perf_counter()
        self.env_overhead_s = 0.0  # time spent building observations and applying actions (start-up included)
        self.env_startup_s = 0.0  # of which in reset(): the first observation (e.g. the lookahead's first scores)
        self.trace_s = 0.0  # time spent recording the trace (``--trace``), apart: a cost of recording, not of the env

    def _first_observation(self) -> tuple[dict, DecisionInfo]:
        """The observation that ``reset`` returns, timed as start-up."""
        t0 = time.perf_counter()
        obs, info = self.episode.observe()
        self.env_overhead_s = self.env_startup_s = time.perf_counter() - t0
        self._observed_at = time.perf_counter()
        return obs, info

    def resolver(self) -> Callable[[object], np.ndarray]:
        """A function turning an action taken on the current observation into its prefetch ids (global node ids);
        it keeps this decision's candidates, so it also serves a decision an agent finishes later, in the
        background (its ids go to :meth:`run_window`'s ``poll``)."""
        return require_running(self.episode).resolver()

    def step(self, action):
        """Schedule the action's prefetch set, then run the next ``period`` minibatches."""
        ep = require_running(self.episode)
        t0 = time.perf_counter()
        latency_s = t0 - self._observed_at  # the agent's decision time
        ids = ep.decide(action)
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.add_decision(minibatch=ep.minibatches, ids=ids, latency_s=latency_s)
        t2 = time.perf_counter()
        self.env_overhead_s += t1 - t0
        self.trace_s += t2 - t1
        obs, reward, terminated, truncated, info = self.run_window()
        info["applied_ids"] = ids
        if self.live:  # offline the agent's wall-clock time is not part of the (deterministic) replay
            info["decision_latency_s"] = latency_s
        return obs, reward, terminated, truncated, info

    def run_window(self, poll: Poll | None = None):
        """Run the next ``period`` minibatches with no new decision, except what ``poll`` returns.

        ``poll(minibatch)`` is called before each minibatch with the number of minibatches run so far; a non-None
        return ``(ids, latency_s)`` is a prefetch set applied there, e.g. a decision an agent finished in the
        background (:mod:`rudder.evaluation.play`). Returns ``step``'s tuple.
        """
        ep = require_running(self.episode)
        late, overhead, tracing = [], 0.0, 0.0
        for _ in range(self.period):
            if ep.done:
                break
            t1 = time.perf_counter()
            if poll is not None:
                got = poll(ep.minibatches)
                if got is not None:
                    ids, latency_s = got
                    late.append(ep.apply(ids))
                    if self.trace is not None:
                        t3 = time.perf_counter()
                        self.trace.add_decision(minibatch=ep.minibatches, ids=late[-1], latency_s=latency_s)
                        tracing += time.perf_counter() - t3
            ep.before_minibatch()
            overhead += time.perf_counter() - t1
            rec = next(self._records)
            t1 = time.perf_counter()
            ep.record(rec)
            if self.trace is not None:
                t3 = time.perf_counter()
                self.trace.add_minibatch(
                    minibatch=rec.index,
                    epoch=rec.epoch,
                    remote_ids=rec.remote_ids,
                    local_rows=rec.local_rows,
                    sample_s=rec.sample_s,
                    fetch_s=rec.fetch_s,
                    compute_s=rec.compute_s,
                    fetch_rows=rec.fetch_rows,
                    hits=rec.counts.hits,
                    remote_fetched=rec.counts.remote_fetched,
                    prefetched=rec.counts.prefetched,
                    seeds=rec.seeds,
                    h2d_s=rec.h2d_s,
                    h2d_rows=rec.h2d_rows if rec.h2d_s is not None else None,
                    **(
                        dict(arrived=rec.counts.arrived, stall_s=rec.stall_s)
                        if ep.buffer.prefetch == "background"
                        else {}
                    ),
                )
                tracing += time.perf_counter() - t3
            overhead += time.perf_counter() - t1
        t2 = time.perf_counter()
        if ep.done:
            for _ in self._records:  # run the driver to its end (live: closes the last epoch's timing)
                raise RuntimeError("the driver produced more minibatches than it announced")
        reward, _ = ep.end_window()
        obs, info = ep.observe()
        info["applied_ids"] = np.concatenate(late) if late else np.zeros(0, dtype=np.int64)
        self.env_overhead_s += overhead - tracing + time.perf_counter() - t2
        self.trace_s += tracing
        self._observed_at = time.perf_counter()
        return obs, reward, ep.done, False, info
