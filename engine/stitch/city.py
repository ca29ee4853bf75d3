"""One city's stitching, the pure core of the `stitch` stage: committed tile predictions -> COGs, UV polygons.

Per city (:func:`stitch_city`): tiles stream in grid order from the prediction parts (DuckDB), are blended strip
by strip (:mod:`engine.stitch.blend`), each strip is written to the rasters and polygonised, and the pieces are
merged across seams and measured (:mod:`engine.stitch.merge`). Memory holds one strip and the city's polygons.
Which cities run where (driver threads or Ray tasks) and the run-wide products are decided in
:mod:`engine.pipelines.stitch`; this module never imports Ray.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rasterio
from pyproj import CRS, Transformer
from rasterio.windows import Window

from engine import storage
from engine.mapping.store import (
    RunManifest,
    read_city_predictions,
)
from engine.product_layout import COGS, city_folder
from engine.schema import URBAN_VILLAGES_SCHEMA, built_up_definition, is_built_up
from engine.stitch.blend import RAMPS, Tile, blend_strips
from engine.stitch.city_morphology import CityMorphology, city_morphology, empty_metrics
from engine.stitch.inputs import CityInputs, load_city_inputs
from engine.stitch.merge import EQUAL_AREA_CRS, merge_pieces
from engine.stitch.polygons import Pieces
from engine.stitch.rasters import (
    CLASS_TIF,
    NODATA,
    UV_PROB_TIF,
    CityRasters,
    RasterGrid,
    quantise_prob,
)
from engine.workspace import is_valid_name

UV_CLASS = "urban_village"


@dataclass(frozen=True)
class StitchConfig:
    """How predictions become products.

    Args:
        min_area_m2: villages smaller than this (after simplification, equal-area) are dropped as slivers.
        simplify: simplify village outlines (topology preserving) with a tolerance of ``simplify_px`` pixels.
        simplify_px: the tolerance, in pixels of the city's imagery.
        block_rows: tile-grid rows per strip; None picks as many as fit in ``strip_budget_mb``.
        strip_budget_mb: rough memory for one strip's buffers when ``block_rows`` is None.
        ramp: blending weights over the overlap, ``linear`` or ``cosine``.
        mask_nodata: pixels where the imagery has no data are nodata in the products (else the model's guess).
        batch_tiles: prediction rows read per batch.
        workers: cities stitched at once in driver threads (numpy, GDAL and DuckDB release the GIL); 0 = up to 4,
            one per core. Each holds one strip in memory.
        ray_tasks: stitch each city in a Ray task (1 CPU, on any node) instead of a driver thread; ``None`` = when
            Ray runs on more than one node. Why: at national scale the driver's threads cap the run (about 980
            tiles/s, docs/CAPACITY.md) while the cluster's CPU nodes idle; a task spreads that work over them.

    Example:
        >>> StitchConfig(min_area_m2=50.0, block_rows=2).block_rows
        2
    """

    min_area_m2: float = 100.0
    simplify: bool = True
    simplify_px: float = 1.0
    block_rows: int | None = None
    strip_budget_mb: float = 256.0
    ramp: str = "linear"
    mask_nodata: bool = True
    batch_tiles: int = 64
    workers: int = 0
    ray_tasks: bool | None = None

    def __post_init__(self) -> None:
        if not self.min_area_m2 >= 0:
            raise ValueError(f"min_area_m2={self.min_area_m2}: must be >= 0")
        if not self.simplify_px >= 0:
            raise ValueError(f"simplify_px={self.simplify_px}: must be >= 0")
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError(f"block_rows={self.block_rows}: need at least 1 (or None for automatic)")
        if not self.strip_budget_mb > 0:
            raise ValueError(f"strip_budget_mb={self.strip_budget_mb}: must be > 0")
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp={self.ramp!r}: use one of {RAMPS}")
        if self.batch_tiles < 1:
            raise ValueError(f"batch_tiles={self.batch_tiles}: need at least 1")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: need 0 (automatic) or more")

    def rows_per_strip(self, width_px: int, stride_px: int, n_classes: int) -> int:
        """``block_rows``, or as many tile rows as fit in the budget (about ``4K + 40`` bytes per pixel of a strip)."""
        if self.block_rows is not None:
            return self.block_rows
        per_grid_row = width_px * stride_px * (4 * n_classes + 40)
        return max(1, int(self.strip_budget_mb * 2**20 // per_grid_row))


@dataclass(frozen=True)
class CityStitch:
    """Outcome of one city: ``status`` is ``done``, ``empty`` (no committed tiles) or ``failed`` (``error`` says why).

    Areas are m2 in an equal-area CRS; NaN when unknown (failed or empty city, or ``built_up_area_m2`` of a binary
    model, which does not tell built-up land from the rest).
    """

    city: str
    region: str
    status: str
    error: str = ""
    polygons: int = 0
    uv_area_m2: float = math.nan
    built_up_area_m2: float = math.nan
    uv_mapped_m2: float = math.nan  # UV-class pixels of class.tif (the numerator of uv_share: the same map as built-up)
    buildings_source: str = ""  # where the footprints came from: catalog | osm ("" when unusable: buildings_note)
    buildings: int = 0
    buildings_note: str = ""
    morphology: dict = field(default_factory=dict, compare=False, repr=False)  # group -> MorphologySummary (engine.morphology)
    tiles_ok: int = 0
    tiles_failed: int = 0
    seconds: float = 0.0

    @property
    def uv_share(self) -> float:
        """UV land over built-up land, both counted on ``class.tif`` (pixel areas, equal-area): one map, one rule,
        so slivers dropped from the polygons and outline simplification do not bias the ratio. NaN when the built-up
        area is unknown (a binary model) or zero."""
        if not self.built_up_area_m2 > 0:
            return math.nan
        return self.uv_mapped_m2 / self.built_up_area_m2

    def stats_row(self) -> dict:
        return {"city": self.city, "region": self.region, "uv_area_m2": self.uv_area_m2, "built_up_area_m2": self.built_up_area_m2,
                "uv_share": self.uv_share, "polygons": self.polygons, "tiles_ok": self.tiles_ok, "tiles_failed": self.tiles_failed,
                "status": self.status, "buildings_source": self.buildings_source, "buildings": self.buildings,
                "buildings_note": self.buildings_note}


def stitch_city(workspace: Path, run_path: Path, manifest: RunManifest, row: dict, committed: pa.Table, tiles_failed: int,
                cfg: StitchConfig, out_dir: Path, con: duckdb.DuckDBPyConnection) -> tuple[CityStitch, pa.Table | None]:
    """One city: its COGs under ``out_dir/cities/<city>/`` and its villages (:data:`URBAN_VILLAGES_SCHEMA` rows).

    ``committed``: the city's :meth:`Ledger.committed` rows; ``con``: DuckDB with spatial (only cursors of it are used).

    Never raises: a failure comes back as a ``failed`` result (and the city's old COGs are removed, so the products
    never mix runs of a city).
    """
    t0 = time.perf_counter()
    city, region = row.get("city") or "", row.get("region") or ""
    base = {"city": city, "region": region, "tiles_failed": tiles_failed}
    try:
        city_dir = city_folder(out_dir, city)  # the slug is checked before it becomes a path
        if committed.num_rows == 0:
            _remove_rasters(city_dir)
            return CityStitch(**base, status="empty", error=f"no committed tiles in run {manifest.run} ({tiles_failed} failed)",
                              seconds=time.perf_counter() - t0), None
        with storage.raster_env():  # one per stitch thread: GDAL reads the credentials, no boto3 session per open
            inputs = load_city_inputs(workspace, city, committed, manifest)
            table, built_up_m2, uv_mapped_m2 = _stitch(inputs, run_path, manifest, city_dir, cfg, con)
            morph = _morphology(row, table["geometry"].to_pylist(), city_dir / COGS["class"], manifest)
        table = _finish_table(table, city, region, manifest.model_version, morph.uv_metrics)
        uv_area = float(pc.sum(table["area_m2"]).as_py() or 0.0)
        return CityStitch(**base, status="done", polygons=table.num_rows, uv_area_m2=uv_area, built_up_area_m2=built_up_m2,
                          uv_mapped_m2=uv_mapped_m2, buildings_source=morph.source, buildings=morph.buildings,
                          buildings_note=morph.note, morphology=morph.summaries, tiles_ok=inputs.tiles.num_rows,
                          seconds=time.perf_counter() - t0), table
    except Exception as exc:  # noqa: BLE001 (one city never stops the others: record the error and go on)
        if is_valid_name(city):
            _remove_rasters(city_folder(out_dir, city))
        return CityStitch(**base, status="failed", error=_describe(exc), tiles_ok=committed.num_rows,
                          seconds=time.perf_counter() - t0), None


def _stitch(inputs: CityInputs, run_path: Path, manifest: RunManifest, city_dir: Path, cfg: StitchConfig,
            con: duckdb.DuckDBPyConnection) -> tuple[pa.Table, float, float]:
    classes = manifest.classes
    uv = classes.index(UV_CLASS)
    built_up_ids = [i for i, name in enumerate(classes) if is_built_up(name)]
    knows_built_up = built_up_definition(classes)["known"]
    raster, shape = inputs.raster, inputs.shape
    block_rows = cfg.rows_per_strip(raster.width_px, shape.stride_px, len(classes))
    row_area = _row_area_m2(raster)
    pieces = Pieces()
    built_up_m2 = uv_mapped_m2 = 0.0
    with CityRasters(city_dir, raster, classes, UV_CLASS) as out, rasterio.open(inputs.imagery) as src:
        for strip in blend_strips(_tiles(inputs, run_path, cfg.batch_tiles, con), shape, len(classes), block_rows, cfg.ramp):
            valid = strip.covered
            if cfg.mask_nodata:
                valid &= src.dataset_mask(window=Window(0, strip.row_off, raster.width_px, strip.height)) > 0
            cls = strip.class_index()
            p_uv = strip.prob(uv)
            out.write(strip.row_off, quantise_prob(p_uv, valid), np.where(valid, cls, np.uint8(NODATA)))
            pieces.add_strip(strip.row_off, valid & (cls == uv), p_uv)
            if knows_built_up:
                areas = row_area[strip.row_off:strip.row_off + strip.height]
                built_up_m2 += float((valid & np.isin(cls, built_up_ids)).sum(axis=1) @ areas)
                uv_mapped_m2 += float((valid & (cls == uv)).sum(axis=1) @ areas)
        out.finish()
    merged = merge_pieces(con, pieces.table(), pieces.pair_array(), inputs.cores, raster.transform, raster.crs,
                          cfg.simplify_px if cfg.simplify else 0.0)
    merged = merged.filter(pc.greater_equal(merged["area_m2"], cfg.min_area_m2))
    return merged, (built_up_m2 if knows_built_up else math.nan), (uv_mapped_m2 if knows_built_up else math.nan)


def _tiles(inputs: CityInputs, run_path: Path, batch_tiles: int, con: duckdb.DuckDBPyConnection) -> Iterator[Tile]:
    """The committed tiles' predictions in accumulation order (grid row, then column)."""
    rows = inputs.tiles.select(["tile_id", "grid_row", "window_row_off", "window_col_off"]).to_pylist()
    for row, (tile_id, probs) in zip(rows, read_city_predictions(run_path, inputs.tiles.select(["tile_id", "part"]), batch_tiles, con)):
        yield Tile(tile_id, row["grid_row"], row["window_row_off"], row["window_col_off"], probs)


