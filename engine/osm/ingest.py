"""OSM data from the common file forms into the OSM feature contract (``OSM_FEATURES_SCHEMA``, EPSG:4326).

Inputs, chosen by file name:

* ``.osm.pbf`` / ``.pbf`` (also ``.osm``, ``.osm.gz``, ``.osm.bz2``, ``.o5m``): read with pyosmium. Node locations
  are cached so ways get coordinates, and osmium's area assembler turns closed ways and multipolygon/boundary
  relations into areas. Only tagged elements become features: tagged nodes are points, ways are lines, areas are
  polygons. A closed way with area semantics (see :func:`is_area_tags`) appears once, as a polygon; a closed way
  without them (a roundabout, a fence) stays a line. Other relations (routes, restrictions) are not features.
  Ways whose nodes are missing from the file (cut at an extract border) cannot be built and are dropped, as
  ``osmium export`` does.
* ``.parquet`` / ``.geoparquet``: our own contract (``osm_id``, ``kind``, ``tags`` columns) read as is, any other
  GeoParquet read with geopandas and treated like the vector files below.
* ``.gpkg``, ``.geojson``, ``.json``, ``.shp``, ``.fgb``: read with pyogrio (every layer with geometries). Tags come
  from a ``label`` column (``key:value;key:value``, the GeoLink form), else a ``tags`` column (dicts, JSON objects
  or hstore text), else from the other columns (one tag per non-null column; GDAL's ``other_tags`` hstore column
  is unpacked). Ids come from an ``osm_id``, ``id`` or ``@id`` column when every value is an integer or an
  ``node/123``-style reference; otherwise rows get ``-1, -2, ...`` in file order (as :mod:`engine.osm.labels`).

Every input is reprojected to EPSG:4326; an input without a CRS is refused, except GeoJSON (EPSG:4326 by spec).
Geometries are cleaned the same way for all inputs: Z dropped, missing/empty rows dropped, invalid ones repaired
with ``shapely.make_valid`` keeping only the parts that match the kind. Rows are sorted by kind, ``osm_id`` and
geometry, so the same input always gives the same table (and, through ``write_geoparquet``, the same bytes).

OSM id scheme for osmium inputs (stable; :func:`encode_osm_id` / :func:`decode_osm_id`):
``osm_id = element id + OFFSET[type]`` with ``OFFSET = {node: 0, way: 10**15, relation: 2 * 10**15}``. A polygon
keeps the id of the way or relation it was built from (osmium's ``area.orig_id()``), so ``osm_id`` always names a
real OSM element and ids are unique across types for element ids below 10**15 (current ids are ~1.3e10).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from engine.geoparquet import read_geoparquet_crs, write_geoparquet
from engine.osm.labels import parse_label_tags
from engine.schema import OSM_FEATURES_SCHEMA, OSM_KINDS, SchemaError, check_schema

__all__ = [
    "ID_OFFSET",
    "IngestReport",
    "OsmIngestError",
    "decode_osm_id",
    "encode_osm_id",
    "ingest_osm",
    "is_area_tags",
    "read_osm",
]

# --- ids ----------------------------------------------------------------------------------------------------------
ID_OFFSET: dict[str, int] = {"node": 0, "way": 10**15, "relation": 2 * 10**15}
"""Added to an OSM element id to make ``osm_id`` unique across element types (see the module docstring)."""
_ID_SPAN = 10**15


def encode_osm_id(element_type: str, element_id: int) -> int:
    """``osm_id`` of an OSM element: ``element_id + ID_OFFSET[element_type]``.

    Example:
        >>> encode_osm_id("node", 42), encode_osm_id("way", 42), encode_osm_id("relation", 42)
        (42, 1000000000000042, 2000000000000042)
    """
    if element_type not in ID_OFFSET:
        raise ValueError(f"element type {element_type!r} is not one of {sorted(ID_OFFSET)}")
    if not 0 <= element_id < _ID_SPAN:
        raise ValueError(f"OSM {element_type} id {element_id} is outside 0..10**15, which the id scheme covers")
    return ID_OFFSET[element_type] + int(element_id)


def decode_osm_id(osm_id: int) -> tuple[str, int]:
    """Inverse of :func:`encode_osm_id` for ids from OSM files: ``(element type, element id)``.

    Example:
        >>> decode_osm_id(1000000000000042)
        ('way', 42)
    """
    if not 0 <= osm_id < 3 * _ID_SPAN:
        raise ValueError(f"osm_id {osm_id} was not made by encode_osm_id (negative ids are assigned row numbers)")
    kind = ("node", "way", "relation")[osm_id // _ID_SPAN]
    return kind, osm_id % _ID_SPAN


# --- report and error ---------------------------------------------------------------------------------------------
class OsmIngestError(ValueError):
    """An OSM input cannot be ingested; the message names the file, what is wrong and what to do."""


@dataclass(frozen=True)
class IngestReport:
    """What one ingest produced.

    Attributes:
        source: the input path.
        features: rows in the output (after the bbox filter).
        by_kind: rows per kind, every kind of ``OSM_KINDS`` present (0 when none).
        repaired: invalid geometries fixed with ``shapely.make_valid`` and kept.
        dropped: rows dropped for their geometry: missing, empty, unsupported type, not buildable from the file
            (ways with missing nodes, multipolygons osmium could not assemble) or still unusable after repair.
        reprojected_from: the input CRS (``"EPSG:32650"``) when it was not EPSG:4326, else None.
    """

    source: str
    features: int
    by_kind: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    dropped: int = 0
    reprojected_from: str | None = None


# --- area semantics for closed ways -------------------------------------------------------------------------------
_AREA_KEYS: dict[str, frozenset[str]] = {
    # key: values that are linear even on a closed way (everything else of that key is an area)
    "building": frozenset(),
    "building:part": frozenset(),
    "landuse": frozenset(),
    "landcover": frozenset(),
    "amenity": frozenset(),
    "shop": frozenset(),
    "office": frozenset(),
    "craft": frozenset(),
    "tourism": frozenset(),
    "historic": frozenset(),
    "military": frozenset(),
    "healthcare": frozenset(),
    "place": frozenset(),
    "sport": frozenset(),
    "water": frozenset(),
    "wetland": frozenset(),
    "parking": frozenset(),
    "area:highway": frozenset(),
    "leisure": frozenset({"track", "slipway"}),
    "natural": frozenset({"coastline", "cliff", "ridge", "arete", "tree_row", "valley", "gorge", "earth_bank"}),
    "man_made": frozenset({"embankment", "pipeline", "cutline", "dyke", "breakwater", "groyne", "goods_conveyor"}),
    "aeroway": frozenset({"runway", "taxiway", "parking_position"}),
    "power": frozenset({"line", "minor_line", "cable"}),
    "public_transport": frozenset({"stop_position"}),
}
_AREA_VALUES: dict[str, frozenset[str]] = {
    # keys that are linear except for these values
    "waterway": frozenset({"riverbank", "dock", "boatyard", "fuel"}),
    "highway": frozenset({"rest_area", "services", "platform"}),
    "railway": frozenset({"platform", "station", "turntable", "roundhouse"}),
}


def is_area_tags(tags: dict[str, str]) -> bool:
    """Whether a closed way with these tags is an area (polygon) rather than a closed line.

    ``area=yes`` / ``area=no`` decide; otherwise a key that implies an area (``building``, ``landuse``,
    ``amenity``, ``natural`` except ``coastline``/``cliff``..., the list follows osm2pgsql's polygon keys) or a
    polygon value of a linear key (``highway=rest_area``, ``waterway=riverbank``) makes it one.

    Example:
        >>> is_area_tags({"building": "yes"}), is_area_tags({"highway": "residential", "junction": "roundabout"})
        (True, False)
        >>> is_area_tags({"highway": "pedestrian", "area": "yes"}), is_area_tags({"natural": "coastline"})
        (True, False)
    """
    area = tags.get("area")
    if area == "yes":
        return True
    if area == "no":
        return False
    for key, value in tags.items():
        linear = _AREA_KEYS.get(key)
        if linear is not None and value != "no" and value not in linear:
            return True
        if value in _AREA_VALUES.get(key, ()):
            return True
    return False


# --- entry points -------------------------------------------------------------------------------------------------
_OSMIUM_SUFFIXES = (".osm.pbf", ".pbf", ".osm", ".osm.gz", ".osm.bz2", ".o5m")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet")
_VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
_GEOJSON_SUFFIXES = (".geojson", ".json")

BBox = tuple[float, float, float, float]


def read_osm(path: str | os.PathLike[str], bbox: BBox | None = None) -> tuple[pa.Table, IngestReport]:
    """Read an OSM file into a table with exactly ``OSM_FEATURES_SCHEMA`` (EPSG:4326), plus a report.

    Args:
        path: a ``.osm.pbf``/``.pbf`` (or ``.osm``, ``.osm.gz``, ``.osm.bz2``, ``.o5m``), ``.parquet``/
            ``.geoparquet``, ``.gpkg``, ``.geojson``/``.json``, ``.shp`` or ``.fgb`` file.
        bbox: ``(west, south, east, north)`` in EPSG:4326; features intersecting it are kept whole (not clipped).

    Raises:
        OsmIngestError: naming the file, when it is missing, of an unknown type, unreadable, without a CRS or
            not matching the contract it claims.

    Example:
        >>> import tempfile, geopandas as gpd
        >>> p = Path(tempfile.mkdtemp()) / "pois.geojson"
        >>> gpd.GeoDataFrame({"amenity": ["cafe"]}, geometry=[shapely.Point(13.4, 52.5)], crs=4326).to_file(p)
        >>> table, report = read_osm(p)
        >>> table["kind"].to_pylist(), table["tags"].to_pylist(), report.features
        (['point'], [[('amenity', 'cafe')]], 1)
    """
    path = Path(path)
    box = _check_bbox(path, bbox)
    if not path.exists():
        raise OsmIngestError(f"{path}: file does not exist; check the path (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise OsmIngestError(f"{path}: is not a file; give the path of one OSM file")
    name = path.name.lower()
    if name.endswith(_OSMIUM_SUFFIXES):
        staged = _read_osmium(path)
    elif name.endswith(_PARQUET_SUFFIXES):
        staged = _read_parquet(path)
    elif name.endswith(_VECTOR_SUFFIXES):
        staged = _read_vector(path)
    else:
        known = ", ".join(_OSMIUM_SUFFIXES + _PARQUET_SUFFIXES + _VECTOR_SUFFIXES)
        raise OsmIngestError(f"{path}: unknown OSM file type; rename or convert it to one of {known}")
    return _finish(path, staged, box)


def ingest_osm(
    path: str | os.PathLike[str], out_path: str | os.PathLike[str], bbox: BBox | None = None
) -> IngestReport:
    """:func:`read_osm` then write the table as GeoParquet (EPSG:4326, atomic, same input -> same bytes)."""
    table, report = read_osm(path, bbox)
    write_geoparquet(table, out_path, 4326)
    return report


# --- staging: what each reader hands to _finish -------------------------------------------------------------------
@dataclass
class _Staged:
    ids: list[int]
    kinds: list[str | None]  # None: unsupported geometry type, dropped in _finish
    tags: list[list[tuple[str, str]]]
    geoms: np.ndarray  # shapely geometries (object array), None where missing
    crs: CRS
    dropped: int = 0  # rows already lost before geometries existed (osmium could not build them)


_KIND_BY_TYPE_ID = {0: "point", 4: "point", 1: "line", 2: "line", 5: "line", 3: "polygon", 6: "polygon"}
_TYPE_IDS_BY_KIND = {"point": (0, 4), "line": (1, 2, 5), "polygon": (3, 6)}
_DIM_BY_KIND = {"point": 0, "line": 1, "polygon": 2}
_WGS84 = CRS.from_epsg(4326)


def _finish(path: Path, staged: _Staged, box: shapely.Polygon | None) -> tuple[pa.Table, IngestReport]:
    table, report, _ = _finish_with_geometries(path, staged, box)
    return table, report


def _finish_with_geometries(path: Path, staged: _Staged, box: shapely.Polygon | None
                            ) -> tuple[pa.Table, IngestReport, np.ndarray]:
    """Clean staged rows into the contract table (module docstring), its report and its shapely geometries (row
    order), so a caller that needs positions (the dataset writer) does not parse the WKB again."""
    geoms = np.asarray(staged.geoms, dtype=object)
    kinds = np.asarray(staged.kinds, dtype=object)
    ids = np.asarray(staged.ids, dtype=np.int64)
    tags = staged.tags

    present = ~shapely.is_missing(geoms)
    with_z = present & shapely.has_z(geoms)
    geoms[with_z] = shapely.force_2d(geoms[with_z])
    reprojected_from = None
    if not staged.crs.equals(_WGS84, ignore_axis_order=True):
        reprojected_from = _crs_name(staged.crs)
        transformer = Transformer.from_crs(staged.crs, _WGS84, always_xy=True)
        try:
            geoms[present] = shapely.transform(
                geoms[present], lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
            )
        except Exception as exc:  # pyproj errors carry no file name
            raise OsmIngestError(f"{path}: cannot reproject from {reprojected_from} to EPSG:4326 ({exc}); "
                                 "check the file's CRS") from exc

    type_ids = shapely.get_type_id(geoms)
    type_ok = np.array([k is not None and t in _TYPE_IDS_BY_KIND[k] for k, t in zip(kinds, type_ids)], dtype=bool)
    keep = present & type_ok & ~shapely.is_empty(geoms)
    rings = np.flatnonzero(keep & (type_ids == 2))
    if len(rings):  # a LinearRing is a closed line
        geoms[rings] = shapely.linestrings(shapely.get_coordinates(geoms[rings]), indices=_ring_indices(geoms[rings]))
    invalid = np.flatnonzero(keep & ~shapely.is_valid(geoms))
    repaired = 0
    for i in invalid:
        fixed = _repair(geoms[i], kinds[i])
        if fixed is None:
            keep[i] = False
        else:
            geoms[i] = fixed
            repaired += 1
    dropped = staged.dropped + int(len(keep) - keep.sum())

    if box is not None:
        keep &= shapely.intersects(geoms, box)
    idx = np.flatnonzero(keep)
    wkb = shapely.to_wkb(geoms[idx], output_dimension=2, byte_order=1, flavor="iso")
    table = pa.table(
        {
            "osm_id": pa.array(ids[idx], pa.int64()),
            "kind": pa.array(kinds[idx].tolist(), pa.string()),
            "tags": pa.array([tags[i] for i in idx], pa.map_(pa.string(), pa.string())),
            "geometry": pa.array(wkb.tolist(), pa.binary()),
        },
        schema=OSM_FEATURES_SCHEMA,
    )
    # deterministic order: kind (as in OSM_KINDS), osm_id, then WKB for duplicate ids
    order_key = pa.array([OSM_KINDS.index(k) for k in kinds[idx]], pa.int8())
    indices = pc.sort_indices(
        pa.table({"k": order_key, "id": table["osm_id"], "g": table["geometry"]}),
        sort_keys=[("k", "ascending"), ("id", "ascending"), ("g", "ascending")],
    )
    table = table.take(indices)
    geoms = geoms[idx][indices.to_numpy()]
    counts = {k: 0 for k in OSM_KINDS}
    for k in table["kind"].to_pylist():
        counts[k] += 1
    report = IngestReport(source=str(path), features=table.num_rows, by_kind=counts, repaired=repaired,
                          dropped=dropped, reprojected_from=reprojected_from)
    return table, report, geoms


def _ring_indices(rings: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(rings)), shapely.get_num_coordinates(rings))


def _repair(geom: shapely.Geometry, kind: str) -> shapely.Geometry | None:
    """``make_valid``, then the parts of the kind's dimension (one part as is, several as a Multi*); None if none."""
    try:
        fixed = shapely.make_valid(geom)
    except shapely.errors.GEOSException:
        return None
    parts = [p for p in _flatten(fixed) if not p.is_empty and shapely.get_dimensions(p) == _DIM_BY_KIND[kind]]
    if not parts:
        return None
    if len(parts) == 1:
        out = parts[0]
    elif kind == "polygon":
        out = shapely.MultiPolygon(parts)
        if not out.is_valid:  # parts sharing an edge: merge them
            out = shapely.union_all(parts)
    elif kind == "line":
        out = shapely.MultiLineString(parts)
    else:
        out = shapely.MultiPoint(parts)
    if out.is_empty or not out.is_valid or _KIND_BY_TYPE_ID.get(shapely.get_type_id(out)) != kind:
        return None
    return out


def _flatten(geom: shapely.Geometry) -> Iterable[shapely.Geometry]:
    for part in shapely.get_parts(geom):
        if shapely.get_type_id(part) == 7:
            yield from _flatten(part)
        elif shapely.get_type_id(part) == 2:
            yield shapely.LineString(part.coords)
        else:
            yield part


def _check_bbox(path: Path, bbox: BBox | None) -> shapely.Polygon | None:
    if bbox is None:
        return None
    try:
        west, south, east, north = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise OsmIngestError(f"{path}: bbox {bbox!r} is not four numbers (west, south, east, north)") from exc
    if not all(math.isfinite(v) for v in (west, south, east, north)) or west > east or south > north \
            or not (-180 <= west and east <= 180 and -90 <= south and north <= 90):
        raise OsmIngestError(f"{path}: bbox {bbox!r} must be (west, south, east, north) in degrees with "
                             "west <= east and south <= north (split a box crossing the antimeridian in two)")
    return shapely.box(west, south, east, north)


def _crs_name(crs: CRS) -> str:
    auth = crs.to_authority(min_confidence=70)
    return f"{auth[0]}:{auth[1]}" if auth else crs.name


# --- osmium (PBF, XML, O5M) ---------------------------------------------------------------------------------------
_AREA_RELATION_TYPES = ("multipolygon", "boundary")


def _read_osmium(path: Path) -> _Staged:
    return _concat_staged(list(_iter_osmium(path)))


def _iter_osmium(path: Path, batch_rows: int | None = None, locations: str = "flex_mem") -> Iterator[_Staged]:
    """Stream an osmium-readable file as staged batches of about ``batch_rows`` features (None: one batch).

    Why batches: a country extract holds tens of millions of features; holding them all (as :func:`read_osm` does
    for a city) does not fit in memory, so :mod:`engine.osm.dataset` cleans and writes each batch as it comes.
    ``locations`` is the osmium node location index (``"flex_mem"`` in memory; ``"sparse_file_array,<file>"``
    on disk for country files). A closed way with area semantics waits (in a small dict) for the area osmium
    builds from it right after the way; rings osmium refuses fall back to a polygon from the line, repaired later.
    """
    import osmium  # imported here: only the OSM-file path needs the C++ extension

    factory = osmium.geom.WKBFactory()
    build_errors = (osmium.InvalidLocationError, RuntimeError)
    ids: list[int] = []
    kinds: list[str | None] = []
    tags: list[list[tuple[str, str]]] = []
    wkb: list[str | None] = []
    area_ways: dict[int, tuple[list[tuple[str, str]], str | None]] = {}  # closed ways waiting for their area
    relation_candidates: set[int] = set()
    relation_areas: set[int] = set()
    dropped = 0

    def add(osm_id: int, kind: str, element_tags: list[tuple[str, str]], geom: str | None) -> None:
        ids.append(osm_id)
        kinds.append(kind)
        tags.append(element_tags)
        wkb.append(geom)

    def add_way_polygon(way_id: int, element_tags: list[tuple[str, str]], line: str | None, polygon: str | None) -> None:
        nonlocal dropped
        if polygon is None and line is not None:
            polygon = _polygon_from_line(line)  # osmium refused the ring (self-intersecting...): make_valid later
        if polygon is None:
            dropped += 1
        else:
            add(encode_osm_id("way", way_id), "polygon", element_tags, polygon)

    def batch() -> _Staged:
        nonlocal ids, kinds, tags, wkb, dropped
        raw = np.asarray([None if h is None else bytes.fromhex(h) for h in wkb], dtype=object)  # GEOS parses bytes 8x faster than hex
        geoms = shapely.from_wkb(raw, on_invalid="ignore") if wkb else np.empty(0, object)
        staged = _Staged(ids=ids, kinds=kinds, tags=tags, geoms=geoms, crs=_WGS84, dropped=dropped)
        ids, kinds, tags, wkb, dropped = [], [], [], [], 0
        return staged

    try:
        processor = (osmium.FileProcessor(str(path)).with_locations(locations).with_areas()
                     .with_filter(osmium.filter.EmptyTagFilter()))
        for obj in processor:  # the order of the tests follows how common each type is in country extracts
            if obj.is_area():
                if obj.from_way():
                    waiting = area_ways.pop(obj.orig_id(), None)  # None: no area semantics, the way is a line
                    if waiting is not None:
                        add_way_polygon(obj.orig_id(), waiting[0], waiting[1], _multipolygon(factory, obj, build_errors))
                else:
                    relation_areas.add(obj.orig_id())
                    polygon = _multipolygon(factory, obj, build_errors)
                    if polygon is None:
                        dropped += 1
                    else:
                        add(encode_osm_id("relation", obj.orig_id()), "polygon", list(obj.tags), polygon)
            elif obj.is_way():
                element_tags = list(obj.tags)  # (key, value) named tuples
                try:
                    line = factory.create_linestring(obj)
                except build_errors:  # nodes missing from the file, or fewer than two distinct locations
                    line = None
                if obj.is_closed() and is_area_tags(dict(element_tags)):
                    area_ways[obj.id] = (element_tags, line)
                elif line is None:
                    dropped += 1
                else:
                    add(encode_osm_id("way", obj.id), "line", element_tags, line)
            elif obj.is_node():
                try:
                    add(encode_osm_id("node", obj.id), "point", list(obj.tags), factory.create_point(obj))
                except build_errors:
                    dropped += 1
            elif obj.is_relation():
                if obj.tags.get("type") in _AREA_RELATION_TYPES and len(obj.tags) > 1:
                    relation_candidates.add(obj.id)
            if batch_rows is not None and len(ids) >= batch_rows:
                yield batch()
    except OsmIngestError:
        raise
    except Exception as exc:
        raise OsmIngestError(f"{path}: cannot read as an OSM file ({exc}); the file is corrupt, truncated or not "
                             "OSM data: download or export it again") from exc

    for way_id, (element_tags, line) in area_ways.items():  # closed ways osmium built no area from
        add_way_polygon(way_id, element_tags, line, None)
    dropped += len(relation_candidates - relation_areas)  # multipolygons osmium could not assemble
    yield batch()


def _multipolygon(factory, area, build_errors: tuple) -> str | None:
    try:
        return factory.create_multipolygon(area)
    except build_errors:
        return None


def _concat_staged(batches: list[_Staged]) -> _Staged:
    """One staged table from several (same CRS): what :func:`_finish` cleans in one go."""
    if len(batches) == 1:
        return batches[0]
    geoms = [b.geoms for b in batches if len(b.geoms)]
    return _Staged(ids=[i for b in batches for i in b.ids], kinds=[k for b in batches for k in b.kinds],
                   tags=[t for b in batches for t in b.tags],
                   geoms=np.concatenate(geoms) if geoms else np.empty(0, object),
                   crs=batches[0].crs if batches else _WGS84, dropped=sum(b.dropped for b in batches))


def _polygon_from_line(line_wkb: str) -> str | None:
    coords = shapely.get_coordinates(shapely.from_wkb(line_wkb))
    if len(coords) < 4:
        return None
    return shapely.to_wkb(shapely.Polygon(coords), hex=True)


# --- GeoParquet ---------------------------------------------------------------------------------------------------
_CONTRACT_COLUMNS = ("osm_id", "kind", "tags")


def _read_parquet(path: Path) -> _Staged:
    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise OsmIngestError(f"{path}: cannot read as Parquet ({exc}); the file is corrupt or not Parquet: "
                             "write it again") from exc
    if all(c in names for c in _CONTRACT_COLUMNS):
        return _read_contract_parquet(path)
    import geopandas as gpd

    try:
        df = gpd.read_parquet(path)
    except Exception as exc:
        raise OsmIngestError(f"{path}: cannot read as GeoParquet ({exc}); write it with geopandas' to_parquet "
                             "or engine.geoparquet.write_geoparquet so it carries 'geo' metadata") from exc
    return _from_frames(path, [df], row_offset=0)


def _read_contract_parquet(path: Path) -> _Staged:
    try:
        table = pq.read_table(path)
        crs = read_geoparquet_crs(path)
    except Exception as exc:
        raise OsmIngestError(f"{path}: cannot read as GeoParquet ({exc}); the file is corrupt: write it again") from exc
    if crs is None:
        raise OsmIngestError(f"{path}: GeoParquet without a CRS (no 'geo' metadata or crs null); write it with "
                             "engine.geoparquet.write_geoparquet or geopandas with a CRS set")
    try:
        table = check_schema(table, OSM_FEATURES_SCHEMA, str(path))
    except SchemaError as exc:
        raise OsmIngestError(f"{exc}; fix the columns or drop osm_id/kind/tags to read it as plain GeoParquet") from exc
    if table["osm_id"].null_count:
        raise OsmIngestError(f"{path}: {table['osm_id'].null_count} rows without osm_id; fill or drop them")
    kinds = table["kind"].to_pylist()
    bad = sorted({str(k) for k in kinds if k not in OSM_KINDS})
    if bad:
        raise OsmIngestError(f"{path}: kind values {bad} are not one of {list(OSM_KINDS)}; fix the kind column")
    geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object),
                             on_invalid="ignore")
    tags = [list(t) if t is not None else [] for t in table["tags"].to_pylist()]
    return _Staged(ids=table["osm_id"].to_pylist(), kinds=kinds, tags=tags, geoms=geoms, crs=crs)


