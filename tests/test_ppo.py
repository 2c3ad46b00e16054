"""The PPO agent: it learns to beat random levels on a replayed trace, the shipped policy plays, ``train.py ppo``."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import rudder.env  # noqa: F401  (registers the environments)
from gymnasium.utils.env_checker import check_env
from rudder.agents.ppo import DEFAULT_POLICY, PPOAgent, make_env, train_ppo
from rudder.baselines.oracles import belady_min
from rudder.baselines.policies import RandomBudget
from rudder.env.wrappers import FractionBudget, parse_levels
from rudder.traces import Trace
from rudder.traces.fingerprint import (
    HELD_OUT,
    SAME_CONFIG,
    TRAINED_ON,
    provenance,
    rank_fingerprint,
    trace_fingerprints,
)

from rudder.evaluation.play import play_episode
from rudder.evaluation.registry import make_agent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "traces", "samples")
METIS2 = os.path.join(SAMPLES, "small-metis2-f10x25")
METIS4 = os.path.join(SAMPLES, "small-metis4-f10x25")
RANDOM2 = os.path.join(SAMPLES, "small-random2-f5x10")
TRAIN = os.path.join(ROOT, "traces", "train", "small-metis2-f10x25-s2")  # what the shipped policy learned from


class _Checked:
    """Passes an agent's actions through, asserting each is a valid prefix of admissible candidates."""

    def __init__(self, agent):
        self.agent, self.name, self.actions = agent, agent.name, []

    def reset(self):
        self.agent.reset()

    def act(self, obs, info):
        action = self.agent.act(obs, info)
        k = obs["candidates"].shape[0]
        assert action.dtype == np.int8 and action.shape == (k,)
        n = int(action.sum())
        assert set(np.unique(action)) <= {0, 1} and action[:n].all()  # the top n ranked candidates
        assert n <= min(info["n_candidates"], info["n_evictable"])
        self.actions.append(n)
        return action


def test_fraction_budget_admits_a_fraction_of_the_admissible_candidates():
    env = FractionBudget(gym.make("rudder/Replay-v0", trace=METIS2, rank=0), levels=(0, 0.25, 1))
    assert env.action_space == gym.spaces.Discrete(3)
    env.reset(seed=0)
    seen = []
    done = False
    while not done:
        j = min(env._info["n_candidates"], env._info["n_evictable"])
        _, _, done, _, info = env.step(1)
        seen.append((j, info["applied_ids"].size))
    assert any(j > 0 for j, _ in seen)
    assert all(applied == round(0.25 * j) for j, applied in seen)
    with pytest.raises(ValueError, match="integer in"):
        env.step(3)
    for bad in ("0.5,1", "0,1,0.5", "0,1.5", "0", "x"):
        with pytest.raises(ValueError):
            parse_levels(bad)


@pytest.mark.filterwarnings("ignore:.*is different from the unwrapped version")
@pytest.mark.parametrize("relative_reward", [None, 1000.0])
def test_make_env_passes_gymnasium_checks(relative_reward):
    env = make_env(METIS2, 1, buffer_fraction=0.05, relative_reward=relative_reward)
    assert isinstance(env.observation_space, gym.spaces.Box)
    assert env.observation_space.shape == (5 + 8 + 6 + 5 + 1 + 8 + 2 * 256,)
    check_env(env, skip_render_check=True)


def test_ppo_learns_to_beat_random_levels(tmp_path):
    # One rank, recorded buffer: 15 decisions per episode, deterministic given the actions. The level matters little
    # on this trace (random levels' rows spread by ~0.2% over seeds), so the margins asserted are small: training
    # raises the mean return, and PPO fetches 400 rows fewer than random levels' mean.
    result = train_ppo([METIS2], 8192, str(tmp_path / "p.zip"), seed=0, ranks=[0], n_envs=4, progress=False)
    returns = np.asarray(result.episode_returns)
    quarter = len(returns) // 4
    assert quarter >= 16
    assert returns[-quarter:].mean() > returns[:quarter].mean() + 0.005

    env = gym.make("rudder/Replay-v0", trace=METIS2, rank=0)
    agent = PPOAgent(result.path)
    # what it learned from, by content: rank 0 itself; rank 1 is another rank of the same run
    assert [(f["trace"], f["rank"]) for f in agent.trained_on] == [("small-metis2-f10x25", 0)]
    assert provenance(agent.trained_on, rank_fingerprint(METIS2, 0)) == TRAINED_ON
    assert provenance(agent.trained_on, rank_fingerprint(METIS2, 1)) == SAME_CONFIG
    ppo = play_episode(env, _Checked(agent), seed=0)["remote_fetched"]
    random = [play_episode(env, RandomBudget(seed), seed=0)["remote_fetched"] for seed in range(5)]
    assert ppo < np.mean(random) - 400, (ppo, random)


