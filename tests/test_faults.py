"""Faults a cluster job meets, injected for real: a hung trainer (SIGSTOP), a killed launcher, damaged partition
files, damaged traces, bad settings and a policy file that is not the one recorded. Each asserts what the user
sees (one line naming the problem), how soon, and that nothing is left behind (process, /dev/shm segment, port,
job folder, port lock). The figures of docs/reliability.md's fault table come from these (``-n 0 -s`` prints them)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import METIS2, METIS4, RANDOM2, ROOT, TRAIN, end_job, partition_bytes_checked, record_fault
from rudder.traces import Trace

EVALUATE = os.path.join(ROOT, "evaluate.py")
TINY = ["--graph", "synth-tiny", "--parts", "2", "--batch-size", "100", "--fanout", "3,5"]


def _env(cache: str) -> dict:
    return dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _run(cmd: list[str], cache: str = "/nonexistent-cache", timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd``; its wall seconds (start-up and imports included: the time a user waits for the error) are
    the result's ``took``."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(cache), cwd=ROOT)
    proc.took = time.monotonic() - t0
    return proc


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ traces


def _read_all(directory):
    """Everything the reader gives for rank 0: ids, table, decisions, seeds, static arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rank = Trace(directory).rank(0)
        return (
            rank.minibatch_ids(),
            rank.table(),
            rank.decisions(),
            rank.minibatch_seeds(),
            {k: v.copy() for k, v in rank.static.items()},
        )


def _same(a, b) -> bool:
    ids_a, table_a, dec_a, seeds_a, _ = a
    ids_b, table_b, dec_b, seeds_b, _ = b
    if len(ids_a) != len(ids_b) or not all(np.array_equal(x, y) for x, y in zip(ids_a, ids_b)):
        return False
    if not table_a.equals(table_b) or not dec_a[["minibatch", "latency_s"]].equals(dec_b[["minibatch", "latency_s"]]):
        return False
    if not all(np.array_equal(x, y) for x, y in zip(dec_a["ids"], dec_b["ids"])):
        return False
    if (seeds_a is None) != (seeds_b is None):
        return False
    return seeds_a is None or (
        len(seeds_a) == len(seeds_b) and all(np.array_equal(x, y) for x, y in zip(seeds_a, seeds_b))
    )


def test_damaged_trace_chunk_is_a_trace_error_or_reads_the_same(tmp_path):
    """Seeded fuzz over a shipped chunk: truncations, bit flips anywhere, and bit flips in the zip structure (local
    headers, central directory). Every outcome is a TraceError naming the chunk, or exactly the clean data."""
    from rudder.traces import TraceError

    shutil.copy(os.path.join(RANDOM2, "trace.json"), tmp_path)
    shutil.copytree(os.path.join(RANDOM2, "rank0"), tmp_path / "rank0")
    clean = _read_all(tmp_path)
    chunk = tmp_path / "rank0" / "chunk-000000.npz"
    original = chunk.read_bytes()
    rng = np.random.default_rng(13)
    outcomes = {"clean": 0, "TraceError": 0}
    slowest, first = 0.0, ""
    t0 = time.monotonic()
    for case in range(400):
        data = bytearray(original)
        kind = case % 4
        if kind == 0:
            data = data[: int(rng.integers(len(data)))]
        else:  # 1: anywhere; 2: the central directory and end record; 3: the first bytes of each member
            pos = {
                1: lambda: rng.integers(len(data)),
                2: lambda: len(data) - 1 - rng.integers(2048),
                3: lambda: rng.integers(len(data)) // 4096 * 4096 + rng.integers(120),
            }[kind]()
            data[int(pos)] ^= 1 << int(rng.integers(8))
        chunk.write_bytes(bytes(data))
        t_case = time.monotonic()
        try:
            got = _read_all(tmp_path)
        except TraceError as exc:
            slowest = max(slowest, time.monotonic() - t_case)
            assert "chunk-000000.npz" in str(exc) and "\n" not in str(exc), str(exc)
            outcomes["TraceError"] += 1
            first = first or str(exc).replace(str(tmp_path), "DIR")
            continue
        assert _same(got, clean), f"case {case} (kind {kind}) changed the data silently"
        outcomes["clean"] += 1
    took = time.monotonic() - t0
    print(f"trace fuzz: 400 cases in {took:.1f} s: {outcomes}")
    assert outcomes["TraceError"] > 300 and outcomes["clean"] > 10
    assert took < 20
    record_fault(
        "damaged trace (fuzz)",
        "400 seeded truncations and bit flips of a shipped chunk (anywhere, zip directory, member headers)",
        slowest,
        f"TraceError: {first}",
        left="nothing (a read)",
        tried=400,
        detected=outcomes["TraceError"],
        clean=outcomes["clean"],
        lost_bytes=0,
    )


