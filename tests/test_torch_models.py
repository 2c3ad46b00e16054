"""The plain-torch GraphSAGE and GAT layers (``--model-impl torch``) against DGL's SAGEConv / GATConv, and the other
parts of training on a GPU that a CPU can check.

On the same sampled blocks and the same weights, outputs and gradients (inputs' and every parameter's) agree within
float32 rounding, for 1 to 3 layers, with destinations that have no in-edge; the same seed builds the same initial
weights in both; a short distributed training run on synth-tiny reaches the DGL path's accuracy. The device
buffer's mirror serves the rows the host buffer would; traces carry the host-to-device columns and replay adds the
copy time they record; ``--device cuda`` without a GPU is refused in one line. ``bench/gpu_check.sh`` runs the
GPU side (``RUDDER_TORCH_MODELS_CUDA=1`` adds a CUDA test here).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rudder.runtime.dgl_compat import import_dgl
from rudder.runtime.models import BlockIndex, block_indices, build_model, segment_softmax

dgl = import_dgl()

# float32 rounding: the two sum over edges in different orders, and GAT's gradients cancel over many edges; the
# largest difference measured on these blocks was 6e-5 of the tensor's scale (below), SAGE's was 0
SCALED_TOL = 2e-4


def _assert_close(got: torch.Tensor, expect: torch.Tensor, what: str, floor: float = 1e-6) -> None:
    """Every entry within ``SCALED_TOL`` times the largest magnitude in ``expect`` (at least ``floor``)."""
    limit = SCALED_TOL * max(float(expect.detach().abs().max()), floor)
    diff = float((got - expect).detach().abs().max())
    assert got.shape == expect.shape and diff <= limit, f"{what}: max |difference| {diff:.3g} > {limit:.3g}"


def _blocks(num_layers: int, seed: int = 0, fanout: int = 4):
    """Blocks of ``num_layers`` sampled hops (input layer first) around 24 seeds of a random 300-node graph with
    isolated nodes among the seeds (destinations with no in-edge), built with ``dgl.to_block``."""
    rng = np.random.default_rng(seed)
    n = 300
    src = rng.integers(0, n, 1500)
    dst = rng.integers(20, n, 1500)  # nodes 0..19 receive no edge
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)
    seeds = torch.from_numpy(np.concatenate([[0, 1, 2], rng.choice(np.arange(20, n), 21, replace=False)]))
    dgl.seed(seed)
    blocks, frontier_nodes = [], seeds
    for _ in range(num_layers):
        frontier = dgl.sampling.sample_neighbors(g, frontier_nodes, fanout)
        block = dgl.to_block(frontier, frontier_nodes)
        blocks.insert(0, block)
        frontier_nodes = block.srcdata[dgl.NID]
    return blocks, frontier_nodes.numel()


def _pair(kind: str, num_layers: int, in_feats: int = 16, hidden: int = 32, classes: int = 5):
    torch.manual_seed(1)
    ref = build_model(kind, in_feats, hidden, classes, num_layers, impl="dgl")
    mine = build_model(kind, in_feats, hidden, classes, num_layers, impl="torch")
    with torch.no_grad():  # weights the seed did not pick: any weights must give the same result
        for p in ref.parameters():
            p.normal_(0, 0.5)
    mine.load_state_dict(ref.state_dict())
    ref.eval(), mine.eval()  # no dropout: the two draw it in the same order, but the check is of the layers
    return ref, mine


@pytest.mark.parametrize("kind", ["sage", "gat"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_outputs_and_gradients_match_dgl(kind, num_layers):
    blocks, num_inputs = _blocks(num_layers, seed=num_layers)
    assert any((b.in_degrees() == 0).any() for b in blocks)  # the zero in-degree case is exercised
    ref, mine = _pair(kind, num_layers)
    x0 = torch.randn(num_inputs, 16, generator=torch.Generator().manual_seed(7))
    x_ref, x_mine = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out_ref = ref(blocks, x_ref)
    out_mine = mine(block_indices(blocks), x_mine)
    assert out_mine.shape == out_ref.shape == (blocks[-1].num_dst_nodes(), 5)
    _assert_close(out_mine, out_ref, "output")
    weights = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(8))
    (out_ref * weights).sum().backward()
    (out_mine * weights).sum().backward()
    _assert_close(x_mine.grad, x_ref.grad, "input gradient")
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}
    # a tensor whose gradient is nearly zero holds rounding noise (DGL's threaded kernels sum in a varying order):
    # its entries are compared at the scale of a hundredth of the model's largest gradient
    floor = 1e-2 * max(float(g.abs().max()) for g in grads_ref.values())
    for name, p in mine.named_parameters():
        assert p.grad is not None, name
        _assert_close(p.grad, grads_ref[name], f"gradient of {name}", floor=floor)
    with torch.no_grad():  # the check can fail: a small change to one weight shows beyond the tolerance
        next(mine.parameters()).mul_(1.01)
    with pytest.raises(AssertionError):
        _assert_close(mine(block_indices(blocks), x0), out_ref.detach(), "output")


@pytest.mark.parametrize("kind", ["sage", "gat"])
def test_same_seed_same_initial_weights(kind):
    """Same parameter names and the same random draws: a run's initial weights do not depend on the path."""
    torch.manual_seed(3)
    ref = build_model(kind, 12, 16, 4, 2, impl="dgl").state_dict()
    torch.manual_seed(3)
    mine = build_model(kind, 12, 16, 4, 2, impl="torch").state_dict()
    assert list(mine) == list(ref)
    for name in ref:
        assert torch.equal(mine[name], ref[name]), name


