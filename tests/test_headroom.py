"""``rudder headroom`` and the bench's Headroom section (issue 25): the best constant, the bound or reference,
headroom, MPC's share and the replay model's error band per trace; one line for a bad trace."""

import re
import subprocess
import sys

import pandas as pd
import pytest
from rudder.bench import run as bench

from rudder.headroom import format_table, measure

SMALL = "traces/samples/small-random2-f5x10"  # the smallest shipped trace whose time fit separates remote rows


def test_rudder_headroom_prints_each_space_per_rank_with_progress(tmp_path):
    csv = tmp_path / "h.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "rudder.cli", "headroom", SMALL, "--csv", str(csv)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[headroom] small-random2-f5x10 rank 0 link-levels: bound search, window 8/8" in proc.stderr
    df = pd.read_csv(csv)
    assert len(df) == 4 and set(df["space"]) == {"link-levels", "keep-replace"}
    assert (df["bound_s"] <= df["best_constant_s"] + 1e-12).all()
    assert df["headroom"].to_numpy() == pytest.approx(1 - df["bound_s"] / df["best_constant_s"])
    assert df.loc[df["space"] == "link-levels", "mpc_s"].notna().all()
    assert df["error_band"].between(0.3, 1.0).all()  # this sample's time check: 64.6% and 66.2%
    for _, r in df.iterrows():
        assert f"{r['kind']} {r['bound_s']:.3f}" in proc.stdout
    assert "not discriminating: agents tie a constant here" in proc.stdout


@pytest.mark.parametrize(
    "path, says",
    [("/nonexistent/trace", "no such trace folder"), ("traces/samples", "not a rudder trace: trace.json missing")],
)
def test_a_bad_trace_path_gives_one_line(path, says):
    proc = subprocess.run(
        [sys.executable, "-m", "rudder.cli", "headroom", path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rudder headroom: error: {path}: ") and says in lines[0]


def test_untimed_ranks_are_listed_without_numbers():
    df = measure(["traces/samples/small-metis4-f10x25"])
    assert len(df) == 8 and df["bound_s"].isna().all()
    assert "(time does not depend on fetches)" in format_table(df)


def test_bench_headroom_section(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "OUT_DIR", str(tmp_path))
    out = tmp_path / "B.md"
    assert bench.main(["--only", "headroom", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Headroom" in text and "`python -m rudder.bench --only headroom --quick" in text
    rows = pd.read_csv(tmp_path / "headroom.csv")
    assert set(rows["trace"]) == {"small-random2-f5x10"} and len(rows) == 4
    assert re.search(r"\| small-random2-f5x10 +\| link-levels +\| +2 \|", text)
    assert re.search(r"\| all +\| keep-replace +\| +2 \|", text)
