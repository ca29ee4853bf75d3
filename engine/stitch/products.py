"""The run-wide products of stitching: UV polygons (GeoParquet + GeoPackage), per-city statistics, the manifest.

Layout of ``<workspace>/products/<run>/``::

    run.json                       copy of the run's manifest (what the products were made from)
    urban_villages.parquet         URBAN_VILLAGES_SCHEMA, GeoParquet 1.1, EPSG:4326, sorted by uv_id
    urban_villages.gpkg            the same rows, layer ``urban_villages``
    city_stats.csv                 one row per catalog city (failed and empty ones included)
    cities/<city>/uv_prob.tif      COG, uint8 round(p_uv * 250), scale 0.004, nodata 255
    cities/<city>/class.tif        COG, uint8 class index in run.json's ``classes`` order, nodata 255

Every file is written to a temporary name and renamed. The Parquet file has no timestamps and a fixed row order
and compression, and the GeoPackage is stamped with the run's start time, so stitching the same predictions again
gives the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from engine.atomic import atomic_path
from engine.geoparquet import table_to_gdf, write_geoparquet
from engine.gpkg import write_gpkg
from engine.product_layout import CITY_STATS, MORPHOLOGY_CSV, MORPHOLOGY_PNG, RUN_JSON, UV_GPKG, UV_PARQUET, write_csv
from engine.schema import CITY_STATS_COLUMNS, URBAN_VILLAGES_SCHEMA  # noqa: F401  (re-exported: the writers' contract)

UV_LAYER = "urban_villages"

def write_urban_villages(tables: Iterable[pa.Table], out_dir: Path, timestamp: str = "") -> tuple[Path, Path]:
    """Concatenate the cities' polygons, sort by ``uv_id``, write GeoParquet and GeoPackage; return both paths.

    ``timestamp``: the GeoPackage's ``last_change`` (the run's start), so a rerun writes the same bytes."""
    tables = [t.cast(URBAN_VILLAGES_SCHEMA) for t in tables]
    table = pa.concat_tables(tables) if tables else URBAN_VILLAGES_SCHEMA.empty_table()
    table = table.sort_by("uv_id").combine_chunks()
    parquet = write_geoparquet(table, out_dir / UV_PARQUET, 4326)
    gpkg = out_dir / UV_GPKG
    gdf = table_to_gdf(table, 4326)
    kwargs = {"geometry_type": "Polygon"} if len(gdf) == 0 else {}  # nothing to infer the type from
    write_gpkg(gdf, gpkg, UV_LAYER, timestamp, **kwargs)
    return parquet, gpkg


def write_city_stats(rows: Iterable[dict], out_dir: Path) -> Path:
    """``city_stats.csv``: numbers as Python writes them (``repr``), NaN and missing values as empty cells."""
    return write_csv(out_dir / CITY_STATS, CITY_STATS_COLUMNS, rows)


def write_morphology(rows: list[dict], out_dir: Path) -> tuple[Path, Path | None]:
    """``morphology.csv`` (:data:`engine.morphology.ROW_KEYS`: city rows, then region rows, then national rows) and its
    chart ``morphology.png`` (None when no city had buildings in a UV or formal-residential zone)."""
    from engine.morphology import ROW_KEYS, morphology_figure

    path = write_csv(out_dir / MORPHOLOGY_CSV, ROW_KEYS, rows)
    png = out_dir / MORPHOLOGY_PNG
    if any(r["level"] == "city" and r["n_buildings"] for r in rows):
        morphology_figure(rows, png)
        return path, png
    png.unlink(missing_ok=True)
    return path, None


def copy_manifest(run_path: Path, out_dir: Path) -> Path:
    target = out_dir / RUN_JSON
    with atomic_path(target) as tmp:
        shutil.copyfile(run_path / RUN_JSON, tmp)
    return target


