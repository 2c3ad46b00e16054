"""The DistDGL runtime: a real distributed training job on MPI ranks with rudder's buffer between sampler and model.

- :mod:`~rudder_env.dist.config` — the options of a run (``train.py gnn``), one dataclass.
- :mod:`~rudder_env.dist.launcher` — the supervisor ``train.py gnn`` runs outside MPI: starts ``mpiexec``, watches
  the ranks, cleans up.
- :mod:`~rudder_env.dist.rank` — what each MPI rank runs: its role, the job's ``ip_config``, a graph server or a
  trainer playing an agent through ``rudder/Live-v0``.
- :mod:`~rudder_env.dist.trainer` — one trainer rank (DistGraph, sampler, buffer, model, DDP).
- :mod:`~rudder_env.dist.onehost`, :mod:`~rudder_env.dist.dgl_compat` — the one-host fixes and the DGL import step.
- :mod:`~rudder_env.dist.datasets`, :mod:`~rudder_env.dist.partition`, :mod:`~rudder_env.dist.models` — graphs,
  cached partitions, GNN models; :mod:`~rudder_env.dist.summary` — the run's table and JSON.
"""
