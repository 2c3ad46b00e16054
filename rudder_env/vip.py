"""Vertex inclusion probability (VIP): how likely each remote node is to be an input row of one minibatch.

SALIENT++ (Kaler et al., "Communication-efficient graph neural networks with probabilistic neighborhood expansion
analysis and caching", MLSys 2023) caches on every trainer the remote nodes of highest VIP, computed once from the
graph, the trainer's training seeds, the batch size and the fanouts. It is the strongest cheap static baseline: a
learned prefetch policy has to beat a buffer filled this way and never changed.

The model, for one minibatch of trainer ``t`` (independence between nodes assumed, as in the paper):

- hop 0: a training seed of ``t`` is in the minibatch with ``p0 = min(1, batch_size / |train set of t|)``;
- hop ``l`` (fanout ``f``: DGL lists fanouts input layer first and samples the *output* layer first, so hop 1
  uses ``fanouts[-1]``): every node ``u`` of the frontier keeps each of its in-neighbours with probability
  ``min(1, f / indeg(u))`` (DGL samples ``f`` of them without replacement, or all), so

      p_l(v) = 1 - (1 - p_{l-1}(v)) * prod over u with v in N_in(u) of (1 - min(1, f / indeg(u)) * p_{l-1}(u)).

  The factor ``(1 - p_{l-1}(v))`` is there because DGL's blocks carry a layer's destination nodes into its source
  nodes: a node of hop ``l-1`` is an input row of every later hop too. After the last hop ``p_L(v)`` is the
  probability that ``v`` is an input row of the minibatch.

What the partition structure reaches (:class:`~rudder.env.lookahead.SamplerLookahead`, as stored in every trace's
static arrays): the in-edges of the training seeds from inner nodes, the in-edges of *every* inner node from halo
nodes, the in-degree of every inner node, and, when the trainer pulled them (the default; not with
``--no-lookahead-halo-edges``, nor in traces recorded without them), each halo node's in-degree and its remote
in-neighbours. Hence:

- hop 1 is complete: seeds reach their inner and their halo in-neighbours;
- hop 2 through inner nodes is complete for remote rows (every inner node's halo in-edges are known); hop 2
  through *halo* nodes needs the halo in-edges: without them the remote nodes first reached there (and the
  second-hop share of halo nodes' VIP) are missing, and their VIP is underestimated (often 0);
- from hop 3 on (three or more layers) the frontier's inner nodes are only known where they are seeds, and
  the in-edges of remote nodes beyond the halo are not known at all: VIP then covers only the paths above.

For the default two-layer sampler with halo in-edges, every remote input row has its VIP; what remains is the
independence assumption: the seeds of one minibatch are drawn without replacement, and events that share a seed
(a seed sampling ``v`` at both hops, two paths from one seed) are multiplied as if independent, so two-layer VIP
overestimates a little. ``tests/test_vip.py`` measures it against DGL's own sampler: exact for one layer, a small
upward bias for two, and the same order (which is all a cache needs).
"""

from __future__ import annotations

import numpy as np
from rudder.env.lookahead import SamplerLookahead


def vertex_inclusion_probability(
    la: SamplerLookahead, batch_size: int, train_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """VIP of the remote nodes one trainer's minibatch can reach.

    Args:
        la: the trainer's partition structure (live: ``DistTrainer.lookahead``; replay:
            :meth:`SamplerLookahead.from_static` of the trace's static arrays).
        batch_size: seeds per minibatch.
        train_size: the trainer's training seeds (default: those ``la`` holds).

    Returns ``(remote_ids, vip)``: the remote node ids (sorted) with a positive VIP, and their VIP (float64 in
    (0, 1]).
    """
    n_train = int(la.train_ids.size if train_size is None else train_size)
    n_inner, n_remote = la.inner_ids.size, la.remote_ids.size
    if n_train == 0 or n_remote == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    # nodes: inner ones first (la.inner_ids order), then remote ones (la.remote_ids order); one edge list dst <- src
    train_pos = np.searchsorted(la.inner_ids, la.train_ids)
    dst = [np.repeat(train_pos, np.diff(la.train_indptr)), np.repeat(np.arange(n_inner), np.diff(la.halo_indptr))]
    src = [np.searchsorted(la.inner_ids, la.train_src), n_inner + np.searchsorted(la.remote_ids, la.halo_src)]
    degree = np.zeros(n_inner + n_remote)
    degree[:n_inner] = la.in_degree
    if la.halo_in is not None:
        halo_degree, halo_indptr, halo_src = la.halo_in
        halo_node = n_inner + np.searchsorted(la.remote_ids, la.halo_ids)
        degree[halo_node] = halo_degree
        dst.append(np.repeat(halo_node, np.diff(halo_indptr)))
        src.append(n_inner + np.searchsorted(la.remote_ids, halo_src))
    dst, src = np.concatenate(dst), np.concatenate(src)
    p = np.zeros(n_inner + n_remote)
    p[train_pos] = min(1.0, batch_size / n_train)
    for fanout in reversed(la.fanouts):
        keep = np.ones_like(degree) if fanout < 0 else np.minimum(1.0, fanout / np.maximum(degree, 1.0))
        with np.errstate(divide="ignore"):  # an edge sure to be taken: log(0) = -inf, exp(-inf) = 0
            log_missed = np.bincount(src, weights=np.log1p(-keep[dst] * p[dst]), minlength=p.size)
        p = 1.0 - (1.0 - p) * np.exp(log_missed)
    vip = p[n_inner:]
    reached = vip > 0
    return la.remote_ids[reached], vip[reached]
