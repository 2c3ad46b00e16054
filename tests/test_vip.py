"""VIP (SALIENT++'s vertex inclusion probability): the model against DGL's own sampler, and the static buffer it
fills against the degree-filled one on the shipped traces."""

import glob
import os

import numpy as np
import pytest
from rudder.env.buffer import initial_ids
from rudder.env.contract import buffer_kwargs
from rudder.env.lookahead import SamplerLookahead
from rudder.env.vip import vertex_inclusion_probability

SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "traces", "samples")


def _tiny_partition(seed=0, n=300, n_inner=150, n_train=100, edges=2400, fanouts=(3, 2)):
    """A random directed graph with skewed in- and out-degrees; nodes ``< n_inner`` are this trainer's partition,
    the first ``n_train`` of them its training seeds. Returns the DGL graph, the lookahead as DistDGL's local
    partition gives it (inner nodes' in-edges, halo included) plus the halo nodes' in-edges, and the masks."""
    from rudder.runtime.dgl_compat import import_dgl

    dgl = import_dgl()
    import torch

    rng = np.random.default_rng(seed)
    weight = rng.pareto(1.5, n) + 1.0  # a few hubs, as in the power-law graphs rudder generates
    src = rng.choice(n, edges, p=weight / weight.sum())
    dst = rng.choice(n, edges, p=weight[::-1] / weight.sum())
    keep = src != dst
    pairs = np.unique(np.stack([src[keep], dst[keep]], 1), axis=0)  # no multi-edges
    src, dst = pairs[:, 0], pairs[:, 1]
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)
    inner = np.arange(n) < n_inner
    train = np.arange(n_train)
    # the local partition: inner nodes, then their halo in-neighbours; in-edges of inner nodes only (CSC)
    halo = np.unique(src[inner[dst] & ~inner[src]])
    gid = np.concatenate([np.arange(n_inner), halo])
    local = np.full(n, -1)
    local[gid] = np.arange(gid.size)
    indptr, indices = [0], []
    for node in gid:
        indices += sorted(local[src[dst == node]].tolist()) if inner[node] else []
        indptr.append(len(indices))
    la = SamplerLookahead.from_partition(
        n, gid, np.arange(gid.size) < n_inner, np.array(indptr), np.array(indices), train, fanouts=list(fanouts)
    )
    in_halo = np.isin(dst, halo)
    with_halo = la.with_halo_in_edges(src[in_halo], dst[in_halo], lambda ids: (~inner[ids]).astype(np.int64))
    return g, la, with_halo, inner, train


def _monte_carlo(g, train, batch_size, fanouts, epochs, seed=0):
    """How often each node is an input row of a minibatch under DGL's NeighborSampler (seeds shuffled per epoch,
    ``batch_size`` at a time, as DistDGL's loader does)."""
    import dgl
    import torch

    dgl.seed(seed)
    rng = np.random.default_rng(seed)
    sampler = dgl.dataloading.NeighborSampler(fanouts)
    counts = np.zeros(g.num_nodes())
    minibatches = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: OpenMP threads only contend (30x slower on a loaded 2-core host)
    try:
        for _ in range(epochs):
            order = rng.permutation(train)
            for start in range(0, order.size, batch_size):
                input_nodes, _, _ = sampler.sample(g, torch.from_numpy(order[start : start + batch_size]))
                counts[input_nodes.numpy()] += 1
                minibatches += 1
    finally:
        torch.set_num_threads(threads)
    return counts / minibatches


def _compare(g, la, inner, train, batch_size=10, epochs=400):
    """VIP and DGL's inclusion frequency (4000 minibatches: noise sd <= 0.008) over the remote nodes."""
    ids, vip = vertex_inclusion_probability(la, batch_size)
    freq = _monte_carlo(g, train, batch_size, la.fanouts, epochs)
    remote = np.flatnonzero(~inner)
    model = np.zeros(g.num_nodes())
    model[ids] = vip
    sampled = remote[freq[remote] > 0]
    # every remote node DGL ever sampled has a VIP, and only remote nodes get one
    assert np.isin(sampled, ids).all() and not inner[ids].any()
    assert 0.02 < np.median(freq[sampled]) < 0.5  # a spread of probabilities: the comparison says something
    return model[remote], freq[remote]


