"""Rankings: which non-resident remote rows are the candidates of a decision, and which residents make way for them.

A ranking has one small interface (:class:`Ranking`): :meth:`~Ranking.advance` before every minibatch (keeps what
the buffer's admission and eviction read up to date), :meth:`~Ranking.rank` at a decision point (the top-K
candidates with their scores, how many of them have a slot to take, and the slots they would replace),
``score_scale`` (multiplies candidate scores into about [0, 1] for the observation), and what a link-budget level
needs to say what it would do: ``levels_need_a_slot``, :meth:`~Ranking.candidate_need` and
:meth:`~Ranking.slot_need`.

- :class:`MissRanking` (MassiveGNN / Rudder): candidates by decayed miss count; a candidate has a slot when one is
  empty or below the eviction threshold ``(1-alpha)**period``; victims are the lowest-score slots.
- :class:`LookaheadRanking` (ours): candidates and victims by the remote rows the next minibatches will probably
  need (:class:`~rudder.env.lookahead.SamplerLookahead` over the known seed order; minibatches already sampled
  count exactly); a candidate has a slot when it is needed more than the resident it would replace. The buffer's
  admit-on-miss and eviction follow the same predicted need: an online Belady.

:func:`make_ranking` builds one by name (``BufferSettings.ranking``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from rudder.env.buffer import EMPTY, PrefetchBuffer, first_in_order
from rudder.env.settings import check


@dataclass(frozen=True)
class Ranked:
    """A decision's candidate list, padded to K."""

    candidate_ids: np.ndarray  # (K,) int64, -1 past the last candidate
    candidate_scores: np.ndarray  # (K,) float32, 0 past the last candidate
    n_evictable: int  # how many of the top candidates have a slot to take
    victims: np.ndarray | None  # slots to replace, first evicted first (None: the buffer's score order)


