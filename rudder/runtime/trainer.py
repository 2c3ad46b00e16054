"""One DistDGL trainer rank: GNN training whose remote input features go through the prefetch buffer.

The order is DGL's (``examples/distributed/graphsage``): initialize → process group → DistGraph → node_split →
DistNodeDataLoader → DDP. What rudder adds is in :meth:`DistTrainer.train_step`: the minibatch's input nodes owned
by other partitions are looked up in the :class:`~rudder.env.buffer.PrefetchBuffer`; misses and any scheduled
prefetch set are pulled in the same DistTensor pull as the local rows. Every ``period`` minibatches a policy may
hand the buffer a prefetch set: :class:`~rudder.env.live_env.LiveEnv` steps :meth:`DistTrainer.minibatches`.
"""

from __future__ import annotations

import collections
import itertools
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rudder.env.buffer import EMPTY, PrefetchBuffer, initial_ids, positions
from rudder.env.defaults import DEFAULTS
from rudder.env.episode import MinibatchRecord
from rudder.env.lookahead import SamplerLookahead
from rudder.env.sample_ahead import SampleAhead, sampled_bytes
from rudder.env.vip import vertex_inclusion_probability
from rudder.runtime.dgl_compat import import_dgl
from rudder.runtime.models import block_indices, build_model
from rudder.runtime.partition import ORIG_NIDS_FILE
from rudder.runtime.progress import EpochStats
from rudder.runtime.stop import StopRequested

dgl = import_dgl()


class _Link:
    """The trainer's RPC client, shared by demand pulls (a minibatch's misses and labels, on the critical path),
    neighbour sampling and background prefetch chunks: one use at a time (two threads pulling at once through
    DGL 2.1's client receive each other's rows: wrong labels and features were seen), demand first — a chunk
    waits while a demand pull is waiting, so a demand pull waits behind at most the one chunk in progress. Records
    how long demand pulls waited (stall)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._demand_waiting = 0
        self.stall_s = 0.0  # demand seconds spent waiting for a chunk, since the last reset

    def pull(self, feat, ids: torch.Tensor, background: bool = False) -> torch.Tensor:
        """``feat[ids]`` over the link."""
        return self.call(feat.__getitem__, ids, background=background)

    def call(self, fn, *args, background: bool = False):
        """``fn(*args)``, a use of DGL's RPC client (a pull, neighbour sampling on the servers), over the link."""
        with self._cond:
            if background:
                while self._busy or self._demand_waiting:
                    self._cond.wait()
            else:
                self._demand_waiting += 1
                t0 = time.perf_counter()
                while self._busy:
                    self._cond.wait()
                self.stall_s += time.perf_counter() - t0
                self._demand_waiting -= 1
            self._busy = True
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


def pick_device(kind: str, local_rank: int) -> torch.device:
    """The device a trainer trains on: the CPU, or GPU ``local_rank`` modulo the GPUs this process sees (trainers
    beyond the GPU count share them; under ``srun --gpus-per-task=1`` each sees one, its own)."""
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU in this trainer process")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


