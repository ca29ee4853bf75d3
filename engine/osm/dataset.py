"""The partitioned OSM dataset: its layout, grid cells, manifest, and reading it by bounding box.

Why: a country extract does not fit in memory as one table, and every city of a national catalog needs only its own
few square kilometres. :mod:`engine.osm.dataset_writer` streams the extract into coarse grid cells; a city then
reads only the cells its box touches, and within them only the row groups whose bbox columns overlap it.

Layout of a dataset folder (GeoParquet 1.1, EPSG:4326, the ``OSM_FEATURES_SCHEMA`` columns plus ``xmin, ymin, xmax,
ymax`` float64, a ``geo`` metadata entry per file)::

    _dataset.json                     manifest, written last: sources, cell size, counts, bbox, partitions
    cell=x00193y00142/part-0.parquet  the features whose bbox centre lies in that cell, Hilbert-ordered

``cell=x{col:05d}y{row:05d}`` with ``col = floor((lon + 180) / cell_deg)`` and ``row = floor((lat + 90) / cell_deg)``
of the feature's bbox centre (a Hive partition, so DuckDB's ``hive_partitioning`` and pyarrow's ``"hive"``
partitioning see a ``cell`` column). A feature lies in exactly one cell but may reach beyond it, so each
partition's real extent (the union of its rows' bboxes) is in the manifest and readers prune on that, never on the
nominal cell. Within a partition rows are sorted by the Hilbert index of the bbox centre (16 bits per axis over
the cell), so row groups are spatially compact and their ``xmin``..``ymax`` statistics prune well.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import shapely

from engine.osm.ingest import BBox, OsmIngestError, _check_bbox
from engine.schema import OSM_FEATURES_SCHEMA, OSM_KINDS

__all__ = [
    "DATASET_FORMAT",
    "MANIFEST_NAME",
    "cell_of",
    "hilbert_index",
    "is_osm_dataset",
    "read_manifest",
    "read_osm_dataset",
]

MANIFEST_NAME = "_dataset.json"
DATASET_FORMAT = "geolink-osm-dataset"
DATASET_VERSION = 1
BBOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
DATASET_SCHEMA = pa.schema(list(OSM_FEATURES_SCHEMA) + [pa.field(c, pa.float64()) for c in BBOX_COLUMNS])
HILBERT_BITS = 16
_RERUN = "run `geolink-engine ingest-osm SOURCE OUT/` again"


# --- grid cells and Hilbert order ---------------------------------------------------------------------------------
def cell_of(lon: np.ndarray, lat: np.ndarray, cell_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell ``(col, row)`` of lon/lat points: ``floor((lon + 180) / cell_deg)``, ``floor((lat + 90) / cell_deg)``.

    Points on the east/north edge of the world fall in the last cell.

    Example:
        >>> cell_of(np.array([13.4]), np.array([52.5]), 1.0)
        (array([193]), array([142]))
    """
    n_cols, n_rows = math.ceil(360 / cell_deg), math.ceil(180 / cell_deg)
    col = np.clip(np.floor((np.asarray(lon, np.float64) + 180.0) / cell_deg), 0, n_cols - 1).astype(np.int64)
    row = np.clip(np.floor((np.asarray(lat, np.float64) + 90.0) / cell_deg), 0, n_rows - 1).astype(np.int64)
    return col, row


def cell_name(col: int, row: int) -> str:
    """Partition value of a cell: ``x00193y00142`` (zero-padded, so names sort west to east, then south to north)."""
    return f"x{col:05d}y{row:05d}"


