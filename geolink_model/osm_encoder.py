"""OSM encoder: tag-token embedding bag + geometry MLP per node type, then heterogeneous graph attention.

Every relation of :data:`~geolink_model.osm_graph.EDGE_TYPES` is one ``GATConv`` inside a PyG ``HeteroConv``; its
edge attribute is the relative position of the two nodes in the tile (dx, dy, distance), so attention can weigh
neighbours by where they are, not only by what they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GATConv, HeteroConv

from geolink_model.config import GeoLinkConfig
from geolink_model.osm_graph import EDGE_TYPES, GEOM_FEATURES, NODE_TYPES


class OsmEncoder(nn.Module):
    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        d = cfg.osm_dim
        self.tags = nn.EmbeddingBag(cfg.vocab_size, d, mode="mean", padding_idx=0)
        self.geom = nn.ModuleDict({t: nn.Sequential(nn.Linear(len(GEOM_FEATURES[t]), d), nn.GELU(), nn.Linear(d, d)) for t in NODE_TYPES})
        self.type_embed = nn.ParameterDict({t: nn.Parameter(torch.zeros(d)) for t in NODE_TYPES})
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.convs = nn.ModuleList(
            HeteroConv({et: GATConv((d, d), d // cfg.osm_heads, heads=cfg.osm_heads, edge_dim=3, add_self_loops=False) for et in EDGE_TYPES},
                       aggr="sum")
            for _ in range(cfg.osm_layers)
        )
        self.norms = nn.ModuleList(nn.ModuleDict({t: nn.LayerNorm(d) for t in NODE_TYPES}) for _ in range(cfg.osm_layers))
        nn.init.normal_(self.mask_token, std=0.02)
        for p in self.type_embed.values():
            nn.init.normal_(p, std=0.02)

    def tag_embedding(self, data) -> dict[str, torch.Tensor]:
        """Mean embedding of each node's tag tokens (the target of masked-node reconstruction)."""
        return {t: self.tags(data[t].tokens) if data[t].num_nodes else data[t].x.new_zeros(0, self.tags.embedding_dim) for t in NODE_TYPES}

    def forward(self, data, node_mask: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Node embeddings per type, ``(n_t, osm_dim)``. ``node_mask[t]`` (bool, n_t) hides those nodes' tags."""
        tags = self.tag_embedding(data)
        x = {}
        for t in NODE_TYPES:
            h = tags[t]
            if node_mask is not None and t in node_mask:
                h = torch.where(node_mask[t][:, None], self.mask_token.expand_as(h), h)
            x[t] = h + self.geom[t](data[t].x) + self.type_embed[t]
        pos = {t: data[t].x[:, :2] for t in NODE_TYPES}  # every type's first two features are its position
        edges, attrs = {}, {}
        for et in EDGE_TYPES:
            if et not in data.edge_types:
                continue
            ei = data[et].edge_index
            if ei.numel() == 0:
                continue
            delta = pos[et[2]][ei[1]] - pos[et[0]][ei[0]]
            edges[et] = ei
            attrs[et] = torch.cat([delta, delta.norm(dim=-1, keepdim=True)], dim=-1)
        for conv, norms in zip(self.convs, self.norms):
            if edges:
                out = conv(x, edges, edge_attr_dict=attrs)
                x = {t: norms[t](x[t] + out[t]) if t in out else norms[t](x[t]) for t in NODE_TYPES}
            else:
                x = {t: norms[t](x[t]) for t in NODE_TYPES}
        return x
