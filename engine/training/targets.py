"""Regression targets of tiles: the population (or CO2) inside a tile's window, from a city's truth raster.

A truth raster holds a quantity per cell (residents per 100 m cell: ``population.tif``; t CO2/yr: ``co2.tif``;
engine/synth/truth.py). A tile's target is the quantity inside the window the model sees, each cell counted by
the share of its area inside the window (cells are far larger than tiles' pixels, so whole-cell counting would
give neighbouring tiles the same people twice). Nodata cells count as 0; a window with no valid cell at all is
None (no target, the tile is left out of the regression).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window


def window_bounds(row: dict) -> tuple[float, float, float, float]:
    """A tile's window footprint ``(minx, miny, maxx, maxy)`` in its imagery CRS (the tile index's columns)."""
    return float(row["minx"]), float(row["miny"]), float(row["maxx"]), float(row["maxy"])


def area_weighted_sum(src: rasterio.io.DatasetReader, bounds: tuple[float, float, float, float],
                      crs: CRS | str | None = None) -> float | None:
    """The sum of ``src``'s band 1 over ``bounds`` (in ``crs``, default the raster's), each cell weighted by the
    share of its area inside the box; None when no valid cell meets the box.

    Example:
        >>> import tempfile
        >>> from rasterio.transform import from_origin
        >>> p = tempfile.mkdtemp() + "/pop.tif"
        >>> with rasterio.open(p, "w", driver="GTiff", width=2, height=2, count=1, dtype="float32", crs="EPSG:32650",
        ...                    transform=from_origin(0, 200, 100, 100), nodata=-1) as d:
        ...     d.write(np.array([[[100, 200], [300, 400]]], "float32"))
        >>> with rasterio.open(p) as s:
        ...     area_weighted_sum(s, (50, 50, 150, 150))  # a quarter of each cell
        250.0
    """
    if crs is not None and not CRS.from_user_input(crs).equals(src.crs):
        bounds = transform_bounds(crs, src.crs, *bounds, densify_pts=21)
    minx, miny, maxx, maxy = bounds
    t = src.transform
    c0, c1 = (minx - t.c) / t.a, (maxx - t.c) / t.a
    r0, r1 = (maxy - t.f) / t.e, (miny - t.f) / t.e  # t.e < 0: rows grow southward
    col0, col1 = max(0, math.floor(c0)), min(src.width, math.ceil(c1))
    row0, row1 = max(0, math.floor(r0)), min(src.height, math.ceil(r1))
    if col1 <= col0 or row1 <= row0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = src.read(1, window=Window(col0, row0, col1 - col0, row1 - row0), masked=True).astype(np.float64)
    if values.mask.all():
        return None
    cols, rows = np.arange(col0, col1), np.arange(row0, row1)
    wc = np.clip(np.minimum(cols + 1, c1) - np.maximum(cols, c0), 0, 1)
    wr = np.clip(np.minimum(rows + 1, r1) - np.maximum(rows, r0), 0, 1)
    return float((values.filled(0.0) * wr[:, None] * wc[None, :]).sum())


def tile_targets(rows: list[dict], raster: str) -> list[float | None]:
    """Each tile's target from ``raster`` (one open for all of a city's tiles)."""
    with rasterio.open(raster) as src:
        return [area_weighted_sum(src, window_bounds(r), r.get("crs")) for r in rows]


def add_targets(batch, rasters: dict[str, str]):
    """Ray Data ``map_batches`` step (pyarrow): a ``target`` column (float64) from each city's truth raster; tiles
    without a target (no valid cell under the window) are dropped, so no sample trains on a made-up zero."""
    import pyarrow as pa

    keys = ("city", "minx", "miny", "maxx", "maxy", "crs")
    rows = batch.select(list(keys)).to_pylist()
    values: list[float | None] = [None] * len(rows)
    for city in {r["city"] for r in rows}:
        at = [i for i, r in enumerate(rows) if r["city"] == city]
        for i, v in zip(at, tile_targets([rows[i] for i in at], rasters[city])):
            values[i] = v
    batch = batch.append_column("target", pa.array(values, pa.float64()))
    return batch.filter(pa.array([v is not None for v in values]))
