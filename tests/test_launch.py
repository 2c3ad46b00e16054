"""Roles from MPI ranks, MPI detection, the one-host shared-memory names, options and the DGL compat step."""

import json
import os
import socket

import pytest

from rudder.runtime import onehost
from rudder.runtime.config import TrainConfig
from rudder.runtime.ports import port_in_use
from rudder.runtime.rank import assign_roles, under_mpi


def test_one_host_roles_servers_first_then_trainers_per_machine():
    roles, one_host = assign_roles(["h"] * 6, parts=2, trainers_per_part=2)
    assert one_host
    assert [(r.kind, r.machine, r.trainer_rank) for r in roles] == [
        ("server", 0, -1),
        ("server", 1, -1),
        ("trainer", 0, 0),
        ("trainer", 0, 1),
        ("trainer", 1, 2),
        ("trainer", 1, 3),
    ]
    assert roles[3].describe() == "rank 3 (trainer 1 of machine 0 on h)"


def test_several_hosts_one_machine_each_lowest_rank_serves():
    hosts = ["a", "b", "a", "b", "a", "b"]  # srun's cyclic distribution
    roles, one_host = assign_roles(hosts, parts=2, trainers_per_part=2)
    assert not one_host
    assert [(r.kind, r.machine, r.trainer_rank) for r in roles] == [
        ("server", 0, -1),
        ("server", 1, -1),
        ("trainer", 0, 0),
        ("trainer", 1, 2),
        ("trainer", 0, 1),
        ("trainer", 1, 3),
    ]


@pytest.mark.parametrize(
    "hosts, parts, tpp, message",
    [
        (["h"] * 3, 2, 1, r"3 MPI ranks, expected 4 = 2 partitions x \(1 server \+ 1 trainers\)"),
        (["a", "b", "c", "a", "b", "c"], 2, 2, r"spread over 3 hosts but --parts is 2"),
        (["a", "a", "a", "b"], 2, 1, r"host a has 3 ranks, expected 2"),
    ],
)
def test_bad_layouts_are_named(hosts, parts, tpp, message):
    with pytest.raises(ValueError, match=message):
        assign_roles(hosts, parts, tpp)


def test_under_mpi_reads_the_launchers_variables(monkeypatch):
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    assert not under_mpi()
    monkeypatch.setenv("SLURM_PROCID", "0")  # inside an sbatch script, not yet in an srun step
    monkeypatch.setenv("SLURM_STEP_ID", "batch")
    assert not under_mpi()
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert under_mpi()
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.setenv("PMI_RANK", "3")
    assert under_mpi()


def test_shared_memory_names_carry_job_and_machine():
    assert onehost.prefixed("node~_N~feat-kvdata-", 1, "rdab12") == "rdab12m1_node~_N~feat-kvdata-"
    assert onehost.prefixed("/graph_name", 0) == "/m0_graph_name"


def test_port_in_use_is_detected():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert port_in_use("127.0.0.1", s.getsockname()[1])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fanout", "10,x", r"fanout \(--fanout\) must be comma-separated integers"),
        ("parts", -1, r"parts \(--parts\) must be an integer >= 1, got -1"),
        ("hosts", 1, r"--hosts must be 0 \(this host\) or >= 2"),
        ("link_rate", "500mbit", "--link-rate shapes the links of emulated hosts: it needs --hosts N"),
        ("buffer_fraction", 1.5, r"buffer_fraction \(--buffer-fraction\) must be a number in \[0, 1\], got 1.5"),
        ("period", 0, r"period \(--period\) must be an integer >= 1, got 0"),
        ("agent", "recorded", "--agent recorded and --decisions-from TRACE go together"),
        ("decisions_from", "/nonexistent", "--agent recorded and --decisions-from TRACE go together"),
    ],
)
def test_bad_options_are_rejected(field, value, message):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_hosts_set_the_partitions_and_take_a_link_rate():
    assert TrainConfig().parts == 2 and TrainConfig(hosts=3).parts == 3
    with pytest.raises(ValueError, match="--hosts 3 runs one partition per host: --parts must be 3"):
        TrainConfig(hosts=3, parts=2).validate()
    with pytest.raises(ValueError, match="--link-rate: bad link rate 'fast'"):
        TrainConfig(hosts=2, link_rate="fast").validate()
    TrainConfig(hosts=2, link_rate="1gbit").validate()