def test_segment_softmax_is_a_softmax_per_segment():
    scores = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 5.0], [-1.0, 1000.0]])
    segment = torch.tensor([0, 0, 2, 2])
    out = segment_softmax(scores, segment, 3)
    expect = torch.cat([torch.softmax(scores[:2], 0), torch.softmax(scores[2:], 0)])
    torch.testing.assert_close(out, expect)
    assert torch.isfinite(out).all()  # a large logit does not overflow: each segment's maximum is subtracted


def test_block_index_takes_dgl_edges():
    blocks, _ = _blocks(2)
    idx = BlockIndex.from_dgl(blocks[0])
    src, dst = blocks[0].edges()
    assert torch.equal(idx.src, src.long()) and torch.equal(idx.dst, dst.long())
    assert (idx.num_src, idx.num_dst) == (blocks[0].num_src_nodes(), blocks[0].num_dst_nodes())
    assert idx.to("cpu").src.device.type == "cpu"


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="expected dgl or torch"):
        build_model("sage", 4, 8, 2, 2, impl="jax")


@pytest.mark.dist
def test_training_accuracy_matches_dgl_path(record_live):
    """synth-tiny, 2 partitions, 2 epochs, the same seed and options: the torch path's accuracy is the DGL path's
    within noise (the same initial weights, sampling and dropout draws; only float summation order differs), and
    the torch path's run records its implementation and device (CPU: no host-to-device columns in its trace)."""
    from rudder.traces import Trace

    runs = {
        "dgl": record_live("periodic", "--check-env"),  # the run other modules record: its default is the DGL path
        "torch": record_live("periodic", "--check-env", "--model-impl", "torch"),
    }
    acc = {}
    for impl, run in runs.items():
        s = run["summary"]
        assert s["config"]["model_impl"] == ("auto" if impl == "dgl" else impl)
        assert all(r["device"] == "cpu" and r["model_impl"] == impl for r in s["ranks"])
        acc[impl] = (s["val_acc"], s["test_acc"])
    print("accuracy (val, test): dgl path", acc["dgl"], "torch path", acc["torch"])
    for split in (0, 1):
        assert acc["dgl"][split] > 2.0 / runs["dgl"]["summary"]["graph"]["num_classes"]
        assert abs(acc["torch"][split] - acc["dgl"][split]) <= 0.03, acc
    rank = Trace(runs["torch"]["trace"]).rank(0)
    assert rank.meta["device"] == "cpu" and rank.meta["model_impl"] == "torch"
    assert rank.device_table() is None


