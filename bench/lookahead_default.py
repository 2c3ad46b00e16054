"""The lookahead's defaults live: its own (16 MB sampled ahead, an empty start) against the trainer's default 4
minibatches ahead with the degree fill, and static beside them, on 2 emulated hosts at 400mbit, in 3 interleaved
rounds. ``python -m rudder.bench.lookahead_default`` writes ``bench/results/lookahead_default.csv`` and prints the
means and standard deviations (BENCHMARKS.md, P1)."""

from __future__ import annotations

import os
import sys

import pandas as pd
from rudder.bench.end_to_end import live_run

from rudder.testbed.cluster import EmulatedCluster

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lookahead_default.csv")
VARIANTS = (
    ("lookahead (own defaults: 16MB ahead, empty start)", "lookahead", ()),
    (
        "lookahead (4 minibatches ahead, degree fill)",
        "lookahead",
        ("--sample-ahead", "4", "--agent-kwargs", "buffer_init=degree"),
    ),
    ("static", "static", ()),
)


def measure(rounds: int = 3, rate: str = "400mbit") -> pd.DataFrame:
    rows = []
    with EmulatedCluster(2, link_rate=rate) as c:
        for rnd in range(rounds):
            for label, agent, extra in VARIANTS:
                print(f"  {label}, round {rnd + 1} of {rounds}", file=sys.stderr, flush=True)
                r = live_run(agent, 0, 2, extra=("--cluster", c.name, *extra), parts=None)
                rows.append(dict(variant=label, round=rnd, link_rate=rate, **r))
    return pd.DataFrame(rows)


def main() -> int:
    df = measure()
    df.to_csv(OUT, index=False)
    cols = ["train_s", "fetch_s", "compute_s", "remote_fetched", "env_overhead_frac", "peak_rss_mb"]
    print(df.groupby("variant", sort=False)[cols].agg(["mean", "std"]).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
