"""Reliability: the fault-injection tests run with their figures recorded, as the table docs/reliability.md shows.

Each fault test (``tests/test_faults.py``, and the killed trainer/server of ``tests/test_dist.py``) injects its
fault for real, asserts what the user sees, how soon and that nothing is left, and only then writes its row
(``record_fault`` in ``tests/conftest.py``) to the file named by ``RUDDER_FAULT_REPORT``. This module runs those
tests in a subprocess and tabulates the rows: a figure here is one a passing test measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = [
    "tests/test_faults.py",
    "tests/test_dist.py::test_a_dead_rank_ends_the_job_and_leaves_nothing",
    # issue 30: exits, partitionings, disks, clusters, mistakes found before launch
    "tests/test_exit.py",
    "tests/test_partitioning.py",
    "tests/test_disks.py",
    "tests/test_cluster_use.py",
    "tests/test_before_launch.py",
]
# the rows (issue 13), in its order
ORDER = [
    "hung rank (SIGSTOP)",
    "killed trainer",
    "killed server",
    "killed launcher",
    "truncated partition file",
    "damaged trace (fuzz)",
    "bad settings",
    "--decisions-from another run",
    "link cut",
    "host killed",
    "link rate cut to 1%",
    "tampered PPO policy",
    "SIGTERM/SIGINT",
    # issue 30
    "rank killed after finishing",
    "decisions of another partitioning",
    "full trace disk",
    "partial trace",
    "cluster owner gone",
    "cluster in use",
    "more partitions than the graph feeds",
    "existing --trace folder",
    "killed partitioning",
]


def measure(tests=TESTS, timeout_s: float = 1800) -> pd.DataFrame:
    """Run the fault tests; their rows as a table in the issue's order. Raises if a test fails (then its row is
    not a measurement)."""
    with tempfile.TemporaryDirectory(prefix="rudder-faults-") as tmp:
        report = os.path.join(tmp, "faults.jsonl")
        env = dict(os.environ, RUDDER_FAULT_REPORT=report, HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"fault tests failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        with open(report) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    df = pd.DataFrame(rows)
    df["order"] = df["fault"].map(lambda f: ORDER.index(f) if f in ORDER else len(ORDER))
    return df.sort_values(["order"], kind="stable").drop(columns=["order"]).reset_index(drop=True)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The headline figures and the table as docs/reliability.md shows it."""
    missing = [f for f in ORDER if f not in set(df["fault"])]
    if "clean" not in df:
        df = df.assign(clean=0)
    errors = df[df["detect_s"].notna()]
    gone_on = df[df["detected"] == 0]  # not an error by design: nothing to report
    fuzz = df[df["fault"] == "damaged trace (fuzz)"]
    rest = df.drop(index=fuzz.index)
    # a fault neither reported, nor checked by its test to leave the data as it was, nor harmless by design
    reported = df.drop(index=gone_on.index)
    silent = int((reported["tried"] - reported["detected"] - reported["clean"]).sum())
    text = (
        f"{rest['fault'].nunique()} kinds of fault, {int(rest['tried'].sum())} injected in {len(rest)} tests: "
        f"{int(rest['detected'].sum())} ended in an error or a refusal naming the problem, "
        f"{int(gone_on['tried'].sum())} not an error by design ({', '.join(gone_on['fault'])}: nothing to "
        f"report, the job goes on). Besides them, {int(fuzz['tried'].sum())} damaged trace chunks (a seeded fuzz "
        f"loop and single cases): "
        f"{int(fuzz['detected'].sum())} refused naming the chunk, {int(fuzz['clean'].sum())} read back exactly the "
        f"clean data (the damage fell on bytes the reader does not use, checked against the clean read). Silent "
        f"changes (faults neither reported nor checked to leave the data as it was): {silent}. "
        f"Seconds from injection to the job's end or the error (process start-up included for the "
        f"one-line refusals): median {errors['detect_s'].median():.2f}, max {errors['detect_s'].max():.1f} "
        f"({errors.loc[errors['detect_s'].idxmax(), 'fault']}). Bytes of data lost or silently changed: "
        f"{int(df['lost_bytes'].sum())}; after every fault that ended a running job the partition files were "
        f"checked against their recorded sizes and CRC-32s: intact "
        f"({int(df['input_checked'].max()):,} bytes per job)."
    )
    if missing:
        text += f" Not measured in this run: {', '.join(missing)}."
    table = df[["fault", "injected", "detect_s", "left", "seen", "tried", "detected", "lost_bytes"]]
    return text, table
