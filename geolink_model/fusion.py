"""Cross-modal fusion: two-way attention between image patch tokens and OSM node tokens.

Nodes of all types of a sample are gathered into one padded sequence (``to_dense_batch``, no Python loop over
graphs) with a learned *null node* first, so a tile without OSM still has something to attend to. With
``position_guided`` each node token gets the sin-cos embedding of where it lies on the image, the same embedding
the patch at that place carries, which is what guides the attention by spatial correlation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import to_dense_batch

from geolink_model.config import GeoLinkConfig
from geolink_model.osm_graph import NODE_TYPES
from geolink_model.pos_embed import sincos_2d


class FusionBlock(nn.Module):
    """Image tokens attend to nodes, nodes attend to image tokens, then an MLP on each side (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_img_q, self.norm_node_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_node_q, self.norm_img_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.img_from_nodes = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.nodes_from_img = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp_img = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_node = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, img: torch.Tensor, nodes: torch.Tensor, node_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.norm_node_kv(nodes)
        img = img + self.img_from_nodes(self.norm_img_q(img), kv, kv, key_padding_mask=node_padding, need_weights=False)[0]
        kv = self.norm_img_kv(img)
        nodes = nodes + self.nodes_from_img(self.norm_node_q(nodes), kv, kv, need_weights=False)[0]
        return img + self.mlp_img(img), nodes + self.mlp_node(nodes)


class CrossModalFusion(nn.Module):
    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.node_proj = nn.Linear(cfg.osm_dim, cfg.embed_dim)
        self.null_node = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(FusionBlock(cfg.embed_dim, cfg.fusion_heads, cfg.mlp_ratio) for _ in range(cfg.fusion_layers))
        self.norm_img = nn.LayerNorm(cfg.embed_dim)
        self.norm_node = nn.LayerNorm(cfg.embed_dim)
        nn.init.normal_(self.null_node, std=0.02)

    def dense_nodes(self, data, node_x: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """All nodes of each sample as one padded sequence: ``(B, 1 + M, D)``, padding mask, per-type dense masks."""
        seqs, pads, masks = [self.null_node.expand(batch_size, -1, -1)], [], []
        for t in NODE_TYPES:
            h = self.node_proj(node_x[t])
            if self.cfg.position_guided:
                h = h + sincos_2d(data[t].x[:, :2], self.cfg.embed_dim, self.cfg.grid_size)
            dense, mask = to_dense_batch(h, data[t].batch, batch_size=batch_size)
            seqs.append(dense)
            masks.append(mask)
            pads.append(~mask)
        null_pad = torch.zeros(batch_size, 1, dtype=torch.bool, device=seqs[0].device)
        return torch.cat(seqs, dim=1), torch.cat([null_pad, *pads], dim=1), masks

    def forward(self, img: torch.Tensor, data, node_x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Fuse ``img`` (B, N, D) with the graph batch; returns fused image tokens, node tokens, padding, type masks."""
        nodes, padding, masks = self.dense_nodes(data, node_x, img.shape[0])
        for block in self.blocks:
            img, nodes = block(img, nodes, padding)
        return self.norm_img(img), self.norm_node(nodes), padding, masks
