"""Evaluate prefetching agents against each other and against the oracles, on recorded traces or live.

    python evaluate.py                                   # the shipped sample traces, every agent and oracle
    python evaluate.py --traces DIR [DIR ...] --agents none,static,periodic,ppo,llm --out results/
    python evaluate.py --live --graph synth-small --parts 2 --agents none,periodic,llm
    python evaluate.py --live --graph synth-small --hosts 2 --link-rate 500mbit --agents none,periodic
    python evaluate.py --agents periodic,./my_agent.py:MyAgent --agent-kwargs threshold=0.5   # your own agent
    python evaluate.py --scenario bench/scenarios/square-8x-2s.json --agents none,lookahead   # synthetic conditions

Agents are built-in names, names installed packages register (``rudder.agents`` entry points), or references
``module.path:Class`` / ``path/to/file.py:Class`` (:mod:`rudder.evaluation.registry`). ``--agent-kwargs`` gives
constructor options: plain ``OPTIONS`` go to every agent given by reference or entry point, ``AGENT@OPTIONS`` to
that agent only (built-in ones included); ``OPTIONS`` is a JSON object or ``key=value,key2=value2``.

Prints a table per trace and overall (remote rows fetched relative to no prefetch, hit rate, distance to Belady
MIN, modelled or measured time relative to no prefetch, decision latency p50/p95, invalid LLM answers, and for
learned agents whether each trace rank was held out) and writes ``results.csv`` (one row per agent x trace x rank),
``hit_rate.png`` and ``traffic.png`` into ``--out``.

Learned agents (PPO, the LLM's few-shot examples) record content fingerprints of what they learned from; every
(agent, trace, rank) they were not held out on is left out of the tables and plots unless ``--include-trained-on``
(``results.csv`` keeps every row, with its ``provenance``). Modelled time comes with its fit per rank and its error
on another run of the same options (a trace's ``time-check-*.json``, or ``--time-check`` traces).

``--scenario FILE`` replays every agent and oracle (and the tuned constants' training traces) under a scenario of
exogenous conditions (:mod:`rudder.env.scenario`: a time-varying link, co-tenant traffic, a straggler) instead of
the recorded link: the rows say ``scenario`` and ``synthetic``, and the report says so at the top.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

from rudder.agents.llm.gates import REFERENCES, agent_kind, gate_section
from rudder.evaluation.report import format_report, headline, plot_hit_rate, plot_traffic
from rudder.traces import SAMPLES_DIR as SAMPLES
from rudder.traces import Trace, TraceError
from rudder.traces.timecheck import TimeCheck

DEFAULT_AGENTS = "none,static,vip,periodic,hitrate,lookahead,ppo,llm,ppo-link,llm-link,mpc"


def parse_args(argv=None, prog: str = "evaluate.py") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--traces",
        nargs="+",
        default=sorted(glob.glob(os.path.join(SAMPLES, "*"))),
        help="trace folders (default: the shipped samples)",
    )
    p.add_argument(
        "--agents",
        default=DEFAULT_AGENTS,
        help="comma-separated agents: built-in names, installed names (rudder.agents entry points), "
        "module.path:Class or path/to/file.py:Class",
    )
    p.add_argument(
        "--agent-kwargs",
        action="append",
        default=[],
        metavar="[AGENT@]OPTIONS",
        help="constructor options, a JSON object or key=value,key2=value2: plain ones for every agent "
        "given by reference or entry point, AGENT@OPTIONS for that agent only; repeatable",
    )
    p.add_argument(
        "--oracles",
        default="belady,hindsight,best-level,best-constant,tuned-constant,bound",
        help="comma-separated oracles ('' for none); best-constant, tuned-constant and bound give one row per "
        "action space (link-levels, keep-replace)",
    )
    p.add_argument(
        "--buffer-fraction",
        type=float,
        default=None,
        help="buffer size as a fraction of each rank's halo (default: the recorded run's)",
    )
    p.add_argument("--candidates", type=int, default=None, help="K candidates per decision (default: recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed for every episode")
    p.add_argument("--ppo-policy", default=None, help="PPO policy .zip (default: the shipped small policy)")
    p.add_argument(
        "--trust-policy",
        action="store_true",
        help="load the PPO policy even if its SHA-256 is not the one its sidecar records (loading a policy "
        "runs pickled code: only for a file from a source you trust)",
    )
    p.add_argument(
        "--llm-model",
        default=None,
        help="LLM: a local HF folder, a GGUF file or a model package (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--llm-endpoint",
        default=None,
        metavar="URL",
        help="LLM: ask this OpenAI-compatible completions endpoint (python -m rudder.agents.llm.server, vLLM, ...) "
        "instead of loading the model here; --llm-model names its tokenizer",
    )
    p.add_argument(
        "--llm-mode",
        default="score",
        choices=("score", "generate"),
        help="LLM decisions by scoring the options or by free generation",
    )
    p.add_argument(
        "--include-trained-on",
        action="store_true",
        help="keep (agent, trace, rank) pairs a learned agent was not held out on in the tables and plots",
    )
    p.add_argument(
        "--time-check",
        nargs="+",
        default=[],
        metavar="DIR",
        help="traces of other runs (same options and seed, another agent) to check the time model on",
    )
    p.add_argument(
        "--llm-gates",
        type=int,
        default=12,
        metavar="N",
        help="LLM agents: run the gates (rudder.agents.llm.gates: copy, sensitivity, entropy, accuracy vs the best "
        "constant answer, seconds regret vs it and vs ppo-link and mpc) on up to N held-out points of the traces, "
        "print them and write llm_gates.json (0: skip)",
    )
    p.add_argument(
        "--scenario",
        default=None,
        metavar="FILE",
        help="replay every agent and oracle under this scenario of exogenous conditions (JSON or YAML, "
        "rudder.env.scenario; examples in bench/scenarios/): synthetic results, marked so",
    )
    p.add_argument("--live", action="store_true", help="run the agents through the live env on --graph instead")
    p.add_argument("--graph", default="synth-small", help="--live: graph to train on")
    p.add_argument("--parts", type=int, default=2, help="--live: partitions")
    p.add_argument("--epochs", type=int, default=1, help="--live: epochs")
    p.add_argument(
        "--hosts", type=int, default=0, help="--live: run on this many emulated hosts (one partition each; root only)"
    )
    p.add_argument("--link-rate", default=None, help="--live with --hosts: each host's link rate, e.g. 500mbit")
    p.add_argument("--train-args", default="", help="--live: more train.py gnn options, quoted")
    p.add_argument("--out", default="results", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def builtin_options(name: str, args, trace: str = "", rank: int = 0) -> dict:
    """Constructor options evaluate.py's own flags give a built-in agent on ``trace`` rank ``rank``."""
    if name == "llm":
        return dict(
            model=args.llm_model,
            mode=args.llm_mode,
            log_path=os.path.join(args.out, f"llm-{trace}-rank{rank}.jsonl"),
            **({"endpoint": args.llm_endpoint} if args.llm_endpoint else {}),
        )
    if name == "llm-link":
        return dict(
            model=args.llm_model,
            log_path=os.path.join(args.out, f"llm-link-{trace}-rank{rank}.jsonl"),
            **({"endpoint": args.llm_endpoint} if args.llm_endpoint else {}),
        )
    if name == "ppo":
        return dict(path=args.ppo_policy, trust=args.trust_policy)
    if name == "ppo-link":
        return dict(trust=args.trust_policy)
    if name == "recorded":  # each trace's own recorded decisions, at their recorded minibatches
        folders = {os.path.basename(os.path.normpath(t)): t for t in args.traces}
        return dict(trace=folders.get(trace, args.traces[0] if args.traces else ""), rank=rank)
    return {}


