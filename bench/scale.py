"""P9: replay at papers100M scale: every non-LLM agent and the oracles over one trainer trace of >= 10^8 remote ids.

The trace is synthetic, shaped like an ogbn-papers100M trainer (:mod:`rudder.traces.synthetic`: 111M-node id space,
~10^5 remote ids per minibatch, reuse scaled from a small real run), generated once into
``$RUDDER_CACHE/bench/synthetic``. Each agent and oracle replays it in a process of its own, so that each one's
peak RSS is its own; every run shows a progress bar over the minibatches (stderr). Reported per agent: wall time
(trace load included), peak RSS, replay minibatches per second, remote rows fetched relative to no prefetch and
to Belady MIN.

    python -m rudder.bench --only p9
    python -m rudder.bench.scale [--minibatches N] [--ids-per-minibatch M]   # the same, alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pandas as pd
from rudder.baselines.oracles import belady_min_chunked, hindsight_static_chunked
from rudder.traces import Trace, TraceError
from rudder.traces.synthetic import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every agent that is not an LLM; vip and recorded need what a synthetic trace lacks (partition structure, decisions)
AGENTS = ("none", "static", "periodic", "hitrate", "lookahead", "ppo", "level", "ppo-link")
ORACLES = ("belady", "hindsight")
FRACTION = 0.25
LOOKAHEAD_SAMPLE_AHEAD = "64MB"


def trace_dir(minibatches: int, ids_per_minibatch: int) -> str:
    from rudder.runtime.config import default_cache_dir

    return os.path.join(
        default_cache_dir(), "bench", "synthetic", f"papers100m-shaped-{minibatches}x{ids_per_minibatch}"
    )


def ensure_trace(minibatches: int, ids_per_minibatch: int, log) -> tuple[str, float]:
    """The synthetic trace (generated unless a complete one is cached) and the seconds generating it took."""

    out = trace_dir(minibatches, ids_per_minibatch)
    try:
        if Trace(out).complete:
            return out, 0.0
    except TraceError:
        pass
    from tqdm import tqdm

    log(f"  generating {out} ({minibatches} minibatches x ~{ids_per_minibatch} remote ids, streamed)")
    with tqdm(total=minibatches, desc="P9 synthetic trace", unit="mb", file=sys.stderr) as bar:
        facts = generate(out, minibatches=minibatches, ids_per_minibatch=ids_per_minibatch, progress=bar.update)
    log(
        f"  generated {facts['remote_ids']:,} remote ids over {facts['distinct_ids']:,} distinct in "
        f"{facts['seconds']} s"
    )
    return out, facts["seconds"]


def run_one(trace: str, what: str, fraction: float) -> dict:
    """Replay ``what`` (an agent or an oracle) over the trace in this process; its row."""
    from rudder.agents.base import as_agent
    from rudder.env.contract import buffer_kwargs
    from rudder.env.replay_env import ReplayEnv
    from tqdm import tqdm

    from rudder.evaluation.registry import make_agent

    t0 = time.perf_counter()
    if what in ORACLES:
        env = ReplayEnv(trace, rank=0, buffer_fraction=fraction)
        ids, n = env._ids, len(env._ids)
        env.rank_trace._minibatch_ids = None  # the global ids: the local ones are all the oracles need
        t_load = time.perf_counter() - t0
        if what == "belady":
            with tqdm(total=2 * n, desc="P9 belady (2 passes)", unit="mb", file=sys.stderr) as bar:
                res = belady_min_chunked(ids, env.capacity, num_ids=env.buffer_nodes, progress=bar.update)
        else:
            res = hindsight_static_chunked(ids, env.capacity, env.buffer_nodes)
        row = dict(remote_sampled=res.remote_sampled, remote_fetched=res.remote_fetched, hits=res.hits)
    else:
        options = dict(level=0.25) if what == "level" else {}
        agent = as_agent(make_agent(what, **options))
        kwargs = buffer_kwargs(agent.settings, fraction)
        if kwargs.get("ranking") == "lookahead":  # a synthetic trace has no partition structure: the lookahead
            kwargs.update(sampled_only=True, sample_ahead=LOOKAHEAD_SAMPLE_AHEAD)  # knows sampled-ahead ids only
        if what == "lookahead":
            kwargs.update(buffer_init="empty")
        env = ReplayEnv(trace, rank=0, **kwargs)
        env.rank_trace._minibatch_ids = None
        n = len(env._ids)
        obs, info = env.reset(seed=0)
        agent.reset()
        t_load = time.perf_counter() - t0
        done = False
        with tqdm(total=n, desc=f"P9 {what}", unit="mb", file=sys.stderr) as bar:
            while not done:
                before = env.episode.minibatches
                obs, _, terminated, truncated, info = env.step(agent.act(obs, info))
                bar.update(env.episode.minibatches - before)
                done = terminated or truncated
        c = env.episode.buffer.counters
        row = dict(remote_sampled=c.remote_sampled, remote_fetched=c.remote_fetched, hits=c.hits)
    wall = time.perf_counter() - t0
    return dict(
        agent=what,
        fraction=fraction,
        minibatches=n,
        wall_s=round(wall, 1),
        load_s=round(t_load, 1),
        replay_mb_per_s=round(n / max(wall - t_load, 1e-9), 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        buffer_nodes=int(env.buffer_nodes),
        num_nodes=int(env.num_nodes),
        capacity=int(env.capacity),
        **row,
    )


def measure(
    minibatches: int = 1024,
    ids_per_minibatch: int = 100_000,
    fraction: float = FRACTION,
    agents=AGENTS,
    oracles=ORACLES,
    log=lambda m: print(m, file=sys.stderr, flush=True),
) -> pd.DataFrame:
    """One row per agent and oracle, each replayed in its own process over the same synthetic trace."""
    trace, gen_s = ensure_trace(minibatches, ids_per_minibatch, log)
    rows = []
    for what in [*agents, *oracles]:
        cmd = [sys.executable, "-m", "rudder.bench.scale", "--one", what, "--trace", trace, "--fraction", str(fraction)]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"P9 replay of {what} failed (exit {proc.returncode})")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {what}: {row['wall_s']} s, peak RSS {row['peak_rss_mb']:.0f} MB, {row['replay_mb_per_s']} mb/s")
        rows.append(row)
    df = pd.DataFrame(rows)
    df["fetched_vs_none"] = df["remote_fetched"] / df["remote_sampled"]
    ref = df.loc[df["agent"] == "belady", "remote_fetched"]
    df["fetched_vs_min"] = df["remote_fetched"] / float(ref.iloc[0]) if len(ref) else float("nan")
    df.attrs["generate_s"] = gen_s
    df.attrs["trace"] = trace
    return df


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    agents = df[~df["agent"].isin(ORACLES)]
    worst_rss = df["peak_rss_mb"].max()
    text = (
        f"One papers100M-shaped trainer trace ({int(df['remote_sampled'].iloc[0]):,} remote ids in "
        f"{int(df['minibatches'].iloc[0])} minibatches, id space {int(df['num_nodes'].iloc[0]):,}, "
        f"{int(df['buffer_nodes'].iloc[0]):,} distinct ids touched; buffer {df['fraction'].iloc[0]} x those) "
        f"replayed by {len(agents)} non-LLM agents and {len(df) - len(agents)} oracles: the slowest took "
        f"{df['wall_s'].max():.0f} s ({df.loc[df['wall_s'].idxmax(), 'agent']}), peak RSS at most "
        f"{worst_rss / 1024:.2f} GB (target: within 16 GB, minutes); the whole of P9 "
        f"{df['wall_s'].sum() / 60:.1f} min."
    )
    return text, df[
        [
            "agent",
            "wall_s",
            "load_s",
            "peak_rss_mb",
            "replay_mb_per_s",
            "remote_fetched",
            "fetched_vs_none",
            "fetched_vs_min",
        ]
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="P9: replay at papers100M scale")
    parser.add_argument("--one", help="replay this agent or oracle only, in this process; print its row as JSON")
    parser.add_argument("--trace")
    parser.add_argument("--fraction", type=float, default=FRACTION)
    parser.add_argument("--minibatches", type=int, default=1024)
    parser.add_argument("--ids-per-minibatch", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.trace, args.one, args.fraction)))
        return 0
    df = measure(args.minibatches, args.ids_per_minibatch, args.fraction)
    text, table = summarise(df)
    print(text)
    print(table.to_markdown(index=False, floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
