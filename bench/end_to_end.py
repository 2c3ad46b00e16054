"""P2/P3/memory: live DistDGL training time, env overhead, hidden LLM latency and trainer memory, measured by real
runs of ``train.py gnn`` on this host, interleaved (A B A B ...) so that drift hits every agent alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAPH, PARTS = "synth-small", 2


def live_run(agent: str, seed: int, epochs: int, extra=(), trace: str | None = None, parts: int | None = PARTS) -> dict:
    """One real training run; returns the summary's per-rank rows reduced to the job: the slowest trainer's time.
    ``parts=None`` leaves the partition count to ``extra`` (e.g. ``--cluster NAME``: one per host)."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, "run.json")
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "gnn",
            "--graph",
            GRAPH,
            *(("--parts", str(parts)) if parts else ()),
            "--epochs",
            str(epochs),
            "--agent",
            agent,
            "--seed",
            str(seed),
            "--summary",
            summary,
            *extra,
        ]
        if trace:
            cmd += ["--trace", trace]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"live run {agent} seed {seed} failed:\n{proc.stderr[-3000:]}")
        with open(summary) as f:
            s = json.load(f)
    ranks = s["ranks"]
    train_s = max(sum(r["epoch_time_s"]) for r in ranks)
    return dict(
        agent=agent,
        seed=seed,
        train_s=train_s,
        fetch_s=max(r["fetch_s"] for r in ranks),
        compute_s=max(r["compute_s"] for r in ranks),
        env_overhead_s=max(r.get("env_overhead_s", 0.0) for r in ranks),
        env_overhead_frac=max(r.get("env_overhead_s", 0.0) / max(sum(r["epoch_time_s"]), 1e-9) for r in ranks),
        env_running_frac=max(
            (r.get("env_overhead_s", 0.0) - r.get("env_startup_s", 0.0)) / max(sum(r["epoch_time_s"]), 1e-9)
            for r in ranks
        ),
        trace_frac=max(r.get("trace_s", 0.0) / max(sum(r["epoch_time_s"]), 1e-9) for r in ranks),
        remote_fetched=sum(r["remote_fetched"] for r in ranks),
        remote_sampled=sum(r["remote_sampled"] for r in ranks),
        peak_rss_mb=max(r["peak_rss_mb"] for r in ranks),
        buffer_mb=max(r["buffer_bytes"] for r in ranks) / 2**20,
        decisions=max(r.get("decisions", 0) for r in ranks),
        model_queries=max(r.get("model_queries", 0) for r in ranks),
        latency_p50_s=max(r.get("latency_p50_s", 0.0) for r in ranks),
        asynchronous=any(r.get("asynchronous", False) for r in ranks),
        val_acc=s["val_acc"],
        stall_s=max(r.get("stall_s", 0.0) for r in ranks),
        late=sum(r.get("late", 0) for r in ranks),
        prefetched=sum(r["prefetched"] - r["initial_fill"] for r in ranks),
        prefetch_used=sum(r.get("prefetch_used", 0) for r in ranks),
        epoch_s=[max(r["epoch_time_s"][e] for r in ranks) for e in range(len(ranks[0]["epoch_time_s"]))],
    )


# (label, agent, options): "none" is DistDGL as it is (no buffer, features pulled after sampling); two variants
# pull the next minibatch's rows during this one's compute (--overlap-fetch), to separate what the overlap and
# what the buffer contribute
VARIANTS = [
    ("none", "none", ()),
    ("none+overlap", "none", ("--overlap-fetch",)),
    ("static", "static", ()),
    ("periodic", "periodic", ()),
    ("periodic+overlap", "periodic", ("--overlap-fetch",)),
    ("lookahead", "lookahead", ()),
]
QUICK_VARIANTS = [VARIANTS[0], VARIANTS[3], VARIANTS[5]]


def agent_variants(agents, agent_kwargs: dict[str, dict] | None = None) -> list[tuple]:
    """``(label, agent, options)`` variants for more agents (names or references, file references made
    absolute), each with its ``--agent-kwargs``."""
    from rudder.evaluation.registry import absolute_reference, agent_labels, check_agent

    out = []
    for agent, label in zip(agents, agent_labels(agents)):
        options = dict((agent_kwargs or {}).get(agent, {}))
        check_agent(agent, options)
        out.append((label, absolute_reference(agent), ("--agent-kwargs", json.dumps(options)) if options else ()))
    return out


