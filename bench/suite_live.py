"""The scenario suite confirmed live: agents run as real jobs under a held-out family's scenario, interleaved and
repeated, their training wall times compared (``python -m rudder.bench.suite_live SCENARIO [--reps 3]``).

Each arm is ``train.py gnn`` with the suite's run options (:data:`rudder.bench.suite.RUN`), ``--scenario`` and its
agent; the scenario plays from each run's first minibatch, so every repetition meets the same timeline. Writes
``bench/results/suite_live.csv`` (arm, rep, training seconds: the slowest trainer's first minibatch to its last).

``--bound`` confirms replay's headroom live instead (``python -m rudder.bench.suite_live --bound SCENARIO...``): on
the family's held-out trace, the link-level bound search (:func:`rudder.evaluation.scoring.bound_row`) finds the
fastest level sequence within the replay model, each rank's sequence is exported as decisions
(:func:`rudder.bench.suite.decisions_trace`) and played live with ``--decisions-from`` beside constant levels held
throughout, interleaved, and beside them the last of those levels exported and played back the same way (the
control: it costs what the level agent costs unless the playback path itself does). The search runs even where
the replay fit explains less than the gate (:data:`rudder.env.timing.MIN_R2`) of the fetch time, where evaluation
prints no time oracle: the live runs are then what says whether the sequence is worth anything, and the rows keep
the fit's R² (``fit_r2_min``) beside replay's modelled seconds of each arm (``replay_s``: the slowest rank's).
Writes ``bench/results/suite_bound.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
from rudder.bench.suite import POLICY, ROOT, RUN, decisions_trace

OUT = os.path.join(ROOT, "bench", "results", "suite_live.csv")
BOUND_OUT = os.path.join(ROOT, "bench", "results", "suite_bound.csv")
CONSTANTS = (0.0, 0.125)  # played beside the bound: the best levels held throughout live (suite_live.csv)
ARMS = {
    "level-0": ["--agent", "level", "--agent-kwargs", "level=0"],
    "level-0.125": ["--agent", "level", "--agent-kwargs", "level=0.125"],
    "level-1": ["--agent", "level", "--agent-kwargs", "level=1"],
    "mpc": ["--agent", "mpc"],
    "ppo-link-suite": ["--agent", "ppo-link", "--agent-kwargs", f"path={POLICY}"],
}


def measure(scenario: str, reps: int = 3, arms: dict = ARMS) -> pd.DataFrame:
    work = tempfile.mkdtemp(prefix="rudder-suite-live-")
    rows = []
    for rep in range(reps):
        for arm, extra in arms.items():
            summary = os.path.join(work, f"{arm}-{rep}.json")
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "gnn", *RUN, "--scenario", scenario, *extra]
            proc = subprocess.run([*cmd, "--summary", summary], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} rep {rep}: {proc.stderr.strip().splitlines()[-1:]}")
            with open(summary) as f:
                ranks = json.load(f)["ranks"]
            seconds = max(r["train_end_unix"] for r in ranks) - min(r["train_start_unix"] for r in ranks)
            print(f"[suite-live] {os.path.basename(scenario)} rep {rep} {arm}: {seconds:.2f} s", flush=True)
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())  # UTC: rows of other runs may share the file
            rows.append(dict(scenario=os.path.basename(scenario), arm=arm, rep=rep, train_s=seconds, run_utc=when))
    return pd.DataFrame(rows)


def replay_bound(trace: str, constants=CONSTANTS) -> tuple[dict[int, str], dict[str, float], float]:
    """The link-level bound search on every rank of ``trace`` within the replay model, past the fit's gate.

    Returns each rank's sequence (labels, as ``bound_actions`` writes them), replay's modelled seconds of each arm
    (``bound`` and ``level-L`` for each of ``constants``: the slowest rank's, as a live run's time is the slowest
    trainer's) and the lowest R² of the ranks' fits."""
    from rudder.baselines.constant import SPACES
    from rudder.traces import Trace

    from rudder.evaluation.scoring import bound_row, constant_rows, space_env

    space, src = SPACES["link-levels"], Trace(trace)
    labels = [space.label(a).split()[-1] for a in range(len(space.actions))]
    sequences, modelled, r2 = {}, {}, []
    for rank in src.ranks:
        env = space_env(src, rank, space)
        r2.append(env.time_model.r2)
        fixed = constant_rows(env, space)
        found = bound_row(env, space, fixed)
        sequences[rank] = found["bound_actions"]
        per_arm = {"bound": found["time_s"]}
        for level in constants:
            per_arm[f"level-{level:g}"] = fixed[labels.index(f"{level:g}")]["time_s"]
        for arm, t in per_arm.items():
            modelled[arm] = max(modelled.get(arm, 0.0), t)
        print(f"[suite-bound] {os.path.basename(os.path.normpath(trace))} rank {rank}: {found['bound_actions']}")
    return sequences, modelled, float(min(r2))


def confirm_bound(scenario: str, reps: int = 3, constants=CONSTANTS) -> pd.DataFrame:
    """:func:`replay_bound` on the held-out trace recorded under ``scenario``, its sequences played live against
    ``constants`` held throughout (:func:`measure`, arms interleaved); rows carry ``replay_s`` and ``fit_r2_min``."""
    from rudder.bench.suite import trace_dir

    trace = trace_dir("heldout", dict(name=os.path.splitext(os.path.basename(scenario))[0]))
    if not os.path.isdir(trace):
        raise SystemExit(f"{scenario}: no held-out suite trace {trace} recorded under it")
    sequences, modelled, r2 = replay_bound(trace, constants)
    work = tempfile.mkdtemp(prefix="rudder-suite-bound-")
    windows = len(next(iter(sequences.values())).split())
    control = f"{constants[-1]:g}"  # a constant played the bound's way: what the playback path itself costs
    held = {rank: " ".join([control] * windows) for rank in sequences}
    arms = {
        "bound": ["--agent", "recorded", "--decisions-from", decisions_trace(trace, sequences, f"{work}/bound")],
        f"level-{control} as decisions": [
            "--agent", "recorded", "--decisions-from", decisions_trace(trace, held, f"{work}/held"),
        ],
    }  # fmt: skip
    arms.update({f"level-{c:g}": ["--agent", "level", "--agent-kwargs", f"level={c:g}"] for c in constants})
    modelled[f"level-{control} as decisions"] = modelled[f"level-{control}"]
    df = measure(scenario, reps, arms)
    return df.assign(replay_s=df["arm"].map(modelled), fit_r2_min=r2)


def plot(path: str = os.path.join(ROOT, "bench", "results", "suite_live.png")) -> str | None:
    """Each held-out family's live training seconds per arm (median, bar; every repetition, dots): the agents'
    runs (``suite_live.csv``) beside the bound's confirmation (``suite_bound.csv``, its constants marked
    ``(bound run)``), each set of runs with its own best constant level as a line (they ran at different times), as
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = []
    if os.path.isfile(OUT):
        live = pd.read_csv(OUT)
        if "run_utc" in live:  # arms of a family measured on another day than the rest are marked with it
            day = live["run_utc"].astype(str).str[:10]
            latest = day.groupby(live["scenario"]).transform("max")
            live["arm"] = [a if d == m else f"{a} ({d})" for a, d, m in zip(live["arm"], day, latest)]
        parts.append(live)
    if os.path.isfile(BOUND_OUT):
        b = pd.read_csv(BOUND_OUT)
        parts.append(b.assign(arm=[a if a == "bound" else f"{a} (bound run)" for a in b["arm"]]))
    if not parts:
        return None
    df = pd.concat(parts)
    families = list(dict.fromkeys(df["scenario"]))
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.2), squeeze=False)
    for ax, family in zip(axes[0], families):
        g = df[df["scenario"] == family]
        arms = list(dict.fromkeys(g["arm"]))
        med = [g[g["arm"] == a]["train_s"].median() for a in arms]
        bests = {
            run: min(
                (m for a, m in zip(arms, med) if a.startswith("level-") and a.endswith("(bound run)") == b),
                default=None,
            )
            for run, b in (("agents", False), ("bound", True))
        }
        colours = ["tab:red" if a == "bound" else "tab:gray" if a.startswith("level-") else "tab:blue" for a in arms]
        ax.barh(range(len(arms)), med, color=colours, alpha=0.6)
        for i, a in enumerate(arms):
            ax.plot(g[g["arm"] == a]["train_s"], [i] * int((g["arm"] == a).sum()), "k.", ms=5)
        for run, style in (("agents", dict(color="k", ls="--")), ("bound", dict(color="tab:red", ls=":"))):
            if bests[run] is not None:
                ax.axvline(bests[run], lw=0.9, **style)
        ax.set_yticks(range(len(arms)), arms, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(
            "training seconds, live; best constant of the same runs:\nagents' runs dashed, bound's runs dotted"
        )
        ax.set_title(f"held out: {os.path.splitext(family)[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.suite_live", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", nargs="+", help="scenario files (traces/suite/scenarios/*.json)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bound", action="store_true", help="play replay's bound sequence live against constant levels")
    p.add_argument("--arms", help=f"comma-separated, of {', '.join(ARMS)} (default: all)")
    args = p.parse_args(argv)
    arms = ARMS
    if args.arms:
        unknown = sorted(set(args.arms.split(",")) - set(ARMS))
        if unknown:
            p.error(f"--arms: unknown {', '.join(unknown)}: expected some of {', '.join(ARMS)}")
        arms = {a: ARMS[a] for a in args.arms.split(",")}
    if args.bound:
        df = pd.concat([confirm_bound(s, args.reps) for s in args.scenario])
        if os.path.isfile(BOUND_OUT):  # other scenarios' rows stay
            old = pd.read_csv(BOUND_OUT)
            df = pd.concat([old[~old["scenario"].isin(df["scenario"])], df])
        df.to_csv(BOUND_OUT, index=False)
        table = df.groupby(["scenario", "arm"])[["train_s", "replay_s"]].agg(["median", "min", "max"])
        print(table.round(2).to_string())
        print(f"plot: {plot()}")
        return 0
    df = pd.concat([measure(s, args.reps, arms) for s in args.scenario])
    old = pd.read_csv(OUT) if os.path.isfile(OUT) else None
    if old is not None:  # the rows of other scenarios and arms stay
        df = pd.concat([old[~(old["scenario"].isin(df["scenario"]) & old["arm"].isin(df["arm"]))], df])
    df.to_csv(OUT, index=False)
    print(df.groupby(["scenario", "arm"])["train_s"].agg(["median", "min", "max"]).round(2).to_string())
    print(f"plot: {plot()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
