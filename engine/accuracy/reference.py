"""Reference labels of the sample points, and the census truth, from reference polygons or from people.

Two sources, one rule: a point's reference class is ``urban_village`` when it lies in (or on the edge of) a
reference polygon of class ``urban_village`` and ``other`` everywhere else (other classes, roads, unlabelled land).
For the built-up estimates each point also has a reference *land* class (``ref_land``): ``urban_village``;
``built_up`` in a polygon of another built-up class (:data:`engine.schema.BUILT_UP_CLASSES` or ``built_up``);
``other`` elsewhere. The accuracy statistics use ``ref_class``, which is ``ref_land`` with ``built_up`` read as
``other``.

- The catalog's ``reference`` polygons (synthetic cities; any city with complete reference mapping): point in
  polygon with a shapely STRtree, in the reference's own CRS. The same polygons rasterised onto a city's class grid
  (pixel centres) are the census truth the sampled estimates are checked against.
- People: :func:`export_label_sheet` writes a blind sheet (``samples_to_label.gpkg`` and ``.csv``: id, city,
  lon/lat and an image chip per point, never the map class, so labels are not anchored on the map), and
  :func:`read_labels` reads the filled sheet back, checking every row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from affine import Affine
from PIL import Image
from pyproj import CRS, Transformer
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import array_bounds
from rasterio.windows import Window

from engine import storage
from engine.accuracy.sampling import (
    BUILT_UP,
    LAND_CLASSES,
    OTHER_CLASS,
    UV_CLASS,
    CityGrid,
    TruthStrip,
)
from engine.accuracy.tables import AccuracyInputError, _first_bad, _read_csv
from engine.atomic import atomic_path
from engine.gpkg import write_gpkg
from engine.schema import is_built_up

SHEET_CSV = "samples_to_label.csv"
SHEET_GPKG = "samples_to_label.gpkg"
SHEET_LAYER = "samples_to_label"
CHIPS_DIR = "chips"
SHEET_COLUMNS = ("id", "city", "lon", "lat", "chip", "label")
LONLAT_TOLERANCE_DEG = 1e-6  # the sheet writes 8 decimals; a larger difference means another sample


def load_reference(path: str | os.PathLike[str]) -> gpd.GeoDataFrame:
    """Reference polygons (``class``, ``geometry``) of a GeoParquet, GeoPackage, GeoJSON... file; empty rows dropped.

    A file without a CRS is read as EPSG:4326 (the reference contract).

    Raises:
        ValueError: unreadable file or no ``class`` column, naming the file.
    """
    path = str(path)
    try:
        local = str(storage.local_path(path))  # an object-store reference is fetched once into the cache
        gdf = gpd.read_parquet(local) if path.endswith((".parquet", ".geoparquet")) else gpd.read_file(local, engine="pyogrio")
    except Exception as exc:  # noqa: BLE001 (any reader failure becomes one clear message)
        raise ValueError(f"reference {path} cannot be read: {exc}") from None
    if "class" not in gdf.columns:
        raise ValueError(f"reference {path} has no 'class' column (columns: {list(gdf.columns)})")
    if gdf.crs is None:
        gdf = gdf.set_crs(4326)
    gdf = gdf[["class", gdf.geometry.name]]
    return gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)].reset_index(drop=True)


def _land_codes(reference: gpd.GeoDataFrame) -> np.ndarray:
    """Index in LAND_CLASSES of every reference polygon: 1 urban village, 2 other built-up land, 0 anything else."""
    names = reference["class"].astype(str).to_numpy()
    return np.where(names == UV_CLASS, 1, np.where([is_built_up(c) for c in names], 2, 0)).astype(np.uint8)


def _land_geometries(reference: gpd.GeoDataFrame, crs: CRS | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The UV and built-up polygons (in ``crs`` if given) with their land codes (1, 2)."""
    codes = _land_codes(reference)
    keep = reference[codes > 0]
    if crs is not None:
        keep = keep.to_crs(crs)
    return np.asarray(keep.geometry.values, dtype=object), codes[codes > 0]


