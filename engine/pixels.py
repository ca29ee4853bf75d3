"""A tile's pixels as the model sees them, shared by training and inference (neither imports the other for it).

- :data:`MEAN`, :data:`STD`: the pixel normalisation after scaling uint8 to ``[0, 1]`` (every bundle so far was
  trained with it; :attr:`engine.model_bundle.ModelBundle.normalisation` says which one a bundle wants).
- :func:`normalise`: uint8 pixels -> normalised float tensor; :func:`collate`: a pyarrow batch of samples
  (``image`` tensor column + graph columns, optional ``label``) -> model inputs; :func:`tile_lonlat`: each tile's
  centre in degrees, the input of a model built ``with_location``.
- :func:`tile_labels`: reference polygons rasterised to a tile window (training labels, and the reference
  "model" of ``map --model reference``); :data:`IGNORE`: the label of pixels outside the raster or the AOI.

torch, rasterio and the graph code are imported inside the functions, so importing this module (for the
constants) costs nothing: Ray Data read tasks and the driver's checks stay free of torch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine import storage
from engine.schema import label_lookup

if TYPE_CHECKING:
    import torch

IGNORE = 255  # label value for pixels outside the raster or the AOI: no loss, no metric
MEAN, STD = 0.45, 0.25  # pixel normalisation after scaling to [0, 1], for training and inference alike
NORMALISATION: tuple[tuple[float, ...], tuple[float, ...]] = ((MEAN,), (STD,))  # (mean, std): one value = every band


def to_tensor_column(arrays: list[np.ndarray]) -> pa.Array:
    """Same-shape arrays as one Arrow tensor column, the form image and label columns travel in between stages.

    Why Ray Data's type (``ArrowTensorArray``): the pipelines hand these batches to Ray Data, which turns the column
    back into one ndarray per batch without a copy; Arrow's own fixed-shape tensor type is not what its batches
    hold. Only the type is imported (no scheduling, no cluster): the one use of Ray outside ``engine/pipelines/``.
    """
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.stack(arrays))


def normalise(images: torch.Tensor, normalisation: tuple[tuple[float, ...], tuple[float, ...]] = NORMALISATION) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float ``(x / 255 - mean) / std``; one mean/std value applies to every band, else one per band."""
    import torch

    mean, std = normalisation
    x = images.float().div_(255.0)
    if len(mean) == 1 and len(std) == 1:
        return x.sub_(mean[0]).div_(std[0])
    return x.sub_(torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)).div_(
        torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1))


def collate(batch: pa.Table, device: torch.device | str = "cpu",
            normalisation: tuple[tuple[float, ...], tuple[float, ...]] = NORMALISATION):
    """A pyarrow batch of samples -> ``(images float (B,3,H,W), graph batch, labels long (B,H,W) or None)``."""
    import torch

    from engine.tiles.graph_store import row_to_graph
    from geolink_model import batch_graphs

    images = normalise(torch.as_tensor(tensor_column(batch, "image"), device=device), normalisation)
    graph_keys = [k for k in batch.column_names if k.startswith(("point_", "line_", "polygon_", "edge__")) or k == "tokens_per_node"]
    graphs = batch_graphs([row_to_graph(row) for row in batch.select(graph_keys).to_pylist()]).to(device)
    labels = torch.as_tensor(tensor_column(batch, "label"), device=device).long() if "label" in batch.column_names else None
    return images, graphs, labels


def tile_lonlat(batch: pa.Table, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Each tile's window centre as ``(B, 2)`` float64 longitude, latitude in degrees (the tile index's
    ``lon_min``..``lat_max``, EPSG:4326), or None when the batch has no such columns (then a location model runs
    without location). A window across the antimeridian (``lon_max < lon_min``) is centred across it.

    Why apart from :func:`collate`: only a model built ``with_location`` reads it, and collate's callers keep their
    three results.

    Example:
        >>> tile_lonlat(pa.table({"lon_min": [10.0], "lat_min": [50.0], "lon_max": [10.2], "lat_max": [50.1]})).tolist()
        [[10.1, 50.05]]
    """
    import torch

    names = ("lon_min", "lat_min", "lon_max", "lat_max")
    if not set(names) <= set(batch.column_names):
        return None
    lon0, lat0, lon1, lat1 = (batch[n].to_numpy(zero_copy_only=False).astype(np.float64) for n in names)
    lon1 = np.where(lon1 < lon0, lon1 + 360.0, lon1)
    centre = np.stack([(lon0 + lon1) / 2.0, (lat0 + lat1) / 2.0], axis=1)
    return torch.as_tensor(centre, device=device)


def tensor_column(batch: pa.Table, name: str) -> np.ndarray:
    """A tensor column of a pyarrow batch as one writable numpy array (chunks concatenated).

    Why writable: one chunk's array is a read-only view of Arrow's buffer, and a torch tensor made from it would be
    too (torch warns that writing to it is undefined behaviour); the copy is of uint8 pixels or labels, a fraction
    of the float tensors the model makes of them anyway."""
    column = batch[name]
    if column.num_chunks != 1:
        return np.concatenate([chunk.to_numpy() for chunk in column.chunks])
    array = column.chunk(0).to_numpy()
    return array if array.flags.writeable else array.copy()


@functools.lru_cache(maxsize=8)
def read_reference(path: str, crs_text: str):
    """A catalog reference file's polygons in ``crs_text`` (unprojected when the file has no CRS), read once per
    worker for every tile (and the stitch stage's formal-residential zones) of its city. Shared and cached: callers
    derive new frames from it, never change it in place."""
    import geopandas as gpd
    from pyproj import CRS

    ref = gpd.read_parquet(storage.local_path(path))
    return ref.to_crs(CRS.from_user_input(crs_text)) if ref.crs is not None else ref


def tile_labels(row: dict, reference: str, classes: tuple[str, ...], nodata_mask: np.ndarray | None = None) -> np.ndarray:
    """Reference polygons rasterised to the tile window: class index per pixel, ``IGNORE`` outside the raster/AOI.

    Pixels no reference polygon covers (roads, unlabelled land) are class 0 (``other``). Reference classes map to
    the set's through :func:`engine.schema.label_lookup` (formal residential is ``built_up`` in the ``builtup`` set).
    """
    import rasterio
    from rasterio.features import rasterize
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    with rasterio.open(row["imagery"]) as src:
        window = Window(row["window_col_off"], row["window_row_off"], row["window_width"], row["window_height"])
        transform = window_transform(window, src.transform)
    ref = read_reference(reference, row["crs"])
    lookup = label_lookup(classes)  # land-use names -> the set's classes (built-up lumped for ``builtup``)
    shapes = [(geom, lookup[c]) for geom, c in zip(ref.geometry, ref["class"]) if c in lookup and lookup[c] > 0]
    shape = (row["window_height"], row["window_width"])
    labels = rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8") if shapes else np.zeros(shape, np.uint8)
    if nodata_mask is not None:
        labels[nodata_mask] = IGNORE
    return labels