@runtime_checkable
class Ranking(Protocol):
    """Everything an episode (:class:`rudder.env.episode.PrefetchEpisode`) asks of a ranking.

    Attributes:
        name: the ranking's name (one of :data:`~rudder.env.settings.RANKINGS`), for reports.
        score_scale: multiplies candidate scores into about [0, 1] for the observation.
        levels_need_a_slot: a link-budget level prefetches only candidates that have a slot to take
            (``Ranked.n_evictable``: needed more than the resident they replace); False: any candidate, up to the
            buffer's capacity (evicting rows still needed is then a consequence the agent weighs).
    """

    name: str
    score_scale: float
    levels_need_a_slot: bool

    def advance(self, minibatches_done: int) -> None:
        """Called before each minibatch (``minibatches_done`` run so far)."""

    def rank(self, minibatches_done: int, k: int) -> Ranked:
        """The top-``k`` candidates at a decision point."""

    def candidate_need(self, scores: np.ndarray) -> float:
        """About the uses per minibatch of a prefetched candidate whose score (from :meth:`rank`) is in ``scores``
        (non-empty), on average: what a level brings in, in the unit of :meth:`slot_need`."""

    def slot_need(self, slots: np.ndarray, minibatches_done: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``slots``: the need of its resident (0 for an empty slot), in the unit of
        :meth:`candidate_need`, and whether that resident is hot (still in use): what a level would evict."""


def padded(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranked candidates (at most ``k``) padded to length ``k``: ids with -1, scores with 0."""
    out_ids = np.full(k, -1, dtype=np.int64)
    out_scores = np.zeros(k, dtype=np.float32)
    out_ids[: ids.size] = ids
    out_scores[: ids.size] = scores
    return out_ids, out_scores


class MissRanking:
    """Candidates by decayed miss count (ties by lower id); evictable slots are empty or below the threshold."""

    name = "misses"
    levels_need_a_slot = False  # the eviction threshold does not limit a level

    def __init__(self, buffer: PrefetchBuffer):
        self.buffer = buffer
        self.score_scale = buffer.alpha

    def advance(self, minibatches_done: int) -> None:
        pass

    def rank(self, minibatches_done: int, k: int) -> Ranked:
        ids, scores = padded(*self.buffer.candidates(k), k)
        return Ranked(ids, scores, int(np.count_nonzero(self.buffer.evictable())), None)

    def candidate_need(self, scores: np.ndarray) -> float:
        """Decayed misses x alpha: about the misses per minibatch."""
        return float(scores.mean()) * self.buffer.alpha

    def slot_need(self, slots: np.ndarray, minibatches_done: int) -> tuple[np.ndarray, np.ndarray]:
        """The residents' scores (hot: hit within the last ``period`` minibatches); where the buffer was given a
        priority by other means, that priority (hot: above 0)."""
        buf = self.buffer
        resident = buf.slot_ids[slots] != EMPTY
        if buf.priority is not None:
            out = np.maximum(buf.slot_priority(slots), 0.0)
            return out, resident & (out > 0)
        out = np.where(resident, buf.slot_scores()[slots], 0.0)
        return out, resident & (buf.clock - buf.slot_last_hit[slots] < buf.period)


class LookaheadRanking:
    """Candidates and victims by predicted need over the next ``horizon`` minibatches, minibatch ``i`` ahead
    weighing ``discount**i``; ``horizon`` and ``discount`` default to the buffer's reach (:func:`lookahead_reach`).

    Args:
        buffer: the trainer's buffer; its priority becomes the predicted need (admission on miss, eviction).
        lookahead: the partition structure around the trainer's seeds.
        upcoming: ``upcoming(minibatches_done, horizon)`` -> seeds of the next known minibatches.
        sampled_ahead: ``sampled_ahead(minibatches_done)`` -> remote ids of the minibatches already sampled beyond
            the next one (known exactly).
    """

    name = "lookahead"
    levels_need_a_slot = True  # a candidate has a slot when it is needed more than the resident it replaces

    def __init__(
        self,
        buffer: PrefetchBuffer,
        lookahead,
        upcoming: Callable,
        sampled_ahead: Callable | None = None,
        horizon: int | None = None,
        discount: float | None = None,
    ):
        first = _score_first(lookahead, upcoming)
        if horizon is None or discount is None:
            rows = float(np.mean([need.sum(dtype=np.float64) for _, need in first.values()])) if first else 1.0
            auto_horizon, auto_discount = lookahead_reach(buffer.capacity, rows)
            horizon = auto_horizon if horizon is None else horizon
            discount = auto_discount if discount is None else discount
        self.buffer, self.horizon, self.discount = buffer, horizon, discount
        self.score_scale = 1 - discount
        self._need = _PredictedNeed(buffer, lookahead, upcoming, horizon, discount, sampled_ahead)
        self._need.add_scored(first)

    def advance(self, minibatches_done: int) -> None:
        """Refresh the predicted need to the minibatches *after* the coming one (its rows are needed now anyway)."""
        self._need.advance(minibatches_done)

    def need_scale(self, minibatches_done: int) -> float:
        """Multiplies the buffer's priority into expected uses weighted from now (weight 1 for the coming
        minibatch): the scale of the candidate scores :meth:`rank` returns."""
        return float(self.discount ** -(minibatches_done - self._need.base))

    def rank(self, minibatches_done: int, k: int) -> Ranked:
        """Candidates: non-residents most needed soon (expected uses, weighted from now: the scores returned);
        victims: residents in the buffer's priority order (no known use and least needed first, then the latest
        known next use: see :class:`_PredictedNeed`)."""
        buf, need = self.buffer, self._need
        need.advance(minibatches_done)
        ids = np.flatnonzero(need.need > 0)  # predicted need after the coming minibatch
        value = (need.need[ids] * self.need_scale(minibatches_done)).astype(np.float32)
        resident = buf.slot_of[ids] != EMPTY
        if buf.requested.size:  # background: what is on its way is no candidate
            resident |= buf.requested[ids]
        cand, cand_need = ids[~resident], value[~resident]
        order = first_in_order(k, -cand_need, cand)  # most needed first, ties by lower id
        cand_ids, scores = padded(cand[order], cand_need[order], k)
        victims = buf.priority_victims(k)
        # a candidate has a slot when it is needed more than the resident it would replace
        m = min(order.size, buf.capacity)
        victim_ids = buf.slot_ids[victims[:m]]
        beats = scores[:m] > np.where(victim_ids == EMPTY, -1.0, need.need[np.maximum(victim_ids, 0)])
        n_evictable = int(beats.size) if beats.all() else int(np.argmin(beats))
        return Ranked(cand_ids, scores, n_evictable, victims)

    def candidate_need(self, scores: np.ndarray) -> float:
        """The scores are expected uses weighted from now already."""
        return float(scores.mean())

    def slot_need(self, slots: np.ndarray, minibatches_done: int) -> tuple[np.ndarray, np.ndarray]:
        """Expected uses (weighted from now) of the residents of ``slots``, 0 for an empty slot: the scale of the
        candidate scores, whatever the priority's order of known uses adds (hot: any need)."""
        ids = self.buffer.slot_ids[slots]
        out = np.where(ids == EMPTY, 0.0, self._need.need[np.maximum(ids, 0)]) * self.need_scale(minibatches_done)
        return out, (ids != EMPTY) & (out > 0)


def make_ranking(
    name: str,
    buffer: PrefetchBuffer,
    lookahead=None,
    upcoming: Callable | None = None,
    sampled_ahead: Callable | None = None,
    horizon: int | None = None,
    discount: float | None = None,
) -> Ranking:
    """The ranking ``name`` (one of :data:`~rudder.env.settings.RANKINGS`) over ``buffer``."""
    check("ranking", name)
    if name == "misses":
        return MissRanking(buffer)
    if lookahead is None and sampled_ahead is not None:  # the sampled-ahead minibatches alone: no guesses
        return LookaheadRanking(buffer, None, lambda done, horizon: [], sampled_ahead, horizon, discount)
    if lookahead is None or upcoming is None:
        raise ValueError(
            "ranking='lookahead' needs the partition structure and the seed order, which this run or "
            "trace does not have"
        )
    return LookaheadRanking(buffer, lookahead, upcoming, sampled_ahead, horizon, discount)


def lookahead_reach(capacity: int, rows_per_minibatch: float, reach: float = 2.0) -> tuple[int, float]:
    """Horizon and discount of the lookahead matched to the buffer: it holds the remote rows of about
    ``capacity / rows_per_minibatch`` minibatches, so a need much further away than that cannot change what it
    should keep, while nearer needs must dominate. The weights decay over ``reach`` times that many minibatches
    (``discount = 1 - 1/that``, in [0.5, 0.98]) and stop at 4 times that (horizon in [8, 64]).

    A small buffer gets a short, steep horizon, a large one a long, flat one (how ``reach`` was chosen:
    BENCHMARKS.md, P1)."""
    span = max(1.0, reach * capacity / max(rows_per_minibatch, 1.0))
    discount = round(float(np.clip(1.0 - 1.0 / span, 0.5, 0.98)), 3)
    horizon = int(np.clip(np.ceil(4 * round(span, 3)), 8, 64))
    return horizon, discount


def _score_first(lookahead, upcoming, n: int = 4) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Expected remote needs of the first ``n`` known minibatches (their mean size sets the lookahead's reach)."""
    seeds = upcoming(0, n) if (upcoming is not None and lookahead is not None) else []
    return {j: lookahead.scores([s], 1.0) for j, s in enumerate(seeds)}


_EXACT_TOP = 1e200  # priorities of rows with a known next use sit above every expected need
_EXACT_STEP = 2.0**-40  # relative step per minibatch between known next uses (exact in float64)
_NO_USE = np.iinfo(np.int32).max


class _PredictedNeed:
    """The buffer's priority under lookahead, kept up to date minibatch by minibatch.

    ``need``: ``sum_i discount**i * need_{m+i}`` over the known minibatches after the current one ``m``
    (``i = 1 .. horizon-1``): the expected remote rows of each minibatch, or its remote ids exactly where it was
    sampled ahead already. Each minibatch's expected needs are computed once, in a background thread, up to 16
    minibatches before it enters the horizon; the sum slides by subtracting the minibatch that leaves and adding
    those that enter. Weights are ``discount**j`` for absolute minibatch ``j`` (the same factor for every node at
    a given time, so the order is unchanged), rescaled now and then to stay in range.

    ``priority`` (what the buffer admits and evicts by): a row whose next use is known exactly (a minibatch sampled
    ahead needs it) ranks above every row whose use is only expected, and among those the sooner use first:
    Belady's MIN as far as the sampled-ahead minibatches reach (``_EXACT_TOP * (1 - j * 2**-40)`` for the next
    known use ``j``); every other row ranks by ``need``. Known next uses are tracked with one successor link per
    sampled-ahead request, so a minibatch leaving the window hands each of its rows its next known use.
    """

    def __init__(self, buffer, lookahead, upcoming, horizon: int, discount: float, sampled_ahead=None):
        self.buffer, self.lookahead, self.upcoming = buffer, lookahead, upcoming
        self.sampled_ahead = sampled_ahead
        self.horizon, self.discount = horizon, discount
        self.need = np.zeros(buffer.num_nodes, dtype=np.float64)
        self.priority = np.zeros(buffer.num_nodes, dtype=np.float64)
        self.next_known = np.full(buffer.num_nodes, _NO_USE, dtype=np.int32)  # next use known exactly
        self._last_known = np.full(buffer.num_nodes, -1, dtype=np.int32)  # latest known use (minibatch)
        self._last_pos = np.zeros(buffer.num_nodes, dtype=np.int32)  # its position in that minibatch's ids
        self._succ: dict[int, np.ndarray] = {}  # exact minibatch -> next known use of each of its ids
        self.included: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # minibatch -> (ids, weighted needs)
        self.exact: set[int] = set()  # minibatches included with their sampled remote ids
        self.scored: dict = {}  # minibatch -> future of its expected needs, not yet included
        self.base = 0  # weights are discount ** (j - base)
        self.at = -1

    def _refresh(self, ids: np.ndarray) -> None:
        """Recompute the priority of ``ids`` whose next known use changed. (A change of need alone is added to
        the priority as it is to the need: under a known use it is lost in the rounding, as it should be.)"""
        nxt = self.next_known[ids]
        known = nxt != _NO_USE
        self.priority[ids] = np.where(known, _EXACT_TOP * (1.0 - nxt.astype(np.float64) * _EXACT_STEP), self.need[ids])

    def _add_need(self, ids: np.ndarray, w) -> None:
        self.need[ids] += w
        self.priority[ids] += w

    def _add_exact(self, j: int, ids: np.ndarray) -> None:
        """Minibatch ``j`` (later than every exact one so far) is known exactly: link each id's previous known use
        to it, and make it the next known use of ids that had none."""
        prev = self._last_known[ids]
        linked = prev > self.at  # a known use still ahead: j is its successor
        self._succ[j] = np.full(ids.size, _NO_USE, dtype=np.int32)
        if linked.any():  # grouped by previous use with one sort, not one pass over the ids per group
            p, pos = prev[linked], self._last_pos[ids[linked]]
            span = p - p.min()  # previous uses lie in the sampled-ahead window: a small range, radix-sorted
            order = np.argsort(span.astype(np.uint8 if span.max() < 256 else np.int64), kind="stable")
            p, pos = p[order], pos[order]
            starts = np.flatnonzero(np.concatenate(([True], p[1:] != p[:-1])))
            for a, b in zip(starts, np.append(starts[1:], p.size)):
                self._succ[int(p[a])][pos[a:b]] = j
        fresh = ids[~linked]
        self.next_known[fresh] = j
        self._last_known[ids] = j
        self._last_pos[ids] = np.arange(ids.size, dtype=np.int32)
        self._refresh(fresh)

    def _drop_exact(self, j: int, ids: np.ndarray) -> None:
        """Minibatch ``j`` has come: its ids' next known use moves to their successor (or none)."""
        succ = self._succ.pop(j, None)
        if succ is not None:
            self.next_known[ids] = succ
            self._refresh(ids)

    def advance(self, m: int) -> None:
        if m == self.at:
            return
        self.at = m
        for j in sorted(j for j in self.included if j <= m):
            ids, w = self.included.pop(j)
            self._add_need(ids, -w)
            if j in self.exact:
                self._drop_exact(j, ids)
                self.exact.discard(j)
        for j in [j for j in self.scored if j <= m]:
            del self.scored[j]
        if m - self.base > 200:  # rescale before discount ** (j - base) underflows
            scale = self.discount ** -(m - self.base)
            self.need *= scale
            self.included = {j: (ids, w * scale) for j, (ids, w) in self.included.items()}
            self.base = m
            unknown = self.next_known == _NO_USE
            self.priority[unknown] = self.need[unknown]
        known = self.sampled_ahead(m) if self.sampled_ahead is not None else []
        for i, ids in enumerate(known, start=1):  # sampled already: their remote rows exactly, replacing the guess
            j = m + i
            if j in self.exact:
                continue
            if j in self.included:
                old_ids, old_w = self.included.pop(j)
                self._add_need(old_ids, -old_w)
            w = np.full(ids.size, self.discount ** (j - self.base))
            self._add_need(ids, w)
            self.included[j] = (ids, w)
            self.exact.add(j)
            self._add_exact(j, ids)
        self._submit_upcoming(m)
        for j in range(m + 1, m + self.horizon):  # guesses for the minibatches entering the horizon
            if j in self.included:
                continue
            if j not in self.scored:
                break  # its seeds are not known yet (the next epoch)
            ids, need = self.scored.pop(j).result()
            w = need * self.discount ** (j - self.base)
            self._add_need(ids, w)
            self.included[j] = (ids, w)
        self.buffer.set_dense_priority(self.priority)

    def __deepcopy__(self, memo):
        """A copy for trying an option from the same state (e.g. the best-level oracle): the state is copied, the
        partition structure and the seed-order callables are shared, guesses still being scored are waited for."""
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "scored":
                new.scored = {}
                for j, future in value.items():
                    new.scored[j] = Future()
                    new.scored[j].set_result(future.result())
            elif key not in ("lookahead", "upcoming", "sampled_ahead"):
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def add_scored(self, scored: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Expected needs already computed (minibatch -> (ids, needs)), used as if scored in the background."""
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
        _SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rudder-lookahead")
    return _SCORER
