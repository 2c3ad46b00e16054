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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (graph, parts, fanout): the configurations of the issue: two graphs x two partition counts x two fanouts
FULL = [(g, p, f) for g in ("synth-small", "synth-large") for p in (2, 4) for f in ("10,25", "5,10")]
QUICK = [("synth-small", 2, "10,25"), ("synth-small", 4, "5,10")]
SEEDS = (0, 1)
FRACTIONS = (0.05, 0.25)
AGENTS = ("none", "static", "periodic", "hitrate", "lookahead", "ppo")


def cache_dir() -> str:
    from rudder_env.dist.config import default_cache_dir

    return os.path.join(default_cache_dir(), "bench", "traces")


def record(graph: str, parts: int, fanout: str, seed: int, log) -> str:
    """A trace of a real run (cached): 1 epoch, batch 1000, periodic agent (the ids do not depend on the agent)."""
    name = f"{graph}-p{parts}-f{fanout.replace(',', 'x')}-s{seed}"
    out = os.path.join(cache_dir(), name)
    from traces import Trace, TraceError

    try:
        if Trace(out).complete:
            return out
    except TraceError:
        pass
    subprocess.run(["rm", "-rf", out], check=True)
    log(f"  recording {name} (real DistDGL run) ...")
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "gnn", "--graph", graph, "--parts", str(parts),
           "--fanout", fanout, "--seed", str(seed), "--epochs", "1", "--batch-size", "1000", "--agent", "periodic",
           "--trace", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"recording {name} failed:\n{proc.stderr[-3000:]}")
    log(f"  recorded {name} in {time.perf_counter() - t0:.0f} s")
    return out


def measure(quick: bool, log=lambda m: print(m, file=sys.stderr, flush=True), agents=AGENTS,
            agent_kwargs: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per trace x buffer fraction x agent: summed over ranks. ``agents`` are names or references
    (:mod:`rudder_env.evaluation.registry`), ``agent_kwargs`` their constructor options by agent."""
    from rudder_env.evaluation.registry import agent_labels, check_agent, make_agent
    from traces.fingerprint import NOT_HELD_OUT
    from rudder_env.evaluation.scoring import evaluate_trace

    configs = QUICK if quick else FULL
    options = {a: dict((agent_kwargs or {}).get(a, {})) for a in agents}
    for a in agents:
        check_agent(a, options[a])  # before any recording
    factories = {label: (lambda trace, rank, a=a: make_agent(a, **options[a]))
                 for a, label in zip(agents, agent_labels(agents))}
    rows = []
    for graph, parts, fanout in configs:
        for seed in SEEDS:
            trace = record(graph, parts, fanout, seed, log)
            for fraction in FRACTIONS:
                log(f"  scoring {os.path.basename(trace)} at buffer fraction {fraction}")
                per_rank = pd.DataFrame(evaluate_trace(trace, factories, buffer_fraction=fraction))
                per_rank["not_held_out"] = per_rank["provenance"].fillna("").isin(NOT_HELD_OUT)
                summed = per_rank.groupby("agent", sort=False)[["remote_sampled", "hits", "remote_fetched",
                                                                "not_held_out"]].sum()
                for agent, r in summed.iterrows():
                    rows.append(dict(graph=graph, parts=parts, fanout=fanout, seed=seed, fraction=fraction,
                                     agent=agent, **r.to_dict()))
    df = pd.DataFrame(rows)
    ref = df[df["agent"] == "belady"].set_index(["graph", "parts", "fanout", "seed", "fraction"])["remote_fetched"]
    key = ["graph", "parts", "fanout", "seed", "fraction"]
    df["fetched_vs_min"] = df["remote_fetched"] / ref.reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
    df["fetched_vs_none"] = df["remote_fetched"] / df["remote_sampled"]
    return df


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per fraction and agent: the mean and worst distance to MIN and traffic vs no prefetch over all traces.
    A learned agent's rows on a trace it was not held out from (by content: trained on it, or on a run of the same
    options and seed) are left out, and the text says how many."""
    left = df[df.get("not_held_out", pd.Series(0, index=df.index)) > 0]
    df = df.drop(left.index)
    agents = df[~df["agent"].isin(["belady"])]
    table = agents.groupby(["fraction", "agent"], sort=False).agg(
        fetched_vs_min_mean=("fetched_vs_min", "mean"), fetched_vs_min_worst=("fetched_vs_min", "max"),
        fetched_vs_none_mean=("fetched_vs_none", "mean"), fetched_vs_none_worst=("fetched_vs_none", "max"),
        traces=("fetched_vs_min", "size")).reset_index()
    lines = []
    for fraction, t in table.groupby("fraction"):
        online = t[~t["agent"].isin(["hindsight", "none"])]
        best = online.loc[online["fetched_vs_min_mean"].idxmin()]
        min_none = df[(df["agent"] == "belady") & (df["fraction"] == fraction)]["fetched_vs_none"].mean()
        lines.append(f"at buffer fraction {fraction}: best agent {best['agent']} fetches {best['fetched_vs_min_mean']:.3f}x "
                     f"Belady MIN on average (worst {best['fetched_vs_min_worst']:.3f}x; target <= 1.15) and "
                     f"{best['fetched_vs_none_mean']:.3f}x no prefetch (Belady MIN itself: {min_none:.3f}x"
                     + ("; target <= 0.40)" if fraction == 0.25 else ")"))
    text = "; ".join(lines) + "."
    if len(left):
        text += (" Left out, not held out by content: " + ", ".join(
            f"{a} on {n} trace x fraction pair(s)" for a, n in left.groupby("agent", sort=False).size().items()) + ".")
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
        ax.bar(means.index, means["mean"], yerr=[means["mean"] - means["min"], means["max"] - means["mean"]],
               color="tab:blue", capsize=3)
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
