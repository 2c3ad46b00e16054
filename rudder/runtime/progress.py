"""Live progress of a training job: the job's shape, one line per epoch, training curves (TensorBoard).

Each trainer counts its epoch in an :class:`EpochStats` (:meth:`rudder.runtime.trainer.DistTrainer.minibatches`
closes one at every epoch boundary). :class:`TrainerProgress` sums them over the trainers with one small
``all_reduce`` per epoch on the trainers' process group (DDP keeps them in step anyway), and trainer 0 says the line
(:func:`rudder.runtime.console.say`) and, with ``--tensorboard DIR``, writes the same figures as TensorBoard
scalars, one step per epoch. The summary JSON carries them too (``epochs``, built from every rank's own list).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from dataclasses import dataclass

from rudder.runtime.console import say

COUNTS = ("minibatches", "remote_sampled", "hits", "remote_fetched", "prefetched")
SECONDS = ("loss_sum", "sample_s", "fetch_s", "compute_s", "seconds")


@dataclass
class EpochStats:
    """One epoch of one trainer, or summed over trainers (``seconds`` then sums the trainers' epoch times).

    Rows are remote feature rows; ``remote_fetched`` = misses pulled on demand + rows prefetched during the epoch
    (the initial fill, before training, is not in any epoch).
    """

    epoch: int  # 0-based
    trainers: int = 1
    minibatches: int = 0
    loss_sum: float = 0.0
    remote_sampled: int = 0
    hits: int = 0
    remote_fetched: int = 0
    prefetched: int = 0
    sample_s: float = 0.0
    fetch_s: float = 0.0
    compute_s: float = 0.0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.minibatches if self.minibatches else float("nan")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.remote_sampled if self.remote_sampled else 0.0

    @property
    def fetch_share(self) -> float:
        """Share of the epoch's time spent fetching feature rows."""
        return self.fetch_s / self.seconds if self.seconds else 0.0

    @property
    def epoch_s(self) -> float:
        """The epoch's wall time (the mean over trainers, which DDP keeps in step)."""
        return self.seconds / self.trainers if self.trainers else 0.0

    def __add__(self, other: EpochStats) -> EpochStats:
        if other.epoch != self.epoch:
            raise ValueError(f"cannot add epoch {other.epoch} to epoch {self.epoch}")
        return EpochStats(
            self.epoch,
            self.trainers + other.trainers,
            **{k: getattr(self, k) + getattr(other, k) for k in COUNTS + SECONDS},
        )

    def to_list(self) -> list[float]:
        return [float(self.trainers)] + [float(getattr(self, k)) for k in COUNTS + SECONDS]

    @classmethod
    def from_list(cls, epoch: int, values) -> EpochStats:
        trainers, *rest = [float(v) for v in values]
        fields = dict(zip(COUNTS + SECONDS, rest))
        return cls(epoch, int(round(trainers)), **{k: int(round(v)) if k in COUNTS else v for k, v in fields.items()})

    def as_dict(self) -> dict:
        """The summary JSON's entry: epoch 1-based, counts, seconds, and the derived loss, hit rate, fetch share."""
        out = dataclasses.asdict(self)
        out.pop("loss_sum")
        out["epoch"] = self.epoch + 1
        for k in ("sample_s", "fetch_s", "compute_s", "seconds"):
            out[k] = round(out[k], 4)
        out.update(
            loss=round(self.loss, 5),
            hit_rate=round(self.hit_rate, 5),
            fetch_share=round(self.fetch_share, 4),
            epoch_s=round(self.epoch_s, 4),
        )
        return out

    def scalars(self) -> dict[str, float]:
        """TensorBoard tags and values (SB3-like ``section/name`` tags)."""
        return {
            "train/loss": self.loss,
            "buffer/hit_rate": self.hit_rate,
            "traffic/remote_rows_fetched": self.remote_fetched,
            "traffic/rows_prefetched": self.prefetched,
            "traffic/remote_rows_sampled": self.remote_sampled,
            "time/epoch_s": self.epoch_s,
            "time/fetch_share": self.fetch_share,
        }


def combine(per_rank: list[list[dict]]) -> list[dict]:
    """Every rank's ``epochs`` list (as :meth:`EpochStats.as_dict`) summed per epoch, as the summary's ``epochs``."""
    by_epoch: dict[int, EpochStats] = {}
    for epochs in per_rank:
        for e in epochs:
            stats = EpochStats(
                e["epoch"] - 1,
                e["trainers"],
                loss_sum=e["loss"] * e["minibatches"],
                **{k: e[k] for k in COUNTS + SECONDS if k != "loss_sum"},
            )
            by_epoch[stats.epoch] = by_epoch[stats.epoch] + stats if stats.epoch in by_epoch else stats
    return [by_epoch[k].as_dict() for k in sorted(by_epoch)]


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def epoch_line(stats: EpochStats, epochs: int, eta_s: float | None) -> str:
    """One epoch's line, e.g.

    ``rudder: epoch 2/5  loss 0.912  hit 41.5%  fetched 3,633 rows (299 prefetched)  fetch 17% of 0.12 s  ETA 0:01``
    """
    eta = f"ETA {_clock(eta_s)}" if eta_s is not None else "evaluating"
    return (
        f"rudder: epoch {stats.epoch + 1}/{epochs}  loss {stats.loss:.3f}  hit {stats.hit_rate:.1%}  "
        f"fetched {stats.remote_fetched:,} rows ({stats.prefetched:,} prefetched)  "
        f"fetch {stats.fetch_share:.0%} of {stats.epoch_s:.2f} s  {eta}"
    )


def shape_line(cfg, meta: dict, hosts: int) -> str:
    """The job as it starts: graph, partitions, ranks, model and agent. The buffers follow once the trainers know
    their halo and their agent's settings (:meth:`TrainerProgress.ready`)."""
    where = "this host" if hosts == 1 else f"{hosts} hosts"
    return (
        f"rudder: job: {cfg.graph} ({meta['num_nodes']:,} nodes, {meta['num_edges']:,} edges, "
        f"{meta['num_classes']} classes) in {cfg.parts} {cfg.partition} partitions, 1 server + "
        f"{_n(cfg.trainers_per_part, 'trainer')} each on {where}; {cfg.model}, fanout {cfg.fanout}, batch "
        f"{cfg.batch_size}, {_n(cfg.epochs, 'epoch')}; agent {cfg.agent}"
    )


def tensorboard_run_dir(root: str, name: str) -> str:
    """``root/name_N`` with the next free N, as SB3 names its runs under ``tensorboard_log``."""
    taken = [p.rsplit("_", 1)[-1] for p in glob.glob(os.path.join(root, f"{name}_*"))]
    n = max((int(t) for t in taken if t.isdigit()), default=0) + 1
    return os.path.join(root, f"{name}_{n}")


class TrainerProgress:
    """Per-trainer progress: sums over trainers, trainer 0 says it and writes TensorBoard scalars.

    Every trainer must call :meth:`ready` and :meth:`epoch_end` at the same points (they are collectives).
    """

    def __init__(self, cfg, trainer_rank: int):
        self.cfg = cfg
        self.trainer_rank = trainer_rank
        self.lead = trainer_rank == 0
        self.epoch_s: list[float] = []
        self.writer = None
        self.t0 = time.perf_counter()
        if self.lead and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = tensorboard_run_dir(
                cfg.tensorboard, f"{os.path.basename(cfg.graph.rstrip('/'))}-{cfg.agent}"
            )
            self.writer = SummaryWriter(self.run_dir)

    @staticmethod
    def _sum(values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    def ready(self, trainer, startup_s: float) -> None:
        """All trainers have started: say the buffer they hold and the minibatches ahead."""
        halo, capacity = self._sum([trainer.halo_ids.size, trainer.buffer.capacity])
        if self.lead:
            say(
                f"rudder: {_n(self.cfg.num_trainers, 'trainer')} ready in {startup_s:.1f} s: buffers of "
                f"{int(capacity):,} rows in all ({capacity / halo if halo else 0:.0%} of {int(halo):,} halo nodes), "
                f"{_n(trainer.minibatches_per_epoch, 'minibatch', 'minibatches')} per epoch per trainer"
            )
        if self.writer is not None:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in self.cfg.as_dict().items()))

    def epoch_end(self, stats: EpochStats) -> None:
        """Sum ``stats`` over the trainers; trainer 0 says the epoch's line and writes its scalars."""
        total = EpochStats.from_list(stats.epoch, self._sum(stats.to_list()))
        if not self.lead:
            return
        self.epoch_s.append(total.epoch_s)
        left = self.cfg.epochs - (stats.epoch + 1)
        eta = sum(self.epoch_s) / len(self.epoch_s) * left if left > 0 else None
        say(epoch_line(total, self.cfg.epochs, eta))
        if self.writer is not None:
            for tag, value in total.scalars().items():
                self.writer.add_scalar(tag, value, stats.epoch + 1)
            self.writer.flush()

    def finish(self, accuracy: dict[str, float]) -> None:
        """The final accuracies as scalars at the last epoch; closes the writer."""
        if self.writer is not None:
            for split, value in accuracy.items():
                self.writer.add_scalar(f"eval/{split}", value, self.cfg.epochs)
            self.writer.close()
            self.writer = None
