"""Image encoder: a timm ViT with a fixed 2-D sin-cos position embedding and MAE-style random masking.

Only the visible patches go through the transformer (MAE), so pretraining at mask ratio 0.75 costs a quarter of a
full forward. The ViT is ``timm.create_model(..., pretrained=False)``: its weights come from our own jobs, or from
published weights converted by ``geolink-engine import-weights`` (:mod:`engine.weights_import`).

Published ViTs carry a class token and a position table of their own; ``GeoLinkConfig.class_token``,
``pos_embed`` and ``final_norm`` make this encoder compute exactly what they compute. The class token is
prepended after masking (it is never hidden) and stripped from every output, so the decoders and the fusion see
the patch tokens only, whatever the weights' origin.
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
        self.prefix = 1 if cfg.class_token else 0  # tokens before the patches (the class token)
        # global_pool="avg" puts timm's final LayerNorm in `fc_norm` (never applied here) and makes `norm` an Identity;
        # fc_norm=False puts it back in `norm`, the place `final_norm` applies (published weights' `norm.*`)
        self.vit = timm.create_model(
            "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=cfg.img_size, patch_size=cfg.patch_size,
            in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            class_token=cfg.class_token, pos_embed="none", global_pool="avg", fc_norm=False if cfg.final_norm else None,
        )
        table = sincos_2d(patch_centres(cfg.grid_size), cfg.embed_dim, cfg.grid_size)[None]
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", table, persistent=False)
            return
        if cfg.class_token:  # the class token's position: zero until weights say otherwise
            table = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:  # "fixed": saved with the weights, never trained
            self.register_buffer("pos_embed", table, persistent=True)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.0, return_layers: tuple[int, ...] = ()) -> ImageTokens:
        """Encode ``images`` (B, C, H, W); hide ``mask_ratio`` of the patches at random (per sample)."""
        p = self.prefix
        x = self.vit.patch_embed(images) + (self.pos_embed[:, p:] if p else self.pos_embed)
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
        if p:  # the class token joins after masking: it is never hidden
            x = torch.cat([(self.vit.cls_token + self.pos_embed[:, :p]).expand(b, -1, -1), x], dim=1)
        x = self.vit.norm_pre(x)
        layers = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in return_layers:
                layers.append(x[:, p:] if p else x)
        x = self.vit.norm(x)
        return ImageTokens(tokens=x[:, p:] if p else x, keep=keep, mask=mask, layers=layers)


def resample_pos_embed(table: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """A position table ``(1, prefix + g*g, D)`` resampled to ``grid x grid`` patches (bicubic, timm's
    ``resample_abs_pos_embed``); the ``prefix`` rows (class token) are kept as they are.

    Why: a table learnt at one tile size fits another only through its 2-D layout (the same ground position, new
    pixel grid); the formula table (``sincos``) needs nothing of this, it is computed for every size.

    Example:
        >>> resample_pos_embed(torch.zeros(1, 1 + 16, 8), grid=2, prefix=1).shape
        torch.Size([1, 5, 8])
    """
    from timm.layers import resample_abs_pos_embed

    old = round((table.shape[1] - prefix) ** 0.5)
    if old * old != table.shape[1] - prefix:
        raise ValueError(f"position table of {table.shape[1] - prefix} patches is not a square grid")
    if old == grid:
        return table
    return resample_abs_pos_embed(table, new_size=[grid, grid], old_size=[old, old], num_prefix_tokens=prefix)
