"""Link-budget level actions, the link estimate, the best-level oracle, headroom against the best constant and ties
(issues 12, 25, 27)."""

import numpy as np
import pandas as pd
import pytest
from rudder.baselines.constant import LINK_SPACE
from rudder.baselines.policies import FixedLevel
from rudder.env.contract import LINK_LEVELS, buffer_kwargs
from rudder.env.episode import LinkEstimate
from rudder.env.replay_env import ReplayEnv
from rudder.env.settings import SettingError
from rudder.traces import Trace

from rudder.evaluation.play import play_best_level, play_episode
from rudder.evaluation.report import format_report, headroom, summarise
from rudder.evaluation.scoring import constant_rows, level_oracle

EMU = "traces/samples/emu2-metis2-f10x25-400mbit"


def _env(rank=0, **kw):
    return ReplayEnv(EMU, rank=rank, **buffer_kwargs(FixedLevel(0.0).settings), **kw)


def test_link_estimate_recovers_a_linear_link_exactly():
    est = LinkEstimate(initial_fill=(10_000, 0.005 + 10_000 * 2e-6))
    rng = np.random.default_rng(0)
    for _ in range(20):
        local, remote = int(rng.integers(100, 5000)), int(rng.integers(0, 20_000))
        est.add(local, remote, 0.005 + 1e-7 * local + 2e-6 * remote)
    c0, c_local, c_remote = est.coefficients
    assert c0 == pytest.approx(0.005, rel=1e-6) and c_remote == pytest.approx(2e-6, rel=1e-6)
    assert c_local == pytest.approx(1e-7, rel=1e-5)
    assert est.budget(1.0, chunk=2048) == int(1.0 / (2e-6 + 0.005 / 2048))
    assert LinkEstimate().budget(1.0) is None  # a row's cost unknown: no budget


def test_levels_choose_rows_from_the_link_budget_and_say_what_each_does():
    env = _env()
    obs, info = env.reset(seed=0)
    assert env.action_space.n == len(LINK_LEVELS) and obs["link"].shape == (8,)
    for _ in range(2):
        obs, _, _, _, info = env.step(0)
    link, choices = info["link"], info["choices"]
    assert link["s_per_row"] > 0 and link["budget_rows"] > 0 and 0 < link["utilisation"] < 1
    rows = [c["rows"] for c in choices]
    assert rows[0] == 0 and rows == sorted(rows) and rows[-1] == min(link["budget_rows"], link["n_admissible"])
    assert rows[2] == min(round(0.25 * link["budget_rows"]), link["n_admissible"])
    assert all(c["evicts"] <= c["rows"] for c in choices) and choices[-1]["link_s"] > choices[1]["link_s"] > 0
    before = info["counters"]["prefetched"]
    _, _, _, _, after = env.step(4)  # all of the budget: those rows go out in the background
    assert after["counters"]["prefetched"] - before >= 0.9 * rows[-1]
    with pytest.raises(ValueError, match=r"integer in \[0, 5\)"):
        env.step(5)
    with pytest.raises(SettingError, match="levels"):
        ReplayEnv(EMU, levels=(0.5, 1.0))


def test_snapshot_restore_replays_exactly():
    env = _env()
    env.reset(seed=0)
    for _ in range(3):
        env.step(2)
    snap = env.snapshot()
    runs = []
    for _ in range(2):
        env.restore(snap)
        done, total = False, 0.0
        while not done:
            _, _, done, _, info = env.step(3)
            total += info["window"]["fetch_s"]
        runs.append((total, info["counters"]["remote_fetched"]))
    assert runs[0] == runs[1]


def test_best_level_oracle_reuses_the_constants_and_beats_both_ends():
    env = _env(rank=1)
    fixed = [play_episode(env, FixedLevel(x))["time_s"] for x in LINK_LEVELS]
    assert [r["time_s"] for r in constant_rows(env, LINK_SPACE)] == pytest.approx(fixed)  # Constant == FixedLevel
    greedy = play_best_level(env, horizon=3)
    assert sum(greedy["levels_chosen"]) == greedy["decisions"] and max(greedy["levels_chosen"]) < greedy["decisions"]
    assert greedy["time_s"] < fixed[0] and greedy["time_s"] < fixed[-1]  # it mixes levels and beats both ends
    assert max(fixed) / min(fixed) > 1.01  # the levels do not tie on this emulated-cluster trace
    res = level_oracle(Trace(EMU), 1)
    assert res["fixed_level_s"] == pytest.approx(fixed) and res["greedy_s"] == pytest.approx(greedy["time_s"])
    assert res["time_s"] == pytest.approx(min(greedy["time_s"], *fixed)) and "worst_level_s" not in res


def _rows(best_s: float, bound_s: float, worst_s: float, band: float = float("nan")) -> pd.DataFrame:
    """One rank's rows: the best constant, the bound, the worst constant and an agent, in the link space."""
    common = dict(
        trace="t",
        rank=0,
        action_space="link-levels",
        time_error_band=band,
        remote_sampled=10,
        hits=5,
        remote_fetched=5,
        prefetched=0,
        latency_p50_s=0.0,
        latency_p95_s=0.0,
        time_fit_ok=True,
    )
    return pd.DataFrame(
        [
            dict(agent="best-constant:link-levels", time_s=best_s, **common),
            dict(agent="bound:link-levels", time_s=bound_s, bound_kind="reference", **common),
            dict(agent="level", time_s=worst_s, best_constant_s=best_s, bound_s=bound_s, **common),
            dict(agent="ppo-link", time_s=(best_s + bound_s) / 2, best_constant_s=best_s, bound_s=bound_s, **common),
        ]
    )


def test_headroom_is_measured_against_the_best_constant_not_the_worst():
    rows = _rows(best_s=10.0, bound_s=9.0, worst_s=12.0)
    h = headroom(rows)
    assert h.loc["link-levels", "headroom"] == pytest.approx(1 - 9.0 / 10.0)  # the worst level (12 s) plays no part
    assert h.loc["link-levels", "kind"] == "reference"
    summary = summarise(rows)
    assert summary.loc["ppo-link", "share_of_headroom"] == pytest.approx(0.5)
    assert summary.loc["level", "share_of_headroom"] == pytest.approx(-2.0)  # 2 s slower than the best constant
    assert summary.loc["level", "vs_best_constant"] == pytest.approx(0.2)
    text = format_report(rows)
    assert "headroom link-levels: 10.00% = 1 - reference" in text and "not discriminating" not in text


def test_a_trace_under_five_percent_headroom_says_so_at_the_top_of_its_table():
    text = format_report(_rows(best_s=10.0, bound_s=9.8, worst_s=12.0))
    table = text.split("== t (1 ranks)\n", 1)[1]
    assert table.startswith("not discriminating: agents tie a constant here (link-levels: headroom 2.00% < 5%)")


def test_differences_inside_the_error_band_print_as_ties():
    rows = _rows(best_s=10.0, bound_s=9.0, worst_s=10.1, band=0.02)  # level 1% slower, ppo-link 5% faster
    lines = {
        ln.split()[0]: ln for ln in format_report(rows).splitlines() if ln.split()[:1] in (["level"], ["ppo-link"])
    }
    assert " tie " in lines["level"] and " tie " not in lines["ppo-link"] and "-5.00%" in lines["ppo-link"]
    text = format_report(rows)
    legend = text.index("'tie' where within the replay model's out-of-sample error band")
    assert legend < text.index("fetched_vs_none")  # in the table's header, above its rows