# --- vector files (pyogrio) ---------------------------------------------------------------------------------------
def _read_vector(path: Path) -> _Staged:
    import pyogrio

    try:
        layers = [str(name) for name, geom_type in pyogrio.list_layers(path) if geom_type is not None]
        if not layers:
            raise OsmIngestError(f"{path}: no layer with geometries; export the OSM features with their geometry")
        frames = [pyogrio.read_dataframe(path, layer=layer) for layer in layers]
    except OsmIngestError:
        raise
    except Exception as exc:
        raise OsmIngestError(f"{path}: cannot read as a vector file ({exc}); the file is corrupt, incomplete "
                             "(a shapefile needs its .shx/.dbf beside it) or of another format: export it again"
                             ) from exc
    return _from_frames(path, frames, row_offset=0)


def _from_frames(path: Path, frames: list, row_offset: int) -> _Staged:
    """GeoDataFrames (one per layer) -> staged rows: CRS unified to the first layer's, tags and ids from columns."""
    ids: list[int] = []
    kinds: list[str | None] = []
    tags: list[list[tuple[str, str]]] = []
    geom_parts: list[np.ndarray] = []
    crs: CRS | None = None
    for df in frames:
        layer_crs = _frame_crs(path, df)
        if crs is None:
            crs = layer_crs
        elif not layer_crs.equals(crs, ignore_axis_order=True):
            df = df.to_crs(crs)
        geoms = np.asarray(df.geometry.values, dtype=object)
        n = len(df)
        layer_ids, id_column = _ids_from_columns(df, n, row_offset)
        row_offset += n
        ids.extend(layer_ids)
        tags.extend(_tags_from_columns(path, df, id_column))
        kinds.extend(_KIND_BY_TYPE_ID.get(t) for t in shapely.get_type_id(geoms).tolist())
        geom_parts.append(geoms)
    geoms = np.concatenate(geom_parts) if geom_parts else np.empty(0, object)
    return _Staged(ids=ids, kinds=kinds, tags=tags, geoms=geoms, crs=crs or _WGS84)


