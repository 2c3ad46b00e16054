"""Graphs for training: seeded synthetic presets, OGB node-property datasets from disk, and saved DGL graphs.

Every graph returned by this module is a homogeneous :class:`dgl.DGLGraph` that satisfies one contract, so the
training code never has to care where it came from:

- ``N`` nodes, ``E`` directed edges; the edge set is symmetric (``u -> v`` present iff ``v -> u`` present),
  without duplicate edges and without self-loops;
- ``ndata["feat"]``: float32 ``[N, D]`` node features;
- ``ndata["label"]``: int64 ``[N]`` class ids in ``[0, C)``, or ``-1`` for an unlabelled node;
- ``ndata["train_mask"]``, ``ndata["val_mask"]``, ``ndata["test_mask"]``: bool ``[N]``, pairwise disjoint, and
  only labelled nodes are in a mask.

Sources, all reached through :func:`load_graph`:

- :data:`PRESETS` / :func:`generate_synthetic`: a degree-corrected stochastic block model (Chung-Lu inside and
  between communities) with heavy-tailed degrees, community-tied labels and noisy class-dependent features;
  vectorised numpy, deterministic for a given seed.
- :func:`load_ogb`: an OGB node-property dataset (ogbn-arxiv, ogbn-products, ogbn-papers100M, ...) already on disk
  in OGB's raw layout; nothing is downloaded.
- a ``.dgl`` / ``.bin`` file written by :func:`dgl.save_graphs`.

Problems with the input raise :class:`DatasetError` with a one-line message naming the file or field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from rudder.runtime.dgl_compat import import_dgl

dgl = import_dgl()

__all__ = [
    "DatasetError",
    "PRESETS",
    "SynthSpec",
    "generate_synthetic",
    "load_graph",
    "load_ogb",
    "num_classes",
]

#: Node data every graph carries (see the module docstring for dtypes and shapes).
NDATA_FIELDS = ("feat", "label", "train_mask", "val_mask", "test_mask")
MASK_FIELDS = ("train_mask", "val_mask", "test_mask")

#: Bump when :func:`generate_synthetic` changes its output for a given spec and seed; it invalidates caches.
GENERATOR_VERSION = 1


class DatasetError(ValueError):
    """A graph source is missing, malformed or violates the graph contract; the message names the file/field."""


# --------------------------------------------------------------------------------------------------------------
# Synthetic graphs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSpec:
    """Parameters of a synthetic graph (degree-corrected SBM with Pareto node weights).

    Attributes:
        num_nodes: ``N``, number of nodes.
        avg_degree: target mean degree; the graph has ``round(N * avg_degree / 2)`` undirected edges, i.e.
            about ``N * avg_degree`` directed edges after symmetrisation (slightly fewer if the sampler cannot
            find enough distinct pairs, which only happens for near-complete graphs).
        num_communities: number of communities; nodes are assigned uniformly at random.
        num_classes: ``C``; the true class of a node is ``community % C``.
        feat_dim: ``D``, feature dimension.
        p_in: probability that an edge joins two nodes of the same community (otherwise a uniformly chosen
            other community); with ``num_communities`` communities the edge homophily is about ``p_in``.
        pareto_shape: shape ``a`` of the node-weight distribution ``P(w > x) = x^-a`` (``x >= 1``); expected
            degrees are proportional to the weights, so the degree tail follows a power law with exponent
            ``a + 1`` (2.5 for ``a = 1.5``, typical of real graphs).
        label_noise: fraction of nodes whose observed label is replaced by a uniformly random class (features
            still follow the true class, so this is irreducible noise).
        feat_signal: L2 norm of each class-mean feature vector, in units of the per-dimension noise std (1.0).
            Two class means are about ``feat_signal * sqrt(2)`` apart; small values make features alone a
            weak predictor, so averaging over (mostly same-community) neighbours pays off.
        train_frac, val_frac, test_frac: fractions of nodes (random by seed) in each mask; they must sum to at
            most 1, the rest of the nodes is in no mask.
    """

    num_nodes: int
    avg_degree: float
    num_communities: int
    num_classes: int
    feat_dim: int
    p_in: float = 0.8
    pareto_shape: float = 1.5
    label_noise: float = 0.05
    feat_signal: float = 1.5
    train_frac: float = 0.6
    val_frac: float = 0.2
    test_frac: float = 0.2

    def __post_init__(self) -> None:
        checks = [
            (self.num_nodes >= 2, "num_nodes must be >= 2"),
            (0 < self.avg_degree < self.num_nodes - 1, "avg_degree must be in (0, num_nodes - 1)"),
            (1 <= self.num_communities <= self.num_nodes, "num_communities must be in [1, num_nodes]"),
            (self.num_classes >= 2, "num_classes must be >= 2"),
            (self.feat_dim >= 1, "feat_dim must be >= 1"),
            (0.0 <= self.p_in <= 1.0, "p_in must be in [0, 1]"),
            (self.num_communities > 1 or self.p_in == 1.0, "p_in must be 1.0 with a single community"),
            (self.pareto_shape > 1.0, "pareto_shape must be > 1 (finite mean degree)"),
            (0.0 <= self.label_noise <= 1.0, "label_noise must be in [0, 1]"),
            (min(self.train_frac, self.val_frac, self.test_frac) >= 0.0, "split fractions must be >= 0"),
            (self.train_frac + self.val_frac + self.test_frac <= 1.0 + 1e-9, "split fractions must sum to <= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthSpec: {msg}, got {self}")

    def fingerprint(self) -> int:
        """A 56-bit integer identifying this spec and :data:`GENERATOR_VERSION` (stored with cached graphs)."""
        text = f"v{GENERATOR_VERSION}:{dataclasses.astuple(self)!r}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


#: Named synthetic graphs. Directed edge counts are after symmetrisation (``~ num_nodes * avg_degree``).
PRESETS: dict[str, SynthSpec] = {
    # 4k nodes / 40k directed edges: unit tests and the 2-partition DistDGL CI run.
    "synth-tiny": SynthSpec(num_nodes=4_000, avg_degree=10, num_communities=8, num_classes=4, feat_dim=16),
    # 200k nodes / 2M directed edges (ogbn-arxiv-sized node count, denser).
    "synth-small": SynthSpec(
        num_nodes=200_000,
        avg_degree=10,
        num_communities=64,
        num_classes=16,
        feat_dim=100,
        feat_signal=2.0,
        train_frac=0.3,
        val_frac=0.1,
        test_frac=0.1,
    ),
    # 200k nodes / 3M directed edges, another family of graph than synth-small, for held-out evaluation: low
    # homophily (3 in 10 edges inside a community, against 8 in 10: neighbours mostly carry other labels, as in
    # heterophilous graphs), a heavier degree tail (node weights Pareto 1.2: degree exponent ~2.2 instead of 2.5,
    # more hubs), denser (mean degree 15) and more, smaller communities (128). METIS cuts far more edges than on
    # synth-small, so a partition's halo is larger and more of each minibatch is remote.
    "synth-hetero": SynthSpec(
        num_nodes=200_000,
        avg_degree=15,
        num_communities=128,
        num_classes=16,
        feat_dim=100,
        p_in=0.3,
        pareto_shape=1.2,
        feat_signal=2.0,
        train_frac=0.3,
        val_frac=0.1,
        test_frac=0.1,
    ),
    # 2M nodes / 20M directed edges (ogbn-products-sized node count).
    "synth-large": SynthSpec(
        num_nodes=2_000_000,
        avg_degree=10,
        num_communities=256,
        num_classes=32,
        feat_dim=100,
        feat_signal=2.0,
        train_frac=0.1,
        val_frac=0.05,
        test_frac=0.05,
    ),
}


def _pareto_weights(rng: np.random.Generator, n: int, shape: float, num_edges: int) -> np.ndarray:
    """Node weights ``[n]`` float64 ~ Pareto(``shape``, x_min=1), capped so no expected degree exceeds
    ``sqrt(2 * num_edges)`` (the structural cutoff of the Chung-Lu model, where pair probabilities stay <= 1)."""
    w = rng.pareto(shape, size=n) + 1.0
    cap_degree = np.sqrt(2.0 * num_edges)
    for _ in range(20):  # capping lowers the total weight, which raises everyone's expected degree: iterate
        cap = cap_degree * w.sum() / (2.0 * num_edges)  # expected degree of i is 2 * num_edges * w_i / sum(w)
        if w.max() <= cap * (1 + 1e-9):
            break
        np.minimum(w, cap, out=w)
    return w


def _sample_pairs(
    rng: np.random.Generator,
    count: int,
    order: np.ndarray,
    cum_w: np.ndarray,
    comm_lo: np.ndarray,
    comm_hi: np.ndarray,
    community: np.ndarray,
    p_in: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` node pairs ``(u, v)`` (int64 arrays): ``u`` proportional to weight over all nodes; ``v``
    proportional to weight inside ``u``'s community with probability ``p_in``, else inside a uniformly random
    other community.

    ``order`` lists node ids grouped by community, ``cum_w`` is the inclusive cumulative weight along ``order``
    (float64, ``[N]``), and community ``c`` spans the cumulative-weight interval ``[comm_lo[c], comm_hi[c])``.
    """
    n = order.shape[0]
    total = cum_w[-1]
    u = order[np.minimum(np.searchsorted(cum_w, rng.random(count) * total, side="right"), n - 1)]
    cu = community[u]
    num_comm = comm_lo.shape[0]
    if num_comm > 1:
        other = rng.random(count) >= p_in
        shift = rng.integers(1, num_comm, size=count)
        cv = np.where(other, (cu + shift) % num_comm, cu)
    else:
        cv = cu
    lo, hi = comm_lo[cv], comm_hi[cv]
    pos = np.searchsorted(cum_w, lo + rng.random(count) * (hi - lo), side="right")
    v = order[np.minimum(pos, n - 1)]
    return u, v


