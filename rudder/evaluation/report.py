"""Tables of evaluation results: per trace and overall, relative to no prefetch and to Belady MIN.

The headline tables leave out every (agent, trace, rank) row a learned agent was not held out on (it learned from
that rank, from a run of the same options, or cannot tell: :mod:`rudder.traces.fingerprint`) unless asked to keep them,
and say so under the table. Modelled time is shown only over ranks whose fetch-time fit separates remote rows
(:meth:`rudder.env.timing.FetchTimeModel.separates_remote_rows`), with the fit and its out-of-sample error beside it.
Rows replayed under a scenario (:mod:`rudder.env.scenario`) are synthetic, and the report says so once at the top.
"""

from __future__ import annotations

import pandas as pd

from rudder.traces.fingerprint import NOT_HELD_OUT

ORACLE_NOTES = {
    "best-level": "best-level: the better of the best link-budget level held throughout and, at every decision, the "
    "level with the fewest modelled seconds over the next 3 windows (knows the trace's future; a heuristic, not a "
    "bound); run only where the time fit separates remote rows",
    "best-constant": "best-constant:SPACE: the one action of the space held throughout that is fastest on that rank, "
    "chosen in hindsight",
    "tuned-constant": "tuned-constant:SPACE: the one action fastest summed over the training traces (traces/train), "
    "applied unchanged elsewhere: what a practitioner would deploy",
    "bound": "bound:SPACE: the fastest action sequence of the space within the replay model (beam search over "
    "snapshots); a bound where proved optimal, else printed as a reference (a sequence found)",
    "belady": "belady: Belady MIN, the fewest remote rows any policy with this buffer fetches: a bound on traffic, not "
    "on hit rate (buffers that prefetch can hit more), so no hit rate is shown for it",
    "hindsight": "hindsight: the static buffer with the most hits, chosen knowing the whole trace "
    "(the best buffer that never changes)",
}


