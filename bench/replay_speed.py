"""P4: replay speed — minibatches per second replayed offline relative to the live run that recorded the trace.

The live rate comes from the trace's own measured per-minibatch wall times (sampling + feature fetch + compute of
the recording run); the replay rate is measured here, running the same agent through ``rudder/Replay-v0``.
"""

from __future__ import annotations

import time

from rudder.baselines.policies import Periodic
from rudder.env.replay_env import ReplayEnv
from rudder.traces import Trace

from rudder.evaluation.play import play_episode


def measure(trace_dir: str, repeats: int = 3) -> list[dict]:
    trace = Trace(trace_dir)
    rows = []
    for rank in trace.ranks:
        env = ReplayEnv(trace, rank=rank)
        table = trace.rank(rank).table()
        live_s = float((table["sample_s"] + table["fetch_s"] + table["compute_s"]).sum())
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            play_episode(env, Periodic())
            best = min(best, time.perf_counter() - t0)
        n = len(table)
        rows.append(
            dict(
                trace=trace_dir,
                rank=rank,
                minibatches=n,
                live_mb_per_s=n / live_s,
                replay_mb_per_s=n / best,
                speedup=live_s / best,
                bytes_per_remote_id=trace.rank(rank).bytes_per_remote_id,
            )
        )
    return rows