def generate_synthetic(spec: SynthSpec, seed: int = 0) -> dgl.DGLGraph:
    """Generate the synthetic graph described by ``spec``; the same ``(spec, seed)`` always gives the same graph.

    Structure: every node gets a community (uniform) and a Pareto weight; undirected edges are sampled as in
    :func:`_sample_pairs` (degree-corrected SBM), self-loops dropped, duplicates merged, and sampling topped up
    until ``round(N * avg_degree / 2)`` distinct undirected edges exist (a random surplus is dropped).
    Labels: ``community % num_classes``, with a ``label_noise`` fraction replaced by a random class.
    Features: ``class_mean[true_class] + N(0, 1)`` per dimension, class means random with norm ``feat_signal``.
    Masks: a random permutation of the nodes is cut into ``train_frac / val_frac / test_frac`` pieces.

    Args:
        spec: the parameters, e.g. ``PRESETS["synth-tiny"]``.
        seed: RNG seed; different seeds give different graphs, labels, features and splits.

    Returns:
        A graph satisfying the module contract, with ``N = spec.num_nodes``, ``D = spec.feat_dim``.
        Memory is dominated by features (``4 * N * D`` bytes) and edges (``16 * E`` bytes).
    """
    n = spec.num_nodes
    ss = np.random.SeedSequence([int(seed), 0x52554444])  # "RUDD": keeps streams apart from other users of seed
    rng_struct, rng_label, rng_feat, rng_split = (np.random.default_rng(s) for s in ss.spawn(4))

    # --- structure -------------------------------------------------------------------------------------------
    target = int(round(n * spec.avg_degree / 2))  # undirected edges wanted
    target = min(target, n * (n - 1) // 2)
    community = rng_struct.integers(0, spec.num_communities, size=n)
    weight = _pareto_weights(rng_struct, n, spec.pareto_shape, target)
    order = np.argsort(community, kind="stable")
    cum_w = np.cumsum(weight[order])
    comm_size = np.bincount(community, minlength=spec.num_communities)
    comm_end = np.cumsum(comm_size)
    comm_start = comm_end - comm_size
    # Cumulative-weight interval of each community along ``order`` (empty communities get an empty interval).
    cum_before = np.concatenate(([0.0], cum_w))
    comm_lo = cum_before[comm_start]
    comm_hi = cum_before[comm_end]
    p_in = spec.p_in
    sampler_comm = community
    if np.any(comm_size == 0) and spec.num_communities > 1:
        # Only possible when num_communities is close to num_nodes: sample among non-empty communities only (the
        # renumbering keeps their order, so ``order`` and ``cum_w`` stay valid).
        keep = comm_size > 0
        sampler_comm = (np.cumsum(keep) - 1)[community]
        comm_lo, comm_hi = comm_lo[keep], comm_hi[keep]
        if comm_lo.shape[0] == 1:
            p_in = 1.0
    del weight

    keys = np.empty(0, dtype=np.int64)
    for _ in range(30):
        deficit = target - keys.shape[0]
        if deficit <= 0:
            break
        draw = int(deficit * 1.1) + 16
        u, v = _sample_pairs(rng_struct, draw, order, cum_w, comm_lo, comm_hi, sampler_comm, p_in)
        ok = u != v
        u, v = u[ok], v[ok]
        new = np.minimum(u, v) * n + np.maximum(u, v)
        del u, v, ok
        keys = np.unique(np.concatenate((keys, new)))
        del new
    if keys.shape[0] > target:
        keep = np.sort(rng_struct.choice(keys.shape[0], size=target, replace=False))
        keys = keys[keep]
        del keep
    lo, hi = np.divmod(keys, n)
    del keys, order, cum_w, sampler_comm
    src = np.concatenate((lo, hi))
    dst = np.concatenate((hi, lo))
    del lo, hi

    # --- labels ----------------------------------------------------------------------------------------------
    true_class = (community % spec.num_classes).astype(np.int64)
    label = true_class.copy()
    noisy = rng_label.random(n) < spec.label_noise
    label[noisy] = rng_label.integers(0, spec.num_classes, size=int(noisy.sum()))

    # --- features --------------------------------------------------------------------------------------------
    means = rng_feat.standard_normal((spec.num_classes, spec.feat_dim))
    means *= spec.feat_signal / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    means = means.astype(np.float32)
    feat = np.empty((n, spec.feat_dim), dtype=np.float32)
    chunk = max(1, (1 << 22) // spec.feat_dim)  # ~16 MB of float32 per chunk keeps temporaries small
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = rng_feat.standard_normal((stop - start, spec.feat_dim), dtype=np.float32)
        block += means[true_class[start:stop]]
        feat[start:stop] = block

    # --- split -----------------------------------------------------------------------------------------------
    perm = rng_split.permutation(n)
    n_train = int(round(spec.train_frac * n))
    n_val = int(round(spec.val_frac * n))
    n_test = min(int(round(spec.test_frac * n)), n - n_train - n_val)
    masks = {}
    for name, (a, b) in zip(
        MASK_FIELDS, ((0, n_train), (n_train, n_train + n_val), (n_train + n_val, n_train + n_val + n_test))
    ):
        m = np.zeros(n, dtype=bool)
        m[perm[a:b]] = True
        masks[name] = m

    return _build_graph(src, dst, n, feat, label, masks)


def _build_graph(
    src: np.ndarray, dst: np.ndarray, n: int, feat: np.ndarray, label: np.ndarray, masks: dict[str, np.ndarray]
) -> dgl.DGLGraph:
    """Assemble a contract graph from int64 edge arrays ``[E]`` and node arrays (no copies where avoidable)."""
    g = dgl.graph(
        (
            torch.from_numpy(np.ascontiguousarray(src, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(dst, dtype=np.int64)),
        ),
        num_nodes=n,
    )
    g.ndata["feat"] = torch.from_numpy(np.ascontiguousarray(feat, dtype=np.float32))
    g.ndata["label"] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
    for name in MASK_FIELDS:
        g.ndata[name] = torch.from_numpy(np.ascontiguousarray(masks[name], dtype=bool))
    return g


def num_classes(g: dgl.DGLGraph) -> int:
    """Number of classes ``C`` of a contract graph: ``max(label) + 1`` (unlabelled ``-1`` nodes ignored)."""
    label = g.ndata["label"]
    return int(label.max()) + 1 if label.numel() else 0


# --------------------------------------------------------------------------------------------------------------
# Edge normalisation
# --------------------------------------------------------------------------------------------------------------


def _symmetrise(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric, duplicate-free, self-loop-free edge list from any int edge list with ids in ``[0, n)``.

    Returns int64 ``(src, dst)`` of length ``2 * U`` (``U`` distinct undirected edges): first ``lo -> hi`` sorted
    by ``(lo, hi)``, then the reverses. Peak extra memory is a few int64 arrays of the input length.
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    keys = np.minimum(src, dst) * np.int64(n) + np.maximum(src, dst)
    keys = keys[src != dst]
    keys = np.unique(keys)
    lo, hi = np.divmod(keys, np.int64(n))
    del keys
    return np.concatenate((lo, hi)), np.concatenate((hi, lo))


def _edges_canonical(g: dgl.DGLGraph) -> bool:
    """True if ``g``'s edges are already symmetric, duplicate-free and without self-loops."""
    src, dst = (t.numpy() for t in g.edges())
    n = g.num_nodes()
    if np.any(src == dst):
        return False
    fwd = np.unique(src.astype(np.int64) * n + dst)
    if fwd.shape[0] != src.shape[0]:
        return False  # duplicates
    rev = np.sort(dst.astype(np.int64) * n + src)
    return bool(np.array_equal(fwd, rev))


# --------------------------------------------------------------------------------------------------------------
# OGB raw layout
# --------------------------------------------------------------------------------------------------------------

_OGB_LAYOUT = (
    "raw/edge.csv.gz, raw/node-feat.csv.gz, raw/node-label.csv.gz, raw/num-node-list.csv.gz "
    "(or raw/data.npz + raw/node-label.npz), and split/<name>/{train,valid,test}.csv.gz"
)


def _find_ogb_root(root: str) -> str:
    """The OGB dataset folder: ``root`` itself if it has ``raw/``, else its single subfolder that has ``raw/``."""
    if not os.path.isdir(root):
        raise DatasetError(f"OGB dataset folder {root} does not exist (expected a folder with {_OGB_LAYOUT})")
    if os.path.isdir(os.path.join(root, "raw")):
        return root
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "raw")))
    if len(found) == 1:
        return os.path.join(root, found[0])
    if not found:
        raise DatasetError(
            f"{root} is not an OGB dataset folder: no raw/ in it or in a subfolder (expected {_OGB_LAYOUT})"
        )
    raise DatasetError(f"{root} holds {len(found)} OGB dataset folders ({', '.join(found)}): pass one of them")


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"missing {path} (an OGB dataset folder needs {_OGB_LAYOUT})")
    return path


