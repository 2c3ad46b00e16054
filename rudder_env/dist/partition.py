"""Partitioning a graph for DistDGL, cached on disk and reused across runs.

``ensure_partitions(cfg)`` returns the partition config JSON of ``cfg.graph`` cut into ``cfg.parts`` partitions by
``cfg.partition`` (METIS or random), making it once under ``<cache_dir>/partitions/<key>/`` (written to a
temporary folder and renamed, so a killed partitioning leaves nothing half-written). Next to DGL's own files,
``rudder.json`` records what a trainer needs without scanning the graph: classes, feature width, sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from rudder_env.dist.dgl_compat import import_dgl

META_FILE = "rudder.json"
ORIG_NIDS_FILE = "orig_nids.npy"


class PartitionError(RuntimeError):
    """Partitions missing or unreadable (one-line message naming the file)."""


def graph_key(graph: str, seed: int) -> str:
    """A file-name-safe key naming ``graph``: presets by name and seed, paths by name and a hash of the path."""
    if os.path.exists(graph):
        path = os.path.abspath(graph)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path.rstrip("/")) or "graph")
        return f"{base}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return f"{graph}-seed{seed}"


def partition_dir(cfg) -> str:
    key = f"{graph_key(cfg.graph, cfg.seed)}-{cfg.partition}{cfg.parts}"
    return os.path.join(cfg.cache_dir, "partitions", key)


def graph_name(cfg) -> str:
    """DistDGL's graph name (must match between partitions, servers and trainers)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", graph_key(cfg.graph, cfg.seed))


def read_meta(part_dir: str) -> dict:
    path = os.path.join(part_dir, META_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PartitionError(f"partition metadata {path} is missing: remove {part_dir} and partition again") from None


def check_partitions(part_dir: str, parts: int) -> str:
    """Return the partition config path after checking every file DistDGL will open exists."""
    meta = read_meta(part_dir)
    config = os.path.join(part_dir, meta["part_config"])
    if not os.path.exists(config):
        raise PartitionError(f"partition config {config} is missing")
    with open(config) as f:
        part_meta = json.load(f)
    if part_meta.get("num_parts") != parts:
        raise PartitionError(f"{config}: num_parts is {part_meta.get('num_parts')}, expected {parts}")
    for p in range(parts):
        info = part_meta.get(f"part-{p}")
        if info is None:
            raise PartitionError(f"{config}: no entry part-{p}")
        for key in ("node_feats", "edge_feats", "part_graph"):
            path = os.path.join(part_dir, info[key]) if not os.path.isabs(info[key]) else info[key]
            if not os.path.exists(path):
                raise PartitionError(f"partition file {path} is missing (part {p}, {key}); "
                                     f"remove {part_dir} and partition again")
    return config


def ensure_partitions(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """Partition ``cfg.graph`` unless cached; return the partition config JSON path."""
    part_dir = partition_dir(cfg)
    if os.path.exists(os.path.join(part_dir, META_FILE)):
        return check_partitions(part_dir, cfg.parts)
    dgl = import_dgl()
    from rudder_env.dist.datasets import load_graph, num_classes

    t0 = time.perf_counter()
    g = load_graph(cfg.graph, seed=cfg.seed, cache_dir=os.path.join(cfg.cache_dir, "graphs"))
    log(f"rudder: graph {cfg.graph}: {g.num_nodes()} nodes, {g.num_edges()} edges "
        f"({time.perf_counter() - t0:.1f} s); partitioning into {cfg.parts} ({cfg.partition}) ...")
    t1 = time.perf_counter()
    tmp = f"{part_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    np.random.seed(cfg.seed)  # random partitioning draws from numpy's global generator
    import torch

    torch.manual_seed(cfg.seed)
    name = graph_name(cfg)
    orig_nids, _ = dgl.distributed.partition_graph(
        g, name, cfg.parts, tmp, part_method=cfg.partition, balance_ntypes=g.ndata["train_mask"],
        balance_edges=True, num_hops=1, return_mapping=True)
    np.save(os.path.join(tmp, ORIG_NIDS_FILE), orig_nids.numpy())  # partition id -> original node id
    meta = dict(graph=cfg.graph, graph_name=name, part_config=f"{name}.json", parts=cfg.parts,
                method=cfg.partition, seed=cfg.seed, num_nodes=int(g.num_nodes()), num_edges=int(g.num_edges()),
                feat_dim=int(g.ndata["feat"].shape[1]), num_classes=int(num_classes(g)),
                partition_s=round(time.perf_counter() - t1, 3))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(part_dir), exist_ok=True)
    try:
        os.rename(tmp, part_dir)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"rudder: partitions ready in {part_dir} ({meta['partition_s']:.1f} s)")
    return check_partitions(part_dir, cfg.parts)
