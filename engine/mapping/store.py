"""A mapping run on disk: its manifest, its predictions (Parquet parts per city) and its ledger (DuckDB).

Layout of ``<workspace>/runs/<run>/``::

    run.json                          manifest: model dir + version, classes, mode, tile size/overlap, cities
    predictions/city=<city>/part-<uuid>.parquet   PREDICTIONS_SCHEMA rows, written atomically by workers
    ledger.duckdb                     one row per tile (status, attempts, error, timings, the part holding it)

Why a ledger apart from the parts: the commit point of a tile is its ledger row, written by the driver in one
transaction per batch *after* the part file is in place. A part written by a worker whose batch never reached
the ledger (the driver was killed in between) is an orphan: nothing reads it; the rerun adopts it when it verifies
(its footer names its tiles, row count and a checksum of its rows, and none of its tiles is in the ledger) and
removes it otherwise. So a run killed anywhere and rerun keeps the predictions that were finished, has each tile
exactly once (the ledger's primary key) and reads only committed rows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.atomic import atomic_path
from engine.schema import EMBEDDING_PARTS_SCHEMA, PREDICTIONS_SCHEMA, built_up_definition
from engine.workspace import RunFolder, Workspace


def run_dir(workspace: Workspace | str | os.PathLike[str], run: str) -> Path:
    """``runs/<run>`` of ``workspace`` (the name checked by :class:`Workspace`)."""
    return Workspace.at(workspace).run(run).root


def predictions_dir(run_path: Path, city: str) -> Path:
    return RunFolder(Path(run_path)).predictions_city(city)


@dataclass(frozen=True)
class RunManifest:
    """What a run's predictions mean: which model made them, over which classes, in which grid."""

    run: str
    model_dir: str
    model_version: str
    classes: tuple[str, ...]
    mode: str
    tile_size_px: int
    overlap_px: int
    datetime: str = ""  # when the run started (ISO 8601, UTC); kept on resume, so reruns give the same products
    vintage: str | None = None  # the catalog vintage (imagery date) mapped; `change` pairs two runs by it (issue 22)
    built_up: dict = field(default_factory=dict, compare=False)  # engine.schema.built_up_definition of the classes

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.built_up:  # derived, never chosen: which of the run's classes are built-up land, and if that is known
            object.__setattr__(self, "built_up", built_up_definition(self.classes))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        """A run's manifest; one written before a field existed reads with that field's default (or derived value)."""
        d = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def write_manifest(run_path: Path, manifest: RunManifest) -> RunManifest:
    """Write ``run.json``, keeping the start time of an earlier pass of the same run; returns what was written."""
    if not manifest.datetime:
        path = Workspace.fetch(RunFolder(run_path).manifest)
        previous = RunManifest.from_json(path.read_text()).datetime if path.is_file() else ""
        stamp = previous or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest = replace(manifest, datetime=stamp)
    with atomic_path(RunFolder(run_path).manifest) as tmp:
        tmp.write_text(manifest.to_json())
    Workspace.publish(RunFolder(run_path).manifest)
    return manifest


def read_manifest(run_path: Path) -> RunManifest:
    path = Workspace.fetch(RunFolder(run_path).manifest)
    if not path.is_file():
        raise FileNotFoundError(f"run {run_path.name}: no {path}; run `geolink-engine map --run {run_path.name}` first")
    return RunManifest.from_json(path.read_text())


# --- probabilities -------------------------------------------------------------------------------------------
def encode_probs(probs: np.ndarray) -> bytes:
    """Class probabilities ``(K, H, W)`` in [0, 1] -> uint8 bytes of channels 1..K-1 (``round(p * 255)``).

    Channel 0 (``other``) is implied as 255 minus the rest, so a binary model stores one byte per pixel.
    """
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probabilities must be (K >= 2, H, W), got {probs.shape}")
    return np.rint(np.clip(probs[1:], 0.0, 1.0) * 255.0).astype(np.uint8).tobytes()


