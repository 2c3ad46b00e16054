"""The scenario suite: four families of link conditions, each recorded live on the emulated cluster (training and
held-out runs), and every agent compared on it against the best constant and the bound.

Built from the headroom map's regions with the most headroom on a real workload (``bench/headroom_map.py``: the
recorded trace at buffer 0.5 under co-tenant bursts and square waves). Each run: synth-small on 2 emulated hosts at
400mbit, metis partitions, fanout 10,25, batch 1000, 2 epochs, buffer 0.5 of the halo, background prefetch, with
``--scenario`` playing the family's link timeline on both links (``train.py gnn --scenario``), so each trace keeps
the conditions its ranks met (``conditions.json``) and replay follows them. Families (scenario files in
``traces/suite/scenarios/``), split by their parameters and seeds:

- ``square-2s``: 1 s at the base rate, 1 s at an eighth (train: two phases; held out: a 3 s period).
- ``square-6s``: the same over 6 s (train: two phases; held out: a 5 s period).
- ``markov``: fast and 8x slower spells, means 3 s and 1.5 s (train: seeds 0, 1; held out: seed 2, slow spells of
  2 s on average).
- ``cotenant``: another job's bursts take 90% of the link, on and off for 2 s on average (train: seeds 0, 1; held
  out: seed 2, bursts taking 80%).

    python -m rudder.bench.suite --record        # record the traces that are missing (about 1.5 min each)
    python train.py ppo --action link --traces traces/suite/train/*/ --steps 16000 \\
        --out agents/policies/ppo-link-suite.zip    # PPO retrained on the training families (agent ppo-link-suite)
    python -m rudder.bench --only suite          # compare the agents on it (replay), BENCHMARKS section

Per held-out family: headroom of the link-budget levels over the best constant by the bound
(:mod:`rudder.evaluation.bound`), each agent's time relative to the best constant and its share of the headroom,
with the replay model's error band; ``tuned-constant`` is tuned on the suite's training traces.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
from rudder.traces.schema import CONDITIONS_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "traces", "suite")
SCENARIOS = os.path.join(SUITE, "scenarios")
OUT = os.path.join(ROOT, "bench", "results", "suite.csv")
POLICY = os.path.join(ROOT, "agents", "policies", "ppo-link-suite.zip")
RUN = [
    "--graph", "synth-small", "--hosts", "2", "--link-rate", "400mbit", "--epochs", "2", "--batch-size", "1000",
    "--fanout", "10,25", "--buffer-fraction", "0.5", "--prefetch", "background",
]  # fmt: skip
AGENTS = ("none", "static", "vip", "periodic", "lookahead", "mpc", "ppo-link", "llm-link")
ORACLES = ("best-constant", "tuned-constant", "bound")


def _square(name: str, period_s: float, phase_s: float = 0.0) -> dict:
    timeline = dict(type="square", period_s=period_s, high=1.0, low=0.125, phase_s=phase_s)
    return dict(
        version=1, name=name, duration_s=period_s, processes=[dict(kind="link", hosts="all", timeline=timeline)]
    )


def _markov(name: str, seed: int, mean_low_s: float = 1.5) -> dict:
    timeline = dict(type="markov", mean_high_s=3.0, mean_low_s=mean_low_s, high=1.0, low=0.125)
    link = dict(kind="link", hosts="all", timeline=timeline)
    return dict(version=1, name=name, seed=seed, duration_s=120, processes=[link])


def _cotenant(name: str, seed: int, share: float = 0.9) -> dict:
    timeline = dict(type="markov", mean_high_s=2.0, mean_low_s=2.0, high=share, low=0.0)
    return dict(
        version=1,
        name=name,
        seed=seed,
        duration_s=120,
        processes=[dict(kind="cotenant", hosts="all", timeline=timeline)],
    )


#: family -> split -> scenario files (dicts): what each trace of the suite is recorded under
FAMILIES = {
    "square-2s": dict(
        train=[_square("square-2s-a", 2.0), _square("square-2s-b", 2.0, phase_s=0.5)],
        heldout=[_square("square-3s", 3.0)],
    ),
    "square-6s": dict(
        train=[_square("square-6s-a", 6.0), _square("square-6s-b", 6.0, phase_s=2.0)],
        heldout=[_square("square-5s", 5.0, phase_s=1.0)],
    ),
    "markov": dict(
        train=[_markov("markov-s0", 0), _markov("markov-s1", 1)],
        heldout=[_markov("markov-s2-slow2s", 2, mean_low_s=2.0)],
    ),
    "cotenant": dict(
        train=[_cotenant("cotenant-s0", 0), _cotenant("cotenant-s1", 1)],
        heldout=[_cotenant("cotenant-s2-80", 2, share=0.8)],
    ),
}


def runs() -> list[tuple[str, str, dict]]:
    """Every run of the suite: (family, split, scenario dict), training runs first."""
    out = [(f, "train", s) for f, splits in FAMILIES.items() for s in splits["train"]]
    return out + [(f, "heldout", s) for f, splits in FAMILIES.items() for s in splits["heldout"]]


def trace_dir(split: str, scenario: dict) -> str:
    return os.path.join(SUITE, split, f"emu2-small-{scenario['name']}")


def record(only_missing: bool = True) -> list[str]:
    """Record the suite's traces (those missing, unless ``only_missing`` is False) with real jobs on 2 emulated
    hosts; writes each scenario file first. Returns the traces recorded."""
    from rudder.env.scenario import Scenario

    os.makedirs(SCENARIOS, exist_ok=True)
    done = []
    for i, (family, split, scenario) in enumerate(runs(), 1):
        path = os.path.join(SCENARIOS, f"{scenario['name']}.json")
        Scenario.from_dict(scenario, source=path)  # checked before it is written
        with open(path, "w") as f:
            json.dump(scenario, f, indent=1)
            f.write("\n")
        out = trace_dir(split, scenario)
        if only_missing and os.path.isfile(os.path.join(out, CONDITIONS_FILE)):
            continue
        print(f"[suite] {i}/{len(runs())} {family} {split}: {scenario['name']}", flush=True)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "gnn", *RUN, "--scenario", path, "--trace", out]
        proc = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"recording {out} failed: {proc.stderr.strip().splitlines()[-1:]}")
        done.append(out)
    return done


def traces(split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(SUITE, split, "emu2-*", "")))


def measure(quick: bool = False) -> pd.DataFrame:
    """One row per agent x trace x rank (``evaluate.py``'s ``results.csv`` columns) over the held-out traces (and,
    marked, the training ones unless ``quick``), with ``family`` and ``split``."""
    from rudder.evaluation.registry import make_agent
    from rudder.evaluation.scoring import evaluate_trace

    names = {s["name"]: (f, split) for f, split, s in runs()}
    agents = {a: (lambda a: lambda trace, rank: make_agent(a))(a) for a in AGENTS}
    if os.path.isfile(POLICY):  # PPO retrained on the suite's training traces (see the module docstring)
        agents["ppo-link-suite"] = lambda trace, rank: make_agent("ppo-link", path=POLICY)
    rows = []
    for split in ("heldout",) if quick else ("heldout", "train"):
        for trace in traces(split):
            name = os.path.basename(os.path.normpath(trace)).removeprefix("emu2-small-")
            family = names.get(name, ("?", split))[0]
            print(f"[suite] {split} {name}", flush=True)
            for r in evaluate_trace(trace, agents, oracles=ORACLES, tuned_on=traces("train")):
                rows.append(dict(r, family=family, split=split))
    df = pd.DataFrame(rows).drop(columns=["window_hit_rate", "window_hit_ceiling"], errors="ignore")
    df.to_csv(OUT, index=False)
    return df


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Per family and split: each agent's modelled time relative to the lookahead's (summed over ranks), and,
    where the replay fit separates remote rows on every rank (the time oracles ran), the link-level bound's
    headroom over the best constant and each agent's share of it; the fit's R² range says why not otherwise."""
    out, lines = [], []
    for (family, split), g in df.groupby(["family", "split"], sort=False):
        ref = g[g["agent"] == "lookahead"].set_index(["trace", "rank"])["time_s"]
        const = g[g["agent"] == "best-constant:link-levels"].set_index(["trace", "rank"])["time_s"]
        bound = g[g["agent"] == "bound:link-levels"].set_index(["trace", "rank"])["time_s"]
        c, b = float(const.sum()), float(bound.sum())
        head = 1 - b / c if len(bound) and c > 0 else float("nan")
        r2 = g["time_r2"].astype(float)
        for agent, a in g.groupby("agent", sort=False):
            if ":keep" in str(agent):
                continue
            t = float(a.set_index(["trace", "rank"])["time_s"].reindex(ref.index).sum())
            out.append(
                dict(
                    family=family,
                    split=split,
                    agent=agent,
                    vs_lookahead=t / float(ref.sum()) - 1,
                    headroom=head,
                    share_of_headroom=(c - t) / (c - b) if len(bound) and c - b > 0 else float("nan"),
                    fit_r2_min=float(r2.min()),
                    fit_r2_max=float(r2.max()),
                )
            )
        rows = pd.DataFrame(out)
        mine = rows[(rows["family"] == family) & (rows["split"] == split)].set_index("agent")["vs_lookahead"]
        link = mine.drop(labels=["none", "static", "vip", "periodic"], errors="ignore")
        verdict = (
            f"headroom {head:.1%} over the best constant (link levels)"
            if head == head
            else f"no time oracle: the replay fit explains R² {r2.min():.2f}-{r2.max():.2f} of the fetch time "
            "(< 0.3 on some rank), so neither the best constant nor the bound is computed"
        )
        lines.append(
            f"- {family} ({split}): {verdict}; link-level agents vs the lookahead: "
            + ", ".join(f"{a} {v:+.1%}" for a, v in link.items())
            + f"; no buffer decisions (none) {mine.get('none', float('nan')):+.0%}"
        )
    return "\n".join(lines), pd.DataFrame(out)


