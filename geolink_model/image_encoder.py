"""Image encoder: a timm ViT with a fixed 2-D sin-cos position embedding and MAE-style random masking.

Only the visible patches go through the transformer (MAE), so pretraining at mask ratio 0.75 costs a quarter of a
full forward. The ViT is ``timm.create_model(..., pretrained=False)``: every weight is trained by our own jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from geolink_model.config import GeoLinkConfig
from geolink_model.pos_embed import patch_centres, sincos_2d


@dataclass
class ImageTokens:
    """Encoder output: ``tokens`` (B, N_visible, D) after the final norm; ``keep`` (B, N_visible) patch indices kept,
    or None when nothing was masked; ``mask`` (B, N) with 1 = hidden; ``layers`` the requested blocks' outputs."""

    tokens: torch.Tensor
    keep: torch.Tensor | None
    mask: torch.Tensor | None
    layers: list[torch.Tensor]


class ImageEncoder(nn.Module):
    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=cfg.img_size, patch_size=cfg.patch_size,
            in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            class_token=False, pos_embed="none", global_pool="avg",
        )
        self.register_buffer("pos_embed", sincos_2d(patch_centres(cfg.grid_size), cfg.embed_dim, cfg.grid_size)[None], persistent=False)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0, return_layers: tuple[int, ...] = ()) -> ImageTokens:
        """Encode ``images`` (B, C, H, W); hide ``mask_ratio`` of the patches at random (per sample)."""
        x = self.vit.patch_embed(images) + self.pos_embed
        b, n, d = x.shape
        keep = mask = None
        if mask_ratio > 0:
            n_keep = max(1, int(round(n * (1.0 - mask_ratio))))
            noise = torch.rand(b, n, device=x.device)
            order = noise.argsort(dim=1)
            keep = order[:, :n_keep].sort(dim=1).values
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, d))
            mask = torch.ones(b, n, device=x.device)
            mask.scatter_(1, keep, 0.0)
        x = self.vit.norm_pre(x)
        layers = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in return_layers:
                layers.append(x)
        return ImageTokens(tokens=self.vit.norm(x), keep=keep, mask=mask, layers=layers)