def _frame_crs(path: Path, df) -> CRS:
    if df.crs is not None:
        return CRS.from_user_input(df.crs)
    if path.name.lower().endswith(_GEOJSON_SUFFIXES):
        return _WGS84  # RFC 7946: GeoJSON is WGS84 lon/lat
    raise OsmIngestError(f"{path}: has no CRS; write it again with its CRS (a .prj beside a shapefile, "
                         "set_crs() in geopandas) so it can be reprojected to EPSG:4326")


_ID_COLUMNS = ("osm_id", "id", "@id")
_TYPED_REF = re.compile(r"^(node|way|relation|n|w|r)/?(\d+)$")
_TYPE_BY_PREFIX = {"n": "node", "w": "way", "r": "relation"}


def _ids_from_columns(df, n: int, row_offset: int) -> tuple[list[int], str | None]:
    """Ids from the first usable id column (all integers or all ``way/123`` refs), else ``-(row+1)`` in file order."""
    for column in _ID_COLUMNS:
        if column not in df.columns or column == df.geometry.name:
            continue
        parsed = _parse_ids(df[column])
        if parsed is not None:
            return parsed, column
    return list(range(-row_offset - 1, -row_offset - n - 1, -1)), None


def _parse_ids(series: pd.Series) -> list[int] | None:
    if series.isna().any():
        return None
    if pd.api.types.is_integer_dtype(series):
        return [int(v) for v in series]
    if pd.api.types.is_float_dtype(series):
        values = series.to_numpy()
        return [int(v) for v in values] if np.all(values == np.round(values)) else None
    out = []
    for value in series:
        text = str(value).strip()
        match = _TYPED_REF.match(text)
        if match and int(match[2]) < _ID_SPAN:
            out.append(encode_osm_id(_TYPE_BY_PREFIX.get(match[1], match[1]), int(match[2])))
        elif re.fullmatch(r"-?\d+", text):
            out.append(int(text))
        else:
            return None
    return out


