"""Bring your own agent: a user's agent file, module or installed entry point evaluated on the shipped traces, run
live and given options, without touching rudder; one-line errors for wrong references; replay envs vectorised for
one's own RL code; the examples."""

import json
import os
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import rudder.env  # noqa: F401  (registers the environments)
from gymnasium.utils.env_checker import check_env
from rudder.env.contract import BufferSettings
from rudder.env.vector import make_replay_env, make_replay_vector_env, replay_env_fns, replay_env_specs

from rudder.evaluation.registry import (
    REGISTRY,
    AgentError,
    absolute_reference,
    agent_class,
    agent_kwargs_for,
    agent_labels,
    agent_names,
    make_agent,
    parse_agent_kwargs,
)
from rudder.evaluation.scoring import evaluate_trace
from rudder.runtime.config import TrainConfig
from rudder.runtime.launcher import pin_agent_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SAMPLES = os.path.join(ROOT, "traces", "samples")
METIS2 = os.path.join(SAMPLES, "small-metis2-f10x25")
METIS4 = os.path.join(SAMPLES, "small-metis4-f10x25")
RANDOM2 = os.path.join(SAMPLES, "small-random2-f5x10")

NO_ACT = "class NoAct:\n    name = 'noact'\n\n    def reset(self):\n        pass\n"


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's folder outside the repository holding their agent (the example) and a class that is no agent."""
    folder = tmp_path_factory.mktemp("user")
    assert not str(folder).startswith(ROOT)
    shutil.copy(os.path.join(EXAMPLES, "my_agent.py"), folder / "my_agent.py")
    (folder / "noact.py").write_text(NO_ACT)
    return folder