def test_renamed_seed_array_is_not_read_as_a_trace_without_seeds(tmp_path):
    """A damaged member name once turned a trace into "recorded without seeds" silently."""
    from rudder.traces import Trace, TraceError

    shutil.copy(os.path.join(METIS4, "trace.json"), tmp_path)
    shutil.copytree(os.path.join(METIS4, "rank0"), tmp_path / "rank0")
    chunk = tmp_path / "rank0" / "chunk-000000.npz"
    data = chunk.read_bytes()
    chunk.write_bytes(data.replace(b"seed_count.npy", b"seed_coUnt.npy"))
    t0 = time.monotonic()
    with (
        pytest.warns(Warning),
        pytest.raises(
            TraceError,
            match=r"chunk-000000\.npz holds an array this format does "
            r"not have: 'seed_coUnt\.npy'",
        ),
    ):
        Trace(tmp_path).rank(0).minibatch_seeds()
    record_fault(
        "damaged trace (fuzz)",
        "a chunk's member renamed (seed_count.npy -> seed_coUnt.npy)",
        time.monotonic() - t0,
        "TraceError: ... holds an array this format does not have: 'seed_coUnt.npy'",
        left="nothing (a read)",
    )


def test_trace_without_minibatch_says_so_at_open(tmp_path):
    from rudder.env.replay_env import ReplayEnv
    from rudder.traces import Trace, TraceError, TraceIncompleteWarning, TraceWriter

    TraceWriter(
        tmp_path,
        0,
        1,
        {"config": {"buffer_fraction": 0.25}},
        {"num_nodes": 10},
        {"halo_ids": np.arange(4), "halo_degree": np.ones(4), "initial_ids": np.arange(1)},
    )  # killed: no close
    t0 = time.monotonic()
    with pytest.warns(TraceIncompleteWarning, match="it holds no minibatch"):
        trace = Trace(tmp_path)
    with pytest.raises(TraceError, match="rank 0 of trace .* holds no minibatch .*nothing to replay") as got:
        ReplayEnv(trace, rank=0)
    record_fault(
        "damaged trace (fuzz)",
        "a trace killed before its first chunk (writer never closed)",
        time.monotonic() - t0,
        f"TraceError: {got.value}".replace(str(tmp_path), "DIR"),
        left="nothing (a read)",
    )


# ---------------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("candidates", 0, r"candidates \(--candidates\) must be an integer >= 1, got 0"),
        ("buffer_fraction", 2.0, r"buffer_fraction \(--buffer-fraction\) must be a number in \[0, 1\], got 2\.0"),
    ],
)
def test_a_bad_setting_gets_the_same_message_at_every_door(name, value, message):
    import gymnasium as gym
    import rudder.env  # noqa: F401

    from rudder.runtime.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        gym.make("rudder/Replay-v0", trace=METIS2, rank=0, **{name: value})
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{name: value}).validate()
    proc = _run([sys.executable, EVALUATE, "--traces", METIS2, f"--{name.replace('_', '-')}", str(value)])
    assert proc.returncode == 2 and _lines(proc.stderr) == [f"evaluate.py: error: {_unescape(message)}"]
    record_fault(
        "bad settings",
        f"{name}={value} to Replay-v0, TrainConfig and evaluate.py",
        proc.took,
        _lines(proc.stderr)[0],
        tried=3,
        left="nothing (exit 2)",
    )


def _unescape(pattern: str) -> str:
    return pattern.replace("\\", "")


