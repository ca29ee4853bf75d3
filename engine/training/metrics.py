"""Segmentation loss and metrics: pure torch/numpy, shared by training, validation and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.pixels import (
    IGNORE,  # label value for pixels outside the raster or the AOI: no loss, no metric
)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted cross-entropy + soft Dice over the foreground classes (class imbalance: villages are a few %)."""
    ce = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE)
    valid = (labels != IGNORE)[:, None]
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(labels.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))[1:]
    union = (probs + onehot).sum(dim=(0, 2, 3))[1:]
    dice = 1.0 - ((2 * inter + 1.0) / (union + 1.0)).mean()
    return ce + dice


def confusion(logits: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    pred = logits.argmax(dim=1)
    valid = labels != IGNORE
    return torch.bincount(labels[valid] * n + pred[valid], minlength=n * n).reshape(n, n)


def scores(matrix: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """IoU and F1 per class and mIoU from a confusion matrix (rows = truth, columns = prediction)."""
    tp = np.diag(matrix).astype(float)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
    out = {f"iou_{c}": float(np.nan_to_num(v)) for c, v in zip(classes, iou)}
    out.update({f"f1_{c}": float(np.nan_to_num(v)) for c, v in zip(classes, f1)})
    out["miou"] = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    return out
