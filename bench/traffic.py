"""P1: remote rows fetched by each agent relative to no prefetch and to Belady MIN, on traces of real runs.

Traces are recorded once by real DistDGL runs (``train.py gnn --trace``) and cached under
``$RUDDER_CACHE/bench/traces``; every agent and oracle is then scored on each of them by replay at two buffer sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
from rudder.traces import Trace, TraceError
from rudder.traces.fingerprint import NOT_HELD_OUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (graph, parts, fanout): the configurations of the issue: two graphs x two partition counts x two fanouts
FULL = [(g, p, f) for g in ("synth-small", "synth-large") for p in (2, 4) for f in ("10,25", "5,10")]
QUICK = [("synth-small", 2, "10,25"), ("synth-small", 4, "5,10")]
SEEDS = (0, 1)
FRACTIONS = (0.05, 0.25)
AGENTS = ("none", "static", "periodic", "hitrate", "lookahead", "ppo")
# the lookahead with the future known exactly as far as sampling ahead reaches (rudder.env.sample_ahead), starting
# empty: label -> sample-ahead setting. The plain "lookahead" row is the recorded run's (4 minibatches, degree fill).
SAMPLE_AHEAD = {"lookahead@4": "4", "lookahead@16MB": "16MB", "lookahead@64MB": "64MB", "lookahead@epoch": "epoch"}


def cache_dir() -> str:
    from rudder.runtime.config import default_cache_dir

    return os.path.join(default_cache_dir(), "bench", "traces")


def record(graph: str, parts: int, fanout: str, seed: int, log) -> str:
    """A trace of a real run (cached): 1 epoch, batch 1000, periodic agent (the ids do not depend on the agent)."""
    name = f"{graph}-p{parts}-f{fanout.replace(',', 'x')}-s{seed}"
    out = os.path.join(cache_dir(), name)

    try:
        if Trace(out).complete:
            return out
    except TraceError:
        pass
    subprocess.run(["rm", "-rf", out], check=True)
    log(f"  recording {name} (real DistDGL run) ...")
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "gnn",
        "--graph",
        graph,
        "--parts",
        str(parts),
        "--fanout",
        fanout,
        "--seed",
        str(seed),
        "--epochs",
        "1",
        "--batch-size",
        "1000",
        "--agent",
        "periodic",
        "--trace",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recording {name} failed:\n{proc.stderr[-3000:]}")
    log(f"  recorded {name} in {time.perf_counter() - t0:.0f} s")
    return out


def measure(
    quick: bool,
    log=lambda m: print(m, file=sys.stderr, flush=True),
    agents=AGENTS,
    agent_kwargs: dict[str, dict] | None = None,
    configs=None,
    sample_ahead: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per trace x buffer fraction x agent: summed over ranks. ``agents`` are names or references
    (:mod:`rudder.evaluation.registry`), ``agent_kwargs`` their constructor options by agent; ``configs``
    (default: all, or the quick ones) the (graph, parts, fanout) to run. ``sample_ahead`` (default
    :data:`SAMPLE_AHEAD`): lookahead rows at these sample-ahead settings, with the memory each costs
    (``sample_ahead_mb``: the most sampled bytes any rank held ahead; ``known_mean``: minibatches known exactly
    beyond the next one, mean over ranks and minibatches)."""

    from rudder.evaluation.registry import agent_labels, check_agent, make_agent
    from rudder.evaluation.scoring import evaluate_trace

    configs = configs or (QUICK if quick else FULL)
    sample_ahead = SAMPLE_AHEAD if sample_ahead is None else sample_ahead
    options = {a: dict((agent_kwargs or {}).get(a, {})) for a in agents}
    for a in agents:
        check_agent(a, options[a])  # before any recording
    factories = {
        label: (lambda trace, rank, a=a: make_agent(a, **options[a])) for a, label in zip(agents, agent_labels(agents))
    }
    for label, setting in sample_ahead.items():
        factories[label] = lambda trace, rank, setting=setting: make_agent(
            "lookahead", sample_ahead=setting, buffer_init="empty"
        )
    rows = []
    for graph, parts, fanout in configs:
        for seed in SEEDS:
            trace = record(graph, parts, fanout, seed, log)
            for fraction in FRACTIONS:
                log(f"  scoring {os.path.basename(trace)} at buffer fraction {fraction}")
                per_rank = pd.DataFrame(
                    evaluate_trace(trace, factories, buffer_fraction=fraction, oracles=("belady", "hindsight"))
                )  # best-level: P6
                per_rank["not_held_out"] = per_rank["provenance"].fillna("").isin(NOT_HELD_OUT)
                summed = per_rank.groupby("agent", sort=False)[
                    ["remote_sampled", "hits", "remote_fetched", "not_held_out"]
                ].sum()
                cost = _sample_ahead_cost(trace, fraction, sample_ahead)
                for agent, r in summed.iterrows():
                    rows.append(
                        dict(
                            graph=graph,
                            parts=parts,
                            fanout=fanout,
                            seed=seed,
                            fraction=fraction,
                            agent=agent,
                            **r.to_dict(),
                            **cost.get(agent, {}),
                        )
                    )
    df = pd.DataFrame(rows)
    ref = df[df["agent"] == "belady"].set_index(["graph", "parts", "fanout", "seed", "fraction"])["remote_fetched"]
    key = ["graph", "parts", "fanout", "seed", "fraction"]
    df["fetched_vs_min"] = df["remote_fetched"] / ref.reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
    df["fetched_vs_none"] = df["remote_fetched"] / df["remote_sampled"]
    return df


