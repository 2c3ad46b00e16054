"""The headroom map: where prefetching decisions matter, in replay, over workloads, exogenous conditions and action
spaces.

One *cell* is a trace rank replayed with a buffer fraction, a feature width, a scenario (exogenous conditions,
:mod:`rudder.env.scenario`; files in ``bench/scenarios/``) and an action space
(:mod:`rudder.env.action_spaces`). Per cell:

- **best constant**: every action held throughout, each replayed to the end; the fastest (modelled seconds).
- **reference**: the best action sequence found by a rollout search over snapshot/restore: at every decision each
  action is tried from the same state, followed by the best constant for ``horizon - 1`` windows, and the action
  whose rollout ends soonest is played (ties: the best constant's). The better of that sequence and the best
  constant. It is a sequence that exists, so ``headroom`` is a lower bound on what an agent that knew the future
  could gain over the best constant; it is not a bound on the optimum (none is proven here).
- **headroom** = ``1 - reference / best constant``.

Times are replay-modelled seconds (the trace's fitted fetch model, under the scenario's timeline); every row says
which scenario it ran under (``synthetic`` is True unless the scenario is ``stationary``).

    python -m rudder.bench --only headroom-map          # the whole map, resumed from bench/results/headroom_map.csv
    python -m rudder.bench.headroom_map --cells 20      # the next 20 missing cells (to run the sweep in pieces)
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from itertools import product

import numpy as np
import pandas as pd
from rudder.traces import TraceWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIO_DIR = os.path.join(ROOT, "bench", "scenarios")
OUT_DIR = os.path.join(ROOT, "bench", "results")
CSV = os.path.join(OUT_DIR, "headroom_map.csv")
RECORDED = os.path.join(ROOT, "traces", "samples", "emu2-metis2-f10x25-400mbit")
HORIZON = 2  # windows a rollout looks ahead (the tried action, then the best constant)
THRESHOLDS = (0.05, 0.10)  # headroom marked in the summary

# Workloads. "recorded": rank 0 of a trace recorded live on 2 emulated hosts at 400mbit (real reuse, the lookahead
# from seeds and partition structure, 4 minibatches sampled ahead). Constructed ones (synthetic,
# :func:`constructed_trace`), pulls costing as much per minibatch as the recorded trace's (0.12 s of link time at
# the recorded rate), the whole epoch sampled ahead (exact knowledge of what is needed): "stream" (every row needed
# once: only prefetch can hide a pull) and "mixed" (half of each minibatch from a hot set ten minibatches wide),
# 3000 rows per minibatch (a background chunk of 2048 rows is 0.7 of a minibatch's demand, as in the recorded
# trace); "-coarse": 300 wider rows per minibatch (one chunk is 7 minibatches' demand: a demand pull waiting behind
# a chunk in progress waits for several minibatches' worth).
WORKLOADS = ("recorded", "stream", "mixed", "stream-coarse", "mixed-coarse")
CONSTRUCTED = {"stream": (3000, 4e-5), "mixed": (3000, 4e-5), "stream-coarse": (300, 4e-4), "mixed-coarse": (300, 4e-4)}
BUFFERS = (0.05, 0.25, 0.5)
FEATURE_BYTES = (1.0, 4.0)  # rows as recorded, and 4 times as wide (a quarter of the link budget in rows)
MAIN_SCENARIOS = ("stationary", "square-8x-2s", "square-8x-6s", "cotenant-90")
MAIN_SPACES = ("levels", "stockup")
SIDE = [  # (workload, buffer, feature_bytes_factor, scenario, space) on the recorded trace
    *[("recorded", b, 1.0, s, "keep-replace") for b in (0.05, 0.25) for s in ("stationary", "square-8x-2s")],
    *[("recorded", 0.25, 1.0, s, "threshold") for s in ("stationary", "square-8x-2s")],
    *[("recorded", 0.5, 4.0, s, "cancel") for s in ("square-8x-2s", "square-8x-6s")],
    *[("recorded", 0.5, 4.0, s, "horizon") for s in ("stationary", "square-8x-2s", "square-8x-6s")],
    *[("recorded", 0.5, 4.0, s, "stockup-horizon") for s in ("stationary", "square-8x-2s", "square-8x-6s")],
    *[
        ("recorded", 0.5, 4.0, s, a)
        for s in ("markov-8x", "drift-8x", "straggler-2x-square")
        for a in ("levels", "stockup", "cancel")
    ],
]
# how far ahead the minibatches are known exactly, against each workload's own setting ("trace": 4 minibatches
# recorded, the whole epoch constructed): (workload, buffer, feature_bytes_factor, scenario, space, sample_ahead)
KNOWLEDGE = [
    *[
        ("recorded", b, f, s, "stockup", "epoch")
        for b in (0.25, 0.5)
        for f in FEATURE_BYTES
        for s in MAIN_SCENARIOS[:2]
    ],
    *[(w, b, 1.0, s, "stockup", "4") for w in WORKLOADS[1:] for b in (0.25, 0.5) for s in MAIN_SCENARIOS[:3]],
]


def scenarios() -> dict:
    """The scenario files of ``bench/scenarios/``, by name."""
    from rudder.env.scenario import Scenario

    out = {}
    for path in sorted(
        glob.glob(os.path.join(SCENARIO_DIR, "*.json")) + glob.glob(os.path.join(SCENARIO_DIR, "*.yaml"))
    ):
        s = Scenario.load(path)
        out[s.name] = s
    return out


def cells() -> list[dict]:
    """Every cell of the map, cheap ones first: the constructed workloads, the recorded grid, the side rows."""
    fine = [(w, b, 1.0, s, "stockup") for w in WORKLOADS[1:3] for b, s in product(BUFFERS, MAIN_SCENARIOS)]
    coarse = [(w, b, 1.0, s, a) for w in WORKLOADS[3:] for b, s, a in product(BUFFERS, MAIN_SCENARIOS, MAIN_SPACES)]
    recorded = [
        ("recorded", b, f, s, a) for a, b, f, s in product(MAIN_SPACES[::-1], BUFFERS, FEATURE_BYTES, MAIN_SCENARIOS)
    ]
    # stock-up first (its levels include today's), then how far ahead is known, the other spaces, today's levels
    keys = ("workload", "buffer_fraction", "feature_bytes_factor", "scenario", "space", "sample_ahead")
    order = [(*c, "trace") for c in coarse + fine] + KNOWLEDGE[8:] + [(*c, "trace") for c in recorded[:24]]
    order += KNOWLEDGE[:8] + [(*c, "trace") for c in SIDE + recorded[24:]]
    return [dict(zip(keys, c)) for c in order]


def constructed_trace(workload: str, directory: str | None = None, minibatches: int = 48) -> str:
    """Write (once) and return the one-rank synthetic trace of ``workload`` (one of :data:`CONSTRUCTED`, see
    :data:`WORKLOADS`): seeded, the same every time."""
    rows, row_s = CONSTRUCTED[workload]
    name = f"{workload.split('-')[0]}-{rows}x{row_s:g}-{minibatches}"  # its parameters: a cached copy is this one

    directory = directory or os.path.join(tempfile.gettempdir(), "rudder-headroom-map", name)
    if os.path.exists(os.path.join(directory, "rank0", "rank.json")):
        return directory
    rng = np.random.default_rng(0)
    fresh = iter(range(10 * rows, 10**9))
    ids = []
    for _ in range(minibatches):
        hot = (
            rng.choice(10 * rows, size=rows // 2, replace=False)
            if workload.startswith("mixed")
            else np.zeros(0, np.int64)
        )
        new = np.fromiter((next(fresh) for _ in range(rows - hot.size)), np.int64)
        ids.append(np.concatenate([hot, new]).astype(np.int64))
    halo = np.unique(np.concatenate(ids))
    run = dict(
        graph=f"constructed-{workload}", parts=2, fanout="10,25", batch_size=10, buffer_fraction=0.25,
        buffer_init="empty", alpha=0.05, period=4, admit_on_miss=False, candidates=16, prefetch="background",
        sample_ahead="epoch",
    )  # fmt: skip
    static = dict(halo_ids=halo, halo_degree=np.ones(halo.size, np.float32), initial_ids=np.zeros(0, np.int64))
    writer = TraceWriter(directory, 0, 1, dict(config=run), dict(num_nodes=int(halo.max()) + 1), static, overwrite=True)
    for i, x in enumerate(ids):
        writer.add_minibatch(
            minibatch=i, epoch=0, remote_ids=x, local_rows=60, sample_s=0.01, fetch_s=0.002 + row_s * x.size,
            compute_s=0.2, fetch_rows=60 + x.size, hits=0, remote_fetched=x.size, prefetched=0, arrived=0,
            stall_s=0.0,
        )  # fmt: skip
    writer.close()
    return directory


def _restore(env, state) -> None:
    base_state, infos = state
    env.unwrapped.restore(base_state)
    w = env
    for info in infos:
        if info is not None:
            w._info = info
        w = w.env


def _snapshot(env):
    infos, w = [], env
    while hasattr(w, "env"):
        infos.append(getattr(w, "_info", None))
        w = w.env
    return env.unwrapped.snapshot(), infos


def play(env, actions) -> tuple[float, float]:
    """Modelled seconds of the whole episode from the reset state, playing ``actions(window)``, and of them the
    seconds spent fetching (demand pulls and stalls behind prefetch chunks)."""
    env.reset(seed=0)
    done, w, fetch_s = False, 0, 0.0
    while not done:
        _, _, done, _, info = env.step(actions(w))
        fetch_s += info["window"]["fetch_s"]
        w += 1
    return env.unwrapped.clock_s, fetch_s


def best_constant(env) -> tuple[int, float, list[float]]:
    """The action held throughout that ends soonest: ``(action, seconds, seconds of every action)``."""
    secs = [play(env, lambda w, a=a: a)[0] for a in range(env.action_space.n)]
    best = int(np.argmin(secs))
    return best, secs[best], secs


def rollout(env, base: int, horizon: int = HORIZON) -> tuple[float, list[int]]:
    """The rollout search's sequence (see the module docstring): its modelled seconds and actions."""
    env.reset(seed=0)
    n, chosen, done = env.action_space.n, [], False
    while not done:
        start = _snapshot(env)
        ends = []
        for a in range(n):
            _restore(env, start)
            over = False
            for h in range(horizon):
                _, _, over, _, _ = env.step(a if h == 0 else base)
                if over:
                    break
            ends.append(env.unwrapped.clock_s)
        ends = np.asarray(ends)
        best = base if ends[base] <= ends.min() else int(np.argmin(ends))
        _restore(env, start)
        _, _, done, _, _ = env.step(best)
        chosen.append(best)
    return env.unwrapped.clock_s, chosen


