"""Evaluate prefetching agents against each other and against the oracles, on recorded traces.

    python evaluate.py                                   # the shipped sample traces, every agent and oracle
    python evaluate.py --traces DIR [DIR ...] --agents none,static,periodic --out results/

Prints a table per trace and overall (remote rows fetched relative to no prefetch, hit rate, distance to Belady
MIN, modelled time relative to no prefetch, decision latency) and writes ``results.csv`` (one row per
agent x trace x rank) into ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "traces", "samples")
DEFAULT_AGENTS = "none,static,periodic"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=sorted(glob.glob(os.path.join(SAMPLES, "*"))),
                   help="trace folders (default: the shipped samples)")
    p.add_argument("--agents", default=DEFAULT_AGENTS, help="comma-separated agents")
    p.add_argument("--oracles", default="belady,hindsight", help="comma-separated oracles ('' for none)")
    p.add_argument("--buffer-fraction", type=float, default=None,
                   help="buffer size as a fraction of each rank's halo (default: the recorded run's)")
    p.add_argument("--candidates", type=int, default=None, help="K candidates per decision (default: recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed for every episode")
    p.add_argument("--out", default="results", help="output folder for results.csv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import pandas as pd

    from agents.base import make_agent
    from rudder_env.evaluation import ORACLES, evaluate_trace
    from rudder_env.report import format_report
    from traces import TraceError

    names = [a for a in args.agents.split(",") if a]
    oracles = [o for o in args.oracles.split(",") if o]
    for o in oracles:
        if o not in ORACLES:
            print(f"evaluate.py: error: unknown oracle {o!r}: expected {', '.join(ORACLES)}", file=sys.stderr)
            return 2
    try:
        factories = {n: (lambda n=n: make_agent(n)) for n in names}
        for n in names:
            make_agent(n)
        if not args.traces:
            raise ValueError("no traces given and no shipped samples found")
        rows = []
        for i, trace in enumerate(args.traces, 1):
            print(f"[{i}/{len(args.traces)}] {trace}", file=sys.stderr, flush=True)
            rows += evaluate_trace(trace, factories, buffer_fraction=args.buffer_fraction, oracles=oracles,
                                   candidates=args.candidates, seed=args.seed,
                                   progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    except (TraceError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    df = pd.DataFrame(rows)
    os.makedirs(args.out, exist_ok=True)
    csv = os.path.join(args.out, "results.csv")
    df.drop(columns=["window_hit_rate"]).to_csv(csv, index=False)
    print(format_report(df))
    print(f"\nwrote {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
