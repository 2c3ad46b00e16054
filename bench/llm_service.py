"""P6: the LLM decision service (one model per host) against one model per trainer process.

    python -m rudder.bench.llm_service [--decisions 8] [--clients 4]

- latency per decision: the agent with the local model vs the agent asking the service (SmolLM2-135M, both warm,
  prefix cached), on the first asked decision points of the first sample trace, rank 0;
- batching: ``--clients`` agents (the ranks of the 4-partition sample trace: different system prompts) each asking
  ``--decisions`` decisions, one client after another vs all at once; decisions per second and scoring batches;
- memory per host: ``--clients`` processes that each build the LLM agent with its own model and take one decision,
  vs one service + ``--clients`` processes whose agents ask it: resident (RSS) and proportional (PSS) memory of all
  of them together, measured while all are alive.

With ``--train``: also a real ``train.py gnn`` job (synth-tiny, 2 partitions x 2 trainers, the LLM agent) with
``--llm-service auto`` (one service for the host's 4 trainers) and ``off`` (a model in every trainer): the peak of
the summed PSS of the job's processes (sampled every 0.5 s), its wall time, and the LLM decisions taken.

Writes ``bench/results/p8_llm_service.csv`` and prints a markdown summary. Timings on a shared 2-core machine are
noisy: medians are reported.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE2 = os.path.join(ROOT, "traces", "samples", "small-metis2-f10x25")
TRACE4 = os.path.join(ROOT, "traces", "samples", "small-metis4-f10x25")
OUT = os.path.join(ROOT, "bench", "results", "p8_llm_service.csv")

CHILD = r"""
import os, sys, json
sys.path.insert(0, {root!r})
from rudder.bench.llm_service import points
from rudder.agents.llm.agent import LLMAgent
agent = LLMAgent(**json.loads(sys.argv[1]))
obs, info = points({trace!r}, int(sys.argv[2]), 1)[0]
agent.warm_up(info)
agent.act(obs, info)
print("ready", flush=True)
sys.stdin.read()
"""


def points(trace: str, rank: int, n: int) -> list:
    """The first ``n`` decision points with something to admit, replaying periodic."""
    from rudder.bench.llm_decisions import decision_points

    return decision_points(trace, n, rank)[0]


def start_service(extra=()) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rudder.agents.llm.server", "--model", "smollm2", "--port", "0", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    m = re.search(r"on (http://\S+)/v1", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("the LLM service did not start")
    return proc, m.group(1)


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process, kB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key] = int(rest.split()[0])
    return out["Rss"], out["Pss"]


def children_memory(kwargs: dict, clients: int, extra_pids=()) -> tuple[float, float]:
    """Start ``clients`` agent processes (rank r of the 4-partition trace each), wait until each decided once,
    measure RSS and PSS of them and ``extra_pids`` together (MB)."""
    import json

    code = CHILD.format(root=ROOT, trace=TRACE4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(kwargs), str(r % 4)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        for r in range(clients)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        rss = pss = 0
        for pid in [p.pid for p in procs] + list(extra_pids):
            r, s = memory_kb(pid)
            rss, pss = rss + r, pss + s
        return rss / 1024, pss / 1024
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def train_memory(service: str) -> dict:
    """Peak summed PSS (MB) of a real LLM training job's processes, its wall time and decisions."""
    import json
    import tempfile

    summary = os.path.join(tempfile.mkdtemp(prefix="p6-"), "run.json")
    cmd = [
        sys.executable,
        "train.py",
        "gnn",
        "--graph",
        "synth-tiny",
        "--parts",
        "2",
        "--trainers-per-part",
        "2",
        "--epochs",
        "1",
        "--agent",
        "llm",
        "--llm-service",
        service,
        "--summary",
        summary,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    peak = 0.0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        total = 0
        for pid in _descendants(proc.pid):
            try:
                total += memory_kb(pid)[1]
            except (OSError, KeyError):
                pass
        peak = max(peak, total / 1024)
        time.sleep(0.5)
    reader.join(5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train.py --llm-service {service} failed: {''.join(out)[-1500:]}")
    with open(summary) as f:
        s = json.load(f)
    decisions = sum(int(r.get("decisions", 0) or 0) for r in s["ranks"])
    return dict(peak_pss_mb=peak, wall_s=wall, decisions=decisions, log="".join(out))


def batching(url: str, clients: int, decisions: int, row) -> None:
    """``clients`` agents (ranks of the 4-partition trace) asking ``decisions`` decisions each: one client after
    another, then all at once."""
    import json
    import urllib.request

    from rudder.agents.llm.agent import LLMAgent

    agents = [LLMAgent(endpoint=url) for _ in range(clients)]
    work = [[a.prompt(o, i) for o, i in points(TRACE4, r % 4, decisions)] for r, a in enumerate(agents)]
    for a, w in zip(agents, work):  # warm: each client's prefix is kept by the service
        a.warm_up(points(TRACE4, agents.index(a) % 4, 1)[0][1])

    def run(r):
        for t in work[r]:
            agents[r].option_scores(t.prefix, t.suffix)

    def batches():
        with urllib.request.urlopen(url + "/stats") as resp:
            return json.load(resp)["batches"]

    n = sum(map(len, work))
    b0, t0 = batches(), time.perf_counter()
    for r in range(clients):
        run(r)
    seq, b1 = time.perf_counter() - t0, batches()
    threads = [threading.Thread(target=run, args=(r,)) for r in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conc, b2 = time.perf_counter() - t0, batches()
    row("throughput_sequential", f"decisions/s, {clients} clients one after another", n / seq, "dec/s", n)
    row("throughput_concurrent", f"decisions/s, {clients} clients at once", n / conc, "dec/s", n)
    row("batches_sequential", "scoring batches the service ran, one after another", b1 - b0, "batches", n)
    row("batches_concurrent", "scoring batches the service ran, at once", b2 - b1, "batches", n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rudder.bench.llm_service", description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=6)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--parts", default="latency,batching,memory", help="which of latency,batching,memory to measure")
    p.add_argument("--train", action="store_true", help="also measure real train.py jobs (see above)")
    p.add_argument("--train-only", action="store_true", help="only the train.py jobs")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import pandas as pd
    from rudder.agents.llm.agent import LLMAgent

    rows = []

    def row(key, what, value, unit, n):
        rows.append(dict(key=key, what=what, value=round(float(value), 4), unit=unit, n=n))
        print(f"{key:<28} {value:>10.3f} {unit:<8} {what}", flush=True)

    if args.train or args.train_only:
        for service in ("auto", "off"):
            got = train_memory(service)
            print(got.pop("log"))
            row(
                f"train_{service}_peak_pss",
                f"train.py gnn synth-tiny 2x2 trainers --agent llm --llm-service {service}: peak summed PSS of the job",
                got["peak_pss_mb"],
                "MB",
                got["decisions"],
            )
            row(f"train_{service}_wall", "same job, wall time", got["wall_s"], "s", got["decisions"])
        if args.train_only:
            os.makedirs(os.path.dirname(OUT), exist_ok=True)
            pd.DataFrame(rows).to_csv(OUT.replace(".csv", "_train.csv"), index=False)
            return 0
    proc, url = start_service()
    try:
        parts = args.parts.split(",")
        # latency per decision, local vs service
        pts = points(TRACE2, 0, args.decisions)
        for label, agent in (("local", LLMAgent()), ("endpoint", LLMAgent(endpoint=url))) if "latency" in parts else ():
            agent.warm_up(pts[0][1])
            lat = []
            for obs, info in pts:
                text = agent.prompt(obs, info)
                t0 = time.perf_counter()
                agent.option_scores(text.prefix, text.suffix)
                lat.append(time.perf_counter() - t0)
            row(
                f"latency_{label}_p50",
                f"seconds per scored decision, {label} (warm, prefix cached)",
                statistics.median(lat),
                "s",
                len(lat),
            )
            row(f"latency_{label}_min", f"fastest scored decision, {label}", min(lat), "s", len(lat))
        if "batching" in parts:
            batching(url, args.clients, args.decisions, row)
        # memory per host
        if "memory" in parts:
            rss, pss = children_memory(dict(endpoint=url), args.clients, [proc.pid])
            row(
                "memory_service_rss",
                f"RSS, service + {args.clients} agent processes asking it",
                rss,
                "MB",
                args.clients,
            )
            row(
                "memory_service_pss",
                f"PSS, service + {args.clients} agent processes asking it",
                pss,
                "MB",
                args.clients,
            )
    finally:
        proc.terminate()
        proc.wait()
    if "memory" in parts:
        rss, pss = children_memory({}, args.clients)
        row("memory_local_rss", f"RSS, {args.clients} agent processes with their own model", rss, "MB", args.clients)
        row("memory_local_pss", f"PSS, {args.clients} agent processes with their own model", pss, "MB", args.clients)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    pd.DataFrame(rows).to_csv(OUT, index=False)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