def _morphology(row: dict, uv_wkb: list[bytes], class_tif: Path, manifest: RunManifest) -> CityMorphology:
    """The city's building morphology; a failure of it is the city's note, never the loss of its map."""
    try:
        return city_morphology(row, uv_wkb, class_tif, manifest.classes, bool(manifest.built_up.get("known")))
    except Exception as exc:  # noqa: BLE001 (the map and polygons stand without morphology)
        return CityMorphology(empty_metrics(len(uv_wkb)), note=f"morphology not measured: {_describe(exc)}")


def _finish_table(merged: pa.Table, city: str, region: str, model_version: str, morphology: pa.Table) -> pa.Table:
    """Villages in position order with their ids, attributes and morphology (:data:`URBAN_VILLAGES_SCHEMA`)."""
    n = merged.num_rows
    width = max(5, len(str(n)))
    pixels = merged["pixels"].to_numpy()
    return pa.table({
        "uv_id": pa.array([f"{city}-{i:0{width}d}" for i in range(1, n + 1)], pa.string()),
        "city": pa.array([city] * n, pa.string()),
        "region": pa.array([region] * n, pa.string()),
        "area_m2": merged["area_m2"],
        "mean_prob": pa.array(merged["prob_sum"].to_numpy() / np.maximum(pixels, 1), pa.float64()),
        "n_tiles": pa.array(merged["n_tiles"].to_numpy(), pa.int32()),
        "model_version": pa.array([model_version] * n, pa.string()),
        **{name: morphology[name] for name in morphology.column_names},
        "geometry": merged["geometry"],
    }, schema=URBAN_VILLAGES_SCHEMA)


