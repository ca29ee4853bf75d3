"""Learning-rate schedule shared by the Ray Train loop and the experiment harness."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


# the parts of GeoLink that pretraining trains and fine-tuning reuses (the decoder and the OSM grid projection are new)
BACKBONE = ("image_encoder.", "osm_encoder.", "fusion.")


def param_groups(model, backbone_lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups: the pretrained backbone learns at ``backbone_lr_scale`` times the base rate (a
    fine-tuning with few labels should adjust, not overwrite, what pretraining taught), the new heads at the base
    rate. Each group carries its ``lr_scale`` for :func:`lr_at`'s caller to apply."""
    backbone, heads = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.removeprefix("module.").startswith(BACKBONE) else heads).append(p)
    return [g for g in ({"params": backbone, "lr_scale": backbone_lr_scale}, {"params": heads, "lr_scale": 1.0}) if g["params"]]
