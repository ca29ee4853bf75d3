"""Blend overlapping tile predictions into the city's pixel grid, one strip of tile rows at a time.

Geometry (see :mod:`engine.tiles.grid`): stride = tile - overlap, halo = overlap / 2, tile (r, c) owns the core
rows ``[r*stride, (r+1)*stride)`` and sees the window rows ``[r*stride - halo, (r+1)*stride + halo)``.
A strip is ``block_rows`` grid rows ``[R0, R1)``; it emits the pixel rows ``[R0*stride - halo, R1*stride - halo)``
(the first strip from 0, the last to the raster's height). Only grid rows ``R0 - 1 .. R1 - 1`` reach those rows
(halo < stride), so the tiles of the previous strip's last grid row are kept and added again, clipped: every tile
pixel is added exactly once, memory holds one strip.

Weights: each window pixel gets ``w(y) * w(x)``, a ramp over the overlap from each window edge
(linear ``(d + 0.5) / overlap`` or cosine ``sin^2(pi/2 * (d + 0.5) / overlap)``, d = distance to the edge), so two
neighbours' weights sum to one across their overlap, never reach 0, and the blend is normalised by the weight sum.
Pixels no tile covers have weight sum 0: nodata.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

RAMPS = ("linear", "cosine")


def ramp_weights(size_px: int, overlap_px: int, ramp: str = "linear") -> np.ndarray:
    """Weights along one window side (float32, ``size_px``), rising over ``overlap_px`` from each edge.

    Example:
        >>> ramp_weights(8, 4).tolist()
        [0.125, 0.375, 0.625, 0.875, 0.875, 0.625, 0.375, 0.125]
        >>> float(ramp_weights(8, 4)[3] + ramp_weights(8, 4)[0])  # a neighbour's ramp mirrors it: sums to 1
        1.0
    """
    if ramp not in RAMPS:
        raise ValueError(f"ramp={ramp!r}: use one of {RAMPS}")
    if overlap_px <= 0:
        return np.ones(size_px, np.float32)
    d = np.minimum(np.arange(size_px), np.arange(size_px)[::-1]).astype(np.float64)
    t = np.minimum((d + 0.5) / overlap_px, 1.0)
    w = t if ramp == "linear" else np.sin(np.pi / 2 * t) ** 2
    return w.astype(np.float32)


@dataclass(frozen=True)
class GridShape:
    """What the blender needs of a city's grid: raster size, stride and halo in pixels, grid rows."""

    height_px: int
    width_px: int
    tile_size_px: int
    overlap_px: int

    @property
    def stride_px(self) -> int:
        return self.tile_size_px - self.overlap_px

    @property
    def halo_px(self) -> int:
        return self.overlap_px // 2

    @property
    def n_grid_rows(self) -> int:
        return -(-self.height_px // self.stride_px)


@dataclass(frozen=True)
class Tile:
    """One tile's prediction and where its window lies (pixel offsets in the city grid; may leave the raster)."""

    tile_id: str
    grid_row: int
    row_off: int
    col_off: int
    probs: np.ndarray  # uint8 (K, h, w), round(p * 255)


@dataclass
class Strip:
    """Blended pixel rows ``[row_off, row_off + height)`` at full raster width.

    ``acc`` holds the weighted sums of ``p * 255`` per class (K, h, W); ``weight`` the weight sums (h, W); so
    ``acc / weight / 255`` is the blended probability where ``weight > 0``.
    """

    row_off: int
    acc: np.ndarray
    weight: np.ndarray
    tiles: int  # tiles that reached it

    @property
    def height(self) -> int:
        return self.weight.shape[0]

    @property
    def covered(self) -> np.ndarray:
        return self.weight > 0

    def class_index(self) -> np.ndarray:
        """Argmax class per pixel as uint8 (ties: lowest index); the weight sum does not change the argmax.

        One comparison pass per class instead of ``np.argmax(axis=0)``, which copies the strip to reduce over its
        first axis (several times slower here, and the binary case is a single comparison).
        """
        best = self.acc[0].copy()
        index = np.zeros(best.shape, np.uint8)
        for k in range(1, self.acc.shape[0]):
            higher = self.acc[k] > best
            index[higher] = k
            np.maximum(best, self.acc[k], out=best)
        return index

    def prob(self, k: int) -> np.ndarray:
        """Blended probability of class ``k`` in [0, 1] (0 where uncovered)."""
        return np.divide(self.acc[k], self.weight * 255.0, out=np.zeros_like(self.weight), where=self.weight > 0)


def strip_bounds(grid: GridShape, block_rows: int) -> list[tuple[int, int, int, int]]:
    """``(R0, R1, y0, y1)`` per strip: grid rows ``[R0, R1)`` and the pixel rows ``[y0, y1)`` it emits.

    Example:
        >>> strip_bounds(GridShape(500, 300, 64, 16), 4)  # stride 48, halo 8, 11 grid rows
        [(0, 4, 0, 184), (4, 8, 184, 376), (8, 11, 376, 500)]
    """
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: need at least 1")
    out = []
    n = grid.n_grid_rows
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        y0 = 0 if r0 == 0 else r0 * grid.stride_px - grid.halo_px
        y1 = grid.height_px if r1 == n else min(r1 * grid.stride_px - grid.halo_px, grid.height_px)
        out.append((r0, r1, y0, y1))
    return out


def blend_strips(tiles: Iterable[Tile], grid: GridShape, n_classes: int, block_rows: int = 4, ramp: str = "linear") -> Iterator[Strip]:
    """Blend ``tiles`` (sorted by grid row, then column: the accumulation order, so results are reproducible)
    into strips covering the raster top to bottom.

    Raises:
        ValueError: a tile arrives out of grid-row order, or its prediction does not have the window's size.
    """
    size, overlap = grid.tile_size_px, grid.overlap_px
    weight_2d = np.outer(ramp_weights(size, overlap, ramp), ramp_weights(size, overlap, ramp))
    stream = iter(tiles)
    pending: Tile | None = next(stream, None)
    carry: list[Tile] = []  # the previous strip's last grid row: its windows reach into this strip
    last_row = -1
    for r0, r1, y0, y1 in strip_bounds(grid, block_rows):
        acc = np.zeros((n_classes, y1 - y0, grid.width_px), np.float32)
        weight = np.zeros((y1 - y0, grid.width_px), np.float32)
        row_tiles: list[Tile] = []
        n = 0
        for tile in carry:
            n += _add(tile, acc, weight, weight_2d, y0, y1)
        while pending is not None and pending.grid_row < r1:
            tile = pending
            if tile.grid_row < last_row:
                raise ValueError(f"tile {tile.tile_id} arrived after grid row {last_row}: tiles must be sorted by grid row")
            last_row = tile.grid_row
            if tile.probs.shape != (n_classes, size, size):
                raise ValueError(f"tile {tile.tile_id}: prediction shape {tile.probs.shape}, expected {(n_classes, size, size)}")
            n += _add(tile, acc, weight, weight_2d, y0, y1)
            if tile.grid_row == r1 - 1:
                row_tiles.append(tile)
            pending = next(stream, None)
        carry = row_tiles
        yield Strip(y0, acc, weight, n)
    if pending is not None:
        raise ValueError(f"tile {pending.tile_id} lies in grid row {pending.grid_row}, beyond the raster's {grid.n_grid_rows} rows")


def _add(tile: Tile, acc: np.ndarray, weight: np.ndarray, weight_2d: np.ndarray, y0: int, y1: int) -> int:
    """Add the part of ``tile``'s window inside rows ``[y0, y1)`` and the raster's columns; 1 if any pixel landed."""
    h, w = tile.probs.shape[1:]
    top, bottom = max(tile.row_off, y0), min(tile.row_off + h, y1)
    left, right = max(tile.col_off, 0), min(tile.col_off + w, acc.shape[2])
    if top >= bottom or left >= right:
        return 0
    ty, tx = slice(top - tile.row_off, bottom - tile.row_off), slice(left - tile.col_off, right - tile.col_off)
    wt = weight_2d[ty, tx]
    acc[:, top - y0:bottom - y0, left:right] += tile.probs[:, ty, tx] * wt
    weight[top - y0:bottom - y0, left:right] += wt
    return 1