class LandLabeller:
    """The reference land class of points, with the polygons' STRtree built once (for many calls on one reference:
    :func:`label_land` is one call of it).

    Points are given in ``points_crs`` (default EPSG:4326 lon/lat) and tested in the reference's own CRS: inside or
    on the edge of a UV polygon is ``urban_village`` (1), else of another built-up polygon ``built_up`` (2), else
    ``other`` (0); :meth:`codes` gives the index in :data:`LAND_CLASSES`, calling the labeller the names.

    Example:
        >>> ref = gpd.GeoDataFrame({"class": ["urban_village"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=4326)
        >>> LandLabeller(ref).codes(np.array([0.5, 2.0]), np.array([0.5, 0.5])).tolist()
        [1, 0]
    """

    def __init__(self, reference: gpd.GeoDataFrame, points_crs: object = 4326) -> None:
        self.geoms, self.land = _land_geometries(reference)
        self.tree = shapely.STRtree(self.geoms) if self.geoms.size else None
        source, target = CRS.from_user_input(points_crs), CRS.from_user_input(reference.crs)
        self.transformer = None if source.equals(target) else Transformer.from_crs(source, target, always_xy=True)

    def codes(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index in :data:`LAND_CLASSES` (uint8) of each point."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        out = np.zeros(x.size, np.uint8)
        if x.size and self.tree is not None:
            if self.transformer is not None:
                x, y = self.transformer.transform(x, y)
            points = shapely.points(np.asarray(x, float), np.asarray(y, float))
            hit, poly = self.tree.query(points, predicate="intersects")
            np.maximum.at(out, hit, np.where(self.land[poly] == 1, 3, 2))  # a UV polygon wins over a built-up one it touches
            out = np.where(out == 3, 1, out).astype(np.uint8)
        return out

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array(LAND_CLASSES, dtype=object)[self.codes(x, y)]


def label_land(lon: np.ndarray, lat: np.ndarray, reference: gpd.GeoDataFrame) -> np.ndarray:
    """Reference land class of each point (lon/lat, EPSG:4326): ``urban_village`` inside a UV polygon, else
    ``built_up`` inside a polygon of another built-up class, else ``other``.

    Example:
        >>> ref = gpd.GeoDataFrame({"class": ["urban_village", "commercial", "green"]}, crs=4326,
        ...                        geometry=[shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1), shapely.box(2, 0, 3, 1)])
        >>> label_land(np.array([0.5, 1.5, 2.5, 9.0]), np.full(4, 0.5), ref).tolist()
        ['urban_village', 'built_up', 'other', 'other']
    """
    return LandLabeller(reference)(lon, lat)


def label_points(lon: np.ndarray, lat: np.ndarray, reference: gpd.GeoDataFrame) -> np.ndarray:
    """Reference class of each point (lon/lat, EPSG:4326): ``urban_village`` inside a UV polygon, else ``other``.

    Example:
        >>> ref = gpd.GeoDataFrame({"class": ["urban_village"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=4326)
        >>> label_points(np.array([0.5, 2.0]), np.array([0.5, 0.5]), ref).tolist()
        ['urban_village', 'other']
    """
    return to_ref_class(label_land(lon, lat, reference))


def to_ref_class(land: np.ndarray) -> np.ndarray:
    """The accuracy assessment's reference class of land classes: ``built_up`` counts as ``other``."""
    land = np.asarray(land, dtype=object)
    return np.where(land == BUILT_UP, OTHER_CLASS, land).astype(object)


def truth_strips(reference: gpd.GeoDataFrame, grid: CityGrid) -> TruthStrip:
    """A function ``(y0, y1) -> uint8 land codes`` of those rows of the city's grid (index in LAND_CLASSES: 0 other,
    1 urban village, 2 other built-up land): the reference rasterised there.

    Pixel centres decide (``rasterize`` without ``all_touched``); only polygons meeting the strip are burnt, urban
    villages last (they win where polygons overlap).
    """
    geoms, codes = _land_geometries(reference, grid.crs)
    order = np.argsort(-codes.astype(int), kind="stable")  # built-up (2) first, then UV (1) on top
    geoms, codes = geoms[order], codes[order]
    tree = shapely.STRtree(geoms)

    def strip(y0: int, y1: int) -> np.ndarray:
        shape = (y1 - y0, grid.width_px)
        transform = grid.transform @ Affine.translation(0, y0)
        hits = tree.query(shapely.box(*array_bounds(shape[0], shape[1], transform)))
        if hits.size == 0:
            return np.zeros(shape, np.uint8)
        hits = np.sort(hits)
        return rasterize(zip(geoms[hits], codes[hits].tolist()), out_shape=shape, transform=transform, fill=0,
                         dtype="uint8")

    return strip


# ---------------------------------------------------------------------------------------------------------------
# the labelling sheet


def render_chip(src: rasterio.DatasetReader, x: float, y: float, chip_px: int, zoom_out: int = 1,
                out_px: int | None = None) -> np.ndarray:
    """RGB uint8 image of the imagery around (x, y) (imagery CRS), for a person to label the point.

    ``zoom_out=1``: the ``chip_px`` square centred on the point's pixel, with a hollow yellow ring around that pixel
    (the labelling sheet's chip). ``zoom_out > 1``: a square ``zoom_out`` times wider, resampled to ``out_px``
    (averaged, so a wide view stays cheap), with a yellow box on the chip's extent: the context view of
    ``geolink-engine label``, where the surroundings decide what a chip alone cannot (a village's edge, a road).
    Outside the raster is black; bands other than uint8 are stretched to their 2-98 percentiles.

    Example:
        >>> from rasterio.io import MemoryFile
        >>> from rasterio.transform import from_origin
        >>> with MemoryFile() as mem, mem.open(driver="GTiff", width=64, height=64, count=3, dtype="uint8",
        ...                                    transform=from_origin(0, 64, 1, 1)) as src:
        ...     render_chip(src, 32, 32, 16).shape, render_chip(src, 32, 32, 16, zoom_out=4, out_px=32).shape
        ((16, 16, 3), (32, 32, 3))
    """
    col, row = ~src.transform @ (x, y)
    side = chip_px * zoom_out
    out_px = out_px or side
    half = side // 2
    window = Window(int(np.floor(col)) - half, int(np.floor(row)) - half, side, side)
    data = src.read([1, 2, 3] if src.count >= 3 else [1, 1, 1], window=window, out_shape=(3, out_px, out_px),
                    boundless=True, fill_value=0, resampling=Resampling.average)
    if data.dtype != np.uint8:  # stretch other depths to 2-98 percent
        lo, hi = np.percentile(data, [2, 98]) if data.size else (0, 1)
        data = np.clip((data - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
    rgb = np.ascontiguousarray(np.moveaxis(data.astype(np.uint8), 0, -1))
    if zoom_out == 1:
        r0, r1 = max(half - 3, 0), min(half + 3, chip_px - 1)  # a 7-pixel square ring
    else:  # the chip's extent, scaled to the output
        scale = out_px / side
        r0, r1 = round((half - chip_px // 2) * scale), round((half - chip_px // 2 + chip_px) * scale) - 1
        r0, r1 = max(r0, 0), min(r1, out_px - 1)
    for a, b in ((r0, slice(r0, r1 + 1)), (r1, slice(r0, r1 + 1))):  # yellow
        rgb[a, b] = (255, 255, 0)
        rgb[b, a] = (255, 255, 0)
    return rgb


CHIP_GAP_PX = 4  # white columns between the chips of a multi-date chip


def export_label_sheet(points: pd.DataFrame, imagery: Mapping[str, str | Sequence[str]], out_dir: str | os.PathLike[str],
                       chip_px: int = 96, timestamp: str = "") -> tuple[dict[str, Path], list[str]]:
    """Write the blind labelling sheet of ``points`` under ``out_dir``: CSV, GeoPackage and one PNG chip per point.

    The sheet has :data:`SHEET_COLUMNS`; ``label`` is empty, to be filled with ``urban_village``, ``built_up``
    (built-up land that is not an urban village: housing estates, commerce, industry, institutions) or ``other``
    (land that is not built-up: roads, green, water, farmland, vacant), or with the classes the caller's reader
    allows (:func:`read_labels`' ``classes``; e.g. the change classes). The map class and stratum are left out on
    purpose. Chips (``chips/<id>.png``, the imagery around the point with a yellow square on its pixel) are read by
    window from the catalog imagery of each city; a city with several images (the dates of a change assessment)
    gets them side by side in the given order, ``CHIP_GAP_PX`` white columns apart.

    Args:
        points: rows of :func:`engine.accuracy.sampling.draw_sample` (``id, city, x, y, crs, lon, lat``).
        imagery: city -> imagery path, or a sequence of paths (one chip each, left to right).
        out_dir: the run's ``accuracy/`` folder.
        chip_px: chip side in imagery pixels.
        timestamp: the GeoPackage's last_change (the run's start), so a rerun writes the same bytes.

    Returns:
        The files written (``csv``, ``gpkg``, ``chips``) and warnings (a city whose imagery cannot be read gets
        no chips; its rows say so in ``chip``).
    """
    out_dir = Path(out_dir)
    sheet = points.sort_values("id").reset_index(drop=True)
    chip = np.full(len(sheet), "", dtype=object)
    warnings: list[str] = []
    with atomic_path(out_dir / CHIPS_DIR) as tmp_dir:
        tmp_dir.mkdir(parents=True)
        for city, idx in sheet.groupby("city").groups.items():
            path = imagery.get(city)
            paths = [path] if path is None or isinstance(path, (str, os.PathLike)) else list(path)
            try:
                rows = sheet.loc[idx]
                images = [_chips(p, rows, chip_px) for p in paths]
                gap = np.full((chip_px, CHIP_GAP_PX, 3), 255, np.uint8)
                for k, i in enumerate(idx):
                    name = f"{sheet.at[i, 'id']}.png"
                    parts = [part for img in images for part in (gap, img[k])][1:]
                    Image.fromarray(np.concatenate(parts, axis=1)).save(tmp_dir / name, optimize=True)
                    chip[sheet.index.get_loc(i)] = f"{CHIPS_DIR}/{name}"
            except Exception as exc:  # noqa: BLE001 (no chips for this city; the sheet is still usable)
                shown = path if len(paths) == 1 else [str(p) for p in paths]
                warnings.append(f"city {city}: no image chips, imagery {shown} cannot be read ({exc})")
                chip[sheet.index.get_indexer(idx)] = "no chip: imagery unreadable"
    table = pd.DataFrame({"id": sheet["id"], "city": sheet["city"], "lon": sheet["lon"].round(8),
                          "lat": sheet["lat"].round(8), "chip": chip, "label": ""})
    csv_path, gpkg_path = out_dir / SHEET_CSV, out_dir / SHEET_GPKG
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.8f")
    write_gpkg(gpd.GeoDataFrame(table, geometry=shapely.points(table["lon"], table["lat"]), crs=4326), gpkg_path, SHEET_LAYER,
               timestamp)
    return {"csv": csv_path, "gpkg": gpkg_path, "chips": out_dir / CHIPS_DIR}, warnings


def _chips(path: str | os.PathLike[str] | None, rows: pd.DataFrame, chip_px: int) -> list[np.ndarray]:
    """The chip of every row (points in the CRS of their ``crs`` column) from one image."""
    with rasterio.open(path) as src:
        x, y = rows["x"].to_numpy(), rows["y"].to_numpy()
        crs = CRS.from_user_input(rows["crs"].iloc[0])
        if src.crs is not None and not CRS.from_user_input(src.crs).equals(crs):
            x, y = Transformer.from_crs(crs, src.crs, always_xy=True).transform(x, y)
        return [render_chip(src, float(xi), float(yi), chip_px) for xi, yi in zip(np.asarray(x), np.asarray(y))]


def read_labels(path: str | os.PathLike[str], sample: pd.DataFrame, required: set[str] | None = None,
                classes: tuple[str, ...] = LAND_CLASSES) -> pd.DataFrame:
    """Read a filled labelling sheet (CSV with ``id`` and ``label``) and check it against the run's sample.

    Args:
        path: the filled ``samples_to_label.csv`` (other columns are ignored, except ``lon``/``lat``, which must
            match the sample's points when present: a sheet of another draw is refused).
        sample: the run's points (``id``, ``city``, ``lon``, ``lat``).
        required: ids that must have a label (default: every point of ``sample``).
        classes: allowed labels.

    Returns:
        ``id``, ``ref_land`` (the label) and ``ref_class`` (the label with ``built_up`` read as ``other``) per
        labelled row, indexed by line number in the file.

    Raises:
        AccuracyInputError: naming the file and line: missing file or column, empty or repeated id, an id that is
            not a sample point, an empty or unknown label, coordinates of another sample, or required ids without a
            row.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "labels.csv"
        >>> _ = p.write_text("id,label\\np00001,urban_village\\n")
        >>> read_labels(p, pd.DataFrame({"id": ["p00001"], "city": ["a"], "lon": [0.0], "lat": [0.0]}))["ref_class"].tolist()
        ['urban_village']
    """
    path = Path(path)
    df = _read_csv(path, ("id", "label"))
    allowed = [str(c) for c in classes]
    _first_bad(path, df["id"] == "", lambda line: "id is empty; copy the id of the sheet's row")
    first = df.reset_index().groupby("id")["line"].transform("min").to_numpy()
    _first_bad(path, pd.Series(first != df.index.to_numpy(), index=df.index),
               lambda line: f"id {df.loc[line, 'id']!r} is listed again (first on line "
                            f"{int(df.index[(df['id'] == df.loc[line, 'id']).to_numpy()][0])}); label each point once")
    known = sample.set_index("id")
    _first_bad(path, ~df["id"].isin(known.index),
               lambda line: f"id {df.loc[line, 'id']!r} is not a point of this run's sample; was the sheet made for "
                            f"another run or seed?")
    _first_bad(path, df["label"] == "",
               lambda line: f"id {df.loc[line, 'id']!r} has no label; write one of {allowed}")
    _first_bad(path, ~df["label"].isin(allowed),
               lambda line: f"label {df.loc[line, 'label']!r} of id {df.loc[line, 'id']!r} is not one of {allowed}")
    for axis in ("lon", "lat"):
        if axis not in df.columns:
            continue
        value = pd.to_numeric(df[axis], errors="coerce")
        expected = known.loc[df["id"], axis].to_numpy()
        _first_bad(path, pd.Series(~(np.abs(value.to_numpy() - expected) <= LONLAT_TOLERANCE_DEG), index=df.index),
                   lambda line, a=axis: f"id {df.loc[line, 'id']!r} has {a} {df.loc[line, a]!r}, but this run's point "
                                        f"{df.loc[line, 'id']} lies at {a} {known.at[df.loc[line, 'id'], a]:.8f}: the "
                                        f"sheet belongs to another draw (products or seed changed); export a new sheet")
    required = set(known.index) if required is None else set(required)
    missing = sorted(required - set(df["id"]))
    if missing:
        first_id = missing[0]
        raise AccuracyInputError(f"{path}: {len(missing)} sample point(s) have no row, e.g. id {first_id!r} "
                                 f"(city {known.at[first_id, 'city']}); label every point of the sheet")
    return pd.DataFrame({"id": df["id"], "ref_land": df["label"], "ref_class": to_ref_class(df["label"].to_numpy())},
                        index=df.index)
