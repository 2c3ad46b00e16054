"""rudder's environments: distributed GNN training (DistDGL) as a Gymnasium prefetching game, live or replayed.

Importing the package registers ``rudder/Live-v0`` and ``rudder/Replay-v0``.
"""

from gymnasium.envs.registration import register, registry

# Live training is not deterministic (measured times, neighbour sampling on remote servers); replay is.
for _id, _entry, _nondeterministic in (
    ("rudder/Live-v0", "rudder.env.live_env:LiveEnv", True),
    ("rudder/Replay-v0", "rudder.env.replay_env:ReplayEnv", False),
):
    if _id not in registry:
        register(id=_id, entry_point=_entry, nondeterministic=_nondeterministic)
