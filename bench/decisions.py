"""P6: decisions that matter. Agents that choose how much the link prefetches (link-budget levels) against the
heuristics, VIP, the fixed levels and the best-in-action-space oracle, on emulated-cluster traces: the shipped
sample, the held-out traces (configurations neither learned agent saw: another link rate, partition count, graph
family) and, marked trained-on, the training traces.

Per trace: headroom over link-budget levels (1 - bound / best constant level, :mod:`rudder.evaluation.bound`; the
bound a reference where the search did not prove it), each agent's modelled time relative to no prefetch and to the
best constant, its share of the headroom and its rows fetched relative to Belady MIN; the learned agents' provenance
comes from content fingerprints, so "held out" is checked, not assumed.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd

from rudder.evaluation.report import HEADROOM_MIN, headroom
from rudder.evaluation.report import summarise as per_agent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = {
    "sample": sorted(glob.glob(os.path.join(ROOT, "traces", "samples", "emu*"))),
    "held-out": sorted(glob.glob(os.path.join(ROOT, "traces", "heldout", "emu*"))),
    "training": sorted(glob.glob(os.path.join(ROOT, "traces", "train", "emu*"))),
}
AGENTS = (
    "none",
    "static",
    "vip",
    "periodic",
    "lookahead",
    "level@level=0.125",
    "level@level=1.0",
    "ppo-link",
    "mpc",
    "llm-link",
)
ORACLES = ("belady", "best-level", "best-constant", "bound")


def _agents(quick: bool) -> list[str]:
    from rudder.evaluation.registry import REGISTRY

    chosen = [a for a in AGENTS if a.split("@")[0] in REGISTRY]
    return [a for a in chosen if a != "llm-link"] if quick else chosen


def measure(quick: bool) -> pd.DataFrame:
    """One row per agent x trace x rank (as ``evaluate.py``'s ``results.csv``), with ``set`` (sample, held-out,
    training)."""
    from rudder.evaluation.registry import make_agent
    from rudder.evaluation.scoring import evaluate_trace

    def factory(spec: str):
        name, _, opts = spec.partition("@")
        kwargs = dict(kv.split("=") for kv in opts.split(",")) if opts else {}
        kwargs = {k: float(v) for k, v in kwargs.items()}
        return lambda trace, rank: make_agent(name, **kwargs)

    agents = {spec.replace("@level=", "-"): factory(spec) for spec in _agents(quick)}
    rows = []
    for kind, traces in TRACES.items():
        for trace in traces[:1] if quick else traces:
            print(f"P6: {kind} {os.path.basename(trace)}", flush=True)
            for r in evaluate_trace(trace, agents, oracles=ORACLES):
                rows.append(dict(r, set=kind))
    df = pd.DataFrame(rows)
    return df.drop(columns=["window_hit_rate"], errors="ignore")


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per trace: headroom and, per agent, time vs none and vs the best constant, share of headroom, rows vs MIN;
    then the targets."""

    tables, lines = [], []
    for (kind, trace), rows in df.groupby(["set", "trace"], sort=False):
        s = per_agent(rows)
        h = headroom(rows)
        h = float(h.loc["link-levels", "headroom"]) if "link-levels" in h.index else float("nan")
        t = pd.DataFrame(
            {
                "set": kind,
                "trace": trace,
                "agent": s.index,
                "headroom": h,
                "time_vs_none": s["time_vs_none"].to_numpy(),
                "vs_best_constant": s.get("vs_best_constant", pd.Series(np.nan, s.index)).to_numpy(),
                "share_of_headroom": s.get("share_of_headroom", pd.Series(np.nan, s.index)).to_numpy(),
                "fetched_vs_min": s["fetched_vs_min"].to_numpy(),
                "provenance": s.get("provenance", pd.Series("", s.index)).fillna("").to_numpy(),
            }
        )
        tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    held = table[table["set"] == "held-out"]
    for trace, t in held.groupby("trace", sort=False):
        by = t.set_index("agent")
        h = float(t["headroom"].iloc[0])

        def time(agent):
            return float(by.loc[agent, "time_vs_none"]) if agent in by.index else float("nan")

        def vs_constant(agent):
            return float(by.loc[agent, "vs_best_constant"]) if agent in by.index else float("nan")

        if np.isnan(h):
            lines.append(
                f"- {trace}: no time figures: its fetch-time fit does not separate remote rows (evaluate.py "
                f"prints the fit), so only traffic is compared there; rows vs Belady MIN: PPO "
                f"{float(by.loc['ppo-link', 'fetched_vs_min']) if 'ppo-link' in by.index else float('nan'):.3f}, "
                f"LLM {float(by.loc['llm-link', 'fetched_vs_min']) if 'llm-link' in by.index else float('nan'):.3f}."
            )
            continue
        verdict = "" if h >= HEADROOM_MIN else " (not discriminating)"
        band = float(df.loc[df["trace"] == trace, "time_error_band"].max()) if "time_error_band" in df else np.nan
        compared = [vs_constant(a) for a in ("llm-link", "ppo-link", "mpc")]
        ties = (
            f" Replay's error band on this trace is {band:.1%} (its time check out of sample): "
            + (
                "every difference from the best constant above is a tie."
                if all(abs(v) <= band for v in compared)
                else "differences larger than it are the only ones that rank."
            )
            if not np.isnan(band)
            else ""
        )
        lines.append(
            f"- {trace}: headroom {h:.1%}{verdict} (target >= 15%); LLM time / PPO time "
            f"{time('llm-link') / time('ppo-link'):.3f} (target <= 1.05); vs the best constant level: LLM "
            f"{vs_constant('llm-link'):+.2%}, PPO {vs_constant('ppo-link'):+.2%}, MPC {vs_constant('mpc'):+.2%}; "
            f"PPO {time('ppo-link'):.3f} and LLM "
            f"{time('llm-link'):.3f} of no prefetch's time vs periodic {time('periodic'):.3f} and VIP "
            f"{time('vip'):.3f} (target: both ahead of both); the lookahead {time('lookahead'):.3f}, "
            f"best-level {time('best-level'):.3f}, best constant {time('best-constant:link-levels'):.3f}, bound "
            f"{time('bound:link-levels'):.3f}.{ties}"
        )
    where = []
    for trace, rows in df[df["set"] == "held-out"].groupby("trace", sort=False):
        o = rows[rows["agent"] == "best-level"]
        if o.empty or "time_fetch_s" not in o:
            continue
        hide = float(o["time_sample_s"].sum() + o["time_compute_s"].sum())
        fetch, stall = float(o["time_fetch_s"].sum()), float(o["time_stall_s"].sum())
        belady_rows = max(float(rows[rows["agent"] == "belady"]["remote_fetched"].sum()), 1)
        where.append(
            f"- {trace}: the oracle spends {fetch:.1f} s pulling misses on the critical path ({stall:.1f} s of "
            f"it behind prefetch chunks) against {hide:.1f} s of sampling and compute a background prefetch "
            f"can hide in; its rows fetched are {float(o['remote_fetched'].sum()) / belady_rows:.2f}x Belady MIN's."
        )
    text = (
        "Modelled time on emulated-cluster traces (replay: recorded sampling and compute, fetch time and "
        "background arrivals from the trace's fitted link model), relative to no prefetch and to the best constant "
        "link level; headroom: 1 - bound / best constant; held-out traces per target:\n\n"
        + "\n".join(lines)
        + ("\n\nWhere the time goes (held out):\n\n" + "\n".join(where) if where else "")
    )
    return text, table


def plot(table: pd.DataFrame, path: str) -> str:
    """Time relative to no prefetch per agent, one panel per trace, the oracle as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(table["trace"]))
    fig, axes = plt.subplots(1, len(traces), figsize=(3.6 * len(traces), 3.8), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        t = table[(table["trace"] == trace) & ~table["agent"].isin(("belady", "best-level", "none"))]
        ax.bar(t["agent"], t["time_vs_none"], color="tab:blue")
        oracle = table[(table["trace"] == trace) & (table["agent"] == "best-level")]["time_vs_none"]
        if len(oracle):
            ax.axhline(float(oracle.iloc[0]), color="tab:red", linestyle="-.", label="best-level oracle")
        kind = table[table["trace"] == trace]["set"].iloc[0]
        h = table[table["trace"] == trace]["headroom"].iloc[0]
        ax.set_title(f"{trace}\n{kind}, headroom {h:.1%}", fontsize=8)
        lo = float(np.nanmin(t["time_vs_none"])) if len(t) else 0.5
        ax.set_ylim(max(0.0, lo - 0.1), 1.02)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    axes[0][0].set_ylabel("modelled time / no prefetch")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