def test_wrappers_reject_what_they_used_to_truncate_or_accept(shipped_trace):
    import gymnasium as gym
    import rudder.env  # noqa: F401
    from rudder.env.settings import SettingError
    from rudder.env.wrappers import Budget, FractionBudget

    env = gym.make("rudder/Replay-v0", trace=shipped_trace, rank=0)
    t0 = time.monotonic()
    for levels in ((0, 1.5, 4), (0, "1"), (0, True)):
        with pytest.raises(SettingError, match=r"levels must be integers \(candidate counts\)"):
            Budget(env, levels)
    with pytest.raises(SettingError, match=r"levels must be numbers \(fractions\), got \[0, '1'\]"):
        FractionBudget(env, (0, "1"))
    took = time.monotonic() - t0
    assert Budget(env, (0, np.int64(8))).levels == (0, 8)
    record_fault(
        "bad settings",
        "wrapper levels 1.5, '1', True",
        took,
        "SettingError: levels must be integers (candidate counts) ...",
        tried=4,
        left="nothing",
    )


def test_evaluate_with_nothing_to_evaluate_says_so():
    proc = _run([sys.executable, EVALUATE, "--agents", "", "--oracles", ""])
    assert proc.returncode == 2
    assert _lines(proc.stderr) == ["evaluate.py: error: nothing to evaluate: --agents and --oracles are both empty"]
    record_fault(
        "bad settings",
        "evaluate.py --agents '' --oracles ''",
        proc.took,
        _lines(proc.stderr)[0],
        left="nothing (exit 2)",
    )


def test_decisions_of_another_run_are_refused_before_any_process_starts(tmp_path):
    """The samples were recorded on synth-small; synth-tiny has other node ids. Nothing is started or written."""
    proc = _run(
        [sys.executable, TRAIN, "gnn", *TINY, "--agent", "recorded", "--decisions-from", METIS2], cache=str(tmp_path)
    )
    assert proc.returncode == 2
    assert _lines(proc.stderr) == [
        f"rudder: error: --decisions-from {METIS2}: recorded with graph 'synth_small_seed0', this run has "
        f"'synth_tiny_seed0': its decisions name nodes of that run's partitions and cannot be applied here"
    ]
    assert not os.listdir(tmp_path)  # no partitions made, no job folder
    record_fault(
        "--decisions-from another run",
        "train.py gnn on synth-tiny with the decisions of a synth-small trace",
        proc.took,
        _lines(proc.stderr)[0].replace(METIS2, "TRACE"),
        left="nothing: no process started, no file written",
    )


@pytest.mark.parametrize(
    "option, value, recorded, now",
    [
        ("parts", 4, "--parts 2", "4"),
        ("partition", "random", "--partition 'metis'", "'random'"),
        ("trainers_per_part", 2, "trainer ranks 2", "4"),
    ],
)
def test_decisions_of_a_run_partitioned_otherwise_are_refused(option, value, recorded, now):
    """Same graph, but partitioned into other parts, by another method, or played by another number of trainers:
    the recorded decisions name other node ids (or ranks), so they are refused at validation, before any process."""
    from rudder.runtime.config import TrainConfig

    cfg = TrainConfig(graph="synth-small", agent="recorded", decisions_from=METIS2, **{option: value})
    with pytest.raises(ValueError) as got:
        cfg.validate()
    assert str(got.value) == (
        f"--decisions-from {METIS2}: recorded with {recorded}, this run has {now}: its "
        f"decisions name nodes of that run's partitions and cannot be applied here"
    )
    TrainConfig(graph="synth-small", agent="recorded", decisions_from=METIS2).validate()  # the recording's own


def test_unreadable_dgl_file_is_one_line(tmp_path):
    bad = tmp_path / "graph.dgl"
    bad.write_bytes(b"\x00" * 64)
    proc = _run([sys.executable, TRAIN, "gnn", "--graph", str(bad)], cache=str(tmp_path / "cache"))
    assert proc.returncode == 2
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"rudder: error: cannot read {bad} with dgl.load_graphs: DGLError:")
    assert "Stack trace" not in proc.stderr and "[bt]" not in proc.stderr
    record_fault(
        "bad settings",
        "--graph a .dgl file of 64 zero bytes",
        proc.took,
        lines[0].replace(str(bad), "FILE").split(" DGLError:")[0] + " DGLError: ...",
        left="nothing (exit 2)",
    )


# -------------------------------------------------------------------------------------------------- policy file