def _sample_ahead_cost(trace: str, fraction: float, settings: dict[str, str]) -> dict[str, dict]:
    """Per lookahead label: what its sample-ahead setting holds on this trace (most MB over ranks, mean
    minibatches known beyond the next one, sampling seconds moved earlier)."""
    from rudder.env.replay_env import ReplayEnv

    t = Trace(trace)
    out = {}
    recorded = ReplayEnv(t, rank=t.ranks[0], buffer_fraction=fraction).sample_ahead
    for label, setting in {"lookahead": str(recorded), **settings}.items():
        stats = [
            ReplayEnv(t, rank=r, buffer_fraction=fraction, sample_ahead=setting, dense_ids=False).sample_ahead_stats()
            for r in t.ranks
        ]
        out[label] = dict(
            sample_ahead=setting,
            sample_ahead_mb=max(s["held_peak_mb"] for s in stats),
            known_mean=float(sum(s["known_mean"] for s in stats) / len(stats)),
            sample_s_moved=sum(s["sample_s_moved"] for s in stats),
        )
    return out


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per fraction and agent: the mean and worst distance to MIN and traffic vs no prefetch over all traces.
    A learned agent's rows on a trace it was not held out from (by content: trained on it, or on a run of the same
    options and seed) are left out, and the text says how many."""
    left = df[df.get("not_held_out", pd.Series(0, index=df.index)) > 0]
    df = df.drop(left.index)
    agents = df[~df["agent"].isin(["belady"])].copy()
    for col in ("sample_ahead_mb", "known_mean"):
        if col not in agents:
            agents[col] = float("nan")
    table = (
        agents.groupby(["fraction", "agent"], sort=False)
        .agg(
            fetched_vs_min_mean=("fetched_vs_min", "mean"),
            fetched_vs_min_worst=("fetched_vs_min", "max"),
            fetched_vs_none_mean=("fetched_vs_none", "mean"),
            fetched_vs_none_worst=("fetched_vs_none", "max"),
            sample_ahead_mb_mean=("sample_ahead_mb", "mean"),
            sample_ahead_mb_max=("sample_ahead_mb", "max"),
            known_ahead_mean=("known_mean", "mean"),
            traces=("fetched_vs_min", "size"),
        )
        .reset_index()
    )
    lines = []
    for fraction, t in table.groupby("fraction"):
        online = t[~t["agent"].isin(["hindsight", "none"])]
        best = online.loc[online["fetched_vs_min_mean"].idxmin()]
        min_none = df[(df["agent"] == "belady") & (df["fraction"] == fraction)]["fetched_vs_none"].mean()
        lines.append(
            f"at buffer fraction {fraction}: best agent {best['agent']} fetches "
            f"{best['fetched_vs_min_mean']:.3f}x "
            f"Belady MIN on average (worst {best['fetched_vs_min_worst']:.3f}x; target <= 1.15) and "
            f"{best['fetched_vs_none_mean']:.3f}x no prefetch (Belady MIN itself: {min_none:.3f}x"
            + ("; target <= 0.40)" if fraction == 0.25 else ")")
        )
    text = "; ".join(lines) + "."
    budgets = table[table["agent"].str.startswith("lookahead@")]
    if len(budgets):
        text += (
            " The lookahead knowing the future exactly as far as sampling ahead reaches (starting empty; "
            "target <= 1.02x MIN mean, <= 1.05x worst): "
            + "; ".join(
                f"{r.agent.split('@')[1]} at {r.fraction}: {r.fetched_vs_min_mean:.3f}x mean, "
                f"{r.fetched_vs_min_worst:.3f}x worst, holding up to {r.sample_ahead_mb_max:.1f} MB"
                for r in budgets.itertuples()
            )
            + "."
        )
    if len(left):
        text += (
            " Left out, not held out by content: "
            + ", ".join(
                f"{a} on {n} trace x fraction pair(s)" for a, n in left.groupby("agent", sort=False).size().items()
            )
            + "."
        )
    else:
        text += " No pair was left out: every learned agent was held out from every trace, by content."
    return text, table


def plot(df: pd.DataFrame, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted(df["fraction"].unique())
    fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 3.8), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        d = df[(df["fraction"] == fraction) & (df["agent"] != "belady")]
        means = d.groupby("agent", sort=False)["fetched_vs_min"].agg(["mean", "min", "max"])
        ax.bar(
            means.index,
            means["mean"],
            yerr=[means["mean"] - means["min"], means["max"] - means["mean"]],
            color="tab:blue",
            capsize=3,
        )
        ax.axhline(1.0, color="k", linestyle="--", label="Belady MIN")
        ax.axhline(1.15, color="tab:red", linestyle=":", label="target 1.15x MIN")
        ax.set_title(f"buffer = {fraction} x halo", fontsize=10)
        ax.set_ylabel("remote rows fetched / Belady MIN")
        ax.tick_params(axis="x", rotation=45)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sample_ahead(df: pd.DataFrame, path: str) -> str:
    """Remote rows fetched / Belady MIN (mean and worst over traces) against the MB sampled ahead, per buffer
    fraction: what each sample-ahead setting buys and costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = df[df["agent"].str.startswith("lookahead@")]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for fraction, g in d.groupby("fraction"):
        agg = g.groupby("agent", sort=False).agg(
            mb=("sample_ahead_mb", "mean"), mean=("fetched_vs_min", "mean"), worst=("fetched_vs_min", "max")
        )
        line = ax.plot(agg["mb"], agg["mean"], "o-", label=f"buffer {fraction} x halo: mean")[0]
        ax.plot(agg["mb"], agg["worst"], "s--", color=line.get_color(), label=f"buffer {fraction} x halo: worst")
        for label, r in agg.iterrows():
            ax.annotate(
                label.split("@")[1], (r["mb"], r["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.axhline(1.02, color="tab:red", linestyle=":", label="target 1.02x (mean)")
    ax.axhline(1.05, color="tab:red", linestyle="-.", label="target 1.05x (worst)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("sampled ahead, MB held (mean over traces of the most any rank held)")
    ax.set_ylabel("remote rows fetched / Belady MIN")
    ax.set_title("P1: lookahead vs Belady MIN against sample-ahead memory", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