def measure_cell(cell: dict, rank: int = 0, horizon: int = HORIZON, scen=None) -> dict:
    from dataclasses import replace

    from rudder.env.action_spaces import make

    scen = scen if scen is not None else scenarios()
    scenario = replace(scen[cell["scenario"]], feature_bytes_factor=cell["feature_bytes_factor"])
    t0 = time.perf_counter()
    if cell["workload"] == "recorded":
        trace, extra = RECORDED, {}
    else:
        trace = constructed_trace(cell["workload"])
        extra = dict(sampled_only=True, buffer_init="empty")
    if cell["sample_ahead"] != "trace":
        extra["sample_ahead"] = cell["sample_ahead"] if cell["sample_ahead"] == "epoch" else int(cell["sample_ahead"])
    env = make(cell["space"], trace, rank, scenario=scenario, buffer_fraction=cell["buffer_fraction"], **extra)
    a, const_s, secs = best_constant(env)
    _, const_fetch_s = play(env, lambda w: a)
    ref_s, chosen = rollout(env, a, horizon)
    reference = min(ref_s, const_s)
    return dict(
        **cell,
        trace=os.path.basename(trace) if cell["workload"] == "recorded" else f"constructed-{cell['workload']}",
        rank=rank,
        synthetic=cell["scenario"] != "stationary" or cell["workload"] != "recorded",
        actions=int(env.action_space.n),
        best_constant=a,
        best_constant_s=const_s,
        worst_constant_s=max(secs),
        rollout_s=ref_s,
        reference_s=reference,
        headroom=1.0 - reference / const_s,
        # the best constant's fetch seconds over its run time: what no prefetch decision can save more of
        fetch_share=const_fetch_s / const_s,
        switches=int(np.count_nonzero(np.diff(chosen))) if len(chosen) > 1 else 0,
        off_constant=float(np.mean(np.asarray(chosen) != a)),
        horizon=horizon,
        wall_s=time.perf_counter() - t0,
    )