def agent_factories(specs: list[str], labels: list[str], options: dict[str, dict], args) -> dict:
    """label -> factory(trace_name, rank) building a fresh agent: its built-in options (a per-rank log for the LLM,
    each trace's own decisions for ``recorded``) overridden by ``--agent-kwargs``."""
    from rudder.evaluation.registry import make_agent

    def factory(spec):
        return lambda trace, rank: make_agent(spec, **{**builtin_options(spec, args, trace, rank), **options[spec]})

    return {label: factory(spec) for spec, label in zip(specs, labels)}


def check_agents(specs: list[str], args) -> tuple[list[str], dict[str, dict]]:
    """Resolve every agent and its options once, before any replay, and build each one not built in (its name
    labels it): ``(labels, options per agent)``; raises ``ValueError`` (one line, e.g.
    :class:`~rudder.evaluation.registry.AgentError`) or ``OSError`` for an agent that cannot be found or built."""
    from rudder.evaluation.registry import (
        REGISTRY,
        agent_class,
        agent_kwargs_for,
        agent_labels,
        check_agent,
        make_agent,
    )

    for spec in specs:
        agent_class(spec)
    options = agent_kwargs_for(args.agent_kwargs, specs)
    names = {}
    for spec in specs:
        check_agent(spec, {**builtin_options(spec, args), **options[spec]})
        if spec not in REGISTRY:
            names[spec] = make_agent(spec, **options[spec]).name
    return agent_labels(specs, names), options


