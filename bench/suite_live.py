"""The scenario suite confirmed live: agents run as real jobs under a held-out family's scenario, interleaved and
repeated, their training wall times compared (``python -m rudder.bench.suite_live SCENARIO [--reps 3]``).

Each arm is ``train.py gnn`` with the suite's run options (:data:`rudder.bench.suite.RUN`), ``--scenario`` and its
agent; the scenario plays from each run's first minibatch, so every repetition meets the same timeline. Writes
``bench/results/suite_live.csv`` (arm, rep, training seconds: the slowest trainer's first minibatch to its last).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import pandas as pd
from rudder.bench.suite import POLICY, ROOT, RUN, decisions_trace

OUT = os.path.join(ROOT, "bench", "results", "suite_live.csv")
ARMS = {
    "level-0": ["--agent", "level", "--agent-kwargs", "level=0"],
    "level-0.125": ["--agent", "level", "--agent-kwargs", "level=0.125"],
    "level-1": ["--agent", "level", "--agent-kwargs", "level=1"],
    "mpc": ["--agent", "mpc"],
    "ppo-link-suite": ["--agent", "ppo-link", "--agent-kwargs", f"path={POLICY}"],
}


def measure(scenario: str, reps: int = 3, arms: dict = ARMS) -> pd.DataFrame:
    work = tempfile.mkdtemp(prefix="rudder-suite-live-")
    rows = []
    for rep in range(reps):
        for arm, extra in arms.items():
            summary = os.path.join(work, f"{arm}-{rep}.json")
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "gnn", *RUN, "--scenario", scenario, *extra]
            proc = subprocess.run([*cmd, "--summary", summary], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} rep {rep}: {proc.stderr.strip().splitlines()[-1:]}")
            with open(summary) as f:
                ranks = json.load(f)["ranks"]
            seconds = max(r["train_end_unix"] for r in ranks) - min(r["train_start_unix"] for r in ranks)
            print(f"[suite-live] {os.path.basename(scenario)} rep {rep} {arm}: {seconds:.2f} s", flush=True)
            rows.append(dict(scenario=os.path.basename(scenario), arm=arm, rep=rep, train_s=seconds))
    return pd.DataFrame(rows)


def confirm(trace: str, scenario: str, labels: dict[int, str], constant: float, reps: int = 3) -> pd.DataFrame:
    """A link-level action sequence found in replay on ``trace`` (``labels``: per rank, as ``bound_actions`` writes
    it; e.g. the bound's) applied live under ``scenario`` with ``--decisions-from``, against the ``constant`` level
    held throughout: :func:`measure` with those two arms."""
    out = os.path.join(tempfile.mkdtemp(prefix="rudder-suite-decisions-"), "decisions")
    arms = {
        "sequence": ["--agent", "recorded", "--decisions-from", decisions_trace(trace, labels, out)],
        "constant": ["--agent", "level", "--agent-kwargs", f"level={constant:g}"],
    }
    return measure(scenario, reps, arms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.suite_live", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", nargs="+", help="scenario files (traces/suite/scenarios/*.json)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    df = pd.concat([measure(s, args.reps) for s in args.scenario])
    old = pd.read_csv(OUT) if os.path.isfile(OUT) else None
    if old is not None:
        df = pd.concat([old[~old["scenario"].isin(df["scenario"])], df])
    df.to_csv(OUT, index=False)
    print(df.groupby(["scenario", "arm"])["train_s"].agg(["median", "min", "max"]).round(2).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