def _tags_from_columns(path: Path, df, id_column: str | None) -> list[list[tuple[str, str]]]:
    if "label" in df.columns:
        return [list(parse_label_tags(v if isinstance(v, str) else None).items()) for v in df["label"]]
    if "tags" in df.columns:
        return [_parse_tags_value(path, v, row) for row, v in enumerate(df["tags"])]
    skip = {df.geometry.name, id_column}
    if "kind" in df.columns and df["kind"].dropna().isin(OSM_KINDS).all():
        skip.add("kind")  # our own contract's column, not a tag
    columns = [c for c in df.columns if c not in skip]
    rows: list[list[tuple[str, str]]] = [[] for _ in range(len(df))]
    for column in columns:
        if column == "other_tags":
            for row, value in enumerate(df[column]):
                if isinstance(value, str):
                    rows[row].extend(_parse_hstore(value).items())
            continue
        for row, value in enumerate(df[column].tolist()):
            text = _tag_value(value)
            if text is not None:
                rows[row].append((str(column), text))
    return rows


def _parse_tags_value(path: Path, value, row: int) -> list[tuple[str, str]]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if "=>" in text:
                return list(_parse_hstore(text).items())
            raise OsmIngestError(f"{path}: row {row}: 'tags' is neither a JSON object nor hstore text ({text[:60]!r}); "
                                 "store tags as a JSON object like {\"building\": \"yes\"}") from None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple, np.ndarray)):
        try:
            items = [(k, v) for k, v in value]
        except (TypeError, ValueError):
            raise OsmIngestError(f"{path}: row {row}: 'tags' list is not key/value pairs; store tags as a JSON "
                                 "object") from None
    else:
        raise OsmIngestError(f"{path}: row {row}: 'tags' holds a {type(value).__name__}; store tags as a JSON object")
    out = []
    for k, v in items:
        text = _tag_value(v)
        if text is not None:
            out.append((str(k), text))
    return out


_HSTORE_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*=>\s*(?:"((?:[^"\\]|\\.)*)"|NULL)')


def _parse_hstore(text: str) -> dict[str, str]:
    """GDAL's ``other_tags`` form: ``"key"=>"value","k2"=>"v2"`` (``NULL`` values dropped)."""
    unescape = lambda s: re.sub(r"\\(.)", r"\1", s)  # noqa: E731
    return {unescape(k): unescape(v) for k, v in _HSTORE_PAIR.findall(text) if v}


def _tag_value(value) -> str | None:
    """A column value as an OSM tag value; None for nulls and empty strings (OSM has no empty values)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    text = str(value)
    return text if text != "" else None