class ProgressBar:
    """One tqdm bar over the work items (agents and oracles x traces x ranks), with ETA: :meth:`start` names the item
    starting now and counts the one before it as done."""

    def __init__(self, total: int, enabled: bool = True, unit: str = "run"):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True, desc="evaluate"
        )
        self.running = False

    def start(self, item: str) -> None:
        self.finish()
        self.running = True
        self.bar.set_postfix_str(item)

    def finish(self) -> None:
        if self.running:
            self.bar.update(1)
            self.running = False

    def close(self) -> None:
        self.finish()
        self.bar.close()


def evaluate_traces(
    specs: list[str], labels: list[str], options: dict[str, dict], oracles: list[str], args, scenario=None
) -> list[dict]:
    """Every agent and oracle on every rank of ``args.traces``, replayed under ``scenario`` (a loaded
    :class:`~rudder.env.scenario.Scenario`) where one is given."""
    from rudder.evaluation.scoring import evaluate_trace

    factories = agent_factories(specs, labels, options, args)
    checks = [TimeCheck.from_trace(t) for t in args.time_check]
    ranks = {trace: len(Trace(trace).ranks) for trace in args.traces}  # a clear error for a bad folder, first
    for trace, usable in ranks.items():
        if not usable:
            raise TraceError(f"trace {trace}: no rank holds a minibatch (the run ended before any chunk was written)")
    bar = ProgressBar(sum(ranks.values()) * (len(specs) + len(oracles)), enabled=not args.no_progress)
    rows = []
    try:
        for trace in args.traces:
            rows += evaluate_trace(
                trace,
                factories,
                buffer_fraction=args.buffer_fraction,
                oracles=oracles,
                candidates=args.candidates,
                seed=args.seed,
                progress=bar.start,
                time_checks=checks,
                scenario=scenario,
            )
            bar.finish()
    finally:
        bar.close()
    return rows


def llm_gates(specs: list[str], labels: list[str], options: dict[str, dict], args) -> str | None:
    """The gates of every LLM agent (an :class:`~rudder.agents.llm.agent.LLMAgent`), as lines to print; None when
    there is none."""
    from rudder.agents.llm.agent import LLMAgent
    from rudder.evaluation.registry import agent_class, make_agent

    factories = agent_factories(specs, labels, options, args)
    agents = [
        (label, factories[label]("gates", 0))
        for spec, label in zip(specs, labels)
        if isinstance(agent_class(spec), type) and issubclass(agent_class(spec), LLMAgent)
    ]
    if not agents:
        return None
    # the link agents' seconds regret is also compared with PPO's and MPC's, asked at the same points
    references = {n: make_agent(n) for n in REFERENCES} if any(agent_kind(a) == "link" for _, a in agents) else None
    return gate_section(
        agents, args.traces, args.llm_gates, out=os.path.join(args.out, "llm_gates.json"), references=references
    )