def test_policy_file_that_is_not_the_recorded_one_is_refused(tmp_path):
    from rudder.agents.ppo import DEFAULT_POLICY, PPOAgent, UntrustedPolicyError, file_sha256

    with open(DEFAULT_POLICY[:-4] + ".json") as f:
        assert json.load(f)["sha256"] == file_sha256(DEFAULT_POLICY)  # the shipped pair matches
    policy = tmp_path / "p.zip"
    shutil.copy(DEFAULT_POLICY, policy)
    shutil.copy(DEFAULT_POLICY[:-4] + ".json", tmp_path / "p.json")
    with open(policy, "ab") as f:
        f.write(b"\0")  # any change: here one byte after the zip's end, which SB3 would load as is
    with pytest.raises(
        UntrustedPolicyError,
        match=r"p\.zip: SHA-256 is [0-9a-f]{64} but .*p\.json records "
        r"[0-9a-f]{64}; a policy file is pickled code",
    ):
        PPOAgent(str(policy))
    assert PPOAgent(str(policy), trust=True).k == 256
    proc = _run(
        [
            sys.executable,
            EVALUATE,
            "--traces",
            METIS2,
            "--agents",
            "ppo",
            "--ppo-policy",
            str(policy),
            "--oracles",
            "",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert proc.returncode == 2
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and "--trust-policy" in lines[0] and not (tmp_path / "out").exists()
    record_fault(
        "tampered PPO policy",
        "one byte appended to the policy zip (SB3 would load it as is)",
        proc.took,
        lines[0].replace(str(tmp_path), "DIR")[:160] + " ...",
        left="nothing (exit 2, no results written)",
    )


# ------------------------------------------------------------------------------------------- real DistDGL jobs


def test_heartbeat_marks_steps_and_derives_its_bound(tmp_path):
    """The file the watchdog reads: start-up is not a step, later marks are; the bound is the start-up timeout
    until training begins, then max(floor, 20 x the slowest step); a reader never takes a half-written mark."""
    from rudder.runtime.heartbeat import FACTOR, Heartbeat, read_beat

    path = str(tmp_path / "rank3.beat")
    beat = Heartbeat(path)
    first = read_beat(path)
    assert first.phase == "start-up" and first.steps == 0 and first.bound_s(30, 600) == 600
    time.sleep(0.3)  # start-up: not a step of the run's pace
    beat.mark("sampling")
    time.sleep(0.1)
    beat.mark("fetching")
    got = read_beat(path)
    assert got.phase == "fetching" and got.steps == 2 and 0.1 <= got.slowest_step_s < 0.25
    assert got.bound_s(1.0, 600) == pytest.approx(FACTOR * got.slowest_step_s)
    assert got.bound_s(30.0, 600) == 30.0 and got.bound_s(0, 600) == 0.0  # 0: no watchdog
    with pytest.raises(ValueError):
        beat.mark("napping")
    with open(path, "rb") as f:
        seq = int.from_bytes(f.read(8), "little")
    with open(path, "r+b") as f:  # a writer caught halfway: its trailer odd, the header still the old even number
        f.seek(56)
        f.write((seq + 1).to_bytes(8, "little"))
    assert read_beat(path, tries=2) is None
    beat.close()


def _orphaned(names: set[str]) -> set[str]:
    """Those of the /dev/shm segments ``names`` that still exist and that no process maps: what a job left behind.
    (Segments of other jobs running on the machine meanwhile are mapped by their processes.)"""
    maps = ""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/maps") as f:
                maps += f.read()
        except OSError:
            continue
    return {n for n in names if os.path.exists(f"/dev/shm/{n}") and f"/dev/shm/{n}" not in maps}


def _tagged_shm(tag: str = "rd") -> set[str]:
    """The tagged /dev/shm segments of rudder jobs on this host: of the job with ``tag``, or of any job."""
    return {os.path.basename(p) for p in glob.glob(f"/dev/shm/{tag}*") if os.path.basename(p)[8:9] == "m"}


def _job_tag(cache: str) -> str:
    """The tag of the job running under ``cache`` (its job folder's name; its shm segments start with it)."""
    return os.path.basename(glob.glob(os.path.join(cache, "jobs", "*"))[0])


def _locks_of(pid: int) -> list[str]:
    """The port locks ``pid`` holds (other jobs create and remove theirs while we look)."""
    out = []
    for path in glob.glob("/tmp/rudder-ports-*.lock"):
        try:
            with open(path) as f:
                if f.read().split()[:1] == [str(pid)]:
                    out.append(path)
        except OSError:
            pass
    return out


def _statuses(cache: str) -> dict[int, dict]:
    out = {}
    for path in glob.glob(os.path.join(cache, "jobs", "*", "status", "rank*.json")):
        try:
            with open(path) as f:
                st = json.load(f)
            out[st["role"]["rank"]] = st
        except (OSError, ValueError):
            pass
    return out


def _wait_training(cache: str, world: int = 4, steps: int = 10, deadline_s: float = 120) -> dict[int, dict]:
    """Wait until every rank reported and every trainer marked ``steps`` steps; returns the rank statuses."""
    from rudder.runtime.heartbeat import beat_path, read_beat

    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        sts = _statuses(cache)
        if len(sts) == world:
            job_dir = glob.glob(os.path.join(cache, "jobs", "*"))[0]
            beats = [read_beat(beat_path(job_dir, r)) for r, st in sts.items() if st["role"]["kind"] == "trainer"]
            if all(b is not None and b.steps >= steps for b in beats):
                return sts
        time.sleep(0.1)
    raise AssertionError(f"the job did not start training within {deadline_s} s")


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every process below ``pid``."""
    from rudder.runtime.procs import start_time

    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, start_time(child)))
            todo.append(child)
    return out


def _still_running(procs: list[tuple[int, int]]) -> list[int]:
    from rudder.runtime.procs import alive

    return [pid for pid, start in procs if alive(pid, start)]


@pytest.fixture(scope="module")
def tiny_partitions(tmp_path_factory):
    """A cache holding synth-tiny cut into 2 METIS partitions (copied by each test that damages it)."""
    from rudder.runtime.config import TrainConfig
    from rudder.runtime.partition import ensure_partitions

    cache = str(tmp_path_factory.mktemp("tiny-cache"))
    ensure_partitions(TrainConfig(graph="synth-tiny", parts=2, cache_dir=cache), log=lambda msg: None)
    return cache


def _copy_cache(src: str, dst) -> str:
    shutil.copytree(os.path.join(src, "partitions"), os.path.join(dst, "partitions"))
    return str(dst)


@pytest.mark.dist
def test_damaged_partition_files_are_refused_with_one_line(tiny_partitions, tmp_path):
    from rudder.runtime.partition import check_partitions

    cache = _copy_cache(tiny_partitions, tmp_path)
    part_dir = glob.glob(os.path.join(cache, "partitions", "*"))[0]
    feat = os.path.join(part_dir, "part1", "node_feat.dgl")
    size = os.path.getsize(feat)
    with open(feat, "r+b") as f:
        f.truncate(size // 2)
    lost = size - size // 2
    proc = _run([sys.executable, TRAIN, "gnn", *TINY], cache=cache)
    assert proc.returncode == 2
    assert _lines(proc.stderr) == [
        f"rudder: error: partition file {feat} is damaged: {size // 2} bytes, {size} when "
        f"partitioned: re-partition with --repartition"
    ]
    assert not os.path.exists(os.path.join(cache, "jobs")) or not os.listdir(os.path.join(cache, "jobs"))
    seen, took = _lines(proc.stderr)[0].replace(part_dir, "PARTS"), proc.took

    shutil.rmtree(os.path.join(cache, "partitions"))  # a byte changed, same size: the CRC-32 tells
    _copy_cache(tiny_partitions, cache)
    with open(feat, "r+b") as f:
        f.seek(size - 100)
        byte = f.read(1)
        f.seek(size - 100)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(Exception, match=r"node_feat\.dgl is damaged: its CRC-32 differs .* --repartition"):
        check_partitions(part_dir, 2)

    config = os.path.join(part_dir, "synth_tiny_seed0.json")
    with open(config, "w") as f:
        f.write("{not json")
    proc = _run([sys.executable, TRAIN, "gnn", *TINY], cache=cache)
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1
    assert f"partition config {config} is not valid JSON" in proc.stderr
    record_fault(
        "truncated partition file",
        f"part1/node_feat.dgl cut in half ({lost} bytes); then one bit "
        "flipped (same size); then the partition config made invalid JSON",
        took,
        seen,
        tried=3,
        left="nothing: refused before any process started",
        lost_bytes=0,
    )


@pytest.mark.dist
def test_a_stopped_trainer_ends_the_job_within_the_watchdog_bound(
    tiny_partitions, tmp_path, free_port_block, free_port
):
    """SIGSTOP on a trainer (a hang: it neither dies nor progresses). The watchdog names it and the phase it
    stopped in, within max(--watchdog-s, 20 x its slowest step), and the job leaves nothing. The job starts with
    --repartition on a damaged cache: re-partitioning is what the refusal above asks for, and it works."""
    from rudder.runtime.ports import port_in_use

    cache = _copy_cache(tiny_partitions, tmp_path)
    feat = glob.glob(os.path.join(cache, "partitions", "*", "part1", "node_feat.dgl"))[0]
    with open(feat, "r+b") as f:
        f.truncate(1000)
    port = free_port_block()
    shm_before = _tagged_shm()
    proc = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            "gnn",
            *TINY,
            "--epochs",
            "500",
            "--watchdog-s",
            "3",
            "--repartition",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cache),
        cwd=ROOT,
    )
    try:
        statuses = _wait_training(cache)
        job, tag = _descendants(proc.pid), _job_tag(cache)
        victim = statuses[3]  # the trainer of machine 1
        os.kill(victim["pid"], signal.SIGSTOP)
        t_stop = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t_stop
    finally:
        end_job(proc)
    assert proc.returncode == 1, err[-3000:]
    verdict = [line for line in err.splitlines() if line.startswith("rudder: job failed:")]
    assert len(verdict) == 1, err[-3000:]
    assert verdict[0].startswith(
        f"rudder: job failed: {victim['describe']}: process {victim['pid']} is stopped (SIGSTOP or a debugger)"
    ), verdict[0]
    bound = float(verdict[0].split("(bound ")[1].split(" s")[0])
    assert "no progress for" in verdict[0] and " while " in verdict[0]
    assert took < bound + 3.0, (took, bound)
    assert not _still_running(job), "processes of the job left running"
    assert not _orphaned(_tagged_shm(tag) - shm_before)
    assert free_port(port) and free_port(port + 10)  # the servers' ports: nothing holds them, not even TIME_WAIT
    # trainer 0 hosts torch.distributed's store on port-1 and is its own client too: killing it may leave that port
    # in TIME_WAIT (no process), which the next job's store binds all the same (SO_REUSEADDR), as the launcher
    # checks
    assert not port_in_use("127.0.0.1", port - 1)
    assert not os.listdir(os.path.join(cache, "jobs"))
    record_fault(
        "hung rank (SIGSTOP)",
        f"SIGSTOP to {victim['describe']} while training (--watchdog-s 3)",
        took,
        verdict[0].split(" (log:")[0],
        left="nothing: processes, /dev/shm, ports, job folder",
        input_checked=partition_bytes_checked(cache),
    )


@pytest.mark.dist
def test_a_killed_launcher_takes_its_job_along_and_the_next_start_cleans_up(tiny_partitions, tmp_path):
    """SIGKILL on the ``train.py`` supervisor: mpiexec (parent-death signal) and every rank (watching the
    supervisor) end within seconds; the job folder, /dev/shm segments and the port lock it left are removed at the
    next start."""
    from rudder.runtime.procs import alive

    cache = _copy_cache(tiny_partitions, tmp_path)
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, TRAIN, "gnn", *TINY, "--epochs", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cache),
        cwd=ROOT,
    )
    try:
        statuses = _wait_training(cache)
        job = _descendants(proc.pid)
        locks = _locks_of(proc.pid)
        job_dir = glob.glob(os.path.join(cache, "jobs", "*"))[0]
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(10)
        while _still_running(job) and time.monotonic() - t_kill < 30:
            time.sleep(0.05)
        took = time.monotonic() - t_kill
    finally:
        end_job(proc)
    assert not _still_running(job), f"left running: {_still_running(job)}"
    assert not any(alive(st["pid"]) for st in statuses.values())
    assert took < 5.0, took
    assert len(locks) == 1 and os.path.exists(locks[0]) and os.path.isdir(job_dir)  # what a SIGKILL leaves

    t0 = time.monotonic()
    nxt = _run([sys.executable, TRAIN, "gnn", "--graph", "no-such-graph"], cache=cache)
    assert nxt.returncode == 2
    assert f"rudder: removed what a killed job left: port lock {locks[0]}" in nxt.stderr
    assert f"rudder: removed what a killed job left: job folder {job_dir}" in nxt.stderr
    assert not os.path.exists(locks[0]) and not os.path.exists(job_dir)
    tag = os.path.basename(job_dir)
    left = _orphaned({n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith((tag, "mpich", "sem.mp-"))})
    assert not left, left
    cleaned = time.monotonic() - t0
    record_fault(
        "killed launcher",
        f"SIGKILL to the train.py supervisor while training ({len(job)} job processes)",
        took,
        "(the shell's own 'Killed'); the next start: rudder: removed what a killed job left: port "
        "lock ..., job folder ...",
        left=f"nothing once the next start ran: processes gone at once; job "
        f"folder, port lock, /dev/shm removed by it ({cleaned:.1f} s, the start included)",
        input_checked=partition_bytes_checked(cache),
    )


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_to_the_launcher_ends_the_job_and_leaves_nothing(
    sig, tiny_partitions, tmp_path, free_port_block, free_port
):
    """SIGTERM (a scheduler's or ``kill``'s) or SIGINT (Ctrl-C) to ``train.py`` while it trains: one line saying
    so, exit 130, the job's processes, /dev/shm segments, ports, job folder and port lock gone within seconds, the
    partitions intact."""
    cache = _copy_cache(tiny_partitions, tmp_path)
    port = free_port_block()
    shm_before = _tagged_shm()
    proc = subprocess.Popen(
        [sys.executable, TRAIN, "gnn", *TINY, "--epochs", "500", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cache),
        cwd=ROOT,
    )
    try:
        _wait_training(cache)
        job, tag = _descendants(proc.pid), _job_tag(cache)
        proc.send_signal(sig)
        t_sig = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t_sig
    finally:
        end_job(proc)
    assert proc.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("rudder: interrupted")]
    assert len(said) == 1 and said[0].startswith(f"rudder: interrupted (signal {int(sig)}): stopping the job"), said
    assert "Traceback" not in err
    assert took < 10.0, took
    assert not _still_running(job), "processes of the job left running"
    assert not _orphaned(_tagged_shm(tag) - shm_before)
    assert free_port(port) and free_port(port + 10)
    assert not os.listdir(os.path.join(cache, "jobs"))
    assert not _locks_of(proc.pid)
    record_fault(
        "SIGTERM/SIGINT",
        f"{sig.name} to the train.py supervisor while training",
        took,
        said[0].split(" (log:")[0],
        left="nothing: processes, /dev/shm, ports, job folder, port lock",
        input_checked=partition_bytes_checked(cache),
    )


# ----------------------------------------------------------------------------------------- the emulated network


def _cluster_preflight() -> str | None:
    from rudder.testbed.cluster import ClusterError, preflight

    try:
        preflight()
    except ClusterError as exc:
        return str(exc)
    return None


def _cluster_of_job(launcher_pid: int, deadline_s: float = 60):
    """The emulated cluster a ``--hosts`` job's launcher brought up (attached: it stays the launcher's)."""
    from rudder.testbed.cluster import EmulatedCluster, list_clusters

    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        for state in list_clusters():
            if state.get("owner_pid") == launcher_pid and state.get("holders"):
                return EmulatedCluster.attach(state["name"])
        time.sleep(0.1)
    raise AssertionError("the job brought up no cluster")


def _cluster_leftovers(name: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (netns + links).splitlines() if f"rd-{name}-" in line] + glob.glob(
        f"/run/rudder-cluster/{name}"
    )


def _steps(cache: str, rank: int) -> int:
    from rudder.runtime.heartbeat import beat_path, read_beat

    beat = read_beat(beat_path(glob.glob(os.path.join(cache, "jobs", "*"))[0], rank))
    return beat.steps if beat else 0


def _steps_per_s(cache: str, rank: int, seconds: float) -> float:
    before, t0 = _steps(cache, rank), time.monotonic()
    time.sleep(seconds)
    return (_steps(cache, rank) - before) / (time.monotonic() - t0)


@pytest.mark.dist
@pytest.mark.skipif(_cluster_preflight() is not None, reason=f"no emulated hosts here: {_cluster_preflight()}")
@pytest.mark.parametrize("fault", ["slow-then-cut", "host-killed"])
def test_network_faults_on_emulated_hosts(fault, tiny_partitions, tmp_path):
    """Two emulated hosts at 400mbit. ``slow-then-cut``: host 1's link cut to 1% (4mbit) mid-run: the job slows and
    goes on; then its link taken down: connections stall without an error, the watchdog ends the job naming the
    server that no longer answers and its host. ``host-killed``: every process on host 1 killed: the job ends at
    once naming the first rank that died, on that host. Either way the cluster, the job's processes and /dev/shm
    segments are gone afterwards."""
    cache = _copy_cache(tiny_partitions, tmp_path)
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [
            sys.executable,
            TRAIN,
            "gnn",
            *TINY,
            "--hosts",
            "2",
            "--link-rate",
            "400mbit",
            "--epochs",
            "500",
            "--watchdog-s",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(cache),
        cwd=ROOT,
    )
    try:
        cluster = _cluster_of_job(proc.pid)
        statuses = _wait_training(cache)
        job, tag = _descendants(proc.pid), _job_tag(cache)
        host1 = cluster.hostnames[1]
        on_host1 = sorted(st["role"]["rank"] for st in statuses.values() if st["role"]["host"] == host1)
        trainer1 = next(r for r in on_host1 if statuses[r]["role"]["kind"] == "trainer")
        note = ""
        if fault == "slow-then-cut":
            full = _steps_per_s(cache, trainer1, 2.0)
            cluster.set_rate(1, "4mbit")
            slow = _steps_per_s(cache, trainer1, 3.0)
            assert proc.poll() is None and slow > 0, "the job must go on at 1% of the link rate"
            note = f"steps/s of host 1's trainer: {full:.1f} at 400mbit, {slow:.1f} at 4mbit; "
            cluster.link_down(1)
        else:
            killed = cluster.kill_processes(1)
            assert {statuses[r]["pid"] for r in on_host1} <= set(killed)
        t_fault = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t_fault
    finally:
        end_job(proc)
    verdict = [line for line in err.splitlines() if line.startswith("rudder: job failed:")]
    assert proc.returncode != 0 and len(verdict) == 1, err[-3000:]
    if fault == "slow-then-cut":
        assert proc.returncode == 1
        assert f"machine 1's server {cluster.addresses[1]}:" in verdict[0], verdict[0]
        assert f"on {host1} does not answer" in verdict[0], verdict[0]
        bound = float(verdict[0].split("(bound ")[1].split(" s")[0])
        assert took < bound + 5.0, (took, bound)
    else:
        culprit = int(verdict[0].split("rudder: job failed: rank ")[1].split()[0])
        assert culprit in on_host1 and f"on {host1})" in verdict[0], verdict[0]
        assert took < 10.0, took
    assert not _still_running(job), "processes of the job left running"
    assert _cluster_leftovers(cluster.name) == []
    new = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith((tag, "mpich", "sem.mp-"))}
    assert not _orphaned(new)
    assert not os.listdir(os.path.join(cache, "jobs"))
    left = "nothing: namespaces, links, processes, /dev/shm, job folder"
    seen = verdict[0].split(" (log:")[0]
    if fault == "slow-then-cut":
        record_fault(
            "link rate cut to 1%",
            "tc tbf on host 1's link 400mbit -> 4mbit mid-run",
            None,
            f"nothing: the job slows and goes on ({note.strip('; ')})",
            left="(the job went on)",
            detected=0,
        )
        record_fault(
            "link cut",
            "host 1's link taken down (ip link set down) mid-run (--watchdog-s 3)",
            took,
            seen,
            left=left,
            input_checked=partition_bytes_checked(cache),
        )
    else:
        record_fault(
            "host killed",
            "every process in host 1's namespace SIGKILLed mid-run",
            took,
            seen,
            left=left,
            input_checked=partition_bytes_checked(cache),
        )