def _read_csv(path: str, dtype=None) -> np.ndarray:
    """A headerless gzip CSV as a 2-D numpy array ``[rows, cols]`` (``[0, 0]`` for an empty file)."""
    import pandas as pd

    try:
        frame = pd.read_csv(_require(path), compression="gzip", header=None, dtype=dtype)
    except pd.errors.EmptyDataError:
        return np.zeros((0, 0), dtype=dtype or np.float64)
    except DatasetError:
        raise
    except Exception as exc:  # malformed gzip / csv / non-numeric values
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return frame.to_numpy()


def _read_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(_require(path)) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DatasetError(
                    f"{path} lacks key(s) {', '.join(missing)}: expected {', '.join(keys)}, "
                    f"got {', '.join(data.files) or 'none'}"
                )
            return {k: data[k] for k in keys}
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _as_int_labels(raw: np.ndarray, path: str, n: int) -> np.ndarray:
    """OGB labels ``[N]`` or ``[N, 1]`` (int, or float with NaN for unlabelled) -> int64 ``[N]`` with -1 for NaN."""
    if raw.ndim == 2 and raw.shape[1] != 1 and raw.shape[0] > 0:
        raise DatasetError(f"{path}: expected 1 label column (single-label classification), got {raw.shape[1]}")
    raw = raw.reshape(-1)
    if raw.shape[0] != n:
        raise DatasetError(f"{path}: expected {n} label rows (num nodes), got {raw.shape[0]}")
    if np.issubdtype(raw.dtype, np.integer):
        out = raw.astype(np.int64)
    else:
        raw = raw.astype(np.float64, copy=False)
        missing = np.isnan(raw)
        vals = raw[~missing]
        if vals.size and (np.any(vals != np.floor(vals)) or vals.min() < 0):
            raise DatasetError(
                f"{path}: expected non-negative integer labels (or NaN), got values like "
                f"{vals[(vals != np.floor(vals)) | (vals < 0)][:3].tolist()}"
            )
        out = np.where(missing, -1, raw).astype(np.int64)
    if out.size and out.min() < -1:
        raise DatasetError(f"{path}: expected labels >= 0 (or -1 / NaN for unlabelled), got {int(out.min())}")
    return out


