"""Training samples from prepared tiles: tile-index + graph rows, pixels by window, labels from reference polygons.

Pure functions (no Ray): the Ray Data pipeline in :mod:`engine.pipelines.train` maps them over the tiles.
Pixels are read from the GeoTIFF window of each tile (halo included, boundless), never whole rasters; normalising
them, collating a batch and rasterising labels is :mod:`engine.pixels` (shared with inference).
"""

from __future__ import annotations

import pyarrow as pa
import rasterio

from engine import storage
from engine.pixels import collate, tile_labels, to_tensor_column  # noqa: F401  (collate re-exported: shared with inference, see engine.pixels)
from engine.schema import LABEL_SETS
from engine.tiles.grid import read_window
from engine.tiles.parts import join_graphs, load_part, part_pairs  # noqa: F401  (re-exported: training reads parts too)


def add_pixels(batch: pa.Table, references: dict[str, str] | None = None, classes: tuple[str, ...] = LABEL_SETS["binary"]) -> pa.Table:
    """Ray Data ``map_batches`` step (pyarrow batches, so graph list columns keep their Arrow types): read each
    tile's window (uint8, 3 x H x W) and, with ``references``, its labels, as tensor columns."""
    images, labels = [], []
    keys = ("imagery", "window_col_off", "window_row_off", "window_width", "window_height", "crs", "city")
    for row in batch.select(list(keys)).to_pylist():
        with storage.raster_env(), rasterio.open(row["imagery"]) as src:
            pixels = read_window(src, row)
        images.append(pixels)
        if references is not None:
            nodata = (pixels == 0).all(axis=0)
            labels.append(tile_labels(row, references[row["city"]], classes, nodata))
    batch = batch.append_column("image", to_tensor_column(images))
    if references is not None:
        batch = batch.append_column("label", to_tensor_column(labels))
    return batch
