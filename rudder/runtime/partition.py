"""Partitioning a graph for DistDGL, cached on disk and reused across runs.

``ensure_partitions(cfg)`` returns the partition config JSON of ``cfg.graph`` cut into ``cfg.parts`` partitions by
``cfg.partition`` (METIS or random), making it once under ``<cache_dir>/partitions/<key>/`` (written to a
temporary folder and renamed, so a killed partitioning leaves nothing half-written). Next to DGL's own files,
``rudder.json`` records what a trainer needs without scanning the graph: classes, feature width, sizes; and the
size and CRC-32 of every file, checked each time the partitions are used, because DGL reads a truncated or damaged
feature file without complaint and trains on wrong rows. CRC-32 (zlib, streamed) catches damage, not tampering;
it reads the files once (BENCHMARKS.md and docs/reliability.md, "Injected faults", give its cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import zlib

import numpy as np

from rudder.runtime.dgl_compat import import_dgl

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


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise PartitionError(f"{what} {path} is missing: re-partition with --repartition") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PartitionError(f"{what} {path} is not valid JSON ({exc}): re-partition with --repartition") from None
    if not isinstance(value, dict):
        raise PartitionError(
            f"{what} {path}: expected a JSON object, got {type(value).__name__}: re-partition with --repartition"
        )
    return value


def read_meta(part_dir: str) -> dict:
    return _read_json(os.path.join(part_dir, META_FILE), "partition metadata")


def file_crc32(path: str) -> int:
    """CRC-32 of a file's bytes, read in 1 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def record_files(part_dir: str) -> dict[str, list[int]]:
    """``{relative path: [bytes, crc32]}`` for every file under ``part_dir`` but ``rudder.json``."""
    out = {}
    for root, _, names in os.walk(part_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, part_dir)
            if rel != META_FILE:
                out[rel] = [os.path.getsize(path), file_crc32(path)]
    return dict(sorted(out.items()))


def _write_meta(part_dir: str, meta: dict) -> None:
    tmp = os.path.join(part_dir, f"{META_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(part_dir, META_FILE))


def verify_files(
    part_dir: str, meta: dict, checksums: bool = True, log=lambda msg: print(msg, file=sys.stderr, flush=True)
) -> None:
    """Check every partition file against the sizes (and, with ``checksums``, the CRC-32s) recorded in ``meta``
    when partitioning; :class:`PartitionError` naming the first file that differs. Partitions made before rudder
    recorded them get their record now (a note says so: damage done before cannot be told)."""
    files = meta.get("files")
    if not isinstance(files, dict):
        meta["files"] = record_files(part_dir)
        _write_meta(part_dir, meta)
        log(
            f"rudder: partitions in {part_dir} had no record of their files (made by an older rudder): recorded "
            f"sizes and CRC-32s now; --repartition to be sure they are sound"
        )
        return
    for rel, expected in files.items():
        path = os.path.join(part_dir, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise PartitionError(f"partition file {path} is missing: re-partition with --repartition") from None
        if not (isinstance(expected, list) and len(expected) == 2):
            raise PartitionError(
                f"{os.path.join(part_dir, META_FILE)}: bad record for {rel}: {expected!r}: "
                f"re-partition with --repartition"
            )
        if size != expected[0]:
            raise PartitionError(
                f"partition file {path} is damaged: {size} bytes, {expected[0]} when partitioned: "
                f"re-partition with --repartition"
            )
        if checksums and file_crc32(path) != expected[1]:
            raise PartitionError(
                f"partition file {path} is damaged: its CRC-32 differs from the one recorded when "
                f"partitioning: re-partition with --repartition"
            )


def check_partitions(part_dir: str, parts: int, checksums: bool = True) -> str:
    """Return the partition config path after checking every file DistDGL will open exists and is as it was
    written (sizes always, CRC-32s with ``checksums``)."""
    meta = read_meta(part_dir)
    config = os.path.join(part_dir, str(meta.get("part_config")))
    part_meta = _read_json(config, "partition config")
    if part_meta.get("num_parts") != parts:
        raise PartitionError(f"{config}: num_parts is {part_meta.get('num_parts')}, expected {parts}")
    for p in range(parts):
        info = part_meta.get(f"part-{p}")
        if not isinstance(info, dict):
            raise PartitionError(f"{config}: no entry part-{p}: re-partition with --repartition")
        for key in ("node_feats", "edge_feats", "part_graph"):
            path = os.path.join(part_dir, info[key]) if not os.path.isabs(info[key]) else info[key]
            if not os.path.exists(path):
                raise PartitionError(
                    f"partition file {path} is missing (part {p}, {key}): re-partition with --repartition"
                )
    verify_files(part_dir, meta, checksums)
    return config


def ensure_partitions(cfg, checksums: bool = True, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """Partition ``cfg.graph`` unless cached (or ``cfg.repartition``); return the partition config JSON path, after
    :func:`check_partitions`."""
    part_dir = partition_dir(cfg)
    if getattr(cfg, "repartition", False) and os.path.exists(part_dir):
        log(f"rudder: --repartition: removing {part_dir}")
        shutil.rmtree(part_dir)
    if os.path.exists(os.path.join(part_dir, META_FILE)):
        return check_partitions(part_dir, cfg.parts, checksums)
    dgl = import_dgl()
    from rudder.runtime.datasets import load_graph, num_classes

    t0 = time.perf_counter()
    g = load_graph(cfg.graph, seed=cfg.seed, cache_dir=os.path.join(cfg.cache_dir, "graphs"))
    log(
        f"rudder: graph {cfg.graph}: {g.num_nodes()} nodes, {g.num_edges()} edges "
        f"({time.perf_counter() - t0:.1f} s); partitioning into {cfg.parts} ({cfg.partition}) ..."
    )
    t1 = time.perf_counter()
    tmp = f"{part_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    np.random.seed(cfg.seed)  # random partitioning draws from numpy's global generator
    import torch

    torch.manual_seed(cfg.seed)
    name = graph_name(cfg)
    orig_nids, _ = dgl.distributed.partition_graph(
        g,
        name,
        cfg.parts,
        tmp,
        part_method=cfg.partition,
        balance_ntypes=g.ndata["train_mask"],
        balance_edges=True,
        num_hops=1,
        return_mapping=True,
    )
    np.save(os.path.join(tmp, ORIG_NIDS_FILE), orig_nids.numpy())  # partition id -> original node id
    meta = dict(
        graph=cfg.graph,
        graph_name=name,
        part_config=f"{name}.json",
        parts=cfg.parts,
        method=cfg.partition,
        seed=cfg.seed,
        num_nodes=int(g.num_nodes()),
        num_edges=int(g.num_edges()),
        feat_dim=int(g.ndata["feat"].shape[1]),
        num_classes=int(num_classes(g)),
        partition_s=round(time.perf_counter() - t1, 3),
        files=record_files(tmp),
    )
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(part_dir), exist_ok=True)
    try:
        os.rename(tmp, part_dir)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"rudder: partitions ready in {part_dir} ({meta['partition_s']:.1f} s)")
    return check_partitions(part_dir, cfg.parts, checksums=False)  # just written and recorded
