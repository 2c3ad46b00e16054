"""The decision protocol shared by the live and the replay environment: windows, observations, actions, rewards.

An episode is one training run (or one trace). The driver (live trainer or trace) feeds every minibatch's remote ids
through the buffer and reports it with :meth:`PrefetchEpisode.record`; every ``period`` minibatches the env calls
:meth:`observe`, hands the observation to the agent, and turns the agent's ``MultiBinary(K)`` action into a prefetch
set with :meth:`decide`. Both environments use this class, so the same agent sees the same thing live and offline.
"""

from __future__ import annotations

import numpy as np

from rudder_env.buffer import EMPTY, PrefetchBuffer, StepResult, first_in_order
from rudder_env.spaces import WindowStats, build_observation, candidate_ids, check_action, padded

REWARDS = ("traffic", "time")
RANKINGS = ("misses", "lookahead")


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
        k: number of ranked candidates per decision (action size).
        total_minibatches: minibatches in the run.
        halo_nodes: size of the partition's halo.
        fanouts, batch_size: the sampler's settings (part of the observation).
        reward: ``"traffic"`` (minus remote rows fetched / remote rows sampled over the window) or ``"time"``
            (minus the window's seconds).
        facts: fixed facts about the run (graph, partitioning, buffer settings) passed to agents in ``info``.
        ranking: how candidates are ranked and who gets evicted. ``"misses"`` (MassiveGNN/Rudder): candidates by
            decayed miss count, evicting the lowest-score (least recently hit) slots. ``"lookahead"``: candidates
            and residents by the remote rows the next ``horizon`` minibatches will probably need
            (:class:`~rudder_env.lookahead.SamplerLookahead` over ``upcoming(minibatches_done, horizon)``, the
            known seed order, each minibatch ahead weighing ``discount**i``), evicting the least needed first;
            minibatches already sampled (``sampled_ahead(minibatches_done)``: their remote ids) count exactly.
            ``horizon`` and ``discount`` default to the buffer's reach (:func:`lookahead_reach`).
    """

    def __init__(self, buffer: PrefetchBuffer, k: int, total_minibatches: int, halo_nodes: int,
                 fanouts: list[int], batch_size: int, reward: str = "traffic", facts: dict | None = None,
                 ranking: str = "misses", lookahead=None, upcoming=None, horizon: int | None = None,
                 discount: float | None = None, sampled_ahead=None):
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}: expected one of {', '.join(REWARDS)}")
        if k < 1:
            raise ValueError(f"the number of candidates must be >= 1, got {k}")
        if ranking not in RANKINGS:
            raise ValueError(f"unknown ranking {ranking!r}: expected one of {', '.join(RANKINGS)}")
        if ranking == "lookahead" and (lookahead is None or upcoming is None):
            raise ValueError("ranking='lookahead' needs the partition structure and the seed order, which this "
                             "run or trace does not have")
        first = _score_first(lookahead, upcoming) if ranking == "lookahead" else {}
        if ranking == "lookahead" and (horizon is None or discount is None):
            rows = float(np.mean([need.sum(dtype=np.float64) for _, need in first.values()])) if first else 1.0
            auto_horizon, auto_discount = lookahead_reach(buffer.capacity, rows)
            horizon = auto_horizon if horizon is None else horizon
            discount = auto_discount if discount is None else discount
        self.ranking = ranking
        self.lookahead = lookahead
        self.upcoming = upcoming
        self.horizon = horizon
        self.discount = discount
        self._victims = None
        self._n_evictable = 0
        if ranking == "lookahead":
            self._need = _PredictedNeed(buffer, lookahead, upcoming, horizon, discount, sampled_ahead)
            self._need.add_scored(first)
        self.buffer = buffer
        self.k = k
        self.total_minibatches = total_minibatches
        self.halo_nodes = halo_nodes
        self.fanouts = list(fanouts)
        self.batch_size = batch_size
        self.reward_kind = reward
        self.window = WindowStats()  # the window being run
        self.last_window = WindowStats()  # the window the next observation describes
        self.minibatches = 0
        self.windows = 0
        self.decisions = 0
        self.facts = dict(facts or {}, halo_nodes=halo_nodes, capacity=buffer.capacity, alpha=buffer.alpha,
                          period=buffer.period, fanout=",".join(map(str, self.fanouts)), batch_size=batch_size,
                          total_minibatches=total_minibatches, candidates=k)
        self._seen_in_window = np.full(buffer.num_nodes, -1, dtype=np.int32)  # window index of an id's last use
        self.candidate_ids = np.full(k, -1, dtype=np.int64)
        self._candidate_counts = np.zeros(k, dtype=np.float32)

    @property
    def done(self) -> bool:
        return self.minibatches >= self.total_minibatches

    def before_minibatch(self) -> None:
        """Called by the envs before each minibatch's lookup: under lookahead ranking, refresh the predicted need
        that admission on miss and eviction use, to the minibatches *after* this one (this one's rows are needed
        now either way)."""
        if self.ranking == "lookahead":
            self._need.advance(self.minibatches)

    def record(self, remote_ids: np.ndarray, local_rows: int, step: StepResult, sample_s: float, fetch_s: float,
               compute_s: float) -> None:
        new = np.count_nonzero(self._seen_in_window[remote_ids] != self.windows)
        self._seen_in_window[remote_ids] = self.windows
        self.window.add(remote_ids, local_rows, step, sample_s, fetch_s, compute_s, int(new))
        self.minibatches += 1

    def observe(self) -> tuple[dict, dict]:
        """Observation and info at a decision point; refreshes the candidate list the next action refers to."""
        if self.ranking == "lookahead":
            self._rank_by_lookahead()
        else:
            self.candidate_ids, self._candidate_counts = candidate_ids(self.buffer, self.k)
            self._n_evictable = int(np.count_nonzero(self.buffer.evictable()))
        c = self.buffer.counters
        scale = self.buffer.alpha if self.ranking == "misses" else (1 - self.discount)  # scores to ~[0, 1]
        obs = build_observation(self.buffer, self.last_window, c.hits, c.remote_sampled,
                                self.minibatches / max(self.total_minibatches, 1), self._candidate_counts * scale,
                                self.halo_nodes, self.fanouts, self.batch_size)
        info = dict(candidate_ids=self.candidate_ids.copy(),
                    candidate_scores=self._candidate_counts.copy(),
                    n_candidates=int(np.count_nonzero(self.candidate_ids >= 0)),
                    n_evictable=self._n_evictable,
                    capacity=self.buffer.capacity, minibatch=self.minibatches, decision=self.decisions,
                    window=self.last_window.as_dict(), counters=c.as_dict(), facts=dict(self.facts))
        return obs, info

    def decide(self, action) -> np.ndarray:
        """Turn a ``MultiBinary(K)`` action into the prefetch set (ids, in rank order) and schedule it."""
        mask = check_action(action, self.k) & (self.candidate_ids >= 0)
        return self.apply(self.candidate_ids[mask])

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Schedule a prefetch set of node ids (e.g. a late decision taken on an earlier candidate list)."""
        ids = np.asarray(ids, dtype=np.int64)
        self.buffer.apply(ids, victim_order=self._victims)
        self.decisions += 1
        return ids

    def _rank_by_lookahead(self) -> None:
        """Candidates: non-residents most needed soon; victims: residents least needed soon (then least recent)."""
        buf, k = self.buffer, self.k
        self._need.advance(self.minibatches)
        ids = np.flatnonzero(self._need.need > 0)  # predicted need after the coming minibatch
        need = (self._need.need[ids] * self.discount ** -(self.minibatches - self._need.base)).astype(np.float32)
        resident = buf.slot_of[ids] != EMPTY
        cand, cand_need = ids[~resident], need[~resident]
        order = first_in_order(k, -cand_need, cand)  # most needed first, ties by lower id
        self.candidate_ids, self._candidate_counts = padded(cand[order], cand_need[order], k)
        self._victims = buf.priority_victims(k)
        # a candidate "has a slot" when it is needed more than the resident it would replace
        m = min(order.size, buf.capacity)
        beats = self._candidate_counts[:m] > buf.slot_priority(self._victims[:m])
        self._n_evictable = int(beats.size) if beats.all() else int(np.argmin(beats))

    def end_window(self) -> tuple[float, WindowStats]:
        """Reward of the window just run, and its stats; the next observation describes it."""
        w = self.window
        if self.reward_kind == "traffic":
            reward = -w.remote_fetched / max(w.remote_sampled, 1)
        else:
            reward = -w.seconds
        self.last_window, self.window = w, WindowStats()
        self.windows += 1
        return float(reward), w


def lookahead_reach(capacity: int, rows_per_minibatch: float, reach: float = 2.0) -> tuple[int, float]:
    """Horizon and discount of the lookahead matched to the buffer: it holds the remote rows of about
    ``capacity / rows_per_minibatch`` minibatches, so a need much further away than that cannot change what it
    should keep, while nearer needs must dominate. The weights decay over ``reach`` times that many minibatches
    (``discount = 1 - 1/that``, in [0.5, 0.98]) and stop at 4 times that (horizon in [8, 64]).

    ``reach`` = 2 was picked on 4 of the 16 benchmark traces (both seeds among them); a small buffer gets a
    short, steep horizon, a large one a long, flat one."""
    span = max(1.0, reach * capacity / max(rows_per_minibatch, 1.0))
    discount = round(float(np.clip(1.0 - 1.0 / span, 0.5, 0.98)), 3)
    horizon = int(np.clip(np.ceil(4 * round(span, 3)), 8, 64))
    return horizon, discount


def _score_first(lookahead, upcoming, n: int = 4) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Expected remote needs of the first ``n`` known minibatches (their mean size sets the lookahead's reach)."""
    seeds = upcoming(0, n) if (upcoming is not None and lookahead is not None) else []
    return {j: lookahead.scores([s], 1.0) for j, s in enumerate(seeds)}


class _PredictedNeed:
    """The buffer's priority under lookahead: ``sum_i discount**i * need_{m+i}`` over the known minibatches after
    the current one ``m`` (``i = 1 .. horizon-1``), kept up to date minibatch by minibatch.

    Each minibatch's expected remote needs are computed once, in a background thread, up to 16 minibatches
    before it enters the horizon; the sum slides by subtracting the minibatch that leaves and adding those that
    enter. Weights are ``discount**j`` for absolute
    minibatch ``j`` (the same factor for every node at a given time, so the order is unchanged), rescaled now and
    then to stay in range.
    """

    def __init__(self, buffer, lookahead, upcoming, horizon: int, discount: float, sampled_ahead=None):
        self.buffer, self.lookahead, self.upcoming = buffer, lookahead, upcoming
        self.sampled_ahead = sampled_ahead
        self.horizon, self.discount = horizon, discount
        self.need = np.zeros(buffer.num_nodes, dtype=np.float64)
        self.included: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # minibatch -> (ids, weighted needs)
        self.exact: set[int] = set()  # minibatches included with their sampled remote ids
        self.scored: dict = {}  # minibatch -> future of its expected needs, not yet included
        self.base = 0  # weights are discount ** (j - base)
        self.at = -1

    def advance(self, m: int) -> None:
        if m == self.at:
            return
        self.at = m
        for j in [j for j in self.included if j <= m]:
            ids, w = self.included.pop(j)
            self.need[ids] -= w
            self.exact.discard(j)
        for j in [j for j in self.scored if j <= m]:
            del self.scored[j]
        if m - self.base > 200:  # rescale before discount ** (j - base) underflows
            scale = self.discount ** -(m - self.base)
            self.need *= scale
            self.included = {j: (ids, w * scale) for j, (ids, w) in self.included.items()}
            self.base = m
        known = self.sampled_ahead(m) if self.sampled_ahead is not None else []
        for i, ids in enumerate(known, start=1):  # sampled already: their remote rows exactly, replacing the guess
            j = m + i
            if j in self.exact:
                continue
            if j in self.included:
                old_ids, old_w = self.included.pop(j)
                self.need[old_ids] -= old_w
            w = np.full(ids.size, self.discount ** (j - self.base))
            self.need[ids] += w
            self.included[j] = (ids, w)
            self.exact.add(j)
        self._submit_upcoming(m)
        for j in range(m + 1, m + self.horizon):  # guesses for the minibatches entering the horizon
            if j in self.included:
                continue
            if j not in self.scored:
                break  # its seeds are not known yet (the next epoch)
            ids, need = self.scored.pop(j).result()
            w = need * self.discount ** (j - self.base)
            self.need[ids] += w
            self.included[j] = (ids, w)
        self.buffer.set_dense_priority(self.need)

    def add_scored(self, scored: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Expected needs already computed (minibatch -> (ids, needs)), used as if scored in the background."""
        from concurrent.futures import Future

        for j, value in scored.items():
            if j > self.at and j not in self.scored:
                self.scored[j] = Future()
                self.scored[j].set_result(value)

    def _submit_upcoming(self, m: int) -> None:
        """Start scoring, in the background, the known minibatches up to 16 past the horizon not yet scored: by the
        time one enters the horizon its guess is ready, and training does not wait for it (the scoring releases
        the GIL). The result does not depend on that timing: a guess not ready yet is waited for."""
        for i, seeds in enumerate(self.upcoming(m, self.horizon + 16)):
            j = m + i
            if i > 0 and j not in self.scored and j not in self.included:
                self.scored[j] = _scorer().submit(self.lookahead.scores, [seeds], 1.0)


_SCORER = None


def _scorer():
    """One background thread per process scores upcoming minibatches for every episode."""
    global _SCORER
    if _SCORER is None:
        from concurrent.futures import ThreadPoolExecutor

        _SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rudder-lookahead")
    return _SCORER
