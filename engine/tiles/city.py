"""Prepare one city: the pure stage cores the Ray pipeline is made of (each testable without Ray).

``plan_city`` reads the city's OSM once (bbox of the imagery), reprojects and tokenises it once, writes it to the
city's staging folder sorted by position, and builds the tile grid; ``build_chunk`` turns one square block of
the grid into tile-index and tile-graph rows; ``tile_city`` runs both for a whole city in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from engine import storage
from engine.atomic import atomic_path
from engine.imagery import model_input_problem, read_imagery_facts
from engine.osm import MANIFEST_NAME, is_osm_dataset, local_sources, osm_source_paths
from engine.tiles.graph_store import graphs_to_table
from engine.tiles.grid import TileGridConfig, build_tile_grid
from engine.tiles.osm_join import Features, metres_per_unit, read_osm_bbox, tile_graphs, to_features
from geolink_model.osm_graph import GRAPH_VERSION, OsmGraphConfig

FULL_HASH_LIMIT = 1 << 30  # files up to 1 GiB are hashed whole; larger ones by size, mtime, head and tail


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that shapes prepared tiles; part of every city's input hash.

    Args:
        grid: tile size and overlap.
        graph: OSM graph construction.
        chunk_tiles: side of a chunk in tiles; one chunk (up to chunk_tiles^2 tiles) is one unit of parallel work.
    """

    grid: TileGridConfig = field(default_factory=TileGridConfig)
    graph: OsmGraphConfig = field(default_factory=OsmGraphConfig)
    chunk_tiles: int = 16

    def __post_init__(self) -> None:
        if self.chunk_tiles < 1:
            raise ValueError(f"chunk_tiles={self.chunk_tiles}: need at least 1")

    def to_json(self) -> dict:
        d = asdict(self)
        d["graph"]["max_nodes"] = dict(self.graph.max_nodes)
        d["graph_version"] = GRAPH_VERSION
        return d


def file_digest(path: str) -> str:
    """Content digest of an input file (whole file up to 1 GiB; beyond, size + mtime + first and last 16 MiB).

    An object-store URI (imagery read in place) is stamped by URI, size and modification time: hashing it would
    mean downloading it.
    """
    h = hashlib.blake2b(digest_size=16)
    if storage.is_remote(path):
        h.update(f"{path}|{storage.object_stamp(path)}".encode())
        return h.hexdigest()
    if path.lower().endswith(".vrt"):  # a VRT's pixels are its sources': their stamps join the XML's
        from engine.imagery_sources import vrt_sources

        for source in vrt_sources(path):
            h.update(f"{source}|{_source_stamp(source)}".encode())
    elif path.lower().endswith(".xml"):  # an XYZ cache (GDAL_WMS over file:// tiles): the tiles' names, sizes, times
        h.update(_tile_folder_stamp(path).encode())
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f"{size}:{os.stat(path).st_mtime_ns}".encode())
            h.update(fh.read(1 << 24))
            fh.seek(-(1 << 24), os.SEEK_END)
            h.update(fh.read(1 << 24))
    return h.hexdigest()


def osm_digest(spec: str) -> str:
    """Content digest of a city's OSM: :func:`file_digest` of one file (as before lists existed); for a ``;`` list or
    a folder, a digest of its files' digests in order; a partitioned dataset by its manifest (which holds every
    partition's digest, so no partition is read here).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.geojson").write_text("{}"); _ = (d / "b.geojson").write_text("[]")
        >>> osm_digest(str(d)) == osm_digest(f"{d / 'a.geojson'};{d / 'b.geojson'}") != osm_digest(str(d / "a.geojson"))
        True
    """
    paths = osm_source_paths(spec)

    def remote_folder(p: str) -> bool:  # an object-store prefix: only a partitioned dataset (its manifest) can be one
        return storage.is_remote(p) and not PurePosixPath(p.rstrip("/")).suffix

    if len(paths) == 1 and not is_osm_dataset(paths[0]) and not remote_folder(paths[0]):
        return file_digest(paths[0])
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        if remote_folder(p):
            h.update(file_digest(f"{p.rstrip('/')}/{MANIFEST_NAME}").encode())
        else:
            h.update((file_digest(str(Path(p) / MANIFEST_NAME)) if is_osm_dataset(p) else file_digest(p)).encode())
    return h.hexdigest()


