"""``rudder headroom TRACE...``: how much any controller could gain on a trace, before deploying one.

    rudder headroom traces/heldout/*                 # shipped traces, or ones recorded with train.py gnn --trace
    rudder headroom my-run/ --width 8 --csv headroom.csv

Per trace rank and action space (:data:`rudder.baselines.constant.SPACES`: link-budget levels, keep/replace) it
prints the best constant (the one action held throughout that is fastest on that rank), the optimum over action
sequences within the replay model (a *bound* where the search proved it, else a *reference*: a sequence found,
:mod:`rudder.evaluation.bound`), headroom ``1 - bound / best constant``, the share of it the model-predictive
controller captures (``mpc``, link levels; ``(best constant - mpc) / (best constant - bound)``), and the replay
model's out-of-sample error band (from the trace's ``time-check-*.json``): a headroom inside that band is not
resolved. Ranks whose time fit does not separate remote rows are listed without numbers (modelled time there does
not depend on what is fetched).

``--scenario FILE`` replays everything under a scenario of exogenous conditions (:mod:`rudder.env.scenario`) instead
of the recorded link: the figures are synthetic, and the table says so (the error band stays the one measured under
the recorded conditions).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import pandas as pd

from rudder.evaluation.report import HEADROOM_MIN
from rudder.traces import Trace, TraceError
from rudder.traces.timecheck import time_checks

HEADROOM_COLUMNS = (
    "trace",
    "rank",
    "space",
    "best_constant",
    "best_constant_s",
    "bound_s",
    "kind",
    "headroom",
    "mpc_s",
    "mpc_share",
    "error_band",
    "scenario",
    "synthetic",
)


def measure(
    traces: list[str],
    width: int | None = None,
    buffer_fraction: float | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    scenario=None,
) -> pd.DataFrame:
    """One row per trace x rank x action space (:data:`HEADROOM_COLUMNS`); NaN where the rank's time fit does not
    separate remote rows. ``scenario`` (a loaded :class:`~rudder.env.scenario.Scenario`): replayed under it, each row
    naming it (``scenario``) and ``synthetic``; without one, each row names the conditions its run met live where its
    trace recorded them (not synthetic), else none."""
    from rudder.baselines.constant import SPACES, space_of
    from rudder.baselines.mpc import MPC
    from rudder.evaluation.play import play_episode
    from rudder.evaluation.scoring import bound_row, constant_rows, space_env, time_model_columns

    rows = []
    for folder in traces:
        trace = Trace(folder)
        name = os.path.basename(os.path.normpath(folder))
        checks = time_checks(trace, [])
        for rank in trace.ranks:
            for space in SPACES.values():
                env = space_env(trace, rank, space, buffer_fraction, scenario=scenario)
                band = abs(time_model_columns(trace, rank, env.run.time_model, checks)["time_oos_time_error"])
                met = "" if env.scenario is None else env.scenario.name
                row = dict(
                    trace=name,
                    rank=rank,
                    space=space.name,
                    error_band=band,
                    scenario=met,
                    synthetic=scenario is not None,
                )
                if not env.time_model.separates_remote_rows:
                    rows.append(row)
                    continue
                if progress:
                    progress(f"{name} rank {rank} {space.name}: constants")
                fixed = constant_rows(env, space, seed)
                times = [r["time_s"] for r in fixed]
                best = min(range(len(times)), key=times.__getitem__)

                def step(depth: int, depths: int, where=f"{name} rank {rank} {space.name}") -> None:
                    if progress:
                        progress(f"{where}: bound search, window {depth}/{depths}")

                found = bound_row(env, space, fixed, seed=seed, width=width, progress=step)
                row.update(
                    best_constant=space.label(best),
                    best_constant_s=times[best],
                    bound_s=found["time_s"],
                    kind=found["bound_kind"],
                    headroom=1 - found["time_s"] / times[best],
                )
                if space_of("mpc") is space:
                    mpc_s = play_episode(env, MPC(), seed)["time_s"]
                    gap = times[best] - found["time_s"]
                    row.update(mpc_s=mpc_s, mpc_share=(times[best] - mpc_s) / gap if gap > 0 else float("nan"))
                rows.append(row)
    return pd.DataFrame(rows, columns=list(HEADROOM_COLUMNS))


def overall(df: pd.DataFrame) -> pd.DataFrame:
    """Per trace and action space, summed over the ranks measured (and over all traces: trace ``all``)."""
    timed = df[df["bound_s"].notna()]
    parts = []
    for keys, group in [*timed.groupby(["trace", "space"], sort=False), *timed.groupby(["space"], sort=False)]:
        trace, space = keys if len(keys) == 2 else ("all", keys[0])
        const, bound = group["best_constant_s"].sum(), group["bound_s"].sum()
        mpc = group["mpc_s"].sum(min_count=1)
        parts.append(
            dict(
                trace=trace,
                space=space,
                ranks=len(group),
                best_constant_s=const,
                bound_s=bound,
                kind="bound" if (group["kind"] == "bound").all() else "reference",
                headroom=1 - bound / const,
                mpc_share=(const - mpc) / (const - bound) if const > bound else float("nan"),
                error_band=group["error_band"].max(),
            )
        )
    return pd.DataFrame(parts)


def format_table(df: pd.DataFrame) -> str:
    """The per-rank table and the per-trace summary, as printed."""

    def pct(v, fmt="{:.2%}"):
        return "-" if pd.isna(v) else fmt.format(v)

    def secs(v):
        return "-" if pd.isna(v) else f"{v:.3f}"

    shown = pd.DataFrame(
        {
            "trace": df["trace"],
            "rank": df["rank"],
            "space": df["space"],
            "best constant": [
                "(time does not depend on fetches)" if pd.isna(s) else f"{c} {s:.3f}"
                for c, s in zip(df["best_constant"], df["best_constant_s"])
            ],
            "bound or reference": [
                "-" if pd.isna(b) else f"{k} {b:.3f}" for k, b in zip(df["kind"].fillna(""), df["bound_s"])
            ],
            "headroom": [pct(v) for v in df["headroom"]],
            "mpc": [secs(v) for v in df["mpc_s"]],
            "mpc share": [pct(v, "{:.0%}") for v in df["mpc_share"]],
            "error band": [pct(v, "±{:.1%}") for v in df["error_band"]],
        }
    )
    lines = [shown.to_string(index=False)]
    synthetic = df["synthetic"].fillna(False).astype(bool) if "synthetic" in df else pd.Series(False, index=df.index)
    names = [n for n in dict.fromkeys(df.loc[synthetic, "scenario"].fillna("").astype(str)) if n]
    if names:
        lines.insert(
            0,
            f"replayed under scenario {', '.join(names)} (synthetic): the error band is the replay model's error under "
            "the recorded conditions only",
        )
    summary = overall(df)
    if len(summary):
        lines += ["", "per trace (summed over its ranks), and over all traces:"]
        for _, r in summary.iterrows():
            verdict = ""
            if r["headroom"] < HEADROOM_MIN:
                verdict = f"; not discriminating: agents tie a constant here (< {HEADROOM_MIN:.0%})"
            if pd.notna(r["error_band"]) and r["headroom"] <= r["error_band"]:
                verdict += f"; inside the replay model's error band ±{r['error_band']:.1%}"
            lines.append(
                f"  {r['trace']} {r['space']}: headroom {r['headroom']:.2%} ({r['kind']} {r['bound_s']:.3f} s vs best "
                f"constant {r['best_constant_s']:.3f} s, {r['ranks']} ranks), mpc share {pct(r['mpc_share'], '{:.0%}')}"
                f"{verdict}"
            )
    lines += [
        "",
        "bound: the optimum over action sequences within the replay model, proved by the search; reference: the "
        "best sequence the search found, not proved optimal (a policy may beat it); headroom = 1 - bound / best "
        "constant; mpc share = (best constant - mpc) / (best constant - bound); error band: the replay model's "
        "out-of-sample |error| of total time on the trace's time check (- where it has none)",
    ]
    return "\n".join(lines)


def check_traces(traces: list[str]) -> str | None:
    """One line naming the first trace that cannot be read (folder, what is wrong), or None."""

    for folder in traces:
        if not os.path.isdir(folder):
            return f"{folder}: no such trace folder"
        try:
            Trace(folder)
        except (TraceError, ValueError, OSError, KeyError) as exc:
            return f"{folder}: {exc}"
    return None


def main(argv=None, prog: str = "rudder headroom") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace folders (shipped or recorded with --trace)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="nodes the bound search keeps per window (default: each action space's search_width, 6 for "
        "link levels, 24 for keep/replace)",
    )
    p.add_argument("--buffer-fraction", type=float, default=None, help="buffer size (default: the recorded run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scenario",
        default=None,
        metavar="FILE",
        help="replay under this scenario of exogenous conditions (rudder.env.scenario; bench/scenarios/): synthetic",
    )
    p.add_argument("--csv", default=None, help="also write the per-rank rows here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.width is not None and args.width < 1:
        print(f"{prog}: error: --width must be >= 1, got {args.width}", file=sys.stderr)
        return 2
    bad = check_traces(args.traces)
    if bad:
        print(f"{prog}: error: {bad}", file=sys.stderr)
        return 2
    from rudder.evaluation.scoring import load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ValueError as exc:  # a ScenarioError: file, field, expected, got
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        print(
            f"\r[headroom] {text}\033[K" if tty else f"[headroom] {text}",
            end="" if tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    try:
        df = measure(
            args.traces,
            args.width,
            args.buffer_fraction,
            args.seed,
            None if args.no_progress else progress,
            scenario=scenario,
        )
    except (ValueError, OSError) as exc:  # e.g. a rank whose chunks cannot be read
        print(f"\n{prog}: error: {exc}" if tty else f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if tty and not args.no_progress:
        print(file=sys.stderr)
    print(format_table(df))
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
