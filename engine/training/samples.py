"""Training samples from prepared tiles: tile-index + graph rows, pixels by window, labels from reference polygons.

Pure functions (no Ray): the Ray Data pipeline in :mod:`engine.pipelines.train` maps them over the tiles.
Pixels are read from the GeoTIFF window of each tile (halo included, boundless), never whole rasters.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import rasterio
import torch
from pyproj import CRS
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from engine import storage
from engine.schema import LABEL_SETS
from engine.tiles.graph_store import row_to_graph
from engine.tiles.parts import join_graphs, load_part, part_pairs  # noqa: F401  (re-exported: training reads parts too)
from engine.training.metrics import IGNORE, MEAN, STD
from engine.tiles.grid import read_window
from geolink_model import batch_graphs



@functools.lru_cache(maxsize=8)
def _reference(path: str, crs_text: str):
    import geopandas as gpd

    ref = gpd.read_parquet(storage.local_path(path))
    return ref.to_crs(CRS.from_user_input(crs_text)) if ref.crs is not None else ref


def tile_labels(row: dict, reference: str, classes: tuple[str, ...], nodata_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference polygons rasterised to the tile window: class index per pixel, ``IGNORE`` outside the raster/AOI.

    Pixels no reference polygon covers (roads, unlabelled land) are class 0 (``other``).
    """
    with rasterio.open(row["imagery"]) as src:
        window = Window(row["window_col_off"], row["window_row_off"], row["window_width"], row["window_height"])
        transform = window_transform(window, src.transform)
    ref = _reference(reference, row["crs"])
    lookup = {name: i for i, name in enumerate(classes)}
    shapes = [(geom, lookup[c]) for geom, c in zip(ref.geometry, ref["class"]) if c in lookup and lookup[c] > 0]
    shape = (row["window_height"], row["window_width"])
    labels = rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8") if shapes else np.zeros(shape, np.uint8)
    if nodata_mask is not None:
        labels[nodata_mask] = IGNORE
    return labels


def add_pixels(batch: pa.Table, references: dict[str, str] | None = None, classes: tuple[str, ...] = LABEL_SETS["binary"]) -> pa.Table:
    """Ray Data ``map_batches`` step (pyarrow batches, so graph list columns keep their Arrow types): read each
    tile's window (uint8, 3 x H x W) and, with ``references``, its labels, as tensor columns."""
    from ray.data.extensions import ArrowTensorArray

    images, labels = [], []
    keys = ("imagery", "window_col_off", "window_row_off", "window_width", "window_height", "crs", "city")
    for row in batch.select(list(keys)).to_pylist():
        with storage.raster_env(), rasterio.open(row["imagery"]) as src:
            pixels = read_window(src, row)
        images.append(pixels)
        if references is not None:
            nodata = (pixels == 0).all(axis=0)
            labels.append(tile_labels(row, references[row["city"]], classes, nodata))
    batch = batch.append_column("image", ArrowTensorArray.from_numpy(np.stack(images)))
    if references is not None:
        batch = batch.append_column("label", ArrowTensorArray.from_numpy(np.stack(labels)))
    return batch


def collate(batch: pa.Table, device: torch.device | str = "cpu"):
    """A pyarrow batch of samples -> ``(images float (B,3,H,W), graph batch, labels long (B,H,W) or None)``."""
    images = torch.as_tensor(_tensor_column(batch, "image"), device=device).float().div_(255.0).sub_(MEAN).div_(STD)
    graph_keys = [k for k in batch.column_names if k.startswith(("point_", "line_", "polygon_", "edge__")) or k == "tokens_per_node"]
    graphs = batch_graphs([row_to_graph(row) for row in batch.select(graph_keys).to_pylist()]).to(device)
    labels = torch.as_tensor(_tensor_column(batch, "label"), device=device).long() if "label" in batch.column_names else None
    return images, graphs, labels


def _tensor_column(batch: pa.Table, name: str) -> np.ndarray:
    column = batch[name]
    return np.concatenate([chunk.to_numpy() for chunk in column.chunks]) if column.num_chunks != 1 else column.chunk(0).to_numpy()
