"""Real DistDGL jobs across emulated hosts (``train.py gnn --hosts N`` / ``--cluster NAME``): DGL's several-host mode
unpatched over shaped links, every served row checked, and nothing left behind after success, SIGINT or a dead
rank."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import end_job
from rudder.baselines.policies import Periodic
from rudder.env.replay_env import ReplayEnv
from rudder.traces import Trace

from rudder.evaluation.play import play_episode
from rudder.runtime.procs import alive
from rudder.testbed.cluster import ClusterError, EmulatedCluster, parse_rate, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SMALL = ["--epochs", "1", "--batch-size", "100", "--fanout", "3,5", "--period", "4"]
RATE = "400mbit"

try:
    preflight()
    REASON = None
except ClusterError as exc:
    REASON = str(exc)
pytestmark = [pytest.mark.dist, pytest.mark.skipif(REASON is not None, reason=f"no emulated hosts here: {REASON}")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rudder-cache"))


@pytest.fixture(scope="module")
def cluster():
    with EmulatedCluster(2, link_rate=RATE) as c:
        yield c


def train(args, cache, **kw):
    env = dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, TRAIN, "gnn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


def cluster_of(stderr: str) -> str:
    """The name of the cluster a job brought up, from its start-up line."""
    m = re.search(r"emulated hosts \(rd-(\w+)-h0", stderr)
    assert m, stderr[-2000:]
    return m.group(1)


def leftovers(name: str) -> list[str]:
    """What a cluster named ``name`` could leave: namespaces, links, its run dir, processes in its hosts."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out = [line for line in (netns + links).splitlines() if f"rd-{name}-" in line]
    out += glob.glob(f"/run/rudder-cluster/{name}")
    return out


def test_a_job_on_two_hosts_serves_exact_rows_over_the_shaped_link(cluster, id_graph, cache, tmp_path):
    measured = cluster.measure_throughput(0, 1, seconds=1.5)
    assert abs(measured / parse_rate(RATE) - 1) < 0.25, f"{measured / 1e6:.0f} Mbit/s on a {RATE} link"
    summary, trace = tmp_path / "run.json", tmp_path / "trace"
    proc = train(
        [
            "--graph",
            id_graph,
            "--cluster",
            cluster.name,
            *SMALL,
            "--verify-rows",
            "--agent",
            "periodic",
            "--summary",
            str(summary),
            "--trace",
            str(trace),
        ],
        cache,
    )
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads(summary.read_text())
    assert s["one_host"] is False and s["config"]["parts"] == 2
    assert s["emulated_cluster"]["hosts"] == cluster.hostnames and s["emulated_cluster"]["link_rate"] == RATE
    assert "on 2 emulated hosts, links 400mbit" in out
    for r in s["ranks"]:
        v = r["verify"]
        assert v["rows_checked"] > 1000 and v["rows_differing_from_disttensor"] == 0 and v["rows_col0_not_orig_id"] == 0
        assert r["remote_fetched"] > 0 and r["prefetched"] > r["initial_fill"]
        assert r["prefetch"] == "background" and 0 < r["prefetch_used"] <= r["prefetched"] - r["initial_fill"]
    replay_matches_the_live_run(str(trace), s)


def replay_matches_the_live_run(trace: str, summary: dict) -> None:
    """The run replayed with its own agent: with the recorded prefetch arrivals, hits and rows fetched are the
    live run's exactly; with arrivals from the link model too here (one arrival per decision on this small run);
    modelled training time within 10% of the measured one either way."""
    for rank, live in enumerate(summary["ranks"]):
        table = Trace(trace).rank(rank).table()
        live_s = float((table["sample_s"] + table["fetch_s"] + table["compute_s"]).sum())
        for follow in (True, False):
            res = play_episode(ReplayEnv(trace, rank=rank, follow_recorded=follow), Periodic())
            assert (res["hits"], res["remote_fetched"], res["prefetched"]) == (
                live["hits"],
                live["remote_fetched"],
                live["prefetched"],
            ), f"rank {rank}, follow={follow}"
            assert abs(res["time_s"] / live_s - 1) < 0.10, (res["time_s"], live_s)


