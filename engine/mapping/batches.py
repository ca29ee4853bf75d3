"""The per-batch steps of inference, pure functions of data and paths (the Ray Data pipeline that runs them is
:mod:`engine.pipelines.infer`; nothing here schedules anything).

- :func:`load_todo`: prepared parts -> the tile rows not yet done (a rerun skips committed tiles);
- :func:`read_pixels`: each tile's window (halo included, boundless) by rasterio; a tile whose read fails twice
  gets ``read_error`` and no pixels, and its batch goes on;
- :class:`PredictAndWrite`: a predictor (built once) then :func:`write_predictions`, one Parquet part per city per
  batch, written atomically where it runs (so probabilities never travel back); it returns status rows only.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio

from engine import storage
from engine.mapping.predict import Predictor
from engine.mapping.store import PREDICTION_PARTS, PartKind, write_part
from engine.pixels import to_tensor_column
from engine.tiles.grid import read_window
from engine.tiles.parts import load_part
from engine.workspace import Workspace

STATUS_COLUMNS = ("tile_id", "city", "status", "attempts", "error", "input_hash", "part", "read_s", "predict_s")


def load_todo(pairs: pa.Table, done_dir: str) -> pa.Table:
    """Ray Data step: prepared parts -> tile rows not yet done (same ``tile_id`` and ``input_hash`` in the ledger);
    a part limited to some tiles (``only``: tile ids, one per line) gives only those."""
    tables = []
    for pair in pairs.to_pylist():
        table = load_part(pair)
        if pair.get("only"):
            table = table.filter(pc.is_in(table["tile_id"], value_set=pa.array(pair["only"].split("\n"), pa.string())))
        if pair.get("imagery"):  # where the imagery is now (the catalog), not where it was when prepared
            table = table.set_column(table.schema.get_field_index("imagery"), "imagery", pa.array([pair["imagery"]] * table.num_rows, pa.string()))
        done_path = Workspace.fetch(Path(done_dir) / f"{pair['city']}.parquet")
        if done_path.is_file() and table.num_rows:
            done = pq.read_table(done_path)
            table = table.filter(pc.invert(pc.is_in(tile_keys(table), value_set=tile_keys(done))))
        tables.append(table)
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_pixels(batch: pa.Table, attempts: int = 2) -> pa.Table:
    """Ray Data step: each tile's window as ``image`` (uint8 3 x H x W); failures go to ``read_error`` (zeros).

    Every image leaves here as uint8, the model's input type, whatever the raster holds: a raster of another pixel
    type (or with fewer than 3 bands) fails its tiles with one clear error instead of being rescaled, and no batch
    ever mixes tensor types across cities. A read error carries GDAL's root cause (the chained exception).
    """
    from engine.errors import describe_error
    from engine.imagery import imagery_facts, model_input_problem

    keys = ("imagery", "window_col_off", "window_row_off", "window_width", "window_height", "tile_id")
    images, errors, seconds = [], [], []
    sources: dict[str, rasterio.io.DatasetReader] = {}  # one open per raster per batch, not per tile
    refused: dict[str, str] = {}  # rasters the model cannot take, with why (checked once per raster)
    with storage.raster_env():
        try:
            for row in batch.select(list(keys)).to_pylist():
                t0, pixels, error = time.perf_counter(), None, ""
                for attempt in range(attempts):
                    try:
                        if row["imagery"] not in sources and row["imagery"] not in refused:
                            src = sources[row["imagery"]] = rasterio.open(row["imagery"])
                            problem = model_input_problem(imagery_facts(src, row["imagery"])) if src.crs is not None else None
                            if problem:
                                refused[row["imagery"]] = problem
                        if row["imagery"] in refused:
                            error = refused[row["imagery"]]
                            break
                        pixels = read_window(sources[row["imagery"]], row)
                        error = ""
                        break
                    except Exception as exc:  # a corrupt block or a vanished file: reopen and retry, then record
                        error = f"read {row['imagery']}: {describe_error(exc)}"
                        stale = sources.pop(row["imagery"], None)
                        if stale is not None:
                            stale.close()
                        time.sleep(0.05 * (attempt + 1))
                if pixels is None:
                    pixels = np.zeros((3, row["window_height"], row["window_width"]), np.uint8)
                images.append(pixels)
                errors.append(error)
                seconds.append(time.perf_counter() - t0)
        finally:
            for src in sources.values():
                src.close()
    batch = batch.append_column("image", to_tensor_column(images))
    batch = batch.append_column("read_error", pa.array(errors, pa.string()))
    return batch.append_column("read_s", pa.array(seconds, pa.float64()))


def write_predictions(batch: pa.Table, run_path: str, model_version: str, kind: PartKind = PREDICTION_PARTS) -> pa.Table:
    """Ray Data step: the batch's successful tiles as one Parquet part per city; returns status rows (no pixels).

    ``kind``: what the parts hold (predictions; embeddings for `embed`): the batch carries its payload columns."""
    run = Path(run_path)
    parts: dict[str, str] = {}
    ok = batch.filter(pc.equal(batch["status"], "ok"))
    payload = [name for name in kind.schema.names if name not in ("tile_id", "city", "input_hash", "model_version")]
    for city in sorted(set(ok["city"].to_pylist())):
        rows = ok.filter(pc.equal(ok["city"], city))
        table = rows.select(["tile_id", "city", "input_hash"]).append_column("model_version", pa.array([model_version] * rows.num_rows))
        for name in payload:
            table = table.append_column(name, rows[name])
        parts[city] = write_part(run, city, table, kind)
    status = batch.select([c for c in STATUS_COLUMNS if c != "part"])
    part = [parts.get(c) if s == "ok" else None for c, s in zip(status["city"].to_pylist(), status["status"].to_pylist())]
    return status.append_column("part", pa.array(part, pa.string()))


def load_and_read(pairs: pa.Table, done_dir: str, attempts: int = 2) -> pa.Table:
    """Ray Data step: :func:`load_todo` then :func:`read_pixels`, in one task per prepared part."""
    return read_pixels(load_todo(pairs, done_dir), attempts)


class PredictAndWrite:
    """The actor: a predictor (built once per actor) followed by :func:`write_predictions`; returns status rows."""

    parts = PREDICTION_PARTS  # what its parts hold (resume verifies and adopts them as such)

    def __init__(self, predictor: type[Predictor], predictor_kwargs: dict, run_path: str, model_version: str) -> None:
        self.predictor = predictor(**predictor_kwargs)
        self.run_path, self.model_version = run_path, model_version

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_predictions(self.predictor(batch), self.run_path, self.model_version, self.parts)


def tile_keys(table: pa.Table) -> pa.Array:
    """``tile_id|input_hash`` per row: a tile is done only for the inputs it was predicted from."""
    return pc.binary_join_element_wise(table["tile_id"], table["input_hash"], "|")
