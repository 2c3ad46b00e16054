"""rudder training entry point.

    python train.py gnn --graph synth-tiny --parts 2 --epochs 1 --agent periodic --summary run.json
    python train.py gnn --graph synth-tiny --agent ./my_agent.py:MyAgent --agent-kwargs threshold=0.5

    python train.py ppo --traces traces/samples/small-metis2-f10x25 --steps 40000 --out ppo.zip

``gnn`` trains a GNN with DistDGL on MPI ranks (1 graph server + ``--trainers-per-part`` trainers per partition).
Run it plainly and it starts ``mpiexec`` itself (all ranks on this host); or start it with ``mpiexec -n N`` /
``srun -n N`` and every rank takes its role from its MPI rank (see docs/cluster.md, "Running on a cluster").
``ppo`` trains a PPO prefetch agent offline on recorded traces (:mod:`rudder.agents.ppo`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from rudder.runtime.launcher import launch
from rudder.runtime.rank import rank_main, under_mpi

if os.environ.get("RUDDER_ONEHOST_MACHINE"):
    # a DGL sampler worker spawned by a one-host trainer (only a one-host rank sets the variable, for its children):
    # it opens the same shared memory, so the same fixes. Its main module is whichever script started the rank
    # (``python -m rudder.train``, a checkout's ``train.py``, the ``rudder`` console script): each imports this one.
    from rudder.runtime.onehost import apply_from_env

    apply_from_env()


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    from rudder.runtime.config import add_arguments

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gnn = sub.add_parser("gnn", help="distributed GNN training with a prefetch buffer (DistDGL on MPI ranks)")
    add_arguments(gnn)
    ppo = sub.add_parser(
        "ppo",
        help="train a PPO prefetch agent on recorded traces (rudder/Replay-v0)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ppo.add_argument(
        "--traces", nargs="+", required=True, metavar="DIR", help="trace folders to train on (every rank of each)"
    )
    ppo.add_argument("--steps", type=int, default=40_000, help="decisions (env steps) to train for, all envs together")
    ppo.add_argument("--out", default="ppo.zip", help="policy file (.zip); a sidecar .json is written beside it")
    ppo.add_argument("--seed", type=int, default=0, help="seed of PPO and the envs")
    ppo.add_argument(
        "--action",
        default="fraction",
        choices=("fraction", "link"),
        help="fraction: levels are fractions of the candidates that have an evictable slot (traffic); "
        "link: levels are multiples of the link budget, over the lookahead's candidates",
    )
    ppo.add_argument(
        "--levels", default=None, help="action levels (default 0,0.25,0.5,1 for fraction, 0,0.125,0.25,0.5,1 for link)"
    )
    ppo.add_argument(
        "--reward",
        default=None,
        choices=("traffic", "time"),
        help="the env's reward (default traffic for fraction, time for link)",
    )
    ppo.add_argument(
        "--relative-reward",
        type=float,
        default=None,
        metavar="SCALE",
        help="train on the reward relative to a reference policy, times SCALE (default 1000 for "
        "fraction, relative to always the top level; 100 for link, relative to level 0)",
    )
    ppo.add_argument("--gamma", type=float, default=0.99, help="PPO's discount")
    ppo.add_argument("--n-steps", type=int, default=16, help="PPO's rollout length per env")
    ppo.add_argument(
        "--buffer-fractions",
        default="recorded,0.05",
        help="buffer sizes to train on, as fractions of the halo ('recorded': the run's own); one env "
        "per trace x rank x buffer size",
    )
    ppo.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="training curves for TensorBoard in a new PPO_N run folder under DIR (SB3's tensorboard_log)",
    )
    ppo.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _buffer_fractions(text: str) -> tuple[float | None, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = None if part == "recorded" else float(part)
        except ValueError:
            value = -1.0
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"--buffer-fractions takes 'recorded' or fractions in (0, 1], got {part!r}")
        out.append(value)
    return tuple(out)


def train_ppo_command(args: argparse.Namespace) -> int:
    """``train.py ppo``: train, save, then print the policy's traffic beside the baselines on the training traces."""
    from rudder.agents.ppo import train_ppo
    from rudder.env.wrappers import parse_levels
    from rudder.evaluation.scoring import compare_policy
    from rudder.traces import Trace

    link = args.action == "link"
    if link:
        from rudder.env.contract import LINK_LEVELS
        from rudder.env.settings import check_link_levels

        levels = LINK_LEVELS if args.levels is None else check_link_levels([float(x) for x in args.levels.split(",")])
    else:
        levels = parse_levels(args.levels or "0,0.25,0.5,1")
    reward = args.reward or ("time" if link else "traffic")
    relative = args.relative_reward if args.relative_reward is not None else (100.0 if link else 1000.0)
    fractions = _buffer_fractions(args.buffer_fractions)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for trace in args.traces:
        Trace(trace)  # a clear error before any training
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
    result = train_ppo(
        args.traces,
        args.steps,
        args.out,
        seed=args.seed,
        levels=levels,
        buffer_fractions=fractions,
        progress=not args.no_progress,
        tensorboard_log=args.tensorboard,
        action=args.action,
        reward=reward,
        relative_reward=relative,
        gamma=args.gamma,
        n_steps=args.n_steps,
    )
    print(
        f"saved {result.path} and {result.sidecar} ({args.steps} steps, {len(result.env_specs)} envs, "
        f"{result.wall_s:.0f} s)"
    )
    if link:
        return _compare_link_policy(result.path, args.traces, fractions)
    rows = compare_policy(result.path, args.traces, fractions)
    print("remote rows fetched on the training traces (one replay episode; random: mean of 3 seeds)")
    print(
        f"{'trace':<24} {'rank':>4} {'buffer':>6} {'ppo':>10} {'periodic':>10} {'static':>10} {'random':>10} "
        f"{'ppo/periodic':>12}"
    )
    for r in rows:
        print(
            f"{r['trace']:<24} {r['rank']:>4} {r['buffer_fraction']:>6.2f} {r['ppo']:>10} {r['periodic']:>10} "
            f"{r['static']:>10} {r['random']:>10.0f} {r['ppo'] / max(r['periodic'], 1):>12.4f}"
        )
    return 0