def hilbert_index(x: np.ndarray, y: np.ndarray, bits: int = HILBERT_BITS) -> np.ndarray:
    """Position along the Hilbert curve of integer grid points ``0 <= x, y < 2**bits`` (vectorised xy2d).

    Neighbours along the curve are neighbours on the ground, so rows sorted by it form compact row groups.

    Example:
        >>> hilbert_index(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0]), bits=1).tolist()
        [0, 1, 2, 3]
    """
    x = np.asarray(x, np.int64).copy()
    y = np.asarray(y, np.int64).copy()
    n = 1 << bits
    d = np.zeros(x.shape, np.int64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


# --- manifest -----------------------------------------------------------------------------------------------------
def is_osm_dataset(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a dataset manifest (``_dataset.json``), readable or not."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).exists()


def read_manifest(path: str | os.PathLike[str]) -> dict:
    """The manifest of a dataset folder, checked (format, version, cell size, partitions).

    Raises:
        OsmIngestError: one line naming the manifest file and what is wrong.
    """
    file = Path(path) / MANIFEST_NAME
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OsmIngestError(f"{file}: cannot be read as an OSM dataset manifest ({exc}); {_RERUN}") from None
    problem = _manifest_problem(doc)
    if problem:
        raise OsmIngestError(f"{file}: {problem}; {_RERUN}")
    return doc


def _manifest_problem(doc) -> str | None:
    if not isinstance(doc, dict) or doc.get("format") != DATASET_FORMAT:
        return f"not an OSM dataset manifest (its format is not {DATASET_FORMAT!r})"
    if doc.get("version") != DATASET_VERSION:
        return f"manifest version {doc.get('version')!r}; this engine reads version {DATASET_VERSION}"
    if not isinstance(doc.get("cell_deg"), (int, float)) or not isinstance(doc.get("features"), int):
        return "cell_deg or features missing"
    if doc.get("bbox") is not None and not _is_box(doc["bbox"]):
        return "bbox is not [west, south, east, north]"
    parts = doc.get("partitions")
    if not isinstance(parts, list):
        return "partitions missing"
    for entry in parts:
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("features"), int) \
            and _is_box(entry.get("bbox"))
        if not ok or Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            return f"partition entry {str(entry)[:80]} lacks a relative path, a feature count or a bbox"
    return None


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


# --- reading ------------------------------------------------------------------------------------------------------
def read_osm_dataset(path: str | os.PathLike[str], bbox: BBox | None = None) -> pa.Table:
    """The dataset's features intersecting ``bbox`` (all when None) as an ``OSM_FEATURES_SCHEMA`` table ordered by
    ``(osm_id, kind)``: only partitions whose extent meets the box are opened, row groups are pruned on the bbox
    columns (pyarrow.dataset filter), and the rows left are tested exactly (``shapely.intersects``), so the result
    equals :func:`engine.osm.read_osm` of the same features with the same box.

    Raises:
        OsmIngestError: naming the manifest or the partition file that cannot be read.
    """
    root = Path(path)
    manifest = read_manifest(root)
    box = _check_bbox(root, bbox)
    parts = manifest["partitions"]
    if box is not None:
        w, s, e, n = box.bounds
        parts = [p for p in parts if p["bbox"][2] >= w and p["bbox"][0] <= e and p["bbox"][3] >= s and p["bbox"][1] <= n]
    files = [root / p["path"] for p in parts]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise OsmIngestError(f"{missing[0]}: partition listed in {root / MANIFEST_NAME} is missing; {_RERUN}")
    if not files:
        return OSM_FEATURES_SCHEMA.empty_table()
    try:
        dataset = pads.dataset([str(f) for f in files], schema=DATASET_SCHEMA, format="parquet")
        filt = None
        if box is not None:
            filt = (pc.field("xmax") >= w) & (pc.field("xmin") <= e) & (pc.field("ymax") >= s) & (pc.field("ymin") <= n)
        table = dataset.to_table(columns=list(OSM_FEATURES_SCHEMA.names), filter=filt)
    except (OSError, pa.ArrowException) as exc:
        raise OsmIngestError(f"{root}: a partition cannot be read ({exc}); {_RERUN}") from None
    if box is not None and table.num_rows:
        geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))
        table = table.filter(pa.array(shapely.intersects(geoms, box)))
    return sort_features(table.cast(OSM_FEATURES_SCHEMA))


def sort_features(table: pa.Table) -> pa.Table:
    """Rows ordered by ``(osm_id, kind, geometry)``: one order for every multi-source read."""
    rank = pa.array([OSM_KINDS.index(k) for k in table["kind"].to_pylist()], pa.int8())
    keys = pa.table({"id": table["osm_id"], "k": rank, "g": table["geometry"]})
    return table.take(pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("k", "ascending"), ("g", "ascending")]))
