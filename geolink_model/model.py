"""GeoLink: image encoder + OSM encoder + cross-modal fusion, with pretraining losses and a segmentation head.

Entry points:
- ``pretrain_losses(images, graphs)`` -> dict of the three self-supervised losses (and their weighted ``loss``);
- ``forward(images, graphs, mode)`` -> per-pixel logits, ``mode`` in ``image`` / ``osm`` / ``fused``;
  ``encode(images, graphs, mode)`` -> the ``(B, N, D)`` patch tokens its decoder reads (embeddings).

Both take an optional ``lonlat`` ``(B, 2)``, each tile centre's longitude/latitude in degrees, used by a model built
``with_location`` (:mod:`geolink_model.location`) and ignored by others; None (or a non-finite row) = not known.

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
from geolink_model.inr import InrLookup, inr_loss
from geolink_model.location import LocationBranch
from geolink_model.regression import RegressionHead
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
        # optional parts, built last and only when switched on: a config without them builds (and initialises) the
        # same model, with the same state-dict keys, as before they existed
        self.location = LocationBranch(cfg) if cfg.with_location else None
        self.inr = InrLookup(cfg.embed_dim) if cfg.inr else None
        self.regression_head = RegressionHead(cfg.embed_dim, cfg.regression_targets) if cfg.regression_targets else None

    # --- pretraining ---------------------------------------------------------------------------------------
    def pretrain_losses(self, images: torch.Tensor, graphs: Batch, generator: torch.Generator | None = None,
                        lonlat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked patch reconstruction, image-graph InfoNCE and masked node reconstruction, plus the weighted sum;
        with ``with_location`` also location-image InfoNCE (``location``; 0 without ``lonlat``), with ``inr`` the INR
        lookup's loss (``inr``, :func:`geolink_model.inr.inr_loss`)."""
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
        if self.location is not None:  # the place <-> the image, before fusion too
            where = lonlat if lonlat is not None else images.new_full((b, 2), float("nan"))
            losses["location"] = self.location.contrastive_loss(where, enc.tokens.mean(dim=1))
        if self.inr is not None:
            losses["inr"] = inr_loss(self.image_encoder, self.inr, images, cfg.patch_size, generator, self.location_bias(lonlat))
        # fused tokens: visible patches (with their positions, and the place as in `forward`) <-> nodes
        fused_img, fused_nodes, _, masks = self.fusion(enc.tokens + self.location_bias(lonlat), graphs, node_x)
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
    def forward(self, images: torch.Tensor | None, graphs: Batch | None, mode: str = "fused",
                lonlat: torch.Tensor | None = None, head: str = "segment") -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-pixel logits ``(B, num_classes, img_size, img_size)``; ``mode="pretrain"`` returns the losses instead
        and ``head="regress"`` the tile-level regression (:meth:`regress`), so a DDP-wrapped model trains through its
        own forward. With ``with_location``, the location embedding of ``lonlat`` is added to every top-level token
        before the fusion (:meth:`location_bias`)."""
        if mode == "pretrain":
            return self.pretrain_losses(images, graphs, lonlat=lonlat)
        if head == "regress":
            return self.regress(images, graphs, mode, lonlat=lonlat)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES} (or 'pretrain')")
        if mode in ("image", "fused") and images is None:
            raise ValueError(f"mode {mode!r} needs images")
        if mode in ("osm", "fused") and graphs is None:
            raise ValueError(f"mode {mode!r} needs graphs (a graph with no nodes is fine)")
        if mode == "osm":
            node_x = self.osm_encoder(graphs)
            tokens = self.osm_grid_tokens(graphs, node_x) + self.grid_pos
            fused, _, _, _ = self.fusion(tokens + self.location_bias(lonlat), graphs, node_x)
            levels = [tokens] * len(self.cfg.feature_layers) + [fused]
        else:
            enc = self.image_encoder(images, return_layers=self.cfg.feature_layers)
            levels, top = list(enc.layers), enc.tokens + self.location_bias(lonlat)
            if mode == "fused":
                node_x = self.osm_encoder(graphs)
                if self.cfg.osm_grid_in_fused:
                    grid = self.osm_grid_tokens(graphs, node_x)
                    levels, top = [x + grid for x in levels], top + grid
                top, _, _, _ = self.fusion(top, graphs, node_x)
            levels = [*levels, top]
        return self.seg_decoder(levels)

    def encode(self, images: torch.Tensor | None, graphs: Batch | None, mode: str = "fused",
               lonlat: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``(B, grid_size**2, embed_dim)``, row-major: what the segmentation decoder reads at its top
        level in ``mode`` (``image``: the image encoder's last tokens; ``osm``: the OSM grid tokens after their fusion
        with the nodes; ``fused``: the fused image tokens). For embeddings (`geolink-engine embed`).

        Taken from :meth:`forward` itself, stopped where it calls the decoder (a pre-hook raises with its input), so
        the encodings follow forward's paths exactly, now and after any change to them, with no decoder cost.
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES}")

        def stop(_decoder: nn.Module, args: tuple) -> None:
            raise _DecoderInput(args[0][-1])

        handle = self.seg_decoder.register_forward_pre_hook(stop)
        try:
            self.forward(images, graphs, mode, lonlat=lonlat)
        except _DecoderInput as reached:
            return reached.tokens
        finally:
            handle.remove()
        raise RuntimeError(f"forward in mode {mode!r} never reached the segmentation decoder")

    def regress(self, images: torch.Tensor | None, graphs: Batch | None, mode: str = "fused",
                lonlat: torch.Tensor | None = None) -> torch.Tensor:
        """Tile-level regression ``(B, regression_targets)`` on the model's scale (``log1p`` of the quantity when
        trained with a log target): the head over :meth:`encode`'s tokens, i.e. what the segmentation decoder reads."""
        if self.regression_head is None:
            raise ValueError("this model has no regression head (regression_targets=0): fine-tune one with "
                             "`geolink-engine finetune --task population|co2`")
        return self.regression_head(self.encode(images, graphs, mode, lonlat=lonlat))

    def location_bias(self, lonlat: torch.Tensor | None) -> torch.Tensor | float:
        """``(B, 1, D)`` added to every top-level image token, or 0 (no location encoder, or ``lonlat`` None).

        Why added to every token and not one more token for the fusion's attention: the fusion's image tokens attend
        to the OSM nodes, so a location token would compete in one softmax with the null node and every OSM node
        (less heard the more OSM a tile has), and it has no place on the image for the position embedding. Added to
        every token it reaches each patch alike, in every mode, and the node sequences keep their layout.
        """
        if self.location is None or lonlat is None:
            return 0.0
        return self.location.token_bias(lonlat)

    def osm_grid_tokens(self, graphs: Batch, node_x: dict[str, torch.Tensor]) -> torch.Tensor:
        """OSM node tokens rasterised to the patch grid through their positions, ``(B, grid_size**2, embed_dim)``;
        cells without a node get a learned 'no OSM here' token."""
        grid, count = splat_nodes(graphs, node_x, int(graphs.num_graphs), self.cfg.grid_size)
        return self.osm_grid_proj(grid) + self.osm_grid_embed * (count[..., None] == 0)


class _DecoderInput(Exception):
    """Carries the decoder's top-level input out of :meth:`GeoLink.forward` (:meth:`GeoLink.encode`)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__("decoder input")
        self.tokens = tokens


def build_model(cfg: GeoLinkConfig) -> GeoLink:
    """The model for a config (weights freshly initialised; see :mod:`geolink_model.checkpoint` to load ours)."""
    return GeoLink(cfg)
