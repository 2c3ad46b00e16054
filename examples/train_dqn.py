"""Train an off-the-shelf Stable-Baselines3 algorithm other than PPO -- DQN -- on rudder's replay envs, save it, and
evaluate it beside the built-in agents with ``evaluate.py`` (by reference: ``rudder.agents.sb3:SB3Agent``).

    python examples/train_dqn.py                       # ~2000 decisions on two shipped traces, then evaluate.py
    python examples/train_dqn.py --steps 20000 --out runs/dqn

The envs are every rank of the training traces as ``rudder/Replay-v0`` behind ``FractionBudget`` (admit 0, 1/4,
1/2 or all of the candidates that have a slot), observations flattened, rewarded relative to always admitting all
(:func:`rudder.env.vector.replay_env_fns`). ``small-metis4-f10x25`` is left out of training: evaluate.py marks it
held out, and leaves the two training traces out of its tables (trained-on, by content; ``--include-trained-on``
keeps them).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "traces", "samples")
TRAIN = [os.path.join(SAMPLES, "small-metis2-f10x25"), os.path.join(SAMPLES, "small-random2-f5x10")]
EVALUATE = [*TRAIN, os.path.join(SAMPLES, "small-metis4-f10x25")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="decisions to train for, all envs together")
    p.add_argument("--out", default=os.path.join("runs", "dqn"), help="folder for the policy and evaluate.py's output")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from rudder.agents.sb3 import save_policy
    from rudder.env.vector import replay_env_fns
    from stable_baselines3 import DQN
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.set_num_threads(1)  # a small MLP: more threads only contend with the replay
    envs = DummyVecEnv(replay_env_fns(TRAIN, action="fraction", relative_reward=1000.0, seed=args.seed))
    model = DQN(
        "MlpPolicy",
        envs,
        learning_rate=1e-3,
        buffer_size=10_000,
        learning_starts=200,
        batch_size=64,
        train_freq=4,
        target_update_interval=200,
        exploration_fraction=0.5,
        exploration_final_eps=0.05,
        policy_kwargs=dict(net_arch=[64, 64]),
        seed=args.seed,
        device="cpu",
    )
    model.learn(total_timesteps=args.steps)
    policy, sidecar = save_policy(model, os.path.join(args.out, "dqn.zip"), action="fraction", trained_on=TRAIN)
    print(f"saved {policy} and {sidecar} ({model.num_timesteps} steps on {envs.num_envs} envs)", flush=True)

    # the same as: python evaluate.py --agents none,static,periodic,rudder.agents.sb3:SB3Agent --agent-kwargs path=...
    cmd = [
        sys.executable,
        os.path.join(ROOT, "evaluate.py"),
        "--traces",
        *EVALUATE,
        "--agents",
        "none,static,periodic,hitrate,rudder.agents.sb3:SB3Agent",
        "--agent-kwargs",
        json.dumps({"path": os.path.abspath(policy)}),
        "--oracles",
        "belady",
        "--out",
        args.out,
    ]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
