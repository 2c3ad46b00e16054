"""P2 on the emulated cluster: live training time of each agent where remote rows cross a shaped link.

Runs ``train.py gnn --cluster NAME`` on emulated hosts (:mod:`rudder.testbed.cluster`), one partition per host, in
DGL's several-host mode. The cluster is brought up once per host count and its link rate changed between sweep
points; runs of every variant are interleaved (A B C ... A B C ...) so that drift hits every agent alike.
"""

from __future__ import annotations

import os
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rudder.bench.end_to_end import live_run  # noqa: E402
from rudder.traces import Trace

from rudder.testbed.cluster import EmulatedCluster, parse_rate

# (label, agent, options). "none" is DistDGL as it is; "none+overlap" pulls the next minibatch's rows during this
# one's compute (pipelined DistDGL)
# one pulls a decided prefetch set with the next minibatch's misses, on the critical path (inline), as before
# background prefetch; the others prefetch in the background (the default)
VARIANTS = [
    ("none", "none", ()),
    ("none+overlap", "none", ("--overlap-fetch",)),
    ("static", "static", ()),
    ("periodic inline", "periodic", ("--prefetch", "inline")),
    ("periodic", "periodic", ()),
    ("lookahead", "lookahead", ()),
    ("lookahead+overlap", "lookahead", ("--overlap-fetch",)),
]
# link rates where fetching is about 60% of a no-prefetch epoch of synth-small (2 hosts; 4 hosts, whose 2 shared
# cores bind sooner)
MAIN = {2: "400mbit", 4: "150mbit"}
SWEEP_RATES = ("200mbit", "500mbit", "1gbit", "4gbit")
SWEEP_VARIANTS = ("none", "none+overlap", "static", "periodic", "lookahead+overlap")


def _log(m):
    print(m, file=sys.stderr, flush=True)


def _runs(cluster, variants, seeds, epochs, rate, rounds=1, log=_log, traces: str | None = None) -> list[dict]:
    """Every variant for every seed, interleaved; with ``traces``, seed 0's runs record traces there."""
    rows = []
    cluster.set_rate_all(rate)
    for seed in seeds:
        for rnd in range(rounds):
            for label, agent, extra in variants:
                log(f"  {len(cluster.hostnames)} hosts at {rate}: {label} seed {seed}")
                trace = os.path.join(traces, label.replace(" ", "_")) if traces and seed == 0 else None
                r = live_run(agent, seed, epochs, extra=("--cluster", cluster.name, *extra), parts=None, trace=trace)
                rows.append(
                    dict(
                        r,
                        agent=label,
                        hosts=len(cluster.hostnames),
                        link_rate=rate,
                        round=rnd,
                        fetch_share=r["fetch_s"] / max(r["train_s"], 1e-9),
                        trace=trace,
                    )
                )
    return rows


def replay_fidelity(rows: list[dict], log=_log) -> pd.DataFrame:
    """Each recorded live run replayed with its own agent: hits and rows fetched against the live run's, and
    modelled training time against the measured one — following the recording's prefetch arrivals, and with
    arrivals modelled by the link model (what a different agent's replay gets)."""
    import rudder.env  # noqa: F401  (registers the environments)
    from rudder.env.contract import buffer_kwargs
    from rudder.env.replay_env import ReplayEnv

    from rudder.evaluation.play import play_episode
    from rudder.evaluation.registry import make_agent

    out = []
    for r in rows:
        if not r.get("trace") or "overlap" in r["agent"]:  # replay does not model the overlapped pull
            continue
        t = Trace(r["trace"])
        agent_name = t.meta["config"]["agent"]
        for follow in (True, False):
            live_s = model_s = 0.0
            same = True
            for rank in t.ranks:
                agent = make_agent(agent_name)
                env = ReplayEnv(t, rank=rank, **buffer_kwargs(agent.settings))
                env.follow_recorded = follow
                res = play_episode(env, agent)
                table = t.rank(rank).table()
                same &= res["hits"] == int(table["hits"].sum()) and res["remote_fetched"] - res["initial_fill"] == int(
                    table["remote_fetched"].sum()
                )
                live_s = max(live_s, float((table["sample_s"] + table["fetch_s"] + table["compute_s"]).sum()))
                model_s = max(model_s, res["time_s"])
            log(
                f"  replay {r['agent']} ({'recorded' if follow else 'modelled'} arrivals): "
                f"{model_s:.2f} s vs {live_s:.2f} s live"
            )
            out.append(
                dict(
                    agent=r["agent"],
                    arrivals="recorded" if follow else "modelled",
                    same_hits_and_rows=same,
                    live_s=live_s,
                    replay_s=model_s,
                    time_error=model_s / live_s - 1,
                )
            )
    return pd.DataFrame(out)