def decisions_trace(trace: str, labels: dict[int, str], out: str) -> str:
    """Write ``out``: ``trace`` with its prefetch decisions replaced by those of a link-level action sequence
    played in replay (``labels``: per rank, the sequence as ``bound_actions`` writes it, one level per window),
    so that ``train.py gnn --agent recorded --decisions-from out`` applies them live at the same minibatches, with
    the buffer settings of the link-level agents (stated in ``trace.json``'s ``meta.agent.settings``)."""
    from rudder.baselines.constant import SPACES
    from rudder.traces import Trace, TraceWriter

    from rudder.evaluation.scoring import _Sequence, space_env

    src, space = Trace(trace), SPACES["link-levels"]
    index = {space.label(a).split()[-1]: a for a in range(len(space.actions))}
    # the buffer settings the sequence was played with in replay, stated, so that `--agent recorded` plays it live
    # with them too (not with those of the agent that recorded ``trace``)
    meta = dict(src.meta, agent=dict(src.meta.get("agent") or {}, settings=dataclasses.asdict(space.settings)))
    for rank in src.ranks:
        env = space_env(src, rank, space)
        agent = _Sequence(space, [index[x] for x in labels[rank].split()])
        obs, info = env.reset(seed=0)
        episode, chosen = env.unwrapped.episode, []
        before = episode.on_apply

        def keep(minibatch, ids, before=before, chosen=chosen):
            chosen.append((int(minibatch), np.asarray(ids, dtype=np.int64).copy()))
            if before is not None:
                before(minibatch, ids)

        episode.on_apply = keep
        done = False
        while not done:
            obs, _, terminated, truncated, info = env.step(agent.act(obs, info))
            done = terminated or truncated
        rt = src.rank(rank)
        static = dict(rt.static)
        prefetch, seeds = rt.prefetch_table(), rt.minibatch_seeds()  # the seeds: what the lookahead ranks from
        with TraceWriter(
            out, rank, src.num_ranks, meta if rank == 0 else None, rt.meta, static, overwrite=rank == 0
        ) as writer:
            decisions = iter(chosen)
            pending = next(decisions, None)
            for i, (row, ids) in enumerate(rt.iter_minibatches()):
                while pending is not None and pending[0] <= i:
                    writer.add_decision(minibatch=pending[0], ids=pending[1], latency_s=0.0)
                    pending = next(decisions, None)
                extra = {} if prefetch is None else {k: prefetch[k].to_numpy()[i] for k in prefetch.columns}
                cols = ("epoch", "local_rows", "sample_s", "fetch_s", "compute_s", "fetch_rows", "hits")
                writer.add_minibatch(
                    minibatch=i, remote_ids=ids, **{c: row[c] for c in cols}, remote_fetched=row["remote_fetched"],
                    prefetched=row["prefetched"], **{k: v.item() for k, v in extra.items()},
                    **({} if seeds is None else dict(seeds=seeds[i])),
                )  # fmt: skip
    if src.conditions is not None:  # the conditions the run met, so that a replay of ``out`` meets them too
        shutil.copy(os.path.join(trace, CONDITIONS_FILE), os.path.join(out, CONDITIONS_FILE))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="record the suite's missing traces (real jobs)")
    p.add_argument("--again", action="store_true", help="with --record: record every trace again")
    args = p.parse_args(argv)
    if args.record:
        for out in record(only_missing=not args.again):
            print(f"[suite] recorded {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
