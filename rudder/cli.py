"""The ``rudder`` command: one front door to rudder's entry points.

    rudder train gnn --graph synth-tiny --parts 2 --epochs 2     # = python train.py gnn ...
    rudder train ppo --traces traces/samples/* --steps 40000     # = python train.py ppo ...
    rudder evaluate                                              # = python evaluate.py ...
    rudder cluster up --hosts 4 --link-rate 1gbit                # = python -m rudder.testbed.cluster ...
    rudder bench --quick                                         # = python -m rudder.bench ...
    rudder headroom traces/heldout/*                             # = python -m rudder.headroom ...

Each command takes the same options as the script it stands for (``rudder COMMAND --help``). Installed by
``pip install -e .`` (``install.sh``) as a console script; the scripts themselves keep working as before.
"""

from __future__ import annotations

import sys

from rudder import train
from rudder.testbed import cluster

COMMANDS = {
    "train": "train a GNN with DistDGL on MPI ranks (train gnn), or a PPO prefetch agent on traces (train ppo)",
    "evaluate": "score prefetching agents against each other and the oracles on recorded traces (or live)",
    "cluster": "emulated multi-host cluster on this machine (network namespaces): up, down, list, exec, measure",
    "bench": "run the benchmarks side by side and write BENCHMARKS.md",
    "headroom": "per trace: the best constant action, the bound over action sequences, headroom, MPC's share",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rudder COMMAND [options]", "", __doc__.split("\n\n")[0], "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "rudder COMMAND --help shows a command's options."]
    return "\n".join(lines)


def run(command: str, argv: list[str]) -> int:
    """Run one command with its own arguments; returns the exit code."""
    prog = f"rudder {command}"
    if command == "train":
        return train.main(argv, prog=prog)
    if command == "evaluate":
        from rudder import evaluate

        return evaluate.main(argv, prog=prog)
    if command == "cluster":
        cluster.main(argv, prog=prog)
        return 0
    if command == "bench":
        from rudder.bench.run import main

        return main(argv, prog=prog)
    if command == "headroom":
        from rudder import headroom

        return headroom.main(argv, prog=prog)
    raise KeyError(command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"rudder: error: unknown command {command!r}: expected one of {', '.join(COMMANDS)} (rudder --help)",
            file=sys.stderr,
        )
        return 2
    return run(command, rest)


if __name__ == "__main__":
    sys.exit(main())
