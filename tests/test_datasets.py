"""Tests for rudder.runtime.datasets: the graph contract, synthetic presets, the OGB raw-layout loader, load_graph."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from rudder.runtime import datasets
from rudder.runtime.datasets import (
    PRESETS,
    DatasetError,
    SynthSpec,
    generate_synthetic,
    load_graph,
    load_ogb,
    num_classes,
)
from rudder.runtime.dgl_compat import import_dgl

dgl = import_dgl()

MASKS = ("train_mask", "val_mask", "test_mask")


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def edge_set(g) -> set[tuple[int, int]]:
    src, dst = g.edges()
    return set(zip(src.tolist(), dst.tolist()))


def assert_contract(g) -> None:
    """The contract every graph from rudder.runtime.datasets satisfies."""
    n = g.num_nodes()
    assert g.ntypes == ["_N"] and g.etypes == ["_E"]
    feat, label = g.ndata["feat"], g.ndata["label"]
    assert feat.dtype == torch.float32 and feat.dim() == 2 and feat.shape[0] == n
    assert label.dtype == torch.int64 and label.shape == (n,)
    assert int(label.min()) >= -1
    for m in MASKS:
        assert g.ndata[m].dtype == torch.bool and g.ndata[m].shape == (n,)
    total = sum(g.ndata[m].long() for m in MASKS)
    assert int(total.max()) <= 1, "masks overlap"
    assert not bool(((total > 0) & (label < 0)).any()), "unlabelled node in a mask"
    src, dst = (t.numpy().astype(np.int64) for t in g.edges())
    assert not np.any(src == dst), "self-loop"
    fwd = src * n + dst
    assert np.unique(fwd).shape[0] == fwd.shape[0], "duplicate edge"
    assert np.array_equal(np.sort(fwd), np.sort(dst * n + src)), "edges not symmetric"


def assert_same_graph(a, b) -> None:
    assert a.num_nodes() == b.num_nodes()
    assert torch.equal(a.edges()[0], b.edges()[0]) and torch.equal(a.edges()[1], b.edges()[1])
    assert set(a.ndata.keys()) == set(b.ndata.keys())
    for k in a.ndata.keys():
        assert a.ndata[k].dtype == b.ndata[k].dtype, k
        assert torch.equal(a.ndata[k], b.ndata[k]), k


@pytest.fixture(scope="module")
def tiny():
    return generate_synthetic(PRESETS["synth-tiny"], seed=0)


# ------------------------------------------------------------------------------------------------------------------
# synthetic presets
# ------------------------------------------------------------------------------------------------------------------


def test_presets_sizes():
    assert set(PRESETS) == {"synth-tiny", "synth-small", "synth-hetero", "synth-large"}
    for name, spec in PRESETS.items():
        assert isinstance(spec, SynthSpec), name
    assert PRESETS["synth-tiny"].num_nodes <= 10_000
    assert PRESETS["synth-small"].num_nodes * PRESETS["synth-small"].avg_degree == pytest.approx(2e6, rel=0.1)
    assert PRESETS["synth-large"].num_nodes * PRESETS["synth-large"].avg_degree == pytest.approx(2e7, rel=0.1)
    assert PRESETS["synth-hetero"].num_nodes * PRESETS["synth-hetero"].avg_degree == pytest.approx(3e6, rel=0.1)


def test_hetero_preset_is_another_family_than_small():
    """synth-hetero (held-out evaluation) differs from synth-small in structure, not only in size: at the same
    node count (20k, to stay fast) its edges join same-label nodes far less often and its degree tail is heavier."""

    def shape(name):
        g = generate_synthetic(dataclasses.replace(PRESETS[name], num_nodes=20_000), seed=0)
        src, dst = g.edges()
        label = g.ndata["label"]
        deg = np.sort(g.in_degrees().numpy())[::-1]
        return (label[src] == label[dst]).float().mean().item(), deg[: deg.size // 100].sum() / deg.sum()

    small_same, small_top = shape("synth-small")
    hetero_same, hetero_top = shape("synth-hetero")
    assert small_same >= 0.65 and hetero_same <= 0.35  # seed 0: 0.72 vs 0.27 (chance: 1/16)
    assert hetero_top >= 1.3 * small_top  # top 1% of nodes' share of edge endpoints; seed 0: 0.185 vs 0.119


def test_tiny_contract(tiny):
    spec = PRESETS["synth-tiny"]
    assert_contract(tiny)
    assert tiny.num_nodes() == spec.num_nodes
    assert tiny.num_edges() == int(round(spec.num_nodes * spec.avg_degree / 2)) * 2
    assert tiny.ndata["feat"].shape == (spec.num_nodes, spec.feat_dim)
    assert num_classes(tiny) == spec.num_classes
    assert int(tiny.ndata["label"].min()) == 0
    n_train = int(tiny.ndata["train_mask"].sum())
    assert n_train == round(spec.train_frac * spec.num_nodes)
    assert n_train // 1000 >= 2  # a handful of minibatches of 1000 per epoch
    assert int(tiny.ndata["val_mask"].sum()) == round(spec.val_frac * spec.num_nodes)
    assert int(tiny.ndata["test_mask"].sum()) == round(spec.test_frac * spec.num_nodes)


def test_tiny_deterministic_per_seed(tiny):
    again = generate_synthetic(PRESETS["synth-tiny"], seed=0)
    assert_same_graph(tiny, again)
    other = generate_synthetic(PRESETS["synth-tiny"], seed=1)
    assert_contract(other)
    assert edge_set(other) != edge_set(tiny)
    assert not torch.equal(other.ndata["feat"], tiny.ndata["feat"])
    assert not torch.equal(other.ndata["label"], tiny.ndata["label"])
    assert not torch.equal(other.ndata["train_mask"], tiny.ndata["train_mask"])


def test_tiny_heavy_tailed_degrees(tiny):
    deg = tiny.in_degrees().numpy()
    assert deg.mean() == pytest.approx(PRESETS["synth-tiny"].avg_degree)
    assert deg.max() >= 10 * deg.mean()  # seed 0: max 174, mean 10
    top = np.sort(deg)[::-1][: tiny.num_nodes() // 100]
    assert top.sum() / deg.sum() >= 0.08  # top 1% of nodes hold >= 8% of edge endpoints (seed 0: 11.4%)
    # Chung-Lu structural cutoff: no node far above sqrt(number of edges)
    assert deg.max() <= 2 * np.sqrt(tiny.num_edges())


def test_tiny_homophily(tiny):
    src, dst = tiny.edges()
    label = tiny.ndata["label"]
    same = (label[src] == label[dst]).float().mean().item()
    chance = 1.0 / num_classes(tiny)
    assert same >= 0.65  # seed 0: 0.77; chance is 0.25
    assert same >= 2.5 * chance


def _train(model, g, epochs: int = 100) -> float:
    x, y = g.ndata["feat"], g.ndata["label"]
    tr, va = g.ndata["train_mask"], g.ndata["val_mask"]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        loss = F.cross_entropy(model(g, x)[tr], y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(g, x)[va].argmax(1) == y[va]).float().mean().item()


class _Sage(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.c1 = dgl.nn.SAGEConv(d_in, hidden, "mean")
        self.c2 = dgl.nn.SAGEConv(hidden, d_out, "mean")

    def forward(self, g, x):
        return self.c2(g, F.relu(self.c1(g, x)))


class _MLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)

    def forward(self, g, x):
        return self.l2(F.relu(self.l1(x)))


def test_tiny_learnable_and_graph_matters(tiny):
    d, c = tiny.ndata["feat"].shape[1], num_classes(tiny)
    chance = 1.0 / c
    torch.manual_seed(0)
    sage = _train(_Sage(d, 32, c), tiny)
    torch.manual_seed(0)
    mlp = _train(_MLP(d, 32, c), tiny)
    # seed 0: sage 0.93, mlp 0.67, chance 0.25
    assert mlp >= 1.5 * chance  # features alone carry signal ...
    assert mlp <= 0.85  # ... but are clearly imperfect
    assert sage >= 2 * chance
    assert sage >= mlp + 0.1  # neighbours help: the graph matters


def test_custom_spec_single_community():
    spec = SynthSpec(
        num_nodes=300,
        avg_degree=6,
        num_communities=1,
        num_classes=3,
        feat_dim=4,
        p_in=1.0,
        train_frac=0.5,
        val_frac=0.1,
        test_frac=0.1,
    )
    g = generate_synthetic(spec, seed=3)
    assert_contract(g)
    assert g.num_edges() == 900 * 2
    assert int(sum(g.ndata[m].sum() for m in MASKS)) == 210  # the rest is in no mask


def test_spec_validation():
    with pytest.raises(ValueError, match="pareto_shape"):
        SynthSpec(num_nodes=100, avg_degree=4, num_communities=2, num_classes=2, feat_dim=2, pareto_shape=1.0)
    with pytest.raises(ValueError, match="sum to <= 1"):
        SynthSpec(num_nodes=100, avg_degree=4, num_communities=2, num_classes=2, feat_dim=2, train_frac=0.9)


# ------------------------------------------------------------------------------------------------------------------
# OGB raw layout
# ------------------------------------------------------------------------------------------------------------------

N_OGB = 6
# Directed input edges with a duplicate (0,1)/(1,0), a self-loop (2,2) and a repeated (3,4).
OGB_EDGES = np.array([[0, 1], [1, 0], [1, 2], [2, 2], [3, 4], [3, 4], [5, 0], [2, 4]], dtype=np.int64)
OGB_UNDIRECTED = {(0, 1), (1, 2), (3, 4), (0, 5), (2, 4)}
OGB_FEAT = np.arange(N_OGB * 3, dtype=np.float64).reshape(N_OGB, 3) / 4.0
OGB_LABEL = [2.0, 0.0, 1.0, np.nan, 2.0, 1.0]  # node 3 unlabelled
OGB_SPLIT = {"train": [0, 1, 5], "valid": [2], "test": [4]}


def _write_csv(path, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(rows).to_csv(path, header=False, index=False, compression="gzip")


def _write_split(ds, name: str = "sales_ranking", split=OGB_SPLIT) -> None:
    for part, idx in split.items():
        _write_csv(os.path.join(ds, "split", name, f"{part}.csv.gz"), np.asarray(idx, dtype=np.int64))


def make_ogb_csv(root, feat=OGB_FEAT, split=OGB_SPLIT) -> str:
    ds = os.path.join(root, "ogbn_fixture")
    raw = os.path.join(ds, "raw")
    _write_csv(os.path.join(raw, "edge.csv.gz"), OGB_EDGES)
    _write_csv(os.path.join(raw, "node-feat.csv.gz"), feat)
    _write_csv(os.path.join(raw, "node-label.csv.gz"), np.array(OGB_LABEL).reshape(-1, 1))
    _write_csv(os.path.join(raw, "num-node-list.csv.gz"), np.array([[N_OGB]]))
    _write_csv(os.path.join(raw, "num-edge-list.csv.gz"), np.array([[len(OGB_EDGES)]]))
    _write_split(ds, split=split)
    return ds


def make_ogb_npz(root) -> str:
    ds = os.path.join(root, "ogbn_papers100M")
    raw = os.path.join(ds, "raw")
    os.makedirs(raw)
    np.savez(
        os.path.join(raw, "data.npz"),
        edge_index=OGB_EDGES.T.copy(),
        node_feat=OGB_FEAT.astype(np.float16),
        num_nodes_list=np.array([N_OGB]),
        num_edges_list=np.array([len(OGB_EDGES)]),
    )
    np.savez(os.path.join(raw, "node-label.npz"), node_label=np.array(OGB_LABEL).reshape(-1, 1))
    _write_split(ds, name="time")
    return ds


def check_ogb_graph(g) -> None:
    assert_contract(g)
    assert g.num_nodes() == N_OGB
    expected = OGB_UNDIRECTED | {(v, u) for u, v in OGB_UNDIRECTED}
    assert edge_set(g) == expected and g.num_edges() == len(expected)
    assert torch.equal(g.ndata["feat"], torch.tensor(OGB_FEAT, dtype=torch.float32))
    assert g.ndata["label"].tolist() == [2, 0, 1, -1, 2, 1]
    assert num_classes(g) == 3
    for mask, part in zip(MASKS, ("train", "valid", "test")):
        assert torch.nonzero(g.ndata[mask]).reshape(-1).tolist() == OGB_SPLIT[part]


def test_ogb_csv_layout(tmp_path):
    ds = make_ogb_csv(tmp_path)
    check_ogb_graph(load_ogb(ds))
    check_ogb_graph(load_ogb(str(tmp_path)))  # the folder holding one dataset folder
    check_ogb_graph(load_graph(ds))


def test_ogb_npz_layout_with_nan_labels(tmp_path):
    make_ogb_npz(tmp_path)
    g = load_graph(str(tmp_path))
    check_ogb_graph(g)


# What OGB itself leaves on disk (ogb 1.3.6: NodePropPredDataset downloads <download_name>.zip into its `root`,
# extracts it and moves the folder to root/ogbn_<name>; the folder holds RELEASE_v1.txt, raw/, split/<split>/ and
# mapping/ with README.md; processed/ appears once OGB's own loader has run). Per dataset, from OGB's master.csv:
# the split folder's name, extra node files, and whether raw/ is CSV or binary (npz).
OGB_REAL = {
    "ogbn-products": dict(
        split="sales_ranking",
        binary=False,
        extra={},
        mapping=("labelidx2productcategory.csv.gz", "nodeidx2asin.csv.gz"),
    ),
    "ogbn-arxiv": dict(
        split="time",
        binary=False,
        extra={"node_year": np.arange(N_OGB) + 2000},
        mapping=("labelidx2arxivcategeory.csv.gz", "nodeidx2paperid.csv.gz"),
    ),
    "ogbn-papers100M": dict(
        split="time", binary=True, extra={"node_year": np.arange(N_OGB) + 2000}, mapping=("nodeidx2paperid.csv.gz",)
    ),
}


def make_ogb_real(root, name: str) -> str:
    """``root`` as OGB's ``NodePropPredDataset(name, root)`` leaves it after a download and a first load."""
    spec = OGB_REAL[name]
    ds = os.path.join(root, name.replace("-", "_"))
    raw = os.path.join(ds, "raw")
    os.makedirs(raw)
    with open(os.path.join(ds, "RELEASE_v1.txt"), "w") as f:
        f.write(f"{name} v1\n")
    os.makedirs(os.path.join(ds, "mapping"))
    with open(os.path.join(ds, "mapping", "README.md"), "w") as f:
        f.write("mapping of node and label indices\n")
    for mapping in spec["mapping"]:
        pd.DataFrame({"idx": range(N_OGB), "id": [f"x{i}" for i in range(N_OGB)]}).to_csv(
            os.path.join(ds, "mapping", mapping), index=False, compression="gzip"
        )  # OGB's mappings have headers
    if spec["binary"]:  # ogb.io.save_dataset: np.savez_compressed, int64 ids and counts, float32 node arrays
        np.savez_compressed(
            os.path.join(raw, "data.npz"),
            edge_index=OGB_EDGES.T.astype(np.int64),
            num_nodes_list=np.array([N_OGB], np.int64),
            num_edges_list=np.array([len(OGB_EDGES)], np.int64),
            node_feat=OGB_FEAT.astype(np.float32),
            **{k: v.reshape(-1, 1).astype(np.int64) for k, v in spec["extra"].items()},
        )
        np.savez_compressed(
            os.path.join(raw, "node-label.npz"), node_label=np.array(OGB_LABEL, dtype=np.float32).reshape(-1, 1)
        )
    else:  # headerless gzip CSVs, read by ogb.io.read_csv_graph_raw with pd.read_csv(header=None)
        _write_csv(os.path.join(raw, "edge.csv.gz"), OGB_EDGES)
        _write_csv(os.path.join(raw, "node-feat.csv.gz"), OGB_FEAT.astype(np.float32))
        _write_csv(
            os.path.join(raw, "node-label.csv.gz"),
            pd.array([None if np.isnan(x) else int(x) for x in OGB_LABEL], dtype="Int64"),
        )
        _write_csv(os.path.join(raw, "num-node-list.csv.gz"), np.array([[N_OGB]]))
        _write_csv(os.path.join(raw, "num-edge-list.csv.gz"), np.array([[len(OGB_EDGES)]]))
        for key, values in spec["extra"].items():
            _write_csv(os.path.join(raw, f"{key}.csv.gz"), values.reshape(-1, 1))
    _write_split(ds, name=spec["split"])
    os.makedirs(os.path.join(ds, "processed"))
    with open(os.path.join(ds, "processed", "data_processed"), "wb") as f:  # OGB's own cache: ignored
        f.write(b"not read by rudder")
    return ds


