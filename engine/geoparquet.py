"""GeoParquet 1.1 reading and writing for tables that carry columns geopandas cannot (``tags`` as a map).

Why by hand: geopandas writes the ``geo`` metadata only for whole GeoDataFrames, and a pandas round trip turns
a ``map<string,string>`` column into a list of tuples or a struct. The metadata itself is a small JSON document
(spec: https://geoparquet.org/releases/v1.1.0/), computed here with shapely from the WKB column, so the files
open unchanged in geopandas, GDAL/pyogrio and DuckDB spatial.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from engine.atomic import atomic_path

GEOPARQUET_VERSION = "1.1.0"


def geo_metadata(wkb: pa.ChunkedArray | pa.Array, crs: CRS | int | str, column: str = "geometry") -> dict:
    """The GeoParquet ``geo`` metadata for one WKB geometry column (encoding, types, CRS as PROJJSON, bbox).

    Example:
        >>> md = geo_metadata(pa.array([shapely.Point(1, 2).wkb]), 4326)
        >>> md["columns"]["geometry"]["bbox"], md["columns"]["geometry"]["geometry_types"]
        ([1.0, 2.0, 1.0, 2.0], ['Point'])
    """
    geoms = shapely.from_wkb(np.asarray(wkb.to_numpy(zero_copy_only=False), dtype=object))
    types = sorted({t for t in shapely.get_type_id(geoms).tolist()})
    names = sorted(_TYPE_NAMES[t] for t in types if t in _TYPE_NAMES)
    bounds = shapely.total_bounds(geoms) if len(geoms) else np.array([np.nan] * 4)
    column_md: dict = {
        "encoding": "WKB",
        "geometry_types": names,
        "crs": CRS.from_user_input(crs).to_json_dict(),
    }
    if np.all(np.isfinite(bounds)):
        column_md["bbox"] = [float(b) for b in bounds]
    return {"version": GEOPARQUET_VERSION, "primary_column": column, "columns": {column: column_md}}


def write_geoparquet(table: pa.Table, path: str | os.PathLike[str], crs: CRS | int | str, column: str = "geometry") -> Path:
    """Write ``table`` (with a WKB ``column``) as GeoParquet, atomically, deterministically (same rows, same bytes).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "pts.parquet"
        >>> _ = write_geoparquet(pa.table({"geometry": [shapely.Point(1, 2).wkb]}), p, 4326)
        >>> gpd.read_parquet(p).crs.to_epsg()
        4326
    """
    md = dict(table.schema.metadata or {})
    md[b"geo"] = json.dumps(geo_metadata(table[column], crs, column)).encode()
    table = table.replace_schema_metadata(md)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=64_000)
    return path


def read_geoparquet_crs(path: str | os.PathLike[str]) -> CRS | None:
    """CRS of a GeoParquet file's primary column from its metadata alone (no data read); None when absent.

    GeoParquet says a column without ``crs`` is OGC:CRS84 (lon/lat WGS84), returned here as EPSG:4326.
    """
    md = pq.read_schema(path).metadata or {}
    if b"geo" not in md:
        return None
    geo = json.loads(md[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    if "crs" not in column:
        return CRS.from_epsg(4326)
    if column["crs"] is None:
        return None
    return CRS.from_user_input(column["crs"])


def table_to_gdf(table: pa.Table, crs: CRS | int | str, column: str = "geometry") -> gpd.GeoDataFrame:
    """A GeoDataFrame of a WKB table's geometries plus its plain columns (map columns become dicts)."""
    data = {}
    for name in table.column_names:
        if name == column:
            continue
        col = table[name]
        if pa.types.is_map(col.type):
            data[name] = [dict(v) if v is not None else {} for v in col.to_pylist()]
        else:
            data[name] = col.to_pandas()
    geoms = shapely.from_wkb(np.asarray(table[column].to_numpy(zero_copy_only=False), dtype=object))
    return gpd.GeoDataFrame(data, geometry=geoms, crs=crs)


_TYPE_NAMES = {
    0: "Point",
    1: "LineString",
    3: "Polygon",
    4: "MultiPoint",
    5: "MultiLineString",
    6: "MultiPolygon",
    7: "GeometryCollection",
}
