"""A job keeps the emulated cluster it runs on: a cluster in use survives ``list`` (and ``up``'s stale sweep) and
``down`` even once the process that brought it up is gone; attaching to such an orphan is refused in one line
unless adopted. Runs ``python -m rudder.testbed.cluster up`` for real (root, namespaces) and SIGKILLs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, record_fault

from rudder.testbed import cluster as cl

pytestmark = [
    pytest.mark.dist,  # namespaces and links: in the job group
    pytest.mark.skipif(os.geteuid() != 0, reason="the emulated cluster needs root"),
]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rudder.testbed.cluster", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )


@pytest.fixture
def orphan():
    """A 1-host cluster whose `up` process was SIGKILLed (its owner is gone); removed afterwards."""
    try:
        cl.preflight()
    except cl.ClusterError as exc:
        pytest.skip(str(exc))
    up = subprocess.Popen(
        [sys.executable, "-m", "rudder.testbed.cluster", "up", "--hosts", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    name = None
    try:
        first = up.stdout.readline()
        assert first.startswith("cluster "), first + up.stderr.read()
        name = first.split()[1].rstrip(":")
        deadline = time.monotonic() + 30
        while "up;" not in up.stdout.readline():
            assert time.monotonic() < deadline
        up.send_signal(signal.SIGKILL)
        up.wait()
        yield name
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if name is not None:
            _cli("down", name, "--force")
            assert not cl._leftovers(name)


def test_attaching_to_a_cluster_whose_owner_is_gone_is_refused_in_one_line(orphan):
    with pytest.raises(cl.ClusterError) as got:
        cl.EmulatedCluster.attach(orphan, use="a test")
    message = str(got.value)
    assert message.startswith(f"cluster {orphan}'s owner (pid ") and "is gone" in message
    assert "--adopt-cluster" in message and "\n" not in message
    record_fault(
        "cluster owner gone",
        "`cluster up` SIGKILLed, then a job attached to its cluster",
        0.0,
        f"rudder: error: {message}".replace(orphan, "NAME"),
        left="the cluster, until `down` or --adopt-cluster",
    )


def test_a_cluster_in_use_survives_list_and_down_until_released(orphan):
    c = cl.EmulatedCluster.attach(orphan, use="a test", adopt=True)
    try:
        assert c.adopted
        c._owner_pid = -1  # as if the adopter were another process than the one sweeping: no atexit teardown here
        state = cl._read_state(orphan)
        state.update(owner_pid=2**22 + 1, owner_start=0)  # the owner gone again; the hold stays
        cl._write_state(state)
        listed = _cli("list")
        assert listed.returncode == 0, listed.stderr
        assert (
            f"{orphan}: 1 hosts" in listed.stdout and "(gone)" in listed.stdout and "in use by a test" in listed.stdout
        )
        assert cl._read_state(orphan) is not None and cl._leftovers(orphan)  # still up
        down = _cli("down", orphan)
        assert down.returncode == 2
        assert down.stderr.strip() == (
            f"rudder: error: cluster {orphan} is in use by a test (pid {os.getpid()}): stop it first, or pass --force"
        )
        assert cl._read_state(orphan) is not None
    finally:
        c.release()
    record_fault(
        "cluster in use",
        "`cluster list` and `down NAME` while a job holds a cluster whose owner is gone",
        None,
        down.stderr.strip().replace(orphan, "NAME"),
        left="(the cluster kept for the job; swept by the next list once released)",
    )
    listed = _cli("list")  # released and ownerless: the sweep removes it now
    assert listed.returncode == 0 and orphan not in listed.stdout
    assert not cl._leftovers(orphan)