def _key(row) -> tuple:
    keys = ("workload", "buffer_fraction", "feature_bytes_factor", "scenario", "space", "sample_ahead")
    return tuple(str(row[k]) for k in keys)


def measure(max_cells: int | None = None, progress=print, workloads=WORKLOADS) -> pd.DataFrame:
    """Measure the cells of ``workloads`` not yet in :data:`CSV` (at most ``max_cells``), appending each as it is
    done; returns the whole table."""
    os.makedirs(OUT_DIR, exist_ok=True)
    done = pd.read_csv(CSV, dtype={"sample_ahead": str}) if os.path.exists(CSV) else pd.DataFrame()
    have = {_key(r) for _, r in done.iterrows()}
    todo = [c for c in cells() if _key(c) not in have and c["workload"] in workloads][:max_cells]
    scen = scenarios()
    for i, cell in enumerate(todo):
        row = measure_cell(cell, scen=scen)
        pd.DataFrame([row]).to_csv(CSV, mode="a", header=not os.path.exists(CSV), index=False)
        progress(
            f"[headroom-map] {i + 1}/{len(todo)} {cell['workload']:>13} {cell['space']:>15} "
            f"ahead {cell['sample_ahead']:>5} {cell['scenario']:>19} "
            f"buf {cell['buffer_fraction']:g} fb {cell['feature_bytes_factor']:g}: "
            f"headroom {row['headroom']:.2%} ({row['wall_s']:.0f} s)"
        )
    return pd.read_csv(CSV, dtype={"sample_ahead": str})


