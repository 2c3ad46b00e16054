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
    none_s = df.loc[df["agent"] == "none", "modelled_s"].sum() if (df["agent"] == "none").any() else float("nan")
    out["time_vs_none"] = g["modelled_s"].sum(min_count=1) / none_s
    out["latency_p50_ms"] = g["latency_p50_s"].median() * 1000
    out["latency_p95_ms"] = g["latency_p95_s"].max() * 1000
    if "invalid_answers" in df:
        out["invalid_answers"] = g["invalid_answers"].sum()
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
                        "latency_p95_ms", "invalid_answers", "remote_fetched") if c in table]
    fmt = {"fetched_vs_none": "{:.3f}", "hit_rate": "{:.1%}", "fetched_vs_min": "{:.3f}", "time_vs_none": "{:.3f}",
           "latency_p50_ms": "{:.2f}", "latency_p95_ms": "{:.2f}", "invalid_answers": "{:.0f}",
           "remote_fetched": "{:.0f}"}
    shown = table[cols].copy()
    for c in cols:
        shown[c] = [("-" if pd.isna(v) else fmt[c].format(v)) for v in table[c]]
    return shown.to_string()
