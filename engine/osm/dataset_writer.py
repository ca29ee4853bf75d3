"""Write the partitioned OSM dataset (:mod:`engine.osm.dataset`) from a country extract, in bounded memory.

How memory stays bounded: the PBF is streamed by pyosmium with its node locations in a disk-backed index
(``sparse_file_array`` in the output's temporary folder; its mapped pages are handed back to the kernel after every
batch, :func:`release_mapped_pages`), and features are cleaned (the rules of
:func:`engine.osm.read_osm`: same ids, kinds, area semantics and repairs) and flushed every ``flush_rows`` into small
part files per grid cell, each sorted by Hilbert index. Then each cell's parts are merged by DuckDB (an external
sort under ``memory_limit`` that spills to disk) and streamed into the cell's final file row group by row group.
Memory is thus bounded by the batch size, the DuckDB limit and osmium's buffers, not by the country (a cell's merge
is bounded by the DuckDB limit, not by the cell). Everything is written in a temporary sibling folder and renamed
into place last: a reader sees the old dataset or the new one, a rerun replaces it whole, same input, same bytes.

Why not dask-geopandas (``spatial_shuffle`` + ``to_parquet``): it shuffles a GeoDataFrame that must exist first, and a
PBF becomes one only through a streaming reader like this one (the ways need every node's location); once the
features are streamed, writing them per cell and sorting each cell is the whole shuffle, with no scheduler.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from engine.atomic import atomic_path
from engine.geoparquet import geo_metadata, write_geoparquet
from engine.osm.dataset import (
    BBOX_COLUMNS,
    DATASET_FORMAT,
    DATASET_SCHEMA,
    DATASET_VERSION,
    HILBERT_BITS,
    MANIFEST_NAME,
    cell_name,
    cell_of,
    hilbert_index,
    is_osm_dataset,
)
from engine.osm.ingest import (
    _OSMIUM_SUFFIXES,
    BBox,
    IngestReport,
    OsmIngestError,
    _check_bbox,
    _finish_with_geometries,
    _iter_osmium,
    ingest_osm,
)
from engine.osm.sources import PATH_LIST_SEP, osm_source_paths, read_osm_sources
from engine.schema import OSM_KINDS

__all__ = ["DEFAULT_CELL_DEG", "DEFAULT_FLUSH_ROWS", "DatasetReport", "ingest_osm_any", "ingest_osm_dataset", "writes_dataset"]

DEFAULT_CELL_DEG = 1.0
DEFAULT_FLUSH_ROWS = 50_000
ROW_GROUP_ROWS = 16_384  # small enough that a city's box skips most row groups of its cell
_GEOMETRY_TYPES = {0: "Point", 1: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString", 6: "MultiPolygon"}


@dataclass(frozen=True)
class DatasetReport:
    """What one dataset ingest produced (the manifest records the same counts).

    Attributes:
        out: the dataset folder.
        sources: the inputs, in the order read.
        features: rows in the dataset (after the bbox filter and, across several sources, de-duplication).
        by_kind: rows per kind, every kind of ``OSM_KINDS`` present.
        repaired, dropped, reprojected_from: as :class:`engine.osm.IngestReport`, summed over batches and sources.
        partitions: cells holding features.
        cell_deg: the grid cell size in degrees.
        bbox: ``(west, south, east, north)`` of all features; None when there are none.
    """

    out: str
    sources: list[str]
    features: int
    by_kind: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    dropped: int = 0
    reprojected_from: str | None = None
    partitions: int = 0
    cell_deg: float = DEFAULT_CELL_DEG
    bbox: tuple[float, float, float, float] | None = None


def ingest_osm_dataset(
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    bbox: BBox | None = None,
    cell_deg: float = DEFAULT_CELL_DEG,
    flush_rows: int = DEFAULT_FLUSH_ROWS,
    memory_limit: str = "512MB",
    threads: int = 2,
) -> DatasetReport:
    """Stream OSM into a partitioned GeoParquet dataset folder (see the module docstring), atomically.

    Args:
        sources: an OSM file, a ``;`` list or a folder (as :func:`engine.osm.osm_source_paths`). PBF/XML/O5M files
            are streamed in batches with a disk-backed node index; other files (GeoJSON, GeoPackage, GeoParquet:
            city-sized) are read whole with ids kept unique across them as :func:`engine.osm.read_osm_sources` does.
            Several sources: a real OSM element present in two of them (overlapping extracts) is kept once.
        out_dir: the dataset folder; replaced whole when it exists.
        bbox: ``(west, south, east, north)``: keep only features intersecting it.
        cell_deg: grid cell size in degrees (0.01 to 45); a partition holds one cell.
        flush_rows: features cleaned and written per batch: the memory knob of the streaming pass.
        memory_limit, threads: DuckDB's limits for the per-cell merge (it spills to disk beyond the limit).

    Raises:
        OsmIngestError: one line naming the input or the output folder.

    Example:
        >>> import tempfile, geopandas as gpd
        >>> d = Path(tempfile.mkdtemp())
        >>> gpd.GeoDataFrame({"amenity": ["cafe", "bank"]}, geometry=[shapely.Point(13.4, 52.5), shapely.Point(2.35, 48.86)],
        ...                  crs=4326).to_file(d / "pois.geojson")
        >>> report = ingest_osm_dataset(d / "pois.geojson", d / "osm")
        >>> report.features, report.partitions, sorted(p.name for p in (d / "osm").iterdir())
        (2, 2, ['_dataset.json', 'cell=x00182y00138', 'cell=x00193y00142'])
    """
    out = Path(out_dir)
    paths = _checked_inputs(paths_of=sources, out=out, cell_deg=cell_deg, flush_rows=flush_rows, bbox=bbox)
    streamed = [p for p in paths if Path(p).name.lower().endswith(_OSMIUM_SUFFIXES)]
    whole = [p for p in paths if p not in streamed]  # city-sized files, read whole as one (ids kept unique)
    groups = [[p] for p in streamed] + ([whole] if whole else [])

    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        writer = _PartWriter(tmp / "_parts", cell_deg)
        totals = _Totals()
        for src, group in enumerate(groups):
            if group is whole:
                table, report = read_osm_sources(PATH_LIST_SEP.join(group), bbox)
                totals.add(report.repaired, report.dropped, report.reprojected_from)
                for start in range(0, table.num_rows, flush_rows):
                    writer.add(table.slice(start, flush_rows), src)
            else:
                _stream_osmium(Path(group[0]), tmp, writer, src, bbox, flush_rows, totals)
        partitions = writer.compact(tmp, dedupe=len(groups) > 1, memory_limit=memory_limit, threads=threads)
        shutil.rmtree(tmp / "_parts", ignore_errors=True)
        manifest = _manifest([str(Path(p).absolute()) for p in paths], cell_deg, bbox, totals, partitions)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return DatasetReport(out=str(out), sources=manifest["sources"], features=manifest["features"],
                         by_kind=manifest["by_kind"], repaired=totals.repaired, dropped=totals.dropped,
                         reprojected_from=totals.reprojected_from, partitions=len(partitions), cell_deg=cell_deg,
                         bbox=tuple(manifest["bbox"]) if manifest["bbox"] else None)


def _checked_inputs(paths_of, out: Path, cell_deg: float, flush_rows: int, bbox: BBox | None) -> list[str]:
    """The input files (``osm_source_paths``) once every argument is checked; else one line naming what is wrong."""
    if not (0.01 <= cell_deg <= 45):
        raise OsmIngestError(f"{out}: cell_deg={cell_deg}: use 0.01 to 45 degrees")
    if flush_rows < 1:
        raise OsmIngestError(f"{out}: flush_rows={flush_rows}: need at least 1")
    if out.exists() and not out.is_dir():
        raise OsmIngestError(f"{out}: exists and is not a folder; a dataset is written as a folder")
    _check_bbox(out, bbox)
    paths = osm_source_paths(paths_of)
    for p in paths:
        if "://" in p or not Path(p).exists():
            raise OsmIngestError(f"{p}: file does not exist; check the path (relative paths start at {Path.cwd()})")
        if is_osm_dataset(p):
            raise OsmIngestError(f"{p}: is already an OSM dataset; give the OSM files it was made from")
    return paths


def _stream_osmium(path: Path, tmp: Path, writer: _PartWriter, src: int, bbox: BBox | None, flush_rows: int,
                   totals: _Totals) -> None:
    """One PBF/XML/O5M file through osmium in batches, its node locations in a file index under ``tmp``."""
    scratch = tmp if "," not in str(tmp) else Path(tempfile.mkdtemp(prefix="osm-nodes-"))  # osmium's spec is "type,file"
    index = scratch / "_nodes.idx"
    box = _check_bbox(path, bbox)
    try:
        for staged in _iter_osmium(path, flush_rows, locations=f"sparse_file_array,{index}"):
            table, report, geoms = _finish_with_geometries(path, staged, box)
            totals.add(report.repaired, report.dropped, report.reprojected_from)
            writer.add(table, src, geoms)
            release_mapped_pages(index)  # osmium is paused at a batch boundary: its index is not in use
    finally:
        index.unlink(missing_ok=True)
        if scratch != tmp:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _Totals:
    repaired: int = 0
    dropped: int = 0
    reprojected_from: str | None = None

    def add(self, repaired: int, dropped: int, reprojected_from: str | None) -> None:
        self.repaired += repaired
        self.dropped += dropped
        self.reprojected_from = self.reprojected_from or reprojected_from


@dataclass
class _CellStats:
    col: int
    row: int
    parts: list[Path] = field(default_factory=list)
    bounds: list[float] = field(default_factory=lambda: [math.inf, math.inf, -math.inf, -math.inf])
    types: set[int] = field(default_factory=set)
    min_id: int = 0


class _PartWriter:
    """Cleaned contract batches -> small part files per cell (sorted by Hilbert index), then one file per cell."""

    def __init__(self, root: Path, cell_deg: float) -> None:
        self.root = root
        self.cell_deg = cell_deg
        self.cells: dict[str, _CellStats] = {}
        self.batches = 0

    def add(self, table: pa.Table, src: int, geoms: np.ndarray | None = None) -> None:
        """Write one cleaned batch (``geoms``: its shapely geometries when the caller has them) as part files."""
        if table.num_rows == 0:
            return
        if geoms is None:
            geoms = shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))
        bounds = shapely.bounds(geoms)
        cx, cy = (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2
        col, row = cell_of(cx, cy, self.cell_deg)
        scale = (1 << HILBERT_BITS) - 1
        hx = np.clip(((cx + 180.0) / self.cell_deg - col) * scale, 0, scale).astype(np.int64)
        hy = np.clip(((cy + 90.0) / self.cell_deg - row) * scale, 0, scale).astype(np.int64)
        hilbert = hilbert_index(hx, hy)
        cell_key = col * 100_000 + row
        ids = table["osm_id"].to_numpy()
        kind_rank = np.array([OSM_KINDS.index(k) for k in table["kind"].to_pylist()], np.int8)
        order = np.lexsort((kind_rank, ids, hilbert, cell_key))
        full = pa.table(
            [*table.columns, *(pa.array(bounds[:, i]) for i in range(4)), pa.array(hilbert), pa.array(np.full(len(ids), src, np.int16))],
            names=[*table.column_names, *BBOX_COLUMNS, "hilbert", "src"],
        ).take(pa.array(order))
        keys, starts = np.unique(cell_key[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        types = shapely.get_type_id(geoms)[order]
        sorted_bounds = bounds[order]
        for key, start, end in zip(keys.tolist(), starts.tolist(), ends.tolist()):
            name = cell_name(key // 100_000, key % 100_000)
            stats = self.cells.setdefault(name, _CellStats(key // 100_000, key % 100_000))
            path = self.root / name / f"part-{self.batches:06d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            chunk = full.slice(start, end - start)
            pq.write_table(chunk, path, compression="zstd")  # scratch: no geo metadata, removed after the merge
            stats.parts.append(path)
            b = sorted_bounds[start:end]
            stats.bounds = [min(stats.bounds[0], float(b[:, 0].min())), min(stats.bounds[1], float(b[:, 1].min())),
                            max(stats.bounds[2], float(b[:, 2].max())), max(stats.bounds[3], float(b[:, 3].max()))]
            stats.types.update(np.unique(types[start:end]).tolist())
            stats.min_id = min(stats.min_id, int(pc.min(chunk["osm_id"]).as_py()))
        self.batches += 1

    def compact(self, out: Path, dedupe: bool, memory_limit: str, threads: int) -> list[dict]:
        """Merge each cell's parts into ``cell=<name>/part-0.parquet`` sorted by (Hilbert, osm_id, kind, geometry)."""
        import duckdb

        spill = out / "_spill"
        con = duckdb.connect(config={"threads": threads, "memory_limit": memory_limit, "temp_directory": str(spill)})
        keep = (" QUALIFY osm_id < 0 OR row_number() OVER (PARTITION BY osm_id, kind ORDER BY src) = 1" if dedupe else "")
        sql = (f"SELECT {', '.join(DATASET_SCHEMA.names)} FROM read_parquet(?){keep} "
               "ORDER BY hilbert, osm_id, kind, geometry")
        partitions = []
        try:
            for name in sorted(self.cells):
                stats = self.cells[name]
                rel = Path(f"cell={name}") / "part-0.parquet"
                md = geo_metadata(pa.array([], pa.binary()), 4326)
                md["columns"]["geometry"]["geometry_types"] = sorted(_GEOMETRY_TYPES[t] for t in stats.types if t in _GEOMETRY_TYPES)
                md["columns"]["geometry"]["bbox"] = stats.bounds
                schema = DATASET_SCHEMA.with_metadata({b"geo": json.dumps(md).encode()})
                (out / rel).parent.mkdir(parents=True)
                reader = con.execute(sql, [[str(p) for p in stats.parts]]).to_arrow_reader(ROW_GROUP_ROWS)
                rows, by_kind = _write_rebatched(reader, out / rel, schema)
                for part in stats.parts:  # free the disk as the merge goes
                    part.unlink()
                partitions.append({"cell": name, "path": rel.as_posix(), "features": rows, "by_kind": by_kind,
                                   "bbox": stats.bounds, "osm_id_min": stats.min_id, "digest": _file_digest(out / rel)})
        finally:
            con.close()
            shutil.rmtree(spill, ignore_errors=True)
        return partitions


