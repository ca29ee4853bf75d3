"""A city's OSM given as several files, a folder or a partitioned dataset, read as one contract table.

Why: OSM often arrives split (point, line and polygon GeoJSONs per scene, as in the GeoLink data) or nationwide (one
partitioned dataset, :mod:`engine.osm.dataset`, shared by every city of a catalog). The catalog's ``osm`` cell names
any of these; this module turns it into the one table the tiles are built from.

Rules:

* ``a.geojson;b.geojson`` (the catalog's ``;`` list, :data:`PATH_LIST_SEP`): every item, in order.
* a folder with a ``_dataset.json`` manifest: the partitioned dataset (read by bbox, never whole).
* any other folder: every OSM/vector file directly in it, by name (``.osm.pbf``, ``.pbf``, ``.osm``, ``.o5m``,
  ``.parquet``, ``.geoparquet``, ``.gpkg``, ``.geojson``, ``.shp``, ``.fgb``). ``.json`` files are skipped in folders
  (a scene's ``meta.json`` is not OSM; name GeoJSON ``.geojson`` there), as are hidden and ``_``-prefixed files.

Ids across files: real OSM ids (``>= 0``) name the same element everywhere, so a real ``(osm_id, kind)`` read from
two files is kept once (the first file's row). Ids a reader assigns (``-1, -2, ...`` per file, files without ids)
would collide, so each file's negative ids are shifted past the previous files' (``id - k`` where ``k`` is how
many negative ids came before): the first file keeps its ids, every id stays unique and stable for a given list.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from engine import storage
from engine.osm.dataset import is_osm_dataset, read_manifest, read_osm_dataset, sort_features
from engine.osm.ingest import (
    _OSMIUM_SUFFIXES,
    _PARQUET_SUFFIXES,
    BBox,
    IngestReport,
    OsmIngestError,
    _check_bbox,
    read_osm,
)
from engine.schema import OSM_FEATURES_SCHEMA, OSM_KINDS

__all__ = ["FOLDER_SUFFIXES", "PATH_LIST_SEP", "local_sources", "osm_source_paths", "read_osm_sources"]

PATH_LIST_SEP = ";"
"""Separates the files of one catalog cell (the same character as ``engine.catalog.PATH_LIST_SEP``)."""
FOLDER_SUFFIXES = _OSMIUM_SUFFIXES + _PARQUET_SUFFIXES + (".gpkg", ".geojson", ".shp", ".fgb")
"""File names taken from a plain folder (no ``.json``: see the module docstring)."""


def osm_source_paths(spec: str | os.PathLike[str] | list | tuple) -> list[str]:
    """The inputs a catalog ``osm`` cell names, in order: ``;`` items, folders expanded, datasets kept as folders.

    Object-store URIs pass through unchanged (fetch them with :func:`local_sources` first to read them).

    Raises:
        OsmIngestError: naming the folder that holds no OSM file, or when ``spec`` names nothing.

    Example:
        >>> osm_source_paths("points.geojson; lines.geojson")
        ['points.geojson', 'lines.geojson']
    """
    items = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else str(spec).split(PATH_LIST_SEP)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise OsmIngestError(f"{str(spec)!r}: names no OSM file; give a file, a ';' list of files or a folder")
    out: list[str] = []
    for item in items:
        p = Path(item)
        if "://" not in item and p.is_dir() and not is_osm_dataset(p):
            out.extend(str(f) for f in folder_files(p))
        else:
            out.append(item)
    return out


def folder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The OSM/vector files directly in a plain folder, sorted by name (see the module docstring).

    Raises:
        OsmIngestError: naming the folder when it holds none.
    """
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith((".", "_")) and f.name.lower().endswith(FOLDER_SUFFIXES))
    if not files:
        raise OsmIngestError(f"{folder}: folder holds no OSM file (looked for {', '.join(FOLDER_SUFFIXES)}); "
                             "put the OSM files there or name them in the catalog")
    return files