@pytest.mark.parametrize("name", sorted(OGB_REAL))
def test_ogb_real_layout(tmp_path, name):
    """The loader on OGB's real on-disk layout: given OGB's `root` (the folder passed to its loaders), the dataset
    folder inside it, or the folder a download zip extracts to."""
    ds = make_ogb_real(tmp_path / "dataset", name)
    check_ogb_graph(load_graph(str(tmp_path / "dataset")))
    check_ogb_graph(load_graph(ds))
    unzipped = tmp_path / "unzipped" / "products"
    os.makedirs(unzipped.parent)
    os.rename(ds, unzipped)  # as extracted from products.zip, before OGB moves it to root/ogbn_products
    check_ogb_graph(load_ogb(str(unzipped)))


def test_ogb_missing_feature_file(tmp_path):
    ds = make_ogb_csv(tmp_path)
    os.remove(os.path.join(ds, "raw", "node-feat.csv.gz"))
    with pytest.raises(DatasetError, match="node-feat.csv.gz") as exc:
        load_ogb(ds)
    assert "missing" in str(exc.value) and "edge.csv.gz" in str(exc.value)  # names the layout too


def test_ogb_feature_rows_mismatch(tmp_path):
    ds = make_ogb_csv(tmp_path, feat=OGB_FEAT[:5])
    with pytest.raises(DatasetError, match=r"node-feat\.csv\.gz.*expected 6 .*got 5"):
        load_ogb(ds)