def decode_probs(blob: bytes, n_classes: int, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_probs`: uint8 ``(K, H, W)`` with channel 0 restored (clipped at 0)."""
    rest = np.frombuffer(blob, np.uint8).reshape(n_classes - 1, height, width)
    first = np.clip(255 - rest.astype(np.int32).sum(axis=0), 0, 255).astype(np.uint8)
    return np.concatenate([first[None], rest])


PART_META_KEY = b"geolink.part"  # the part's own record (tiles, row count, checksum), in the Parquet footer


@dataclass(frozen=True)
class PartKind:
    """What a run's parts hold: their schema, and the columns their checksum covers (in this order).

    Map runs hold class probabilities (:data:`PREDICTION_PARTS`); embedding passes hold vectors
    (:data:`EMBEDDING_PARTS`). Both are written, verified and adopted by the same functions.
    """

    schema: pa.Schema
    checksummed: tuple[str, ...]


PREDICTION_PARTS = PartKind(PREDICTIONS_SCHEMA, ("tile_id", "input_hash", "model_version", "n_classes", "height", "width", "probs"))
EMBEDDING_PARTS = PartKind(EMBEDDING_PARTS_SCHEMA, ("tile_id", "input_hash", "model_version", "n_vectors", "dim", "vectors"))


def part_checksum(table: pa.Table, kind: PartKind = PREDICTION_PARTS) -> str:
    """blake2b over every row's checksummed columns (predictions: ``tile_id, input_hash, model_version, n_classes,
    height, width, probs``), in row order."""
    h = hashlib.blake2b(digest_size=16)
    for name in kind.checksummed:
        for value in table[name].to_pylist():
            h.update(value if isinstance(value, bytes) else str(value).encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


def write_part(run_path: Path, city: str, table: pa.Table, kind: PartKind = PREDICTION_PARTS) -> str:
    """Write one batch of a city's predictions (or embeddings: ``kind``) atomically; returns its path relative to
    the run folder.

    The footer carries the part's tiles, row count, model version and a checksum of its contents, so a part whose
    batch never reached the ledger (the driver died in between) can be verified and adopted on resume instead of
    predicted again (:func:`adopt_orphans`).
    """
    name = f"part-{uuid.uuid4().hex}.parquet"
    target = predictions_dir(run_path, city) / name
    table = table.cast(kind.schema)
    record = {"tiles": table["tile_id"].to_pylist(), "rows": table.num_rows, "checksum": part_checksum(table, kind),
              "model_version": table["model_version"][0].as_py() if table.num_rows else ""}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_META_KEY: json.dumps(record).encode()})
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    Workspace.publish(target, keep_local=False)  # remote workspace: the store holds it; this node need not
    return str(target.relative_to(run_path))


def verify_part(path: Path, model_version: str, kind: PartKind = PREDICTION_PARTS) -> pa.Table | None:
    """The part's rows when it verifies: its footer record is there, for ``model_version``, and the rows match it
    (tile set and order, row count, checksum, schema). None otherwise."""
    try:
        table = pq.read_table(path)
        record = json.loads((table.schema.metadata or {})[PART_META_KEY])
        table = table.replace_schema_metadata(None)
        ok = (record.get("model_version") == model_version and record.get("rows") == table.num_rows > 0
              and record.get("tiles") == table["tile_id"].to_pylist() and len(set(record["tiles"])) == table.num_rows
              and table.schema.equals(kind.schema) and set(table["model_version"].to_pylist()) == {model_version}
              and record.get("checksum") == part_checksum(table, kind))
        return table if ok else None
    except Exception:  # noqa: BLE001 (a truncated file, no record, bad JSON: it does not verify)
        return None


# --- ledger --------------------------------------------------------------------------------------------------
LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS ledger (
    tile_id VARCHAR PRIMARY KEY,
    city VARCHAR NOT NULL,
    status VARCHAR NOT NULL,          -- ok | failed
    attempts INTEGER NOT NULL,
    error VARCHAR,
    input_hash VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    part VARCHAR,                     -- predictions part (relative to the run folder) holding the tile when ok
    read_s DOUBLE,
    predict_s DOUBLE,
    committed_at DOUBLE NOT NULL
)
"""
COMMITTED_SQL = """
SELECT tile_id, city, part, input_hash, model_version FROM ledger
WHERE status = 'ok' AND (CAST(? AS VARCHAR) IS NULL OR city = ?) ORDER BY tile_id
"""
SUMMARY_SQL = """
SELECT city, status, count(*) FROM ledger WHERE CAST(? AS VARCHAR) IS NULL OR city = ? GROUP BY ALL ORDER BY ALL
"""
LEDGER_COLUMNS = ("tile_id", "city", "status", "attempts", "error", "input_hash", "model_version", "part", "read_s", "predict_s",
                  "committed_at")
LEDGER_TYPES = (pa.string(), pa.string(), pa.string(), pa.int32(), pa.string(), pa.string(), pa.string(), pa.string(), pa.float64(),
                pa.float64(), pa.float64())
LEDGER_UPSERT = "INSERT OR REPLACE INTO ledger SELECT * FROM ledger_batch"  # the batch: a registered Arrow table


class Ledger:
    """The run's per-tile record; only the driver writes it (one transaction per committed batch)."""

    def __init__(self, run_path: Path, read_only: bool = False) -> None:
        self.path = Workspace.fetch(RunFolder(run_path).ledger, only_if_missing=True)  # a driver restarted elsewhere
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise FileNotFoundError(f"run {run_path.name}: no ledger at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            self.con.execute(LEDGER_SQL)

    def close(self) -> None:
        self.con.close()
        if not self.read_only:
            Workspace.publish(self.path)

    def sync(self) -> None:
        """Checkpoint and, for a remote workspace, upload the ledger (so a driver restarted elsewhere resumes)."""
        if storage.uri_of(self.path) is not None:
            self.con.execute("CHECKPOINT")
            Workspace.publish(self.path)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done(self, model_version: str, city: str) -> pa.Table:
        """``tile_id, input_hash`` of ``city``'s tiles committed ok by ``model_version`` (a rerun skips those whose
        hash matches)."""
        return self.con.execute("SELECT tile_id, input_hash FROM ledger WHERE status = 'ok' AND model_version = ? AND city = ?",
                                [model_version, city]).to_arrow_table()

    def attempts(self, tiles: list[str]) -> dict[str, int]:
        """Attempts recorded so far for ``tiles`` (those the ledger knows)."""
        if not tiles:
            return {}
        return dict(self.con.execute("SELECT tile_id, attempts FROM ledger WHERE list_contains(?, tile_id)", [tiles]).fetchall())

    def commit(self, rows: list[dict]) -> None:
        """Upsert one batch of tile records in one transaction (a tile is in the ledger once, its latest state)."""
        if not rows:
            return
        rows = list({r["tile_id"]: r for r in rows}.values())  # one row per tile (the latest), as one upsert needs
        now = time.time()
        # one set-based upsert of an Arrow batch, not a statement per row: ~100x the rows/s (305 -> ~30,900 tiles/s, bench/capacity.py),
        # which is what keeps a single driver from capping a national run
        batch = pa.table({c: pa.array([r.get(c) if c != "committed_at" else now for r in rows], t)
                          for c, t in zip(LEDGER_COLUMNS, LEDGER_TYPES)})
        self.con.register("ledger_batch", batch)
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute(LEDGER_UPSERT)
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self.con.unregister("ledger_batch")

    def committed(self, city: str | None = None) -> pa.Table:
        """Tiles committed ok (``tile_id, city, part, input_hash, model_version``), sorted by tile id."""
        return self.con.execute(COMMITTED_SQL, [city, city]).to_arrow_table()

    def table(self) -> pa.Table:
        return self.con.execute("SELECT * FROM ledger ORDER BY tile_id").to_arrow_table()

    def summary(self, city: str | None = None) -> dict[str, dict[str, int]]:
        """Per city (or only ``city``): tiles ``ok`` and ``failed``."""
        out: dict[str, dict[str, int]] = {}
        for city, status, n in self.con.execute(SUMMARY_SQL, [city, city]).fetchall():
            out.setdefault(city, {"ok": 0, "failed": 0})[status] = n
        return out

    def first_failure(self, city: str) -> tuple[str, str] | None:
        """``(tile_id, error)`` of the city's first failed tile (by tile id), or None: an example for a report line."""
        return self.con.execute("SELECT tile_id, error FROM ledger WHERE status = 'failed' AND city = ? ORDER BY tile_id LIMIT 1",
                                [city]).fetchone()

    def failures(self) -> list[tuple[str, str, int, str]]:
        """``(city, tile_id, attempts, error)`` of every failed tile."""
        return self.con.execute("SELECT city, tile_id, attempts, error FROM ledger WHERE status = 'failed' ORDER BY tile_id").fetchall()


@dataclass(frozen=True)
class OrphanSweep:
    """What :func:`adopt_orphans` did: parts adopted (and their tiles), parts removed."""

    adopted_parts: int = 0
    adopted_tiles: int = 0
    removed: int = 0


def adopt_orphans(run_path: Path, ledger: Ledger, model_version: str, kind: PartKind = PREDICTION_PARTS) -> OrphanSweep:
    """Settle every prediction part the ledger does not reference (its batch was written but never committed).

    A part is adopted (its tiles committed ``ok`` in one transaction) when none of its tiles
    is in the ledger and its contents verify (:func:`verify_part`): the work a driver had received from the actors
    before it died is kept. Every other orphan is deleted: a part whose tiles were committed from another part (a
    batch redone after a lost actor), one of another model version, or one that fails verification. So each tile
    stays in exactly one committed part.
    """
    referenced = {row[0] for row in ledger.con.execute("SELECT DISTINCT part FROM ledger WHERE part IS NOT NULL").fetchall()}
    known = {row[0] for row in ledger.con.execute("SELECT tile_id FROM ledger").fetchall()}
    adopted_parts = adopted_tiles = removed = 0
    for path in sorted(storage.list_files(RunFolder(run_path).predictions, ".parquet", recursive=True)):
        rel = str(path.relative_to(run_path))
        if rel in referenced:
            continue
        table = verify_part(Workspace.fetch(path), model_version, kind)
        if table is not None and not known.intersection(table["tile_id"].to_pylist()):
            ledger.commit([{"tile_id": t, "city": c, "status": "ok", "attempts": 1, "error": "", "input_hash": h,
                            "model_version": model_version, "part": rel, "read_s": None, "predict_s": None}
                           for t, c, h in zip(*(table[k].to_pylist() for k in ("tile_id", "city", "input_hash")))])
            known.update(table["tile_id"].to_pylist())
            adopted_parts += 1
            adopted_tiles += table.num_rows
            continue
        storage.remove(path)
        removed += 1
    return OrphanSweep(adopted_parts, adopted_tiles, removed)


def read_city_predictions(run_path: Path, committed: pa.Table, batch_rows: int = 64,
                          con: duckdb.DuckDBPyConnection | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(tile_id, uint8 probs (K, H, W))`` for the committed tiles of one city, in the order of ``committed``'s rows.

    ``committed`` holds ``tile_id`` and ``part`` (as :meth:`Ledger.committed` gives them, sorted by tile id; a
    caller may reorder the rows, e.g. by grid position). Only the row of each tile in the part the ledger assigns
    it to is used (a part can hold a tile later redone elsewhere). DuckDB scans the parts and streams the rows in
    batches of ``batch_rows``, so memory holds one batch, not the city (a large sort spills to disk).
    A committed tile missing from its part is an error naming the tile and the part. ``con``: a DuckDB connection
    to use (a cursor of it is opened and closed here); a fresh one by default.
    """
    if committed.num_rows == 0:
        return
    parts = committed["part"].to_pylist()
    wanted = pa.table({
        "tile_id": committed["tile_id"],
        "path": pa.array([str(run_path / part) for part in parts], pa.string()),
        "ordinal": pa.array(np.arange(committed.num_rows), pa.int64()),
    })
    for path in sorted(set(wanted["path"].to_pylist())):  # parts written on other nodes of a remote workspace
        Workspace.fetch(path)
    con = con.cursor() if con is not None else duckdb.connect()
    try:
        con.register("wanted", wanted)
        reader = con.execute(
            "SELECT w.tile_id, p.n_classes, p.height, p.width, p.probs FROM read_parquet(?, filename = true) p "
            "JOIN wanted w ON p.tile_id = w.tile_id AND p.filename = w.path ORDER BY w.ordinal",
            [sorted(set(wanted["path"].to_pylist()))],
        ).to_arrow_reader(batch_rows)
        expected = iter(zip(committed["tile_id"].to_pylist(), parts))
        for batch in reader:
            for row in batch.to_pylist():
                tile, part = next(expected)
                if row["tile_id"] != tile:
                    raise FileNotFoundError(f"run {run_path.name}: tile {tile} is committed in {part} but that part does not hold it; "
                                            f"rerun `geolink-engine map --run {run_path.name}`")
                yield tile, decode_probs(row["probs"], row["n_classes"], row["height"], row["width"])
        missing = next(expected, None)
        if missing is not None:
            raise FileNotFoundError(f"run {run_path.name}: tile {missing[0]} is committed in {missing[1]} but that part does not hold it; "
                                    f"rerun `geolink-engine map --run {run_path.name}`")
    finally:
        con.close()
