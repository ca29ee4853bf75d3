"""Building footprints of a city: from the catalog's optional ``buildings`` file, else from OSM's ``building=*``.

Real users have building data: national building datasets, open footprint releases, OSM. A catalog row may name
one file (GeoParquet, GeoPackage, GeoJSON; also Shapefile and FlatGeobuf) of footprint polygons in any CRS, with
an optional ``height_m`` (or ``height``) column in metres and/or a ``levels`` (or ``building:levels``,
``building_levels``) column of floors. Everything is read into :data:`engine.schema.BUILDINGS_SCHEMA` (EPSG:4326):

* only the buildings meeting the imagery's bounds are read (GeoParquet by row group, the others by pyogrio's
  bbox filter in the file's own CRS), so a nationwide file is never loaded whole;
* any CRS is reprojected to EPSG:4326; a file without one is refused (GeoJSON is EPSG:4326 by its spec);
* multipolygons are split into their polygons; invalid polygons are repaired with ``shapely.make_valid`` (keeping
  the polygonal parts) and counted; empty, non-polygonal or unrepairable rows are dropped and counted (rows
  without a readable geometry too, when no bbox is given: with one, they lie in no city's bounds);
* heights and levels must be numbers (numeric text such as ``"12.5"`` is accepted); any other value is refused
  naming the file, the column and an example; zero or negative values become null.

Without a ``buildings`` file, the city's OSM polygons with a ``building`` tag (not ``building=no``) are used, with
``height`` (``"12"``, ``"12 m"``) and ``building:levels`` tags where they are numbers.

Errors are :class:`BuildingsError`, one line naming the city and the file; :func:`buildings_summary` turns each
city's outcome into a row (source, count, repaired, dropped, or the error) and never lets one city stop another.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from engine import storage
from engine.errors import describe_error
from engine.geoparquet import read_geoparquet_crs
from engine.schema import BUILDINGS_SCHEMA

__all__ = [
    "HEIGHT_COLUMNS",
    "LEVELS_COLUMNS",
    "BuildingsError",
    "BuildingsRead",
    "buildings_from_osm",
    "buildings_summary",
    "city_buildings",
    "imagery_bounds_4326",
    "read_buildings",
]

HEIGHT_COLUMNS: tuple[str, ...] = ("height_m", "height")
"""Columns read as the building height in metres, first match wins."""
LEVELS_COLUMNS: tuple[str, ...] = ("levels", "building:levels", "building_levels")
"""Columns read as the number of floors, first match wins."""
PARQUET_SUFFIXES = (".parquet", ".geoparquet")
OGR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
_GEOJSON_SUFFIXES = (".geojson", ".json")
_WGS84 = CRS.from_epsg(4326)
_BATCH_ROWS = 65_536

BBox = tuple[float, float, float, float]


class BuildingsError(ValueError):
    """A buildings input cannot be used; one line naming the city (when known), the file and what to do."""


@dataclass(frozen=True)
class BuildingsRead:
    """One city's buildings and where they came from.

    Attributes:
        table: the footprints, :data:`engine.schema.BUILDINGS_SCHEMA` (EPSG:4326).
        source: ``"catalog"`` (the row's ``buildings`` file) or ``"osm"`` (OSM ``building=*`` polygons).
        path: the file read.
        repaired: invalid footprints fixed with ``make_valid`` and kept.
        dropped: rows dropped: missing, empty or non-polygonal geometry, or nothing polygonal left after repair.
        crs_from: the file's CRS (``"EPSG:32650"``) when it was reprojected, else None.
    """

    table: pa.Table
    source: str
    path: str
    repaired: int = 0
    dropped: int = 0
    crs_from: str | None = None

    @property
    def count(self) -> int:
        return self.table.num_rows


# --- entry points -------------------------------------------------------------------------------------------------
def read_buildings(path: str | os.PathLike[str], bbox_4326: BBox | None = None, city: str | None = None) -> BuildingsRead:
    """Read a building footprint file into :data:`engine.schema.BUILDINGS_SCHEMA` (EPSG:4326).

    Args:
        path: a GeoParquet, GeoPackage, GeoJSON, Shapefile or FlatGeobuf file, in any CRS.
        bbox_4326: ``(west, south, east, north)``: keep the footprints meeting it (usually the imagery's bounds);
            a file with features but none inside it is an error (it does not overlap the imagery).
        city: named in error messages.

    An empty file is a city without buildings (an empty table), not an error.

    Raises:
        BuildingsError: the file is missing or unreadable, has no CRS, a non-numeric height or levels value, or
            its footprints lie outside ``bbox_4326`` (it does not overlap the imagery).

    Example:
        >>> import tempfile, geopandas as gpd
        >>> p = Path(tempfile.mkdtemp()) / "b.geojson"
        >>> gpd.GeoDataFrame({"height_m": [9.0]}, geometry=[shapely.box(114.30, 30.59, 114.3001, 30.5901)],
        ...                  crs=4326).to_file(p)
        >>> r = read_buildings(p, city="wuhan")
        >>> r.count, r.source, r.table["height_m"].to_pylist()
        (1, 'catalog', [9.0])
    """
    where = _where(city, path)
    local = _local(path, where)
    name = local.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        geoms, height, levels, crs, file_bounds = _read_parquet(local, bbox_4326, where)
    elif name.endswith(OGR_SUFFIXES):
        geoms, height, levels, crs, file_bounds = _read_ogr(local, bbox_4326, where)
    else:
        raise BuildingsError(f"{where}: unknown format {local.suffix!r}; use GeoParquet, GeoPackage or GeoJSON "
                             f"({', '.join(PARQUET_SUFFIXES + OGR_SUFFIXES)})")
    table, repaired, dropped, crs_from = _finish(geoms, height, levels, crs, bbox_4326, where)
    if table.num_rows == 0 and bbox_4326 is not None and file_bounds is not None \
            and not shapely.box(*file_bounds).intersects(shapely.box(*bbox_4326)):
        raise BuildingsError(f"{where} does not overlap the imagery (imagery {_fmt(bbox_4326)}, buildings "
                             f"{_fmt(file_bounds)} in EPSG:4326); "
                             "check the file is for this city and its CRS is right")
    return BuildingsRead(table=table, source="catalog", path=str(path), repaired=repaired, dropped=dropped, crs_from=crs_from)


def buildings_from_osm(osm_path: str | os.PathLike[str], bbox: BBox | None = None, city: str | None = None) -> BuildingsRead:
    """The OSM polygons tagged ``building=*`` (not ``building=no``) of an OSM file, as buildings.

    ``height_m`` from the ``height`` tag and ``levels`` from ``building:levels`` where they are numbers (``"12"``,
    ``"12.5 m"``); other values are left null (OSM is free text). Any OSM file form ``engine.osm.read_osm`` reads, a
    ``;`` list or folder of them, or a partitioned OSM dataset (read by ``bbox``: ``engine.osm.read_osm_sources``).

    Example:
        >>> import tempfile, geopandas as gpd
        >>> p = Path(tempfile.mkdtemp()) / "osm.geojson"
        >>> gpd.GeoDataFrame({"building": ["yes", None], "building:levels": ["3", None], "amenity": [None, "cafe"]},
        ...     geometry=[shapely.box(114.3, 30.59, 114.3001, 30.5901), shapely.Point(114.3, 30.59)], crs=4326).to_file(p)
        >>> r = buildings_from_osm(p)
        >>> r.source, r.count, r.table["levels"].to_pylist()
        ('osm', 1, [3.0])
    """
    from engine.osm import PATH_LIST_SEP, OsmIngestError, local_sources, read_osm, read_osm_sources

    where = _where(city, osm_path)
    try:
        if PATH_LIST_SEP in str(osm_path) or Path(osm_path).is_dir():  # several files, a folder, a partitioned dataset
            osm, report = read_osm_sources(local_sources(str(osm_path)), bbox)
        else:
            local = _local(osm_path, where)
            osm, report = read_osm(local, bbox)
    except OsmIngestError as exc:
        raise BuildingsError(f"city {city}: {exc}" if city else str(exc)) from None
    kinds = np.asarray(osm["kind"].to_numpy(zero_copy_only=False), dtype=object)
    tags = osm["tags"].to_pylist()
    keep = [i for i in np.flatnonzero(kinds == "polygon") if _building_tag(tags[i])]
    geoms = shapely.from_wkb(np.asarray(osm["geometry"].take(pa.array(keep, pa.int64())).to_numpy(zero_copy_only=False), dtype=object))
    height = np.array([_osm_number(dict(tags[i]).get("height")) for i in keep], dtype=np.float64)
    levels = np.array([_osm_number(dict(tags[i]).get("building:levels")) for i in keep], dtype=np.float64)
    table, repaired, dropped, _ = _finish(geoms, height, levels, _WGS84, None, where)
    return BuildingsRead(table=table, source="osm", path=str(osm_path), repaired=repaired, dropped=dropped,
                         crs_from=report.reprojected_from)


def city_buildings(row: dict) -> BuildingsRead:
    """A catalog row's buildings: its ``buildings`` file when it has one, else the ``building=*`` polygons of its
    ``osm``; both limited to the imagery's bounds (when the row names readable imagery).

    Raises:
        BuildingsError: one line naming the city and the file (see :func:`read_buildings`).
    """
    city = row.get("city") or "?"
    bbox = imagery_bounds_4326(row["imagery"], city) if row.get("imagery") else None
    if row.get("buildings"):
        return read_buildings(row["buildings"], bbox, city=city)
    if not row.get("osm"):
        raise BuildingsError(f"city {city}: no buildings file and no OSM file to take buildings from")
    return buildings_from_osm(row["osm"], bbox, city=city)


def buildings_summary(rows: list[dict]) -> list[dict]:
    """Each city's buildings outcome as a row: ``city``, ``buildings_source`` (``catalog``/``osm``, None on error),
    ``buildings_path``, ``buildings`` (count), ``buildings_repaired``, ``buildings_dropped``, ``buildings_error``
    (one line, None when fine). One city's bad input never stops the others."""
    out = []
    for row in rows:
        entry = {"city": row.get("city"), "buildings_source": None, "buildings_path": row.get("buildings") or row.get("osm"),
                 "buildings": 0, "buildings_repaired": 0, "buildings_dropped": 0, "buildings_error": None}
        try:
            read = city_buildings(row)
        except BuildingsError as exc:
            entry["buildings_error"] = str(exc)
        except Exception as exc:  # an unexpected reader failure is this city's problem, never the run's
            entry["buildings_error"] = f"city {row.get('city')}: buildings could not be read: {describe_error(exc)}"
        else:
            entry.update(buildings_source=read.source, buildings_path=read.path, buildings=read.count,
                         buildings_repaired=read.repaired, buildings_dropped=read.dropped)
        out.append(entry)
    return out


def imagery_bounds_4326(path: str, city: str | None = None) -> BBox:
    """The bounds of a raster in EPSG:4326 (from its header only)."""
    import rasterio
    from rasterio.warp import transform_bounds

    try:
        with storage.raster_env(), rasterio.open(path) as src:
            if src.crs is None:
                raise BuildingsError(f"{_where(city, path, 'imagery')} has no CRS, so its buildings cannot be placed")
            return tuple(transform_bounds(src.crs, _WGS84, *src.bounds, densify_pts=21))  # type: ignore[return-value]
    except rasterio.errors.RasterioError as exc:
        raise BuildingsError(f"{_where(city, path, 'imagery')} cannot be read: {describe_error(exc)}") from None


# --- readers ------------------------------------------------------------------------------------------------------
def _read_parquet(path: Path, bbox: BBox | None, where: str):
    """Row groups streamed, each decoded and filtered by the bbox (in the file's CRS) before the next."""
    try:
        pf = pq.ParquetFile(path)
        md = pf.schema_arrow.metadata or {}
    except Exception as exc:
        raise BuildingsError(f"{where} cannot be read as Parquet ({describe_error(exc)}); write it again") from None
    if b"geo" not in md:
        raise BuildingsError(f"{where} is Parquet without GeoParquet 'geo' metadata, so its CRS is unknown; write it "
                             "with geopandas' to_parquet or GDAL (ogr2ogr -f Parquet)")
    geo = json.loads(md[b"geo"])
    column = geo.get("primary_column", "geometry")
    encoding = geo.get("columns", {}).get(column, {}).get("encoding", "WKB")
    crs = read_geoparquet_crs(path)
    if crs is None:
        raise BuildingsError(f"{where} has no CRS (GeoParquet 'crs' is null); write it again with its CRS set "
                             "(geopandas set_crs, then to_parquet)")
    names = pf.schema_arrow.names
    height_col = next((c for c in HEIGHT_COLUMNS if c in names), None)
    levels_col = next((c for c in LEVELS_COLUMNS if c in names), None)
    if str(encoding).upper() != "WKB":  # GeoArrow-native geometries: geopandas decodes them (whole file)
        import geopandas as gpd

        try:
            df = gpd.read_parquet(path)
        except Exception as exc:
            raise BuildingsError(f"{where} cannot be read as GeoParquet ({describe_error(exc)})") from None
        return _from_frame(df, height_col, levels_col, crs, bbox, where)
    box = _bbox_in(crs, bbox, where)
    parts, heights, levels, bounds = [], [], [], []
    columns = [column] + [c for c in (height_col, levels_col) if c]
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        geoms = shapely.from_wkb(np.asarray(batch.column(column).to_numpy(zero_copy_only=False), dtype=object), on_invalid="ignore")
        ok = ~shapely.is_missing(geoms)
        if ok.any():
            bounds.append(shapely.total_bounds(geoms[ok]))
        # rows without a readable geometry cannot be placed: outside every bbox (as with pyogrio's bbox filter)
        keep = shapely.intersects(geoms, box) if box is not None else np.ones(len(geoms), bool)
        idx = np.flatnonzero(keep)
        parts.append(geoms[idx])
        heights.append(_numbers(batch.column(height_col).to_pandas().iloc[idx], height_col, where) if height_col else np.full(len(idx), np.nan))
        levels.append(_numbers(batch.column(levels_col).to_pandas().iloc[idx], levels_col, where) if levels_col else np.full(len(idx), np.nan))
    file_bounds = _to_4326_bounds(crs, _union_bounds(bounds))
    if not parts:  # an empty file
        return np.empty(0, object), np.zeros(0), np.zeros(0), crs, None
    return np.concatenate(parts), np.concatenate(heights), np.concatenate(levels), crs, file_bounds


def _read_ogr(path: Path, bbox: BBox | None, where: str):
    import pyogrio

    try:
        layers = [(str(n), str(t)) for n, t in pyogrio.list_layers(path) if t is not None]
        if not layers:
            raise BuildingsError(f"{where} has no layer with geometries; export the footprints with their geometry")
        layer = next((n for n, t in layers if "polygon" in t.lower()), layers[0][0])
        info = pyogrio.read_info(path, layer=layer, force_total_bounds=True)
    except BuildingsError:
        raise
    except Exception as exc:
        raise BuildingsError(f"{where} cannot be read as a vector file ({describe_error(exc)}); the file is corrupt, "
                             "incomplete (a shapefile needs its .shx/.dbf beside it) or of another format") from None
    if info.get("crs"):
        crs = CRS.from_user_input(info["crs"])
    elif path.name.lower().endswith(_GEOJSON_SUFFIXES):
        crs = _WGS84  # RFC 7946
    else:
        raise BuildingsError(f"{where} has no CRS; write it again with its CRS (a .prj beside a shapefile, set_crs() "
                             "in geopandas, or ogr2ogr -a_srs) so it can be placed on the imagery")
    fields = list(info["fields"])
    height_col = next((c for c in HEIGHT_COLUMNS if c in fields), None)
    levels_col = next((c for c in LEVELS_COLUMNS if c in fields), None)
    total = info.get("total_bounds")
    file_bounds = _to_4326_bounds(crs, tuple(float(b) for b in total)) if total is not None and np.all(np.isfinite(total)) else None
    box = _bbox_in(crs, bbox, where)
    try:
        df = pyogrio.read_dataframe(path, layer=layer, columns=[c for c in (height_col, levels_col) if c],
                                    bbox=tuple(box.bounds) if box is not None else None)
    except Exception as exc:
        raise BuildingsError(f"{where} cannot be read ({describe_error(exc)})") from None
    geoms, height, levels, _, _ = _from_frame(df, height_col, levels_col, crs, None, where)
    return geoms, height, levels, crs, file_bounds


def _from_frame(df, height_col, levels_col, crs: CRS, bbox: BBox | None, where: str):
    geoms = np.asarray(df.geometry.values, dtype=object)
    box = _bbox_in(crs, bbox, where)
    if box is not None:
        keep = shapely.intersects(geoms, box)
        df, geoms = df.iloc[np.flatnonzero(keep)], geoms[keep]
    n = len(geoms)
    height = _numbers(df[height_col], height_col, where) if height_col else np.full(n, np.nan)
    levels = _numbers(df[levels_col], levels_col, where) if levels_col else np.full(n, np.nan)
    valid = geoms[~shapely.is_missing(geoms)]
    bounds = _to_4326_bounds(crs, tuple(shapely.total_bounds(valid))) if len(valid) else None
    return geoms, height, levels, crs, bounds


# --- cleaning -----------------------------------------------------------------------------------------------------
def _finish(geoms: np.ndarray, height: np.ndarray, levels: np.ndarray, crs: CRS, bbox: BBox | None, where: str):
    """Reproject, repair, split multipolygons, drop what is not a polygon, filter by the bbox; build the table."""
    geoms = np.asarray(geoms, dtype=object)
    present = ~shapely.is_missing(geoms)
    geoms[present] = shapely.force_2d(geoms[present])
    crs_from = None
    if not crs.equals(_WGS84, ignore_axis_order=True):
        crs_from = _crs_name(crs)
        transformer = Transformer.from_crs(crs, _WGS84, always_xy=True)
        try:
            geoms[present] = shapely.transform(geoms[present], lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
        except Exception as exc:
            raise BuildingsError(f"{where}: cannot reproject from {crs_from} to EPSG:4326 ({exc}); check the file's CRS") from None
    usable = present & ~shapely.is_empty(geoms)
    invalid = np.flatnonzero(usable & ~shapely.is_valid(geoms))
    repaired = 0
    for i in invalid:
        fixed = _polygonal(geoms[i])
        if fixed is None:
            usable[i] = False
        else:
            geoms[i] = fixed
            repaired += 1
    type_id = shapely.get_type_id(geoms)
    polygonal = usable & np.isin(type_id, (3, 6))
    mixed = np.flatnonzero(usable & (type_id == 7))  # a collection: its polygons, if any
    for i in mixed:
        fixed = _polygonal(geoms[i])
        if fixed is not None:
            geoms[i] = fixed
            polygonal[i] = True
    dropped = int(len(geoms) - polygonal.sum())
    idx = np.flatnonzero(polygonal)
    parts, owner = shapely.get_parts(geoms[idx], return_index=True)
    keep = ~shapely.is_empty(parts) & (shapely.area(parts) > 0)
    parts, owner = parts[keep], owner[keep]
    if bbox is not None:
        inside = shapely.intersects(parts, shapely.box(*bbox))
        parts, owner = parts[inside], owner[inside]
    src = idx[owner]
    h = np.where(height[src] > 0, height[src], np.nan) if len(src) else np.zeros(0)
    lv = np.where(levels[src] > 0, levels[src], np.nan) if len(src) else np.zeros(0)
    table = pa.table(
        {
            "building_id": pa.array(np.arange(1, len(parts) + 1, dtype=np.int64)),
            "height_m": pa.array(h, pa.float64(), from_pandas=True),
            "levels": pa.array(lv, pa.float64(), from_pandas=True),
            "geometry": pa.array(shapely.to_wkb(parts, output_dimension=2, byte_order=1, flavor="iso").tolist() if len(parts) else [], pa.binary()),
        },
        schema=BUILDINGS_SCHEMA,
    )
    return table, repaired, dropped, crs_from


def _polygonal(geom) -> shapely.Geometry | None:
    """``make_valid``, then only the polygonal parts (a Polygon or MultiPolygon), or None when nothing is left."""
    try:
        fixed = shapely.make_valid(geom)
    except shapely.errors.GEOSException:
        return None
    parts = [p for p in _flatten(fixed) if shapely.get_type_id(p) == 3 and not p.is_empty and p.area > 0]
    if not parts:
        return None
    out = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    if not out.is_valid:
        out = shapely.union_all(parts)
    return out if not out.is_empty and shapely.get_type_id(out) in (3, 6) else None


def _flatten(geom):
    for part in shapely.get_parts(geom):
        if shapely.get_type_id(part) in (6, 7):
            yield from _flatten(part)
        else:
            yield part


def _numbers(values: pd.Series, column: str, where: str) -> np.ndarray:
    """A height or levels column as float64; text that is not a number is an error naming the column and a value."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise BuildingsError(f"{where}: column '{column}' holds true/false, not numbers; it must be a number per building")
    if pd.api.types.is_numeric_dtype(values.dtype):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    parsed = pd.to_numeric(values, errors="coerce")
    blank = values.isna() | values.astype(str).str.strip().isin(["", "None", "nan", "NaN"])
    bad = parsed.isna() & ~blank
    if bad.any():
        example = values[bad].iloc[0]
        raise BuildingsError(f"{where}: column '{column}' is not numeric ({int(bad.sum())} value(s) such as {example!r}); "
                             f"write it as numbers ({'metres' if column in HEIGHT_COLUMNS else 'floors'}), null where unknown")
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


_OSM_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|meters?|metres?)?\s*$", re.IGNORECASE)


def _osm_number(value: str | None) -> float:
    if value is None:
        return np.nan
    m = _OSM_NUMBER.match(value.replace(",", "."))
    return float(m.group(1)) if m else np.nan


def _building_tag(tags) -> bool:
    value = dict(tags or []).get("building")
    return value is not None and value != "no"


# --- small helpers ------------------------------------------------------------------------------------------------
def _where(city: str | None, path, what: str = "buildings") -> str:
    return f"city {city}: {what} {path}" if city else f"{what} {path}"


def _local(path, where: str) -> Path:
    text = str(path)
    if storage.is_remote(text):
        try:
            return Path(storage.local_path(text))
        except Exception as exc:
            raise BuildingsError(f"{where} cannot be fetched: {describe_error(exc)}") from None
    p = Path(text)
    if not p.exists():
        raise BuildingsError(f"{where}: file not found")
    if not p.is_file():
        raise BuildingsError(f"{where} is not a file")
    return p


def _bbox_in(crs: CRS, bbox: BBox | None, where: str) -> shapely.Polygon | None:
    """The EPSG:4326 bbox as a box in ``crs`` (densified edges, so it covers the bbox after projection)."""
    if bbox is None:
        return None
    if crs.equals(_WGS84, ignore_axis_order=True):
        return shapely.box(*bbox)
    try:
        return shapely.box(*Transformer.from_crs(_WGS84, crs, always_xy=True).transform_bounds(*bbox, densify_pts=21))
    except Exception as exc:
        raise BuildingsError(f"{where}: the imagery's bounds cannot be projected to the file's CRS {_crs_name(crs)} ({exc})") from None


def _to_4326_bounds(crs: CRS, bounds: tuple | None) -> BBox | None:
    if bounds is None or not np.all(np.isfinite(bounds)):
        return None
    if crs.equals(_WGS84, ignore_axis_order=True):
        return tuple(float(b) for b in bounds)  # type: ignore[return-value]
    try:
        return tuple(Transformer.from_crs(crs, _WGS84, always_xy=True).transform_bounds(*bounds, densify_pts=21))  # type: ignore[return-value]
    except Exception:
        return None


def _union_bounds(bounds: list[np.ndarray]) -> tuple | None:
    if not bounds:
        return None
    b = np.array(bounds)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def _crs_name(crs: CRS) -> str:
    auth = crs.to_authority(min_confidence=70)
    return f"{auth[0]}:{auth[1]}" if auth else crs.to_string()


def _fmt(bounds) -> str:
    return "[" + ", ".join(f"{b:.4f}" for b in bounds) + "]"