def test_ogb_split_out_of_range(tmp_path):
    ds = make_ogb_csv(tmp_path, split={"train": [0, 1], "valid": [2], "test": [9]})
    with pytest.raises(DatasetError, match=r"test\.csv\.gz.*\[0, 6\).*got 9"):
        load_ogb(ds)


def test_ogb_split_overlap_and_unlabelled(tmp_path):
    ds = make_ogb_csv(tmp_path / "a", split={"train": [0, 1], "valid": [1], "test": [4]})
    with pytest.raises(DatasetError, match=r"valid\.csv\.gz.*disjoint"):
        load_ogb(ds)
    ds = make_ogb_csv(tmp_path / "b", split={"train": [0, 3], "valid": [2], "test": [4]})
    with pytest.raises(DatasetError, match=r"train\.csv\.gz.*node 3 has no label"):
        load_ogb(ds)


def test_ogb_not_a_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="not an OGB dataset folder"):
        load_ogb(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# load_graph
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(
        DatasetError,
        match=r"unknown graph 'synth-huge': expected one of synth-tiny, synth-small, "
        r"synth-hetero, synth-large, an OGB dataset folder, or a \.dgl file",
    ):
        load_graph("synth-huge")


def test_load_graph_preset_cache(tmp_path, monkeypatch, tiny):
    g1 = load_graph("synth-tiny", seed=0, cache_dir=str(tmp_path))
    path = tmp_path / "synth-tiny-seed0.dgl"
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["synth-tiny-seed0.dgl"]  # no temp file left behind
    assert_same_graph(g1, tiny)

    def boom(*args, **kwargs):
        raise AssertionError("regenerated instead of using the cache")

    monkeypatch.setattr(datasets, "generate_synthetic", boom)
    g2 = load_graph("synth-tiny", seed=0, cache_dir=str(tmp_path))
    assert_contract(g2)
    assert_same_graph(g1, g2)


def test_load_graph_stale_cache_is_replaced(tmp_path, tiny):
    g = dgl.graph(([0], [1]), num_nodes=2)  # a file without the spec fingerprint
    dgl.save_graphs(str(tmp_path / "synth-tiny-seed0.dgl"), [g])
    assert_same_graph(load_graph("synth-tiny", seed=0, cache_dir=str(tmp_path)), tiny)


def test_load_graph_dgl_file(tmp_path):
    g = dgl.graph(([0, 1, 1, 2], [1, 2, 2, 2]), num_nodes=4)  # directed, duplicate, self-loop
    g.ndata["feat"] = torch.randn(4, 2, dtype=torch.float64)
    g.ndata["label"] = torch.tensor([0, 1, 1, -1], dtype=torch.int32)
    g.ndata["train_mask"] = torch.tensor([True, True, False, False])
    g.ndata["val_mask"] = torch.tensor([False, False, True, False])
    g.ndata["test_mask"] = torch.tensor([False, False, False, False])
    path = str(tmp_path / "g.bin")
    dgl.save_graphs(path, [g])
    out = load_graph(path)
    assert_contract(out)
    assert edge_set(out) == {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert out.ndata["train_mask"].tolist() == [True, True, False, False]
    assert torch.equal(out.ndata["feat"], g.ndata["feat"].float())

    del g.ndata["label"]
    dgl.save_graphs(path, [g])
    with pytest.raises(DatasetError, match=r"g\.bin: missing ndata\['label'\]"):
        load_graph(path)