def _run(script, *args, cwd, timeout=180, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def _by(df, trace):
    return df[df["trace"] == trace].set_index(["agent", "rank"])["remote_fetched"]


def test_my_agent_file_is_evaluated_from_a_folder_outside_the_repository(user_dir):
    """``evaluate.py --agents periodic,./my_agent.py:MyAgent`` with the user's folder as working folder: the agent
    (labelled by its name) is scored beside periodic on every shipped trace and rank, in results.csv and the table.
    Its default threshold 0.5 lies between the traces' window miss rates (METIS ~0.57-0.69, random ~0.48), so it
    refreshes like periodic on the METIS traces and keeps the buffer like static on the random one."""
    traces = [
        os.path.join(ROOT, "traces", "samples", t)
        for t in ("small-metis2-f10x25", "small-metis4-f10x25", "small-random2-f5x10")
    ]
    proc = _run(
        "evaluate.py",
        "--traces",
        *traces,
        "--agents",
        "periodic,static,./my_agent.py:MyAgent",
        "--oracles",
        "belady",
        "--out",
        "res",
        cwd=user_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(user_dir / "res" / "results.csv")
    assert list(dict.fromkeys(df["agent"])) == ["periodic", "static", "missgate", "belady"]
    assert len(df[df["agent"] == "missgate"]) == 2 + 4 + 2  # every rank of the three traces
    mine = df[df["agent"] == "missgate"]
    assert (mine["hits"] + mine["remote_fetched"] - mine["prefetched"] == mine["remote_sampled"]).all()
    assert (mine["decisions"] > 0).all()
    for trace, like in (
        ("small-metis2-f10x25", "periodic"),
        ("small-metis4-f10x25", "periodic"),
        ("small-random2-f5x10", "static"),
    ):
        by = _by(df, trace)
        for rank in df.loc[df["trace"] == trace, "rank"].unique():
            assert by[("missgate", rank)] == by[(like, rank)], (trace, rank)
            assert by[("missgate", rank)] >= by[("belady", rank)]
    assert mine["remote_fetched"].sum() < df.loc[df["agent"] == "periodic", "remote_fetched"].sum()
    blocks = proc.stdout.split("== ")[1:]
    assert len(blocks) == 4 and all("\nmissgate " in b and "\nperiodic " in b for b in blocks)  # 3 traces, overall
    assert (user_dir / "res" / "traffic.png").stat().st_size > 10_000


def test_agent_kwargs_reach_the_constructor(user_dir):
    """threshold=0 refreshes every window (periodic's traffic exactly), threshold=1 never does (static's)."""
    proc = _run(
        "evaluate.py",
        "--traces",
        METIS4,
        "--agents",
        "periodic,./my_agent.py:MyAgent",
        "--oracles",
        "",
        "--agent-kwargs",
        '{"threshold": 0}',
        "--out",
        "kw",
        cwd=user_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = _by(pd.read_csv(user_dir / "kw" / "results.csv"), "small-metis4-f10x25")
    assert [by[("missgate", r)] for r in range(4)] == [by[("periodic", r)] for r in range(4)]

    ref = str(user_dir / "my_agent.py") + ":MyAgent"
    agent = make_agent(ref, threshold=1.0, fraction=0.5)
    assert (agent.threshold, agent.fraction, agent.name) == (1.0, 0.5, "missgate")
    rows = pd.DataFrame(
        evaluate_trace(
            METIS2,
            {
                "never": lambda t, r: make_agent(ref, threshold=1.0),
                "half": lambda t, r: make_agent(ref, threshold=0.0, fraction=0.5),
                "static": lambda t, r: make_agent("static"),
                "periodic": lambda t, r: make_agent("periodic"),
            },
            oracles=(),
        )
    )
    by = _by(rows, "small-metis2-f10x25")
    for rank in (0, 1):
        assert by[("never", rank)] == by[("static", rank)]
        assert by[("half", rank)] not in (by[("static", rank)], by[("periodic", rank)])
    assert (
        rows.loc[rows["agent"] == "never", "prefetched"].values
        == rows.loc[rows["agent"] == "never", "initial_fill"].values
    ).all()


@pytest.mark.parametrize(
    "agent, message",
    [
        ("./nope.py:MyAgent", "no file {dir}/nope.py"),
        ("nope_pkg.policies:MyAgent", "no module named 'nope_pkg' on the Python path"),
        ("./my_agent.py:Nope", "{dir}/my_agent.py has no class Nope (it defines MyAgent)"),
        ("./noact.py:NoAct", "NoAct is not an agent: it lacks act"),
        ("nope", "unknown agent 'nope': built-in agents are none, static, periodic"),
    ],
)
@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_wrong_references_get_one_line_naming_what_is_missing(user_dir, script, agent, message):
    args = ["--agents", f"periodic,{agent}"] if script == "evaluate.py" else ["gnn", "--agent", agent]
    proc = _run(script, *args, cwd=user_dir, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"agent {agent!r}" in lines[0] or agent == "nope"
    assert message.format(dir=user_dir) in lines[0]


def test_options_and_protocol_errors_are_one_line(user_dir, tmp_path):
    ref = str(user_dir / "my_agent.py") + ":MyAgent"
    with pytest.raises(AgentError, match=r"options \{\"thresh\": 3\} do not fit MyAgent\(threshold, fraction\)"):
        TrainConfig(agent=ref, agent_kwargs="thresh=3").validate()
    (tmp_path / "agents_x.py").write_text(
        "from rudder.agents.base import Agent\n"
        "class Stub(Agent):\n    name = 'stub'\n"  # inherits the protocol's act, which decides nothing
        "class Nameless:\n    def act(self, o, i):\n        return None\n    def reset(self):\n        pass\n"
        "class Named:\n    def __init__(self):\n        self.name = 'named'\n"
        "    def act(self, o, i):\n        return None\n    def reset(self):\n        pass\n"
        "raise_me = 1\n"
    )
    with pytest.raises(AgentError, match="Stub is not an agent: it lacks act"):
        agent_class(f"{tmp_path}/agents_x.py:Stub")
    with pytest.raises(AgentError, match="Nameless is not an agent: it lacks name"):
        make_agent(f"{tmp_path}/agents_x.py:Nameless")
    assert make_agent(f"{tmp_path}/agents_x.py:Named").name == "named"  # a name set by the constructor counts
    with pytest.raises(AgentError, match="raise_me is not a class but a int"):
        agent_class(f"{tmp_path}/agents_x.py:raise_me")
    (tmp_path / "broken.py").write_text("import numpy\nx = undefined_name\n")
    with pytest.raises(AgentError, match=r"importing .*broken.py failed \(broken.py line 2\): NameError"):
        agent_class(f"{tmp_path}/broken.py:X")


def test_agent_kwargs_syntax():
    assert parse_agent_kwargs('{"k": 3, "levels": [0, 1]}') == {"k": 3, "levels": [0, 1]}
    assert parse_agent_kwargs("k=3,levels=[0,0.5,1],path=/tmp/a b.zip,flag=true") == dict(
        k=3, levels=[0, 0.5, 1], path="/tmp/a b.zip", flag=True
    )
    for bad in ("{bad", "[1, 2]", "novalue", "1x=2"):
        with pytest.raises(AgentError, match="--agent-kwargs"):
            parse_agent_kwargs(bad)
    specs = ["periodic", "hitrate", "./examples/my_agent.py:MyAgent"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out = agent_kwargs_for(["threshold=0.3", "hitrate@drop=0.05", "missgate@fraction=0.5"], specs)
        assert out == {
            "periodic": {},
            "hitrate": {"drop": 0.05},
            "./examples/my_agent.py:MyAgent": {"threshold": 0.3, "fraction": 0.5},
        }
        with pytest.raises(AgentError, match="plain options go to agents given by reference or entry point"):
            agent_kwargs_for(["drop=0.05"], ["periodic", "hitrate"])
    finally:
        os.chdir(cwd)


def test_the_launcher_pins_a_file_reference_before_ranks_start(user_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(user_dir)
    cfg = TrainConfig(agent="./my_agent.py:MyAgent", agent_kwargs="threshold=0")
    cfg.validate()
    argv = pin_agent_reference(cfg, ["gnn", "--agent", "./my_agent.py:MyAgent"])
    assert cfg.agent == f"{user_dir}/my_agent.py:MyAgent" and argv[-2:] == ["--agent", cfg.agent]
    monkeypatch.chdir(tmp_path)  # a rank whose working folder differs resolves the same file
    assert agent_class(cfg.agent).name == "missgate" and cfg.agent_options(1) == {"threshold": 0}
    assert absolute_reference("my_pkg.policies:MyAgent") == "my_pkg.policies:MyAgent"
    assert pin_agent_reference(TrainConfig(agent="periodic"), ["gnn"]) == ["gnn"]


def test_an_installed_entry_point_resolves_by_name(tmp_path, monkeypatch):
    """A package registering ``[rudder.agents] gate = byo_ep_pkg:GateAgent`` (a dist-info folder on the path, as
    pip installs it) is found by name in-process and by evaluate.py; a broken entry point is named."""
    site = tmp_path / "site"
    (site / "byo_ep_pkg").mkdir(parents=True)
    (site / "byo_ep_pkg" / "__init__.py").write_text(
        "from rudder.baselines.policies import Periodic\n\n"
        "class GateAgent(Periodic):\n    name = 'gate'\n\n"
        "    def __init__(self, every=2):\n        self.every = every\n"
    )
    info = site / "byo_ep_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: byo-ep-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[rudder.agents]\ngate = byo_ep_pkg:GateAgent\nbroken = byo_ep_missing:Agent\n"
    )
    monkeypatch.syspath_prepend(str(site))
    assert {"gate", "broken"} <= set(agent_names()) and agent_names()[: len(REGISTRY)] == list(REGISTRY)
    agent = make_agent("gate", every=5)
    assert type(agent).__name__ == "GateAgent" and agent.every == 5 and agent.name == "gate"
    assert agent_labels(["periodic", "gate"]) == ["periodic", "gate"]
    with pytest.raises(
        AgentError, match="points at byo_ep_missing:Agent, but there is no module named 'byo_ep_missing'"
    ):
        agent_class("broken")

    out = tmp_path / "res"
    proc = _run(
        "evaluate.py",
        "--traces",
        RANDOM2,
        "--agents",
        "periodic,gate",
        "--agent-kwargs",
        "gate@every=3",
        "--oracles",
        "",
        "--out",
        str(out),
        cwd=tmp_path,
        env=dict(PYTHONPATH=str(site)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = _by(pd.read_csv(out / "results.csv"), "small-random2-f5x10")
    assert by[("gate", 0)] == by[("periodic", 0)] and by[("gate", 1)] == by[("periodic", 1)]  # a periodic subclass


@pytest.mark.dist
def test_my_agent_runs_live_from_a_folder_outside_the_repository(user_dir, tmp_path_factory, free_port_block):
    """``train.py gnn --agent ./my_agent.py:MyAgent`` from the user's folder: every trainer rank builds it from the
    pinned path, its decisions are applied (threshold 0: rows prefetched beyond the initial fill), and the trace
    records its name and buffer settings for ``--agent recorded``."""
    cache = str(tmp_path_factory.getbasetemp() / "cache")  # shared with conftest's live runs: partitions reused
    proc = _run(
        "train.py",
        "gnn",
        "--graph",
        "synth-tiny",
        "--parts",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--fanout",
        "3,5",
        "--period",
        "4",
        "--agent",
        "./my_agent.py:MyAgent",
        "--agent-kwargs",
        "threshold=0",
        "--summary",
        "run.json",
        "--trace",
        "trace",
        "--port",
        str(free_port_block()),
        cwd=user_dir,
        timeout=300,
        env=dict(RUDDER_CACHE=cache, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((user_dir / "run.json").read_text())
    assert s["config"]["agent"] == f"{user_dir}/my_agent.py:MyAgent" and s["config"]["agent_kwargs"] == "threshold=0"
    assert len(s["ranks"]) == 2
    for r in s["ranks"]:
        assert r["decisions"] == 3  # 12 minibatches, a decision every 4
        assert r["prefetched"] > r["initial_fill"] > 0
        assert r["hits"] + r["misses"] == r["remote_sampled"]
    from rudder.traces import Trace

    trace = Trace(str(user_dir / "trace"))
    assert trace.meta["agent"] == dict(
        name="missgate",
        settings=dict(
            uses_buffer=True,
            static=False,
            admit_on_miss=None,
            ranking="misses",
            levels=None,
            buffer_init=None,
            sample_ahead=None,
        ),
    )
    assert make_agent("recorded", trace=str(user_dir / "trace"), rank=1).settings == BufferSettings()


# --- replay envs for one's own RL code --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*is different from the unwrapped version")
@pytest.mark.parametrize("action, n", [("fraction", 4), ("budget", 4), ("evict", 2), ("multibinary", None)])
def test_replay_envs_pass_gymnasium_checks(action, n):
    env = make_replay_env(RANDOM2, 1, action=action, buffer_fraction=0.05, candidates=64)
    assert env.observation_space.shape == (33 + 2 * 64,)
    assert env.action_space == (gym.spaces.Discrete(n) if n else gym.spaces.MultiBinary(64))
    check_env(env, skip_render_check=True)
    with pytest.raises(ValueError, match="relative_reward needs action='fraction'"):
        make_replay_env(RANDOM2, 1, action=action if action != "fraction" else "budget", relative_reward=1.0)


def test_vector_env_over_traces_ranks_and_buffer_sizes():
    specs = replay_env_specs([METIS2, RANDOM2], buffer_fractions=(None, 0.05))
    assert [(os.path.basename(s["trace"]), s["rank"], s["buffer_fraction"]) for s in specs] == [
        (name, r, f) for name in ("small-metis2-f10x25", "small-random2-f5x10") for r in (0, 1) for f in (None, 0.05)
    ]
    envs = make_replay_vector_env([METIS2, RANDOM2], buffer_fractions=(None, 0.05), action="budget")
    assert isinstance(envs, gym.vector.SyncVectorEnv) and envs.num_envs == 8
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (8, 33 + 2 * 256) and obs.dtype == np.float32
    lengths, steps, done = np.zeros(8, int), np.zeros(8, int), np.zeros(8, bool)
    while not done.all():  # a CleanRL-style loop: the autoreset step after an episode ends is not a decision
        _, reward, term, trunc, infos = envs.step(np.full(8, 3))
        assert reward.shape == (8,) and (reward <= 0).all()
        live = ~done & ~(term | trunc)  # stepped, not ended, not being reset: a full window behind them
        assert (infos["window"]["remote_sampled"][live] > 0).all() and infos["applied_ids"].dtype == object
        steps += 1
        ended = (term | trunc) & ~done
        lengths[ended] = steps[ended]
        done |= term | trunc
    envs.close()
    decisions = {"small-metis2-f10x25": (15, 15), "small-random2-f5x10": (8, 8)}
    assert [int(v) for v in lengths] == [decisions[os.path.basename(s["trace"])][s["rank"]] for s in specs]

    fns = replay_env_fns([METIS4], ranks=[2, 3], n_envs=3, seed=7, candidates=64)
    assert len(fns) == 3 and [f.args[1] for f in fns] == [2, 3, 2] and [f.keywords["seed"] for f in fns] == [7, 8, 9]
    async_envs = make_replay_vector_env([METIS4], ranks=[2], vectorization="async", candidates=64, n_envs=2)
    try:
        obs, _ = async_envs.reset(seed=0)
        assert isinstance(async_envs, gym.vector.AsyncVectorEnv) and obs.shape == (2, 33 + 128)
        np.testing.assert_array_equal(obs[0], obs[1])  # the same rank and buffer: the same first observation
    finally:
        async_envs.close()


def test_examples_train_dqn_trains_saves_and_evaluates_it_beside_the_built_in_agents(tmp_path):
    """examples/train_dqn.py: SB3 DQN on the replay envs, saved, scored by evaluate.py by reference; the scores are
    those of the saved network played directly on the training env (the action wrapper round-trips)."""
    out = tmp_path / "dqn"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train_dqn.py"), "--steps", "600", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "dqn.json").read_text())
    assert meta["algorithm"] == "DQN" and meta["action"] == "fraction" and meta["k"] == 256
    assert [(f["trace"], f["rank"]) for f in meta["trained_on"]] == [
        ("small-metis2-f10x25", 0),
        ("small-metis2-f10x25", 1),
        ("small-random2-f5x10", 0),
        ("small-random2-f5x10", 1),
    ]
    df = pd.read_csv(out / "results.csv")
    assert list(dict.fromkeys(df["agent"])) == ["none", "static", "periodic", "hitrate", "dqn", "belady"]
    dqn = df[df["agent"] == "dqn"].set_index(["trace", "rank"])
    assert len(dqn) == 8 and (dqn["decisions"] > 0).all()
    assert dqn["held_out"].to_dict() == {k: k[0] == "small-metis4-f10x25" for k in dqn.index}
    assert dqn["provenance"].to_dict() == {
        k: "held-out" if k[0] == "small-metis4-f10x25" else "trained-on" for k in dqn.index
    }
    assert "\ndqn " in proc.stdout

    from stable_baselines3 import DQN

    model = DQN.load(
        str(out / "dqn.zip"),
        device="cpu",
        custom_objects={"exploration_schedule": lambda _: 0.0, "lr_schedule": lambda _: 0.0},
    )
    for trace, rank in ((METIS4, 3), (RANDOM2, 0)):
        env = make_replay_env(trace, rank, action="fraction")
        obs, _ = env.reset(seed=0)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(int(model.predict(obs, deterministic=True)[0]))
            done = term or trunc
        fetched = env.unwrapped.episode.buffer.counters.remote_fetched
        assert fetched == dqn.loc[(os.path.basename(trace), rank), "remote_fetched"]