def evaluate_live(specs: list[str], labels: list[str], options: dict[str, dict], args) -> list[dict]:
    """Each agent trains ``--graph`` for real (``train.py gnn``); rows from the run summaries, times measured."""
    from rudder.evaluation.registry import absolute_reference
    from rudder.evaluation.scoring import result_row

    rows = []
    trace_name = f"live-{os.path.basename(args.graph.rstrip('/'))}"
    bar = ProgressBar(len(specs), enabled=not args.no_progress)
    for spec, name in zip(specs, labels):
        bar.start(f"live {args.graph}: {name}")
        summary = os.path.join(args.out, f"live-{name.replace('/', '_')}.json")
        cmd = [
            sys.executable,
            "-m",
            "rudder.train",
            "gnn",
            "--graph",
            args.graph,
            "--parts",
            str(args.parts),
            "--epochs",
            str(args.epochs),
            "--agent",
            absolute_reference(spec),
            "--seed",
            str(args.seed),
            "--summary",
            summary,
            *args.train_args.split(),
        ]
        if options[spec]:
            cmd += ["--agent-kwargs", json.dumps(options[spec])]
        if spec == "llm" and args.llm_endpoint:
            cmd += ["--llm-endpoint", args.llm_endpoint]
        if args.hosts:
            cmd[cmd.index("--parts") + 1] = str(args.hosts)
            cmd += ["--hosts", str(args.hosts), *(["--link-rate", args.link_rate] if args.link_rate else [])]
        if args.buffer_fraction is not None:
            cmd += ["--buffer-fraction", str(args.buffer_fraction)]
        if args.trust_policy:
            cmd += ["--trust-policy"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            bar.close()
            raise RuntimeError(f"live run of {name} failed:\n{proc.stderr[-2000:]}")
        with open(summary) as f:
            s = json.load(f)
        for r in s["ranks"]:
            played = dict(
                remote_sampled=r["remote_sampled"],
                hits=r["hits"],
                remote_fetched=r["remote_fetched"],
                prefetched=r["prefetched"],
                initial_fill=r["initial_fill"],
                admitted_on_miss=r["admitted_on_miss"],
                time_s=sum(r["epoch_time_s"]),
                decisions=r.get("decisions", 0),
                latency_p50_s=r.get("latency_p50_s", 0.0),
                latency_p95_s=r.get("latency_p95_s", 0.0),
                window_hit_rate=[],
            )
            capacity, asynchronous = r["buffer_capacity"], r.get("asynchronous", False)
            rows.append(result_row(name, trace_name, r["trainer_rank"], capacity, played, asynchronous=asynchronous))
    bar.close()
    return rows


def main(argv=None, prog: str = "evaluate.py") -> int:
    args = parse_args(argv, prog)

    import pandas as pd

    from rudder.agents.ppo import read_policy_meta
    from rudder.env.settings import check_optional
    from rudder.evaluation.scoring import CONSTANT_ORACLES, ORACLES, load_scenario

    specs = list(dict.fromkeys(a.strip() for a in args.agents.split(",") if a.strip()))
    oracles = [] if args.live else [o for o in args.oracles.split(",") if o]
    bad = [o for o in oracles if o not in ORACLES]
    if bad:
        print(f"{prog}: error: unknown oracle {bad[0]!r}: oracles are {', '.join(ORACLES)}", file=sys.stderr)
        return 2
    if not specs and not oracles:
        print(f"{prog}: error: nothing to evaluate: --agents and --oracles are both empty", file=sys.stderr)
        return 2
    try:
        check_optional("buffer_fraction", args.buffer_fraction)
        check_optional("candidates", args.candidates)
        if "ppo" in specs:
            read_policy_meta(args.ppo_policy, trust=args.trust_policy)  # refused before any replay
        if args.live and args.scenario:
            raise ValueError("--scenario replays under synthetic conditions; --live runs on the real link")
        scenario = load_scenario(args.scenario)
        labels, options = check_agents(specs, args)
    except (ValueError, OSError) as exc:  # an AgentError, or the agent's own constructor refusing its options
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        if args.live:
            rows = evaluate_live(specs, labels, options, args)
        else:
            if not args.traces:
                raise ValueError("no traces given and no shipped samples found")
            rows = evaluate_traces(specs, labels, options, oracles, args, scenario)
    except (TraceError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    df = pd.DataFrame(rows)
    csv = os.path.join(args.out, "results.csv")
    df.drop(columns=["window_hit_rate", "window_hit_ceiling"], errors="ignore").to_csv(csv, index=False)
    print(format_report(df, include_trained_on=args.include_trained_on))
    if not args.live and args.llm_gates > 0:
        gates = llm_gates(specs, labels, options, args)
        if gates:
            note = "\n(the gates' labels come from the recorded conditions, not the scenario)" if scenario else ""
            print(gates + note)
    timed = [o for o in oracles if o == "best-level" or o in CONSTANT_ORACLES]
    if timed and not any(str(a).split(":")[0] in timed for a in set(df["agent"])):
        print(
            f"{', '.join(timed)}: not run: no rank's time fit separates remote rows (time is what they optimise), "
            "so no headroom either"
        )
    shown = headline(df, args.include_trained_on)
    plots = [plot_traffic(shown, os.path.join(args.out, "traffic.png"))]
    if not args.live:
        plots.append(plot_hit_rate(shown, os.path.join(args.out, "hit_rate.png")))
    print(f"\nwrote {csv}, " + ", ".join(plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
