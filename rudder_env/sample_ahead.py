"""How far a trainer samples ahead of training (``--sample-ahead``): a count of minibatches, a memory budget, or an
epoch, and which future minibatches that makes known exactly.

A minibatch sampled ahead of its turn is held (DGL's blocks) until it trains; its remote input ids are then known
exactly, which the lookahead ranking uses instead of a guess (RapidGNN / Ginex reach Belady's MIN this way). The
setting trades memory for how far the future is known:

- ``4`` (a count, the default): the next minibatch plus 4 more are sampled;
- ``64MB`` (a budget: ``KB``, ``MB``, ``GB``, powers of 1024): as many minibatches beyond the next one as their
  *sampled bytes* fit in the budget; the trainer samples one more to find out that it does not fit, and holds it
  until the budget frees (it is not counted as known, so live and replay know the same minibatches);
- ``epoch``: one epoch's worth of minibatches beyond the next one (across the epoch boundary, as always).

*Sampled bytes* of a minibatch: 8 bytes (an int64 id) per input row, local and remote: what the lookahead reads of
a sampled minibatch, and what live and replay can both count (a trace records every minibatch's input rows). DGL's
blocks also hold the edges of each layer, so the resident memory of the sampled blocks is larger: a live run
measures and reports that as well (``sample_ahead.blocks_peak_mb`` in the summary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

BYTES_PER_INPUT_ROW = 8  # one int64 id per input row of a sampled minibatch
_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SampleAhead:
    """One ``--sample-ahead`` setting. Exactly one of ``minibatches``, ``budget_bytes``, ``epoch`` applies."""

    minibatches: int | None = None  # a count of minibatches beyond the next one
    budget_bytes: int | None = None  # a budget of sampled bytes beyond the next one
    epoch: bool = False  # one epoch of minibatches beyond the next one

    @classmethod
    def parse(cls, value, option: str = "--sample-ahead") -> SampleAhead:
        """``4``, ``"4"``, ``"64MB"``, ``"1.5GB"``, ``"epoch"`` (or a :class:`SampleAhead`). Anything else raises a
        ``ValueError`` of one line naming ``option``, what it expects and what it got."""
        if isinstance(value, SampleAhead):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(
                    f"{option}: expected a count of minibatches >= 0, a budget such as 64MB or 'epoch', got {value}"
                )
            return cls(minibatches=int(value))
        text = str(value).strip()
        if text.lower() == "epoch":
            return cls(epoch=True)
        if text.isdigit():
            return cls(minibatches=int(text))
        m = _PATTERN.match(text)
        if m is None or m.group(2) is None:
            raise ValueError(
                f"{option}: expected a count of minibatches (e.g. 4), a budget of sampled blocks "
                f"(e.g. 64MB; units B, KB, MB, GB) or 'epoch', got {value!r}"
            )
        return cls(budget_bytes=int(float(m.group(1)) * _UNITS[m.group(2).upper()]))

    def __str__(self) -> str:
        if self.epoch:
            return "epoch"
        if self.budget_bytes is not None:
            for unit in ("GB", "MB", "KB"):
                if self.budget_bytes % _UNITS[unit] == 0:
                    return f"{self.budget_bytes // _UNITS[unit]}{unit}"
            return f"{self.budget_bytes}B"
        return str(self.minibatches)

    def count(self, per_epoch: int) -> int | None:
        """Minibatches beyond the next one for a count or an epoch; None for a budget."""
        if self.epoch:
            return int(per_epoch)
        return self.minibatches

    def known_end(self, done: int, cum_bytes: np.ndarray, per_epoch: int) -> int:
        """After ``done`` minibatches trained, the end (exclusive) of the minibatches known exactly beyond the next
        one (``done``): ``done + 1 .. end - 1``. ``cum_bytes[j]``: sampled bytes of minibatches ``0 .. j-1``
        (length ``n + 1``)."""
        n = cum_bytes.size - 1
        c = self.count(per_epoch)
        if c is not None:
            return min(done + 1 + c, n)
        start = min(done + 1, n)
        return int(np.searchsorted(cum_bytes, cum_bytes[start] + self.budget_bytes, side="right")) - 1

    def last_sampled(self, done: int, cum_bytes: np.ndarray, per_epoch: int) -> int:
        """The index of the furthest minibatch sampled after ``done`` trained (known or not): what decides how far
        the seed order is shuffled (an epoch's seeds are shuffled when its first minibatch is sampled). A budget
        samples one past the known ones to learn that it does not fit."""
        n = cum_bytes.size - 1
        end = self.known_end(done, cum_bytes, per_epoch)
        return min(end - 1 if self.count(per_epoch) is not None else end, n - 1)


def sampled_bytes(input_rows) -> np.ndarray:
    """Sampled bytes of minibatches with ``input_rows`` input rows each (local + remote): 8 bytes a row."""
    return np.asarray(input_rows, dtype=np.int64) * BYTES_PER_INPUT_ROW
