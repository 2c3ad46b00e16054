"""The DistDGL runtime: a real distributed training job on MPI ranks with rudder's buffer between sampler and model.

- :mod:`~rudder.runtime.config` — the options of a run (``train.py gnn``), one dataclass.
- :mod:`~rudder.runtime.launcher` — the supervisor ``train.py gnn`` runs outside MPI: starts ``mpiexec``, watches
  the ranks, cleans up.
- :mod:`~rudder.runtime.rank` — what each MPI rank runs: its role, the job's ``ip_config``, a graph server or a
  trainer playing an agent through ``rudder/Live-v0``.
- :mod:`~rudder.runtime.trainer` — one trainer rank (DistGraph, sampler, buffer, model, DDP).
- :mod:`~rudder.runtime.onehost`, :mod:`~rudder.runtime.dgl_compat` — the one-host fixes and the DGL import step.
- :mod:`~rudder.runtime.datasets`, :mod:`~rudder.runtime.partition`, :mod:`~rudder.runtime.models` — graphs,
  cached partitions, GNN models; :mod:`~rudder.runtime.summary` — the run's table and JSON.
"""
