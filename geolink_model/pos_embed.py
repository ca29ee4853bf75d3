"""Fixed 2-D sin-cos position embeddings, one function for image patches and for OSM nodes.

Patches and nodes share the formula, so a node at the centre of patch (r, c) gets exactly that patch's embedding:
this is what lets the cross-modal attention follow where each OSM feature lies on the image.
"""

from __future__ import annotations

import torch


def sincos_2d(pos: torch.Tensor, dim: int, grid: int, temperature: float = 10000.0) -> torch.Tensor:
    """Embed positions ``pos[..., (x, y)]`` in [0, 1] of the tile (x right, y down) into ``dim`` channels.

    Positions are scaled to patch units (``pos * grid - 0.5``, so patch centres fall on integers); channels are
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``w = temperature ** -(k / (dim / 4))``.

    Example:
        >>> sincos_2d(torch.tensor([[0.5, 0.5]]), 8, grid=4).shape
        torch.Size([1, 8])
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4")
    quarter = dim // 4
    omega = temperature ** -(torch.arange(quarter, dtype=torch.float32, device=pos.device) / quarter)
    coords = pos.float() * grid - 0.5
    x = coords[..., 0:1] * omega
    y = coords[..., 1:2] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)


def patch_centres(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``(grid*grid, 2)`` normalised centres of the patches, row-major (x right, y down)."""
    idx = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) / grid
    yy, xx = torch.meshgrid(idx, idx, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
