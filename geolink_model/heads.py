"""Heads: the MAE pixel decoder, the graph read-out for contrastive learning, and the segmentation decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch_geometric.nn import global_mean_pool
from torch_geometric.utils import to_dense_batch

from geolink_model.config import GeoLinkConfig
from geolink_model.osm_graph import NODE_TYPES
from geolink_model.pos_embed import patch_centres, sincos_2d


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches row-major."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaeDecoder(nn.Module):
    """Light transformer that fills hidden patches with a mask token and predicts their pixels (MAE)."""

    def __init__(self, cfg: GeoLinkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.blocks = nn.Sequential(*[Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, cfg.patch_size**2 * cfg.in_chans)
        self.register_buffer("pos_embed", sincos_2d(patch_centres(cfg.grid_size), cfg.decoder_dim, cfg.grid_size)[None], persistent=False)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, _, _ = visible.shape
        n = self.cfg.num_patches
        embedded = self.embed(visible)
        x = self.mask_token.to(embedded.dtype).expand(b, n, -1).clone()  # autocast: match the embedding's dtype
        x.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), embedded)
        x = self.blocks(x + self.pos_embed)
        return self.pred(self.norm(x))


def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """MSE on per-patch normalised pixels, hidden patches only (MAE's ``norm_pix_loss``)."""
    target = patchify(images, patch)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class GraphReadout(nn.Module):
    """Type-attention read-out: mean-pool each node type, then weigh the types by learned attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, data, node_x: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, dim)`` graph vectors and a (B,) bool saying which samples have any node."""
        pooled, present = [], []
        for t in NODE_TYPES:
            batch = data[t].batch
            pooled.append(global_mean_pool(node_x[t], batch, size=batch_size))
            present.append(torch.bincount(batch, minlength=batch_size)[:batch_size] > 0)
        h = torch.stack(pooled, dim=1)  # (B, 3, dim)
        has = torch.stack(present, dim=1)  # (B, 3)
        scores = self.score(h).squeeze(-1).masked_fill(~has, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # samples with no node: all weights 0
        return (weights[..., None] * h).sum(dim=1), has.any(dim=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``a`` and ``b`` over the ``valid`` samples (0 if fewer than 2)."""
    if int(valid.sum()) < 2:
        return (a.sum() + b.sum()) * 0.0
    a = F.normalize(a[valid], dim=-1)
    b = F.normalize(b[valid], dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class SegmentationDecoder(nn.Module):
    """Multi-level ViT features -> per-pixel logits: project each level, merge, upsample x2 twice, classify,
    then resize to the tile (an FPN-lite / progressive-upsampling decoder)."""

    def __init__(self, cfg: GeoLinkConfig, n_levels: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.seg_dim
        self.lateral = nn.ModuleList(nn.Conv2d(cfg.embed_dim, d, 1) for _ in range(n_levels))
        self.merge = nn.Sequential(nn.Conv2d(d * n_levels, d, 3, padding=1), nn.BatchNorm2d(d), nn.GELU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(d, d, 2, stride=2), nn.BatchNorm2d(d), nn.GELU(),
            nn.ConvTranspose2d(d, d, 2, stride=2), nn.BatchNorm2d(d), nn.GELU(),
        )
        self.classify = nn.Conv2d(d, cfg.num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        g = self.cfg.grid_size
        maps = [lat(x.transpose(1, 2).reshape(x.shape[0], -1, g, g)) for lat, x in zip(self.lateral, levels)]
        x = self.up(self.merge(torch.cat(maps, dim=1)))
        return F.interpolate(self.classify(x), size=(self.cfg.img_size, self.cfg.img_size), mode="bilinear", align_corners=False)


def splat_nodes(data, node_x: dict[str, torch.Tensor], batch_size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise node embeddings to the patch grid: each node covers the patches of its bounding box (points one
    patch); a patch's value is the mean of the nodes covering it. Returns ``(B, grid*grid, D)`` and coverage counts.

    Vectorised: one coverage matrix per type (nodes x patches), batched with ``to_dense_batch`` and one ``bmm``.
    """
    centres = patch_centres(grid, device=next(iter(node_x.values())).device)  # (N, 2)
    half = 0.5 / grid
    d = next(iter(node_x.values())).shape[-1]
    total = centres.new_zeros(batch_size, grid * grid, d)
    count = centres.new_zeros(batch_size, grid * grid)
    for t in NODE_TYPES:
        x, feats = node_x[t], data[t].x
        if x.shape[0] == 0:
            continue
        if t == "point":
            lo, hi = feats[:, :2], feats[:, :2]
        elif t == "line":
            ends = feats[:, 2:6].reshape(-1, 2, 2)
            lo, hi = ends.min(dim=1).values, ends.max(dim=1).values
        else:
            lo, hi = feats[:, 2:4], feats[:, 4:6]
        # a patch is covered when the node's box reaches into it (boxes widened by half a patch: points hit one)
        cover = ((centres[None, :, 0] >= lo[:, None, 0] - half) & (centres[None, :, 0] <= hi[:, None, 0] + half)
                 & (centres[None, :, 1] >= lo[:, None, 1] - half) & (centres[None, :, 1] <= hi[:, None, 1] + half)).float()
        dense_cover, _ = to_dense_batch(cover, data[t].batch, batch_size=batch_size)  # (B, M, N)
        dense_x, _ = to_dense_batch(x, data[t].batch, batch_size=batch_size)  # (B, M, D)
        total = total + dense_cover.transpose(1, 2) @ dense_x
        count = count + dense_cover.sum(dim=1)
    return total / count.clamp(min=1.0)[..., None], count
