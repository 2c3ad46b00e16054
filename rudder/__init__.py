"""rudder: distributed GNN training (DistDGL on MPI ranks) as a Gymnasium environment for prefetching agents.

One import namespace, mapped onto the repository's folders (``pyproject.toml``):

- :mod:`rudder.traces` (``traces/``) — the trace format: writer, reader, synthetic traces, time checks.
- :mod:`rudder.env` (``rudder_env/``) — the environment core: buffer, episode, replay and live envs, spaces.
- :mod:`rudder.agents` (``agents/``) — learned agents (PPO, SB3, the LLM in ``agents/llm/``) behind one protocol.
- :mod:`rudder.baselines` (``baselines/``) — heuristics and oracles.
- :mod:`rudder.evaluation` — playing agents over envs, scoring them, reports.
- :mod:`rudder.testbed` — the emulated cluster (network namespaces, shaped links) jobs run on.
- :mod:`rudder.runtime` — the DistDGL runtime: launcher, MPI ranks, trainers.
- :mod:`rudder.train`, :mod:`rudder.evaluate`, :mod:`rudder.cli`, :mod:`rudder.bench` (``bench/``) — entry points.
"""

__version__ = "0.1.0"