PANELS = [  # (workload, space, feature_bytes_factor) of the heatmaps, those measured drawn
    *[("recorded", a, f) for a in MAIN_SPACES[::-1] for f in FEATURE_BYTES],
    *[(w, "stockup", 1.0) for w in WORKLOADS[1:3]],
    *[(w, a, 1.0) for w in WORKLOADS[3:] for a in MAIN_SPACES[::-1]],
]


def plot(df: pd.DataFrame, path: str) -> None:
    """Heatmaps of headroom (%): scenario x buffer fraction, one per workload, action space and feature width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = df[df["space"].isin(MAIN_SPACES) & df["scenario"].isin(MAIN_SCENARIOS) & (df["sample_ahead"] == "trace")]
    tables = []
    for workload, space, fb in PANELS:
        t = main[(main["workload"] == workload) & (main["space"] == space) & (main["feature_bytes_factor"] == fb)]
        t = t.pivot_table(index="scenario", columns="buffer_fraction", values="headroom")
        if not t.empty:
            tables.append(((workload, space, fb), t.reindex(index=[s for s in MAIN_SCENARIOS if s in t.index])))
    vmax = max(10.0, 100 * float(main["headroom"].max()))
    cols = 4
    rows = -(-len(tables) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(tables) :]:
        ax.set_axis_off()
    for ax, ((workload, space, fb), t) in zip(axes.flat, tables):
        im = ax.imshow(100 * t.to_numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(t.shape[1]), [f"{c:g}" for c in t.columns])
        ax.set_yticks(range(t.shape[0]), t.index, fontsize=8)
        ax.set_xlabel("buffer fraction of halo", fontsize=8)
        ax.set_title(f"{workload}: {space}" + (f", rows x{fb:g}" if fb != 1.0 else ""), fontsize=9)
        for (r, c), v in np.ndenumerate(100 * t.to_numpy()):
            ax.text(c, r, f"{v:.1f}", ha="center", va="center", color="w" if v < vmax / 2 else "k", fontsize=8)
    fig.tight_layout()
    fig.colorbar(im, ax=axes, label="headroom over the best constant (%)", shrink=0.8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Counts of cells over each threshold, headroom per workload and space, and the cells with the most."""
    over = {t: df[df["headroom"] >= t] for t in THRESHOLDS}
    lines = [
        f"{len(df)} cells, replay-modelled seconds, rollout horizon {int(df['horizon'].iloc[0])} windows. Headroom = "
        "1 - reference / best constant; the reference is the best action sequence the rollout search found (one "
        "that exists: hindsight gains at least this much; not a proven bound). `fetch_share`: the best constant's "
        "fetch seconds over its run time, the most any decision could save.",
        "",
        f"- cells with headroom >= 5%: {len(over[0.05])}; >= 10%: {len(over[0.10])} (of {len(df)}).",
    ]
    for (workload, space), g in df.groupby(["workload", "space"], sort=False):
        best = g.loc[g["headroom"].idxmax()]
        lines.append(
            f"- {workload}, {space}: max {g['headroom'].max():.2%} ({best['scenario']}, buffer "
            f"{best['buffer_fraction']:g}, rows x{best['feature_bytes_factor']:g}), mean {g['headroom'].mean():.2%}, "
            f"over {len(g)} cells; fetch share {g['fetch_share'].min():.0%}-{g['fetch_share'].max():.0%}"
        )
    lines += ["", "Where it lives, from these cells:"]
    varying = df["scenario"] != "stationary"
    lines.append(
        f"- stationary link: max {df.loc[~varying, 'headroom'].max():.2%} over {int((~varying).sum())} cells; "
        f"time-varying: max {df.loc[varying, 'headroom'].max():.2%}, "
        f"{int((df.loc[varying, 'headroom'] >= 0.05).sum())} of {int(varying.sum())} cells >= 5%."
    )
    for workload, g in df.groupby("workload", sort=False):
        small = g[g["buffer_fraction"] == min(BUFFERS)]
        lines.append(
            f"- {workload}: max {g['headroom'].max():.2%}; at buffer {min(BUFFERS):g} max "
            f"{small['headroom'].max():.2%}; the best constant's fetch share {g['fetch_share'].median():.0%} "
            "median (no headroom can exceed it)."
        )
    both = df[df["space"].isin(("levels", "stockup")) & (df["sample_ahead"] == "trace")].pivot_table(
        index=["workload", "buffer_fraction", "feature_bytes_factor", "scenario"], columns="space", values="headroom"
    )
    if {"levels", "stockup"} <= set(both.columns):
        gain = (both["stockup"] - both["levels"]).dropna()
        lines.append(
            f"- stock-up levels over today's levels (same cell): more headroom by >= 2 points in "
            f"{int((gain >= 0.02).sum())} of {len(gain)} cells, at most {gain.max():+.2%} "
            f"({', '.join(map(str, gain.idxmax()))})."
        )
    stock = df[df["space"] == "stockup"].pivot_table(
        index=["workload", "buffer_fraction", "feature_bytes_factor", "scenario"],
        columns="sample_ahead",
        values="headroom",
    )
    for other in [c for c in stock.columns if c != "trace"]:
        pair = stock[["trace", other]].dropna()
        for workload, g in pair.groupby(level="workload", sort=False):
            lines.append(
                f"- {workload}, stockup, minibatches known ahead {other} instead of the workload's own: headroom "
                f"{g[other].mean():.2%} mean, max {g[other].max():.2%} (own setting: {g['trace'].mean():.2%}, max "
                f"{g['trace'].max():.2%}) over {len(g)} cells."
            )
    own = df[(df["space"] == "stockup") & (df["sample_ahead"] == "trace")].set_index(
        ["workload", "buffer_fraction", "feature_bytes_factor", "scenario"]
    )["headroom"]
    for fine in ("stream", "mixed"):
        if fine in own.index.get_level_values(0) and f"{fine}-coarse" in own.index.get_level_values(0):
            pair = pd.concat([own.loc[fine], own.loc[f"{fine}-coarse"]], axis=1, keys=["fine", "coarse"]).dropna()
            lines.append(
                f"- {fine}, stockup, chunks of 0.7 minibatch's demand vs 7 minibatches' (coarse): headroom "
                f"{pair['fine'].mean():.2%} vs {pair['coarse'].mean():.2%} mean over {len(pair)} cells."
            )
    lines += [
        "",
        "Why, by construction of these cells: the rest of a run's time (sampling, compute) is fixed, so headroom can "
        "be no larger than the best constant's fetch share; with the link stationary one level suits every window; "
        "a small buffer leaves nothing to stock up; the stock-up levels differ from today's only where one window's "
        "link budget is below the buffer; and stocking up pays only for rows known to be needed, so what the "
        "minibatches sampled ahead reveal decides how much of a fast phase can be spent for a slow one. Chunks much "
        "larger than a minibatch's demand add a second lever: a demand pull waits behind the chunk in progress, so "
        "when to queue matters as well as what.",
    ]
    shown = over[0.05] if len(over[0.05]) >= 5 else df.sort_values("headroom", ascending=False).head(10)
    cols = ["workload", "space", "sample_ahead", "scenario", "buffer_fraction", "feature_bytes_factor", "best_constant"]
    table = shown.sort_values("headroom", ascending=False)[
        cols + ["best_constant_s", "reference_s", "headroom", "fetch_share", "switches"]
    ]
    return "\n".join(lines), table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.headroom_map", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=None, help="measure at most this many missing cells, then stop")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    args = p.parse_args(argv)
    df = measure(args.cells, workloads=args.workloads.split(","))
    print(f"{len(df)} of {len(cells())} cells in {CSV}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
