"""Tables of evaluation results: per trace and overall, relative to no prefetch and to Belady MIN."""

from __future__ import annotations

import pandas as pd


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per agent (over the given rows' ranks): traffic and time relative to no prefetch, distance to MIN.

    No prefetch fetches every remote row it samples, so its traffic is ``remote_sampled`` whether or not the
    ``none`` agent was run.
    """
    g = df.groupby("agent", sort=False)
    out = g[["remote_sampled", "hits", "remote_fetched", "prefetched"]].sum()
    out["fetched_vs_none"] = out["remote_fetched"] / out["remote_sampled"]
    out["hit_rate"] = out["hits"] / out["remote_sampled"]
    if "belady" in out.index:
        out["fetched_vs_min"] = out["remote_fetched"] / out.loc["belady", "remote_fetched"]
    none_s = df.loc[df["agent"] == "none", "time_s"].sum() if (df["agent"] == "none").any() else float("nan")
    out["time_vs_none"] = g["time_s"].sum(min_count=1) / none_s
    out["latency_p50_ms"] = g["latency_p50_s"].median() * 1000
    out["latency_p95_ms"] = g["latency_p95_s"].max() * 1000
    if "invalid_answers" in df:
        out["invalid_answers"] = g["invalid_answers"].sum()
    if "held_out" in df and df["held_out"].notna().any():
        out["held_out"] = g["held_out"].agg(lambda v: "" if v.isna().all() else
                                             ("yes" if v.all() else "no" if not v.any() else "partly"))
    return out


def format_report(df: pd.DataFrame) -> str:
    parts = []
    for trace, rows in df.groupby("trace", sort=False):
        parts.append(f"== {trace} ({rows['rank'].nunique()} ranks)\n{_fmt(summarise(rows))}")
    if df["trace"].nunique() > 1:
        parts.append(f"== overall ({df['trace'].nunique()} traces)\n{_fmt(summarise(df))}")
    return "\n\n".join(parts)


def _fmt(table: pd.DataFrame) -> str:
    cols = [c for c in ("fetched_vs_none", "hit_rate", "fetched_vs_min", "time_vs_none", "latency_p50_ms",
                        "latency_p95_ms", "invalid_answers", "held_out", "remote_fetched") if c in table]
    fmt = {"fetched_vs_none": "{:.3f}", "hit_rate": "{:.1%}", "fetched_vs_min": "{:.3f}", "time_vs_none": "{:.3f}",
           "latency_p50_ms": "{:.2f}", "latency_p95_ms": "{:.2f}", "invalid_answers": "{:.0f}",
           "remote_fetched": "{:.0f}", "held_out": "{}"}
    shown = table[cols].copy()
    for c in cols:
        shown[c] = [("-" if pd.isna(v) else fmt[c].format(v)) for v in table[c]]
    return shown.to_string()


ORACLE_STYLE = {"belady": ("k", "--"), "hindsight": ("0.5", ":")}


def plot_hit_rate(df: pd.DataFrame, path: str) -> str:
    """Hit rate per decision window over the run, one line per agent (mean over ranks), one panel per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    traces = list(dict.fromkeys(df["trace"]))
    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 3.6), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        rows = df[df["trace"] == trace]
        for agent, group in rows.groupby("agent", sort=False):
            curves = [np.asarray(c, dtype=float) for c in group["window_hit_rate"] if len(c)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            color, style = ORACLE_STYLE.get(agent, (None, "-"))
            ax.plot(np.arange(n), mean, style, color=color, label=agent, linewidth=1.5)
        ax.set_title(trace, fontsize=10)
        ax.set_xlabel("decision window")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("hit rate (remote rows served by the buffer)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_traffic(df: pd.DataFrame, path: str) -> str:
    """Remote rows fetched relative to no prefetch, per agent and trace, with Belady MIN as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(df["trace"]))
    fig, axes = plt.subplots(1, len(traces), figsize=(4.5 * len(traces), 3.6), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        table = summarise(df[df["trace"] == trace])
        agents = [a for a in table.index if a not in ORACLE_STYLE]
        ax.bar(agents, table.loc[agents, "fetched_vs_none"], color="tab:blue")
        for oracle, (color, style) in ORACLE_STYLE.items():
            if oracle in table.index:
                ax.axhline(table.loc[oracle, "fetched_vs_none"], color=color, linestyle=style,
                           label="Belady MIN" if oracle == "belady" else "hindsight static")
        ax.set_title(trace, fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].set_ylabel("remote rows fetched / no prefetch")
    if any(o in df["agent"].values for o in ORACLE_STYLE):
        axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
