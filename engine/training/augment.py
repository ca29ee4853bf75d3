"""Training augmentation on normalised image batches (torch, on the training device).

Why: every city has its own sensor and atmosphere (colour balance, haze, blur, noise) and pixel size; without
these variations in training, the image branch learns its training cities' look and does not carry over to other
cities (docs/EXPERIMENTS.md). :func:`photometric` leaves geometry alone; :func:`zoom` moves the labels and the OSM
node positions with the pixels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from engine.pixels import IGNORE, MEAN, STD


# The ranges of :func:`photometric` at strength 1: what another sensor, season and sky may do to a scene. A new
# vintage's look must fall inside them (tests/test_change_robustness.py checks the generator's later sensor against
# these numbers), so the model has seen such differences in training and a change map does not paint them as change.
GAIN_RANGE = (0.75, 1.25)  # per band
OFFSET_MAX = 0.1  # of full scale (25.5 DN), every band alike
CROSSTALK_MAX = 0.08  # off-diagonal weight of the band mixing (spectral response); rows sum to 1
HAZE_MAX = 0.4
BLUR_SIGMA_MAX = 1.5  # pixels
NOISE_MAX = 0.03  # of full scale (7.65 DN)


def photometric(images: torch.Tensor, generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Random per-sample band mixing, colour gains and offset, haze, Gaussian blur and sensor noise; same shape
    and scale (ranges: the module's constants).

    Example:
        >>> photometric(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    b, c = images.shape[:2]
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    u = images * STD + MEAN
    if c > 1:  # another sensor's spectral response: each band takes a little of the others (rows sum to 1)
        mix = strength * CROSSTALK_MAX * rand(b, c, c) / (c - 1)
        mix = mix * (1 - torch.eye(c, device=dev))
        mix = mix + torch.diag_embed(1 - mix.sum(dim=2))
        u = torch.einsum("bij,bjhw->bihw", mix.to(u.dtype), u)
    lo, hi = GAIN_RANGE
    gains = 1.0 + strength * (rand(b, c, 1, 1) * (hi - lo) + lo - 1.0)
    offset = strength * (rand(b, 1, 1, 1) - 0.5) * 2 * OFFSET_MAX
    u = u * gains + offset
    haze = strength * HAZE_MAX * rand(b, 1, 1, 1) ** 2
    u = u * (1 - haze) + haze * 0.78
    sigma = strength * BLUR_SIGMA_MAX * rand(b)
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
    u = u + strength * NOISE_MAX * rand(b, 1, 1, 1) * torch.randn(u.shape, generator=noise_gen, device=dev, dtype=u.dtype)
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


# tile-relative geometry columns (``geolink_model.osm_graph.GEOM_FEATURES``) and how a zoom moves or scales them
_X_COLUMNS = ("x", "cx", "x0", "x1", "xmin", "xmax")
_Y_COLUMNS = ("y", "cy", "y0", "y1", "ymin", "ymax")
_LENGTH_COLUMNS = ("length", "perimeter")  # in units of the tile's side
_AREA_COLUMNS = ("area",)  # in units of the tile's area


def zoom(images: torch.Tensor, labels: torch.Tensor | None = None, graphs=None, max_zoom: float = 1.5,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """Random per-sample zoom (scale in ``[1/max_zoom, max_zoom]``, log-uniform) and shift, applied alike to the
    image, its labels and its OSM graph. Returns ``(images, labels, graphs)``; inputs are not modified.

    Why: cities are imaged at 0.5-1.2 m pixels, so the same village texture is 2.4x larger in one city than in
    another; an image branch trained at its training cities' scales does not recognise the others'. Zooming in
    crops a part of the tile and enlarges it; zooming out shrinks the tile into the frame and leaves the rest as
    no data (image 0 = the mean colour, labels :data:`~engine.pixels.IGNORE`), as at an AOI's edge.
    The OSM node positions and their tile-relative lengths and areas follow the same transform, so the fused
    model still sees each node where its pixels are (nodes zoomed out of the frame stay, outside [0, 1]).

    Example:
        >>> imgs, labs, _ = zoom(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), max_zoom=2.0)
        >>> imgs.shape, labs.shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 8, 8]))
    """
    if max_zoom < 1:
        raise ValueError(f"max_zoom must be >= 1, got {max_zoom}")
    b, dev = images.shape[0], images.device
    if max_zoom == 1 or b == 0:
        return images, labels, graphs
    u = torch.rand(b, 3, generator=generator, device="cpu", dtype=torch.float64)
    extent = torch.exp((1 - 2 * u[:, 0]) * math.log(max_zoom))  # share of the tile's side in view: < 1 zooms in
    low, high = torch.clamp(1 - extent, max=0.0), torch.clamp(1 - extent, min=0.0)
    origin = low[:, None] + u[:, 1:] * (high - low)[:, None]  # (b, 2): the view's top-left corner, tile units
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = extent
    theta[:, :, 2] = 2 * origin + extent[:, None] - 1  # [-1, 1] coordinates (align_corners=False)
    grid = F.affine_grid(theta.to(dev, images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is not None:
        shifted = (labels.to(images.dtype) + 1)[:, None]  # 0 = no data after zero padding
        sampled = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].round().long()
        labels = torch.where(sampled == 0, torch.full_like(sampled, IGNORE), sampled - 1)
    if graphs is not None:
        graphs = _zoom_graphs(graphs, origin.float().to(dev), extent.float().to(dev))
    return images, labels, graphs


@functools.cache
def _zoom_columns(node_type: str) -> dict[str, list[int]]:
    """Indices of the x, y, length and area columns among a node type's geometry features (fixed per type)."""
    from geolink_model.osm_graph import GEOM_FEATURES

    names = GEOM_FEATURES[node_type]
    return {kind: [i for i, n in enumerate(names) if n in group] for kind, group in
            (("x", _X_COLUMNS), ("y", _Y_COLUMNS), ("length", _LENGTH_COLUMNS), ("area", _AREA_COLUMNS))}


def _zoom_graphs(graphs, origin: torch.Tensor, extent: torch.Tensor):
    from geolink_model.osm_graph import NODE_TYPES

    graphs = graphs.clone()
    for t in NODE_TYPES:
        x = graphs[t].x
        if x.shape[0] == 0:
            continue
        sample = graphs[t].batch
        o, e = origin[sample], extent[sample, None]
        cols = _zoom_columns(t)
        x = x.clone()
        x[:, cols["x"]] = (x[:, cols["x"]] - o[:, :1]) / e
        x[:, cols["y"]] = (x[:, cols["y"]] - o[:, 1:]) / e
        x[:, cols["length"]] = x[:, cols["length"]] / e
        x[:, cols["area"]] = x[:, cols["area"]] / e**2
        graphs[t].x = x
    return graphs
