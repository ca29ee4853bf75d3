"""Encodings of prepared tiles (`geolink-engine embed`): the per-batch core, the parts, the products and the points.

An embedding pass is a map run in every respect but what its parts hold (:data:`~engine.mapping.store.EMBEDDING_PARTS`
instead of probabilities): the same Ray Data pipeline, ledger, commit point, orphan adoption and resume
(:func:`engine.pipelines.infer.run_inference` with :class:`EncodeAndWrite`), in its own run folder
``runs/<run>/embeddings/<mode>_<level>/`` (:meth:`engine.workspace.Workspace.embedding_run`).

- :class:`TileEncoder`: a bundle's patch tokens in a mode (:meth:`geolink_model.model.GeoLink.encode`), per tile the
  whole ``g x g`` grid (level ``patch``) or their mean over the tile's core patches (level ``tile``);
- :func:`core_patches`: which patches a tile owns: those whose centre lies in its core. The cores partition the
  raster, so every place is encoded once, as in the maps; the halo's patches, which the neighbour owns, are
  left out of the tile's mean and of the patch rows (they still shape the tokens: the encoder sees the whole window);
- :func:`write_embeddings`: committed parts -> one GeoParquet (EPSG:4326), streamed city by city;
- :func:`read_points`, :func:`match_points`, :func:`write_point_embeddings`: ``--points``, the embedding at each
  point, looked up in the patch grid of the tile whose core holds it (:func:`geolink_model.inr.lookup`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from engine.atomic import atomic_path
from engine.geoparquet import geo_metadata, write_geoparquet
from engine.mapping.batches import PredictAndWrite
from engine.mapping.predict import ModelPredictor
from engine.mapping.store import EMBEDDING_PARTS
from engine.schema import EMBEDDING_LEVELS, embeddings_schema
from engine.workspace import Workspace

GRID_COLUMNS = ("window_col_off", "window_row_off", "window_width", "window_height", "core_col_off", "core_row_off", "core_width",
                "core_height", "minx", "miny", "maxx", "maxy")
INDEX_COLUMNS = ("tile_id", "city", "crs", "grid_row", "grid_col", "tile_size_px", "overlap_px", *GRID_COLUMNS)
TILES_PER_BATCH = 256  # tiles read from the parts and written per row group step (bounded memory for patch level)
POINT_ID_COLUMNS = ("id", "point_id")


class PointsError(ValueError):
    """A points file that cannot be used; the message names the file and what to do."""


# --- which patches a tile owns ----------------------------------------------------------------------------------
def core_patches(row: dict, patch_px: int, grid: int) -> np.ndarray:
    """Boolean ``(grid, grid)``: the patches whose centre lies in the tile's core (window pixel coordinates).

    A core too small to hold a patch centre (a sliver at the raster's edge) gets the patch nearest its centre.

    >>> row = dict(window_col_off=-16, window_row_off=-16, core_col_off=0, core_row_off=0, core_width=96, core_height=96)
    >>> m = core_patches(row, 16, 8); int(m.sum()), bool(m[0, 0]), bool(m[1, 1]), bool(m[6, 6]), bool(m[7, 7])
    (36, False, True, True, False)
    """
    x0, y0 = row["core_col_off"] - row["window_col_off"], row["core_row_off"] - row["window_row_off"]
    x1, y1 = x0 + row["core_width"], y0 + row["core_height"]
    centres = (np.arange(grid) + 0.5) * patch_px
    mask = ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    if not mask.any():
        i = int(np.clip(np.floor((y0 + y1) / 2 / patch_px), 0, grid - 1))
        j = int(np.clip(np.floor((x0 + x1) / 2 / patch_px), 0, grid - 1))
        mask[i, j] = True
    return mask


# --- the actor ---------------------------------------------------------------------------------------------------
class TileEncoder(ModelPredictor):
    """A bundle's encodings of a batch of tiles: float32 ``(B, n, D)``, ``n = grid**2`` (level ``patch``, row-major)
    or 1 (level ``tile``: the mean over :func:`core_patches`). Failures stay per tile (:class:`Predictor`)."""

    def __init__(self, model_dir: str, mode: str = "fused", level: str = "tile", device: str | None = None,
                 torch_threads: int | None = None, max_attempts: int = 2, fail_tiles: tuple[str, ...] = ()) -> None:
        if level not in EMBEDDING_LEVELS:
            raise ValueError(f"level {level!r}: use one of {EMBEDDING_LEVELS}")
        super().__init__(model_dir, mode, device, torch_threads, max_attempts, fail_tiles)
        self.level = level
        self.patch_px, self.grid, self.dim = self.model.cfg.patch_size, self.model.cfg.grid_size, self.model.cfg.embed_dim

    def predict(self, batch: pa.Table) -> np.ndarray:
        tokens = self.run_model(batch, self.model.encode).float().cpu().numpy()  # (B, grid**2, D)
        if self.level == "patch":
            return tokens
        masks = np.stack([core_patches(r, self.patch_px, self.grid).reshape(-1) for r in batch.select(list(GRID_COLUMNS)).to_pylist()])
        weights = masks / masks.sum(axis=1, keepdims=True)
        return np.einsum("bn,bnd->bd", weights.astype(np.float32), tokens)[:, None, :]

    def _blank(self) -> dict:
        return {"n_vectors": 0, "dim": self.dim, "vectors": b""}

    @staticmethod
    def _fill(record: dict, vectors: np.ndarray, attempts: int, seconds: float) -> None:
        record.update(status="ok", error="", attempts=attempts, predict_s=seconds, n_vectors=int(vectors.shape[0]), dim=int(vectors.shape[1]),
                      vectors=np.ascontiguousarray(vectors, dtype="<f4").tobytes())


class EncodeAndWrite(PredictAndWrite):
    """The embedding actor: a :class:`TileEncoder` (built once per actor), then one embedding part per city per batch."""

    parts = EMBEDDING_PARTS


# --- reading committed vectors ----------------------------------------------------------------------------------
def read_vectors(run_path: Path, committed: pa.Table, batch_rows: int = TILES_PER_BATCH) -> Iterator[tuple[str, np.ndarray]]:
    """``(tile_id, float32 (n_vectors, dim))`` of the committed tiles, in the order of ``committed``'s rows
    (``tile_id``, ``part`` as :meth:`~engine.mapping.store.Ledger.committed` gives them); only each tile's row in the
    part the ledger assigns it. Streamed by DuckDB in batches of ``batch_rows``."""
    if committed.num_rows == 0:
        return
    paths = [str(Path(run_path) / part) for part in committed["part"].to_pylist()]
    for path in sorted(set(paths)):
        Workspace.fetch(path)
    wanted = pa.table({"tile_id": committed["tile_id"], "path": pa.array(paths, pa.string()),
                       "ordinal": pa.array(np.arange(committed.num_rows), pa.int64())})
    con = duckdb.connect()
    try:
        con.register("wanted", wanted)
        reader = con.execute("SELECT w.tile_id, p.n_vectors, p.dim, p.vectors FROM read_parquet(?, filename = true) p "
                             "JOIN wanted w ON p.tile_id = w.tile_id AND p.filename = w.path ORDER BY w.ordinal",
                             [sorted(set(paths))]).to_arrow_reader(batch_rows)
        expected = iter(committed["tile_id"].to_pylist())
        for batch in reader:
            for row in batch.to_pylist():
                tile = next(expected)
                if row["tile_id"] != tile:
                    raise FileNotFoundError(f"{run_path}: tile {tile} is committed but its part does not hold it; rerun the pass")
                yield tile, np.frombuffer(row["vectors"], "<f4").reshape(row["n_vectors"], row["dim"])
        missing = next(expected, None)
        if missing is not None:
            raise FileNotFoundError(f"{run_path}: tile {missing} is committed but its part does not hold it; rerun the pass")
    finally:
        con.close()


# --- geometry ----------------------------------------------------------------------------------------------------
class _To4326:
    """Coordinates of one CRS to EPSG:4326 (lon, lat), one transformer per CRS."""

    def __init__(self) -> None:
        self.cache: dict[str, Transformer] = {}

    def boxes(self, crs: str, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """WKB polygons of the boxes ``[x0, x1] x [y0, y1]`` in ``crs``, in EPSG:4326 (corners reprojected)."""
        if crs not in self.cache:
            self.cache[crs] = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
        geoms = shapely.transform(shapely.box(x0, y0, x1, y1), lambda xy: np.column_stack(self.cache[crs].transform(xy[:, 0], xy[:, 1])))
        return shapely.to_wkb(geoms)


def _pixel_size(row: dict) -> tuple[float, float]:
    return (row["maxx"] - row["minx"]) / row["window_width"], (row["maxy"] - row["miny"]) / row["window_height"]


def _tile_rows(tiles: list[dict], vectors: list[np.ndarray], level: str, patch_px: int, grid: int,
               to4326: _To4326) -> dict[str, list]:
    """The product columns (no ``model_version``/``mode``) of some tiles of one CRS: one row per tile (its core box)
    or one per core patch (its square)."""
    out: dict[str, list] = {"city": [], "tile_id": [], "crs": [], "embedding": []}
    if level == "patch":
        out.update(patch_row=[], patch_col=[])
    x0, y0, x1, y1 = [], [], [], []
    for row, vec in zip(tiles, vectors):
        px_w, px_h = _pixel_size(row)
        if level == "tile":
            cx = row["minx"] + (row["core_col_off"] - row["window_col_off"]) * px_w
            cy = row["maxy"] - (row["core_row_off"] - row["window_row_off"]) * px_h
            x0.append(cx), x1.append(cx + row["core_width"] * px_w), y1.append(cy), y0.append(cy - row["core_height"] * px_h)
            out["embedding"].append(vec[0])
            cells = [None]
        else:
            ii, jj = np.nonzero(core_patches(row, patch_px, grid))
            cells = list(zip(ii.tolist(), jj.tolist()))
            for i, j in cells:
                left, top = row["minx"] + j * patch_px * px_w, row["maxy"] - i * patch_px * px_h
                x0.append(left), x1.append(left + patch_px * px_w), y1.append(top), y0.append(top - patch_px * px_h)
                out["embedding"].append(vec[i * grid + j])
            out["patch_row"] += ii.tolist()
            out["patch_col"] += jj.tolist()
        out["city"] += [row["city"]] * len(cells)
        out["tile_id"] += [row["tile_id"]] * len(cells)
        out["crs"] += [row["crs"]] * len(cells)
    crs = tiles[0]["crs"] if tiles else "EPSG:4326"
    out["geometry"] = list(to4326.boxes(crs, *(np.asarray(v, np.float64) for v in (x0, y0, x1, y1))))
    return out


def _table(columns: dict[str, list], schema: pa.Schema, model_version: str, mode: str) -> pa.Table:
    n = len(columns["geometry"])
    dim = schema.field("embedding").type.list_size
    arrays = []
    for field in schema:
        if field.name == "embedding":
            flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in columns["embedding"]]) if n else np.zeros(0, np.float32)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim))
        elif field.name == "model_version":
            arrays.append(pa.array([model_version] * n, pa.string()))
        elif field.name == "mode":
            arrays.append(pa.array([mode] * n, pa.string()))
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# --- the tile and patch products ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingsWritten:
    """What :func:`write_embeddings` wrote: the file, its rows, the tiles they came from."""

    path: Path
    rows: int
    tiles: int


def write_embeddings(out: Path, run_path: Path, committed: dict[str, pa.Table], index: dict[str, pa.Table], level: str,
                     model_version: str, mode: str, dim: int, patch_px: int, grid: int) -> EmbeddingsWritten:
    """``out`` (``products/<run>/embeddings/<mode>_<level>.parquet``): one row per committed tile (or core patch),
    sorted by city, tile id (and patch row, col), geometry in EPSG:4326; atomically, byte-identical from the same
    committed parts.

    Args:
        committed: per city, :meth:`~engine.mapping.store.Ledger.committed` rows of this model version.
        index: per city, its tile-index rows (at least :data:`INDEX_COLUMNS`).

    Two passes over the tiles: the geometries first (their bbox goes into the ``geo`` metadata, which Parquet
    writes with the schema), then the rows, streamed, :data:`TILES_PER_BATCH` tiles at a time.
    """
    schema = embeddings_schema(dim, level)
    to4326 = _To4326()
    by_city = {city: {r["tile_id"]: r for r in index[city].select(list(INDEX_COLUMNS)).to_pylist()} for city in committed}
    bounds = []
    for city in sorted(committed):
        tiles = [by_city[city][t] for t in committed[city]["tile_id"].to_pylist()]
        for start in range(0, len(tiles), TILES_PER_BATCH):
            chunk = tiles[start:start + TILES_PER_BATCH]
            cols = _tile_rows(chunk, [np.zeros((grid * grid, dim), np.float32)] * len(chunk), level, patch_px, grid, to4326)
            bounds.append(shapely.total_bounds(shapely.from_wkb(cols["geometry"])))
    md = geo_metadata(pa.array([], pa.binary()), 4326)
    types = {"tile": ["Polygon"], "patch": ["Polygon"]}[level]
    md["columns"]["geometry"]["geometry_types"] = types
    if bounds:
        b = np.array(bounds)
        md["columns"]["geometry"]["bbox"] = [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]
    schema = schema.with_metadata({b"geo": json.dumps(md).encode()})
    rows = tiles_total = 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for city in sorted(committed):
                table = committed[city].select(["tile_id", "part"])
                for start in range(0, table.num_rows, TILES_PER_BATCH):
                    chunk = table.slice(start, TILES_PER_BATCH)
                    tiles, vectors = [], []
                    for tile, vec in read_vectors(run_path, chunk):
                        tiles.append(by_city[city][tile])
                        vectors.append(vec)
                    part = _table(_tile_rows(tiles, vectors, level, patch_px, grid, to4326), schema, model_version, mode)
                    writer.write_table(part, row_group_size=64_000)
                    rows += part.num_rows
                    tiles_total += len(tiles)
    return EmbeddingsWritten(out, rows, tiles_total)


# --- points ------------------------------------------------------------------------------------------------------
def read_points(path: str | os.PathLike[str]):
    """A points file as a GeoDataFrame (``point_id``, ``geometry``) in its own CRS.

    Forms: any vector file GDAL reads (GeoPackage, GeoJSON, Shapefile, FlatGeobuf...) or GeoParquet, with a CRS;
    CSV with ``lon``/``lat`` columns (EPSG:4326 by name). Ids: the ``id`` or ``point_id`` column, else the row
    number (from 0).

    Raises:
        PointsError: no CRS (a CSV of ``x``/``y``, a file without one), not points, empty geometries, repeated ids.
    """
    import geopandas as gpd
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PointsError(f"points file {path}: not found")
    try:
        if path.suffix.lower() in (".csv", ".txt"):
            frame = pd.read_csv(path)
            lower = {c.lower(): c for c in frame.columns}
            if "lon" in lower and "lat" in lower:
                gdf = gpd.GeoDataFrame(frame, geometry=gpd.points_from_xy(frame[lower["lon"]], frame[lower["lat"]]), crs=4326)
            elif "x" in lower and "y" in lower:
                raise PointsError(f"points file {path}: a CSV of x/y has no CRS; give lon/lat columns (EPSG:4326), or a "
                                  "GeoPackage/GeoParquet/GeoJSON with its CRS")
            else:
                raise PointsError(f"points file {path}: a CSV needs lon and lat columns (EPSG:4326); found {list(frame.columns)}")
        elif path.suffix.lower() in (".parquet", ".geoparquet"):
            gdf = gpd.read_parquet(path)
        else:
            gdf = gpd.read_file(path)
    except PointsError:
        raise
    except Exception as exc:  # noqa: BLE001 (pyogrio, pyarrow, pandas: one line naming the file)
        raise PointsError(f"points file {path}: unreadable ({type(exc).__name__}: {exc})") from None
    if gdf.crs is None:
        raise PointsError(f"points file {path}: no CRS; set one (e.g. `ogr2ogr -a_srs EPSG:4326 out.gpkg {path.name}`), "
                          "or give a CSV with lon/lat columns")
    geoms = gdf.geometry.values
    empty = np.asarray(geoms.isna() | geoms.is_empty)
    if empty.any():
        raise PointsError(f"points file {path}: {int(empty.sum())} rows have no geometry (first: row {int(np.argmax(empty))})")
    not_points = np.asarray(geoms.geom_type != "Point")
    if not_points.any():
        i = int(np.argmax(not_points))
        raise PointsError(f"points file {path}: row {i} is a {geoms[i].geom_type}; give points")
    id_column = next((c for c in POINT_ID_COLUMNS if c in gdf.columns), None)
    ids = [str(v) for v in gdf[id_column]] if id_column else [str(i) for i in range(len(gdf))]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise PointsError(f"points file {path}: ids repeat in column {id_column!r} (e.g. {', '.join(repeated)}); give unique ids")
    return gpd.GeoDataFrame({"point_id": ids}, geometry=gdf.geometry.values, crs=gdf.crs)


@dataclass(frozen=True)
class PointMatches:
    """Each point's tile (or none): ``city``, ``tile_id`` (None when outside every tile's core) and ``uv``, its
    position in the tile in tile coordinates [0, 1] (x right, y down: :func:`geolink_model.inr.lookup`)."""

    city: list[str | None]
    tile_id: list[str | None]
    uv: np.ndarray  # (P, 2), NaN where unmatched

    @property
    def unmatched(self) -> list[int]:
        return [i for i, t in enumerate(self.tile_id) if t is None]

    def tiles(self) -> dict[str, set[str]]:
        """City -> the tiles holding a point."""
        out: dict[str, set[str]] = {}
        for city, tile in zip(self.city, self.tile_id):
            if tile is not None:
                out.setdefault(city, set()).add(tile)
        return out


def match_points(points, index: dict[str, pa.Table]) -> PointMatches:
    """The tile whose core holds each point, over the cities of ``index`` (city -> its tile-index rows), in city order.

    In each city's pixel grid (its tiles' windows give the origin and pixel size): the grid cell
    ``floor(row / stride), floor(col / stride)`` is the only tile whose core can hold the point (cores partition the
    raster; grid.py), checked against the core itself (edge cores are smaller, tiles off the AOI are absent).
    """
    n = len(points)
    city_of: list[str | None] = [None] * n
    tile_of: list[str | None] = [None] * n
    uv = np.full((n, 2), np.nan)
    for city in sorted(index):
        rows = index[city].select(list(INDEX_COLUMNS)).to_pylist()
        todo = np.array([i for i in range(n) if tile_of[i] is None], dtype=np.int64)
        if not rows or not len(todo):
            continue
        first = rows[0]
        px_w, px_h = _pixel_size(first)
        x_origin, y_origin = first["minx"] - first["window_col_off"] * px_w, first["maxy"] + first["window_row_off"] * px_h
        stride = first["tile_size_px"] - first["overlap_px"]
        cells = {(r["grid_row"], r["grid_col"]): r for r in rows}
        xy = points.geometry.iloc[todo].to_crs(CRS.from_user_input(first["crs"]))
        cols = (xy.x.to_numpy() - x_origin) / px_w
        prow = (y_origin - xy.y.to_numpy()) / px_h
        for k, i in enumerate(todo.tolist()):
            col, row = cols[k], prow[k]
            if not (math.isfinite(col) and math.isfinite(row)):
                continue
            tile = cells.get((int(math.floor(row / stride)), int(math.floor(col / stride))))
            if tile is None or not (tile["core_col_off"] <= col < tile["core_col_off"] + tile["core_width"]
                                    and tile["core_row_off"] <= row < tile["core_row_off"] + tile["core_height"]):
                continue
            city_of[i], tile_of[i] = city, tile["tile_id"]
            uv[i] = ((col - tile["window_col_off"]) / tile["window_width"], (row - tile["window_row_off"]) / tile["window_height"])
    return PointMatches(city_of, tile_of, uv)


def lookup_points(tokens: np.ndarray, uv: np.ndarray, inr=None) -> np.ndarray:
    """The embeddings ``(P, D)`` at ``uv`` (tile coordinates, ``(P, 2)``) of one tile's patch tokens ``(g*g, D)``:
    :func:`geolink_model.inr.lookup` (bilinear between patch centres, exact at them; ``inr``: the model's trained
    lookup, for image tokens)."""
    import torch

    from geolink_model.inr import lookup

    with torch.inference_mode():
        out = lookup(torch.from_numpy(np.array(tokens, np.float32))[None], torch.from_numpy(uv.astype(np.float32))[None], inr)
    return out[0].float().numpy()


def write_point_embeddings(out: Path, points, matches: PointMatches, run_path: Path, committed: dict[str, pa.Table],
                           city_crs: dict[str, str], model_version: str, mode: str, dim: int, inr=None) -> tuple[int, list[int]]:
    """``out`` (``products/<run>/embeddings/<mode>_points.parquet``): one row per point, in the file's order, with
    its tile, ``matched`` and its embedding (null where no core holds it, or its tile failed); geometry EPSG:4326.
    ``committed``: per city, the ledger's committed rows of this model version; ``city_crs``: each city's tiles' CRS.
    Returns ``(rows with an embedding, indices of matched points whose tile has no committed encoding)``."""
    n = len(points)
    vectors: list[np.ndarray | None] = [None] * n
    by_tile: dict[str, list[int]] = {}
    for i, tile in enumerate(matches.tile_id):
        if tile is not None:
            by_tile.setdefault(tile, []).append(i)
    for city in sorted(committed):
        table = committed[city]
        table = table.filter(pc.is_in(table["tile_id"], value_set=pa.array(sorted(by_tile), pa.string())))
        for tile, tokens in read_vectors(run_path, table.select(["tile_id", "part"])):
            idx = by_tile[tile]
            for i, vec in zip(idx, lookup_points(tokens, matches.uv[idx], inr)):
                vectors[i] = vec
    no_encoding = [i for i, t in enumerate(matches.tile_id) if t is not None and vectors[i] is None]
    lonlat = points.geometry.to_crs(4326)
    schema = embeddings_schema(dim, "points")
    table = pa.table({
        "point_id": pa.array(points["point_id"].tolist(), pa.string()),
        "matched": pa.array([t is not None for t in matches.tile_id], pa.bool_()),
        "city": pa.array(matches.city, pa.string()),
        "tile_id": pa.array(matches.tile_id, pa.string()),
        "model_version": pa.array([model_version] * n, pa.string()),
        "mode": pa.array([mode] * n, pa.string()),
        "crs": pa.array([city_crs.get(c) if c else None for c in matches.city], pa.string()),
        "embedding": pa.array([None if v is None else v.astype(np.float32).tolist() for v in vectors], pa.list_(pa.float32(), dim)),
        "geometry": pa.array(shapely.to_wkb(lonlat.values), pa.binary()),
    }, schema=schema)
    write_geoparquet(table, out, 4326)
    return sum(v is not None for v in vectors), no_encoding
