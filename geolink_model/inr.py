"""GAIR's implicit neural representation (INR) lookup: the embedding at any point of a tile from its patch grid.

Points are in tile coordinates ``(x, y)`` in [0, 1] (x right, y down), the convention of
:func:`~geolink_model.pos_embed.patch_centres` and of the OSM node positions; patch ``(r, c)`` of a ``g x g`` grid
has its centre at ``((c + 0.5) / g, (r + 0.5) / g)``. For pixel coordinates ``(col, row)`` of an ``S``-pixel tile,
pass ``(col + 0.5) / S, (row + 0.5) / S``.

The lookup (LIIF's local ensemble): the four patch centres around the point, each giving
``feature + |offset| * mlp(feature, offset)`` (offset from that centre to the point, in patches), weighted by the
bilinear ("opposite area") weights and summed. At a patch centre the weights are (1, 0, 0, 0) and the one weighted
term has offset 0, so the lookup returns exactly that patch's embedding; between centres it is continuous.
Edges: points are clamped into the tile and the neighbours into the grid, so beyond the outermost centres the
nearest edge patches answer (without the MLP: the edge patch itself).

What trains the MLP (``GeoLinkConfig.inr``, loss ``inr`` in pretraining, :func:`inr_loss`): the image encoder is
run (no gradient) on the tile and on the tile shifted by a random sub-patch amount; the lookup from the first
run's grid, at the centres of the second run's patches, is asked to give the second run's tokens. So the INR learns
"the encoder's token for a patch-sized window centred here" for the image encoder's final tokens (plus the location
bias of a ``with_location`` model: what ``GeoLink.encode(..., mode="image")`` returns). Only the MLP learns; both token grids are detached, so the encoder cannot make
its tokens easy to interpolate by making them alike. The MLP's last layer starts at zero: untrained, the lookup is
plain bilinear interpolation of the patch tokens. For other token grids (a ViT block's, the fused tokens) pass
``inr=None``: bilinear, exact at the centres too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InrLookup(nn.Module):
    """The INR's MLP: ``(feature, offset)`` -> a correction of ``feature`` (scaled by ``|offset|`` in :func:`lookup`).

    Example:
        >>> inr = InrLookup(8)
        >>> inr(torch.randn(2, 16, 8), torch.rand(2, 5, 2)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(dim + 2, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)  # untrained = bilinear interpolation
        nn.init.zeros_(self.mlp[-1].bias)

    def correction(self, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``|offset| * mlp(cat(feature, offset))``: 0 at zero offset, so the lookup is exact at patch centres."""
        offsets = offsets.to(features.dtype)
        return self.mlp(torch.cat([features, offsets], dim=-1)) * offsets.norm(dim=-1, keepdim=True)

    def forward(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return lookup(tokens, points, self)


def lookup(tokens: torch.Tensor, points: torch.Tensor, inr: InrLookup | None = None) -> torch.Tensor:
    """The embedding at ``points`` of each tile, from its patch tokens.

    Args:
        tokens: ``(B, N, D)`` patch tokens in row-major order (``N = g * g``), or a ``(B, D, g, g)`` map.
        points: ``(B, P, 2)`` points ``(x, y)`` in tile coordinates [0, 1] (x right, y down); outside is clamped.
        inr: the trained MLP (``model.inr`` of a model built with ``inr=True``), or None for bilinear interpolation.

    Returns:
        ``(B, P, D)`` embeddings, in the tokens' dtype; at a patch centre exactly that patch's token.

    Example:
        >>> grid = torch.arange(4.0).reshape(1, 4, 1)  # a 2 x 2 grid, one channel
        >>> lookup(grid, torch.tensor([[[0.25, 0.25], [0.5, 0.25], [0.5, 0.5]]]))[..., 0]
        tensor([[0.0000, 0.5000, 1.5000]])
    """
    if tokens.dim() == 4:
        tokens = tokens.flatten(2).transpose(1, 2)
    b, n, d = tokens.shape
    g = round(n**0.5)
    if g * g != n:
        raise ValueError(f"lookup needs a square patch grid; got {n} tokens")
    if points.dim() != 3 or points.shape[0] != b or points.shape[-1] != 2:
        raise ValueError(f"points must be (B={b}, P, 2); got {tuple(points.shape)}")
    index, weights, offsets = neighbours(points, g)  # (B, P, 4), (B, P, 4), (B, P, 4, 2)
    p = points.shape[1]
    feats = tokens.gather(1, index.reshape(b, p * 4, 1).expand(-1, -1, d)).reshape(b, p, 4, d)
    if inr is not None:
        feats = feats + inr.correction(feats, offsets)
    return (feats * weights[..., None].to(feats.dtype)).sum(dim=2)


def neighbours(points: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four patch centres around each point of a ``g x g`` grid: flat row-major indices ``(B, P, 4)``, bilinear
    weights ``(B, P, 4)`` (summing to 1) and offsets point - centre in patches ``(B, P, 4, 2)``.

    In patch units ``u = x * g - 0.5`` the centres sit on integers; the corners are ``floor(u)`` and ``floor(u) + 1``
    on each axis, clamped into the grid (beyond the outermost centres both corners are the edge patch).
    """
    u = points.float().clamp(0.0, 1.0) * g - 0.5  # (B, P, 2): x, y in patch units
    lo = u.floor()
    t = u - lo  # in [0, 1): the share of the way to the next centre
    corners = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=u.device, dtype=u.dtype)  # (dx, dy) per corner
    cell = (lo[..., None, :] + corners).clamp(0, g - 1)  # (B, P, 4, 2)
    tw = torch.where(corners.bool(), t[..., None, :], 1.0 - t[..., None, :])  # per axis: t toward the +1 corner, 1 - t toward the other
    weights = tw[..., 0] * tw[..., 1]
    index = (cell[..., 1] * g + cell[..., 0]).long()
    return index, weights, u[..., None, :] - cell


def inr_loss(encoder: nn.Module, inr: InrLookup, images: torch.Tensor, patch: int,
             generator: torch.Generator | None = None, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The INR's training loss: predict the encoder's tokens of the tile shifted by a random sub-patch amount.

    ``bias`` (``(B, 1, D)`` or 0) is added to both token grids, as the image-mode forward adds the location bias
    (:meth:`GeoLink.location_bias`), so the INR learns on the tokens ``GeoLink.encode(..., "image")`` returns.

    One shift ``(sx, sy)`` pixels per batch, drawn from ``[0, patch)^2`` minus ``(0, 0)``. The shifted image is the
    tile moved up-left by it (the strip uncovered on the right and bottom is 0, the mean colour); its patches not
    touching that strip (the first ``g - 1`` rows and columns) have their centres at
    ``((c + 0.5) * patch + sx) / S`` of the original tile. The loss is the squared error relative to the targets'
    mean squared norm, so its size does not depend on the tokens' scale (1 = predicting zeros).
    """
    b, _, size, _ = images.shape
    g = size // patch
    k = int(torch.randint(1, patch * patch, (1,), generator=generator, device=generator.device if generator else "cpu").item())
    sx, sy = k % patch, k // patch
    with torch.no_grad():
        bias = bias.detach() if isinstance(bias, torch.Tensor) else bias
        base = encoder(images).tokens + bias
        shifted = F.pad(images[..., sy:, sx:], (0, sx, 0, sy))
        target = (encoder(shifted).tokens + bias).reshape(b, g, g, -1)[:, : g - 1, : g - 1].reshape(b, (g - 1) ** 2, -1)
    idx = torch.arange(g - 1, device=images.device, dtype=torch.float32)
    yy, xx = torch.meshgrid((idx * patch + patch / 2 + sy) / size, (idx * patch + patch / 2 + sx) / size, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1).expand(b, -1, -1)
    pred, target = lookup(base.detach(), points, inr).float(), target.float()
    return ((pred - target) ** 2).sum(dim=-1).mean() / (target**2).sum(dim=-1).mean().clamp(min=1e-12)
