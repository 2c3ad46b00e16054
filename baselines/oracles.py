"""Offline oracles over a recorded remote-id stream: the fewest fetches any buffer of B rows could do, and friends.

Input everywhere is ``minibatches``: for each minibatch in order, the (unique) int64 remote node ids it needed, as
recorded by a trainer. Every oracle returns an :class:`OracleResult` whose counters mean what the
:class:`~rudder.env.buffer.BufferCounters` of the same name mean (all in rows):

- :func:`belady_min` — the physical limit: Belady's MIN with bypass, the fewest remote rows any policy with a
  ``capacity``-row buffer (starting empty, prefetching allowed) can pull. :func:`belady_min_curve` runs it for
  several capacities over one shared precomputation.
- :func:`hindsight_static` — the best static buffer in hindsight: filled once with the ``capacity`` ids needed in
  the most minibatches, never changed (what ``--buffer-init`` + policy ``static`` could reach at best).
- :func:`no_prefetch` — no buffer at all: every remote row pulled on demand.
- :func:`hit_ceiling` — the most hits a ``capacity``-row buffer can have in each minibatch, whatever it prefetches:
  the hit-rate ceiling. Belady MIN bounds traffic, not hit rate (a buffer that prefetches a minibatch's rows before
  it can hit more than MIN does, paying the same pulls earlier), so hit rates are compared with this instead.

Cost model, per minibatch ``t`` needing the id set ``S_t``: with ``R`` the rows resident before ``t``, the
``|S_t ∩ R|`` hits are served from the buffer and the ``|S_t \\ R|`` misses cost one remote row each; afterwards the
buffer may keep any ``R' ⊆ R ∪ S_t`` with ``|R'| <= capacity`` (a fetched row may be admitted or bypassed, any
resident may be evicted). The rows of one minibatch are needed together: hits are decided against the buffer as it
was before the minibatch, whatever order its ids come in.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_HEAP_SLACK_MIN = 1 << 16  # dead heap entries tolerated before a rebuild (at least; or num_ids // 4)

__all__ = [
    "OracleResult",
    "belady_min",
    "belady_min_chunked",
    "belady_min_curve",
    "hindsight_static",
    "hindsight_static_chunked",
    "hindsight_static_ids",
    "hit_ceiling",
    "no_prefetch",
]


@dataclass(frozen=True)
class OracleResult:
    """What an oracle buffer did over a whole stream; counts in rows (one row = one remote node's features).

    Attributes:
        oracle: which oracle produced it (``"belady_min"``, ``"hindsight_static"``, ``"no_prefetch"``).
        capacity: buffer size, rows.
        remote_sampled: remote rows needed, summed over minibatches (= ``hits + misses``).
        hits: rows served from the buffer.
        misses: rows pulled on demand.
        remote_fetched: rows pulled over RPC, initial fill included (= ``misses + prefetched``).
        prefetched: rows pulled beyond the misses; for these oracles only the initial fill.
        initial_fill: of ``prefetched``, rows pulled by the initial fill, before minibatch 0.
        per_minibatch_hits: int64 array, shape ``(num_minibatches,)``: hits of each minibatch.
        per_minibatch_fetched: int64 array, shape ``(num_minibatches,)``: rows pulled during each minibatch
            (the initial fill is not in it: ``remote_fetched == initial_fill + per_minibatch_fetched.sum()``).
    """

    oracle: str
    capacity: int
    remote_sampled: int
    hits: int
    misses: int
    remote_fetched: int
    prefetched: int
    initial_fill: int
    per_minibatch_hits: np.ndarray
    per_minibatch_fetched: np.ndarray

    @property
    def hit_rate(self) -> float:
        """``hits / remote_sampled`` (0 for an empty stream)."""
        return self.hits / self.remote_sampled if self.remote_sampled else 0.0

    def as_dict(self) -> dict[str, int | float | str]:
        """The scalar counters (no per-minibatch arrays), e.g. for a JSON summary."""
        return dict(
            oracle=self.oracle,
            capacity=self.capacity,
            remote_sampled=self.remote_sampled,
            hits=self.hits,
            misses=self.misses,
            remote_fetched=self.remote_fetched,
            prefetched=self.prefetched,
            initial_fill=self.initial_fill,
            hit_rate=self.hit_rate,
        )


# ---------------------------------------------------------------------------------------------------- stream


@dataclass(frozen=True)
class _Stream:
    """A recorded stream flattened, with ids made dense and each request's next use precomputed.

    ``dense_ids[i]`` is request ``i``'s id renumbered to ``[0, num_ids)`` (ascending with the original ids);
    ``next_use[i]`` is the index of the next minibatch needing that id again, ``num_minibatches`` when none.
    Requests of minibatch ``t`` are ``offsets[t]:offsets[t + 1]``.
    """

    dense_ids: np.ndarray  # int64, (num_requests,)
    next_use: np.ndarray  # int64, (num_requests,), minibatch index
    first_use: np.ndarray  # bool, (num_requests,): the id's first request in the stream
    offsets: np.ndarray  # int64, (num_minibatches + 1,)
    distinct_ids: np.ndarray  # int64, (num_ids,): original id of each dense id
    request_minibatches: np.ndarray  # int64, (num_ids,): minibatches needing each dense id

    @property
    def num_minibatches(self) -> int:
        return self.offsets.size - 1

    @property
    def num_requests(self) -> int:
        return self.dense_ids.size

    @property
    def num_ids(self) -> int:
        return self.distinct_ids.size

    def per_minibatch_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def _flatten(minibatches: Sequence[np.ndarray]) -> _Stream:
    """Flatten the stream and precompute next uses with one sort (no per-request Python work)."""
    arrays = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in minibatches]
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    n = flat.size
    minibatch_of = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    # Sort by (id, minibatch): requests of one id end up together, in minibatch order. One int64 key
    # (id * num_minibatches + minibatch) lets the faster unstable sort do it; else a stable sort by id (flat is in
    # minibatch order already).
    id_min = int(flat.min()) if n else 0
    id_span = int(flat.max()) - id_min + 1 if n else 0
    if id_span * max(sizes.size, 1) < 2**62:
        order = np.argsort((flat - id_min) * sizes.size + minibatch_of)
    else:
        order = np.argsort(flat, kind="stable")
    ids_sorted = flat[order]
    mb_sorted = minibatch_of[order]
    same_as_next = ids_sorted[1:] == ids_sorted[:-1]  # request k and k+1 (sorted) are the same id
    if np.any(same_as_next & (mb_sorted[1:] == mb_sorted[:-1])):
        bad = int(ids_sorted[1:][same_as_next & (mb_sorted[1:] == mb_sorted[:-1])][0])
        raise ValueError(f"remote ids must be unique within a minibatch; id {bad} repeats")
    next_sorted = np.full(n, sizes.size, dtype=np.int64)
    next_sorted[:-1][same_as_next] = mb_sorted[1:][same_as_next]
    starts = np.ones(n, dtype=bool)  # first request of each id (sorted)
    starts[1:] = ~same_as_next
    dense_sorted = np.cumsum(starts) - 1
    dense_ids = np.empty(n, dtype=np.int64)
    dense_ids[order] = dense_sorted
    next_use = np.empty(n, dtype=np.int64)
    next_use[order] = next_sorted
    first_use = np.empty(n, dtype=bool)
    first_use[order] = starts
    distinct_ids = ids_sorted[starts]
    request_minibatches = np.diff(np.append(np.flatnonzero(starts), n)).astype(np.int64)
    return _Stream(
        dense_ids=dense_ids,
        next_use=next_use,
        first_use=first_use,
        offsets=offsets,
        distinct_ids=distinct_ids,
        request_minibatches=request_minibatches,
    )


def _result(
    oracle: str, capacity: int, stream: _Stream, per_minibatch_hits: np.ndarray, initial_fill: int = 0
) -> OracleResult:
    per_minibatch_hits = np.asarray(per_minibatch_hits, dtype=np.int64)
    per_minibatch_fetched = stream.per_minibatch_sizes() - per_minibatch_hits
    hits = int(per_minibatch_hits.sum())
    misses = int(per_minibatch_fetched.sum())
    return OracleResult(
        oracle=oracle,
        capacity=int(capacity),
        remote_sampled=stream.num_requests,
        hits=hits,
        misses=misses,
        remote_fetched=misses + initial_fill,
        prefetched=initial_fill,
        initial_fill=initial_fill,
        per_minibatch_hits=per_minibatch_hits,
        per_minibatch_fetched=per_minibatch_fetched,
    )


# ---------------------------------------------------------------------------------------------------- oracles


def no_prefetch(minibatches: Sequence[np.ndarray]) -> OracleResult:
    """No buffer (capacity 0): every remote row of every minibatch is pulled on demand; the reference cost."""
    stream = _flatten(minibatches)
    return _result("no_prefetch", 0, stream, np.zeros(stream.num_minibatches, dtype=np.int64))


def hit_ceiling(minibatches: Sequence[np.ndarray], capacity: int) -> np.ndarray:
    """The most hits any buffer of ``capacity`` rows can have in each minibatch: ``min(capacity, |S_t|)``.

    A hit is a row of the minibatch resident before it, and at most ``capacity`` rows are resident; a buffer that
    prefetched exactly the minibatch's rows (or ``capacity`` of them) beforehand reaches it, so the bound is tight
    for a policy allowed unlimited prefetching. Returns an int64 array, one entry per minibatch."""
    _check_capacity(capacity)
    sizes = np.asarray([np.asarray(ids).size for ids in minibatches], dtype=np.int64)
    return np.minimum(sizes, int(capacity))


def hindsight_static_ids(minibatches: Sequence[np.ndarray], capacity: int) -> np.ndarray:
    """The best static buffer's contents: the ``capacity`` ids needed in the most minibatches, ties by lower id.

    Returns at most ``capacity`` int64 ids (fewer when the stream has fewer distinct ids), best first.
    """
    _check_capacity(capacity)
    return _static_ids(_flatten(minibatches), capacity)


def hindsight_static(minibatches: Sequence[np.ndarray], capacity: int) -> OracleResult:
    """The best static buffer in hindsight: filled once before minibatch 0, never changed.

    The fill is :func:`hindsight_static_ids` (the ``capacity`` ids needed in the most minibatches, ties by lower
    id), which maximises hits among all fixed sets of ``capacity`` ids. The fill's rows count as ``prefetched``
    (and ``initial_fill``) and in ``remote_fetched``; every request of another id is a miss. On short streams this
    can pull more than :func:`no_prefetch` (ids needed once cost the same either way, the fill is paid up front);
    it never pulls fewer than :func:`belady_min`, which can hold the same set from each id's first use.

    Args:
        minibatches: per minibatch, the unique int64 remote ids it needed.
        capacity: buffer size, rows (>= 0).
    """
    _check_capacity(capacity)
    stream = _flatten(minibatches)
    fill = _static_ids(stream, capacity)
    resident = np.zeros(stream.num_ids, dtype=bool)
    resident[np.searchsorted(stream.distinct_ids, fill)] = True
    per_minibatch_hits = _per_minibatch_count(stream, resident[stream.dense_ids])
    return _result("hindsight_static", capacity, stream, per_minibatch_hits, initial_fill=int(fill.size))


def belady_min(minibatches: Sequence[np.ndarray], capacity: int) -> OracleResult:
    """The fewest remote rows any ``capacity``-row buffer could pull: Belady's MIN with bypass, per minibatch.

    The buffer starts empty. After minibatch ``t`` (its hits served from the buffer as it was, its misses pulled),
    the buffer keeps, among its residents and the rows just pulled, the ``capacity`` whose next use is soonest;
    rows never needed again are never kept. A missed row whose next use is later than every resident's is
    therefore not admitted (bypass), otherwise it replaces the resident needed furthest in the future.
    ``prefetched`` is 0: prefetching never helps (point 1 below).

    Why this is optimal (cost = rows pulled, buffer of ``B`` rows, the model of the module docstring):

    1. Some optimal schedule is lazy (pulls a row only when a minibatch needs it): a row prefetched ahead of its
       next use ``u`` can instead be pulled at ``u`` (or never, if the schedule drops it before ``u``), costing the
       same or less and using no more slots in between. A lazy schedule is a sequence of resident sets with
       ``R_t ⊆ R_{t-1} ∪ S_t``, ``|R_t| <= B``, cost ``Σ_t |S_t \\ R_{t-1}|``.
    2. Exchange: let OPT be an optimal lazy schedule equal to MIN before minibatch ``t`` and, after ``t``, holding
       ``J`` where MIN holds ``K`` instead, so ``next(K) <= next(J)`` and ``K ∉ OPT's R_t``. Change OPT to hold
       ``K`` in ``J``'s slot from ``t`` on, for as long as OPT holds ``J`` and no later than ``next(K)``; then
       neither until ``next(J)``; then follow OPT. This is legal (``K ∈ S_t``; lazy OPT cannot hold ``K`` before
       ``next(K)``; ``J`` is re-admissible at ``next(J)``), and it gains the hit on ``K`` at ``next(K)`` whenever it
       loses the hit on ``J`` at ``next(J)``, so it is still optimal. If OPT holds fewer than ``B`` rows and no such
       ``J``, add ``K`` the same way (dropping it when OPT needs the slot). Repeating makes OPT equal MIN after
       ``t``; induction over ``t`` makes MIN optimal.

    Note the minibatch granularity: flattening the stream into single requests in a fixed order is not the same
    problem. With ``B = 1`` and minibatches ``{1}, {2, 1}, {2}``, MIN here pulls 2 rows (1 is a hit in minibatch 1,
    then 2 is kept), whereas request-level MIN on ``1, 2, 1, 2`` pulls 3.

    Cost: one sort of the ``N`` requests, then per minibatch a few vectorised steps plus one heap push per
    kept row and one heap pop per eviction (a max-heap on next use with lazy deletion); about ``O(N log B)``.

    Args:
        minibatches: per minibatch, the unique int64 remote ids it needed.
        capacity: buffer size, rows (>= 0).
    """
    _check_capacity(capacity)
    return _belady(_flatten(minibatches), int(capacity))


def belady_min_curve(minibatches: Sequence[np.ndarray], capacities: Iterable[int]) -> dict[int, OracleResult]:
    """:func:`belady_min` for each capacity (rows), sharing the flattening and next-use precomputation.

    Returns ``{capacity: result}`` in the order given; remote_fetched is non-increasing in capacity.
    """
    capacities = [int(c) for c in capacities]
    for c in capacities:
        _check_capacity(c)
    stream = _flatten(minibatches)
    return {c: _belady(stream, c) for c in capacities}


def belady_min_chunked(
    minibatches: Sequence[np.ndarray],
    capacity: int,
    num_ids: int | None = None,
    chunk_minibatches: int = 128,
    progress=None,
) -> OracleResult:
    """:func:`belady_min` for streams too long to flatten (10^8 requests): the same result, exactly, with memory
    in proportion to the distinct ids plus one chunk of requests.

    Next uses are computed chunk by chunk, backwards (a last-seen array over the ids: the request of minibatch
    ``t`` of id ``i`` gets the minibatch that last claimed ``i``, then claims it), each chunk's spilled to a
    temporary file as int32 (int64 when the stream has 2^31 minibatches or more); the forward pass reads them back
    chunk by chunk. ``minibatches`` may be dense ids in ``[0, num_ids)`` (e.g. a replay's local ids: give
    ``num_ids``) or any int64 ids (renumbered through their sorted distinct values, found chunk by chunk).
    ``progress(n)`` is called with the minibatches done (both passes count, ``2 * len(minibatches)`` in all).
    """
    import os
    import tempfile

    _check_capacity(capacity)
    capacity = int(capacity)
    n = len(minibatches)
    step = max(int(chunk_minibatches), 1)
    if num_ids is None:
        universe = np.unique(
            np.concatenate(
                [
                    np.unique(
                        np.concatenate(
                            [np.asarray(x, dtype=np.int64).reshape(-1) for x in minibatches[i : i + step]]
                            or [np.zeros(0, np.int64)]
                        )
                    )
                    for i in range(0, n, step)
                ]
                or [np.zeros(0, np.int64)]
            )
        )
        num_ids = int(universe.size)

        def dense(i):
            return np.searchsorted(universe, np.asarray(minibatches[i], dtype=np.int64).reshape(-1))
    else:

        def dense(i):
            return np.asarray(minibatches[i]).reshape(-1)

    sizes = np.fromiter((np.asarray(x).size for x in minibatches), np.int64, n)
    if capacity == 0 or sizes.sum() == 0:
        hits = np.zeros(n, dtype=np.int64)
    else:
        nxt_dtype = np.int32 if n < 2**31 - 1 else np.int64
        last = np.full(num_ids, n, dtype=nxt_dtype)  # the earliest later minibatch needing each id
        with tempfile.TemporaryDirectory(prefix="rudder-belady-") as tmp:
            for c0 in reversed(range(0, n, step)):  # backwards: next uses, one chunk at a time
                parts = []
                for t in range(min(c0 + step, n) - 1, c0 - 1, -1):
                    ids = dense(t)
                    parts.append(last[ids])
                    last[ids] = t
                    if progress:
                        progress(1)
                parts.reverse()
                np.save(os.path.join(tmp, f"{c0}.npy"), np.concatenate(parts) if parts else np.zeros(0, nxt_dtype))
            del last

            def forward():
                for c0 in range(0, n, step):
                    nxt = np.load(os.path.join(tmp, f"{c0}.npy"))
                    at = 0
                    for t in range(c0, min(c0 + step, n)):
                        ids = dense(t)
                        yield t, ids, nxt[at : at + ids.size]
                        at += ids.size
                        if progress:
                            progress(1)

            hits = _belady_hits(capacity, num_ids, n, forward())
    fetched = sizes - hits
    return OracleResult(
        oracle="belady_min",
        capacity=capacity,
        remote_sampled=int(sizes.sum()),
        hits=int(hits.sum()),
        misses=int(fetched.sum()),
        remote_fetched=int(fetched.sum()),
        prefetched=0,
        initial_fill=0,
        per_minibatch_hits=hits,
        per_minibatch_fetched=fetched,
    )


def hindsight_static_chunked(minibatches: Sequence[np.ndarray], capacity: int, num_ids: int) -> OracleResult:
    """:func:`hindsight_static` over dense ids in ``[0, num_ids)`` without flattening the stream: the same fill
    (the ``capacity`` ids needed in the most minibatches, ties by lower id) and counts; memory per distinct id."""
    _check_capacity(capacity)
    counts = np.zeros(num_ids, dtype=np.int64)
    for x in minibatches:
        counts[np.asarray(x)] += 1
    needed = np.flatnonzero(counts)
    k = min(int(capacity), needed.size)
    fill = needed[np.lexsort((needed, -counts[needed]))[:k]]
    resident = np.zeros(num_ids, dtype=bool)
    resident[fill] = True
    hits = np.fromiter((np.count_nonzero(resident[np.asarray(x)]) for x in minibatches), np.int64, len(minibatches))
    sizes = np.fromiter((np.asarray(x).size for x in minibatches), np.int64, len(minibatches))
    fetched = sizes - hits
    return OracleResult(
        oracle="hindsight_static",
        capacity=int(capacity),
        remote_sampled=int(sizes.sum()),
        hits=int(hits.sum()),
        misses=int(fetched.sum()),
        remote_fetched=int(fetched.sum()) + int(k),
        prefetched=int(k),
        initial_fill=int(k),
        per_minibatch_hits=hits,
        per_minibatch_fetched=fetched,
    )


# ---------------------------------------------------------------------------------------------------- internals


def _check_capacity(capacity: int) -> None:
    if int(capacity) != capacity or capacity < 0:
        raise ValueError(f"buffer capacity must be a non-negative integer, got {capacity!r}")


def _per_minibatch_count(stream: _Stream, request_mask: np.ndarray) -> np.ndarray:
    """How many requests of each minibatch ``request_mask`` (bool, one per request) selects; int64."""
    minibatch_of = np.repeat(np.arange(stream.num_minibatches), stream.per_minibatch_sizes())
    return np.bincount(minibatch_of[request_mask], minlength=stream.num_minibatches).astype(np.int64)


def _static_ids(stream: _Stream, capacity: int) -> np.ndarray:
    k = min(int(capacity), stream.num_ids)
    order = np.lexsort((stream.distinct_ids, -stream.request_minibatches))[:k]  # most minibatches, then lower id
    return stream.distinct_ids[order]


def _belady(stream: _Stream, capacity: int) -> OracleResult:
    """Belady's MIN with bypass over a flattened stream (see :func:`belady_min`)."""
    num_minibatches, num_ids = stream.num_minibatches, stream.num_ids
    if capacity == 0 or stream.num_requests == 0:
        return _result("belady_min", capacity, stream, np.zeros(num_minibatches, dtype=np.int64))
    if capacity >= num_ids:  # nothing is ever evicted: every request but an id's first is a hit
        return _result("belady_min", capacity, stream, _per_minibatch_count(stream, ~stream.first_use))
    offsets = stream.offsets
    per_minibatch_hits = _belady_hits(
        capacity,
        num_ids,
        num_minibatches,
        (
            (t, stream.dense_ids[offsets[t] : offsets[t + 1]], stream.next_use[offsets[t] : offsets[t + 1]])
            for t in range(num_minibatches)
        ),
    )
    return _result("belady_min", capacity, stream, per_minibatch_hits)


def _belady_hits(capacity: int, num_ids: int, num_minibatches: int, minibatches) -> np.ndarray:
    """The heart of :func:`belady_min`: per-minibatch hits of MIN with bypass, given ``(t, dense ids, next uses)``
    for each minibatch ``t`` in order (next use ``num_minibatches`` when none). Shared by the in-memory and the
    chunked (:func:`belady_min_chunked`) precomputation of next uses."""
    never = num_minibatches  # next_use of an id not needed again
    if (never + 1) * num_ids >= 2**62:
        raise ValueError("stream too long to encode (next use, id) in int64")
    # A resident id's heap key is next_use * num_ids + id: one int orders by next use (ties by id) and names the id.
    # The heap holds -key (heapq is a min-heap); an entry is live iff key_of[id] still equals its next use.
    key_of = np.full(num_ids, -1, dtype=np.int64)  # next use of each resident id, -1 when not resident
    heap: list[int] = []
    resident = 0
    compact_at_slack = max(_HEAP_SLACK_MIN, num_ids // 4)  # rebuild the heap when it carries this many dead entries
    per_minibatch_hits = np.zeros(num_minibatches, dtype=np.int64)
    heappush, heappop, heapify = heapq.heappush, heapq.heappop, heapq.heapify

    def push_all(keys: np.ndarray) -> None:
        nonlocal heap
        entries = (-keys).tolist()
        if len(entries) * 8 > len(heap):
            heap.extend(entries)
            heapify(heap)
        else:
            for e in entries:
                heappush(heap, e)

    for t, ids, nxt in minibatches:
        if ids.size == 0:
            continue
        ids, nxt = ids.astype(np.int64, copy=False), nxt.astype(np.int64, copy=False)
        hit = key_of[ids] >= 0
        n_hit = int(np.count_nonzero(hit))
        per_minibatch_hits[t] = n_hit
        if n_hit:  # hits move to their next use; those never needed again leave at once
            hit_ids, hit_next = ids[hit], nxt[hit]
            done = hit_next == never
            key_of[hit_ids] = np.where(done, -1, hit_next)
            resident -= int(np.count_nonzero(done))
            keep = ~done
            if keep.any():
                push_all(hit_next[keep] * num_ids + hit_ids[keep])
            want = ~hit & (nxt < never)
        else:
            want = nxt < never
        if not want.any():
            continue
        # Misses needed again, soonest first: the first `free` fill empty slots; each further one replaces the
        # resident needed furthest ahead if that is later than its own next use, else it and all later are bypassed.
        miss_keys = np.sort(nxt[want] * num_ids + ids[want])
        free = capacity - resident
        admitted = min(free, miss_keys.size)
        evicted = 0
        if miss_keys.size > free:
            for key in miss_keys[free:].tolist():
                while heap:  # drop dead entries off the top
                    top = -heap[0]
                    victim = top % num_ids
                    if key_of[victim] == top // num_ids:
                        break
                    heappop(heap)
                if not heap or top <= key:
                    break
                heappop(heap)
                key_of[victim] = -1
                evicted += 1
                admitted += 1
        new_keys = miss_keys[:admitted]
        key_of[new_keys % num_ids] = new_keys // num_ids
        resident += admitted - evicted
        push_all(new_keys)
        if len(heap) > 2 * resident + compact_at_slack:
            live = np.flatnonzero(key_of >= 0)
            heap = (-(key_of[live] * num_ids + live)).tolist()
            heapify(heap)
    return per_minibatch_hits


def _synthetic_stream(
    num_requests: int, ids_per_minibatch: int, num_ids: int, zipf_a: float, seed: int = 0
) -> list[np.ndarray]:
    """A skewed synthetic stream: each minibatch draws unique ids with Zipf-like popularity over ``num_ids`` ids."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_ids + 1) ** zipf_a
    popularity /= popularity.sum()
    relabel = rng.permutation(num_ids)
    stream = []
    for _ in range(num_requests // ids_per_minibatch):
        draw = rng.choice(num_ids, size=2 * ids_per_minibatch, p=popularity)
        _, first = np.unique(draw, return_index=True)
        stream.append(relabel[draw[np.sort(first)][:ids_per_minibatch]].astype(np.int64))
    return stream


if __name__ == "__main__":  # throughput of belady_min on a synthetic 2-million-request stream
    import time

    minibatches = _synthetic_stream(num_requests=2_000_000, ids_per_minibatch=1000, num_ids=200_000, zipf_a=0.8)
    n_requests = sum(m.size for m in minibatches)
    for capacity in (2_000, 20_000, 100_000):
        t0 = time.perf_counter()
        res = belady_min(minibatches, capacity)
        wall_s = time.perf_counter() - t0
        print(
            f"capacity {capacity:>7}: {n_requests} requests in {wall_s:.2f} s = {n_requests / wall_s / 1e6:.2f} "
            f"M requests/s; hit rate {res.hit_rate:.3f}, fetched {res.remote_fetched}"
        )
