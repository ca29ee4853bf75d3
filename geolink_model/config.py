"""GeoLink configuration and its named presets (`test`, `tiny`, `base`, `large`).

A preset only fills a :class:`GeoLinkConfig`; ``create_config("tiny", depth=2)`` overrides fields by name, and an
unknown name is an error (no silent ``**kwargs``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

LOSSES = ("mae", "contrastive", "node", "location", "inr")
# weights of the losses added after the first bundles: a config.json from before them gets these (their switches
# are off there, so nothing changes; turned on later, e.g. `finetune --init-from old --with-location`, they count)
NEW_LOSS_WEIGHTS = {"location": 0.5, "inr": 1.0}
EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG): the location encoder's wavelengths are ground distances
MODES = ("image", "osm", "fused")
POS_EMBEDS = ("sincos", "learned", "fixed")


@dataclass(frozen=True)
class GeoLinkConfig:
    """Every size and knob of the model.

    Args:
        img_size, patch_size, in_chans: image input (a square tile; patch grid = img_size / patch_size).
        embed_dim, depth, num_heads, mlp_ratio: the ViT image encoder.
        class_token, pos_embed, final_norm: how the ViT's tokens are made, so imported published weights run as
            they were trained (``geolink-engine import-weights``): a class token prepended before the blocks (and
            stripped from every output, so the decoders see the patch tokens only); the position embedding
            ``sincos`` (the engine's fixed formula, not saved), ``learned`` (a trained table in the weights) or
            ``fixed`` (a table in the weights that is not trained: published ViTs with a frozen sin-cos table);
            the ViT's final LayerNorm applied to the returned tokens. The defaults are what every bundle before
            imports was built with (no class token, the formula, un-normed tokens).
        osm_dim, osm_layers, osm_heads: the heterogeneous graph encoder (GAT layers over the typed relations).
        vocab_size: hashed tag-token space (must match the prepared graphs' ``OsmGraphConfig.vocab_size``).
        fusion_layers, fusion_heads: two-way cross-attention blocks between patch tokens and OSM node tokens.
        position_guided: add each node's image-position embedding before fusion (off = the ablation).
        osm_grid_in_fused: in ``fused`` mode, also add the OSM node tokens rasterised to the patch grid (the ``osm``
            mode's input) to the image tokens of every level the decoder reads, so the fused model has at least what
            the OSM-only model has (cross-attention alone let the image tokens drown the OSM signal:
            docs/EXPERIMENTS.md).
        decoder_dim, decoder_depth, decoder_heads: the MAE pixel decoder.
        seg_dim: width of the segmentation decoder; feature_layers: ViT blocks (0-based) feeding it.
        num_classes: segmentation classes.
        mask_ratio: share of image patches hidden in pretraining; node_mask_ratio: share of OSM nodes hidden.
        temperature: InfoNCE temperature; loss_weights: weight per pretraining loss (mae, contrastive, node, and
            location / inr when switched on).
        with_location: build the geolocation encoder (:mod:`geolink_model.location`): the tile centre's lon/lat,
            contrasted with the image in pretraining (loss ``location``) and added to the image tokens before fusion.
            Off, the model has no location weights (bundles from before it load unchanged).
        location_scales, location_min_km, location_max_km: its sinusoid wavelengths, a geometric ladder from
            ``location_max_km`` (must exceed the Earth's diameter, ~12,742 km, so distinct places stay distinct) down
            to ``location_min_km``.
        inr: build GAIR's implicit-neural-representation lookup (:mod:`geolink_model.inr`), the embedding at any
            point of a tile from the patch grid, trained in pretraining (loss ``inr``).
        regression_targets: build a tile-level regression head with this many outputs (Rose's population / CO2
            protocol, :mod:`geolink_model.regression`); 0 = none.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = False
    pos_embed: str = "sincos"
    final_norm: bool = False
    osm_dim: int = 256
    osm_layers: int = 2
    osm_heads: int = 4
    vocab_size: int = 1 << 15
    fusion_layers: int = 2
    fusion_heads: int = 8
    position_guided: bool = True
    osm_grid_in_fused: bool = True
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    seg_dim: int = 128
    feature_layers: tuple[int, ...] = (3, 5, 7, 11)
    num_classes: int = 2
    mask_ratio: float = 0.75
    node_mask_ratio: float = 0.2
    temperature: float = 0.07
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mae": 1.0, "contrastive": 0.5, "node": 0.5, **NEW_LOSS_WEIGHTS})
    with_location: bool = False
    location_scales: int = 16
    location_min_km: float = 1.0
    location_max_km: float = 20000.0
    inr: bool = False
    regression_targets: int = 0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        for name in ("embed_dim", "osm_dim", "decoder_dim"):
            heads = {"embed_dim": self.num_heads, "osm_dim": self.osm_heads, "decoder_dim": self.decoder_heads}[name]
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by its heads ({heads})")
        if self.embed_dim % self.fusion_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by fusion_heads={self.fusion_heads}")
        if self.embed_dim % 4:
            raise ValueError("embed_dim must be a multiple of 4 (2-D sin-cos position embedding)")
        if not self.feature_layers or any(not 0 <= i < self.depth for i in self.feature_layers):
            raise ValueError(f"feature_layers={self.feature_layers} must index blocks 0..{self.depth - 1}")
        if not (0.0 < self.mask_ratio < 1.0 and 0.0 <= self.node_mask_ratio < 1.0):
            raise ValueError("mask_ratio must be in (0, 1) and node_mask_ratio in [0, 1)")
        if self.regression_targets < 0:
            raise ValueError(f"regression_targets={self.regression_targets}: must be >= 0")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={self.pos_embed!r}: use one of {POS_EMBEDS}")
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if self.location_scales < 1 or not 0.0 < self.location_min_km < self.location_max_km:
            raise ValueError(f"location_scales={self.location_scales} must be >= 1 and 0 < location_min_km={self.location_min_km} "
                             f"< location_max_km={self.location_max_km}")
        if self.location_max_km <= 2 * EARTH_RADIUS_KM:
            raise ValueError(f"location_max_km={self.location_max_km} must exceed the Earth's diameter ({2 * EARTH_RADIUS_KM:.0f} km): "
                             "below it, distant places share location features")
        unknown = set(self.loss_weights) - set(LOSSES)
        if unknown:
            raise ValueError(f"loss_weights has unknown losses {sorted(unknown)}; known: {LOSSES}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GeoLinkConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GeoLinkConfig keys {sorted(unknown)}")
        if "feature_layers" in data:
            data["feature_layers"] = tuple(data["feature_layers"])
        # a bundle saved before the switch existed was trained without the grid: keep running it that way
        data.setdefault("osm_grid_in_fused", False)
        # a config from before the location and INR switches: their losses get the default weights
        old = {loss: w for loss, w in NEW_LOSS_WEIGHTS.items() if {"location": "with_location"}.get(loss, loss) not in data}
        if old and "loss_weights" in data:
            data["loss_weights"] = {**old, **data["loss_weights"]}
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: a small ViT on 224 px tiles
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, osm_dim=128, osm_heads=4, fusion_heads=3, decoder_dim=128, decoder_depth=1,
                 decoder_heads=4, seg_dim=64, feature_layers=(1, 2, 3)),
    # the test suite's model: `tiny` shrunk further (2 blocks, 96-d, 128 px tiles) so a CPU builds and runs it in seconds
    "test": dict(img_size=128, embed_dim=96, depth=2, num_heads=3, osm_dim=64, osm_heads=4, fusion_heads=3, decoder_dim=64,
                 decoder_depth=1, decoder_heads=4, seg_dim=32, feature_layers=(0, 1)),
    # the paper's scale: ViT-B/16 and ViT-L/16
    "base": dict(embed_dim=768, depth=12, num_heads=12, osm_dim=256, fusion_heads=8, feature_layers=(3, 5, 7, 11)),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, osm_dim=384, osm_heads=6, fusion_heads=16, decoder_dim=512, decoder_depth=4,
                  decoder_heads=16, seg_dim=256, feature_layers=(7, 11, 15, 23)),
}


def create_config(preset: str = "tiny", **overrides: Any) -> GeoLinkConfig:
    """A preset's config with named fields replaced; unknown presets or fields are errors.

    Example:
        >>> create_config("tiny", img_size=64, depth=2, feature_layers=(0, 1)).grid_size
        4
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(GeoLinkConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown GeoLinkConfig fields {sorted(unknown)}")
    return replace(GeoLinkConfig(**PRESETS[preset]), **overrides)