def _check_edges(src: np.ndarray, dst: np.ndarray, n: int, path: str) -> None:
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        bad = int(max(src.max(), dst.max())) if max(src.max(), dst.max()) >= n else int(min(src.min(), dst.min()))
        raise DatasetError(f"{path}: edge endpoints must be node ids in [0, {n}), got {bad}")


def load_ogb(root: str) -> dgl.DGLGraph:
    """Load an OGB node-property dataset stored in OGB's raw layout (nothing is downloaded).

    Args:
        root: the dataset folder (e.g. ``.../ogbn_products``, holding ``raw/`` and ``split/``), or a folder that
            holds exactly one such dataset folder (e.g. the ``root`` passed to OGB's loaders).

    Layout read:
        - CSV form: ``raw/edge.csv.gz`` (``E`` rows ``src,dst``), ``raw/node-feat.csv.gz`` (``N`` rows of ``D``
          floats), ``raw/node-label.csv.gz`` (``N`` rows, one int or empty/NaN), ``raw/num-node-list.csv.gz``
          (one int ``N``), optionally ``raw/num-edge-list.csv.gz`` (one int ``E``, checked when present).
        - npz form (ogbn-papers100M): ``raw/data.npz`` with ``edge_index`` ``[2, E]``, ``node_feat`` ``[N, D]``,
          ``num_nodes_list`` (and ``num_edges_list``, checked), plus ``raw/node-label.npz`` with ``node_label``
          ``[N, 1]`` float, NaN for unlabelled nodes.
        - ``split/<name>/{train,valid,test}.csv.gz``: one node id per line; ``<name>`` is the only subfolder of
          ``split/`` (e.g. ``sales_ranking``, ``time``, ``species``).

    Returns:
        A contract graph: edges symmetrised and deduplicated (self-loops dropped), features cast to float32,
        unlabelled nodes labelled -1 and in no mask, masks from the split files.

    Raises:
        DatasetError: missing file (names it and the layout), wrong shape or out-of-range ids (names the file,
            expected vs got), overlapping splits or a split node without a label.
    """
    root = _find_ogb_root(os.path.expanduser(root))
    raw = os.path.join(root, "raw")
    npz_path = os.path.join(raw, "data.npz")

    if os.path.isfile(npz_path):
        data = _read_npz(npz_path, ("edge_index", "node_feat", "num_nodes_list"))
        nn_list = np.asarray(data["num_nodes_list"]).reshape(-1)
        if nn_list.shape[0] != 1:
            raise DatasetError(f"{npz_path}: expected num_nodes_list with 1 entry (one graph), got {nn_list.shape[0]}")
        n = int(nn_list[0])
        edge_index = np.asarray(data["edge_index"])
        if edge_index.ndim != 2 or edge_index.shape[0] != 2:
            raise DatasetError(f"{npz_path}: expected edge_index of shape [2, E], got {list(edge_index.shape)}")
        src, dst = edge_index[0], edge_index[1]
        edge_file = npz_path
        with np.load(npz_path) as d:
            if "num_edges_list" in d.files:
                ne = np.asarray(d["num_edges_list"]).reshape(-1)
                if ne.shape[0] == 1 and int(ne[0]) != src.shape[0]:
                    raise DatasetError(
                        f"{npz_path}: num_edges_list says {int(ne[0])} edges, edge_index has {src.shape[0]}"
                    )
        feat, feat_file = data["node_feat"], npz_path
        del data, edge_index
        label_file = os.path.join(raw, "node-label.npz")
        label_raw = _read_npz(label_file, ("node_label",))["node_label"]
    else:
        nn_file = os.path.join(raw, "num-node-list.csv.gz")
        edge_file = os.path.join(raw, "edge.csv.gz")
        feat_file = os.path.join(raw, "node-feat.csv.gz")
        label_file = os.path.join(raw, "node-label.csv.gz")
        for path in (nn_file, edge_file, feat_file, label_file):
            _require(path)  # report a missing file before spending minutes parsing the others
        nn_list = _read_csv(nn_file).reshape(-1)
        if nn_list.shape[0] != 1:
            raise DatasetError(f"{nn_file}: expected 1 value (one graph), got {nn_list.shape[0]}")
        n = int(nn_list[0])
        edges = _read_csv(edge_file, dtype=np.int64)
        if edges.shape[0] == 0:
            edges = np.zeros((0, 2), dtype=np.int64)
        if edges.ndim != 2 or edges.shape[1] != 2:
            raise DatasetError(f"{edge_file}: expected 2 columns (src,dst), got {edges.shape[1]}")
        src, dst = np.ascontiguousarray(edges[:, 0]), np.ascontiguousarray(edges[:, 1])
        del edges
        ne_file = os.path.join(raw, "num-edge-list.csv.gz")
        if os.path.isfile(ne_file):
            ne = _read_csv(ne_file).reshape(-1)
            if ne.shape[0] == 1 and int(ne[0]) != src.shape[0]:
                raise DatasetError(
                    f"{edge_file}: expected {int(ne[0])} edges (from num-edge-list.csv.gz), got {src.shape[0]}"
                )
        feat = _read_csv(feat_file, dtype=np.float32)
        label_raw = _read_csv(label_file)

    if feat.ndim != 2 or feat.shape[0] != n:
        raise DatasetError(
            f"{feat_file}: expected {n} feature rows (num nodes), got {feat.shape[0] if feat.ndim else 'a scalar'}"
        )
    if not np.issubdtype(feat.dtype, np.number):
        raise DatasetError(f"{feat_file}: expected numeric features, got dtype {feat.dtype}")
    feat = np.ascontiguousarray(feat, dtype=np.float32)
    _check_edges(src, dst, n, edge_file)
    label = _as_int_labels(label_raw, label_file, n)
    del label_raw

    masks = _read_ogb_split(root, n, label)
    src, dst = _symmetrise(src, dst, n)
    return _build_graph(src, dst, n, feat, label, masks)


