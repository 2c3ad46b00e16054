"""Sampler lookahead: which remote rows the next minibatches will probably need, from the known seed order.

DistDGL's loader shuffles a trainer's seed nodes once per epoch, so the seeds of every remaining minibatch of the
epoch are known in advance. The trainer's partition holds every in-edge of its own ("inner") nodes, halo sources
included, so the first two hops of neighbour sampling around those seeds are known in distribution:

- hop 1: seed ``s`` samples ``min(1, f1 / indeg(s))`` of its in-neighbours (``f1 = fanouts[-1]``, DGL samples the
  output layer first); halo neighbours sampled here are remote rows;
- hop 2: every node of the hop-1 frontier (the seeds and their sampled inner neighbours) samples
  ``min(1, f2 / indeg(v))`` of its in-neighbours (``f2 = fanouts[-2]``); halo ones are remote rows.

(Neighbours of *halo* hop-1 nodes are not in the partition and stay unknown: the decayed miss counts cover them.)

With three or more layers (e.g. papers100M's ``15,10,5``) the lookahead still models the two hops nearest the
seeds (``fanouts[-1]``, ``fanouts[-2]``): the third hop would need every inner node's in-edges (the trace keeps only
those of the training seeds and the halo edges of inner nodes) and compounds the estimate's error. What the third
hop needs is known instead from the minibatches sampled ahead, exactly (``--sample-ahead``, a count, a budget such
as ``64MB``, or ``epoch``: :mod:`rudder.env.sample_ahead`), and the oracles score the recorded ids whatever the
depth (tests/test_scale.py runs a real 3-layer job and replays it exactly).
:meth:`SamplerLookahead.scores` sums these expected remote needs over upcoming minibatches, discounted by distance,
so a policy can prefetch what is needed soon and evict what is not — an online approximation of Belady's MIN.

Only the edges that matter are kept: in-edges of training seeds from inner nodes, and in-edges of inner nodes from
halo nodes; :meth:`to_static` / :meth:`from_static` store them in a trace.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class SamplerLookahead:
    """Expected remote input rows of upcoming minibatches of one trainer.

    Args:
        num_nodes: global node-id space.
        inner_ids: sorted global ids of the partition's own nodes.
        in_degree: in-degree of each inner node (same order).
        train_ids: sorted global ids of the training seeds (a subset of ``inner_ids``).
        train_indptr, train_src: CSR over ``train_ids`` of in-neighbours that are inner nodes (global ids).
        halo_indptr, halo_src: CSR over ``inner_ids`` of in-neighbours that are halo nodes (global ids).
        fanouts: the sampler's fanouts, input layer first (DGL's order).
        halo_in: optional ``(in_degree, indptr, src)``: for each halo node (in ``unique(halo_src)`` order) its full
            in-degree and its *remote* in-neighbours (CSR, global ids), fetched once from the graph servers. With
            it the lookahead also sees the second hop through halo nodes.
    """

    def __init__(
        self,
        num_nodes: int,
        inner_ids,
        in_degree,
        train_ids,
        train_indptr,
        train_src,
        halo_indptr,
        halo_src,
        fanouts,
        halo_in=None,
    ):
        self.num_nodes = int(num_nodes)
        self.inner_ids = np.asarray(inner_ids, dtype=np.int64)
        self.in_degree = np.asarray(in_degree, dtype=np.int64)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.train_indptr = np.asarray(train_indptr, dtype=np.int64)
        self.train_src = np.asarray(train_src, dtype=np.int64)
        self.halo_indptr = np.asarray(halo_indptr, dtype=np.int64)
        self.halo_src = np.asarray(halo_src, dtype=np.int64)
        self.fanouts = [int(f) for f in fanouts]
        n_inner, n_train = self.inner_ids.size, self.train_ids.size
        self.halo_ids, halo_col = np.unique(self.halo_src, return_inverse=True)
        f1 = self.fanouts[-1]
        f2 = self.fanouts[-2] if len(self.fanouts) > 1 else 0
        train_pos = np.searchsorted(self.inner_ids, self.train_ids)
        p_train = np.minimum(1.0, f1 / np.maximum(self.in_degree[train_pos], 1))
        # hop 1 from a seed (rows: train seeds) to inner neighbours and to halo neighbours
        rows = np.repeat(np.arange(n_train), np.diff(self.train_indptr))
        self._seed_to_inner = sp.csr_matrix(
            (p_train[rows], (rows, np.searchsorted(self.inner_ids, self.train_src))), shape=(n_train, n_inner)
        )
        halo_rows = np.repeat(np.arange(n_inner), np.diff(self.halo_indptr))
        p_inner_f1 = np.minimum(1.0, f1 / np.maximum(self.in_degree, 1))
        p_inner_f2 = np.minimum(1.0, f2 / np.maximum(self.in_degree, 1)) if f2 else np.zeros(n_inner)
        self.halo_in = None
        if halo_in is not None:
            degree, indptr, src = (np.asarray(a, dtype=np.int64) for a in halo_in)
            if degree.size != self.halo_ids.size or indptr.size != self.halo_ids.size + 1:
                raise ValueError(f"halo_in covers {degree.size} halo nodes, expected {self.halo_ids.size}")
            self.halo_in = (degree, indptr, src)
            self.remote_ids = np.union1d(self.halo_ids, src)  # every remote node the lookahead can score
        else:
            self.remote_ids = self.halo_ids
        n_remote = self.remote_ids.size
        halo_pos = np.searchsorted(self.remote_ids, self.halo_ids)
        self._inner_to_remote_f1 = sp.csr_matrix(
            (p_inner_f1[halo_rows], (halo_rows, halo_pos[halo_col])), shape=(n_inner, n_remote)
        )
        self._inner_to_remote_f2 = sp.csr_matrix(
            (p_inner_f2[halo_rows], (halo_rows, halo_pos[halo_col])), shape=(n_inner, n_remote)
        )
        self._halo_to_remote_f2 = None
        if self.halo_in is not None and f2:
            degree, indptr, src = self.halo_in
            rows2 = np.repeat(np.arange(self.halo_ids.size), np.diff(indptr))
            q = np.minimum(1.0, f2 / np.maximum(degree, 1))
            self._halo_to_remote_f2 = sp.csr_matrix(
                (q[rows2], (rows2, np.searchsorted(self.remote_ids, src))), shape=(self.halo_ids.size, n_remote)
            )
        self._halo_pos = halo_pos
        self._train_pos = train_pos

    # ------------------------------------------------------------------ building and storing
    @classmethod
    def from_partition(
        cls, num_nodes: int, local_global_ids, inner_mask, csc_indptr, csc_indices, train_ids, fanouts
    ) -> SamplerLookahead:
        """From a DistDGL local partition: global id per local node, inner mask, CSC in-edges (local ids)."""
        gid = np.asarray(local_global_ids, dtype=np.int64)
        inner = np.asarray(inner_mask, dtype=bool)
        indptr = np.asarray(csc_indptr, dtype=np.int64)
        indices = np.asarray(csc_indices, dtype=np.int64)
        inner_local = np.flatnonzero(inner)
        order = np.argsort(gid[inner_local])
        inner_local = inner_local[order]
        inner_ids = gid[inner_local]
        in_degree = (indptr[inner_local + 1] - indptr[inner_local]).astype(np.int64)
        train_ids = np.intersect1d(np.asarray(train_ids, dtype=np.int64), inner_ids)
        train_local = inner_local[np.searchsorted(inner_ids, train_ids)]

        def gather(dst_local, keep_src):
            """CSR (over ``dst_local``) of the in-neighbours whose local id passes ``keep_src``, as global ids."""
            starts = indptr[dst_local]
            lengths = indptr[dst_local + 1] - starts
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            flat = np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())
            src_local = indices[flat]
            owner = np.repeat(np.arange(dst_local.size), lengths)
            keep = keep_src[src_local]
            counts = np.bincount(owner[keep], minlength=dst_local.size)
            srcs = gid[src_local[keep]]
            return np.concatenate([[0], np.cumsum(counts)]), srcs

        train_indptr, train_src = gather(train_local, inner)
        halo_indptr, halo_src = gather(inner_local, ~inner)
        return cls(num_nodes, inner_ids, in_degree, train_ids, train_indptr, train_src, halo_indptr, halo_src, fanouts)

    def to_static(self) -> dict[str, np.ndarray]:
        """Compact arrays for a trace: sorted id lists and per-row neighbour positions delta-coded."""
        inner_pos = np.searchsorted(self.inner_ids, self.train_src)
        halo_pos = np.searchsorted(self.halo_ids, self.halo_src)
        train_counts, halo_counts = np.diff(self.train_indptr), np.diff(self.halo_indptr)
        out = dict(
            la_inner_ids=_pack(self.inner_ids),
            la_in_degree=_small(self.in_degree),
            la_train_ids=_pack(self.train_ids),
            la_train_count=_small(train_counts),
            la_train_src=_pack_rows(inner_pos, train_counts),
            la_halo_ids=_pack(self.halo_ids),
            la_halo_count=_small(halo_counts),
            la_halo_src=_pack_rows(halo_pos, halo_counts),
            la_fanouts=np.asarray(self.fanouts, dtype=np.int32),
        )
        if self.halo_in is not None:
            degree, indptr, src = self.halo_in
            counts = np.diff(indptr)
            out.update(la_hin_degree=_small(degree), la_hin_count=_small(counts), la_hin_src=_pack_rows(src, counts))
        return out

    @classmethod
    def from_static(cls, static: dict, num_nodes: int) -> SamplerLookahead | None:
        """Rebuild from a trace's static arrays; None when the trace has no lookahead data."""
        if "la_inner_ids" not in static:
            return None
        inner_ids, halo_ids = _unpack(static["la_inner_ids"]), _unpack(static["la_halo_ids"])
        train_counts = static["la_train_count"].astype(np.int64)
        halo_counts = static["la_halo_count"].astype(np.int64)
        train_src = inner_ids[_unpack_rows(static["la_train_src"], train_counts)]
        halo_src = halo_ids[_unpack_rows(static["la_halo_src"], halo_counts)]
        halo_in = None
        if "la_hin_degree" in static:
            counts = static["la_hin_count"].astype(np.int64)
            halo_in = (static["la_hin_degree"], _indptr(counts), _unpack_rows(static["la_hin_src"], counts))
        return cls(
            num_nodes,
            inner_ids,
            static["la_in_degree"].astype(np.int64),
            _unpack(static["la_train_ids"]),
            _indptr(train_counts),
            train_src,
            _indptr(halo_counts),
            halo_src,
            static["la_fanouts"],
            halo_in=halo_in,
        )

    def with_halo_in_edges(self, src, dst, partition_of) -> SamplerLookahead:
        """A copy that also knows the halo nodes' in-edges: ``src -> dst`` (global ids; every in-edge of every
        halo node, e.g. from ``dgl.distributed.sample_neighbors(g, halo_ids, -1)``); ``partition_of(ids)`` tells
        which in-neighbours are remote (owned by another partition than the inner nodes')."""
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        row = np.searchsorted(self.halo_ids, dst)
        ok = (row < self.halo_ids.size) & (self.halo_ids[np.minimum(row, self.halo_ids.size - 1)] == dst)
        row, src = row[ok], src[ok]
        degree = np.bincount(row, minlength=self.halo_ids.size)
        own = partition_of(self.inner_ids[:1])[0] if self.inner_ids.size else -1
        remote = partition_of(src) != own
        row, src = row[remote], src[remote]
        order = np.lexsort((src, row))
        counts = np.bincount(row, minlength=self.halo_ids.size)
        return SamplerLookahead(
            self.num_nodes,
            self.inner_ids,
            self.in_degree,
            self.train_ids,
            self.train_indptr,
            self.train_src,
            self.halo_indptr,
            self.halo_src,
            self.fanouts,
            halo_in=(degree, _indptr(counts), src[order]),
        )

    # ------------------------------------------------------------------ scoring
    def scores(self, upcoming: list[np.ndarray], discount: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Expected remote needs over the upcoming minibatches (seed ids of each, nearest first).

        Minibatch ``i`` ahead weighs ``discount**i``. Returns ``(halo_ids, scores)`` for halo nodes with a
        positive score.
        """
        x = np.zeros(self.train_ids.size)
        n = self.train_ids.size
        for i, seeds in enumerate(upcoming):
            seeds = np.asarray(seeds, dtype=np.int64)
            pos = np.minimum(np.searchsorted(self.train_ids, seeds), max(n - 1, 0))
            known = self.train_ids[pos] == seeds if n else np.zeros(seeds.size, dtype=bool)
            np.add.at(x, pos[known], discount**i)
        frontier = _rows_t_dot(self._seed_to_inner, x)  # expected hop-1 inner nodes
        frontier[self._train_pos] += x  # the seeds are in the hop-1 frontier too
        seed_inner = np.zeros(self.inner_ids.size)
        seed_inner[self._train_pos] = x
        hop1 = _rows_t_dot(self._inner_to_remote_f1, seed_inner)  # remote (halo) in-neighbours of the seeds
        score = hop1 + _rows_t_dot(self._inner_to_remote_f2, frontier)
        if self._halo_to_remote_f2 is not None:  # second hop through the halo nodes sampled at the first
            score += _rows_t_dot(self._halo_to_remote_f2, hop1[self._halo_pos])
        keep = score > 0
        return self.remote_ids[keep], score[keep].astype(np.float32)


def _small(values: np.ndarray) -> np.ndarray:
    """Non-negative integers in the smallest unsigned dtype that holds them."""
    from rudder.traces.schema import remote_id_dtype

    values = np.asarray(values, dtype=np.int64)
    return values.astype(remote_id_dtype(int(values.max()) if values.size else 0))


def _pack(sorted_ids: np.ndarray) -> np.ndarray:
    from rudder.traces.schema import delta_encode

    return delta_encode(np.asarray(sorted_ids, dtype=np.int64), np.asarray([sorted_ids.size]))


def _unpack(codes: np.ndarray) -> np.ndarray:
    from rudder.traces.schema import delta_decode

    return delta_decode(codes, np.asarray([codes.size]))


def _pack_rows(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each row's values sorted, delta-coded within the row (rows given by ``counts``)."""
    from rudder.traces.schema import delta_encode

    rows = np.repeat(np.arange(counts.size), counts)
    return delta_encode(np.asarray(values, dtype=np.int64)[np.lexsort((values, rows))], counts)


def _unpack_rows(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    from rudder.traces.schema import delta_decode

    return delta_decode(codes, counts)


def _indptr(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _rows_t_dot(m: sp.csr_matrix, v: np.ndarray) -> np.ndarray:
    """``m.T @ v`` touching only the rows where ``v`` is non-zero (a few seeds' neighbourhoods, not the graph)."""
    nz = np.flatnonzero(v)
    if nz.size * 4 > v.size:
        return m.T @ v
    return m[nz].T @ v[nz]