def test_vip_of_one_layer_is_dgls_inclusion_frequency():
    # one hop: the model is exact but for the seeds of a minibatch being drawn without replacement
    g, _, la, inner, train = _tiny_partition(fanouts=[2])
    model, freq = _compare(g, la, inner, train)
    err = model - freq
    assert np.abs(err).max() < 0.04 and np.abs(err).mean() < 0.004, (np.abs(err).max(), np.abs(err).mean())
    # the measured error: BENCHMARKS.md, VIP baseline


def test_vip_of_two_layers_ranks_as_dgls_inclusion_frequency():
    # two hops: the model treats as independent what is not (a seed's two samplings, paths sharing a seed), so it
    # overestimates somewhat; what a cache needs, the order, is kept
    g, _, la, inner, train = _tiny_partition()
    assert la.fanouts == [3, 2]
    model, freq = _compare(g, la, inner, train)
    err = model - freq
    assert np.abs(err).max() < 0.2 and 0 < err.mean() < 0.03, (np.abs(err).max(), err.mean())
    assert np.corrcoef(model, freq)[0, 1] > 0.98
    k = model.size // 4  # a buffer of a quarter of the remote nodes: VIP's choice against the ideal one
    assert freq[np.argsort(-model)[:k]].sum() > 0.99 * np.sort(freq)[::-1][:k].sum()
    # the measured error, correlation and hit share: BENCHMARKS.md, VIP baseline


def test_vip_without_halo_in_edges_misses_the_second_hop_through_halo_nodes():
    _, bare, full, _, _ = _tiny_partition()
    ids_bare, vip_bare = vertex_inclusion_probability(bare, 10)
    ids_full, vip_full = vertex_inclusion_probability(full, 10)
    assert np.isin(ids_bare, ids_full).all() and ids_bare.size < ids_full.size  # remote nodes beyond the halo
    common = np.isin(ids_full, ids_bare)
    assert (vip_bare <= vip_full[common] + 1e-12).all() and (vip_bare < vip_full[common] - 1e-3).any()


def test_vip_by_hand():
    # inner 0, 1 (train seed 0 only), halo 10, 11; in-edges 1->0, 10->0 (indeg 0 = 2), 11->1 (indeg 1 = 1)
    gid = np.array([0, 1, 10, 11])
    la = SamplerLookahead.from_partition(
        20, gid, np.array([1, 1, 0, 0], bool), np.array([0, 2, 3, 3, 3]), np.array([1, 2, 3]), [0], fanouts=[1, 1]
    )
    ids, vip = vertex_inclusion_probability(la, batch_size=1, train_size=2)
    # p0 = 1/2; hop 1 (fanout 1): 0 keeps each of 1, 10 w.p. 1/2 -> p(1) = p(10) = 1/4
    # hop 2: p(10) = 1 - (1 - 1/4)(1 - 1/2 * 1/2) = 7/16; p(11) = 1 - (1 - 1 * 1/4) = 1/4
    assert ids.tolist() == [10, 11] and vip == pytest.approx([7 / 16, 1 / 4])
    fill = initial_ids("vip", np.array([10, 11]), np.array([1, 1]), 1, 0, vip=(ids, vip))
    assert fill.tolist() == [10]
    with pytest.raises(ValueError, match="vip"):
        initial_ids("vip", np.array([10, 11]), np.array([1, 1]), 1, 0)


def test_vip_static_buffer_fetches_fewer_rows_than_degree_on_the_shipped_traces():
    import gymnasium as gym
    import rudder.env  # noqa: F401
    from rudder.baselines.policies import StaticBuffer, VIPStatic

    from rudder.evaluation.play import play

    fetched = {"static": 0, "vip": 0}
    for trace in sorted(glob.glob(os.path.join(SAMPLES, "*"))):
        from rudder.traces import Trace

        t = Trace(trace)
        for rank in t.ranks:
            for agent in (StaticBuffer(), VIPStatic()):
                env = gym.make("rudder/Replay-v0", trace=t, rank=rank, **buffer_kwargs(agent.settings))
                r = play(env, agent)
                assert r["prefetched"] == r["initial_fill"] <= env.unwrapped.capacity  # the fill, nothing after
                if agent.name == "vip":
                    assert env.unwrapped.buffer_init == "vip"
                fetched[agent.name] += r["remote_fetched"]
    # the measured rows: BENCHMARKS.md, VIP baseline; every trace rank is below degree's too
    assert fetched["vip"] < 0.985 * fetched["static"], fetched


