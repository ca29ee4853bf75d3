"""Tile-level regression (Rose's protocol): population or CO2 of a tile from its image, OSM or fused encodings.

The head reads the tokens the segmentation decoder reads (``GeoLink.encode``), pools them over the tile and maps
them to one value per target. Rose reports MAE, RMSE and R2 on held-out areas; :func:`regression_metrics` gives
the same, in the targets' own units.

Why a log target: tile populations span four orders of magnitude (an empty field, a tower block), so a squared
error on raw counts is decided by the few densest tiles. With ``log_target`` the head predicts ``log1p(y)`` and
the metrics are computed after ``expm1``, in persons (or t CO2), as they are reported.
"""

from __future__ import annotations

import torch
from torch import nn


class RegressionHead(nn.Module):
    """Mean-pooled tokens -> LayerNorm -> MLP -> ``n_targets`` values per tile."""

    def __init__(self, dim: int, n_targets: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(32, dim // 2)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_targets))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, N, D) -> (B, n_targets)."""
        return self.mlp(self.norm(tokens.mean(dim=1)))


def to_model_scale(target: torch.Tensor, log_target: bool, scale: float = 1.0) -> torch.Tensor:
    """What the head is trained to output: ``log1p(y)``, or ``y / scale`` (a fixed scale keeps raw counts near 1)."""
    return torch.log1p(target.clamp_min(0)) if log_target else target / scale


def from_model_scale(pred: torch.Tensor, log_target: bool, scale: float = 1.0) -> torch.Tensor:
    """The head's output back in the target's units (never negative: counts and emissions are not)."""
    return torch.expm1(pred).clamp_min(0) if log_target else (pred * scale).clamp_min(0)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, log_target: bool, scale: float = 1.0) -> torch.Tensor:
    """Mean squared error on the model's scale; ``pred`` (B, 1) or (B,), ``target`` (B,) in the target's units."""
    return nn.functional.mse_loss(pred.reshape(-1).float(), to_model_scale(target.reshape(-1).float(), log_target, scale))


def regression_sums(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sufficient statistics of MAE, RMSE and R2 over a batch, in the target's units, so workers can add them
    (``all_reduce``) before :func:`regression_metrics`: ``[n, sum|e|, sum e^2, sum y, sum y^2]``."""
    pred, target = pred.reshape(-1).double(), target.reshape(-1).double()
    err = pred - target
    return torch.stack([torch.tensor(float(target.numel()), dtype=torch.float64, device=target.device), err.abs().sum(),
                        (err**2).sum(), target.sum(), (target**2).sum()])


def regression_metrics(sums: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE and R2 from :func:`regression_sums` (R2 = 1 - SSE / SST; NaN when the targets do not vary).

    Example:
        >>> y = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> m = regression_metrics(regression_sums(y + torch.tensor([0.5, -0.5, 0.5, -0.5]), y))
        >>> round(m["mae"], 3), round(m["rmse"], 3), round(m["r2"], 3)
        (0.5, 0.5, 0.8)
    """
    n, abs_err, sq_err, s, s2 = (float(v) for v in sums)
    if n == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "n": 0}
    sst = s2 - s * s / n
    return {"mae": abs_err / n, "rmse": (sq_err / n) ** 0.5, "r2": 1.0 - sq_err / sst if sst > 0 else float("nan"), "n": int(n)}
