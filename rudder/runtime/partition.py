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
import warnings
import zlib

import numpy as np

from rudder.runtime.dgl_compat import import_dgl

META_FILE = "rudder.json"
ORIG_NIDS_FILE = "orig_nids.npy"
FINGERPRINT = "fingerprint"  # key in rudder.json, and in a trace's meta.graph


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


def fingerprint(part_dir: str, part_config: str | None = None) -> str:
    """The fingerprint of a partitioning: ``sha256:`` and 16 hex digits over the node id mapping (each node's
    original id, in DistDGL's new numbering: ``orig_nids.npy``) and each partition's range of new ids (the
    config's ``node_map``). Two partitionings with one fingerprint number every node alike, so node ids (decisions,
    traces) carry over between their runs; METIS as DGL calls it is not deterministic with the weights rudder
    gives it (node types, degrees: the same options and seed cut differently from one call to the next), so a
    partitioning made again must be told from the first by this, not by its options."""
    if part_config is None:
        part_config = os.path.join(part_dir, str(read_meta(part_dir).get("part_config")))
    node_map = _read_json(part_config, "partition config").get("node_map")
    try:
        orig = np.load(os.path.join(part_dir, ORIG_NIDS_FILE))
    except (OSError, ValueError) as exc:
        raise PartitionError(
            f"partition file {os.path.join(part_dir, ORIG_NIDS_FILE)} is unreadable ({exc}): re-partition with "
            "--repartition"
        ) from None
    digest = hashlib.sha256(np.ascontiguousarray(orig, dtype=np.int64).tobytes())
    digest.update(json.dumps(node_map, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()[:16]


def check_same_partitioning(recorded: str | None, current: str, what: str, where: str) -> str | None:
    """Compare a recorded partition fingerprint with the one of the partitions a run uses: a ValueError (one line)
    when they differ; a note (returned) when the recording has none (made before rudder recorded it)."""
    if recorded is None:
        return (
            f"rudder: note: {what} {where} records no partition fingerprint (recorded before rudder kept one): "
            "its node ids are assumed to match this run's partitions"
        )
    if recorded != current:
        raise ValueError(
            f"{what} {where}: recorded on partitions with fingerprint {recorded}, this run's are {current} "
            f"(a partitioning made again numbers nodes differently): its node ids name other nodes here"
        )
    return None


def check_decisions_partitioning(cfg, part_config: str) -> str | None:
    """``--decisions-from``: refuse (ValueError, one line) a trace recorded on another partitioning than the one
    at ``part_config``; a note when the trace records none. Nothing to check without ``--decisions-from``."""
    if not getattr(cfg, "decisions_from", None):
        return None
    from rudder.traces import Trace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an incomplete trace is the agent's business, not this check's
        recorded = Trace(cfg.decisions_from).partition_fingerprint
    part_dir = os.path.dirname(part_config)
    current = read_meta(part_dir).get(FINGERPRINT) or fingerprint(part_dir, part_config)
    return check_same_partitioning(recorded, current, "--decisions-from", cfg.decisions_from)


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
    if FINGERPRINT not in meta:  # partitions made before rudder recorded it
        meta[FINGERPRINT] = fingerprint(part_dir, config)
        _write_meta(part_dir, meta)
    return config


TMP_MARK = ".tmp"  # a partitioning in progress: <partition folder>.tmp<pid of the partitioning process>


def remove_stale_temporaries(partitions: str, log=lambda msg: None) -> list[str]:
    """Remove the temporary folders of partitionings whose process is gone (killed outright: its own clean-up never
    ran; tens of GB at papers100M scale); returns their paths."""
    removed = []
    try:
        names = os.listdir(partitions)
    except OSError:
        return removed
    for name in names:
        head, mark, pid = name.rpartition(TMP_MARK)
        if not (head and mark and pid.isdigit()):
            continue
        if _pid_alive(int(pid)):
            continue
        path = os.path.join(partitions, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log(f"rudder: removed the temporary folder of a partitioning that was killed: {path}")
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_parts(cfg, num_nodes: int, train_nodes: int) -> None:
    """``--parts`` against the graph, before partitioning: every trainer (``parts`` x trainers per part) needs a
    training node of its own partition; a PartitionError in one line otherwise."""
    trainers = cfg.parts * cfg.trainers_per_part
    if cfg.parts > num_nodes or trainers > train_nodes:
        raise PartitionError(
            f"--parts {cfg.parts}: {cfg.graph} has {num_nodes} nodes, {train_nodes} of them training nodes, and "
            f"each of the {trainers} trainers ({cfg.parts} partitions x {cfg.trainers_per_part}) needs some: "
            f"use at most {max(1, min(num_nodes, train_nodes // cfg.trainers_per_part))} partitions"
        )


def ensure_partitions(cfg, checksums: bool = True, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """Partition ``cfg.graph`` unless cached (or ``cfg.repartition``); return the partition config JSON path, after
    :func:`check_partitions`."""
    part_dir = partition_dir(cfg)
    if getattr(cfg, "repartition", False) and os.path.exists(part_dir):
        log(f"rudder: --repartition: removing {part_dir}")
        shutil.rmtree(part_dir)
    if os.path.exists(os.path.join(part_dir, META_FILE)):
        return check_partitions(part_dir, cfg.parts, checksums)
    remove_stale_temporaries(os.path.dirname(part_dir), log)
    import_dgl()  # DGL's compatibility fixes before the graph is loaded
    from rudder.runtime.datasets import load_graph

    t0 = time.perf_counter()
    g = load_graph(cfg.graph, seed=cfg.seed, cache_dir=os.path.join(cfg.cache_dir, "graphs"))
    check_parts(cfg, int(g.num_nodes()), int(g.ndata["train_mask"].sum()))
    log(
        f"rudder: graph {cfg.graph}: {g.num_nodes()} nodes, {g.num_edges()} edges "
        f"({time.perf_counter() - t0:.1f} s); partitioning into {cfg.parts} ({cfg.partition}) ..."
    )
    t1 = time.perf_counter()
    tmp = f"{part_dir}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _partition_into(cfg, g, tmp, t1)
    finally:  # any exit but SIGKILL; a killed one's folder goes at the next start (remove_stale_temporaries)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"rudder: partitions ready in {part_dir} ({read_meta(part_dir)['partition_s']:.1f} s)")
    return check_partitions(part_dir, cfg.parts, checksums=False)  # just written and recorded


def _partition_into(cfg, g, tmp: str, t1: float) -> None:
    """Partition ``g`` into ``tmp``, record it, and rename it to the partition folder (unless another process
    finished first: theirs is kept)."""
    dgl = import_dgl()
    from rudder.runtime.datasets import num_classes

    part_dir = partition_dir(cfg)
    np.random.seed(cfg.seed)  # random partitioning draws from numpy's global generator
    import torch

    torch.manual_seed(cfg.seed)
    name = graph_name(cfg)
    try:
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
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - DGL's own failures (e.g. an empty partition) become one line
        why = (str(exc).strip().splitlines() or [""])[0]
        why = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", why)[:200]  # DGL's "[time] file.cc:line: " prefix
        raise PartitionError(
            f"--parts {cfg.parts}: {cfg.graph} has {g.num_nodes()} nodes, {int(g.ndata['train_mask'].sum())} of "
            f"them training nodes, and DGL could not cut it into {cfg.parts} {cfg.partition} partitions "
            f"({type(exc).__name__}: {why}): use fewer partitions"
        ) from None
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
    meta[FINGERPRINT] = fingerprint(tmp, os.path.join(tmp, meta["part_config"]))
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(part_dir), exist_ok=True)
    try:
        os.rename(tmp, part_dir)
    except OSError:  # another process finished first: keep theirs
        pass