def test_a_scenario_live_refuses_what_it_cannot_play_in_one_line(tmp_path):
    """--scenario live: a straggler that would run faster (a CPU cap only slows) and wider rows are refused, each
    naming the file and field; a slowing straggler, a co-tenant and a link timeline are accepted."""

    def scenario(**kw):
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(dict(version=1, name="s", **kw)))
        return str(path)

    def check(path):
        TrainConfig(hosts=2, link_rate="400mbit", scenario=path).validate()

    fast = scenario(processes=[dict(kind="straggler", hosts=[0], factor=0.5)])
    with pytest.raises(ValueError, match=r"processes\[0\]\.factor: a straggler played live can only slow its host"):
        check(fast)
    with pytest.raises(ValueError, match="feature_bytes_factor cannot be played on a live run"):
        check(scenario(feature_bytes_factor=2.0))
    from rudder.testbed.cluster import cpu_cgroup_root

    ok = dict(kind="cotenant", hosts=[1], timeline=dict(type="constant", value=0.5))
    slow = scenario(processes=[dict(kind="straggler", hosts=[0], factor=2.0), ok])
    if cpu_cgroup_root() is None:  # nothing to cap with: refused, saying why
        with pytest.raises(ValueError, match="no writable CPU cgroup controller"):
            check(slow)
    else:
        check(slow)


def test_recorded_decisions_need_an_existing_trace():
    with pytest.raises(ValueError, match="--decisions-from /nonexistent: no such trace folder"):
        TrainConfig(agent="recorded", decisions_from="/nonexistent").validate()


def test_dgl_compat_is_a_noop_once_the_library_exists():
    from rudder.runtime import dgl_compat

    path = dgl_compat._graphbolt_path()
    assert path is not None and os.path.exists(path)  # made by install.sh or the first import
    assert dgl_compat.ensure_graphbolt_stub() is None
    dgl = dgl_compat.import_dgl()
    assert dgl.__version__.startswith("2.")


def _several_host_job(tmp_path, monkeypatch, addresses: dict[str, str]):
    """prepare_job for 2 partitions x 2 trainers spread over hosts "nodeA" and "nodeB", which resolve through
    ``addresses`` (a stand-in for DNS / /etc/hosts); partitioning itself is not what is tested here."""
    from rudder.runtime import rank as rank_mod

    def resolve(host):
        if host not in addresses:
            raise socket.gaierror(-2, "Name or service not known")
        return addresses[host]

    monkeypatch.setattr(rank_mod.socket, "gethostbyname", resolve)
    monkeypatch.setattr(rank_mod, "ensure_partitions", lambda cfg, **_: str(tmp_path / "parts" / "graph.json"))
    monkeypatch.setattr(rank_mod, "read_meta", lambda folder: {"feat_dim": 4, "num_classes": 2})
    cfg = TrainConfig(graph="synth-tiny", parts=2, trainers_per_part=2, cache_dir=str(tmp_path / "cache"))
    roles, one_host = assign_roles(["nodeB", "nodeA", "nodeB", "nodeA", "nodeB", "nodeA"], 2, 2)
    return rank_mod.prepare_job(cfg, roles, one_host, tag="rdtest1"), roles, one_host


def test_prepare_job_on_several_hosts_writes_their_addresses(tmp_path, monkeypatch):
    """Each host is one machine: ip_config has one line per machine, its server's host address and the common
    port (30050 unless --port: every server is alone on its host), in machine order (the host of rank 0 is machine
    0); the torch.distributed master is trainer 0's host, one port below."""
    job, roles, one_host = _several_host_job(tmp_path, monkeypatch, {"nodeA": "10.0.0.7", "nodeB": "10.0.0.5"})
    assert not one_host and not job.one_host
    assert [r.host for r in roles if r.kind == "server"] == ["nodeB", "nodeA"]
    with open(job.ip_config) as f:
        assert f.read() == "10.0.0.5 30050\n10.0.0.7 30050\n"
    trainer0 = next(r for r in roles if r.trainer_rank == 0)
    assert trainer0.host == "nodeB" and job.master == "10.0.0.5:30049"
    assert job.port == 30050 and job.job_dir == str(tmp_path / "cache" / "jobs" / "rdtest1")


def test_prepare_job_names_a_host_that_does_not_resolve(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"host 'nodeA' of the server of machine 1 does not resolve"):
        _several_host_job(tmp_path, monkeypatch, {"nodeB": "10.0.0.5"})
