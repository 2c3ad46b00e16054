"""GNN models trained on sampled blocks: GraphSAGE (mean) and GAT, one layer per fanout."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rudder.runtime.dgl_compat import import_dgl

import_dgl()
from dgl.nn import GATConv, SAGEConv  # noqa: E402


class SAGE(nn.Module):
    def __init__(self, in_feats: int, hidden: int, n_classes: int, n_layers: int, dropout: float = 0.2):
        super().__init__()
        dims = [in_feats] + [hidden] * (n_layers - 1) + [n_classes]
        self.layers = nn.ModuleList(SAGEConv(dims[i], dims[i + 1], "mean") for i in range(n_layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, blocks, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, h)
            if i < len(self.layers) - 1:
                h = self.dropout(F.relu(h))
        return h


class GAT(nn.Module):
    def __init__(self, in_feats: int, hidden: int, n_classes: int, n_layers: int, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"--hidden ({hidden}) must be a multiple of the GAT heads ({heads})")
        self.layers = nn.ModuleList()
        in_dim = in_feats
        for i in range(n_layers):
            last = i == n_layers - 1
            self.layers.append(
                GATConv(in_dim, n_classes if last else hidden // heads, 1 if last else heads, allow_zero_in_degree=True)
            )
            in_dim = hidden
        self.dropout = nn.Dropout(dropout)

    def forward(self, blocks, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (layer, block) in enumerate(zip(self.layers, blocks)):
            h = layer(block, h).flatten(1)
            if i < len(self.layers) - 1:
                h = self.dropout(F.elu(h))
        return h


def build_model(kind: str, in_feats: int, hidden: int, n_classes: int, n_layers: int) -> nn.Module:
    if kind == "sage":
        return SAGE(in_feats, hidden, n_classes, n_layers)
    if kind == "gat":
        return GAT(in_feats, hidden, n_classes, n_layers)
    raise ValueError(f"unknown model {kind!r}: expected sage or gat")
