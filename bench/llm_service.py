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

from rudder.agents.llm.client import EndpointClient
from rudder.agents.llm.server import DEFAULT_IDLE_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE2 = os.path.join(ROOT, "traces", "samples", "small-metis2-f10x25")
TRACE4 = os.path.join(ROOT, "traces", "samples", "small-metis4-f10x25")
OUT = os.path.join(ROOT, "bench", "results", "p8_llm_service.csv")
ABUSE_OUT = os.path.join(ROOT, "bench", "results", "service_abuse.csv")

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


def start_service(extra=(), env=None, stderr=None, model: str = "smollm2") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rudder.agents.llm.server", "--model", model, "--port", "0", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
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
    p.add_argument(
        "--parts", default="latency,batching,memory", help="which of latency,batching,memory,abuse to measure"
    )
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
    parts = args.parts.split(",")
    if "abuse" in parts:
        text, df = summarise_abuse(abuse(clients=max(args.clients, 50)))
        print(text)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        df.to_csv(ABUSE_OUT, index=False)
        if parts == ["abuse"]:
            return 0
    proc, url = start_service()
    try:
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


# ---------------------------------------------------------------------------------------------- load and abuse


def _status(pid: int) -> dict:
    """VmRSS, VmHWM (MB) and Threads of a running process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(rest)
    return out


def _raw(port: int, data: bytes, then=None, timeout: float = 10.0) -> tuple[int, float]:
    """Send ``data`` (then run ``then(sock)`` beside, e.g. streaming a body); the answer's status and the seconds
    until its status line came."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(data)
        if then is not None:
            threading.Thread(target=then, args=(sock,), daemon=True).start()
        line = sock.makefile("rb").readline()
        return (int(line.split()[1]) if line else 0), time.perf_counter() - t0