def _source_stamp(source: str) -> str:
    """A VRT source's part of the input digest: a nested VRT or WMS description by content (small, and it names its
    own sources), a raster by size and modification time. Why not content: a city's tile folder can hold terabytes,
    and hashing it on every rerun (just to decide the city is unchanged) would read it all."""
    if not os.path.isfile(source):
        return source if storage.is_remote(source) or source.startswith("/vsi") else "missing"
    if source.lower().endswith((".vrt", ".xml")):
        return file_digest(source)
    st = os.stat(source)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _tile_folder_stamp(wms_xml: str) -> str:
    """Name, size and modification time of every file under the folder a GDAL_WMS ``file://`` ServerUrl reads: an
    XYZ cache's tiles change in place without changing its XML (hashing every tile would read the whole cache)."""
    import xml.etree.ElementTree as ET
    from urllib.parse import unquote, urlparse

    try:
        url = (ET.parse(wms_xml).getroot().findtext("Service/ServerUrl") or "").split("${")[0]
    except (ET.ParseError, OSError):
        return ""
    if not url.startswith("file://"):
        return url
    folder = Path(unquote(urlparse(url).path))
    stamps = sorted(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in folder.rglob("*") if p.is_file())
    return "\n".join(stamps)


def city_input_hash(row: dict, cfg: PrepareConfig, imagery_digest: str, osm_digest: str) -> str:
    """Hash of everything a city's tiles depend on: imagery and OSM content, AOI, region and the config."""
    doc = {"imagery": imagery_digest, "osm": osm_digest, "aoi": row.get("aoi"), "region": row.get("region"), "cfg": cfg.to_json()}
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=16).hexdigest()


def parse_aoi(aoi: str | None) -> shapely.Geometry | None:
    """The catalog's ``aoi``: WKT in EPSG:4326, or a vector file (any CRS) whose features are unioned."""
    if not aoi:
        return None
    if aoi.lstrip().upper().startswith(("POLYGON", "MULTIPOLYGON")):
        return shapely.from_wkt(aoi)
    import geopandas as gpd

    gdf = gpd.read_file(aoi)
    if gdf.crs is not None and not gdf.crs.equals(CRS.from_epsg(4326)):
        gdf = gdf.to_crs(4326)
    return shapely.union_all(gdf.geometry.values)


@dataclass(frozen=True)
class CityPlan:
    """A planned city: its grid (without hashes yet), staged features, digests and chunking."""

    city: str
    grid: pa.Table
    features_path: Path
    imagery_digest: str
    input_hash: str
    n_features: int
    chunks: list[tuple[int, int, int, int]]  # (row0, row1, col0, col1) in grid rows/cols, half-open