if os.environ.get("RUDDER_TORCH_MODELS_CUDA"):  # the device check runs these on a GPU too

    @pytest.mark.parametrize("kind", ["sage", "gat"])
    def test_cuda_matches_cpu(kind):
        blocks, num_inputs = _blocks(2)
        ref, mine = _pair(kind, 2)
        x = torch.randn(num_inputs, 16)
        dev = torch.device("cuda")
        out = mine.to(dev)(block_indices(blocks, dev), x.to(dev)).cpu()
        _assert_close(out, ref(blocks, x), "output on cuda")


@pytest.mark.parametrize("prefetch", ["inline", "background"])
@pytest.mark.parametrize("admit_on_miss", [False, True])
def test_device_rows_serve_what_the_host_buffer_would(prefetch, admit_on_miss):
    """``--buffer-on-device``'s mirror (run here on the CPU: the code is the same on a GPU): through a fill,
    minibatches with prefetch sets (inline, or arriving in chunks) and admissions on miss, every input row it
    assembles is the node's row, and every occupied slot holds its node's row."""
    from rudder.env.buffer import EMPTY, PrefetchBuffer

    from rudder.runtime.trainer import DeviceRows

    rng = np.random.default_rng(5)
    num_nodes, capacity, width = 500, 60, 3
    feat = torch.arange(num_nodes, dtype=torch.float32).unsqueeze(1) * torch.tensor([1.0, -1.0, 0.5])
    buffer = PrefetchBuffer(capacity, num_nodes, period=4, admit_on_miss=admit_on_miss, prefetch=prefetch)
    mirror = DeviceRows(capacity, width, torch.float32, torch.device("cpu"))
    filled = buffer.fill(rng.choice(400, 40, replace=False))
    mirror.sync(buffer, filled, feat[filled])
    hits = 0
    for step in range(40):
        if step % 4 == 0:
            buffer.apply(rng.choice(400, 30, replace=False))
        if prefetch == "background":
            while (chunk := buffer.take(max_rows=16)).size:
                buffer.arrive(chunk)
                mirror.sync(buffer, chunk, feat[chunk])
        remote_ids = rng.choice(400, 25, replace=False)  # nodes 0..399 are other partitions'
        local_ids = rng.choice(np.arange(400, num_nodes), 10, replace=False)
        inputs = np.concatenate([local_ids, remote_ids])
        rng.shuffle(inputs)
        remote = inputs < 400
        remote_ids = inputs[remote]
        to_pull = buffer.begin(remote_ids)
        hit_slots = buffer.slot_of[remote_ids].astype(np.int64)
        _, counts = buffer.finish(None)
        hits += counts.hits
        pulled = feat[np.concatenate([inputs[~remote], to_pull])]
        x = mirror.inputs(buffer, remote, hit_slots, to_pull, pulled)
        assert torch.equal(x, feat[inputs]), step
        occupied = buffer.slot_ids != EMPTY
        assert torch.equal(mirror.rows[occupied], feat[buffer.slot_ids[occupied]]), step
    assert hits > 50  # the rows came from the mirror, not only from pulls


