"""The emulated cluster (rudder.testbed.cluster): namespaces, shaped links, per-host /dev/shm and /etc/hosts, a real
cross-host mpiexec, and that nothing is left after down(), a failed up(), an owner killed by SIGKILL (then
cleanup_stale()), SIGTERM or SIGINT, and SIGINT to the command line's `up`.

The tests that build a cluster need root and ip, tc, unshare, nsenter; they are skipped otherwise.
"""

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from rudder.testbed import cluster as cl
from rudder.testbed.cluster import ClusterError, EmulatedCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 400e6

try:
    cl.preflight()
    _SKIP = None
except ClusterError as e:
    _SKIP = str(e)
needs_cluster = pytest.mark.skipif(_SKIP is not None, reason=f"no emulated cluster here: {_SKIP}")


def fresh_name(suffix: str) -> str:
    return "t" + secrets.token_hex(3) + suffix  # 8 characters


def leftovers(name: str, pids=()) -> list[str]:
    """What the system still holds of cluster ``name`` (checked with ip and /proc, not the module's own helpers)."""
    prefix = f"rd-{name}-"
    netns = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], check=False, capture_output=True, text=True).stdout
    left = [f"netns {n}" for n in netns if n.startswith(prefix)]
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if prefix in line]
    if os.path.exists(f"/run/rudder-cluster/{name}"):
        left.append("run dir")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.append(f"process {pid}")
        except OSError:
            pass
    return left


