"""rudder training entry point.

    python train.py gnn --graph synth-tiny --parts 2 --epochs 1 --agent periodic --summary run.json

``gnn`` trains a GNN with DistDGL on MPI ranks (1 graph server + ``--trainers-per-part`` trainers per partition).
Run it plainly and it starts ``mpiexec`` itself (all ranks on this host); or start it with ``mpiexec -n N`` /
``srun -n N`` and every rank takes its role from its MPI rank (see README, "Running on a cluster").
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from rudder_env.config import add_arguments

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gnn = sub.add_parser("gnn", help="distributed GNN training with a prefetch buffer (DistDGL on MPI ranks)")
    add_arguments(gnn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "gnn":
        from rudder_env.config import from_namespace
        from rudder_env.launch import launch, rank_main, under_mpi

        cfg = from_namespace(args)
        try:
            if under_mpi():
                return rank_main(cfg)
            return launch(cfg, argv, script=os.path.abspath(__file__))
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"rudder: error: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
