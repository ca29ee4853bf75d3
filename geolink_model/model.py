"""GeoLink: image encoder + OSM encoder + cross-modal fusion, with pretraining losses and a segmentation head.

Two entry points:
- ``pretrain_losses(images, graphs)`` -> dict of the three self-supervised losses (and their weighted ``loss``);
- ``forward(images, graphs, mode)`` -> per-pixel logits, ``mode`` in ``image`` / ``osm`` / ``fused``.

``graphs`` is a PyG batch of HeteroData (:func:`batch_graphs`). A tile without OSM is a graph with no nodes; the
fused model still predicts (its image tokens attend to the learned null node).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.data import Batch

from geolink_model.config import MODES, GeoLinkConfig
from geolink_model.fusion import CrossModalFusion
from geolink_model.heads import GraphReadout, MaeDecoder, SegmentationDecoder, info_nce, mae_loss, splat_nodes
from geolink_model.image_encoder import ImageEncoder
from geolink_model.osm_encoder import OsmEncoder
from geolink_model.osm_graph import NODE_TYPES, TileGraph, to_hetero_data
from geolink_model.pos_embed import patch_centres, sincos_2d


def batch_graphs(graphs: list[TileGraph]) -> Batch:
    """A PyG batch of tile graphs (node ``batch`` vectors per type, edge indices offset per graph)."""
    return Batch.from_data_list([to_hetero_data(g) for g in graphs])


class GeoLink(nn.Module):
    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.osm_encoder = OsmEncoder(cfg)
        self.fusion = CrossModalFusion(cfg)
        # pretraining heads
        self.mae_decoder = MaeDecoder(cfg)
        self.readout = GraphReadout(cfg.osm_dim)
        self.img_proj = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, 256))
        self.graph_proj = nn.Sequential(nn.Linear(cfg.osm_dim, cfg.osm_dim), nn.GELU(), nn.Linear(cfg.osm_dim, 256))
        self.node_head = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, cfg.osm_dim))
        # downstream
        self.osm_grid_embed = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.osm_grid_proj = nn.Linear(cfg.osm_dim, cfg.embed_dim)
        self.seg_decoder = SegmentationDecoder(cfg, n_levels=len(cfg.feature_layers) + 1)
        self.register_buffer("grid_pos", sincos_2d(patch_centres(cfg.grid_size), cfg.embed_dim, cfg.grid_size)[None], persistent=False)
        nn.init.normal_(self.osm_grid_embed, std=0.02)

    # --- pretraining ---------------------------------------------------------------------------------------
    def pretrain_losses(self, images: torch.Tensor, graphs: Batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masked patch reconstruction, image-graph InfoNCE and masked node reconstruction, plus the weighted sum."""
        cfg = self.cfg
        b = images.shape[0]
        enc = self.image_encoder(images, mask_ratio=cfg.mask_ratio)
        node_mask = {t: torch.rand(graphs[t].num_nodes, generator=generator, device=images.device) < cfg.node_mask_ratio
                     for t in NODE_TYPES}
        targets = {t: v.detach() for t, v in self.osm_encoder.tag_embedding(graphs).items()}
        node_x = self.osm_encoder(graphs, node_mask=node_mask)
        # unimodal vectors for the contrastive loss (before fusion, so each encoder learns on its own)
        graph_vec, has_nodes = self.readout(graphs, node_x, b)
        losses = {"contrastive": info_nce(self.img_proj(enc.tokens.mean(dim=1)), self.graph_proj(graph_vec), has_nodes, cfg.temperature)}
        # fused tokens: visible patches (with their positions) <-> nodes
        fused_img, fused_nodes, _, masks = self.fusion(enc.tokens, graphs, node_x)
        losses["mae"] = mae_loss(self.mae_decoder(fused_img, enc.keep), images, enc.mask, cfg.patch_size)
        # masked nodes: predict their (stop-gradient) tag embedding from the fused node tokens
        offset, preds, wants = 1, [], []
        for t, mask in zip(NODE_TYPES, masks):
            m = mask.shape[1]
            dense_tokens = fused_nodes[:, offset:offset + m][mask]  # back to the flat node order of type t
            offset += m
            hidden = node_mask[t]
            preds.append(self.node_head(dense_tokens[hidden]))
            wants.append(targets[t][hidden])
        pred, want = torch.cat(preds), torch.cat(wants)
        valid = want.norm(dim=-1) > 0  # nodes without any tag have no target
        if bool(valid.any()):
            losses["node"] = (1.0 - nn.functional.cosine_similarity(pred[valid], want[valid], dim=-1)).mean()
        else:
            losses["node"] = fused_nodes.sum() * 0.0
        losses["loss"] = sum(cfg.loss_weights.get(k, 0.0) * v for k, v in losses.items())
        return losses

    # --- segmentation --------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None, graphs: Batch | None, mode: str = "fused") -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-pixel logits ``(B, num_classes, img_size, img_size)``; ``mode="pretrain"`` returns the losses instead
        (so a DDP-wrapped model trains through its own forward)."""
        if mode == "pretrain":
            return self.pretrain_losses(images, graphs)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES} (or 'pretrain')")
        if mode in ("image", "fused") and images is None:
            raise ValueError(f"mode {mode!r} needs images")
        if mode in ("osm", "fused") and graphs is None:
            raise ValueError(f"mode {mode!r} needs graphs (a graph with no nodes is fine)")
        if mode == "osm":
            node_x = self.osm_encoder(graphs)
            tokens = self.osm_grid_tokens(graphs, node_x) + self.grid_pos
            fused, _, _, _ = self.fusion(tokens, graphs, node_x)
            levels = [tokens] * len(self.cfg.feature_layers) + [fused]
        else:
            enc = self.image_encoder(images, return_layers=self.cfg.feature_layers)
            levels, top = list(enc.layers), enc.tokens
            if mode == "fused":
                node_x = self.osm_encoder(graphs)
                if self.cfg.osm_grid_in_fused:
                    grid = self.osm_grid_tokens(graphs, node_x)
                    levels, top = [x + grid for x in levels], top + grid
                top, _, _, _ = self.fusion(top, graphs, node_x)
            levels = [*levels, top]
        return self.seg_decoder(levels)

    def osm_grid_tokens(self, graphs: Batch, node_x: dict[str, torch.Tensor]) -> torch.Tensor:
        """OSM node tokens rasterised to the patch grid through their positions, ``(B, grid_size**2, embed_dim)``;
        cells without a node get a learned 'no OSM here' token."""
        grid, count = splat_nodes(graphs, node_x, int(graphs.num_graphs), self.cfg.grid_size)
        return self.osm_grid_proj(grid) + self.osm_grid_embed * (count[..., None] == 0)


def build_model(cfg: GeoLinkConfig) -> GeoLink:
    """The model for a config (weights freshly initialised; see :mod:`geolink_model.checkpoint` to load ours)."""
    return GeoLink(cfg)
