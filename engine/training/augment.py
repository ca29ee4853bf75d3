"""Photometric augmentation on normalised image batches (torch, on the training device).

Why: every city has its own sensor and atmosphere (colour balance, haze, blur, noise); without these variations
in training, the image branch learns its training cities' look and does not carry over to other cities
(docs/EXPERIMENTS.md). Geometry is left alone, so labels and OSM node positions stay aligned with the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.training.metrics import MEAN, STD


def photometric(images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Random per-sample colour gains and offset, haze, Gaussian blur and sensor noise; same shape and scale.

    Example:
        >>> photometric(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    b, c = images.shape[:2]
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    u = images * STD + MEAN
    gains = 1.0 + strength * (rand(b, c, 1, 1) - 0.5) * 0.5  # 0.75 .. 1.25 per band
    offset = strength * (rand(b, 1, 1, 1) - 0.5) * 0.2
    u = u * gains + offset
    haze = strength * 0.4 * rand(b, 1, 1, 1) ** 2
    u = u * (1 - haze) + haze * 0.78
    sigma = strength * 1.5 * rand(b)
    radius = 3
    xs = torch.arange(-radius, radius + 1, device=dev, dtype=u.dtype)
    kernels = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3).to(u.dtype) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (b, k): one 1-D Gaussian per sample
    flat = u.reshape(1, b * c, *u.shape[2:])
    kx = kernels.repeat_interleave(c, dim=0)[:, None, None, :]
    ky = kernels.repeat_interleave(c, dim=0)[:, None, :, None]
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kx, groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), ky, groups=b * c)
    u = flat.reshape(u.shape)
    # per-pixel noise is drawn on the device, not on the CPU and copied (4.8M values per batch of 32 tiles);
    # its seed comes from `generator`, so a seeded run stays reproducible
    noise_gen = None
    if generator is not None:
        noise_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    u = u + strength * 0.03 * rand(b, 1, 1, 1) * torch.randn(u.shape, generator=noise_gen, device=dev, dtype=u.dtype)
    return (u.clamp(0, 1) - MEAN) / STD


def drop_images(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blank the image of a random ``p`` share of the samples (to the mean colour, 0 after normalisation).

    Why: at inference a tile's imagery can be useless (cloud, haze, a sensor the training cities never had), and a
    fused model that always sees a good image learns to lean on its training cities' look. Trained with some
    images blanked (modality dropout), the fused model must also read the OSM tokens it is given.

    Example:
        >>> drop_images(torch.ones(4, 3, 2, 2), 1.0).abs().sum().item()
        0.0
    """
    if p <= 0:
        return images
    keep = torch.rand(images.shape[0], generator=generator, device="cpu").to(images.device) >= p
    return images * keep[:, None, None, None].to(images.dtype)