def test_trace_device_columns_round_trip_and_go_together(tmp_path):
    """A GPU run's trace carries h2d_s/h2d_rows per minibatch (both, for every minibatch); a CPU run's none."""
    from rudder.traces import Trace, TraceWriter

    def row(i, **extra):
        return dict(
            minibatch=i, epoch=0, remote_ids=np.array([3, 9]), local_rows=5, sample_s=0.1, fetch_s=0.2,
            compute_s=0.3, fetch_rows=7, hits=0, remote_fetched=2, prefetched=0, **extra,
        )  # fmt: skip

    with TraceWriter(tmp_path / "gpu", 0, 1, {}, {"device": "cuda:0"}, {}) as w:
        for i in range(3):
            w.add_minibatch(**row(i, h2d_s=0.01 * i, h2d_rows=7 + i))
    table = Trace(tmp_path / "gpu").rank(0).device_table()
    assert table["h2d_rows"].tolist() == [7, 8, 9]
    np.testing.assert_allclose(table["h2d_s"], [0.0, 0.01, 0.02], rtol=1e-6)
    with TraceWriter(tmp_path / "cpu", 0, 1, {}, {}, {}) as w:
        w.add_minibatch(**row(0))
    assert Trace(tmp_path / "cpu").rank(0).device_table() is None
    with TraceWriter(tmp_path / "bad", 0, 1, {}, {}, {}) as w:
        with pytest.raises(ValueError, match="h2d_s and h2d_rows go together"):
            w.add_minibatch(**row(0, h2d_s=0.1))
        w.add_minibatch(**row(0, h2d_s=0.1, h2d_rows=3))
        with pytest.raises(ValueError, match="for every minibatch of a rank or for none"):
            w.add_minibatch(**row(1))


def test_replay_adds_the_copy_time_a_gpu_trace_recorded(shipped_trace, tmp_path):
    """The shipped (CPU) trace, given host-to-device copies of ``c0 + c_row * rows`` seconds inside its fetch
    times: replay fits them back, adds them to each minibatch's modelled fetch time, and sees the same counts."""
    import shutil

    from rudder.env.replay_env import ReplayEnv

    c0, c_row = 2e-4, 3e-7
    gpu = tmp_path / "gpu"
    shutil.copytree(shipped_trace, gpu)
    header = json.loads((gpu / "trace.json").read_text())
    header["meta"]["config"]["device"] = "cuda"
    (gpu / "trace.json").write_text(json.dumps(header))
    for path in sorted((gpu / "rank0").glob("chunk-*.npz")):
        arrays = dict(np.load(path))
        rows = arrays["local_rows"] + arrays["remote_count"]  # the buffer on the host: every input row copied
        h2d = (c0 + c_row * rows).astype(np.float32)
        arrays.update(h2d_s=h2d, h2d_rows=rows.astype(np.int32), fetch_s=arrays["fetch_s"] + h2d)
        np.savez_compressed(path, **arrays)

    def play(trace):
        env = ReplayEnv(str(trace), rank=0)
        env.reset(seed=0)
        fetch_s, done = 0.0, False
        while not done:
            _, _, done, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.int8))
            fetch_s += info["window"]["fetch_s"]
        return env, fetch_s, env.episode.buffer.counters.as_dict()

    cpu_env, cpu_fetch_s, cpu_counts = play(shipped_trace)
    gpu_env, gpu_fetch_s, gpu_counts = play(gpu)
    assert cpu_env.copy_model is None
    assert gpu_counts == cpu_counts
    assert gpu_env.copy_model.c_row == pytest.approx(c_row, rel=1e-3)
    assert gpu_env.copy_model.c0 == pytest.approx(c0, rel=1e-2)
    table = gpu_env.rank_trace.table()
    expect = float((c0 + c_row * (table["local_rows"] + table["remote_count"])).sum())
    assert gpu_fetch_s - cpu_fetch_s == pytest.approx(expect, rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: --device cuda is allowed here")
def test_device_cuda_without_a_gpu_is_refused_in_one_line_before_launch(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "train.py"), "gnn", "--graph", "synth-tiny", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, RUDDER_CACHE=str(cache)),
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rudder:")]
    assert lines == [
        f"rudder: error: --device cuda: torch {torch.__version__} sees no GPU on this host "
        "(torch.cuda.is_available() is False): use --device cpu"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cache / "partitions").exists()  # refused before partitioning or starting any rank
