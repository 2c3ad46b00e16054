"""Real DistDGL jobs on MPI ranks (graph servers, trainers, DGL RPC, DDP over gloo) on this host."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import end_job, partition_bytes_checked, record_fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rudder-cache"))


@pytest.fixture(scope="module")
def run_train(free_port_block):
    """``run_train(args, cache, mpiexec_n=None, timeout=240, port=None)``: ``train.py gnn`` as a subprocess."""
    return lambda *a, **kw: _run_train(free_port_block, *a, **kw)


def _run_train(free_port_block, args, cache, mpiexec_n=None, timeout=240, port=None):
    port = port or free_port_block()
    cmd = [sys.executable, TRAIN, "gnn", *args, "--port", str(port)]
    if mpiexec_n:
        cmd = ["mpiexec", "-n", str(mpiexec_n)] + cmd
    env = dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def tagged_segments(job: str | None = None):
    """Shared-memory segments of rudder jobs on one host: of the job with tag ``job`` (its summary's ``job``), or
    of any job (other jobs on the machine included)."""
    return [p for p in glob.glob(f"/dev/shm/{job or 'rd'}*") if os.path.basename(p)[8:9] == "m"]


SMALL = ["--parts", "2", "--epochs", "2", "--batch-size", "100", "--period", "4", "--fanout", "3,5"]


def test_two_partitions_trains_and_reports(record_live):
    """A 2-partition synth-tiny job with the periodic agent (2 epochs; the run ``record_live`` shares with test_envs
    and test_evaluate) trains, learns and reports."""
    run = record_live("periodic", "--check-env")
    s = run["summary"]
    for key in (
        "graph",
        "parts",
        "trainers_per_part",
        "partition",
        "model",
        "fanout",
        "batch_size",
        "epochs",
        "hidden",
        "lr",
        "seed",
        "buffer_fraction",
        "buffer_init",
        "alpha",
        "period",
        "admit_on_miss",
    ):
        assert key in s["config"]
    num_classes = s["graph"]["num_classes"]
    assert s["val_acc"] > 2.0 / num_classes and s["test_acc"] > 2.0 / num_classes
    assert len(s["ranks"]) == 2
    for r in s["ranks"]:
        assert r["remote_sampled"] > 0
        assert r["hits"] + r["misses"] == r["remote_sampled"]
        assert r["remote_fetched"] == r["misses"] + r["prefetched"]
        # rows the DistTensor pulls returned for other partitions' nodes: what the buffer fetched, and background
        # chunks still on their way when training ended (pulled, never used)
        assert r["remote_rows_pulled"] == r["remote_fetched"] + r["remote_rows_discarded"]
        assert r["prefetched"] > r["initial_fill"] > 0  # periodic prefetched beyond the initial fill
        assert len(r["epoch_time_s"]) == 2
        assert r["sample_s"] > 0 and r["fetch_s"] > 0 and r["compute_s"] > 0
    assert "hit rate" in run["stdout"] and "val_acc=" in run["stdout"]
    assert s["job"].startswith("rd") and not tagged_segments(s["job"])


@pytest.mark.parametrize("agent, overlap", [("none", True), ("static", False), ("periodic", True)])
def test_served_rows_are_the_disttensor_rows(run_train, agent, overlap, id_graph, cache, tmp_path):
    """Every input row, buffer hits included, equals a direct DistTensor pull and encodes its original node id:
    each trainer reads its own partition (the one-host fixes) and the buffer serves exact rows, also when they
    were pulled during the previous minibatch's compute (--overlap-fetch)."""
    summary_path = tmp_path / "run.json"
    proc = run_train(
        [
            "--graph",
            id_graph,
            *SMALL,
            "--agent",
            agent,
            "--verify-rows",
            "--buffer-init",
            "random",
            "--overlap-fetch" if overlap else "--no-overlap-fetch",
            "--summary",
            str(summary_path),
        ],
        cache,
        mpiexec_n=4 if agent == "static" else None,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    assert sorted(r["partition"] for r in s["ranks"]) == [0, 1]
    for r in s["ranks"]:
        v = r["verify"]
        assert v["rows_checked"] > 1000
        assert v["rows_differing_from_disttensor"] == 0
        assert v["rows_col0_not_orig_id"] == 0
        # the buffer's count of remote rows fetched is the count of rows the DistTensor pulls actually returned for
        # nodes of other partitions (initial fill and rows pulled ahead included), less those pulled but never used
        assert r["remote_rows_pulled"] == r["remote_fetched"] + r["remote_rows_discarded"]
        assert r["remote_fetched"] > 0
        if not overlap:  # static: nothing pulled ahead, no chunk after the fill
            assert r["remote_rows_discarded"] == 0
        if overlap:  # every minibatch but the first had its rows pulled during the one before (epochs included);
            # a background prefetch delivered meanwhile may have evicted some of its hits: then it pulled again
            assert r["overlapped_minibatches"] + r["overlap_mismatches"] == r["minibatches"] - 1
            assert r["overlapped_minibatches"] > r["overlap_mismatches"]
        else:
            assert r["overlapped_minibatches"] == r["overlap_mismatches"] == 0
        if agent == "none":
            assert r["buffer_capacity"] == 0 and r["hits"] == 0 and r["remote_fetched"] == r["remote_sampled"]
        elif agent == "static":
            assert r["buffer_capacity"] == round(0.25 * r["halo_nodes"])
            assert r["prefetched"] == r["initial_fill"] == r["buffer_capacity"] and r["evicted"] == 0
            assert r["hits"] > 0
        else:
            assert r["prefetched"] > r["initial_fill"] and r["evicted"] > 0


@pytest.mark.parametrize("victim", ["trainer", "server"])
def test_a_dead_rank_ends_the_job_and_leaves_nothing(free_port_block, free_port, wait_for_rank, victim, cache):
    port = free_port_block()
    cmd = [
        sys.executable,
        TRAIN,
        "gnn",
        "--graph",
        "synth-tiny",
        "--parts",
        "2",
        "--epochs",
        "500",
        "--batch-size",
        "50",
        "--port",
        str(port),
    ]
    env = dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        st = wait_for_rank(cache, victim)
        pids = [json.load(open(p))["pid"] for p in glob.glob(os.path.join(cache, "jobs", "*", "status", "*.json"))]
        tag = os.path.basename(glob.glob(os.path.join(cache, "jobs", "*"))[0])  # this job's shm prefix
        time.sleep(3)  # let training start
        os.kill(st["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - t_kill
    finally:
        end_job(proc)
    assert proc.returncode != 0
    assert took < 60
    assert f"rudder: job failed: {st['describe']}" in err, err[-2000:]
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "ranks left running"
    assert not tagged_segments(tag)  # this job's (other jobs may be running on the machine)
    assert free_port(port) and free_port(port + 10)
    verdict = next(line for line in err.splitlines() if line.startswith("rudder: job failed:"))
    record_fault(
        f"killed {victim}",
        f"SIGKILL to {st['describe']} while training",
        took,
        verdict.split(" (log:")[0],
        left="nothing: processes, /dev/shm, ports",
        input_checked=partition_bytes_checked(cache),
    )


def test_bad_input_gets_one_line_errors(run_train, cache, tmp_path):
    proc = run_train(["--graph", "no-such-graph"], cache)
    assert proc.returncode == 2
    assert "rudder: error: unknown graph 'no-such-graph'" in proc.stderr
    assert "Traceback" not in proc.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        proc = run_train(["--graph", "synth-tiny"], cache, port=busy)
    assert proc.returncode == 2
    assert f"port {busy} is in use" in proc.stderr

    proc = run_train(["--graph", "synth-tiny", "--parts", "2"], cache, mpiexec_n=3)
    assert proc.returncode != 0
    assert "the job has 3 MPI ranks, expected 4" in proc.stderr


def test_missing_partition_files_are_named(run_train, cache):
    """A file gone from a cached partition is named before any rank starts (partitioned here directly: the error
    path is the point, not a training run)."""
    from rudder.runtime.config import TrainConfig
    from rudder.runtime.partition import ensure_partitions

    ensure_partitions(TrainConfig(graph="synth-tiny", parts=3, partition="random", cache_dir=cache), log=lambda m: None)
    victims = glob.glob(os.path.join(cache, "partitions", "synth-tiny-seed0-random3", "part1", "graph.dgl"))
    assert victims
    os.remove(victims[0])
    proc = run_train(["--graph", "synth-tiny", "--parts", "3", "--partition", "random"], cache)
    assert proc.returncode == 2
    assert "partition file" in proc.stderr and "part1/graph.dgl is missing" in proc.stderr


def test_two_jobs_at_once_pick_their_own_ports(run_train, cache, tmp_path):
    """Without --port, concurrent jobs on one host (self-launched and under the user's mpiexec) claim distinct port
    blocks, and neither's clean-up touches the other's shared memory (sampler workers use multiprocessing's). The
    second starts once the first is training, and the two runs' training intervals are checked to overlap."""
    args = [sys.executable, TRAIN, "gnn", "--graph", "synth-tiny", *SMALL, "--num-samplers", "1"]
    env = dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1")
    jobs_before = set(glob.glob(os.path.join(cache, "jobs", "*")))
    first = subprocess.Popen(
        args + ["--epochs", "12", "--summary", str(tmp_path / "a.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait_for_trainers(cache, jobs_before, 2)
        # under the user's own mpiexec: no supervisor, each rank removes its own shared memory when stopped
        second = subprocess.Popen(
            ["mpiexec", "-n", "4", *args, "--summary", str(tmp_path / "b.json")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            _, err_b = second.communicate(timeout=240)
        finally:
            end_job(second)
        _, err = first.communicate(timeout=240)
    finally:
        end_job(first)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0, err_b[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["config"]["port"] != b["config"]["port"]
    # truly at once: the second job trained while the first was still training
    a_start = min(r["train_start_unix"] for r in a["ranks"])
    a_end = max(r["train_end_unix"] for r in a["ranks"])
    b_start = min(r["train_start_unix"] for r in b["ranks"])
    b_end = max(r["train_end_unix"] for r in b["ranks"])
    assert max(a_start, b_start) < min(a_end, b_end), (a_start, a_end, b_start, b_end)
    assert not tagged_segments(a["job"]) and not tagged_segments(b["job"])


def _wait_for_trainers(cache, jobs_before, n, deadline_s=120):
    """Wait until a new job's ``n`` trainers have reported "started" (their DistDGL clients are connecting)."""
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        for job in set(glob.glob(os.path.join(cache, "jobs", "*"))) - jobs_before:
            states = []
            for path in glob.glob(os.path.join(job, "status", "rank*.json")):
                try:
                    states.append(json.load(open(path)))
                except (OSError, ValueError):
                    pass
            if sum(st["role"]["kind"] == "trainer" for st in states) >= n:
                return
        time.sleep(0.2)
    raise AssertionError("the first job's trainers never started")


def test_gat_model_trains_live(run_train, cache, tmp_path):
    """--model gat: a real 2-partition job trains GAT layers on the sampled blocks (1 epoch) and learns (with
    --prefetch inline, the path where rows pulled and rows the buffer counts must agree exactly)."""
    summary_path = tmp_path / "run.json"
    proc = run_train(
        [
            "--graph",
            "synth-tiny",
            *SMALL,
            "--epochs",
            "1",
            "--model",
            "gat",
            "--agent",
            "periodic",
            "--prefetch",
            "inline",
            "--summary",
            str(summary_path),
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    assert s["config"]["model"] == "gat"
    assert s["val_acc"] > 2.0 / s["graph"]["num_classes"]
    for r in s["ranks"]:
        assert r["minibatches"] > 0 and r["compute_s"] > 0
        # inline prefetch, nothing pulled ahead: every remote row pulled is one the buffer counted, and back
        assert r["remote_rows_pulled"] == r["remote_fetched"] > 0 and r["remote_rows_discarded"] == 0


def test_two_trainers_per_partition_live(run_train, cache, tmp_path):
    """--trainers-per-part 2: 2 servers + 4 trainers; each partition's training nodes are split between its two
    trainers, and every trainer runs its own buffer over its own partition's halo."""
    summary_path = tmp_path / "run.json"
    proc = run_train(
        [
            "--graph",
            "synth-tiny",
            *SMALL,
            "--epochs",
            "1",
            "--trainers-per-part",
            "2",
            "--agent",
            "periodic",
            "--summary",
            str(summary_path),
        ],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(summary_path.read_text())
    assert s["config"]["trainers_per_part"] == 2
    ranks = sorted(s["ranks"], key=lambda r: r["trainer_rank"])
    assert [r["trainer_rank"] for r in ranks] == [0, 1, 2, 3]
    assert [r["partition"] for r in ranks] == [0, 0, 1, 1]
    for a, b in (ranks[:2], ranks[2:]):
        assert a["halo_nodes"] == b["halo_nodes"] > 0  # one partition, one halo
        assert abs(a["minibatches"] - b["minibatches"]) <= 1  # its seeds split evenly (force_even)
    for r in ranks:
        assert r["minibatches"] > 0 and r["hits"] > 0
        assert r["remote_rows_pulled"] == r["remote_fetched"] + r["remote_rows_discarded"]
    assert not tagged_segments(s["job"])
