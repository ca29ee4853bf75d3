"""OSM features to tiles: read a city's features once, reproject once, tokenise once, then clip per tile.

Partitioning, and why this split:
- **Across cities** the OSM file can be nationwide: DuckDB spatial scans the GeoParquet and keeps only rows
  intersecting the city's bounds (bound parameters, parallel, out-of-core), so no city ever loads the nation.
- **Within a city** the tiles of a chunk (a square block of the grid) are joined to the chunk's features with a
  shapely 2 STRtree (GEOS, vectorised): an in-memory O((n + m) log n) join with no serialisation, which beats a
  database round trip per chunk. dask-geopandas would add a scheduler inside Ray tasks for no gain here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from engine.db import connect
from geolink_model.osm_graph import OsmGraphConfig, TileGraph, build_tile_graphs, tokenize_tags

CONTRACT_COLUMNS = {"osm_id", "kind", "tags", "geometry"}


@dataclass(frozen=True)
class Features:
    """Features in the imagery CRS, tokenised: the join's input. Arrays of equal length."""

    osm_id: np.ndarray
    kind: np.ndarray
    tokens: np.ndarray
    geometry: np.ndarray

    def __len__(self) -> int:
        return int(len(self.osm_id))

    def take(self, idx: np.ndarray) -> Features:
        return Features(self.osm_id[idx], self.kind[idx], self.tokens[idx], self.geometry[idx])


def is_contract_geoparquet(path: str) -> bool:
    """True for GeoParquet already in the OSM feature contract (readable straight by DuckDB with a bbox filter)."""
    if not str(path).lower().endswith((".parquet", ".geoparquet")) or not Path(path).is_file():
        return False  # a ';' list ending in .parquet, or a folder: read_osm_sources
    schema = pq.read_schema(path)
    return CONTRACT_COLUMNS <= set(schema.names) and b"geo" in (schema.metadata or {})


def read_osm_bbox(path: str, bbox_wgs84: tuple[float, float, float, float]) -> pa.Table:
    """OSM features (contract) intersecting a lon/lat box: DuckDB for contract GeoParquet; a partitioned dataset folder
    by its cells and bbox columns; a ``;`` list or a plain folder as one (``engine.osm.read_osm_sources``); the ingest
    readers for any other file."""
    if is_contract_geoparquet(path):
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])
        crs = geo["columns"][geo["primary_column"]].get("crs")
        if crs is not None and not CRS.from_user_input(crs).equals(CRS.from_epsg(4326)):
            raise ValueError(f"{path}: OSM GeoParquet must be EPSG:4326 (found {CRS.from_user_input(crs).to_string()}); run ingest-osm")
        con = connect(threads=1)
        west, south, east, north = bbox_wgs84
        # ST_Intersects on the envelope: DuckDB prunes row groups on the geometry statistics and filters the rest
        return con.execute(
            "SELECT osm_id, kind, tags, ST_AsWKB(geometry) AS geometry FROM read_parquet(?) "
            "WHERE ST_Intersects(geometry, ST_MakeEnvelope(?, ?, ?, ?)) ORDER BY osm_id",
            [str(path), west, south, east, north],
        ).fetch_arrow_table()
    from engine.osm.sources import read_osm_sources

    table, _ = read_osm_sources(path, bbox=bbox_wgs84)
    return table


def to_features(table: pa.Table, crs: CRS, cfg: OsmGraphConfig) -> Features:
    """Reproject (once) from EPSG:4326 to ``crs`` and tokenise the tags (once per feature, not per tile)."""
    geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))
    t = Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        x, y = t.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    geoms = shapely.transform(geoms, project) if len(geoms) else geoms
    ok = ~shapely.is_empty(geoms) & shapely.is_valid(geoms) if len(geoms) else np.zeros(0, bool)
    if len(geoms) and not ok.all():  # reprojection can break validity at the edges: repair once, here
        geoms[~ok] = shapely.make_valid(geoms[~ok])
    return Features(
        osm_id=np.asarray(table["osm_id"].to_numpy(), np.int64),
        kind=np.asarray(table["kind"].to_numpy(zero_copy_only=False)).astype(str),
        tokens=tokenize_tags(table["tags"].to_pylist(), cfg),
        geometry=np.asarray(geoms, dtype=object),
    )


_POLYGONAL = {"Polygon", "MultiPolygon"}
_LINEAR = {"LineString", "MultiLineString", "LinearRing"}
_PUNCTUAL = {"Point", "MultiPoint"}
_KEEP = {"polygon": _POLYGONAL, "line": _LINEAR, "point": _PUNCTUAL}


def clip_to_tiles(features: Features, windows: np.ndarray) -> tuple[np.ndarray, Features]:
    """Pairs of (tile, clipped feature) for every feature intersecting a tile window, sorted by tile.

    A feature crossing a tile border keeps its clipped part; parts of the wrong dimension (a polygon that only
    touches the window) are dropped.

    Returns:
        ``(tile_index, clipped)``: the tile of each clipped feature and the clipped features.
    """
    if len(features) == 0 or len(windows) == 0:
        return np.zeros(0, np.int64), features.take(np.zeros(0, np.int64))
    tree = shapely.STRtree(features.geometry)
    tile_idx, feat_idx = tree.query(windows, predicate="intersects")
    order = np.lexsort((feat_idx, tile_idx))
    tile_idx, feat_idx = tile_idx[order], feat_idx[order]
    part = features.take(feat_idx)
    clipped = shapely.intersection(part.geometry, windows[tile_idx])
    types = shapely.get_type_id(clipped)
    keep = ~shapely.is_empty(clipped)
    names = np.array(["Point", "LineString", "LinearRing", "Polygon", "MultiPoint", "MultiLineString", "MultiPolygon", "GeometryCollection"])
    type_names = names[np.clip(types, 0, 7)]
    for kind, allowed in _KEEP.items():
        of_kind = part.kind == kind
        collections = of_kind & (type_names == "GeometryCollection") & keep
        for i in np.flatnonzero(collections):  # rare: mixed-dimension clip results; keep the kind's parts
            parts = [p for p in shapely.get_parts(clipped[i]) if p.geom_type in allowed]
            clipped[i] = shapely.union_all(parts) if parts else shapely.Point()
        keep &= ~of_kind | np.isin(type_names, list(allowed)) | collections
    keep &= ~shapely.is_empty(clipped)
    poly = (part.kind == "polygon") & keep
    keep[poly] &= shapely.area(clipped[poly]) > 0
    idx = np.flatnonzero(keep)
    return tile_idx[idx], Features(part.osm_id[idx], part.kind[idx], part.tokens[idx], clipped[idx])


def metres_per_unit(crs: CRS) -> float:
    """Metres in one unit of ``crs`` (1 for metric projections; about 111 320 for degrees, at the equator's scale)."""
    if crs.is_geographic:
        return 111_320.0
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return float(factor or 1.0)


def tile_graphs(features: Features, windows: np.ndarray, cfg: OsmGraphConfig, unit_m: float = 1.0) -> list[TileGraph]:
    """One graph per window (shapely boxes in the features' CRS), in window order; empty tiles give empty graphs.

    All windows are built in one vectorised pass (:func:`~geolink_model.osm_graph.build_tile_graphs`).
    ``unit_m`` is :func:`metres_per_unit` of the CRS, so metre-valued settings hold in any CRS.
    """
    tile_idx, clipped = clip_to_tiles(features, windows)
    return build_tile_graphs(clipped.geometry, clipped.kind, clipped.tokens, clipped.osm_id, tile_idx, shapely.bounds(windows), cfg, unit_m)
