"""A city's stitching inputs, read and checked against each other: tile index, imagery grid, committed tiles.

Why checked here: the predictions were made from one preparation of the city; if the city was prepared again since
(another grid, other imagery), blending old tiles into the new grid would give a wrong map silently. Every mismatch
is an error naming the city and what to rerun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio
from pyproj import CRS

from engine.mapping.store import RunManifest
from engine.schema import TILE_INDEX_SCHEMA, check_schema
from engine.stitch.blend import GridShape
from engine.stitch.rasters import RasterGrid
from engine.workspace import Workspace

TILE_COLUMNS = ("tile_id", "part", "grid_row", "grid_col", "window_row_off", "window_col_off")
CORE_COLUMNS = ("core_col_off", "core_row_off", "core_width", "core_height")


@dataclass(frozen=True)
class CityInputs:
    """Everything stitching needs of one city, consistent with itself and with the run."""

    city: str
    imagery: str
    raster: RasterGrid
    shape: GridShape
    tiles: pa.Table  # TILE_COLUMNS of the committed tiles, sorted by grid row then column (the accumulation order)
    cores: pa.Table  # CORE_COLUMNS of every tile of the index
    dropped: int  # committed tiles the index no longer holds (the city was prepared again with fewer tiles)


def tile_index_dir(workspace: Workspace | str | os.PathLike[str], city: str) -> Path:
    return Workspace.at(workspace).tile_index(city)


def read_tile_index(workspace: str | os.PathLike[str], city: str) -> pa.Table:
    """The city's tile index (:data:`TILE_INDEX_SCHEMA`), checked; errors name the folder and the fix."""
    folder = tile_index_dir(workspace, city)
    files = sorted(Workspace.fetch(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"city {city}: no tile index in {folder}; run `geolink-engine prepare --cities {city}`")
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"city {city}: tile index {folder} cannot be read ({exc}); "
                         f"rerun `geolink-engine prepare --cities {city} --force`") from None
    return check_schema(table, TILE_INDEX_SCHEMA, f"city {city}: tile index {folder}")


def load_city_inputs(workspace: str | os.PathLike[str], city: str, committed: pa.Table, manifest: RunManifest) -> CityInputs:
    """Join the city's committed tiles (:meth:`Ledger.committed` rows) to its tile index and imagery grid.

    Raises:
        ValueError: the index mixes grids or differs from the run's tile size/overlap, the imagery's grid differs
            from the index, or committed tiles were predicted from other inputs or by another model.
    """
    index = read_tile_index(workspace, city)
    for column in ("crs", "imagery", "tile_size_px", "overlap_px"):
        values = pc.unique(index[column]).to_pylist()
        if len(values) != 1:
            raise ValueError(f"city {city}: the tile index mixes {column} values {values[:3]}; "
                             f"rerun `geolink-engine prepare --cities {city} --force`")
    first = index.slice(0, 1).to_pylist()[0]
    size, overlap = first["tile_size_px"], first["overlap_px"]
    if (size, overlap) != (manifest.tile_size_px, manifest.overlap_px):
        raise ValueError(f"city {city}: prepared with {size} px tiles / {overlap} px overlap, but run {manifest.run} used "
                         f"{manifest.tile_size_px} / {manifest.overlap_px}; rerun `geolink-engine map --run {manifest.run}`")
    imagery, crs = first["imagery"], CRS.from_user_input(first["crs"])
    with rasterio.open(imagery) as src:
        raster = RasterGrid(src.width, src.height, src.transform, CRS.from_user_input(src.crs) if src.crs else None)
    if raster.crs is None or not raster.crs.equals(crs):
        raise ValueError(f"city {city}: imagery {imagery} is in {raster.crs}, the tile index in {crs}; "
                         f"rerun `geolink-engine prepare --cities {city} --force`")
    shape = GridShape(raster.height_px, raster.width_px, size, overlap)

    joined = committed.select(["tile_id", "part", "input_hash", "model_version"]).join(
        index.select(["tile_id", "grid_row", "grid_col", "window_row_off", "window_col_off", "input_hash"]),
        keys="tile_id", join_type="inner", right_suffix="_index")
    stale = pc.not_equal(joined["input_hash"], joined["input_hash_index"])
    other_model = pc.not_equal(joined["model_version"], manifest.model_version)
    bad = joined.filter(pc.or_(stale, other_model))
    if bad.num_rows:
        tile = bad["tile_id"][0].as_py()
        raise ValueError(f"city {city}: {bad.num_rows} committed tile(s) (e.g. {tile}) were predicted from other inputs or by "
                         f"another model than {manifest.model_version}; rerun `geolink-engine map --run {manifest.run}`")
    tiles = joined.select(list(TILE_COLUMNS)).sort_by([("grid_row", "ascending"), ("grid_col", "ascending")])
    return CityInputs(city, imagery, raster, shape, tiles, index.select(list(CORE_COLUMNS)), committed.num_rows - tiles.num_rows)