def _post(path: str, data: bytes, token: str | None, length: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {length if length is not None else len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


def abuse(quick: bool = False, clients: int = 50, decisions: int = 1, model: str = "smollm2"):
    """The real SmolLM2 service (a job's token, default limits) under what a shared node may send it, all
    on 127.0.0.1 and bounded in count and time: ``clients`` trainer-like agents (the 4-partition trace's ranks)
    each asking ``decisions`` decisions at once; a decision's latency idle and beside a running 1500-token
    generation; a 5 MB body and a 20k-token prompt; malformed requests; 200 idle connections; a client hanging up
    on a generation; a prompt at the model's context (the largest request it scores); the service's threads,
    resident and peak memory throughout."""
    import json
    import secrets
    import tempfile
    import urllib.request

    import pandas as pd
    from rudder.agents.llm.agent import LLMAgent

    rows = []

    def row(key, what, value, unit, n=1):
        rows.append(dict(key=key, what=what, value=round(float(value), 4), unit=unit, n=n))
        print(f"{key:<32} {value:>10.3f} {unit:<8} {what}", flush=True)

    token = secrets.token_urlsafe(32)
    log = tempfile.NamedTemporaryFile("w+", prefix="rudder-llm-abuse-", suffix=".log", delete=False)
    proc, url = start_service(env={"RUDDER_LLM_TOKEN": token}, stderr=log, model=model)
    port = int(url.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {token}"}
    saved = os.environ.get("RUDDER_LLM_TOKEN")
    os.environ["RUDDER_LLM_TOKEN"] = token  # the trainers' environment, as the launcher gives it
    threads_peak = [0]

    def sample():
        while proc.poll() is None and not stop_sampling.is_set():
            try:
                threads_peak[0] = max(threads_peak[0], _status(proc.pid)["Threads"])
            except OSError:
                return
            time.sleep(0.05)

    stop_sampling = threading.Event()
    threading.Thread(target=sample, daemon=True).start()

    def phase(name):
        row(f"rss_peak {name}", f"service peak RSS (VmHWM) {name}", _status(proc.pid)["VmHWM"], "MB")

    def stats():
        req = urllib.request.Request(url + "/stats", headers=auth)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    try:
        first = LLMAgent(endpoint=url, model=model)
        tokenizer = first.tokenizer
        agents = [first] + [LLMAgent(endpoint=url, model=(None, tokenizer)) for _ in range(clients - 1)]
        n_idle = 3  # the 4-partition sample trace has 6 decision points per rank: 3 idle, 3 beside a generation
        work = {r: points(TRACE4, r, 2 * n_idle) for r in range(4)}
        prompts = {r: [first.prompt(o, i) for o, i in work[r]] for r in range(4)}
        for r in range(4):
            agents[r].warm_up(work[r][0][1])
        row("rss_warm", "service RSS, model loaded and 4 ranks' prefixes kept", _status(proc.pid)["VmRSS"], "MB")

        # a decision's latency, idle and beside a running long generation
        def decide(agent, text):
            t0 = time.perf_counter()
            agent.option_scores(text.prefix, text.suffix)
            return time.perf_counter() - t0

        # decisions not asked before (only the trainer's prefix is kept for them); those beside the generation
        # below are others, equally new
        idle = [decide(first, t) for t in prompts[0][:n_idle]]
        row(
            "decision_idle_p50",
            "one decision (2 options scored), service idle",
            statistics.median(idle),
            "s",
            len(idle),
        )
        # a 1500-token generation (greedy: it runs its length) asked over a raw connection, hung up on afterwards
        import socket

        s0 = stats()
        gen_sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = b'{"prompt": "Once upon a time, there was a cache", "max_tokens": 1500, "temperature": 0}'
        gen_sock.sendall(_post("/v1/completions", body, token))
        deadline = time.monotonic() + 300
        while stats()["generation_steps"] < s0["generation_steps"] + 20 and time.monotonic() < deadline:
            time.sleep(0.1)  # past its prefill, decoding
        busy = [decide(first, t) for t in prompts[0][n_idle : 2 * n_idle]]
        steps = stats()["generation_steps"] - s0["generation_steps"]
        gen_sock.close()  # the client hangs up: the service should cancel the rest of the 1500 tokens
        t0 = time.perf_counter()
        while stats()["cancelled"] == s0["cancelled"] and time.perf_counter() - t0 < 10:
            time.sleep(0.05)
        cancel_s = time.perf_counter() - t0
        time.sleep(1.0)
        s1 = stats()
        row(
            "decision_beside_generation_p50",
            "one decision while a max_tokens=1500 generation runs",
            statistics.median(busy),
            "s",
            len(busy),
        )
        row("decision_beside_generation_max", "slowest of those", max(busy), "s", len(busy))
        row("generation_steps_meanwhile", "generation steps (tokens) taken during those decisions", steps, "steps")
        row(
            "hangup_cancelled",
            "the generation cancelled after its client hung up (1: yes)",
            s1["cancelled"] - s0["cancelled"],
            "",
        )
        row("hangup_cancel_s", "seconds from the hang-up to the cancellation", cancel_s, "s")
        row(
            "hangup_steps_left",
            "generation steps of it computed after that",
            s1["generation_steps"] - s0["generation_steps"] - steps,
            "steps",
        )
        phase("after the long generation")

        # trainer-like clients, all at once
        barrier = threading.Barrier(clients)
        lat, errors = [], []

        def trainer(i):
            agent, r = agents[i], i % 4
            try:
                agent.warm_up(work[r][0][1])
                barrier.wait(600)
                own = prompts[r]  # the rank's decision points, each trainer from its own place among them
                for k in range(decisions):
                    text = own[((i // 4) * decisions + k) % len(own)]
                    lat.append(decide(agent, text))
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(f"{type(exc).__name__}: {exc}")

        s0 = stats()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=trainer, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
        s1 = stats()
        retries = sum(a.client.retries for a in agents)
        row(
            "trainers_errors",
            f"{clients} trainers x {decisions} decisions at once: decisions that failed",
            len(errors),
            "",
        )
        row("trainers_retries", "connections the clients retried (refused, reset or 503)", retries, "")
        row(
            "trainers_refused",
            "requests the service turned away (503: all connections or its token queue full)",
            s1["refused_connections"] - s0["refused_connections"] + s1["refused_busy"] - s0["refused_busy"],
            "",
        )
        row("trainers_decisions_per_s", "decisions answered per second", len(lat) / wall, "dec/s", len(lat))
        row(
            "trainers_latency_p50",
            "a decision's latency among them",
            statistics.median(lat) if lat else float("nan"),
            "s",
            len(lat),
        )
        row("trainers_latency_max", "slowest decision among them", max(lat) if lat else float("nan"), "s", len(lat))
        if errors:
            print("errors:", *errors[:5], sep="\n  ")
        phase(f"after {clients} trainers")

        # oversized: a 5 MB body (refused unread), a 20k-token prompt (97 KB: refused after counting)
        size = 5 << 20

        def stream(sock):
            try:
                for _ in range(size // 65536):
                    sock.sendall(b"x" * 65536)
            except OSError:
                pass

        status, took = _raw(port, _post("/v1/completions", b"", token, length=str(size)), then=stream)
        row("body_5mb_status", "5 MB body: HTTP status", status, "")
        row("body_5mb_refused_s", "5 MB body: seconds until the refusal arrived", took, "s")
        big = json.dumps(dict(prompt="The cache hit rate " * 5000, max_tokens=0, echo=True, logprobs=0)).encode()
        status, took = _raw(port, _post("/v1/completions", big, token))
        row("prompt_20k_status", f"~20k-token prompt ({len(big) // 1024} KB): HTTP status", status, "")
        row("prompt_20k_refused_s", "~20k-token prompt: seconds until refused", took, "s")

        # malformed requests, other methods, no token: all 4xx, none 5xx
        bad = [
            _post("/v1/completions", b"{not json", token),
            _post("/v1/completions", b'{"prompt": "caf\xe9"}', token),
            _post("/v1/completions", b'{"prompt": "\\ud800"}', token),
            _post("/v1/completions", b'{"prompt": "a", "seed": "x"}', token),
            _post("/v1/completions", b'{"prompt": "a", "temperature": NaN}', token),
            _post("/v1/completions", b'{"prompt": "a", "temperature": true}', token),
            _post("/v1/completions", b"[" * 100000, token),
            _post("/v1/completions", b"", token, length="-1"),
            _post("/v1/completions", b"", token, length="abc"),
            _post("/v1/completions", b'{"prompt": "a"}', None),
            b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        statuses = [_raw(port, b)[0] for b in bad]
        row(
            "malformed_4xx",
            f"malformed or unauthorised requests answered 4xx (of {len(bad)})",
            sum(400 <= s < 500 for s in statuses),
            "",
        )
        row("malformed_5xx", "of those answered 5xx", sum(s >= 500 for s in statuses), "")

        # 200 idle connections: threads stay bounded, they are closed after the idle timeout
        idle_socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
        time.sleep(1.0)
        threads_open = _status(proc.pid)["Threads"]
        time.sleep(DEFAULT_IDLE_TIMEOUT_S + 2)
        closed = 0
        for s in idle_socks:
            s.settimeout(0.5)
            try:
                s.recv(65536)  # a 503 or the end of the connection: either way, not left open
                closed += 1
            except OSError:  # still open: nothing came within 0.5 s
                pass
            s.close()
        row("idle_200_threads", "service threads with 200 idle connections open", threads_open, "threads")
        row(
            "idle_200_answered_or_closed",
            f"of them closed (503 or after {DEFAULT_IDLE_TIMEOUT_S:g} s idle)",
            closed,
            "",
        )

        phase("before the context-sized prompt")
        context = stats()["context_tokens"]
        ids = tokenizer("The cache hit rate rose. " * 3000, add_special_tokens=False)["input_ids"][: context - 16]
        t0 = time.perf_counter()
        got = EndpointClient(url).echo_logprobs([tokenizer.decode(ids)])
        row(
            "context_prompt_s",
            f"a {len(got[0]['token_logprobs'])}-token prompt scored (context {context})",
            time.perf_counter() - t0,
            "s",
        )
        status = _status(proc.pid)
        stop_sampling.set()
        row("threads_peak", "service threads, peak over the whole bench", threads_peak[0], "threads")
        row("rss_end", "service RSS at the end", status["VmRSS"], "MB")
        row("rss_peak", "service peak RSS (VmHWM) over the whole bench", status["VmHWM"], "MB")
        log.seek(0)
        text = log.read()
        row("log_tracebacks", "tracebacks in the service's log", text.count("Traceback"), "")
        row("log_bytes", "the service's log (stderr), bytes", len(text.encode()), "B")
    finally:
        stop_sampling.set()
        if saved is None:
            os.environ.pop("RUDDER_LLM_TOKEN", None)
        else:
            os.environ["RUDDER_LLM_TOKEN"] = saved
        proc.terminate()
        proc.wait(30)
        log.close()
        os.unlink(log.name)
    return pd.DataFrame(rows)


def summarise_abuse(df) -> tuple:
    v = dict(zip(df["key"], df["value"]))
    text = (
        "The real SmolLM2 service (a job token, default limits), all traffic on 127.0.0.1. "
        f"{int(v['trainers_errors'])} failed decisions among 50 trainer-like agents asking at once "
        f"({int(v['trainers_retries'])} retried connections, {int(v['trainers_refused'])} turned away); a decision "
        f"took {v['decision_idle_p50']:.2f} s idle and {v['decision_beside_generation_p50']:.2f} s (max "
        f"{v['decision_beside_generation_max']:.2f} s) beside a running 1500-token generation, which was cancelled "
        f"{v['hangup_cancel_s']:.2f} s after its client hung up; a 5 MB body got "
        f"{int(v['body_5mb_status'])} in {v['body_5mb_refused_s'] * 1000:.0f} ms, a ~20k-token prompt "
        f"{int(v['prompt_20k_status'])} in {v['prompt_20k_refused_s']:.2f} s; {int(v['malformed_5xx'])} of the "
        f"malformed requests got a 5xx; peak RSS {v['rss_peak']:.0f} MB (a prompt at the model's context "
        f"included), peak {int(v['threads_peak'])} threads, {int(v['log_tracebacks'])} tracebacks in the log."
    )
    return text, df