class DeviceRows:
    """The prefetch buffer's rows held on a GPU (``--buffer-on-device``), beside a
    :class:`~rudder.env.buffer.PrefetchBuffer` that keeps ids only: a mirror of its slots.

    After anything that may install rows (a fill, a chunk's arrival, a minibatch's :meth:`PrefetchBuffer.finish`),
    :meth:`sync` compares the buffer's ``slot_ids`` with the ids the mirror holds and copies each changed slot's row
    from the rows just pulled (already on the device): every installed id is one of them."""

    def __init__(self, capacity: int, feat_dim: int, dtype: torch.dtype, device: torch.device):
        self.rows = torch.zeros((capacity, feat_dim), dtype=dtype, device=device)
        self.slot_ids = np.full(capacity, EMPTY, dtype=np.int64)

    def sync(self, buffer: PrefetchBuffer, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Bring the mirror to ``buffer``'s slots; ``rows`` (on the device) are those of ``ids``, the rows pulled
        since the last sync."""
        changed = np.flatnonzero(buffer.slot_ids != self.slot_ids)
        installed = buffer.slot_ids[changed]
        keep = installed != EMPTY
        changed, installed = changed[keep], installed[keep]
        if changed.size:
            pos = positions(np.asarray(ids, dtype=np.int64), installed)
            if (pos < 0).any():
                raise RuntimeError(f"{int((pos < 0).sum())} rows entered the buffer without being pulled")
            index = torch.from_numpy(changed).to(self.rows.device)
            self.rows[index] = rows[torch.from_numpy(pos).to(rows.device)]
        self.slot_ids = buffer.slot_ids.copy()

    def inputs(
        self, buffer: PrefetchBuffer, remote: np.ndarray, hit_slots: np.ndarray, to_pull: np.ndarray, pulled
    ) -> torch.Tensor:
        """A minibatch's input rows assembled on the device, then the rows ``buffer`` took in synced.

        ``remote``: mask over the input nodes (owned by another partition); ``hit_slots``: each remote input's
        buffer slot when :meth:`PrefetchBuffer.begin` looked them up (``EMPTY``: a miss); ``pulled`` (on the device):
        the local inputs' rows, then ``to_pull``'s (misses in order, then a prefetch set)."""
        device = self.rows.device
        n_local = int(pulled.shape[0]) - int(to_pull.size)
        hit = hit_slots != EMPTY
        remote_pos = np.flatnonzero(remote)

        def index(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)

        x = torch.empty((remote.size, pulled.shape[1]), dtype=pulled.dtype, device=device)
        x[index(np.flatnonzero(~remote))] = pulled[:n_local]
        x[index(remote_pos[hit])] = self.rows[index(hit_slots[hit])]  # read before sync() may overwrite them
        n_miss = int(np.count_nonzero(~hit))
        x[index(remote_pos[~hit])] = pulled[n_local : n_local + n_miss]
        self.sync(buffer, to_pull, pulled[n_local:])
        return x

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


def _blocks_bytes(batch) -> int:
    """Bytes a sampled minibatch holds as int64: its input and seed ids, each block's node ids and edges."""
    input_nodes, seeds, blocks = batch[0], batch[1], batch[2]
    n = int(input_nodes.shape[0]) + int(seeds.shape[0])
    for b in blocks:
        n += b.num_src_nodes() + b.num_dst_nodes() + 2 * b.num_edges()
    return 8 * n


class _Sampled(NamedTuple):
    """A minibatch sampled ahead of training."""

    batch: tuple  # (input nodes, seeds, blocks) from the loader
    sample_s: float
    remote: np.ndarray  # mask over the input nodes: owned by another partition
    remote_ids: np.ndarray  # those input nodes' ids
    epoch: int
    nbytes: int  # sampled bytes (:func:`~rudder.env.sample_ahead.sampled_bytes` of its input rows)
    blocks_nbytes: int  # its ids and blocks as int64 (:func:`_blocks_bytes`)


@dataclass
class RankStats:
    """Per-trainer totals for the run summary (times in seconds)."""

    epoch_time_s: list = field(default_factory=list)
    sample_s: float = 0.0
    fetch_s: float = 0.0
    compute_s: float = 0.0
    stall_s: float = 0.0  # of fetch_s: demand pulls waiting behind a background prefetch chunk
    minibatches: int = 0
    overlapped: int = 0  # minibatches whose rows were pulled during the previous minibatch's compute
    overlap_mismatches: int = 0  # pulled ahead but not usable (the buffer changed): pulled again
    remote_rows_pulled: int = 0  # rows of other partitions' nodes that DistTensor pulls returned (fill included)
    local_rows_pulled: int = 0  # rows of this partition's nodes those pulls returned
    remote_rows_discarded: int = 0  # of those, never used: pulled ahead for outdated misses, or chunks left at the end
    train_start_unix: float = 0.0  # wall clock when training began and ended (to show jobs overlapping in time)
    train_end_unix: float = 0.0
    loss_sum: float = 0.0  # training loss summed over minibatches
    h2d_s: float = 0.0  # of fetch_s: copying input rows (and labels) host-to-device, synchronised (0 on a CPU)
    h2d_rows: int = 0  # rows copied host-to-device
    epochs: list = field(default_factory=list)  # one EpochStats per finished epoch


class DistTrainer:
    """Training on one trainer rank of a DistDGL job.

    Args:
        cfg: :class:`~rudder.runtime.config.TrainConfig`.
        trainer_rank: this trainer's index among all trainers (torch.distributed rank).
        graph_name: DistDGL graph name of the partitions.
        ip_config: DGL ip_config file.
        master: ``host:port`` of torch.distributed's TCP store.
        meta: the partitions' ``rudder.json`` (classes, feature width).
        part_config: the partition config JSON (to find the original node ids for ``--verify-rows``).
        buffer_fraction, admit_on_miss, buffer_init: the buffer the agent plays with
            (:func:`rudder.env.contract.buffer_kwargs` of its settings and the run's options; None: the run's).
        heartbeat: a :class:`~rudder.runtime.heartbeat.Heartbeat` to mark progress in (each minibatch's phases:
            sampling, fetching, compute and all-reduce, the agent's turn; evaluation; closing), for the
            supervisor's watchdog.
        stop: a :class:`~rudder.runtime.stop.StopRelay`; before each minibatch the trainers agree whether to stop
            (a signal reached a rank of the job), and :meth:`minibatches` then raises
            :class:`~rudder.runtime.stop.StopRequested` after the same minibatch on every trainer.
        local_rank: this trainer's index among the trainers on its host, which picks its GPU with ``--device cuda``
            (None: ``trainer_rank``).

    With ``--device cuda`` the model and loss live on the GPU; sampling, the buffer's bookkeeping and DistTensor
    pulls stay on the CPU. Each minibatch's input rows go host-to-device from pinned memory: all of them, or with
    ``--buffer-on-device`` only the rows pulled (hits are gathered from :class:`DeviceRows`). That copy is timed
    (``h2d_s``, part of the fetch time) and its rows counted.
    """

    def __init__(
        self,
        cfg,
        trainer_rank: int,
        graph_name: str,
        ip_config: str,
        master: str,
        meta: dict,
        part_config: str = "",
        buffer_fraction: float | None = None,
        admit_on_miss: bool | None = None,
        heartbeat=None,
        buffer_init: str | None = None,
        stop=None,
        local_rank: int | None = None,
    ):
        self.cfg = cfg
        self.stop = stop
        self.stopped: dict | None = None  # the stop record once training was stopped early
        self._mark = heartbeat.mark if heartbeat is not None else (lambda phase: None)
        self.trainer_rank = trainer_rank
        self.meta = meta
        self.part_config = part_config
        self.verify = dict(rows_checked=0, rows_differing_from_disttensor=0, rows_col0_not_orig_id=0)
        self._orig_nids = None
        dgl.distributed.initialize(ip_config)
        host, port = master.rsplit(":", 1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://{host}:{port}", rank=trainer_rank, world_size=cfg.num_trainers
        )
        self.device = pick_device(cfg.device, trainer_rank if local_rank is None else local_rank)
        self.on_gpu = self.device.type == "cuda"
        self.impl = cfg.impl
        self.device_rows: DeviceRows | None = None
        self.g = dgl.distributed.DistGraph(graph_name)
        self.pb = self.g.get_partition_book()
        self.partid = self.pb.partid
        self.train_nid = dgl.distributed.node_split(self.g.ndata["train_mask"], self.pb, force_even=True)
        self.sampler = dgl.dataloading.NeighborSampler(cfg.fanouts)
        self.loader = dgl.dataloading.DistNodeDataLoader(
            self.g, self.train_nid, self.sampler, batch_size=cfg.batch_size, shuffle=True, drop_last=False
        )
        self.minibatches_per_epoch = -(-len(self.train_nid) // cfg.batch_size)
        self.total_minibatches = self.minibatches_per_epoch * cfg.epochs
        self.feat = self.g.ndata["feat"]
        self.labels = self.g.ndata["label"]
        self.halo_ids, self.halo_degree = self._halo()
        self.lookahead = self._lookahead()
        fraction = cfg.buffer_fraction if buffer_fraction is None else buffer_fraction
        self.capacity = int(round(fraction * self.halo_ids.size))
        self.admit_on_miss = cfg.admit_on_miss if admit_on_miss is None else admit_on_miss
        self.buffer_init = cfg.buffer_init if buffer_init is None else buffer_init
        self.link = _Link()
        self._pulled_lock = threading.Lock()
        self._prefetcher = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rudder-prefetch")
            if cfg.prefetch == "background"
            else None
        )
        self._chunks: collections.deque = collections.deque()  # background: (ids, future of rows), in request order
        self._fetcher = None  # the thread that pulls the next minibatch's rows during compute (--overlap-fetch)
        self._next_pull = None  # (input nodes, misses, future) in flight
        self._pulled_ahead = None  # (input nodes, misses, rows) ready for the next train_step
        self._overlap_wait_s = 0.0
        self.on_epoch_end = None  # called with each epoch's EpochStats as it ends (progress lines, curves)
        self.started = False
        self.start(cfg.seed)

    def __deepcopy__(self, memo):
        """A trainer is this process's handle on a running DistDGL job (RPC connections, process group, threads):
        a copy (e.g. of an env's spec kwargs by ``gymnasium.make``) is the same trainer."""
        return self

    def start(self, seed: int) -> None:
        """(Re)start training from scratch: weights, optimizer, buffer (filled per --buffer-init or the agent's
        settings), counters.

        ``seed`` fixes the initial weights (the same on every trainer), the sampling order and a random fill.
        """
        cfg = self.cfg
        self.seed = seed
        torch.manual_seed(seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        dgl.seed(seed)
        model = build_model(
            cfg.model, self.meta["feat_dim"], cfg.hidden, self.meta["num_classes"], len(cfg.fanouts), impl=self.impl
        )
        if self.on_gpu:  # gloo all-reduces CUDA tensors too, and lets trainers share a GPU (NCCL refuses)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.model = torch.nn.parallel.DistributedDataParallel(model.to(self.device), device_ids=[self.device])
        else:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        torch.manual_seed(seed * 1000 + self.trainer_rank + 1)  # shuffling differs per trainer, fixed per seed
        np.random.seed(seed * 1000 + self.trainer_rank + 1)
        self._finish_next_pull()
        self._drop_prefetch()
        self._pulled_ahead, self._overlap_wait_s = None, 0.0
        self._chunk_h2d_s, self._chunk_h2d_rows = 0.0, 0  # prefetch chunks copied into DeviceRows, not counted yet
        self.stats = RankStats()
        self.buffer = PrefetchBuffer(
            self.capacity,
            self.g.num_nodes(),
            alpha=cfg.alpha,
            period=cfg.period,
            feat_dim=0 if cfg.buffer_on_device else self.meta["feat_dim"],  # there: ids only, rows on the device
            admit_on_miss=self.admit_on_miss,
            prefetch=cfg.prefetch,
        )
        if cfg.buffer_on_device:
            self.device_rows = DeviceRows(self.capacity, self.meta["feat_dim"], self.feat.dtype, self.device)
        self.initial_ids = self._initial_fill(self.buffer_init)
        self.minibatch_index = 0
        self._ahead: collections.deque[_Sampled] = collections.deque()  # sampled but not trained yet
        self._held_bytes = self._held_blocks_bytes = 0  # running sums of nbytes / blocks_nbytes over _ahead
        ahead = DEFAULTS.sample_ahead if cfg.sample_ahead is None else cfg.sample_ahead  # rank.py resolves it
        self._sample_ahead = SampleAhead.parse(ahead, "--sample-ahead")
        self.ahead_stats = dict(
            known_sum=0,
            known_max=0,
            steps=0,
            known_peak_mb=0.0,
            held_peak_mb=0.0,
            blocks_peak_mb=0.0,
            sample_s_moved=0.0,
        )
        self._orders: dict[int, np.ndarray] = {}  # epoch -> its shuffled seed order, once drawn
        self._begin_epoch(0)
        self.started = True

    # ------------------------------------------------------------------ setup helpers
    def _halo(self) -> tuple[np.ndarray, np.ndarray]:
        """Global ids of this partition's halo nodes and their degree inside the partition (edges to our nodes)."""
        lp = self.g.local_partition
        inner = lp.ndata["inner_node"].bool().numpy()
        indptr, indices, _ = lp.adj_tensors("csc")
        degree = np.bincount(indices.numpy(), minlength=lp.num_nodes())  # out-degree: in-edges of inner nodes
        halo_local = np.flatnonzero(~inner)
        return lp.ndata[dgl.NID].numpy()[halo_local].astype(np.int64), degree[halo_local]

    def _lookahead(self):
        """The partition's structure around this trainer's seeds, for sampler lookahead."""

        t0 = time.perf_counter()
        lp = self.g.local_partition
        indptr, indices, _ = lp.adj_tensors("csc")
        la = SamplerLookahead.from_partition(
            self.g.num_nodes(),
            lp.ndata[dgl.NID].numpy(),
            lp.ndata["inner_node"].bool().numpy(),
            indptr.numpy(),
            indices.numpy(),
            self.train_nid.numpy(),
            self.cfg.fanouts,
        )
        if self.cfg.lookahead_halo_edges:
            # the halo nodes' own in-edges live on other partitions: one structure-only pull (no features)
            frontier = dgl.distributed.sample_neighbors(self.g, torch.from_numpy(la.halo_ids), -1)
            src, dst = frontier.edges()
            la = la.with_halo_in_edges(
                src.numpy(), dst.numpy(), lambda ids: self.pb.nid2partid(torch.from_numpy(ids)).numpy()
            )
        self.lookahead_setup_s = time.perf_counter() - t0
        return la

    def _initial_fill(self, how: str) -> np.ndarray:
        vip = None
        if how == "vip":  # SALIENT++'s VIP from the partition structure around this trainer's seeds: the same
            # arrays a trace stores, so replay computes the same fill
            vip = vertex_inclusion_probability(self.lookahead, self.cfg.batch_size)
        ids = initial_ids(
            how,
            self.halo_ids,
            self.halo_degree,
            self.buffer.capacity,
            seed=self.seed * 1000 + self.trainer_rank,
            vip=vip,
        )
        t0 = time.perf_counter()
        if self.device_rows is None:
            filled = self.buffer.fill(ids, fetch=self.pull)
        else:  # the buffer keeps ids: pull the rows it took, into the device's mirror
            filled = self.buffer.fill(ids)
            rows = self._to_device(self._dist_pull(torch.from_numpy(filled)))
            self.device_rows.sync(self.buffer, filled, rows)
            torch.cuda.synchronize(self.device)
        self.initial_fill_s = time.perf_counter() - t0
        self.stats.fetch_s += self.initial_fill_s
        return filled

    def pull(self, ids: np.ndarray) -> np.ndarray:
        return self._dist_pull(torch.from_numpy(np.asarray(ids, dtype=np.int64))).numpy()

    def _dist_pull(self, ids: torch.Tensor, background: bool = False) -> torch.Tensor:
        """Feature rows of ``ids`` pulled through the DistTensor over the link, counting the rows it returned by
        owner (this partition or another): the traffic actually pulled, to check against what the buffer counts.
        Pulls of labels and ``--verify-rows``' checks are not counted."""
        rows = self.link.pull(self.feat, ids, background)
        if rows.shape[0] != ids.shape[0]:
            raise RuntimeError(f"a DistTensor pull of {ids.shape[0]} ids returned {rows.shape[0]} rows")
        remote = int((self.pb.nid2partid(ids) != self.partid).sum()) if ids.numel() else 0
        with self._pulled_lock:  # background prefetch chunks are counted from their own thread
            self.stats.remote_rows_pulled += remote
            self.stats.local_rows_pulled += int(rows.shape[0]) - remote
        return rows

    # ------------------------------------------------------------------ background prefetch
    def _deliver_prefetch(self) -> None:
        """Install the chunks that have arrived (in request order: a chunk still on its way holds back the ones
        behind it), then request what decisions queued since: before the minibatch's lookup."""
        while self._chunks and self._chunks[0][1].done():
            ids, future = self._chunks.popleft()
            self.buffer.arrive(ids, future.result().numpy())
            if self.device_rows is not None:  # the rows it installed, into the device's mirror (timed as h2d)
                t0 = time.perf_counter()
                self.device_rows.sync(self.buffer, ids, self._to_device(future.result()))
                torch.cuda.synchronize(self.device)
                self._chunk_h2d_s += time.perf_counter() - t0
                self._chunk_h2d_rows += int(ids.size)
        while True:
            ids = self.buffer.take()
            if ids.size == 0:
                break
            self._chunks.append((ids, self._prefetcher.submit(self._dist_pull, torch.from_numpy(ids), True)))

    def _drop_prefetch(self) -> int:
        """Wait for the chunks on their way and forget them (a restart, or the end); returns the rows of those
        whose pull had already run (pulled, never delivered)."""
        pulled = 0
        while self._chunks:
            ids, future = self._chunks.popleft()
            if not future.cancel() and future.exception() is None:
                pulled += int(ids.size)
        return pulled

    # ------------------------------------------------------------------ training
    def _remote_mask(self, input_nodes: torch.Tensor) -> np.ndarray:
        return (self.pb.nid2partid(input_nodes) != self.partid).numpy()

    def train_step(self, epoch: int, batch, remote: np.ndarray | None = None) -> MinibatchRecord:
        """One minibatch: buffered feature fetch, forward, backward, DDP step. ``batch`` comes from the loader;
        ``remote`` (which input nodes other partitions own) when already known."""
        t_fetch = time.perf_counter()
        input_nodes, seeds, blocks = batch
        remote = self._remote_mask(input_nodes) if remote is None else remote
        ids = input_nodes.numpy()
        local_ids, remote_ids = ids[~remote], ids[remote]
        self._mark("fetching")
        if self._prefetcher is not None:
            self._deliver_prefetch()
        self.link.stall_s = 0.0
        to_pull = self.buffer.begin(remote_ids)
        pulled = self._pull_rows(input_nodes, local_ids, to_pull)
        if self.device_rows is None:
            remote_rows, counts = self.buffer.finish(pulled[local_ids.size :].numpy())
            x = torch.empty((ids.size, pulled.shape[1]), dtype=pulled.dtype, pin_memory=self.on_gpu)
            x[torch.from_numpy(~remote)] = pulled[: local_ids.size]
            x[torch.from_numpy(remote)] = torch.from_numpy(remote_rows)
        else:  # the hits' slots, before finish() may install rows over them; their rows are read on the device
            hit_slots = self.buffer.slot_of[remote_ids].astype(np.int64)
            _, counts = self.buffer.finish(None)
        y = self.link.pull(self.labels, seeds).long()
        h2d_s, h2d_rows = None, 0
        if self.on_gpu:
            t_h2d = time.perf_counter()
            if self.device_rows is None:
                x, h2d_rows = self._to_device(x), int(x.shape[0])
            else:
                x = self.device_rows.inputs(self.buffer, remote, hit_slots, to_pull, self._to_device(pulled))
                h2d_rows = int(pulled.shape[0])
            y = self._to_device(y)
            torch.cuda.synchronize(self.device)
            h2d_s = time.perf_counter() - t_h2d + self._chunk_h2d_s
            h2d_rows += self._chunk_h2d_rows
            self._chunk_h2d_s, self._chunk_h2d_rows = 0.0, 0
        t_compute = time.perf_counter()
        if self.cfg.verify_rows:
            self._verify(input_nodes, x.cpu())
        self._start_next_pull()
        self._mark("compute and all-reduce")
        self.model.train()
        loss = F.cross_entropy(self.model(self._model_blocks(blocks), x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        waited, self._overlap_wait_s = self._overlap_wait_s, self._finish_next_pull()  # the next one's fetch time
        record = MinibatchRecord(
            epoch=epoch,
            index=self.minibatch_index,
            remote_ids=remote_ids,
            local_rows=int(local_ids.size),
            sample_s=0.0,
            fetch_s=t_compute - t_fetch + waited,
            fetch_rows=int(local_ids.size + to_pull.size),
            compute_s=t_end - t_compute,
            counts=counts,
            loss=float(loss.detach()),
            seeds=seeds.numpy(),
            stall_s=self.link.stall_s,
            h2d_s=h2d_s,
            h2d_rows=h2d_rows,
        )
        self.minibatch_index += 1
        return record

    # ------------------------------------------------------------------ the device
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the trainer's device: from pinned memory (pinned here when it is not), without waiting."""
        if not self.on_gpu:
            return t
        return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

    def _model_blocks(self, blocks) -> list:
        """What the model takes: each block's edge index on the device (the torch layers), or DGL's blocks (on a
        GPU only with a DGL built with CUDA)."""
        if self.impl == "torch":
            return block_indices(blocks, self.device)
        return [b.to(self.device) for b in blocks] if self.on_gpu else blocks

    def device_meta(self) -> dict:
        """Where this trainer trains, for the trace's rank meta and the summary: device, GPU name, model
        implementation, whether the buffer's rows are on the device."""
        meta = dict(device=str(self.device), model_impl=self.impl)
        if self.on_gpu:
            meta.update(device_name=torch.cuda.get_device_name(self.device), buffer_on_device=self.cfg.buffer_on_device)
        return meta

    def device_stats(self) -> dict:
        """Host-to-device copy totals and the GPU's peak memory (only on a GPU; {} on a CPU)."""
        if not self.on_gpu:
            return {}
        return dict(
            h2d_s=round(self.stats.h2d_s, 4),
            h2d_rows=self.stats.h2d_rows,
            device_memory_peak_mb=round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
            device_buffer_bytes=self.device_rows.nbytes if self.device_rows is not None else 0,
        )

    # ------------------------------------------------------------------ fetch overlapped with compute
    def _start_next_pull(self) -> None:
        """Start pulling the next sampled minibatch's local rows and buffer misses in a background thread, to run
        during this minibatch's forward and backward (DGL's RPC waits without the interpreter lock). Nothing else
        uses DGL's RPC until :meth:`_finish_next_pull`, and until then the buffer's residency cannot change, so
        the misses are the ones the next minibatch will have; a prefetch set decided meanwhile is pulled with it
        separately."""
        if not self.cfg.overlap_fetch or not self._ahead:
            return
        nxt = self._ahead[0]
        ids = nxt.batch[0].numpy()
        misses = nxt.remote_ids[self.buffer.slot_of[nxt.remote_ids] == -1]
        if self._fetcher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rudder-fetch")
        want = torch.from_numpy(np.concatenate([ids[~nxt.remote], misses]))
        self._next_pull = (nxt.batch[0], misses, self._fetcher.submit(self._dist_pull, want))

    def _finish_next_pull(self) -> float:
        """Wait for the pull started by :meth:`_start_next_pull` (before any other RPC); returns the seconds
        waited."""
        if self._next_pull is None:
            return 0.0
        t0 = time.perf_counter()
        nodes, misses, future = self._next_pull
        self._next_pull = None
        self._pulled_ahead = (nodes, misses, future.result())
        return time.perf_counter() - t0

    def _pull_rows(self, input_nodes: torch.Tensor, local_ids: np.ndarray, to_pull: np.ndarray) -> torch.Tensor:
        """Rows of ``local_ids`` then ``to_pull`` (misses, then a prefetch set): from the pull done during the
        previous minibatch when it covers them, else pulled now."""
        ahead, self._pulled_ahead = self._pulled_ahead, None
        if ahead is not None and ahead[0] is input_nodes:
            _, misses, rows = ahead
            n_miss = self.buffer.open_misses
            pos = positions(misses, to_pull[:n_miss])
            if (pos >= 0).all():  # this minibatch's misses were pulled ahead (rows delivered since are fewer)
                self.stats.overlapped += 1
                self.stats.remote_rows_discarded += int(misses.size - n_miss)
                n_local = rows.shape[0] - misses.size
                parts = [rows[:n_local], rows[n_local:][torch.from_numpy(pos)]]
                extra = to_pull[n_miss:]
                if extra.size:
                    parts.append(self._dist_pull(torch.from_numpy(extra)))
                return torch.cat(parts)
            self.stats.overlap_mismatches += 1
            self.stats.remote_rows_discarded += int(misses.size)
        return self._dist_pull(torch.from_numpy(np.concatenate([local_ids, to_pull])))

    def _verify(self, input_nodes: torch.Tensor, x: torch.Tensor) -> None:
        """Count rows that differ from a direct DistTensor pull, and rows whose column 0 is not the original id."""
        if self._orig_nids is None:
            self._orig_nids = np.load(os.path.join(os.path.dirname(self.part_config), ORIG_NIDS_FILE))
        direct = self.link.pull(self.feat, input_nodes)
        v = self.verify
        v["rows_checked"] += int(x.shape[0])
        v["rows_differing_from_disttensor"] += int((x != direct).any(1).sum())
        orig = torch.from_numpy(self._orig_nids[input_nodes.numpy()]).to(x.dtype)
        v["rows_col0_not_orig_id"] += int((x[:, 0] != orig).sum())

    def _begin_epoch(self, epoch: int) -> None:
        """Shuffle ``epoch``'s seeds now (DGL's loader does it in ``iter``), so their order is known ahead. Called
        when the epoch's first minibatch is sampled: with sampling ahead, before the previous epoch has ended."""
        self._epoch_iter = iter(self.loader)
        order = self.train_nid[self.loader.data_idx]
        self._orders[epoch] = order.numpy() if hasattr(order, "numpy") else np.asarray(order)
        for old in [e for e in self._orders if e < epoch - 1]:  # keep the epoch being trained and the next
            del self._orders[old]

    def upcoming_seeds(self, horizon: int) -> list[np.ndarray]:
        """Seed ids of the next ``horizon`` minibatches, as far as the epochs shuffled so far go."""
        b, per_epoch = self.cfg.batch_size, self.minibatches_per_epoch
        out = []
        for j in range(self.minibatch_index, min(self.minibatch_index + horizon, self.total_minibatches)):
            epoch, i = divmod(j, per_epoch)
            if epoch not in self._orders:
                break
            out.append(self._orders[epoch][i * b : (i + 1) * b])
        return out

    def sampled_ahead(self) -> list[np.ndarray]:
        """Remote input ids of the minibatches already sampled beyond the next one (their exact future needs), as
        far as ``--sample-ahead`` reaches: with a budget, those whose sampled bytes fit in it (the one sampled to
        find out that it does not fit is held, not counted: :mod:`rudder.env.sample_ahead`)."""
        return [s.remote_ids for s in self._known_ahead()[0]]

    def _beyond_bytes(self) -> int:
        """Sampled bytes held beyond the next minibatch."""
        return self._held_bytes - self._ahead[0].nbytes if self._ahead else 0

    def _known_ahead(self) -> tuple[list[_Sampled], int]:
        """The held minibatches beyond the next one that count as known, and their sampled bytes."""
        beyond = itertools.islice(self._ahead, 1, None)
        budget = self._sample_ahead.budget_bytes
        if budget is None:
            return list(beyond), self._beyond_bytes()
        known, nbytes = [], 0
        for s in beyond:
            if nbytes + s.nbytes > budget:
                break
            known.append(s)
            nbytes += s.nbytes
        return known, nbytes

    def _ahead_full(self) -> bool:
        """Whether sampling has gone as far ahead as ``--sample-ahead`` asks (the next minibatch always counts)."""
        sa, held = self._sample_ahead, len(self._ahead)
        if held == 0:
            return False
        if sa.budget_bytes is not None:
            return self._beyond_bytes() > sa.budget_bytes
        return held >= sa.count(self.minibatches_per_epoch) + 1

    def _note_ahead(self) -> None:
        """Account what sampling ahead holds now: minibatches known exactly, their sampled bytes, and the bytes
        of every held minibatch's blocks (ids and edges as int64)."""
        a = self.ahead_stats
        known, known_b = self._known_ahead()
        a["known_sum"] += len(known)
        a["known_max"] = max(a["known_max"], len(known))
        a["steps"] += 1
        a["known_peak_mb"] = max(a["known_peak_mb"], known_b / 2**20)
        a["held_peak_mb"] = max(a["held_peak_mb"], self._beyond_bytes() / 2**20)
        a["blocks_peak_mb"] = max(a["blocks_peak_mb"], self._held_blocks_bytes / 2**20)

    def sample_ahead_summary(self) -> dict:
        """How far ahead the run knew its minibatches exactly and what it cost (the summary's ``sample_ahead``)."""
        a = self.ahead_stats
        return dict(
            sample_ahead=str(self._sample_ahead),
            known_mean=round(a["known_sum"] / max(a["steps"], 1), 3),
            known_max=a["known_max"],
            known_peak_mb=round(a["known_peak_mb"], 3),
            held_peak_mb=round(a["held_peak_mb"], 3),
            blocks_peak_mb=round(a["blocks_peak_mb"], 3),
            sample_s_moved=round(a["sample_s_moved"], 4),
        )

    def minibatches(self):
        """Train ``cfg.epochs`` epochs, yielding a :class:`MinibatchRecord` after each minibatch.

        Sampling runs ``cfg.sample_ahead`` minibatches ahead of training, across epoch boundaries (the same batches
        in the same order; the next epoch's seeds are shuffled when its first minibatch is sampled), so the remote
        rows they will need are known before their turn (:meth:`sampled_ahead`).
        """
        sampling = dict(epoch=0, left=self.minibatches_per_epoch)  # the epoch being sampled, its batches to go

        def top_up():
            while not self._ahead_full():
                if sampling["left"] == 0:
                    if sampling["epoch"] + 1 >= self.cfg.epochs:
                        return
                    sampling["epoch"] += 1
                    sampling["left"] = self.minibatches_per_epoch
                    self._begin_epoch(sampling["epoch"])
                self._mark("sampling")
                t0 = time.perf_counter()
                batch = self.link.call(next, self._epoch_iter)  # sampling uses the servers' RPC too
                sample_s = time.perf_counter() - t0
                if self._ahead:  # sampled before the minibatch ahead of it trained: off the critical path
                    self.ahead_stats["sample_s_moved"] += sample_s
                remote = self._remote_mask(batch[0])
                held = _Sampled(
                    batch,
                    sample_s,
                    remote,
                    batch[0].numpy()[remote],
                    sampling["epoch"],
                    int(sampled_bytes(batch[0].shape[0])),
                    _blocks_bytes(batch),
                )
                self._ahead.append(held)
                self._held_bytes += held.nbytes
                self._held_blocks_bytes += held.blocks_nbytes
                sampling["left"] -= 1

        t_epoch, training = time.perf_counter(), 0
        self.stats.train_start_unix = time.time()
        self._epoch_mark = self._epoch_totals()
        top_up()
        while self._ahead:
            if self.stop is not None and self.stop.agreed():
                self._stop_training(training, time.perf_counter() - t_epoch)
            held = self._ahead.popleft()
            self._held_bytes -= held.nbytes
            self._held_blocks_bytes -= held.blocks_nbytes
            batch, sample_s, remote, epoch = held.batch, held.sample_s, held.remote, held.epoch
            if epoch != training:  # an epoch's time runs from its first minibatch to the next epoch's first
                self._close_epoch(training, time.perf_counter() - t_epoch)
                t_epoch, training = time.perf_counter(), epoch
            record = self.train_step(epoch, batch, remote)
            record.sample_s = sample_s
            s = self.stats
            s.sample_s += sample_s
            s.fetch_s += record.fetch_s
            s.compute_s += record.compute_s
            s.stall_s += record.stall_s
            if record.h2d_s is not None:
                s.h2d_s += record.h2d_s
                s.h2d_rows += record.h2d_rows
            s.minibatches += 1
            s.loss_sum += record.loss
            top_up()  # sample the next ones before handing this record over
            self._note_ahead()
            self._mark("deciding")  # the env and the agent have the turn until the next minibatch
            yield record
        self._close_epoch(training, time.perf_counter() - t_epoch)
        self.stats.train_end_unix = time.time()
        self.stats.remote_rows_discarded += self._drop_prefetch()  # training is over: they would never be used

    def _stop_training(self, epoch: int, seconds: float):
        """End training before the next minibatch (every trainer at the same one): close the epoch begun, if any
        minibatch of it ran, drop what was sampled or prefetched ahead, and raise
        :class:`~rudder.runtime.stop.StopRequested`."""

        if self.stats.minibatches > self._epoch_mark["minibatches"]:
            self._close_epoch(epoch, seconds)
        self.stats.train_end_unix = time.time()
        self._finish_next_pull()
        self.stats.remote_rows_discarded += self._drop_prefetch()
        self._ahead.clear()
        self._held_bytes = self._held_blocks_bytes = 0
        self.stopped = self.stop.info(self.stats.minibatches, self.total_minibatches)
        raise StopRequested(self.stopped)

    def _epoch_totals(self) -> dict:
        c, s = self.buffer.counters, self.stats
        return dict(
            minibatches=s.minibatches,
            loss_sum=s.loss_sum,
            remote_sampled=c.remote_sampled,
            hits=c.hits,
            remote_fetched=c.remote_fetched,
            prefetched=c.prefetched,
            sample_s=s.sample_s,
            fetch_s=s.fetch_s,
            compute_s=s.compute_s,
        )

    def _close_epoch(self, epoch: int, seconds: float) -> None:
        """Record the epoch that just ended (its time and :class:`EpochStats`), and hand it to ``on_epoch_end``."""
        self.stats.epoch_time_s.append(seconds)
        now = self._epoch_totals()
        stats = EpochStats(epoch, seconds=seconds, **{k: now[k] - self._epoch_mark[k] for k in now})
        self._epoch_mark = now
        self.stats.epochs.append(stats)
        if self.on_epoch_end is not None:
            self.on_epoch_end(stats)

    # ------------------------------------------------------------------ evaluation and results
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy on the validation and test nodes, summed over all trainers (sampled, like training)."""
        self._drop_prefetch()  # no chunk may use the RPC client meanwhile
        model = self.model.module
        model.eval()
        out = {}
        for split in ("val", "test"):
            nids = dgl.distributed.node_split(self.g.ndata[f"{split}_mask"], self.pb, force_even=False)
            loader = dgl.dataloading.DistNodeDataLoader(
                self.g, nids, self.sampler, batch_size=self.cfg.batch_size, shuffle=False, drop_last=False
            )
            correct = total = 0
            self._mark("evaluating")
            for input_nodes, seeds, blocks in loader:
                self._mark("evaluating")
                pred = model(self._model_blocks(blocks), self._to_device(self.feat[input_nodes])).argmax(1).cpu()
                correct += int((pred == self.labels[seeds].long()).sum())
                total += int(seeds.numel())
            counts = torch.tensor([correct, total], dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            out[f"{split}_acc"] = float(counts[0] / max(counts[1], 1.0))
        return out

    def result(self) -> dict:
        """This rank's entry of the summary's ``ranks`` list."""
        c = self.buffer.counters
        s = self.stats
        return dict(
            trainer_rank=self.trainer_rank,
            partition=int(self.partid),
            halo_nodes=int(self.halo_ids.size),
            buffer_capacity=self.buffer.capacity,
            minibatches=s.minibatches,
            remote_sampled=c.remote_sampled,
            hits=c.hits,
            misses=c.misses,
            remote_fetched=c.remote_fetched,
            prefetched=c.prefetched,
            initial_fill=c.initial_fill,
            prefetch_used=c.prefetch_used,
            late=c.late,
            prefetch=self.cfg.prefetch,
            stall_s=round(s.stall_s, 4),
            admitted_on_miss=c.admitted_on_miss,
            evicted=c.evicted,
            hit_rate=c.hits / c.remote_sampled if c.remote_sampled else 0.0,
            epoch_time_s=[round(t, 4) for t in s.epoch_time_s],
            sample_s=round(s.sample_s, 4),
            fetch_s=round(s.fetch_s, 4),
            compute_s=round(s.compute_s, 4),
            overlapped_minibatches=s.overlapped,
            overlap_mismatches=s.overlap_mismatches,
            remote_rows_pulled=s.remote_rows_pulled,
            remote_rows_discarded=s.remote_rows_discarded,
            local_rows_pulled=s.local_rows_pulled,
            train_start_unix=round(s.train_start_unix, 3),
            train_end_unix=round(s.train_end_unix, 3),
            epochs=[e.as_dict() for e in s.epochs],
            lookahead_setup_s=round(self.lookahead_setup_s, 3),
            buffer_bytes=int(self.buffer.rows.nbytes if self.buffer.rows is not None else 0),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            sample_ahead=self.sample_ahead_summary(),
            **self.device_meta(),
            **self.device_stats(),
            pid=os.getpid(),
            **({"verify": dict(self.verify)} if self.cfg.verify_rows else {}),
        )

    def close(self) -> None:
        self._mark("closing")
        self._finish_next_pull()
        self._drop_prefetch()
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
        if self._fetcher is not None:
            self._fetcher.shutdown()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        dgl.distributed.exit_client()