def test_vip_init_needs_the_partition_structure(tmp_path):
    import shutil

    from rudder.env.replay_env import ReplayEnv
    from rudder.env.settings import SettingError

    with pytest.raises(
        SettingError,
        match=r"buffer_init \(--buffer-init\) must be one of degree, random, empty, "
        r"vip, recorded, got 'vipp'",
    ):
        ReplayEnv(os.path.join(SAMPLES, "small-metis4-f10x25"), buffer_init="vipp")
    # a trace without the partition structure (as recorded before the lookahead existed): one clear line
    trace = tmp_path / "old"
    shutil.copytree(os.path.join(SAMPLES, "small-metis4-f10x25"), trace)
    for static in trace.glob("rank*/static.npz"):
        arrays = dict(np.load(static))
        np.savez(static, **{k: v for k, v in arrays.items() if not k.startswith("la_")})
    with pytest.raises(
        ValueError,
        match=r"^buffer_init='vip' needs a trace recorded with partition structure; "
        r".*old has none",
    ):
        ReplayEnv(str(trace), buffer_init="vip")
    assert ReplayEnv(str(trace), buffer_init="degree").buffer_init == "degree"


def test_vip_is_a_train_option_and_an_agent_with_its_own_fill():
    import argparse

    from rudder.baselines.policies import VIPStatic

    from rudder.evaluation.registry import make_agent
    from rudder.runtime.config import add_arguments, from_namespace

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_namespace(parser.parse_args(["--agent", "vip", "--buffer-init", "vip"]))
    cfg.validate()
    assert cfg.buffer_init == "vip" and isinstance(make_agent(cfg.agent), VIPStatic)
    # the agent's fill overrides the run's, live (rank.py passes it to the trainer) and in replay alike
    assert buffer_kwargs(VIPStatic.settings, 0.25, True) == dict(
        buffer_fraction=0.25, admit_on_miss=False, ranking="misses", buffer_init="vip"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--buffer-init", "vipp"])


def test_a_live_vip_run_fills_what_replay_computes_and_replays_exactly(record_live):
    import gymnasium as gym
    import rudder.env  # noqa: F401
    from rudder.baselines.policies import VIPStatic
    from rudder.traces import Trace

    from rudder.evaluation.play import play

    live = record_live("vip")
    trace = Trace(live["trace"])
    assert trace.meta["buffer"]["buffer_init"] == "vip"
    for rank in trace.ranks:
        rt = trace.rank(rank)
        static = rt.static
        la = SamplerLookahead.from_static(static, int(rt.meta["num_nodes"]))
        assert la.halo_in is not None  # the live trainer pulled the halo nodes' in-edges: hop 2 is complete
        capacity = int(rt.meta["capacity"])
        fill = initial_ids(
            "vip",
            static["halo_ids"],
            static["halo_degree"],
            capacity,
            0,
            vip=vertex_inclusion_probability(la, trace.meta["config"]["batch_size"]),
        )
        np.testing.assert_array_equal(static["initial_ids"], fill)  # in VIP order, computed the same way
        degree = initial_ids("degree", static["halo_ids"], static["halo_degree"], capacity, 0)
        assert fill.size == capacity and not np.isin(fill, degree).all()  # a fill of its own, not degree's
        env = gym.make("rudder/Replay-v0", trace=trace, rank=rank, **buffer_kwargs(VIPStatic.settings))
        assert env.unwrapped.buffer_init == "vip"  # computed again from the trace, not read from it
        r = play(env, VIPStatic())
        live_rank = live["summary"]["ranks"][rank]
        for key in ("remote_sampled", "hits", "remote_fetched", "prefetched", "initial_fill"):
            assert r[key] == live_rank[key], key
        assert live_rank["prefetched"] == live_rank["initial_fill"] == capacity  # static: the fill, then nothing