def _compare_link_policy(path: str, traces: list[str], fractions) -> int:
    """The link-level policy's modelled time on its training traces beside every fixed level and the oracle."""
    from rudder.agents.ppo import PPOAgent
    from rudder.env.contract import buffer_kwargs
    from rudder.env.replay_env import ReplayEnv
    from rudder.evaluation.play import play_episode
    from rudder.evaluation.scoring import level_oracle
    from rudder.traces import Trace

    agent = PPOAgent(path)
    print(
        "modelled seconds on the training traces (one replay episode each): the policy, each fixed level, the "
        "best-level oracle"
    )
    print(
        f"{'trace':<34} {'rank':>4} {'ppo':>8} "
        + " ".join(f"{'L' + format(x, 'g'):>8}" for x in agent.levels)
        + f" {'oracle':>8}"
    )
    for trace in traces:
        for rank in Trace(trace).ranks:
            for fraction in fractions:
                env = ReplayEnv(trace, rank=rank, **buffer_kwargs(agent.settings, fraction))
                ppo = play_episode(env, agent)["time_s"]
                oracle = level_oracle(Trace(trace), rank, fraction, levels=agent.levels)
                print(
                    f"{os.path.basename(os.path.normpath(trace)):<34} {rank:>4} {ppo:>8.3f} "
                    + " ".join(f"{s:>8.3f}" for s in oracle["fixed_level_s"])
                    + f" {oracle['time_s']:>8.3f}"
                )
    return 0


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.command == "gnn":
        from rudder.runtime.config import from_namespace

        cfg = from_namespace(args)
        try:
            if under_mpi():
                return rank_main(cfg)
            return launch(cfg, argv)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"rudder: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "ppo":
        try:
            return train_ppo_command(args)
        except (ValueError, OSError) as exc:
            print(f"rudder: error: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