def test_a_scenario_is_played_on_the_links_and_kept_in_the_trace(cluster, cache, tmp_path):
    """--scenario: the links' rates change on the scenario's schedule while the job runs (a square wave, 8x slower
    half the time), a co-tenant on host 1 sends a real competing flow, host 0 is a straggler under a CPU cap, every
    link gets its rate back at the end, and
    the trace keeps what was played (conditions.json) on each rank's clock: replay of it is not synthetic, puts
    minibatches in slow phases and models the run slower than a replay at the base rate does."""
    from rudder.env.scenario import Scenario

    scenario = tmp_path / "sq.json"
    square = dict(type="square", period_s=2.0, high=1.0, low=0.125)
    link = dict(kind="link", hosts="all", timeline=square)
    cotenant = dict(kind="cotenant", hosts=[1], timeline=dict(type="constant", value=0.5))
    straggler = dict(kind="straggler", hosts=[0], factor=2.0)
    procs = [link, cotenant, straggler]
    scenario.write_text(json.dumps(dict(version=1, name="sq-live", duration_s=2.0, processes=procs)))
    trace = tmp_path / "trace"
    args = ["--graph", "synth-small", "--cluster", cluster.name, "--epochs", "1", "--batch-size", "1000"]
    args += ["--fanout", "10,25", "--scenario", str(scenario), "--trace", str(trace)]
    proc = train(args, cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "rudder: playing scenario sq-live on the 2 links from the first minibatch" in err
    assert "link-rate changes played" in err
    record = json.loads((trace / "conditions.json").read_text())
    assert record["base_rate"] == RATE and record["hosts"] == 2
    assert "straggler: host 0's processes capped" in err
    assert record["cpu_cores"] == [os.cpu_count() / 2 / 2.0, None]  # half of host 0's even share of the CPUs
    assert record["cotenant"] == "flow" and record["cotenant_bytes"][0] == 0
    assert record["cotenant_bytes"][1] > 1e6  # host 1's co-tenant carried real traffic (half of 400mbit when fast)
    for host in (0, 1):
        changes = [(t, f) for t, h, f in record["changes"] if h == host]
        assert {f for _, f in changes} == ({1.0, 0.125} if host == 0 else {0.5, 0.0625}) and len(changes) >= 4
        late = [t - k for k, (t, _) in enumerate(changes)]  # one a second, each set by a tc command
        assert min(late) >= 0 and max(late) < 1.0 and sorted(late)[len(late) // 2] < 0.25, late
        shown = subprocess.run(["tc", "-n", cluster.hostnames[host], "qdisc", "show"], capture_output=True, text=True)
        assert "rate 400Mbit" in shown.stdout  # back at the base rate
    base = Scenario.from_dict(dict(version=1, name="base", processes=[]))
    for rank in Trace(str(trace)).ranks:
        env = ReplayEnv(str(trace), rank=rank)
        assert not env.synthetic and env.scenario.name == "sq-live-as-played"
        assert abs(env.run.start_unix - record["played_from_unix"]) < 1.0  # played from the first minibatch
        met = env.conditions
        rates = [met.rate_at(t) for t in env.run.recorded_clock()]
        assert 0 < sum(r < max(rates) for r in rates) < env.run.num_minibatches  # some minibatches in slow phases
        as_met = play_episode(env, Periodic())["time_s"]
        at_base = play_episode(ReplayEnv(str(trace), rank=rank, scenario=base), Periodic())["time_s"]
        assert as_met > at_base * 1.02, (as_met, at_base)


def test_hosts_option_brings_a_cluster_up_and_down(cache, tmp_path):
    summary = tmp_path / "run.json"
    proc = train(
        [
            "--graph",
            "synth-tiny",
            "--hosts",
            "2",
            "--link-rate",
            RATE,
            *SMALL,
            "--agent",
            "static",
            "--summary",
            str(summary),
        ],
        cache,
    )
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    s = json.loads(summary.read_text())
    assert s["one_host"] is False and s["config"]["hosts"] == 2 and s["config"]["link_rate"] == RATE
    assert leftovers(cluster_of(err)) == []


@pytest.mark.parametrize("fault", ["sigint", "trainer"])
def test_an_interrupted_or_failed_job_leaves_nothing(fault, cache, wait_for_rank):
    proc = train(
        [
            "--graph",
            "synth-tiny",
            "--hosts",
            "2",
            "--link-rate",
            RATE,
            "--epochs",
            "300",
            "--batch-size",
            "50",
            "--fanout",
            "3,5",
        ],
        cache,
    )
    try:
        trainer = wait_for_rank(cache, "trainer", machine=1, deadline_s=120)
        time.sleep(4)  # training under way
        if fault == "sigint":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(trainer["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        end_job(proc)
    if fault == "sigint":
        assert proc.returncode == 130, err[-2000:]
    else:
        assert proc.returncode != 0
        assert f"rudder: job failed: {trainer['describe']}" in err and "rd-" in trainer["describe"], err[-2000:]
    assert took < 30
    assert leftovers(cluster_of(err)) == []
    assert not alive(trainer["pid"])  # gone (a zombie waiting for init to reap it counts as gone)