def release_mapped_pages(path: Path) -> int:
    """Hand the resident pages of this process's shared mappings of ``path`` back to the kernel; the bytes mapped.

    Why: osmium's disk-backed node index is a shared memory map of a file; every page it touches stays counted in the
    process's RSS until the kernel needs the memory, so a country's index (16 bytes a node) would look like the
    process's own memory. ``madvise(MADV_DONTNEED)`` on a shared file mapping only drops the page-table entries: the
    data stays in the page cache and the file, and a later lookup faults its page back in (a minor fault). Linux only;
    elsewhere (or without /proc) nothing is done.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return 0
    released = 0
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path) and fields[1].endswith("s"):  # rw-s: shared
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                released += end - start
    return released


_MADV_DONTNEED = 4


def _write_rebatched(batches: Iterable[pa.RecordBatch], path: Path, schema: pa.Schema) -> tuple[int, dict[str, int]]:
    """Write batches as row groups of exactly ROW_GROUP_ROWS rows (the last shorter): same rows, same bytes."""
    rows = 0
    by_kind = dict.fromkeys(OSM_KINDS, 0)
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        def flush(n: int) -> None:
            nonlocal pending, pending_rows
            table = pa.Table.from_batches(pending).combine_chunks()
            writer.write_table(table.slice(0, n).cast(schema), row_group_size=ROW_GROUP_ROWS)
            rest = table.slice(n)
            pending = rest.to_batches() if rest.num_rows else []
            pending_rows = rest.num_rows

        for batch in batches:
            rows += batch.num_rows
            for kind, count in zip(*np.unique(batch.column("kind").to_numpy(zero_copy_only=False), return_counts=True)):
                by_kind[str(kind)] += int(count)
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= ROW_GROUP_ROWS:
                flush(ROW_GROUP_ROWS)
        if pending_rows:
            flush(pending_rows)
    return rows, by_kind


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(sources: list[str], cell_deg: float, bbox: BBox | None, totals: _Totals, partitions: list[dict]) -> dict:
    boxes = np.array([p["bbox"] for p in partitions]) if partitions else None
    by_kind = {k: sum(p["by_kind"][k] for p in partitions) for k in OSM_KINDS}
    return {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "sources": sources,
        "crs": "EPSG:4326",
        "cell_deg": cell_deg,
        "partitioning": "cell=x{col:05d}y{row:05d}: col = floor((lon + 180) / cell_deg), row = floor((lat + 90) / cell_deg) "
                        "of the feature's bbox centre; rows sorted by the Hilbert index of that centre within the cell",
        "bbox_filter": list(bbox) if bbox else None,
        "features": sum(p["features"] for p in partitions),
        "by_kind": by_kind,
        "repaired": totals.repaired,
        "dropped": totals.dropped,
        "reprojected_from": totals.reprojected_from,
        "osm_id_min": min((p["osm_id_min"] for p in partitions), default=0),
        "bbox": [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]
        if boxes is not None else None,
        "partitions": partitions,
    }




def writes_dataset(out: str | os.PathLike[str], partitioned: bool | None = None) -> bool:
    """Whether ``ingest-osm`` writes a partitioned dataset to ``out``: when asked (``partitioned``), else when ``out``
    is an existing folder or has no ``.parquet``/``.geoparquet`` suffix (``OUT/``, ``osm-dataset``)."""
    if partitioned is not None:
        return partitioned
    out = Path(out)
    return out.is_dir() or not out.name.lower().endswith((".parquet", ".geoparquet"))


def ingest_osm_any(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bbox: BBox | None = None,
    partitioned: bool | None = None,
    cell_deg: float = DEFAULT_CELL_DEG,
    flush_rows: int = DEFAULT_FLUSH_ROWS,
) -> IngestReport | DatasetReport:
    """The ``ingest-osm`` command: ``source`` (a file, a ``;`` list or a folder, read as one) into one GeoParquet file
    (:func:`engine.osm.ingest_osm`, unchanged for one input file) or a partitioned dataset (:func:`ingest_osm_dataset`),
    as :func:`writes_dataset` decides."""
    if writes_dataset(out, partitioned):
        return ingest_osm_dataset(source, out, bbox=bbox, cell_deg=cell_deg, flush_rows=flush_rows)
    paths = osm_source_paths(source)
    if len(paths) == 1 and not is_osm_dataset(paths[0]):
        return ingest_osm(paths[0], out, bbox)
    table, report = read_osm_sources(paths, bbox)
    write_geoparquet(table, out, 4326)
    return report