def _row_area_m2(raster: RasterGrid) -> np.ndarray:
    """Ground area of one pixel per raster row, in the equal-area CRS (at the raster's middle column).

    Why per row: in a geographic CRS a pixel's area shrinks towards the poles; in a projected CRS the scale varies
    a little. Each pixel is measured as the quadrilateral of its projected corners.
    """
    rows = np.arange(raster.height_px, dtype=np.float64)
    col = raster.width_px / 2.0
    corners = [(col, rows), (col + 1, rows), (col + 1, rows + 1), (col, rows + 1)]
    to_area = Transformer.from_crs(raster.crs, CRS.from_user_input(EQUAL_AREA_CRS), always_xy=True)
    xs, ys = [], []
    for c, r in corners:
        x, y = raster.transform @ (np.full_like(r, c), r)
        x, y = to_area.transform(x, y)
        xs.append(x)
        ys.append(y)
    x, y = np.array(xs), np.array(ys)
    x, y = x - x[0], y - y[0]  # local origin: the shoelace on ~1e6 m coordinates would lose the sub-m2 digits
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=0) - np.roll(x, -1, axis=0) * y, axis=0))


def _remove_rasters(city_dir: Path) -> None:
    for name in (UV_PROB_TIF, CLASS_TIF):
        (city_dir / name).unlink(missing_ok=True)


def _describe(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"