def _read_ogb_split(root: str, n: int, label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks ``[N]`` from ``split/<name>/{train,valid,test}.csv.gz``, validated."""
    split_dir = os.path.join(root, "split")
    names = (
        sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if os.path.isdir(split_dir)
        else []
    )
    if len(names) != 1:
        got = "none" if not names else ", ".join(names)
        raise DatasetError(
            f"{split_dir}: expected exactly one split subfolder (e.g. sales_ranking, time, species), got {got}"
        )
    masks: dict[str, np.ndarray] = {}
    taken = np.zeros(n, dtype=bool)
    for field, fname in zip(MASK_FIELDS, ("train.csv.gz", "valid.csv.gz", "test.csv.gz")):
        path = os.path.join(split_dir, names[0], fname)
        idx = _read_csv(path)
        if idx.size and idx.shape[1] != 1:
            raise DatasetError(f"{path}: expected 1 column (node id), got {idx.shape[1]}")
        idx = idx.reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise DatasetError(f"{path}: expected integer node ids, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx.max()) if idx.max() >= n else int(idx.min())
            raise DatasetError(f"{path}: expected node ids in [0, {n}), got {bad}")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        if np.any(taken & mask):
            raise DatasetError(
                f"{path}: node {int(np.flatnonzero(taken & mask)[0])} is also in an earlier split "
                "(expected disjoint train/valid/test)"
            )
        unlabelled = mask & (label < 0)
        if np.any(unlabelled):
            raise DatasetError(
                f"{path}: node {int(np.flatnonzero(unlabelled)[0])} has no label "
                "(expected every split node to be labelled)"
            )
        taken |= mask
        masks[field] = mask
    return masks


# --------------------------------------------------------------------------------------------------------------
# Saved graphs and the front door
# --------------------------------------------------------------------------------------------------------------


def _validate(g: dgl.DGLGraph, source: str, check_edges: bool = True) -> dgl.DGLGraph:
    """Check a loaded graph against the contract, fix harmless dtype differences, and return a contract graph.

    Masks saved by :func:`dgl.save_graphs` come back as uint8 and are cast to bool; integer labels are cast to
    int64 and floating features to float32. With ``check_edges``, an edge set that is not symmetric /
    duplicate-free / self-loop-free is rebuilt canonically (edge data is then dropped).
    """
    if len(g.ntypes) != 1 or len(g.etypes) != 1:
        raise DatasetError(
            f"{source}: expected a homogeneous graph, got node types {g.ntypes} and edge types {g.etypes}"
        )
    n = g.num_nodes()
    for field in NDATA_FIELDS:
        if field not in g.ndata:
            raise DatasetError(
                f"{source}: missing ndata['{field}'] (expected fields {', '.join(NDATA_FIELDS)}; "
                f"got {', '.join(sorted(g.ndata.keys())) or 'none'})"
            )
    feat = g.ndata["feat"]
    if feat.dim() != 2 or not feat.is_floating_point():
        raise DatasetError(f"{source}: ndata['feat'] must be float [N, D], got {feat.dtype} {list(feat.shape)}")
    label = g.ndata["label"]
    if label.dim() != 1 or label.is_floating_point() or label.dtype == torch.bool:
        raise DatasetError(f"{source}: ndata['label'] must be int64 [N], got {label.dtype} {list(label.shape)}")
    if label.numel() and int(label.min()) < -1:
        raise DatasetError(f"{source}: ndata['label'] must be >= -1 (-1 = unlabelled), got {int(label.min())}")
    masks = {}
    for field in MASK_FIELDS:
        m = g.ndata[field]
        if (
            m.dim() != 1
            or m.is_floating_point()
            or (m.numel() and int(m.max()) > 1)
            or (m.numel() and int(m.min()) < 0)
        ):
            raise DatasetError(f"{source}: ndata['{field}'] must be bool [N], got {m.dtype} {list(m.shape)}")
        masks[field] = m.bool()
    total = masks["train_mask"].long() + masks["val_mask"].long() + masks["test_mask"].long()
    if total.numel() and int(total.max()) > 1:
        raise DatasetError(
            f"{source}: train_mask, val_mask and test_mask overlap "
            f"(expected disjoint; {int((total > 1).sum())} nodes in several)"
        )
    if int(((total > 0) & (label < 0)).sum()):
        raise DatasetError(
            f"{source}: {int(((total > 0) & (label < 0)).sum())} masked nodes have label -1 "
            "(expected only labelled nodes in masks)"
        )

    if check_edges and not _edges_canonical(g):
        src, dst = (t.numpy() for t in g.edges())
        src, dst = _symmetrise(src, dst, n)
        ndata = dict(g.ndata)
        g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)
        for k, v in ndata.items():
            g.ndata[k] = v
    g.ndata["feat"] = feat.float()
    g.ndata["label"] = label.long()
    for field, m in masks.items():
        g.ndata[field] = m
    return g


def native_error_line(exc: BaseException) -> str:
    """One line from an error DGL's C++ core raised: its first line without the ``[hh:mm:ss] file.cc:123: ``
    prefix (the native stack trace DGL appends to the message is dropped)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", first)


def _load_dgl_file(path: str) -> tuple[dgl.DGLGraph, dict]:
    try:
        graphs, labels = dgl.load_graphs(path)
    except Exception as exc:  # noqa: BLE001 - DGL raises DGLError, and others, for a file it cannot parse
        raise DatasetError(
            f"cannot read {path} with dgl.load_graphs: {type(exc).__name__}: {native_error_line(exc)}"
        ) from None
    if not graphs:
        raise DatasetError(f"{path}: expected 1 graph, got 0")
    return graphs[0], labels


def _save_atomic(path: str, g: dgl.DGLGraph, labels: dict[str, torch.Tensor]) -> None:
    """``dgl.save_graphs`` to a temporary file next to ``path``, then rename (readers never see a partial file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        dgl.save_graphs(tmp, [g], labels)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_graph(name_or_path: str, seed: int = 0, cache_dir: str | None = None) -> dgl.DGLGraph:
    """Return a contract graph for a preset name, an OGB dataset folder, or a ``.dgl`` / ``.bin`` file.

    Args:
        name_or_path: a key of :data:`PRESETS` (generated with ``seed``); a folder in OGB's raw layout (see
            :func:`load_ogb`); or a file written by :func:`dgl.save_graphs` (first graph used, validated, masks
            cast to bool, edges symmetrised if they are not).
        seed: seed for presets (ignored otherwise).
        cache_dir: for presets, keep the graph in ``<cache_dir>/<name>-seed<seed>.dgl`` and reuse it on later
            calls (written atomically; a file generated from a different spec or generator version is replaced).

    Raises:
        DatasetError: unknown name, or a source that violates the contract.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path in PRESETS:
        spec = PRESETS[name_or_path]
        if cache_dir is None:
            return generate_synthetic(spec, seed)
        path = os.path.join(cache_dir, f"{name_or_path}-seed{seed}.dgl")
        fp = spec.fingerprint()
        if os.path.isfile(path):
            try:
                g, labels = _load_dgl_file(path)
            except DatasetError:
                labels = {}  # unreadable cache: regenerate below
            stored = labels.get("rudder_spec_fingerprint")
            if stored is not None and int(stored.reshape(-1)[0]) == fp:
                return _validate(g, path, check_edges=False)
        g = generate_synthetic(spec, seed)
        _save_atomic(path, g, {"rudder_spec_fingerprint": torch.tensor([fp], dtype=torch.int64)})
        return g

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return load_ogb(path)
    if os.path.isfile(path) and path.endswith((".dgl", ".bin")):
        g, _ = _load_dgl_file(path)
        return _validate(g, path)
    raise DatasetError(
        f"unknown graph {name_or_path!r}: expected one of {', '.join(PRESETS)}, an OGB dataset folder, or a .dgl file"
    )
