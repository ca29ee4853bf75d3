"""Where a tile lies on Earth, as an embedding: GAIR's geolocation encoder (``GeoLinkConfig.with_location``).

A tile centre's longitude/latitude becomes a point ``u`` on the unit sphere, then fixed multi-scale sinusoids of
``u`` projected on a few fixed directions (the deterministic form of SatCLIP/GeoCLIP's random Fourier features),
then an MLP. Nothing is sampled: the directions and frequencies are computed from the config, so the same place
always gives the same embedding and a bundle stores only the MLP's weights.

Why the unit sphere and not lon/lat themselves: the sphere has no seam at the antimeridian and no pole where
longitude stops meaning anything, so places close on the ground are close in the features everywhere.

The embedding has two uses in :class:`~geolink_model.model.GeoLink` (:class:`LocationBranch`):
- pretraining: an InfoNCE loss between each tile's location embedding and its pooled image embedding
  (SatCLIP/GeoCLIP's location-image contrast), loss ``location``;
- the fused input: a learned projection of the embedding, added to every top-level image token before the
  cross-modal fusion (zero at initialisation, so a model given location starts out computing what it did without).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from geolink_model.config import EARTH_RADIUS_KM, GeoLinkConfig
from geolink_model.heads import info_nce

# fixed projection directions of the unit vector: part of the model's definition (the MLP's input width is
# 2 * DIRECTIONS * location_scales, so a change here fails loudly on loading an older bundle)
DIRECTIONS = 8
CONTRAST_DIM = 256  # width of the location-image contrastive space (the image-graph one's too)


def fibonacci_directions(n: int) -> torch.Tensor:
    """``(n, 3)`` unit vectors spread evenly over the upper half sphere (a Fibonacci lattice), float64.

    Half a sphere: ``d`` and ``-d`` give the same sinusoids up to sign. Any three of them span R^3, which is what
    makes the features injective (see :class:`LocationEncoder`).

    Example:
        >>> fibonacci_directions(4).norm(dim=1)
        tensor([1., 1., 1., 1.], dtype=torch.float64)
    """
    i = torch.arange(n, dtype=torch.float64)
    z = (i + 0.5) / n
    r = (1.0 - z**2).sqrt()
    phi = i * math.pi * (3.0 - math.sqrt(5.0))  # the golden angle
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1)


def lonlat_to_unit(lonlat: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` longitude, latitude in degrees -> ``(..., 3)`` points on the unit sphere (float64)."""
    lon, lat = torch.deg2rad(lonlat[..., 0].double()), torch.deg2rad(lonlat[..., 1].double())
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


class LocationEncoder(nn.Module):
    """Longitude/latitude (degrees) -> a location embedding of ``cfg.embed_dim`` channels.

    Features: for each fixed direction ``d`` (:func:`fibonacci_directions`) and each wavelength ``lam`` on a
    geometric ladder from ``location_max_km`` down to ``location_min_km``, ``sin`` and ``cos`` of
    ``2 pi R / lam * (d . u)``, with ``u`` the unit vector and ``R`` the Earth's radius, so a step of ``lam`` km on
    the ground along ``d`` turns the phase by about one cycle. The coarsest wavelength (> 2R) keeps every phase
    within one cycle over the whole sphere, so ``d . u`` and hence ``u`` can be read back from it alone: distinct
    places have distinct features (injective); the fine wavelengths tell apart places ``location_min_km`` apart.

    Computed in float64 with autocast off: at 1 km the phase is ~40,000 rad per unit of ``u``, which bf16 (or a
    float32 matmul) would scramble. The MLP then works in whatever precision the caller runs.

    Example:
        >>> from geolink_model.config import create_config
        >>> enc = LocationEncoder(create_config("test", with_location=True))
        >>> enc(torch.tensor([[116.4, 39.9], [121.5, 31.2]])).shape
        torch.Size([2, 96])
    """

    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        s = cfg.location_scales
        ladder = torch.arange(s, dtype=torch.float64) / max(s - 1, 1)
        wavelengths_km = cfg.location_max_km * (cfg.location_min_km / cfg.location_max_km) ** ladder
        self.register_buffer("directions", fibonacci_directions(DIRECTIONS), persistent=False)
        self.register_buffer("frequencies", 2.0 * math.pi * EARTH_RADIUS_KM / wavelengths_km, persistent=False)
        width = 2 * DIRECTIONS * s
        self.mlp = nn.Sequential(nn.Linear(width, cfg.embed_dim), nn.GELU(), nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(),
                                 nn.Linear(cfg.embed_dim, cfg.embed_dim))

    def features(self, lonlat: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` degrees -> ``(B, 2 * DIRECTIONS * location_scales)`` fixed sinusoids, float32."""
        with torch.autocast(lonlat.device.type, enabled=False):
            u = lonlat_to_unit(lonlat)  # (B, 3)
            proj = (u[:, None, :] * self.directions.double()[None]).sum(dim=-1)  # (B, K): elementwise, never a reduced-precision matmul
            phase = proj[:, :, None] * self.frequencies.double()[None, None]  # (B, K, S)
            return torch.cat([phase.sin(), phase.cos()], dim=-1).reshape(len(lonlat), -1).float()

    def forward(self, lonlat: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(lonlat))


class LocationBranch(nn.Module):
    """The location encoder with its two uses: the location-image contrastive heads and the token bias.

    Rows of ``lonlat`` that are not finite (a tile without bounds) count as "no location": no contrastive pair and
    no token bias.
    """

    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = LocationEncoder(cfg)
        d = cfg.embed_dim
        self.loc_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, CONTRAST_DIM))
        # its own image projection: the image-graph contrast has one too, and one image vector asked to match both the
        # graph and the place would be pulled two ways
        self.img_proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, CONTRAST_DIM))
        self.to_tokens = nn.Linear(d, d)
        nn.init.zeros_(self.to_tokens.weight)  # zero at start: adding location first changes nothing, then learns
        nn.init.zeros_(self.to_tokens.bias)

    def embed(self, lonlat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location embeddings ``(B, D)`` (0 where unknown) and the ``(B,)`` bool of known rows."""
        known = torch.isfinite(lonlat).all(dim=-1)
        emb = self.encoder(torch.where(known[:, None], lonlat, torch.zeros_like(lonlat)))
        return emb * known[:, None].to(emb.dtype), known

    def token_bias(self, lonlat: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D)``: what is added to every image token of a tile (broadcast over its patches)."""
        emb, known = self.embed(lonlat)
        return (self.to_tokens(emb) * known[:, None].to(emb.dtype))[:, None]

    def contrastive_loss(self, lonlat: torch.Tensor, image_vec: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between each tile's location and its pooled image embedding ``(B, D)``."""
        emb, known = self.embed(lonlat)
        return info_nce(self.loc_proj(emb), self.img_proj(image_vec), known, self.cfg.temperature)
