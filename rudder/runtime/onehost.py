"""The one-host fixes: several DistDGL partitions (machines) on one host, each reading its own partition.

DGL 2.1 assumes one machine per host. With every server on 127.0.0.1 it goes wrong in two ways:

1. A trainer finds its machine id by matching the host's IP addresses against ip_config
   (``dgl.distributed.rpc_client.get_local_machine_id``): every trainer gets machine 0.
2. Servers put their partition (graph structure, partition book, node data) in POSIX shared memory under names
   that carry no partition id (e.g. ``node~_N~feat-kvdata-``), so the servers of one host overwrite each other and
   trainers silently read another partition's rows.

:func:`apply` fixes both for one process: the machine id comes from the rank's role, and every shared-memory name
DistDGL creates or opens gets a per-machine prefix ``m<id>_`` (after a leading ``/`` where there is one). It must be
applied in every server, trainer and sampler process of a one-host job, before DGL creates or opens any segment; it
records the machine id in ``RUDDER_ONEHOST_MACHINE`` so that processes spawned from it (DGL sampler workers) apply it
too via :func:`apply_from_env`. Multi-host jobs never call it: there DGL runs unpatched.
"""

from __future__ import annotations

import functools
import os

from rudder.runtime.dgl_compat import import_dgl

ENV_VAR = "RUDDER_ONEHOST_MACHINE"
TAG_VAR = "RUDDER_JOB_TAG"
_applied: int | None = None


def prefixed(name: str, machine_id: int, tag: str = "") -> str:
    """Shared-memory name ``name`` for machine ``machine_id`` of job ``tag``: ``<tag>m<id>_`` after any leading
    ``/``."""
    prefix = f"{tag}m{machine_id}_"
    if name.startswith("/"):
        return "/" + prefix + name[1:]
    return prefix + name


def _wrap_name_arg(fn, machine_id: int, tag: str, pos: int = 0):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = list(args)
        args[pos] = prefixed(args[pos], machine_id, tag)
        return fn(*args, **kwargs)

    wrapper.__rudder_onehost__ = True
    return wrapper


def apply(machine_id: int, tag: str = "") -> None:
    """Patch DGL in this process for machine ``machine_id`` of a one-host job (idempotent, same id only).

    ``tag`` (letters and digits) names the job in every segment, so a clean-up can find exactly its segments.
    """
    global _applied
    if _applied is not None:
        if _applied != machine_id:
            raise RuntimeError(f"one-host fixes already applied for machine {_applied}, not {machine_id}")
        return
    import_dgl()
    from dgl import heterograph_index
    from dgl.distributed import dist_graph, graph_partition_book, kvstore, rpc_client, shared_mem_utils

    for module in (kvstore, dist_graph, graph_partition_book, shared_mem_utils):
        module.empty_shared_mem = _wrap_name_arg(module.empty_shared_mem, machine_id, tag)
    for module in (dist_graph, graph_partition_book):
        module.exist_shared_mem_array = _wrap_name_arg(module.exist_shared_mem_array, machine_id, tag)
    heterograph_index.create_heterograph_from_shared_memory = _wrap_name_arg(
        heterograph_index.create_heterograph_from_shared_memory, machine_id, tag
    )
    heterograph_index.HeteroGraphIndex.shared_memory = _wrap_name_arg(
        heterograph_index.HeteroGraphIndex.shared_memory, machine_id, tag, pos=1
    )  # (self, name, ...)
    rpc_client.get_local_machine_id = lambda server_namebook: machine_id
    os.environ[ENV_VAR] = str(machine_id)
    os.environ[TAG_VAR] = tag
    _applied = machine_id


def apply_from_env() -> None:
    """Apply the fixes if this process belongs to a one-host job (``RUDDER_ONEHOST_MACHINE`` is set)."""
    value = os.environ.get(ENV_VAR)
    if value is not None and value != "":
        apply(int(value), tag=os.environ.get(TAG_VAR, ""))
