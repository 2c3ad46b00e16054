"""GNN models trained on sampled blocks: GraphSAGE (mean) and GAT, one layer per fanout, in two implementations.

``impl="dgl"`` stacks DGL's ``SAGEConv`` / ``GATConv`` and takes DGL blocks: the CPU default, and on a GPU only
with a DGL built with CUDA (the PyPI wheel is CPU-only). ``impl="torch"`` computes the same layers with torch ops
alone from each block's edge index (:class:`BlockIndex`: the sampled edges as positions into the block's source and
destination nodes, taken from DGL once per block on the CPU), so the same code runs on a CPU and on a GPU while
sampling and feature pulls stay DGL's. The two have the same parameter names, shapes and initialisation (same
random draws in the same order), so one's ``state_dict`` loads into the other and the same seed gives the same
initial weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rudder.runtime.dgl_compat import import_dgl

import_dgl()
from dgl.nn import GATConv, SAGEConv  # noqa: E402

IMPLS = ("dgl", "torch")
GAT_HEADS = 4
NEGATIVE_SLOPE = 0.2  # GAT's LeakyReLU on attention logits (DGL's default)


class BlockIndex(NamedTuple):
    """One sampled block as the torch layers read it: edge ``k`` runs from source node ``src[k]`` to destination
    node ``dst[k]`` (positions in the block's input and output nodes; the first ``num_dst`` inputs are the outputs,
    as in DGL's blocks)."""

    src: torch.Tensor  # int64 [edges]
    dst: torch.Tensor  # int64 [edges]
    num_src: int
    num_dst: int

    @classmethod
    def from_dgl(cls, block) -> BlockIndex:
        src, dst = block.edges()
        return cls(src.long(), dst.long(), int(block.num_src_nodes()), int(block.num_dst_nodes()))

    def to(self, device, non_blocking: bool = False) -> BlockIndex:
        return self._replace(
            src=self.src.to(device, non_blocking=non_blocking), dst=self.dst.to(device, non_blocking=non_blocking)
        )


def dgl_has_cuda() -> bool:
    """Whether this DGL can put a graph on a GPU (a CUDA build, and a GPU torch sees); the PyPI wheel cannot."""
    if not torch.cuda.is_available():
        return False
    import dgl

    try:
        dgl.graph(([0], [0])).to("cuda")
    except Exception:  # noqa: BLE001 - DGL raises DGLError: "Device API cuda is not enabled"
        return False
    return True


def block_indices(blocks, device: torch.device | str = "cpu") -> list[BlockIndex]:
    """Each DGL block's :class:`BlockIndex`, on ``device``."""
    out = [BlockIndex.from_dgl(b) for b in blocks]
    return out if torch.device(device).type == "cpu" else [b.to(device, non_blocking=True) for b in out]


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` ([edges, heads]) over the edges of each segment (``segment[k]``: edge k's destination).

    Each segment's maximum is subtracted first for range; it is held constant (softmax does not change under a
    shift, so its gradient through the maximum is zero anyway)."""
    index = segment.unsqueeze(1).expand_as(scores)
    with torch.no_grad():
        top = torch.full((num_segments, scores.shape[1]), float("-inf"), dtype=scores.dtype, device=scores.device)
        top = top.scatter_reduce(0, index, scores, reduce="amax")
    weights = (scores - top[segment]).exp()
    total = torch.zeros_like(top).index_add_(0, segment, weights)
    return weights / total[segment]


class TorchSAGEConv(nn.Module):
    """GraphSAGE with mean aggregation: ``fc_self(h_dst) + fc_neigh(mean of h over in-edges)``; a destination
    without in-edges gets zero from its neighbours. Applies ``fc_neigh`` before aggregating when that shrinks the
    rows (as DGL does)."""

    def __init__(self, in_feats: int, out_feats: int):
        super().__init__()
        self.in_feats, self.out_feats = in_feats, out_feats
        self.fc_neigh = nn.Linear(in_feats, out_feats, bias=False)
        self.fc_self = nn.Linear(in_feats, out_feats, bias=True)
        gain = nn.init.calculate_gain("relu")
        nn.init.xavier_uniform_(self.fc_self.weight, gain=gain)
        nn.init.xavier_uniform_(self.fc_neigh.weight, gain=gain)

    def forward(self, block: BlockIndex, h: torch.Tensor) -> torch.Tensor:
        project_first = self.in_feats > self.out_feats
        msg = self.fc_neigh(h) if project_first else h
        summed = msg.new_zeros((block.num_dst, msg.shape[1])).index_add_(0, block.dst, msg[block.src])
        degree = torch.bincount(block.dst, minlength=block.num_dst).clamp_(min=1).to(msg.dtype)
        neigh = summed / degree.unsqueeze(1)
        if not project_first:
            neigh = self.fc_neigh(neigh)
        return self.fc_self(h[: block.num_dst]) + neigh


class TorchGATConv(nn.Module):
    """Graph attention with ``heads`` heads: per edge ``a = softmax over the destination's in-edges of
    leaky_relu(attn_l . Wh_src + attn_r . Wh_dst)``, output ``sum a * Wh_src + bias``, shape [dst, heads, out]; a
    destination without in-edges gets the bias alone."""

    def __init__(self, in_feats: int, out_feats: int, heads: int):
        super().__init__()
        self.heads, self.out_feats = heads, out_feats
        self.fc = nn.Linear(in_feats, out_feats * heads, bias=False)
        self.attn_l = nn.Parameter(torch.empty(1, heads, out_feats))
        self.attn_r = nn.Parameter(torch.empty(1, heads, out_feats))
        self.bias = nn.Parameter(torch.empty(heads * out_feats))
        gain = nn.init.calculate_gain("relu")
        nn.init.xavier_normal_(self.fc.weight, gain=gain)
        nn.init.xavier_normal_(self.attn_l, gain=gain)
        nn.init.xavier_normal_(self.attn_r, gain=gain)
        nn.init.zeros_(self.bias)

    def forward(self, block: BlockIndex, h: torch.Tensor) -> torch.Tensor:
        wh = self.fc(h).view(-1, self.heads, self.out_feats)
        score_src = (wh * self.attn_l).sum(-1)  # [src, heads]
        score_dst = (wh[: block.num_dst] * self.attn_r).sum(-1)  # [dst, heads]
        logits = F.leaky_relu(score_src[block.src] + score_dst[block.dst], NEGATIVE_SLOPE)
        attention = segment_softmax(logits, block.dst, block.num_dst)  # [edges, heads]
        out = wh.new_zeros((block.num_dst, self.heads, self.out_feats))
        out.index_add_(0, block.dst, wh[block.src] * attention.unsqueeze(-1))
        return out + self.bias.view(1, self.heads, self.out_feats)


class SAGE(nn.Module):
    """GraphSAGE (mean), ReLU and dropout between layers. ``forward(blocks, x)``: DGL blocks for ``impl="dgl"``,
    :class:`BlockIndex` es for ``impl="torch"``."""

    def __init__(
        self, in_feats: int, hidden: int, n_classes: int, n_layers: int, dropout: float = 0.2, impl: str = "dgl"
    ):
        super().__init__()
        self.impl = _check_impl(impl)
        dims = [in_feats] + [hidden] * (n_layers - 1) + [n_classes]
        conv = (lambda i, o: SAGEConv(i, o, "mean")) if impl == "dgl" else TorchSAGEConv
        self.layers = nn.ModuleList(conv(dims[i], dims[i + 1]) for i in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, blocks, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, h)
            if i < len(self.layers) - 1:
                h = self.dropout(F.relu(h))
        return h


class GAT(nn.Module):
    """GAT: ``heads`` heads concatenated in hidden layers, one head in the last; ELU and dropout between layers.
    ``forward(blocks, x)`` as :class:`SAGE`."""

    def __init__(
        self,
        in_feats: int,
        hidden: int,
        n_classes: int,
        n_layers: int,
        heads: int = GAT_HEADS,
        dropout: float = 0.2,
        impl: str = "dgl",
    ):
        super().__init__()
        self.impl = _check_impl(impl)
        if hidden % heads:
            raise ValueError(f"--hidden ({hidden}) must be a multiple of the GAT heads ({heads})")
        self.layers = nn.ModuleList()
        in_dim = in_feats
        for i in range(n_layers):
            last = i == n_layers - 1
            out_dim, layer_heads = (n_classes, 1) if last else (hidden // heads, heads)
            if impl == "dgl":
                self.layers.append(GATConv(in_dim, out_dim, layer_heads, allow_zero_in_degree=True))
            else:
                self.layers.append(TorchGATConv(in_dim, out_dim, layer_heads))
            in_dim = hidden
        self.dropout = nn.Dropout(dropout)

    def forward(self, blocks, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, h).flatten(1)
            if i < len(self.layers) - 1:
                h = self.dropout(F.elu(h))
        return h


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown model implementation {impl!r}: expected dgl or torch")
    return impl


def build_model(kind: str, in_feats: int, hidden: int, n_classes: int, n_layers: int, impl: str = "dgl") -> nn.Module:
    """The ``kind`` (sage or gat) model in implementation ``impl`` (dgl or torch)."""
    if kind == "sage":
        return SAGE(in_feats, hidden, n_classes, n_layers, impl=impl)
    if kind == "gat":
        return GAT(in_feats, hidden, n_classes, n_layers, impl=impl)
    raise ValueError(f"unknown model {kind!r}: expected sage or gat")
