"""The pieces of a graceful stop (rudder/runtime/stop.py) without a DistDGL job: a signal to one MPI rank reaches
every rank, and DGL's abort-on-signal handler is kept out. Whole jobs stopped by Slurm: tests/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELAY = r"""
import json, os, signal, sys, time
from mpi4py import MPI
from rudder.runtime.stop import StopRelay
comm = MPI.COMM_WORLD
relay = StopRelay(comm, f"rank {comm.Get_rank()}")
comm.Barrier()
if comm.Get_rank() == 1:
    os.kill(os.getpid(), signal.SIGUSR1)
t0 = time.monotonic()
while not relay.requested and time.monotonic() - t0 < 10:
    time.sleep(0.01)
print(json.dumps(dict(rank=comm.Get_rank(), signal=relay.signal, origin=relay.origin, here=relay.received_here,
                      after_s=time.monotonic() - t0)), flush=True)
relay.close()
comm.Barrier()
"""

DGL_HANDLER = r"""
import os, signal, sys, time
from rudder.runtime.dgl_compat import import_dgl
from rudder.runtime.stop import keep_dgl_handler_out
dgl = import_dgl()
seen = []
signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
if sys.argv[1] == "kept-out":
    keep_dgl_handler_out()
dgl.distributed.rpc.register_sig_handler()  # what DGL's servers and clients call when they start
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("survived", seen, flush=True)
"""


def test_a_signal_to_one_rank_reaches_every_rank():
    proc = subprocess.run(
        ["mpiexec", "-n", "3", sys.executable, "-c", RELAY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    import re

    rows = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1, 2]
    assert all(r["signal"] == "SIGUSR1" and r["origin"] == 1 for r in rows), rows
    assert [r["here"] for r in rows] == [None, "SIGUSR1", None]
    assert max(r["after_s"] for r in rows) < 2.0, rows
    assert "SIGUSR1 received on rank 1: stopping after the current minibatch" in proc.stderr


def test_dgl_signal_handler_is_kept_out():
    """DGL's servers and clients install a C handler that prints "User pressed Ctrl+C, Exiting" and ends the process
    on SIGTERM/SIGINT; kept out, the Python handler runs and the process goes on."""
    proc = subprocess.run(
        [sys.executable, "-c", DGL_HANDLER, "kept-out"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0 and "survived [15]" in proc.stdout, proc.stdout + proc.stderr