def plan_city(row: dict, cfg: PrepareConfig, staging: Path, imagery_digest: str, input_hash: str) -> CityPlan:
    """Grid the city, and stage its OSM once: read by the imagery's bbox, reproject, tokenise, sort by position.

    Raises:
        ValueError naming the city when the model cannot take its imagery (not 3+ bands of uint8), or when imagery
        and OSM do not overlap (no features at all in the imagery).
    """
    city = row["city"]
    problem = model_input_problem(read_imagery_facts(row["imagery"]))
    if problem:  # refused by name, never rescaled (16-bit divided by 255 would map to zeros everywhere)
        raise ValueError(f"city {city}: {problem}")
    grid = build_tile_grid(city, row["region"], row["imagery"], cfg.grid, parse_aoi(row.get("aoi")))
    staging.mkdir(parents=True, exist_ok=True)
    features_path = staging / "features.parquet"
    if grid.num_rows == 0:
        raise ValueError(f"city {city}: no tile holds valid imagery inside the AOI ({row['imagery']})")
    bbox = (pc.min(grid["lon_min"]).as_py(), pc.min(grid["lat_min"]).as_py(), pc.max(grid["lon_max"]).as_py(), pc.max(grid["lat_max"]).as_py())
    table = read_osm_bbox(local_sources(row["osm"]), bbox)
    if table.num_rows == 0:
        raise ValueError(f"city {city}: the OSM file {row['osm']} has no features inside the imagery bounds {tuple(round(b, 5) for b in bbox)}; "
                         "check that imagery and OSM cover the same place")
    crs = CRS.from_user_input(grid["crs"][0].as_py())
    features = to_features(table, crs, cfg.graph)
    _write_features(features, features_path)
    n_rows = int(pc.max(grid["grid_row"]).as_py()) + 1
    n_cols = int(pc.max(grid["grid_col"]).as_py()) + 1
    k = cfg.chunk_tiles
    present = set(zip((grid["grid_row"].to_numpy() // k).tolist(), (grid["grid_col"].to_numpy() // k).tolist()))
    chunks = [(r * k, min((r + 1) * k, n_rows), c * k, min((c + 1) * k, n_cols)) for r, c in sorted(present)]
    return CityPlan(city, grid, features_path, imagery_digest, input_hash, len(features), chunks)


def build_chunk(grid: pa.Table, features_path: Path, chunk: tuple[int, int, int, int], imagery_digest: str,
                cfg: PrepareConfig) -> tuple[pa.Table, pa.Table]:
    """Tile-index and tile-graph rows of one chunk of a planned city (tiles in tile_id order)."""
    r0, r1, c0, c1 = chunk
    rows, cols = grid["grid_row"].to_numpy(), grid["grid_col"].to_numpy()
    sel = np.flatnonzero((rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1))
    tiles = grid.take(pa.array(sel)).sort_by("tile_id")
    windows = shapely.box(tiles["minx"].to_numpy(), tiles["miny"].to_numpy(), tiles["maxx"].to_numpy(), tiles["maxy"].to_numpy())
    env = (float(tiles["minx"].to_numpy().min()), float(tiles["miny"].to_numpy().min()),
           float(tiles["maxx"].to_numpy().max()), float(tiles["maxy"].to_numpy().max()))
    features = _read_features(features_path, env, cfg.graph.tokens_per_node)
    graphs = tile_graphs(features, windows, cfg.graph, metres_per_unit(CRS.from_user_input(tiles["crs"][0].as_py())))
    graph_table = graphs_to_table(tiles["tile_id"].to_pylist(), graphs, cfg.graph.tokens_per_node)
    hashes = [
        hashlib.blake2b(f"{imagery_digest}|{w}|{g}".encode(), digest_size=16).hexdigest()
        for w, g in zip(zip(*(tiles[c].to_pylist() for c in ("window_col_off", "window_row_off", "window_width", "window_height"))),
                        graph_table["graph_hash"].to_pylist())
    ]
    tiles = tiles.set_column(tiles.schema.get_field_index("input_hash"), "input_hash", pa.array(hashes, pa.string()))
    return tiles, graph_table


def tile_city(row: dict, cfg: PrepareConfig, staging: Path) -> tuple[pa.Table, pa.Table]:
    """The whole city in-process: ``(tile_index, tile_graphs)``, both sorted by tile_id."""
    imagery_digest, osm_hash = file_digest(row["imagery"]), osm_digest(row["osm"])
    plan = plan_city(row, cfg, staging, imagery_digest, city_input_hash(row, cfg, imagery_digest, osm_hash))
    parts = [build_chunk(plan.grid, plan.features_path, ch, imagery_digest, cfg) for ch in plan.chunks]
    index = pa.concat_tables([p[0] for p in parts]).sort_by("tile_id")
    graphs = pa.concat_tables([p[1] for p in parts]).sort_by("tile_id")
    return index, graphs


# --- staged features: the city's OSM in its imagery CRS, tokenised, sorted by position --------------------------
def _write_features(features: Features, path: Path) -> None:
    bounds = shapely.bounds(features.geometry) if len(features) else np.zeros((0, 4))
    order = np.lexsort((features.osm_id, bounds[:, 1])) if len(features) else np.zeros(0, np.int64)
    t = features.tokens.shape[1] if features.tokens.ndim == 2 else 0
    table = pa.table(
        {
            "osm_id": pa.array(features.osm_id[order], pa.int64()),
            "kind": pa.array(features.kind[order], pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(features.tokens[order].reshape(-1), pa.int32()), t),
            "geometry": pa.array(shapely.to_wkb(features.geometry[order]), pa.binary()),
            "xmin": bounds[order, 0], "ymin": bounds[order, 1], "xmax": bounds[order, 2], "ymax": bounds[order, 3],
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=8192)


def _read_features(path: Path, env: tuple[float, float, float, float], tokens_per_node: int) -> Features:
    """Features whose bounds overlap ``env`` (DuckDB scan; row groups pruned on the sorted ``ymin``)."""
    con = duckdb.connect(config={"threads": 1})  # plain numeric predicates: no spatial extension needed
    table = con.execute(
        "SELECT osm_id, kind, tokens, geometry FROM read_parquet(?) WHERE xmax >= ? AND xmin <= ? AND ymax >= ? AND ymin <= ? ORDER BY osm_id, ymin",
        [str(path), env[0], env[2], env[1], env[3]],
    ).fetch_arrow_table()
    con.close()
    n = table.num_rows
    tokens = np.asarray(pc.list_flatten(table["tokens"]).to_numpy(), np.int32).reshape(n, tokens_per_node) if n else np.zeros((0, tokens_per_node), np.int32)
    return Features(
        osm_id=table["osm_id"].to_numpy(),
        kind=np.asarray(table["kind"].to_numpy(zero_copy_only=False)).astype(str),
        tokens=tokens,
        geometry=shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object)),
    )

