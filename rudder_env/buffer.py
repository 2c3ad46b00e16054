"""The per-trainer prefetch buffer of remote node features: one implementation for live training and replay.

A trainer's minibatch needs the features of its input nodes; those owned by another partition ("remote") cost an
RPC. The buffer keeps ``capacity`` remote rows locally. Per minibatch (:meth:`PrefetchBuffer.begin` /
:meth:`PrefetchBuffer.finish`, or :meth:`PrefetchBuffer.lookup` in one call):

- remote ids already resident are **hits**, served from the buffer; the others are **misses**, pulled remotely;
- every resident slot has a score that decays by ``(1 - alpha)`` per minibatch and is restored to 1 on a hit
  (MassiveGNN / Rudder). The score is kept lazily as the minibatch of the last hit: ``score = (1-alpha)**age``.
  A slot is an eviction candidate when its score is below ``(1-alpha)**period`` (i.e. ``age > period``);
- every remote node has a decayed miss count (``m *= 1-alpha`` per minibatch, ``+1`` per miss), also lazy;
  replacement candidates are the non-resident nodes with the highest decayed miss count (:meth:`candidates`);
- :meth:`apply` takes a prefetch set. ``prefetch="inline"``: those ids are fetched in the same pull as the next
  minibatch's misses and replace the lowest-score entries (empty slots first). ``prefetch="background"``: they
  are queued; the driver requests them in chunks (:meth:`take`) from a background worker while training goes on,
  and each chunk enters the buffer when it has arrived, before the next minibatch (:meth:`arrive`), replacing the
  slots the ranking would evict then. A minibatch's misses are pulled on the critical path either way; a miss on a
  row requested but not delivered yet is *late*;
- with ``admit_on_miss`` (ours, in neither Rudder nor MassiveGNN), rows a miss fetched anyway may take empty or
  evictable slots at no extra traffic, most-missed first.

The buffer holds ids, scores and counters; with ``feat_dim > 0`` it also holds the rows (live), with
``feat_dim == 0`` only the ids (replay): the decisions and counters are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rudder.env.defaults import DEFAULTS
from rudder.env.settings import check

EMPTY = -1


@dataclass
class BufferCounters:
    """What the buffer did, in rows (each remote input row of each minibatch counts once)."""

    minibatches: int = 0
    remote_sampled: int = 0  # remote input rows needed
    hits: int = 0  # served from the buffer
    misses: int = 0  # pulled on demand
    remote_fetched: int = 0  # rows pulled over RPC: misses + prefetched
    prefetched: int = 0  # rows pulled only because a prefetch set (or the initial fill) asked for them
    initial_fill: int = 0  # of ``prefetched``: rows of the initial fill
    admitted_on_miss: int = 0  # missed rows that entered the buffer at no extra traffic
    evicted: int = 0  # resident rows replaced
    prefetch_used: int = 0  # rows a prefetch set brought in (initial fill excluded) hit before their eviction
    late: int = 0  # misses on rows a background prefetch had requested but not delivered yet
    prefetch_unused: int = 0  # rows a prefetch set brought in that were evicted before any hit

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)  # flat ints: dataclasses.asdict's deep copy costs more than the rest of it


@dataclass(frozen=True)
class MinibatchCounts:
    """Counts of one minibatch (see :class:`BufferCounters`)."""

    remote_sampled: int
    hits: int
    misses: int
    remote_fetched: int
    prefetched: int
    late: int = 0  # misses on rows a background prefetch had requested but not delivered yet
    arrived: int = 0  # of ``prefetched``: rows a background prefetch delivered before this minibatch


PREFETCH_CHUNK = 2048  # rows a background prefetch requests at a time: a demand pull waits behind one at most


class PrefetchBuffer:
    """Fixed-capacity buffer of remote node rows with decaying scores.

    Args:
        capacity: number of slots (rows).
        num_nodes: size of the global node-id space; ids must lie in ``[0, num_nodes)``.
        alpha: score decay per minibatch, in (0, 1).
        period: minibatches per decision window; eviction threshold is ``(1-alpha)**period``.
        feat_dim: row width; 0 keeps ids only (replay).
        admit_on_miss: let fetched misses take empty or evictable slots.
        dtype: row dtype.
        prefetch: ``"inline"`` (a prefetch set rides with the next minibatch's pull) or ``"background"``
            (requested in chunks while training goes on; see :meth:`take`, :meth:`arrive`).
    """

    def __init__(
        self,
        capacity: int,
        num_nodes: int,
        alpha: float = DEFAULTS.alpha,
        period: int = DEFAULTS.period,
        feat_dim: int = 0,
        admit_on_miss: bool = False,
        dtype=np.float32,
        prefetch: str = "inline",
    ):
        check("prefetch", prefetch)
        if capacity < 0:
            raise ValueError(f"buffer capacity must be >= 0, got {capacity}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.capacity = int(capacity)
        self.num_nodes = int(num_nodes)
        self.alpha = float(alpha)
        self.period = int(period)
        self.decay = 1.0 - self.alpha
        self.threshold = self.decay**self.period
        self._pow64 = np.ones(1)  # decay**age for ages 0.. (grown on demand): a gather instead of a power per row
        self._pow32 = np.ones(1, dtype=np.float32)
        self.admit_on_miss = bool(admit_on_miss)
        self.feat_dim = int(feat_dim)
        self.slot_ids = np.full(self.capacity, EMPTY, dtype=np.int64)
        self.slot_last_hit = np.zeros(self.capacity, dtype=np.int64)  # minibatch of last hit or admission
        self.slot_of = np.full(self.num_nodes, EMPTY, dtype=np.int32 if capacity < 2**31 else np.int64)
        self.rows = np.zeros((self.capacity, self.feat_dim), dtype=dtype) if self.feat_dim else None
        self.miss_count = np.zeros(self.num_nodes, dtype=np.float32)  # decayed, as of miss_step
        self.miss_step = np.zeros(self.num_nodes, dtype=np.int32)
        self.clock = 0  # minibatches looked up so far: the time scores and miss counts decay by
        self.pending = np.zeros(0, dtype=np.int64)  # prefetch set waiting for the next pull
        self.counters = BufferCounters()
        self._open: dict | None = None
        self._victim_order: np.ndarray | None = None
        self.priority: np.ndarray | None = None  # predicted need per node (set_priority), None: recency scores
        self._priority_ids = np.zeros(0, dtype=np.int64)
        self.prefetch = prefetch
        self.queue = np.zeros(0, dtype=np.int64)  # background: decided, not requested yet, in order
        self.requested = np.zeros(self.num_nodes if prefetch == "background" else 0, dtype=bool)  # not delivered
        self.slot_prefetched = np.zeros(self.capacity, dtype=bool)  # brought by a prefetch set, not hit yet
        self._arrived = 0  # rows delivered since the last minibatch began

    # ------------------------------------------------------------------ state
    @property
    def occupancy(self) -> int:
        return int(np.count_nonzero(self.slot_ids != EMPTY))

    def resident_ids(self) -> np.ndarray:
        return self.slot_ids[self.slot_ids != EMPTY]

    def contains(self, ids) -> np.ndarray:
        return self.slot_of[np.asarray(ids, dtype=np.int64)] != EMPTY

    def slot_scores(self) -> np.ndarray:
        """Score of every slot, ``(1-alpha)**age``; empty slots score -1."""
        scores = self._decayed(self.clock - self.slot_last_hit, np.float64)
        scores[self.slot_ids == EMPTY] = -1.0
        return scores

    def evictable(self) -> np.ndarray:
        """Mask of slots that are empty or below the eviction threshold."""
        age = self.clock - self.slot_last_hit
        return (self.slot_ids == EMPTY) | (age > self.period)

    def decayed_miss_counts(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return self.miss_count[ids] * self._decayed(self.clock - self.miss_step[ids], np.float32)

    def _decayed(self, age: np.ndarray, dtype) -> np.ndarray:
        """``decay ** age`` for integer ages >= 0, in ``dtype`` (float32 or float64), the same values as the power
        taken row by row, read from a table of the powers up to the clock."""
        table = self._pow32 if dtype == np.float32 else self._pow64
        if table.size <= self.clock:
            table = self.decay ** np.arange(self.clock + 64, dtype=dtype)
            if dtype == np.float32:
                self._pow32 = table
            else:
                self._pow64 = table
        return table[age]

    def candidates(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` non-resident (and not requested) nodes missed most often (decayed), best first; ties by lower
        id.

        Returns ``(ids, decayed_miss_counts)``.
        """
        ids = np.flatnonzero((self.miss_count > 0) & (self.slot_of == EMPTY))
        if self.requested.size:  # background: what is on its way is no candidate
            ids = ids[~self.requested[ids]]
        if ids.size == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        counts = self.decayed_miss_counts(ids)
        order = first_in_order(k, -counts, ids)
        return ids[order].astype(np.int64), counts[order]

    # ------------------------------------------------------------------ actions
    def fill(self, ids, fetch=None) -> np.ndarray:
        """Initial fill: put ``ids`` (in order, up to the free slots) in the buffer; counted as prefetched traffic.

        ``fetch(ids) -> rows`` pulls their rows when the buffer holds rows. Returns the ids filled.
        """
        ids = _unique_in_order(np.asarray(ids, dtype=np.int64).reshape(-1))
        ids = ids[self.slot_of[ids] == EMPTY]
        free = np.flatnonzero(self.slot_ids == EMPTY)[: ids.size]
        ids = ids[: free.size]
        rows = np.asarray(fetch(ids)) if (fetch is not None and self.rows is not None and ids.size) else None
        self._install(free, ids, rows)
        self.counters.prefetched += int(ids.size)
        self.counters.remote_fetched += int(ids.size)
        self.counters.initial_fill += int(ids.size)
        return ids

    def apply(self, prefetch_ids, victim_order=None) -> int:
        """Schedule a prefetch set: inline, fetched with the next minibatch's misses, replacing the lowest-score
        slots; in the background, queued for :meth:`take`.

        Ids already resident (or already requested) are dropped; at most ``capacity`` ids are kept, in the order
        given.
        ``victim_order`` (slot indices, first evicted first) overrides the score order for this set, e.g. slots
        ranked by predicted need. Returns the number of ids scheduled.
        """
        self._victim_order = None if victim_order is None else np.asarray(victim_order, dtype=np.int64)
        ids = np.asarray(prefetch_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_nodes):
            raise ValueError(f"prefetch ids must lie in [0, {self.num_nodes}); got [{ids.min()}, {ids.max()}]")
        if self.prefetch == "background":  # queued behind what is queued already; nothing requested twice
            self._victim_order = None  # victims are chosen when the rows arrive
            ids = _unique_in_order(ids)
            ids = ids[(self.slot_of[ids] == EMPTY) & ~self.requested[ids]][: self.capacity]
            self.queue = np.concatenate([self.queue, ids])
            self.requested[ids] = True
            return int(ids.size)
        ids = np.concatenate([self.pending, ids]) if self.pending.size else ids
        ids = _unique_in_order(ids)
        ids = ids[self.slot_of[ids] == EMPTY][: self.capacity]
        self.pending = ids
        return int(ids.size)

    def take(self, max_rows: int = PREFETCH_CHUNK) -> np.ndarray:
        """Background: the next chunk of queued ids to request (at most ``max_rows``, in decision order), skipping
        ids that became resident meanwhile (e.g. admitted on a miss)."""
        while self.queue.size:
            chunk, self.queue = self.queue[:max_rows], self.queue[max_rows:]
            resident = self.slot_of[chunk] != EMPTY
            self.requested[chunk[resident]] = False
            if not resident.all():
                return chunk[~resident]
        return np.zeros(0, dtype=np.int64)

    def arrive(self, ids, rows=None) -> int:
        """Background: a requested chunk has arrived (``rows`` when the buffer holds rows); its rows not resident
        by now enter in place of the slots the ranking evicts first. Every row of it counts as prefetch traffic
        of the next minibatch. Returns the rows installed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.requested[ids] = False
        new = self.slot_of[ids] == EMPTY
        install = ids[new]
        if install.size and self.capacity:
            rows = None if rows is None or self.rows is None else np.asarray(rows)[new]
            self._install(self._prefetch_victims(install.size), install, rows, prefetched=True)
        self._arrived += int(ids.size)
        self.counters.prefetched += int(ids.size)
        self.counters.remote_fetched += int(ids.size)
        return int(min(install.size, self.capacity))

    @property
    def open_misses(self) -> int:
        """Misses of the minibatch between :meth:`begin` and :meth:`finish` (the first ids ``begin`` returned)."""
        return int(self._open["miss_ids"].size) if self._open is not None else 0

    @property
    def in_flight(self) -> int:
        """Background: rows queued or requested and not delivered yet."""
        return int(np.count_nonzero(self.requested)) if self.requested.size else 0

    # ------------------------------------------------------------------ per minibatch
    def begin(self, remote_ids) -> np.ndarray:
        """Start a minibatch needing the (unique) ``remote_ids``; returns the ids to pull: misses, then prefetches."""
        if self._open is not None:
            raise RuntimeError("begin() called twice without finish()")
        ids = np.asarray(remote_ids, dtype=np.int64).reshape(-1)
        self.clock += 1
        t = self.clock
        slots = self.slot_of[ids]
        hit = slots != EMPTY
        hit_slots = slots[hit].astype(np.int64)
        self.slot_last_hit[hit_slots] = t
        if hit_slots.size:
            used = self.slot_prefetched[hit_slots]
            self.counters.prefetch_used += int(np.count_nonzero(used))
            self.slot_prefetched[hit_slots] = False
        hit_rows = self.rows[hit_slots] if self.rows is not None else None  # read before any admission
        miss_ids = ids[~hit]
        if miss_ids.size:
            self.miss_count[miss_ids] = (
                self.miss_count[miss_ids] * self._decayed(t - self.miss_step[miss_ids], np.float32) + 1.0
            )
            self.miss_step[miss_ids] = t
        pending = self.pending[self.slot_of[self.pending] == EMPTY] if self.pending.size else self.pending
        extra = pending[self.miss_step[pending] != t] if pending.size else pending  # not already a miss now
        self.pending = np.zeros(0, dtype=np.int64)
        late = int(np.count_nonzero(self.requested[miss_ids])) if self.requested.size and miss_ids.size else 0
        self._open = dict(
            ids=ids,
            hit=hit,
            hit_rows=hit_rows,
            miss_ids=miss_ids,
            prefetch=pending,
            extra=extra,
            late=late,
            arrived=self._arrived,
        )
        self._arrived = 0
        return np.concatenate([miss_ids, extra])

    def finish(self, fetched_rows=None) -> tuple[np.ndarray | None, MinibatchCounts]:
        """Complete the minibatch with the rows pulled for :meth:`begin`'s ids (None when ids only).

        Returns the rows of ``remote_ids`` in their order (None when ids only) and the minibatch's counts.
        """
        if self._open is None:
            raise RuntimeError("finish() called without begin()")
        op, self._open = self._open, None
        ids, hit, miss_ids, prefetch, extra = op["ids"], op["hit"], op["miss_ids"], op["prefetch"], op["extra"]
        n_miss = miss_ids.size
        rows = None
        if self.rows is not None:
            if fetched_rows is None:
                raise ValueError("this buffer holds rows: finish() needs the fetched rows")
            fetched_rows = np.asarray(fetched_rows)
            if fetched_rows.shape != (n_miss + extra.size, self.feat_dim):
                raise ValueError(
                    f"fetched rows have shape {fetched_rows.shape}, expected {(n_miss + extra.size, self.feat_dim)}"
                )
            rows = np.empty((ids.size, self.feat_dim), dtype=self.rows.dtype)
            rows[hit] = op["hit_rows"]
            rows[~hit] = fetched_rows[:n_miss]
            fetched_of = {"miss": fetched_rows[:n_miss], "extra": fetched_rows[n_miss:]}
        if prefetch.size:
            prefetch_rows = None
            if self.rows is not None:  # rows of each prefetched id: from the misses or the extra part
                pos_in_miss = positions(miss_ids, prefetch)
                prefetch_rows = np.empty((prefetch.size, self.feat_dim), dtype=self.rows.dtype)
                from_miss = pos_in_miss >= 0
                prefetch_rows[from_miss] = fetched_of["miss"][pos_in_miss[from_miss]]
                prefetch_rows[~from_miss] = fetched_of["extra"]  # extra is prefetch minus misses, same order
            self._install(self._prefetch_victims(prefetch.size), prefetch, prefetch_rows, prefetched=True)
        self._victim_order = None
        if self.admit_on_miss and n_miss:
            admit, victims = self._admit_missed(miss_ids)
            if admit.size:
                admit_rows = fetched_of["miss"][positions(miss_ids, admit)] if self.rows is not None else None
                self._install(victims, admit, admit_rows)
                self.counters.admitted_on_miss += int(admit.size)
        arrived = op["arrived"]
        result = MinibatchCounts(
            remote_sampled=int(ids.size),
            hits=int(np.count_nonzero(hit)),
            misses=int(n_miss),
            remote_fetched=int(n_miss + extra.size) + arrived,
            prefetched=int(extra.size) + arrived,
            late=op["late"],
            arrived=arrived,
        )
        c = self.counters
        c.minibatches += 1
        c.remote_sampled += result.remote_sampled
        c.hits += result.hits
        c.misses += result.misses
        c.remote_fetched += result.remote_fetched - arrived  # delivered rows were counted by arrive()
        c.prefetched += result.prefetched - arrived
        c.late += result.late
        return rows, result

    def lookup(self, remote_ids, fetch=None) -> tuple[np.ndarray | None, MinibatchCounts]:
        """One minibatch in one call: ``fetch(ids) -> rows`` pulls what :meth:`begin` asks for."""
        to_pull = self.begin(remote_ids)
        fetched = fetch(to_pull) if (fetch is not None and self.rows is not None) else None
        return self.finish(fetched)

    # ------------------------------------------------------------------ victims and admission
    def _prefetch_victims(self, n: int) -> np.ndarray:
        """The slots a prefetch set of ``n`` rows replaces: the order the decision came with (e.g. slots ranked
        by predicted need) when it covers them, else the lowest priority under a priority, else the lowest score."""
        if self._victim_order is not None and self._victim_order.size >= n:
            return self._victim_order[:n]
        if self.priority is not None:
            return self.priority_victims(n)
        return self._lowest_score_slots(n)

    def _admit_missed(self, miss_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Admit-on-miss: which missed (non-resident) rows enter, and the slots they take.

        Under a priority, a missed row enters only in place of an empty slot or a resident needed less, most needed
        first; otherwise missed rows take empty or evictable slots, most-missed first (ties by lower id).
        """
        admit = miss_ids[self.slot_of[miss_ids] == EMPTY]
        if self.priority is not None:
            return self._admission_pairs(admit)
        free = np.flatnonzero(self.evictable())
        if free.size == 0:
            return admit[:0], np.zeros(0, dtype=np.int64)
        if admit.size > free.size:
            admit = admit[np.lexsort((admit, -self.miss_count[admit]))[: free.size]]
        return admit, self._lowest_score_slots(admit.size)

    # ------------------------------------------------------------------ priority (predicted need)
    def set_priority(self, ids, values) -> None:
        """Switch admission and eviction to predicted need: ``values`` for ``ids``, 0 for every other node.

        With a priority, admit-on-miss lets a missed row in only in place of a resident (or empty slot) of lower
        priority, lowest first, and prefetch sets replace the lowest-priority residents: an online Belady when the
        priority predicts the next uses (:mod:`rudder.env.lookahead`).
        """
        if self.priority is None:
            self.priority = np.zeros(self.num_nodes, dtype=np.float32)
        else:
            self.priority[self._priority_ids] = 0.0
        self._priority_ids = np.asarray(ids, dtype=np.int64)
        self.priority[self._priority_ids] = values

    def set_dense_priority(self, priority: np.ndarray) -> None:
        """Use ``priority`` (one value per node id, kept by the caller and read live) as the predicted need."""
        self.priority = priority

    def priority_victims(self, n: int | None = None) -> np.ndarray:
        """Slots in eviction order under the priority: empty first, then lowest priority, then least recent (then
        lower slot). ``n``: only the first ``n`` of that order (a partial sort)."""
        slots = np.arange(self.capacity)
        return first_in_order(self.capacity if n is None else n, self.slot_priority(slots), self.slot_last_hit)

    def slot_priority(self, slots: np.ndarray) -> np.ndarray:
        """Predicted need of the residents of ``slots`` (-1 for an empty slot: it goes first)."""
        ids = self.slot_ids[slots]
        return np.where(ids == EMPTY, -1.0, self.priority[np.maximum(ids, 0)])

    def _admission_pairs(self, admit: np.ndarray):
        """Missed ids that beat a resident's priority, paired with the slots they replace."""
        if admit.size == 0 or self.capacity == 0:
            return admit[:0], np.zeros(0, dtype=np.int64)
        admit = admit[np.lexsort((admit, -self.priority[admit]))]
        victims = self.priority_victims(admit.size)
        admit = admit[: victims.size]
        beats = self.priority[admit] > self.slot_priority(victims)
        n = int(beats.size) if beats.all() else int(np.argmin(beats))
        return admit[:n], victims[:n]

    # ------------------------------------------------------------------ internals
    def _lowest_score_slots(self, n: int) -> np.ndarray:
        """``n`` slots to overwrite: empty ones first, then by oldest last hit, ties by lower slot."""
        return first_in_order(n, np.where(self.slot_ids == EMPTY, np.iinfo(np.int64).min, self.slot_last_hit))

    def _install(self, slots: np.ndarray, ids: np.ndarray, rows, prefetched: bool = False) -> None:
        n = min(slots.size, ids.size)
        slots, ids = slots[:n], ids[:n]
        old = self.slot_ids[slots]
        self.counters.prefetch_unused += int(np.count_nonzero(self.slot_prefetched[slots] & (old != EMPTY)))
        self.slot_prefetched[slots] = prefetched
        evicted = old[old != EMPTY]
        self.slot_of[evicted] = EMPTY
        self.counters.evicted += int(evicted.size)
        self.slot_ids[slots] = ids
        self.slot_of[ids] = slots
        self.slot_last_hit[slots] = self.clock
        if self.rows is not None and rows is not None:
            self.rows[slots] = rows[:n]


def initial_ids(
    how: str,
    halo_ids: np.ndarray,
    halo_degree: np.ndarray,
    capacity: int,
    seed: int,
    vip: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The ids of an initial fill of ``capacity`` slots: ``degree`` (most-connected halo nodes first, ties by lower
    id), ``random`` (a seeded permutation of the halo), ``empty``, or ``vip``: the remote nodes of highest vertex
    inclusion probability (SALIENT++), ties by lower id, given as ``vip=(ids, probabilities)``
    (:func:`rudder.env.vip.vertex_inclusion_probability`). Only nodes with a positive VIP are filled: a node the
    sampler cannot reach from this trainer's seeds is worth no slot, so a VIP fill may leave slots empty."""
    if capacity <= 0 or how == "empty":
        return np.zeros(0, dtype=np.int64)
    if how == "vip":
        if vip is None:
            raise ValueError("buffer init 'vip' needs the vertex inclusion probabilities (vip=(ids, probabilities))")
        ids, p = np.asarray(vip[0], dtype=np.int64), np.asarray(vip[1])
        ids, p = ids[p > 0], p[p > 0]
        return ids[first_in_order(capacity, -p, ids)]
    if how == "degree":
        order = np.lexsort((halo_ids, -np.asarray(halo_degree)))
    elif how == "random":
        order = np.random.default_rng(seed).permutation(halo_ids.size)
    else:
        raise ValueError(f"unknown buffer init {how!r}: expected degree, random, empty or vip")
    return np.asarray(halo_ids, dtype=np.int64)[order[:capacity]]


def first_in_order(n: int, primary: np.ndarray, *ties: np.ndarray) -> np.ndarray:
    """Positions of the first ``n`` elements ordered by ``primary`` (ascending), then by each of ``ties``, then by
    position: ``np.lexsort((*reversed(ties), primary))[:n]``, sorting only what can be among them."""
    size = primary.size
    if n >= size:
        return np.lexsort((*reversed(ties), primary))[:n]
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if size > 64 * n:  # few of many: first narrow to a pool that holds them, by a strided sample's quantile
        step = size // (16 * n)
        sample = primary[::step]
        m = min(2 * n // step + 1, sample.size - 1)  # about 2n elements lie at or below it
        pool = np.flatnonzero(primary <= np.partition(sample, m)[m])
        if n <= pool.size <= size // 4:  # the first n all lie at or below it (ties included), in position order
            return pool[first_in_order(n, primary[pool], *(t[pool] for t in ties))]
    pool = np.flatnonzero(primary <= np.partition(primary, n - 1)[n - 1])  # ascending: ties stay in order
    return pool[np.lexsort((*(t[pool] for t in reversed(ties)), primary[pool]))][:n]


def _unique_in_order(ids: np.ndarray) -> np.ndarray:
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def positions(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Index of each needle in ``haystack`` (unique ids), -1 where absent."""
    if haystack.size == 0:
        return np.full(needles.size, -1, dtype=np.int64)
    order = np.argsort(haystack, kind="stable")
    pos = np.searchsorted(haystack, needles, sorter=order)
    pos = np.minimum(pos, haystack.size - 1)
    found = haystack[order[pos]] == needles
    return np.where(found, order[pos], -1)