def local_sources(spec: str) -> str:
    """``spec`` with each object-store item fetched into the node's cache (folders whole); local paths unchanged."""
    return PATH_LIST_SEP.join(str(storage.local_path(s.strip())) for s in str(spec).split(PATH_LIST_SEP) if s.strip())


def read_osm_sources(spec: str | os.PathLike[str] | list | tuple, bbox: BBox | None = None) -> tuple[pa.Table, IngestReport]:
    """Read every input ``spec`` names as one ``OSM_FEATURES_SCHEMA`` table (EPSG:4326), plus a combined report.

    One plain file is exactly :func:`engine.osm.read_osm`. A dataset folder is read by ``bbox`` (its partitions,
    never whole). Several inputs: each read whole with :func:`~engine.osm.read_osm`, negative ids shifted and real
    ids de-duplicated (module docstring), then limited to ``bbox``; rows ordered by ``(osm_id, kind, geometry)``.
    The report sums the files' counts (a dataset's repairs were counted when it was written: 0 here).

    Raises:
        OsmIngestError: one line naming the file (missing, unreadable, a folder without OSM files, a broken manifest).

    Example:
        >>> import tempfile, geopandas as gpd
        >>> d = Path(tempfile.mkdtemp())
        >>> for name, geom in (("a", shapely.Point(13.4, 52.5)), ("b", shapely.Point(13.5, 52.5))):
        ...     gpd.GeoDataFrame({"amenity": ["cafe"]}, geometry=[geom], crs=4326).to_file(d / f"{name}.geojson")
        >>> table, report = read_osm_sources(d)
        >>> table["osm_id"].to_pylist(), report.features
        ([-2, -1], 2)
    """
    paths = osm_source_paths(spec)
    if len(paths) == 1 and not is_osm_dataset(paths[0]):
        return read_osm(paths[0], bbox)
    box = _check_bbox(Path(paths[0]), bbox)
    tables: list[pa.Table] = []
    repaired = dropped = 0
    reprojected_from = None
    shift = 0
    for path in paths:
        if is_osm_dataset(path):
            table = read_osm_dataset(path, bbox)
            lowest = int(read_manifest(path).get("osm_id_min", 0))
        else:
            table, report = read_osm(path)
            repaired, dropped = repaired + report.repaired, dropped + report.dropped
            reprojected_from = reprojected_from or report.reprojected_from
            lowest = int(pc.min(table["osm_id"]).as_py()) if table.num_rows else 0
            if box is not None and table.num_rows:
                geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))
                table = table.filter(pa.array(shapely.intersects(geoms, box)))
        if shift and table.num_rows:
            ids = table["osm_id"].to_numpy()
            table = table.set_column(0, table.schema.field("osm_id"), pa.array(np.where(ids < 0, ids - shift, ids), pa.int64()))
        shift += max(0, -lowest)
        tables.append(table.cast(OSM_FEATURES_SCHEMA))
    table = _first_of_each_real_id(pa.concat_tables(tables))
    table = sort_features(table)
    counts = dict.fromkeys(OSM_KINDS, 0)
    for kind, n in zip(*np.unique(table["kind"].to_numpy(zero_copy_only=False), return_counts=True)):
        counts[str(kind)] = int(n)
    report = IngestReport(source=PATH_LIST_SEP.join(paths), features=table.num_rows, by_kind=counts, repaired=repaired,
                          dropped=dropped, reprojected_from=reprojected_from)
    return table, report


def _first_of_each_real_id(table: pa.Table) -> pa.Table:
    """Drop later rows whose real ``(osm_id, kind)`` (``osm_id >= 0``) an earlier row already has."""
    if table.num_rows == 0:
        return table
    ids = table["osm_id"].to_numpy()
    rank = np.array([OSM_KINDS.index(k) for k in table["kind"].to_pylist()], np.int64)
    real = np.flatnonzero(ids >= 0)
    keep = ids < 0
    _, first = np.unique(ids[real] * len(OSM_KINDS) + rank[real], return_index=True)
    keep[real[first]] = True
    return table if keep.all() else table.filter(pa.array(keep))