def test_shipped_policy_was_trained_on_no_trace_evaluate_scores():
    agent = make_agent("ppo")
    for fp in trace_fingerprints(TRAIN):  # both ranks of the training trace, by content
        assert provenance(agent.trained_on, fp) == TRAINED_ON
    for trace in (METIS2, METIS4, RANDOM2):  # python evaluate.py's default traces
        assert {provenance(agent.trained_on, fp) for fp in trace_fingerprints(trace)} == {HELD_OUT}, trace


def test_shipped_policy_plays_a_replay_episode():
    assert os.path.getsize(DEFAULT_POLICY) < 2**20
    agent = make_agent("ppo")
    assert agent.name == "ppo" and isinstance(agent, PPOAgent)
    with open(DEFAULT_POLICY[:-4] + ".json") as f:
        meta = json.load(f)
    assert meta["k"] == 256 and meta["levels"] == [0.0, 0.25, 0.5, 1.0]
    for trace, rank, candidates in ((METIS4, 2, None), (RANDOM2, 1, None), (METIS2, 0, 64)):
        env = gym.make("rudder/Replay-v0", trace=trace, rank=rank, candidates=candidates)
        checked = _Checked(agent)
        result = play_episode(env, checked, seed=0)
        assert result["decisions"] == len(checked.actions) > 0
        # every remote row sampled is a hit or a miss, and the rows fetched are the misses plus the prefetched
        assert result["hits"] + result["remote_fetched"] - result["prefetched"] == result["remote_sampled"]
        # rows prefetched beyond the initial fill came from the candidates the policy admitted, at most all of them
        assert result["prefetched"] - result["initial_fill"] <= sum(checked.actions)
        assert (result["prefetched"] > result["initial_fill"]) == (sum(checked.actions) > 0)
        # its schedule is a legal one: no fewer rows than Belady MIN with the same buffer
        min_rows = belady_min(Trace(trace).rank(rank).minibatch_ids(), env.unwrapped.capacity).remote_fetched
        assert result["remote_fetched"] >= min_rows


def _train_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "ppo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_train_cli_writes_a_policy_and_compares_it(tmp_path):
    out = tmp_path / "tiny.zip"
    proc = _train_cli(
        "--traces",
        RANDOM2,
        "--steps",
        "64",
        "--out",
        str(out),
        "--seed",
        "1",
        "--levels",
        "0,0.5,1",
        "--buffer-fractions",
        "recorded",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and (tmp_path / "tiny.json").is_file()
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert meta["levels"] == [0.0, 0.5, 1.0]
    assert [(f["trace"], f["rank"]) for f in meta["trained_on"]] == [("small-random2-f5x10", r) for r in (0, 1)]
    assert [f["ids"] for f in meta["trained_on"]] == [f["ids"] for f in trace_fingerprints(RANDOM2)]
    assert meta["seed"] == 1 and meta["steps"] >= 64
    assert "periodic" in proc.stdout and "static" in proc.stdout and "random" in proc.stdout
    assert sum(line.startswith("small-random2-f5x10") for line in proc.stdout.splitlines()) == 2  # two ranks
    assert PPOAgent(str(out)).levels == (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--traces", "/no/such/trace"], "is not a rudder trace"),
        (["--traces", METIS2, "--levels", "0,2"], "levels must be"),
        (["--traces", METIS2, "--levels", "0,half"], "levels must be"),
        (["--traces", METIS2, "--buffer-fractions", "0"], "--buffer-fractions"),
    ],
)
def test_train_cli_rejects_bad_input(tmp_path, args, message):
    proc = _train_cli(*args, "--steps", "16", "--out", str(tmp_path / "x.zip"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.zip").exists()