def measure(quick: bool, log=_log) -> pd.DataFrame:
    """Every variant at the main rate on 2 hosts (two seeds) and 4 hosts (one seed); the sweep on 2 hosts."""

    seeds = (0,) if quick else (0, 1)
    epochs = 1 if quick else 2
    variants = (
        [v for v in VARIANTS if v[0] in ("none", "none+overlap", "periodic", "lookahead+overlap")]
        if quick
        else VARIANTS
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmulatedCluster(2, link_rate=MAIN[2]) as c:
        main = _runs(c, variants, seeds, epochs, MAIN[2], log=log, traces=tmp)
        rows += [dict(r, part="main") for r in main]
        fidelity = replay_fidelity(main, log=log)
        sweep = [v for v in VARIANTS if v[0] in SWEEP_VARIANTS]
        for rate in SWEEP_RATES[::2] if quick else SWEEP_RATES:
            rows += [dict(r, part="sweep") for r in _runs(c, sweep, (0,), 1, rate, log=log)]
    if not quick:
        with EmulatedCluster(4, link_rate=MAIN[4]) as c:
            rows += [dict(r, part="main") for r in _runs(c, variants, (0,), epochs, MAIN[4], log=log)]
    df = pd.DataFrame(rows)
    df.attrs["fidelity"] = fidelity
    return df


def summarise(df: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    main = df[df["part"] == "main"]
    key = ["hosts", "seed"]
    none = main[main["agent"] == "none"].groupby(key)["train_s"].mean()
    piped = main[main["agent"] == "none+overlap"].groupby(key)["train_s"].mean()
    main = main.assign(
        vs_none=[r.train_s / none[(r.hosts, r.seed)] for r in main.itertuples()],
        vs_pipelined=[
            r.train_s / piped[(r.hosts, r.seed)] if (r.hosts, r.seed) in piped else float("nan")
            for r in main.itertuples()
        ],
    )
    table = (
        main.groupby(["hosts", "link_rate", "agent"], sort=False)
        .agg(
            train_s=("train_s", "mean"),
            vs_none=("vs_none", "mean"),
            vs_none_worst=("vs_none", "max"),
            vs_pipelined=("vs_pipelined", "mean"),
            fetch_s=("fetch_s", "mean"),
            compute_s=("compute_s", "mean"),
            fetch_share=("fetch_share", "mean"),
            fetched_vs_none=("remote_fetched", "sum"),
            runs=("train_s", "size"),
        )
        .reset_index()
    )
    sampled = main.groupby(["hosts", "link_rate", "agent"], sort=False)["remote_sampled"].sum().to_numpy()
    table["fetched_vs_none"] = table["fetched_vs_none"] / sampled
    lines = []
    for hosts, t in table.groupby("hosts"):
        others = t[~t["agent"].isin(["none", "none+overlap"])]
        best = others.loc[others["vs_none"].idxmin()]
        share = t.loc[t["agent"] == "none", "fetch_share"].iloc[0]
        lines.append(
            f"{hosts} hosts at {t['link_rate'].iloc[0]} (fetch {share:.0%} of a no-prefetch epoch): best "
            f"{best['agent']} {best['vs_none']:.3f}x no prefetch, {best['vs_pipelined']:.3f}x pipelined "
            f"DistDGL"
        )
    return "; ".join(lines) + ".", table


def plot(df: pd.DataFrame, path: str) -> str:
    """Training time per epoch against link rate, one line per agent (2 hosts, seed 0)."""

    sweep = df[df["part"] == "sweep"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for agent, g in sweep.groupby("agent", sort=False):
        g = g.assign(bits=g["link_rate"].map(parse_rate)).sort_values("bits")
        ax.plot(g["bits"] / 1e6, g["train_s"], marker="o", label=agent)
    ax.set_xscale("log")
    rates = sorted({parse_rate(r) / 1e6 for r in sweep["link_rate"]})
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("link rate per host (Mbit/s)")
    ax.set_ylabel("training time of one epoch (s)")
    ax.set_title("synth-small on 2 emulated hosts (one run per point)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


FIDELITY_AGENTS = ("none", "static", "lookahead")
#: (hosts, link rate) of the out-of-sample study: two host counts, two rates each
FIDELITY_CELLS = ((2, "400mbit"), (2, "150mbit"), (4, "400mbit"), (4, "150mbit"))


def _live_parts(trace: str) -> dict:
    """The slowest trainer's measured sampling, fetch and compute seconds in a recorded live run."""
    t = Trace(trace)
    sums = [t.rank(r).table()[["sample_s", "fetch_s", "compute_s"]].sum() for r in t.ranks]
    slowest = max(sums, key=lambda s: float(s.sum()))
    return {f"live_{k}": float(v) for k, v in slowest.items()}


def replay_slowest(trace: Trace, agent_name: str, **agent_kwargs) -> dict:
    """``trace`` replayed with agent ``agent_name`` on every rank: the result of the rank with the most modelled
    seconds (a job ends with its slowest trainer)."""
    import rudder.env  # noqa: F401  (registers the environments)
    from rudder.env.contract import buffer_kwargs
    from rudder.env.replay_env import ReplayEnv

    from rudder.evaluation.play import play_episode
    from rudder.evaluation.registry import make_agent

    slowest = None
    for rank in trace.ranks:
        agent = make_agent(agent_name, **agent_kwargs)
        res = play_episode(ReplayEnv(trace, rank=rank, **buffer_kwargs(agent.settings)), agent)
        if slowest is None or res["time_s"] > slowest["time_s"]:
            slowest = res
    return slowest


def fidelity_study(
    cells=None, agents=FIDELITY_AGENTS, reps: int = 3, epochs: int = 2, keep: str | None = None, log=_log
) -> pd.DataFrame:
    """Replay checked against live runs it was not fitted to.

    For every (hosts, link rate) cell: ``reps`` interleaved rounds of one live run per agent (A B C A B C ...), each
    recording its trace (kept under ``keep`` if given); then every trace replayed with every agent. A row is one
    (trace, replayed agent) pair: its modelled time against the mean measured time of the replayed agent's live
    runs (``time_error``), beside that agent's run-to-run spread (``live_sd_s``, ``live_n``), and where each time
    went (the slowest trainer's sampling, fetch and compute seconds, modelled and measured means). ``in_sample``
    marks a trace replayed with its own agent; the other rows are out of sample: a time model fitted on one agent's
    run predicts another agent's runs."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or tmp
        for hosts, rate in cells or FIDELITY_CELLS:
            live: dict[str, list[tuple[dict, str]]] = {a: [] for a in agents}
            with EmulatedCluster(hosts, link_rate=rate) as c:
                for rep in range(reps):
                    for agent in agents:
                        log(f"  live {agent} on {hosts} hosts at {rate}, round {rep + 1} of {reps}")
                        trace = os.path.join(folder, f"{hosts}-{rate}-{agent}-{rep}")
                        run = live_run(agent, 0, epochs, extra=("--cluster", c.name), parts=None, trace=trace)
                        live[agent].append((run, trace))
            measured = {a: np.array([r["train_s"] for r, _ in runs]) for a, runs in live.items()}
            parts = {a: pd.DataFrame([_live_parts(t) for _, t in runs]).mean() for a, runs in live.items()}
            for source in agents:
                for rep, (_, trace) in enumerate(live[source]):
                    t = Trace(trace)
                    for agent_name in agents:
                        slowest = replay_slowest(t, agent_name)
                        target = measured[agent_name]
                        rows.append(
                            dict(
                                hosts=hosts,
                                link_rate=rate,
                                trace_of=source,
                                trace_round=rep,
                                replayed_agent=agent_name,
                                in_sample=agent_name == source,
                                replay_s=slowest["time_s"],
                                live_mean_s=float(target.mean()),
                                live_sd_s=float(target.std(ddof=1)) if len(target) > 1 else float("nan"),
                                live_n=len(target),
                                time_error=slowest["time_s"] / float(target.mean()) - 1,
                                **{f"replay_{k}": slowest[f"time_{k}"] for k in ("sample_s", "fetch_s", "compute_s")},
                                **parts[agent_name].to_dict(),
                            )
                        )
                        log(
                            f"  {hosts} hosts at {rate}: {source}'s trace {rep + 1} replayed with {agent_name}: "
                            f"{rows[-1]['replay_s']:.2f} s vs {target.mean():.2f} s live "
                            f"({rows[-1]['time_error']:+.1%})"
                        )
    return pd.DataFrame(rows)


def fidelity_rankings(df: pd.DataFrame) -> pd.DataFrame:
    """Per cell and agent pair whose live means differ by more than two standard errors: whether replay, from each
    trace, orders the pair as live runs do. ``agree`` is the share of traces that order it right."""
    out = []
    for (hosts, rate), cell in df.groupby(["hosts", "link_rate"], sort=False):
        live = cell.groupby("replayed_agent")[["live_mean_s", "live_sd_s", "live_n"]].first()
        per_trace = cell.pivot_table(index=["trace_of", "trace_round"], columns="replayed_agent", values="replay_s")
        names = list(live.index)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                diff = live.loc[a, "live_mean_s"] - live.loc[b, "live_mean_s"]
                sd = np.hypot(live.loc[a, "live_sd_s"], live.loc[b, "live_sd_s"])
                se = float(sd / np.sqrt(live.loc[a, "live_n"]))
                replay_diff = per_trace[a] - per_trace[b]
                out.append(
                    dict(
                        hosts=hosts,
                        link_rate=rate,
                        pair=f"{a} vs {b}",
                        live_diff_s=diff,
                        live_diff_se_s=se,
                        separated=abs(diff) > 2 * se,
                        replay_diff_s=float(replay_diff.mean()),
                        agree=float((np.sign(replay_diff) == np.sign(diff)).mean()),
                    )
                )
    return pd.DataFrame(out)


def fidelity_summary(df: pd.DataFrame, ranks: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The study in a paragraph and a table per cell: out-of-sample |error| of total time (median, worst) beside the
    live run-to-run spread, ranking agreement on the pairs live runs separate, and where the error comes from: the
    mean of (modelled - measured) sampling, fetch and compute seconds of the slowest trainer over the measured run
    time, out of sample (``from_*``; ``from_other``: the rest, time a trainer spends outside those three live)."""
    oos = df[~df["in_sample"]].copy()
    for part in ("sample_s", "fetch_s", "compute_s"):
        oos[f"from_{part[:-2]}"] = (oos[f"replay_{part}"] - oos[f"live_{part}"]) / oos["live_mean_s"]
    oos["from_other"] = oos["time_error"] - oos[["from_sample", "from_fetch", "from_compute"]].sum(axis=1)
    cells = []
    for (hosts, rate), cell in oos.groupby(["hosts", "link_rate"], sort=False):
        spread = (
            cell.groupby("replayed_agent")["live_sd_s"].first() / cell.groupby("replayed_agent")["live_mean_s"].first()
        )
        own = df[(df["hosts"] == hosts) & (df["link_rate"] == rate) & df["in_sample"]]
        sep = ranks[(ranks["hosts"] == hosts) & (ranks["link_rate"] == rate) & ranks["separated"]]
        cells.append(
            dict(
                hosts=hosts,
                link_rate=rate,
                oos_median_abs_error=float(cell["time_error"].abs().median()),
                oos_worst_abs_error=float(cell["time_error"].abs().max()),
                oos_mean_error=float(cell["time_error"].mean()),
                in_sample_worst_abs_error=float(own["time_error"].abs().max()),
                **{k: float(cell[k].mean()) for k in ("from_sample", "from_fetch", "from_compute", "from_other")},
                live_cv_worst=float(spread.max()),
                pairs_separated=len(sep),
                pairs_ranked_right=int((sep["agree"] == 1.0).sum()),
            )
        )
    table = pd.DataFrame(cells)
    med, worst = oos["time_error"].abs().median(), oos["time_error"].abs().max()
    sep = ranks[ranks["separated"]]
    return (
        f"Out of sample (a time model fitted on one agent's live run predicting another agent's live runs, "
        f"{len(oos)} pairs over {len(table)} cells): median |error| of total time {med:.1%} (target <= 3%), worst "
        f"{worst:.1%} (target <= 6%); the live run-to-run spread (coefficient of variation, worst agent per cell) is "
        f"{table['live_cv_worst'].min():.1%}-{table['live_cv_worst'].max():.1%}. Replay orders "
        f"{int((sep['agree'] == 1.0).sum())} of {len(sep)} agent pairs that live runs separate (means more than two "
        f"standard errors apart) as the live runs do, from every trace (every replay: "
        "`bench/results/p2r_replay_fidelity.csv`, the pairs: `bench/results/p2r_replay_ranking.csv`)."
    ), table


LONG_EPOCHS = 16  # P3c's normal-priority arm: long enough for the LLM to finish decisions (the aim: >= 10 per trainer)


def llm_hidden_on_cluster(quick: bool, log=_log) -> tuple[str, pd.DataFrame]:
    """The link-level LLM agent live on 2 emulated hosts (the main rate), deciding in the background at idle
    priority, against the same decisions applied instantly (``--agent recorded`` on its trace), pairs back to back;
    ``ppo-link`` and ``none`` beside them for scale. Trainers wait on the wire here, so the LLM can use those gaps.
    Unless ``quick``, one more pair runs :data:`LONG_EPOCHS` epochs with the LLM's thread at normal priority: at idle
    priority on these cores it may finish no decision at all, and the pair shows what its decisions cost when it
    does make them."""

    rows = []
    epochs = 1 if quick else 2
    with tempfile.TemporaryDirectory() as tmp, EmulatedCluster(2, link_rate=MAIN[2]) as c:
        for rnd in range(1 if quick else 2):
            llm_trace = os.path.join(tmp, f"llm-{rnd}")
            for label, agent, extra, trace in (
                ("none", "none", (), None),
                ("llm-link", "llm-link", ("--decisions", "async"), llm_trace),
                ("same decisions, instant", "recorded", ("--decisions-from", llm_trace), None),
                ("ppo-link", "ppo-link", (), None),
            ):
                log(f"  2 hosts at {MAIN[2]}: {label} round {rnd + 1}")
                trace = trace or os.path.join(tmp, f"{agent}-{rnd}")
                r = live_run(agent, 0, epochs, extra=("--cluster", c.name, *extra), parts=None, trace=trace)
                rows.append(dict(r, agent=label, round=rnd))
        if not quick:  # long enough for the LLM to finish decisions: its thread at normal priority
            llm_trace = os.path.join(tmp, "llm-normal")
            for label, agent, extra, trace in (
                (
                    "llm-link, normal priority",
                    "llm-link",
                    ("--decisions", "async", "--decision-priority", "normal"),
                    llm_trace,
                ),
                (
                    "same decisions, instant (normal)",
                    "recorded",
                    ("--decisions-from", llm_trace),
                    os.path.join(tmp, "recorded-normal"),
                ),
            ):
                log(f"  2 hosts at {MAIN[2]}: {label}, {LONG_EPOCHS} epochs")
                r = live_run(agent, 0, LONG_EPOCHS, extra=("--cluster", c.name, *extra), parts=None, trace=trace)
                rows.append(dict(r, agent=label, round=0))
    df = pd.DataFrame(rows)
    by = df.set_index(["agent", "round"])["train_s"]
    short = df[df["agent"] == "none"]["round"].unique()
    ratio = [by[("llm-link", r)] / by[("same decisions, instant", r)] for r in short]
    none = df[df["agent"] == "none"].set_index("round")["train_s"]
    df["vs_none"] = [r.train_s / none[r.round] if len(r.epoch_s) == epochs else np.nan for r in df.itertuples()]
    llm = df[df["agent"] == "llm-link"]
    text = (
        f"On 2 emulated hosts at {MAIN[2]}, the link-level LLM (SmolLM2-135M) deciding in the background at idle "
        f"priority trains in {np.mean(ratio):.3f}x the time of its own decisions applied instantly (worst "
        f"{max(ratio):.3f}x; target <= 1.05x); {llm['decisions'].mean():.0f} decisions per trainer, p50 latency "
        f"{llm['latency_p50_s'].median():.2f} s. Time vs no prefetch: llm-link "
        f"{df[df['agent'] == 'llm-link']['vs_none'].mean():.3f}, its decisions instantly "
        f"{df[df['agent'] == 'same decisions, instant']['vs_none'].mean():.3f}, ppo-link "
        f"{df[df['agent'] == 'ppo-link']['vs_none'].mean():.3f}."
    )
    if ("llm-link, normal priority", 0) in by.index:
        long = df[df["agent"] == "llm-link, normal priority"].iloc[0]
        text += (
            f" At normal priority over {LONG_EPOCHS} epochs: {long['decisions']:.0f} decisions per trainer "
            f"(p50 latency {long['latency_p50_s']:.2f} s), training "
            f"{long['train_s'] / by[('same decisions, instant (normal)', 0)]:.3f}x the same decisions applied "
            f"instantly ({long['train_s']:.1f} s vs {by[('same decisions, instant (normal)', 0)]:.1f} s)."
        )
    return text, df
