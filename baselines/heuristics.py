"""Buffer-level prefetch policies that need no learning: no prefetch, static buffer, periodic (MassiveGNN).

A policy is called every ``period`` minibatches with the trainer's :class:`~rudder_env.buffer.PrefetchBuffer` and
returns the prefetch set (global node ids, best first); ``None`` as a policy means the buffer is never changed.
"""

from __future__ import annotations

import numpy as np

from rudder_env.buffer import PrefetchBuffer


def periodic(buffer: PrefetchBuffer) -> np.ndarray:
    """MassiveGNN: replace every slot below the eviction threshold (or empty) by the most-missed remote nodes."""
    n_evictable = int(np.count_nonzero(buffer.evictable()))
    ids, _ = buffer.candidates(n_evictable)
    return ids


POLICIES = {
    "none": None,  # no buffer at all (capacity 0): every remote row is pulled on demand
    "static": None,  # filled once (--buffer-init), never changed
    "periodic": periodic,
}
