"""A job whose every rank finished in order ends with status 0: the kill paths that could end a finished rank.

A finished job was once reported failed now and then (``mpiexec exited with 9``: one rank SIGKILLed after the
summary). The paths that send SIGKILL are checked here one by one, without running a DistDGL job: the rank's watch
on its supervising launcher kills only on proof that the launcher is gone; the emulated cluster's kill of a host's
processes spares a pid that no longer names a process of that host (pids wrap); the launcher's verdict on a job
whose every rank recorded ``done`` is success, with a warning naming what mpiexec said."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, record_fault

from rudder.runtime.procs import alive, start_time

_WATCH = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    if {no_pidfd}:
        def refuse(pid, flags=0):
            raise OSError(24, "Too many open files")
        os.pidfd_open = refuse
    from rudder.runtime import rank
    rank.LEAVE_GRACE_S = {grace_s}
    if {leaving}:
        rank.LEAVING.set()
    rank._end_with_supervisor({supervisor!r}{poll})
    print("watching", flush=True)
    time.sleep({stay_s})
    print("still here", flush=True)
    """
)


def _watcher(
    supervisor: subprocess.Popen, no_pidfd: bool, stay_s: float, leaving: bool = False, grace_s: float = 30.0
) -> subprocess.Popen:
    """A process running the rank's supervisor watch on ``supervisor``, in a session of its own (the watch kills
    its process group); ``leaving``: the rank is leaving on its own, with ``grace_s`` to do it."""
    code = _WATCH.format(
        root=ROOT,
        leaving=leaving,
        grace_s=grace_s,
        no_pidfd=no_pidfd,
        supervisor=f"{supervisor.pid} {start_time(supervisor.pid)}",
        stay_s=stay_s,
        poll=", poll_s=0.1" if no_pidfd else "",
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _end_the_launcher(supervisor: subprocess.Popen, watcher: subprocess.Popen, timeout_s: float) -> float:
    """Once ``watcher`` is watching, kill ``supervisor``; the seconds until ``watcher`` exits."""
    assert watcher.stdout.readline().strip() == "watching"
    supervisor.kill()
    supervisor.wait()
    t0 = time.monotonic()
    watcher.wait(timeout=timeout_s)
    return time.monotonic() - t0


@pytest.mark.parametrize("no_pidfd", [False, True], ids=["pidfd", "no-pidfd"])
def test_the_supervisor_watch_leaves_a_rank_alone_while_its_launcher_runs(no_pidfd):
    """Without a pidfd (a descriptor limit) the watch used to SIGKILL its rank at once, the launcher alive."""
    supervisor = subprocess.Popen(["sleep", "60"])
    try:
        proc = _watcher(supervisor, no_pidfd, stay_s=1.5)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (proc.returncode, err[-2000:])
        assert out.split() == ["watching", "still", "here"]
        assert "is gone" not in err
    finally:
        supervisor.kill()
        supervisor.wait()


@pytest.mark.parametrize("no_pidfd", [False, True], ids=["pidfd", "no-pidfd"])
def test_the_supervisor_watch_ends_its_rank_once_the_launcher_is_gone(no_pidfd):
    supervisor = subprocess.Popen(["sleep", "60"])
    proc = _watcher(supervisor, no_pidfd, stay_s=60)
    try:
        took = _end_the_launcher(supervisor, proc, timeout_s=20)
        assert proc.returncode == -signal.SIGKILL
        assert "the supervising launcher" in proc.stderr.read()
        assert took < (1.0 if no_pidfd else 0.5) + 2.0  # the poll period, or at once, plus start-up noise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("exits_in_s", [1.0, 60.0], ids=["leaves-in-time", "hangs-on-the-way-out"])
def test_a_rank_leaving_on_its_own_gets_its_grace_then_is_ended(exits_in_s):
    """A rank that finished in order (or was stopped) and is still leaving when its launcher goes is given
    LEAVE_GRACE_S: one that leaves within it ends as it meant to (status 0, not SIGKILL: the failure this module is
    about); one whose exit hangs is ended once the grace is over, not before."""
    grace_s = 3.0
    supervisor = subprocess.Popen(["sleep", "60"])
    proc = _watcher(supervisor, False, stay_s=exits_in_s, leaving=True, grace_s=grace_s)
    try:
        took = _end_the_launcher(supervisor, proc, timeout_s=30)
        if exits_in_s < grace_s:
            assert proc.returncode == 0 and proc.stdout.read().split() == ["still", "here"]
            assert "is gone" not in proc.stderr.read()
        else:
            assert proc.returncode == -signal.SIGKILL
            assert grace_s - 0.2 <= took < grace_s + 2.0, took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_signal_process_spares_a_pid_that_names_another_process():
    from rudder.runtime.procs import signal_process

    victim = subprocess.Popen(["sleep", "60"])
    try:
        start = start_time(victim.pid)
        assert not signal_process(victim.pid, signal.SIGKILL, start + 1)  # the start time of another process
        time.sleep(0.1)
        assert alive(victim.pid, start)
        assert signal_process(victim.pid, signal.SIGKILL, start)
        victim.wait(timeout=5)
        assert victim.returncode == -signal.SIGKILL
        assert not signal_process(victim.pid, signal.SIGKILL, start)  # gone (reaped): nothing is signalled
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_killing_a_hosts_processes_spares_a_pid_outside_the_host(monkeypatch):
    """The host's member list is read, then each member is signalled; a member that exits in between leaves its
    pid free, and pids wrap. Here the list names a process outside the host: it must be spared, a real member
    killed."""
    from rudder.testbed import cluster as cl

    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    outsider = subprocess.Popen(["sleep", "60"])
    member = None
    try:
        deadline = time.monotonic() + 10
        while cl._ns_inode(holder.pid, "net") == cl._ns_inode(os.getpid(), "net"):  # unshare has not exec'd yet
            assert time.monotonic() < deadline
            time.sleep(0.01)
        member = subprocess.Popen(["nsenter", "-t", str(holder.pid), "--net", "sleep", "60"])
        while cl._ns_inode(member.pid, "net") != cl._ns_inode(holder.pid, "net"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        c = cl.EmulatedCluster(1, name="zzexit")
        c._state = dict(
            holders=[
                dict(pid=holder.pid, start=cl._start_time(holder.pid), netns_inode=cl._ns_inode(holder.pid, "net"))
            ]
        )
        listed = [outsider.pid, member.pid, holder.pid]
        monkeypatch.setattr(cl, "_members", lambda net, mnt: list(listed))
        killed = c.kill_processes(0)
        assert killed == [member.pid]
        member.wait(timeout=5)
        assert member.returncode == -signal.SIGKILL
        time.sleep(0.1)
        assert outsider.poll() is None and holder.poll() is None
    finally:
        for p in (holder, outsider, member):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


_FAKE_MPIEXEC = textwrap.dedent(
    """
    import json, os, sys, time
    job_dir = os.path.join(sys.argv[1], "jobs", os.environ["RUDDER_JOB_TAG"])
    for r in range(int(sys.argv[2])):
        role = dict(rank=r, kind="trainer", machine=r, trainer_rank=r, host="h")
        st = dict(state="done", pid=os.getpid(), start=0, role=role, describe=f"rank {{r}}", time=time.time())
        with open(os.path.join(job_dir, "status", f"rank{{r}}.json"), "w") as f:
            json.dump(st, f)
    print("Killed (signal 9)", flush=True)
    sys.exit({rc})
    """
)


@pytest.mark.parametrize("every_rank_done", [True, False])
def test_a_job_whose_every_rank_finished_ends_with_status_0(tmp_path, every_rank_done):
    """mpiexec's exit code after every rank recorded ``done`` (summary and trace written, MPI agreed on the way
    out) no longer fails the job: the launcher says what mpiexec reported, in one warning line."""
    from rudder.runtime.config import TrainConfig
    from rudder.runtime.console import JobLog
    from rudder.runtime.launcher import _supervise

    cfg = TrainConfig(graph="synth-tiny", parts=2, cache_dir=str(tmp_path / "cache"), watchdog_s=0)
    ranks = cfg.world_size if every_rank_done else cfg.world_size - 1
    cmd = [sys.executable, "-c", _FAKE_MPIEXEC.format(rc=9), cfg.cache_dir, str(ranks)]
    log = JobLog(str(tmp_path / "job.log"))
    shown = []
    log._show = lambda text, err: shown.append(text)
    try:
        rc = _supervise(cfg, cmd, log)
    finally:
        log.close()
    text = "".join(shown)
    if every_rank_done:
        assert rc == 0, text
        assert "warning: every rank finished in order, but mpiexec exited with 9" in text
        record_fault(
            "rank killed after finishing",
            "mpiexec exits 9 after every rank recorded done (a rank SIGKILLed on its way out)",
            None,
            next(line for line in text.splitlines() if "warning" in line).split(" (log: ")[0],
            left="nothing: job folder removed; exit status 0",
        )
    else:
        assert rc == 9, text
        assert "job failed: mpiexec exited with 9" in text
    assert not os.listdir(os.path.join(cfg.cache_dir, "jobs"))  # the job folder is removed either way
