"""Run rudder's benchmarks side by side and write BENCHMARKS.md.

python -m rudder.bench [--quick] [--only p4] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import time

import pandas as pd
from rudder.bench import decisions, end_to_end, faults, llm_decisions, llm_service, llm_size, scale, suite, traffic
from rudder.bench import headroom_map as hm

from rudder.headroom import measure, overall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = sorted(glob.glob(os.path.join(ROOT, "traces", "samples", "*")))
OUT_DIR = os.path.join(ROOT, "bench", "results")


def p4_replay_speed(quick: bool) -> tuple[str, pd.DataFrame]:
    from rudder.bench.replay_speed import measure

    rows = []
    for trace in SAMPLES:
        rows += measure(trace, repeats=1 if quick else 3)
    df = pd.DataFrame(rows)
    df["trace"] = df["trace"].map(os.path.basename)
    text = (
        f"Replay runs {df['speedup'].min():.0f}x to {df['speedup'].max():.0f}x faster than the live runs that "
        f"recorded the traces (target >= 100x); traces take {df['bytes_per_remote_id'].mean():.2f} bytes per "
        "remote id."
    )
    return text, df


def p1_traffic(quick: bool, agents=(), agent_kwargs=None) -> tuple[str, pd.DataFrame]:

    df = traffic.measure(
        quick, agents=[*traffic.AGENTS, *(a for a in agents if a not in traffic.AGENTS)], agent_kwargs=agent_kwargs
    )
    df.to_csv(os.path.join(OUT_DIR, "p1_traffic.csv"), index=False)
    traffic.plot(df, os.path.join(OUT_DIR, "p1_traffic.png"))
    traffic.plot_sample_ahead(df, os.path.join(OUT_DIR, "p1_sample_ahead.png"))
    return traffic.summarise(df)


def p2_end_to_end(quick: bool, agents=(), agent_kwargs=None) -> tuple[str, pd.DataFrame]:

    df = end_to_end.measure(quick, agents=agents, agent_kwargs=agent_kwargs)
    df.to_csv(os.path.join(OUT_DIR, "p2_end_to_end.csv"), index=False)
    return end_to_end.summarise(df)


def p2c_cluster(quick: bool) -> tuple[str, pd.DataFrame]:
    from rudder.bench import cluster

    df = cluster.measure(quick)
    fidelity = df.attrs.pop("fidelity")
    df.drop(columns=["trace", "epoch_s"]).to_csv(os.path.join(OUT_DIR, "p2c_cluster.csv"), index=False)
    fidelity.to_csv(os.path.join(OUT_DIR, "p2c_replay_fidelity.csv"), index=False)
    cluster.plot(df, os.path.join(OUT_DIR, "p2c_link_rate.png"))
    text, table = cluster.summarise(df)
    worst = fidelity.groupby("arrivals")["time_error"].apply(lambda e: e.abs().max())
    text += (
        f"\n\nReplay of each recorded run (2 hosts, seed 0) with its own agent: hits and rows fetched "
        f"identical in {int(fidelity['same_hits_and_rows'][fidelity['arrivals'] == 'recorded'].sum())} of "
        f"{int((fidelity['arrivals'] == 'recorded').sum())} runs with the recorded arrivals; modelled training "
        f"time within {worst.get('recorded', float('nan')):.1%} of the measured one (recorded arrivals), "
        f"{worst.get('modelled', float('nan')):.1%} with arrivals from the link model "
        f"(`bench/results/p2c_replay_fidelity.csv`, plot `bench/results/p2c_link_rate.png`).\n\n"
        + fidelity.to_markdown(index=False, floatfmt=".3g")
    )
    return text, table


def p2r_replay_fidelity(quick: bool) -> tuple[str, pd.DataFrame]:
    from rudder.bench import cluster

    keep = os.environ.get("RUDDER_BENCH_KEEP_TRACES")  # a folder to keep the study's traces in, for a closer look
    df = cluster.fidelity_study(reps=2 if quick else 3, cells=cluster.FIDELITY_CELLS[:1] if quick else None, keep=keep)
    df.to_csv(os.path.join(OUT_DIR, "p2r_replay_fidelity.csv"), index=False)
    ranks = cluster.fidelity_rankings(df)
    ranks.to_csv(os.path.join(OUT_DIR, "p2r_replay_ranking.csv"), index=False)
    return cluster.fidelity_summary(df, ranks)


def p3_llm_latency(quick: bool) -> tuple[str, pd.DataFrame]:

    text, df = end_to_end.llm_hidden_latency(quick)
    df.to_csv(os.path.join(OUT_DIR, "p3_llm_latency.csv"), index=False)
    return text, df


def p3c_llm_on_cluster(quick: bool) -> tuple[str, pd.DataFrame]:
    from rudder.bench import cluster

    text, df = cluster.llm_hidden_on_cluster(quick)
    df.to_csv(os.path.join(OUT_DIR, "p3c_llm_on_cluster.csv"), index=False)
    return text, df


def p5_llm_decisions(quick: bool) -> tuple[str, pd.DataFrame]:

    df = llm_decisions.measure(quick)
    df.to_csv(os.path.join(OUT_DIR, "p5_llm_decisions.csv"), index=False)
    return llm_decisions.summarise(df)


def p6_decisions(quick: bool) -> tuple[str, pd.DataFrame]:

    df = decisions.measure(quick)
    df.to_csv(os.path.join(OUT_DIR, "p6_decisions.csv"), index=False)
    text, table = decisions.summarise(df)
    decisions.plot(table, os.path.join(OUT_DIR, "p6_decisions.png"))
    return text + "\n\nPlot: `bench/results/p6_decisions.png`; rows: `bench/results/p6_decisions.csv`.", table


def headroom(quick: bool) -> tuple[str, pd.DataFrame]:

    if quick:  # the smallest shipped trace whose time fit separates remote rows
        traces = [os.path.join(ROOT, "traces", "samples", "small-random2-f5x10")]
    else:
        traces = [
            t
            for d in ("samples", "train", "heldout")
            for t in sorted(glob.glob(os.path.join(ROOT, "traces", d, "*", "")))
        ]
    df = measure(traces, progress=lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True))
    df.to_csv(os.path.join(OUT_DIR, "headroom.csv"), index=False)
    table = overall(df)
    kinds = set(table["kind"])
    text = (
        "Per trace and action space, summed over the ranks whose time fit separates remote rows: the best constant "
        "(one action held throughout, fastest in hindsight per rank), the optimum over action sequences within the "
        f"replay model ({'proved: a bound' if kinds == {'bound'} else 'not proved everywhere: a reference'}), "
        "headroom = 1 - bound / best constant, MPC's share of it, and the replay model's out-of-sample error band. "
        "Per rank: `bench/results/headroom.csv`; any trace: `rudder headroom TRACE...`."
    )
    return text, table


def p7_llm_size(quick: bool) -> tuple[str, pd.DataFrame]:

    df = llm_size.measure(quick)
    df.to_csv(os.path.join(OUT_DIR, "p7_llm_size.csv"), index=False)
    return llm_size.summarise(df)


def p9_scale(quick: bool) -> tuple[str, pd.DataFrame]:

    df = scale.measure(minibatches=100 if quick else 1024)
    df.to_csv(os.path.join(OUT_DIR, "p9_scale.csv"), index=False)
    return scale.summarise(df)


def service_abuse(quick: bool) -> tuple[str, pd.DataFrame]:

    df = llm_service.abuse(quick)
    df.to_csv(llm_service.ABUSE_OUT, index=False)
    return llm_service.summarise_abuse(df)


def headroom_map(quick: bool) -> tuple[str, pd.DataFrame]:

    # resumes from the CSV (run the sweep in pieces first if need be); --quick reports the cells measured so far
    df = hm.measure(max_cells=0 if quick else None)
    hm.plot(df, os.path.join(OUT_DIR, "headroom_map.png"))
    text, table = hm.summarise(df)
    missing = len(hm.cells()) - len(df)
    if missing:
        text = (
            f"**{missing} of {len(hm.cells())} cells not measured yet** (`python -m rudder.bench.headroom_map`).\n\n"
            + text
        )
    return text + "\n\nHeatmaps: `bench/results/headroom_map.png`; every cell: `bench/results/headroom_map.csv`.", table


def scenario_suite(quick: bool) -> tuple[str, pd.DataFrame]:

    # the traces come from `python -m rudder.bench.suite --record` (real jobs, ~1.5 min each); this replays them
    df = suite.measure(quick)
    text, table = suite.summarise(df)
    return text + "\n\nEvery row: `bench/results/suite.csv`; traces and scenario files: `traces/suite/`.", table


def faults_reliability(quick: bool) -> tuple[str, pd.DataFrame]:

    df = faults.measure()
    df.to_csv(os.path.join(OUT_DIR, "faults.csv"), index=False)
    return faults.summarise(df)


SECTIONS = {
    "p1": ("P1 traffic against Belady MIN", p1_traffic),
    "p2": ("P2 end-to-end training time, P3 env overhead, memory", p2_end_to_end),
    "p2c": ("P2 on the emulated cluster: training time over shaped links", p2c_cluster),
    "p2r": ("P2 replay fidelity on the emulated cluster", p2r_replay_fidelity),
    "p3": ("P3 hidden LLM latency", p3_llm_latency),
    "p3c": ("P3 on the emulated cluster: the link-level LLM's hidden latency", p3c_llm_on_cluster),
    "p4": ("P4 replay speed", p4_replay_speed),
    "p5": ("P5 LLM decisions", p5_llm_decisions),
    "p6": ("P6 decisions that matter: link-budget levels, headroom, regret, held out", p6_decisions),
    "headroom": ("Headroom", headroom),
    "p7": ("P7 LLM size curve on link-budget decisions", p7_llm_size),
    "p9": ("P9 replay at papers100M scale (issue 14's 'P5')", p9_scale),
    "headroom-map": ("Headroom map", headroom_map),
    "suite": ("Scenario suite: agents on link conditions recorded live", scenario_suite),
    "faults": ("Reliability: injected faults", faults_reliability),
    "service": ("Reliability: the LLM decision service under load and abuse", service_abuse),
}


def main(argv=None, prog: str = "python -m rudder.bench") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few-minute version")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="markdown report to write")
    p.add_argument(
        "--agents",
        default="",
        help="more agents to measure beside the built-in ones in P1 (traffic) and P2 (live time): "
        "names or references (module.path:Class, path/to/file.py:Class), comma-separated",
    )
    p.add_argument(
        "--agent-kwargs",
        action="append",
        default=[],
        metavar="[AGENT@]OPTIONS",
        help="constructor options for --agents, as in evaluate.py; repeatable",
    )
    args = p.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        print(f"bench: error: unknown section(s) {', '.join(unknown)}: expected {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    from rudder.evaluation.registry import agent_kwargs_for, check_agent

    agents = [a.strip() for a in args.agents.split(",") if a.strip()]
    try:
        agent_kwargs = agent_kwargs_for(args.agent_kwargs, agents)
        for a in agents:
            check_agent(a, agent_kwargs[a])
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    extra = dict(agents=agents, agent_kwargs=agent_kwargs)
    cmd = ("python -m rudder.bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    os.makedirs(OUT_DIR, exist_ok=True)
    done: dict[str, str] = {}  # the sections this run wrote; every other one is kept as the file has it now
    header = [
        "# rudder benchmarks",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "",
    ]
    for key in chosen:
        title, fn = SECTIONS[key]
        print(f"[bench] {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        text, df = fn(args.quick, **(extra if key in ("p1", "p2") else {}))
        print(f"\n## {title}\n{text}\n{df.to_string(index=False)}", flush=True)
        done[title] = "\n".join(
            [
                f"## {title}",
                "",
                f"`{cmd}` on {time.strftime('%Y-%m-%d %H:%M %Z')} ({time.perf_counter() - t0:.0f} s)",
                "",
                text,
                "",
                df.to_markdown(index=False, floatfmt=".3g"),
                "",
            ]
        )
        _write(args.out, header, done)  # keep what is done if a later section fails
    print(f"\nwrote {args.out}")
    return 0


def _read_sections(path: str) -> dict[str, str]:
    """The ``## title`` sections of an earlier report, by title, in order (analysis sections included)."""
    if not os.path.exists(path):
        return {}
    out, title, lines = {}, None, []
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith("## "):
                if title:
                    out[title] = "\n".join(lines)
                title, lines = line[3:].strip(), [line]
            elif title:
                lines.append(line)
    if title:
        out[title] = "\n".join(lines)
    return out


def _write(path: str, header: list[str], done: dict[str, str]) -> None:
    """Write the report: this run's sections replace theirs; the others (earlier results, analysis written by
    hand, even while this run went on) are read back from the file as it is now."""
    sections = {**_read_sections(path), **done}
    order = [t for t, _ in SECTIONS.values()]
    # the hand-written summary table opens the report; other hand-written sections follow the measured ones
    ordered = sorted(
        sections, key=lambda t: -1 if t.startswith("Summary") else order.index(t) if t in order else len(order)
    )
    with open(path, "w") as f:
        f.write("\n".join(header + [sections[t] for t in ordered]) + "\n")