def headline(df: pd.DataFrame, include_trained_on: bool = False) -> pd.DataFrame:
    """The rows a headline may sum: all of them with ``include_trained_on``, else those whose ``provenance`` is
    empty (not a learned agent) or ``held-out``."""
    if include_trained_on or "provenance" not in df:
        return df
    return df[~df["provenance"].fillna("").isin(NOT_HELD_OUT)]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per agent (over the given rows' ranks): traffic and time relative to no prefetch, distance to MIN.

    No prefetch fetches every remote row it samples, so its traffic is ``remote_sampled`` whether or not the
    ``none`` agent was run. ``time_vs_none`` sums only ranks whose time fit separates remote rows (``time_fit_ok``,
    when the rows carry it): elsewhere modelled time would not depend on what an agent fetches. Belady MIN gets no
    hit rate (it minimises rows fetched; its hit rate is no ceiling). ``provenance`` counts the rows' provenance.
    """
    g = df.groupby("agent", sort=False)
    out = g[["remote_sampled", "hits", "remote_fetched", "prefetched"]].sum()
    out["fetched_vs_none"] = out["remote_fetched"] / out["remote_sampled"]
    out["hit_rate"] = out["hits"] / out["remote_sampled"]
    if "belady" in out.index:  # over the same (trace, rank) pairs: an oracle may have run on fewer
        bel = df[df["agent"] == "belady"].set_index(["trace", "rank"])["remote_fetched"]
        pairs = df.set_index(["trace", "rank"]).index
        df_min = df.assign(min_fetched=bel.reindex(pairs).to_numpy())
        out["fetched_vs_min"] = out["remote_fetched"] / df_min.groupby("agent", sort=False)["min_fetched"].sum()
        out.loc["belady", "hit_rate"] = float("nan")
    timed = df[df["time_fit_ok"].fillna(False).astype(bool)] if "time_fit_ok" in df else df
    none_s = timed.loc[timed["agent"] == "none", "time_s"].sum() if (timed["agent"] == "none").any() else float("nan")
    out["time_vs_none"] = timed.groupby("agent", sort=False)["time_s"].sum(min_count=1).reindex(out.index) / none_s
    if "best_constant_s" in df and timed["best_constant_s"].notna().any():
        # over each agent's ranks with a best constant in its action space: time over it, and where a bound or
        # reference was searched too, the share of the headroom the agent captured
        judged = timed[timed["best_constant_s"].notna()].groupby("agent", sort=False)
        const_s = judged["best_constant_s"].sum(min_count=1)
        out["vs_best_constant"] = (judged["time_s"].sum(min_count=1) / const_s).reindex(out.index) - 1
        out["error_band"] = judged["time_error_band"].max().reindex(out.index)
        if "bound_s" in df:
            both = timed[timed["best_constant_s"].notna() & timed["bound_s"].notna()].groupby("agent", sort=False)
            gap = both["best_constant_s"].sum(min_count=1) - both["bound_s"].sum(min_count=1)
            saved = both["best_constant_s"].sum(min_count=1) - both["time_s"].sum(min_count=1)
            out["share_of_headroom"] = (saved / gap.where(gap > 0)).reindex(out.index)
    out["latency_p50_ms"] = g["latency_p50_s"].median() * 1000
    out["latency_p95_ms"] = g["latency_p95_s"].max() * 1000
    if "invalid_answers" in df:
        out["invalid_answers"] = g["invalid_answers"].sum()
    if "provenance" in df and df["provenance"].fillna("").ne("").any():
        out["provenance"] = g["provenance"].agg(_count_provenance)
    return out


def _count_provenance(values: pd.Series) -> str:
    counts = values.fillna("").value_counts()
    counts = counts[counts.index != ""]
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{p} {n}" for p, n in counts.items())


def format_report(df: pd.DataFrame, include_trained_on: bool = False) -> str:
    """The per-trace and overall tables, each followed by what it left out and (per trace) the time model's fit and
    out-of-sample error; then the learned agents' provenance per trace and rank, and what the oracles bound."""
    parts = [scenario_line(df)]
    for trace, rows in df.groupby("trace", sort=False):
        parts.append(
            f"== {trace} ({rows['rank'].nunique()} ranks)\n"
            + _section(rows, include_trained_on)
            + _ceiling_line(rows)
            + _time_model_lines(rows)
        )
    if df["trace"].nunique() > 1:
        timed = _timed_ranks(df)
        note = (
            f"\ntime_vs_none over the {timed[0]} of {timed[1]} ranks whose time fit separates remote rows"
            if "time_fit_ok" in df
            else ""
        )
        parts.append(
            f"== overall ({df['trace'].nunique()} traces)\n"
            + _section(df, include_trained_on)
            + _ceiling_line(df)
            + note
        )
    parts.append(format_provenance(df))
    present = {str(a).split(":")[0] for a in df["agent"]}
    notes = [ORACLE_NOTES[o] for o in ORACLE_NOTES if o in present]
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(p for p in parts if p)


def scenario_line(df: pd.DataFrame) -> str:
    """The line that heads a report of rows replayed under a scenario (their ``scenario`` column), empty when none
    was: their times are synthetic, and the replay model's error band was measured under the recorded conditions
    only."""
    if "scenario" not in df or "synthetic" not in df:
        return ""
    synthetic = df["synthetic"].fillna(False).astype(bool)
    names = [n for n in dict.fromkeys(df.loc[synthetic, "scenario"].fillna("").astype(str)) if n]
    if not names:
        return ""
    return (
        f"replayed under scenario {', '.join(names)} (synthetic): modelled times under conditions no run met; "
        "error_band (and the ties it marks) is the replay model's error under the recorded conditions only"
    )


HEADROOM_MIN = 0.05  # below this a trace cannot rank the agents of an action space: marked not discriminating


def headroom(rows: pd.DataFrame) -> pd.DataFrame:
    """Per action space, over the ranks its bound search ran on: ``best_constant_s`` and ``bound_s`` (summed),
    ``headroom = 1 - bound / best constant``, ``kind`` (``bound`` where every rank's optimum was proved, else
    ``reference``), ``error_band`` (the largest out-of-sample |error| of the replay model among those ranks; NaN
    where none was checked) and ``ranks``. Empty when no ``bound:SPACE`` row is present."""
    cols = ["best_constant_s", "bound_s", "headroom", "kind", "error_band", "ranks"]
    if "action_space" not in rows:
        return pd.DataFrame(columns=cols)
    out = {}
    for space, group in rows[rows["agent"].astype(str).str.startswith("bound:")].groupby("action_space", sort=False):
        const = rows[rows["agent"] == f"best-constant:{space}"].set_index(["trace", "rank"])["time_s"]
        b = group.set_index(["trace", "rank"])
        pairs = b.index.intersection(const.index)
        if not len(pairs):
            continue
        const_s, bound_s = float(const.loc[pairs].sum()), float(b.loc[pairs, "time_s"].sum())
        out[space] = dict(
            best_constant_s=const_s,
            bound_s=bound_s,
            headroom=1 - bound_s / const_s if const_s > 0 else float("nan"),
            kind="bound" if (b.loc[pairs, "bound_kind"] == "bound").all() else "reference",
            error_band=float(b.loc[pairs, "time_error_band"].max()),
            ranks=len(pairs),
        )
    return pd.DataFrame.from_dict(out, orient="index", columns=cols)


def _headroom_lines(rows: pd.DataFrame) -> tuple[str, str]:
    """(the verdict for the top of a table, the headroom lines under it)."""
    h = headroom(rows)
    if h.empty and ("best_constant_s" not in rows or rows["best_constant_s"].isna().all()):
        return "", ""
    top, lines = [], []
    for space, r in h.iterrows():
        word = "bound" if r["kind"] == "bound" else "reference (a sequence found, not proved optimal)"
        band = "" if pd.isna(r["error_band"]) else f", replay model's error band ±{r['error_band']:.1%}"
        lines.append(
            f"headroom {space}: {r['headroom']:.2%} = 1 - {word} {r['bound_s']:.3f} s / best constant "
            f"{r['best_constant_s']:.3f} s over {r['ranks']} ranks{band}"
        )
        if r["headroom"] < HEADROOM_MIN:
            top.append(
                f"not discriminating: agents tie a constant here ({space}: headroom {r['headroom']:.2%} < "
                f"{HEADROOM_MIN:.0%})"
            )
    top.append(
        "vs_best_constant: time over the best constant of the agent's action space, 'tie' where within the replay "
        "model's out-of-sample error band (error_band); share_of_headroom: (best constant - agent) / (best "
        "constant - bound)"
    )
    return "\n".join(top) + "\n", "".join("\n" + line for line in lines)


def _section(rows: pd.DataFrame, include_trained_on: bool) -> str:
    full = summarise(rows)
    kept = headline(rows, include_trained_on)
    table = summarise(kept).reindex(full.index) if len(kept) else full.iloc[:, :0].reindex(columns=full.columns)
    if "provenance" in full:
        table["provenance"] = full["provenance"]
    top, lines = _headroom_lines(rows)
    text = top + _fmt(table) + lines
    left = rows.drop(kept.index)
    if len(left):
        for agent, group in left.groupby("agent", sort=False):
            total = int((rows["agent"] == agent).sum())
            text += (
                f"\n{agent}: {len(group)} of {total} (trace, rank) pairs left out of this table "
                f"({_count_provenance(group['provenance'])}: not held out); --include-trained-on keeps them"
            )
    elif include_trained_on and "provenance" in rows and rows["provenance"].isin(NOT_HELD_OUT).any():
        text += "\nincludes (trace, rank) pairs learned agents were not held out on (--include-trained-on)"
    return text


def hit_rate_ceiling(df: pd.DataFrame) -> float:
    """The most hits any policy with the rows' buffer size could have, over their (trace, rank)s' remote rows
    sampled (:func:`rudder.baselines.oracles.hit_ceiling`); NaN when the rows do not carry it (live runs)."""
    if "ceiling_hits" not in df or df["ceiling_hits"].isna().all():
        return float("nan")
    ranks = df.drop_duplicates(["trace", "rank"])
    sampled = df.groupby(["trace", "rank"])["remote_sampled"].max().sum()
    return float(ranks["ceiling_hits"].sum() / sampled) if sampled else float("nan")


def _ceiling_line(rows: pd.DataFrame) -> str:
    ceiling = hit_rate_ceiling(rows)
    if pd.isna(ceiling):
        return ""
    return (
        f"\nhit-rate ceiling {ceiling:.1%}: no policy with this buffer can hit more (min(buffer, rows sampled) "
        f"hits per minibatch, reached by prefetching each minibatch's rows before it, which costs the same rows: "
        f"hit rate is no measure of traffic)"
    )


def _timed_ranks(df: pd.DataFrame) -> tuple[int, int]:
    ranks = df.drop_duplicates(["trace", "rank"])
    return int(ranks["time_fit_ok"].fillna(False).astype(bool).sum()), len(ranks)


def _time_model_lines(rows: pd.DataFrame) -> str:
    """The fetch-time fit per rank and its error on a run it was not fitted to, under a trace's table."""
    if "time_r2" not in rows:
        return ""
    ranks = rows.drop_duplicates("rank").sort_values("rank")
    table = pd.DataFrame(
        {
            "rank": ranks["rank"].astype(int).to_numpy(),
            "fit_r2": [_num(v, "{:.2f}") for v in ranks["time_r2"]],
            "us_per_remote_row": [_num(v * 1e6, "{:.3f}") for v in ranks["time_s_per_remote_row"]],
            "separates_remote_rows": ["yes" if ok else "no" for ok in ranks["time_fit_ok"].fillna(False)],
            "check_run": [a or "-" for a in ranks["time_check_agent"].fillna("")],
            "oos_fetch_error": [_num(v, "{:+.1%}") for v in ranks["time_oos_fetch_error"]],
            "oos_time_error": [_num(v, "{:+.1%}") for v in ranks["time_oos_time_error"]],
            "check_compute_x": [
                _num(v, "{:.2f}")
                for v in ranks.get("time_check_compute_ratio", pd.Series(float("nan"), index=ranks.index))
            ],
        }
    )
    head = (
        "time_vs_none is modelled: recorded sampling + compute, fetch time fitted to the trace per rank, shown "
        "only where the fit separates remote rows. oos: the model's error on a run of the same options with "
        "another agent (check_run), modelled - measured; check_compute_x: that run's compute time per minibatch "
        "over this trace's (far from 1: the runs met different machine load)"
    )
    return "\n" + head + "\n" + table.to_string(index=False)


def _num(value, fmt: str) -> str:
    return "-" if pd.isna(value) else fmt.format(value)


def format_provenance(df: pd.DataFrame) -> str:
    """Per learned agent, trace and rank: what it learned from, by content (empty when no learned agent ran)."""
    if "provenance" not in df:
        return ""
    learned = df[df["provenance"].fillna("").ne("")]
    if learned.empty:
        return ""
    lines = ["== provenance of learned agents (trace ranks matched by content fingerprint, not by name)"]
    for (agent, trace), group in learned.groupby(["agent", "trace"], sort=False):
        by = group.groupby("provenance", sort=False)["rank"].apply(lambda r: ", ".join(str(int(x)) for x in r))
        lines.append(f"{agent:<10} {trace:<28} " + "; ".join(f"{p} (rank {ranks})" for p, ranks in by.items()))
    return "\n".join(lines)


def _fmt(table: pd.DataFrame) -> str:
    cols = [
        c
        for c in (
            "fetched_vs_none",
            "hit_rate",
            "fetched_vs_min",
            "time_vs_none",
            "vs_best_constant",
            "share_of_headroom",
            "error_band",
            "latency_p50_ms",
            "latency_p95_ms",
            "invalid_answers",
            "provenance",
            "remote_fetched",
        )
        if c in table
    ]
    fmt = {
        "fetched_vs_none": "{:.3f}",
        "hit_rate": "{:.1%}",
        "fetched_vs_min": "{:.3f}",
        "time_vs_none": "{:.3f}",
        "vs_best_constant": "{:+.2%}",
        "share_of_headroom": "{:.0%}",
        "error_band": "{:.1%}",
        "latency_p50_ms": "{:.2f}",
        "latency_p95_ms": "{:.2f}",
        "invalid_answers": "{:.0f}",
        "remote_fetched": "{:.0f}",
        "provenance": "{}",
    }
    shown = table[cols].copy()
    for c in cols:
        shown[c] = [("-" if (not isinstance(v, str) and pd.isna(v)) else fmt[c].format(v)) for v in table[c]]
    if "vs_best_constant" in cols and "error_band" in table:
        inside = table["vs_best_constant"].abs() <= table["error_band"]  # NaN band: no tie declared
        shown.loc[inside.fillna(False).to_numpy(), "vs_best_constant"] = "tie"
    return shown.to_string()


ORACLE_STYLE = {"belady": ("k", "--"), "hindsight": ("0.5", ":"), "best-level": ("tab:red", "-.")}
CEILING_LABEL = "hit-rate ceiling (buffer size: min(buffer, rows sampled) per minibatch)"


ORACLE_LABEL = {
    "belady": "Belady MIN",
    "hindsight": "hindsight static (best never-changing buffer)",
    "best-level": "best-level oracle (link-budget levels)",
}


def plot_hit_rate(df: pd.DataFrame, path: str) -> str:
    """Hit rate per decision window over the run, one line per agent (mean over ranks), one panel per trace.

    Belady MIN is not drawn: it minimises rows fetched, and buffers that prefetch can hit more than it does, so it
    is no hit-rate ceiling; the figure says so and draws the ceiling instead (``window_hit_ceiling``: at most
    min(buffer, rows sampled) hits per minibatch, :func:`rudder.baselines.oracles.hit_ceiling`). The hindsight static
    buffer is drawn for what it is, the best
    buffer that never changes."""
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
            if not curves or agent == "belady":
                continue
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            color, style = ORACLE_STYLE.get(agent, (None, "-"))
            ax.plot(np.arange(n), mean, style, color=color, label=ORACLE_LABEL.get(agent, agent), linewidth=1.5)
        ceilings = [
            np.asarray(c, dtype=float)
            for c in rows.drop_duplicates("rank").get("window_hit_ceiling", [])
            if isinstance(c, (list, np.ndarray)) and len(c)
        ]
        if ceilings:
            n = min(len(c) for c in ceilings)
            ax.plot(
                np.arange(n),
                np.mean([c[:n] for c in ceilings], axis=0),
                "-.",
                color="tab:red",
                label=CEILING_LABEL,
                linewidth=1.2,
            )
        ax.set_title(trace, fontsize=10)
        ax.set_xlabel("decision window")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(0, 1.04)  # room for a ceiling at 100%
    axes[0][0].set_ylabel("hit rate (remote rows served by the buffer)")
    axes[0][-1].legend(fontsize=8, loc="best")
    if "belady" in set(df["agent"]):
        fig.text(
            0.5,
            0.005,
            "Belady MIN is not drawn: it bounds rows fetched (traffic.png), not hit rate;\n"
            "buffers that prefetch can hit more than it does, up to the ceiling",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
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
                ax.axhline(
                    table.loc[oracle, "fetched_vs_none"],
                    color=color,
                    linestyle=style,
                    label="Belady MIN" if oracle == "belady" else "hindsight static",
                )
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