def measure(
    quick: bool,
    log=lambda m: print(m, file=sys.stderr, flush=True),
    variants=None,
    agents=(),
    agent_kwargs: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Interleaved live runs of ``variants`` (default :data:`VARIANTS`, or :data:`QUICK_VARIANTS`) and of
    ``agents`` (names or references, with ``agent_kwargs`` by agent) beside them."""
    seeds = (0,) if quick else (0, 1)
    rounds = 2
    epochs = 1 if quick else 2
    variants = list(variants or (QUICK_VARIANTS if quick else VARIANTS)) + agent_variants(agents, agent_kwargs)
    rows = []
    for seed in seeds:
        for rnd in range(rounds):
            for label, agent, extra in variants:  # A B A B: every round runs each variant once, in the same order
                log(f"  live {label} seed {seed} round {rnd + 1}/{rounds}")
                rows.append(dict(live_run(agent, seed, epochs, extra=extra), agent=label, round=rnd))
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    base = df[df["agent"] == "none"].groupby("seed")["train_s"].mean()
    df = df.assign(train_vs_none=df["train_s"] / df["seed"].map(base))
    table = (
        df.groupby("agent", sort=False)
        .agg(
            train_s=("train_s", "mean"),
            train_vs_none=("train_vs_none", "mean"),
            train_vs_none_worst=("train_vs_none", "max"),
            fetch_s=("fetch_s", "mean"),
            compute_s=("compute_s", "mean"),
            env_overhead_pct=("env_overhead_frac", lambda v: 100 * v.max()),
            env_running_pct=("env_running_frac", lambda v: 100 * v.max()),
            peak_rss_mb=("peak_rss_mb", "max"),
            buffer_mb=("buffer_mb", "max"),
            fetched_vs_none=("remote_fetched", "sum"),
            runs=("train_s", "size"),
        )
        .reset_index()
    )
    sampled = df.groupby("agent", sort=False)["remote_sampled"].sum().to_numpy()
    table["fetched_vs_none"] = table["fetched_vs_none"] / sampled
    others = table[table["agent"] != "none"]
    best = others.loc[others["train_vs_none"].idxmin()] if len(others) else None
    text = (
        f"best agent {best['agent']}: training time {best['train_vs_none']:.3f}x no-prefetch DistDGL "
        f"(worst run {best['train_vs_none_worst']:.3f}x; target <= 0.6); env overhead at most "
        f"{table['env_overhead_pct'].max():.2f}% of training time with its start-up (the first observation), "
        f"{table['env_running_pct'].max():.2f}% while training runs (target <= 1%); without the lookahead's "
        f"ranking at most {table[~table['agent'].str.startswith('lookahead')]['env_overhead_pct'].max():.2f}%"
        if best is not None
        else ""
    )
    return text + ".", table


# 2 epochs, a decision every 4 minibatches and the buffer filled at random: ~7 windows per trainer with slots to
# refill, so the LLM is asked real questions (with 1 epoch of 8-minibatch windows it has ~2, mostly forced)
LLM_EPOCHS, LLM_RUN = 2, ("--period", "4", "--buffer-init", "random")


def llm_hidden_latency(quick: bool, log=lambda m: print(m, file=sys.stderr, flush=True)) -> tuple[str, pd.DataFrame]:
    """Training time with LLM decisions taken in the background against a run applying *the same decisions* at
    the same minibatches instantly (``--agent recorded`` on the LLM run's trace), at the agent thread's idle and
    normal OS priority; pairs run back to back, every run recording a trace (the same writing cost)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1 if quick else 2):
            for priority in ("idle", "normal"):
                llm_trace = os.path.join(tmp, f"llm-{priority}-{rnd}")
                log(f"  live llm (background, {priority} priority) round {rnd + 1}")
                rows.append(
                    dict(
                        live_run(
                            "llm",
                            0,
                            LLM_EPOCHS,
                            extra=(*LLM_RUN, "--decisions", "async", "--decision-priority", priority),
                            trace=llm_trace,
                        ),
                        mode="llm",
                        priority=priority,
                        round=rnd,
                    )
                )
                log(f"  live recorded (its decisions, instantly) round {rnd + 1}")
                rows.append(
                    dict(
                        live_run(
                            "recorded",
                            0,
                            LLM_EPOCHS,
                            extra=(*LLM_RUN, "--decisions-from", llm_trace),
                            trace=os.path.join(tmp, f"rec-{priority}-{rnd}"),
                        ),
                        mode="same decisions, instant",
                        priority=priority,
                        round=rnd,
                    )
                )
    df = pd.DataFrame(rows)
    llm = df[df["mode"] == "llm"].set_index(["priority", "round"])
    instant = df[df["mode"] != "llm"].set_index(["priority", "round"])
    ratio = (llm["train_s"] / instant["train_s"]).groupby(level="priority").agg(["mean", "max"])
    df["vs_instant"] = [r.train_s / instant.loc[(r.priority, r.round), "train_s"] for r in df.itertuples()]
    text = (
        f"LLM decisions in the background at idle priority: training takes {ratio.loc['idle', 'mean']:.3f}x the "
        f"time of the same decisions applied instantly (worst {ratio.loc['idle', 'max']:.3f}x; target <= 1.02x); "
        f"at normal priority {ratio.loc['normal', 'mean']:.3f}x. Decisions per trainer: "
        f"{llm.loc['idle', 'decisions'].mean():.0f} (idle), {llm.loc['normal', 'decisions'].mean():.0f} (normal); "
        f"p50 latency {llm.loc['idle', 'latency_p50_s'].median():.2f} s (idle), "
        f"{llm.loc['normal', 'latency_p50_s'].median():.2f} s (normal). The env's own work (observations, "
        f"actions) {100 * df['env_overhead_frac'].min():.2f}%-{100 * df['env_overhead_frac'].max():.2f}% of training "
        f"time (target <= 1%); recording the trace {100 * df['trace_frac'].min():.2f}%-"
        f"{100 * df['trace_frac'].max():.2f}% apart."
    )
    return text, df
