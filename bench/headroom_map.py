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
import time
from itertools import product

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIO_DIR = os.path.join(ROOT, "bench", "scenarios")
OUT_DIR = os.path.join(ROOT, "bench", "results")
CSV = os.path.join(OUT_DIR, "headroom_map.csv")
TRACE = os.path.join(ROOT, "traces", "samples", "emu2-metis2-f10x25-400mbit")
HORIZON = 2  # windows a rollout looks ahead (the tried action, then the best constant)
THRESHOLDS = (0.05, 0.10)  # headroom marked in the summary

# the grid: buffer fraction x feature width x scenario x {levels, stockup}, and side rows for the other spaces
BUFFERS = (0.05, 0.25, 0.5)
FEATURE_BYTES = (1.0, 4.0)  # rows as recorded, and 4 times as wide (a quarter of the link budget in rows)
MAIN_SCENARIOS = ("stationary", "square-8x-2s", "square-8x-6s", "cotenant-90")
MAIN_SPACES = ("levels", "stockup")
SIDE = [  # (buffer, feature_bytes_factor, scenario, space)
    *[(b, 1.0, s, "keep-replace") for b in BUFFERS for s in ("stationary", "square-8x-2s")],
    *[(0.25, 1.0, s, "threshold") for s in ("stationary", "square-8x-2s")],
    *[(0.25, 4.0, s, "cancel") for s in ("square-8x-2s", "square-8x-6s")],
    *[(0.25, 4.0, s, "horizon") for s in ("stationary", "square-8x-2s", "square-8x-6s")],
    *[(0.25, 4.0, s, a) for s in ("markov-8x", "drift-8x", "straggler-2x-square") for a in ("levels", "stockup")],
    *[(b, 4.0, s, "stockup-horizon") for b in (0.25, 0.5) for s in ("stationary", "square-8x-2s", "square-8x-6s")],
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
    grid = list(product(BUFFERS, FEATURE_BYTES, MAIN_SCENARIOS, MAIN_SPACES))
    return [dict(buffer_fraction=b, feature_bytes_factor=f, scenario=s, space=a) for b, f, s, a in grid + SIDE]


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


def measure_cell(cell: dict, trace: str = TRACE, rank: int = 0, horizon: int = HORIZON, scen=None) -> dict:
    from dataclasses import replace

    from rudder.env.action_spaces import make

    scen = scen if scen is not None else scenarios()
    scenario = replace(scen[cell["scenario"]], feature_bytes_factor=cell["feature_bytes_factor"])
    t0 = time.perf_counter()
    env = make(cell["space"], trace, rank, scenario=scenario, buffer_fraction=cell["buffer_fraction"])
    a, const_s, secs = best_constant(env)
    _, const_fetch_s = play(env, lambda w: a)
    ref_s, chosen = rollout(env, a, horizon)
    reference = min(ref_s, const_s)
    return dict(
        trace=os.path.basename(trace),
        rank=rank,
        **cell,
        synthetic=cell["scenario"] != "stationary",
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
    return (row["buffer_fraction"], row["feature_bytes_factor"], row["scenario"], row["space"])


def measure(max_cells: int | None = None, progress=print) -> pd.DataFrame:
    """Measure the cells not yet in :data:`CSV` (at most ``max_cells``), appending each as it is done; returns
    the whole table."""
    os.makedirs(OUT_DIR, exist_ok=True)
    done = pd.read_csv(CSV) if os.path.exists(CSV) else pd.DataFrame()
    have = {_key(r) for _, r in done.iterrows()}
    todo = [c for c in cells() if _key(c) not in have][:max_cells]
    scen = scenarios()
    for i, cell in enumerate(todo):
        row = measure_cell(cell, scen=scen)
        pd.DataFrame([row]).to_csv(CSV, mode="a", header=not os.path.exists(CSV), index=False)
        progress(
            f"[headroom-map] {i + 1}/{len(todo)} {cell['space']:>12} {cell['scenario']:>20} "
            f"buf {cell['buffer_fraction']:g} fb {cell['feature_bytes_factor']:g}: "
            f"headroom {row['headroom']:.2%} ({row['wall_s']:.0f} s)"
        )
    return pd.read_csv(CSV)


def plot(df: pd.DataFrame, path: str) -> None:
    """Heatmaps of headroom (%): scenario x buffer fraction, one per action space and feature width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(product(MAIN_SPACES, FEATURE_BYTES))
    main = df[df["space"].isin(MAIN_SPACES) & df["scenario"].isin(MAIN_SCENARIOS)]
    vmax = max(10.0, 100 * float(main["headroom"].max()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), sharey=True)
    for ax, (space, fb) in zip(axes, panels):
        t = main[(main["space"] == space) & (main["feature_bytes_factor"] == fb)]
        t = t.pivot_table(index="scenario", columns="buffer_fraction", values="headroom")
        t = t.reindex(index=[s for s in MAIN_SCENARIOS if s in t.index])
        im = ax.imshow(100 * t.to_numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(t.shape[1]), [f"{c:g}" for c in t.columns])
        ax.set_yticks(range(t.shape[0]), t.index)
        ax.set_xlabel("buffer fraction of halo")
        ax.set_title(f"{space}, rows x{fb:g}")
        for (i, j), v in np.ndenumerate(100 * t.to_numpy()):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w" if v < vmax / 2 else "k", fontsize=8)
    fig.colorbar(im, ax=axes, label="headroom over the best constant (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    n = len(df)
    over = {t: df[df["headroom"] >= t] for t in THRESHOLDS}
    top = df.sort_values("headroom", ascending=False).head(8)
    lines = [
        f"{n} cells (trace {df['trace'].iloc[0]} rank {df['rank'].iloc[0]}, replay-modelled seconds; rollout "
        f"horizon {int(df['horizon'].iloc[0])} windows). Headroom = 1 - reference / best constant, where the "
        "reference is the best action sequence the rollout search found (a sequence that exists: a lower bound on "
        "what hindsight could gain, not a bound on the optimum).",
        "",
        f"- cells with headroom >= 5%: {len(over[0.05])}; >= 10%: {len(over[0.10])}; median "
        f"{df['headroom'].median():.2%}, max {df['headroom'].max():.2%}.",
    ]
    for space, g in df.groupby("space"):
        lines.append(f"- {space}: max {g['headroom'].max():.2%}, mean {g['headroom'].mean():.2%} over {len(g)} cells")
    cols = ["space", "scenario", "buffer_fraction", "feature_bytes_factor", "best_constant", "best_constant_s"]
    table = top[cols + ["reference_s", "headroom", "switches", "off_constant"]]
    return "\n".join(lines), table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.headroom_map", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=None, help="measure at most this many missing cells, then stop")
    args = p.parse_args(argv)
    df = measure(args.cells)
    print(f"{len(df)} of {len(cells())} cells in {CSV}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