def output(c: EmulatedCluster, host, argv, timeout=20) -> str:
    p = c.run(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out


def connect(c: EmulatedCluster, src, addr: str) -> str:
    """Try a TCP connect from host ``src`` to ``addr`` port 9 (nothing listens): 'refused' means reachable."""
    code = (
        f"import socket\ns = socket.socket(); s.settimeout(1)\ntry:\n    s.connect(({addr!r}, 9)); print('open')\n"
        "except ConnectionRefusedError: print('refused')\nexcept OSError as e: print(type(e).__name__)"
    )
    return output(c, src, [sys.executable, "-I", "-S", "-c", code]).strip()


@pytest.fixture(scope="module")
def c():
    name = fresh_name("m")
    with EmulatedCluster(2, link_rate="400mbit", name=name) as cluster:
        holders = [h["pid"] for h in cluster._state["holders"]]
        yield cluster
    assert leftovers(name, holders) == []


@needs_cluster
def test_addresses_hostnames_etc_hosts(c):
    assert c.hostnames == [f"rd-{c.name}-h0", f"rd-{c.name}-h1"]
    assert all(a.startswith(("198.18.", "198.19.")) for a in c.addresses + [c.bridge_address])
    assert len(set(c.addresses)) == 2 and c.bridge == f"rd-{c.name}-br" and len(c.bridge) <= 15
    for i, h in enumerate(c.hostnames):
        assert output(c, i, ["hostname"]).strip() == h
        for other, addr in zip(c.hostnames, c.addresses):
            assert output(c, h, ["getent", "hosts", other]).split() == [addr, other]
        routes = output(c, i, ["ip", "-4", "route"])
        assert "default" not in routes and routes.count("\n") == 1
    assert socket.gethostname() not in c.hostnames
    with open("/etc/hosts") as f:
        assert c.name not in f.read()
    # the other host and the bridge answer (refused: nothing listens); anything else is unreachable
    assert connect(c, 0, c.addresses[1]) == "refused"
    assert connect(c, 0, c.bridge_address) == "refused"
    assert connect(c, 0, "192.0.2.1") == "OSError"  # network unreachable (TEST-NET-1, never routed)


@needs_cluster
def test_throughput_follows_the_link_rate(c):
    bits = c.measure_throughput(0, 1, seconds=1.5)
    assert abs(bits - RATE) < 0.25 * RATE, bits
    c.set_rate(0, "100mbit")
    try:
        slow = c.measure_throughput(0, 1, seconds=1.0)
        assert abs(slow - 100e6) < 0.25 * 100e6, slow
        back = c.measure_throughput(1, 0, seconds=1.0)  # host 1's egress is still at 400mbit
        assert abs(back - RATE) < 0.25 * RATE, back
    finally:
        c.set_rate(0, "400mbit")


@needs_cluster
def test_a_competing_flow_takes_its_share_of_the_link_while_it_sends(c):
    """A co-tenant's flow (what --scenario plays for a co-tenant burst) is real traffic through the source host's
    shaped egress, served first: while it sends at 3/4 of the rate, a job's stream gets the other quarter (of the
    ~95.6% a TCP stream carries as payload); paused, the link is the job's again; closed, its sink counted what it
    carried and the shaper has its own queue back."""
    flow = c.competing_flow(0, 1)
    try:
        flow.set_rate(0.75 * RATE)
        time.sleep(0.3)
        shared = c.measure_throughput(0, 1, seconds=1.5)
        flow.set_rate(0)
        time.sleep(0.3)
        alone = c.measure_throughput(0, 1, seconds=1.0)
    finally:
        carried = flow.close()
    assert abs(shared / RATE - 0.25 * 0.956) < 0.08, shared
    assert abs(alone - RATE) < 0.25 * RATE, alone
    assert 0.6 * 0.75 * RATE / 8 * 1.8 < carried < 1.1 * 0.75 * RATE / 8 * 2.5, carried  # ~3/4 of the link, ~2 s
    shown = subprocess.run(["tc", "-n", c.hostnames[0], "qdisc", "show"], capture_output=True, text=True).stdout
    assert "pfifo_fast" not in shown and "rate 400Mbit" in shown
    with pytest.raises(ClusterError, match="two different hosts"):
        c.competing_flow(1, 1)


_BUSY = "import time; t = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass\nprint(time.process_time())"


def _busy_cpu_s(c: EmulatedCluster, host: str) -> float:
    """CPU seconds a process started in ``host`` as mpiexec starts ranks (the ssh stand-in) gets in 1 s of wall."""
    cmd = f"{sys.executable} -I -S -c {shlex.quote(_BUSY)}"
    res = subprocess.run([c.launcher_exec, host, cmd], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    return float(res.stdout)


@needs_cluster
@pytest.mark.skipif(cl.cpu_cgroup_root() is None, reason="no writable CPU cgroup controller here")
def test_a_cpu_cap_slows_what_is_started_in_the_host_and_is_lifted_and_removed(c):
    """cap_cpu (a straggler host, live): a busy process started in the host the way mpiexec starts ranks gets
    about the cap's share of a CPU; lifted, a whole one (a core is free: nothing else runs in this test); the
    cluster's teardown removes the cgroup (test ``c``'s fixture checks nothing of it is left)."""
    host = c.hostnames[1]
    try:
        c.cap_cpu(1, 0.25)
        capped = _busy_cpu_s(c, host)
        c.cap_cpu(1, None)
        free = _busy_cpu_s(c, host)
    finally:
        c.cap_cpu(1, None)
    assert 0.1 < capped < 0.4, capped
    assert free > 0.7, free
    with pytest.raises(ClusterError, match="> 0 cores"):
        c.cap_cpu(0, 0)


@needs_cluster
def test_link_down_and_up(c):
    c.link_down(1)
    try:
        assert connect(c, 0, c.addresses[1]) in ("TimeoutError", "timeout", "OSError")
    finally:
        c.link_up(1)
    deadline = time.monotonic() + 5
    while connect(c, 0, c.addresses[1]) != "refused":
        assert time.monotonic() < deadline, "link did not come back"


@needs_cluster
def test_dev_shm_is_per_host_and_shared_within_a_host(c):
    name = f"rudder-test-{secrets.token_hex(4)}"
    writer = c.run(0, ["sh", "-c", f"echo hello > /dev/shm/{name}; exec sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while name not in output(c, 0, ["ls", "/dev/shm"]):  # a second process of host 0 sees the writer's file
            assert time.monotonic() < deadline
        assert output(c, 0, ["cat", f"/dev/shm/{name}"]) == "hello\n"
        assert name not in output(c, 1, ["ls", "/dev/shm"])
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        writer.kill()
        writer.wait()
    assert output(c, 0, ["cat", f"/dev/shm/{name}"]) == "hello\n"  # the host's /dev/shm outlives its processes


@needs_cluster
def test_launcher_exec_called_like_ssh(c):
    # hydra: HELPER -x HOST '"/path/to/hydra_pmi_proxy"' --control-port ADDR:PORT ...
    res = subprocess.run(
        [c.launcher_exec, "-x", c.hostnames[1], '"/bin/echo"', "--flag", "x:1", "&&", "hostname"],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["--flag", "x:1", c.hostnames[1]]
    bad = subprocess.run(
        [c.launcher_exec, "-x", "nohost", "true"], check=False, capture_output=True, text=True, timeout=10
    )
    assert bad.returncode == 255 and "no host" in bad.stderr


@needs_cluster
def test_mpiexec_across_hosts(c):
    pytest.importorskip("mpi4py")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip(f"no {mpiexec}")
    prog = (
        "from mpi4py import MPI; import json, socket, time, numpy as np\n"
        "comm = MPI.COMM_WORLD; r = comm.Get_rank(); a = np.zeros(10_000_000 // 8)\n"
        "comm.Barrier(); t = time.perf_counter()\n"
        "if r == 0: comm.Send(a, 1); comm.Recv(a[:1], 1)\n"
        "else: comm.Recv(a, 0); comm.Send(a[:1], 0)\n"
        "bits = 8 * a.nbytes / (time.perf_counter() - t)\n"
        "names = comm.gather(socket.gethostname())\n"  # one line from rank 0: hydra interleaves ranks' output
        "if r == 0: print(json.dumps({'hosts': names, 'sum': comm.allreduce(r + 1), 'bits': bits}))\n"
        "else: comm.allreduce(r + 1)\n"
    )
    args = c.mpiexec_args(1)
    assert args == [
        "-launcher",
        "ssh",
        "-launcher-exec",
        c.launcher_exec,
        "-hosts",
        f"{c.hostnames[0]}:1,{c.hostnames[1]}:1",
        "-iface",
        c.bridge,
    ]
    res = subprocess.run(
        [mpiexec, *args, "-n", "2", sys.executable, "-c", prog],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["hosts"] == c.hostnames and out["sum"] == 3
    # 10 MB between the ranks crossed the shaped link (not shared memory): at most the link rate, with a margin
    assert 0.4 * RATE < out["bits"] < 1.25 * RATE, out


@needs_cluster
def test_down_leaves_nothing_and_is_idempotent():
    name = fresh_name("d")
    c = EmulatedCluster(3, link_rate="1gbit", name=name).up()
    holders = [h["pid"] for h in c._state["holders"]]
    inside = c.run(2, ["sh", "-c", "sleep 60 & exec sleep 60"])
    assert len(leftovers(name, holders)) == 3 + 4 + 1 + 3  # netns, links (bridge + 3 veths), run dir, holders
    with pytest.raises(ClusterError):
        EmulatedCluster(2, name=name).up()  # the name is taken
    c.down()
    assert inside.poll() is not None
    assert leftovers(name, holders) == []
    c.down()
    assert leftovers(name, holders) == []


@needs_cluster
def test_partial_failure_tears_down(monkeypatch):
    name = fresh_name("f")
    monkeypatch.setattr(cl, "preflight", lambda: None)
    monkeypatch.setattr(cl, "tbf_args", lambda bits: ["tbf", "rate", "nonsense"])
    with pytest.raises(ClusterError, match="tc"):
        EmulatedCluster(2, link_rate="400mbit", name=name).up()
    assert leftovers(name) == []


OWNER = """
import subprocess, sys, time
from rudder.testbed.cluster import EmulatedCluster
c = EmulatedCluster(2, link_rate="400mbit", name=sys.argv[1]).up()
c.run(1, ["sh", "-c", "sleep 60 & exec sleep 60"])
print(*[h["pid"] for h in c._state["holders"]], flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
@needs_cluster
def test_owner_killed(sig):
    name = fresh_name("k")
    # started as from a shell, SIGINT at its default: a process started with it ignored keeps it ignored across exec
    # (and Python then raises no KeyboardInterrupt); an earlier test in a suite's worker left it so once
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    holders = [int(p) for p in owner.stdout.readline().split()]
    assert len(holders) == 2 and leftovers(name)
    netns = os.stat(f"/run/netns/rd-{name}-h1").st_ino
    owner.send_signal(sig)
    # the owner would sleep 600 s: it ends sooner only through the signal; its teardown takes up to 10 s of SIGTERM
    # then SIGKILL for what runs inside, then ip commands
    try:
        owner.wait(timeout=20)
    except subprocess.TimeoutExpired:
        owner.kill()
        owner.wait()
        pytest.fail(f"the owner was still running 20 s after {sig.name}; left: {leftovers(name)}")
    if sig != signal.SIGKILL:  # its teardown ended what ran inside, which held its pipes too: they are at EOF
        err = owner.stderr.read()
        assert "Traceback" not in err or "KeyboardInterrupt" in err, err[-2000:]
    if sig == signal.SIGKILL:
        assert leftovers(name)  # nothing could run: the cluster stays until cleanup_stale()
        cl.cleanup_stale()  # (or a concurrent run's)
    assert leftovers(name, holders) == []
    assert cl._members({netns}, set()) == []  # the processes started inside are gone too


@needs_cluster
def test_cli_up_sigint_and_errors():
    name = fresh_name("c")
    cmd = [sys.executable, "-m", "rudder.testbed.cluster"]
    up = subprocess.Popen(
        cmd + ["up", "--hosts", "2", "--link-rate", "400mbit", "--name", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        lines = []
        while not lines or not lines[-1].startswith("up;"):
            line = up.stdout.readline()
            assert line, up.stderr.read()
            lines.append(line)
        text = "".join(lines)
        assert f"rd-{name}-h0" in text and f"-launcher-exec /run/rudder-cluster/{name}/ssh" in text
        listing = subprocess.run(
            cmd + ["list"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=30
        ).stdout
        assert f"{name}: 2 hosts, link 400mbit" in listing
        ex = subprocess.run(
            cmd + ["exec", f"rd-{name}-h1", "--", "hostname"],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert ex.stdout.strip() == f"rd-{name}-h1"
    finally:
        up.send_signal(signal.SIGINT)
        rest = up.communicate(timeout=30)[0]
    assert up.returncode == 0 and f"cluster {name}: down" in rest
    assert leftovers(name) == []

    for argv in (
        ["up", "--hosts", "2", "--link-rate", "5furlongs"],
        ["exec", "rd-nosuch-h0", "--", "true"],
        ["down", "nosuch"],
        ["frobnicate"],
    ):
        res = subprocess.run(cmd + argv, check=False, capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert res.returncode == 2 and res.stderr.startswith("rudder: error: ")
        assert res.stderr.count("\n") == 1, res.stderr


def test_preflight_refusals(monkeypatch):
    monkeypatch.setattr(cl.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cl.shutil, "which", lambda tool: None if tool == "tc" else "/usr/bin/" + tool)
    with pytest.raises(ClusterError, match="needs tc "):
        cl.preflight()
    monkeypatch.setattr(cl.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterError, match="needs root"):
        cl.preflight()


def test_bad_arguments():
    with pytest.raises(ClusterError):
        EmulatedCluster(0)
    with pytest.raises(ClusterError):
        EmulatedCluster(2, name="Has-Caps")
    with pytest.raises(ClusterError):
        EmulatedCluster(2, link_rate="1gbps")
    assert cl.parse_rate("500mbit") == 500_000_000 and cl.parse_rate("1.5gbit") == 1_500_000_000
