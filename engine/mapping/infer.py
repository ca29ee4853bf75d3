"""Fused inference over prepared tiles on Ray Data, committed tile by tile to the run's ledger.

Pipeline (streaming, one direction; the driver only ever sees small status rows):

1. ``from_items(parts)``: one row per prepared Parquet part (a chunk of up to 16 x 16 tiles of one city);
2. ``map_batches(load_todo)``: the part's tile-index + graph rows, minus tiles the ledger already holds for this
   model version with the same input hash (a rerun skips them);
3. ``map_batches(read_pixels)``: each tile's window (halo included, boundless) by rasterio; a tile whose read
   fails twice gets ``read_error`` and no pixels, and its batch goes on;
   (steps 2 and 3 run as one task per part);
4. ``map_batches(PredictAndWrite, compute=ActorPoolStrategy)``: the model, loaded once per actor (GPU when asked),
   then one Parquet part per city per batch, written atomically by the actor (so probabilities never travel back);
5. the driver commits each batch's status rows to the ledger in one transaction: that is the commit point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio

from engine import storage
from engine.atomic import atomic_path
from engine.mapping.predict import Predictor
from engine.mapping.store import Ledger, RunManifest, adopt_orphans, predictions_dir, run_dir, write_manifest, write_part
from engine.tiles.grid import read_window
from engine.tiles.parts import load_part

LEDGER_SYNC_S = 30.0  # a remote workspace's ledger is uploaded this often (and at the end): what a new driver resumes from
STATUS_COLUMNS = ("tile_id", "city", "status", "attempts", "error", "input_hash", "part", "read_s", "predict_s")


@dataclass(frozen=True)
class InferenceConfig:
    """How inference is spread over the cluster.

    Args:
        batch_size: tiles per model call.
        actors: predictor actors (default: ``gpus x actors_per_gpu`` when using GPUs, else half the CPUs, at least 1).
        gpus: GPUs to use (0 = CPU).
        actors_per_gpu: predictor actors sharing one GPU (each asks for ``1/actors_per_gpu`` of it). Why: an actor's
            host work per tile (collate, encoding, Parquet) runs in series with its forward pass; on a fast GPU
            several actors keep it busy (docs/CAPACITY.md).
        cpus_per_actor: CPUs reserved per actor (its torch threads on CPU).
        cpus_per_read: CPUs reserved per read/write task (window reads are mostly I/O and decompression).
        read_attempts: tries per window read before the tile is recorded as failed.
    """

    batch_size: int = 16
    actors: int | None = None
    gpus: int = 0
    actors_per_gpu: int = 1
    cpus_per_actor: float = 1.0
    cpus_per_read: float = 0.5
    read_attempts: int = 2

    def __post_init__(self) -> None:
        if (self.batch_size < 1 or self.read_attempts < 1 or self.gpus < 0 or self.actors_per_gpu < 1
                or (self.actors is not None and self.actors < 1)):
            raise ValueError("batch_size, read_attempts, actors and actors_per_gpu must be >= 1 and gpus >= 0")

    def pool_size(self, cluster_cpus: float) -> int:
        if self.actors:
            return self.actors
        return self.gpus * self.actors_per_gpu if self.gpus else max(1, int(cluster_cpus // (2 * self.cpus_per_actor)))

    def actor_resources(self) -> dict[str, float]:
        """Ray resources of one predictor actor beyond its CPUs: a share of a GPU when predicting on GPUs."""
        return {"num_gpus": 1.0 / self.actors_per_gpu} if self.gpus else {}


@dataclass(frozen=True)
class InferenceResult:
    """One inference pass: tiles predicted now, tiles skipped (already done), per-city ledger counts."""

    predicted: int
    failed: int
    skipped: int
    seconds: float
    cities: dict[str, dict[str, int]]
    missing: dict[str, str]  # city -> why it has no tiles to predict (not prepared)
    adopted: int = 0  # tiles of parts a killed driver never committed, verified and committed now (counted in skipped)


def load_todo(pairs: pa.Table, done_dir: str) -> pa.Table:
    """Ray Data step: prepared parts -> tile rows not yet done (same ``tile_id`` and ``input_hash`` in the ledger)."""
    tables = []
    for pair in pairs.to_pylist():
        table = load_part(pair)
        if pair.get("imagery"):  # where the imagery is now (the catalog), not where it was when prepared
            table = table.set_column(table.schema.get_field_index("imagery"), "imagery", pa.array([pair["imagery"]] * table.num_rows, pa.string()))
        done_path = storage.localize(Path(done_dir) / f"{pair['city']}.parquet")
        if done_path.is_file() and table.num_rows:
            done = pq.read_table(done_path)
            table = table.filter(pc.invert(pc.is_in(_tile_keys(table), value_set=_tile_keys(done))))
        tables.append(table)
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_pixels(batch: pa.Table, attempts: int = 2) -> pa.Table:
    """Ray Data step: each tile's window as ``image`` (uint8 3 x H x W); failures go to ``read_error`` (zeros).

    Every image leaves here as uint8, the model's input type, whatever the raster holds: a raster of another pixel
    type (or with fewer than 3 bands) fails its tiles with one clear error instead of being rescaled, and no batch
    ever mixes tensor types across cities. A read error carries GDAL's root cause (the chained exception).
    """
    from ray.data.extensions import ArrowTensorArray

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
    batch = batch.append_column("image", ArrowTensorArray.from_numpy(np.stack(images)))
    batch = batch.append_column("read_error", pa.array(errors, pa.string()))
    return batch.append_column("read_s", pa.array(seconds, pa.float64()))


def write_predictions(batch: pa.Table, run_path: str, model_version: str) -> pa.Table:
    """Ray Data step: the batch's successful tiles as one Parquet part per city; returns status rows (no pixels)."""
    run = Path(run_path)
    parts: dict[str, str] = {}
    ok = batch.filter(pc.equal(batch["status"], "ok"))
    for city in sorted(set(ok["city"].to_pylist())):
        rows = ok.filter(pc.equal(ok["city"], city))
        table = rows.select(["tile_id", "city", "input_hash"]).append_column("model_version", pa.array([model_version] * rows.num_rows))
        for name in ("n_classes", "height", "width", "probs"):
            table = table.append_column(name, rows[name])
        parts[city] = write_part(run, city, table)
    status = batch.select([c for c in STATUS_COLUMNS if c != "part"])
    part = [parts.get(c) if s == "ok" else None for c, s in zip(status["city"].to_pylist(), status["status"].to_pylist())]
    return status.append_column("part", pa.array(part, pa.string()))


def load_and_read(pairs: pa.Table, done_dir: str, attempts: int = 2) -> pa.Table:
    """Ray Data step: :func:`load_todo` then :func:`read_pixels`, in one task per prepared part."""
    return read_pixels(load_todo(pairs, done_dir), attempts)


class PredictAndWrite:
    """The actor: a predictor (built once per actor) followed by :func:`write_predictions`; returns status rows."""

    def __init__(self, predictor: type[Predictor], predictor_kwargs: dict, run_path: str, model_version: str) -> None:
        self.predictor = predictor(**predictor_kwargs)
        self.run_path, self.model_version = run_path, model_version

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_predictions(self.predictor(batch), self.run_path, self.model_version)


def _tile_keys(table: pa.Table) -> pa.Array:
    """``tile_id|input_hash`` per row: a tile is done only for the inputs it was predicted from."""
    return pc.binary_join_element_wise(table["tile_id"], table["input_hash"], "|")


def _write_done(ledger: Ledger, cities: list[str], model_version: str, done_dir: Path) -> dict[str, pa.Table]:
    """Per city, the tiles already done for this model version (``tile_id, input_hash``), written as small Parquet
    files the read tasks filter on; returns them."""
    out = {}
    done_dir.mkdir(parents=True, exist_ok=True)
    for city in cities:
        out[city] = done = ledger.done(model_version, city)
        with atomic_path(done_dir / f"{city}.parquet") as tmp:
            pq.write_table(done, tmp)
        storage.publish(done_dir / f"{city}.parquet")  # read by tasks on every node
    return out


def _parts_with_work(pairs: list[dict], done: dict[str, pa.Table]) -> list[dict]:
    """The parts that still hold a tile to predict (a resumed run: parts whose tiles are all done are not sent).

    Only cities with done tiles are checked, by the parts' ``tile_id``/``input_hash`` columns (small reads)."""
    done_keys = {city: set(_tile_keys(table).to_pylist()) for city, table in done.items() if table.num_rows}
    out = []
    for pair in pairs:
        keys = done_keys.get(pair["city"])
        if keys is not None:
            index = pq.read_table(storage.localize(pair["index"]), columns=["tile_id", "input_hash"])
            if all(k in keys for k in _tile_keys(index).to_pylist()):
                continue  # every tile of the part is done
        out.append(pair)
    return out


def run_inference(workspace: str | os.PathLike[str], manifest: RunManifest, cities: list[str], predictor: type[Predictor],
                  predictor_kwargs: dict, cfg: InferenceConfig | None = None,
                  on_commit: Callable[[int, int], None] | None = None, imagery: dict[str, str] | None = None,
                  on_city_done: Callable[[str, pa.Table, int], None] | None = None) -> InferenceResult:
    """Predict every prepared tile of ``cities`` not yet in the run's ledger; returns counts per city.

    ``imagery`` (city -> path, from the catalog) says where each city's raster is now, when it moved since prepare.
    ``on_city_done(city, committed, tiles_failed)`` is called once a city's last tile is in the ledger (``map``
    starts stitching it then), with the city's :meth:`Ledger.committed` rows; cities with nothing to do are not.

    ``on_commit(tiles_committed_now, tiles_to_do)`` is called after each ledger transaction (progress bars).
    Ray must be initialised. Cities with no prepared tiles are returned in ``missing``, never fatal.
    """
    import ray
    from ray.data import ActorPoolStrategy

    cfg = cfg or InferenceConfig()
    t0 = time.perf_counter()
    run_path = run_dir(workspace, manifest.run)
    run_path.mkdir(parents=True, exist_ok=True)
    write_manifest(run_path, manifest)
    pairs, missing, total, per_city = [], {}, 0, {}
    for city in cities:
        predictions_dir(run_path, city)  # validates the slug before it becomes a path
        root = Path(workspace) / "tiles" / f"city={city}" / "index"
        found = storage.list_files(root, ".parquet")
        if not found:
            missing[city] = f"no prepared tiles in {root.parent}"
            continue
        for index in found:
            pairs.append({"index": str(index), "graphs": str(index.parent.parent / "graphs" / index.name), "city": city,
                          "imagery": (imagery or {}).get(city) or ""})
            n = pq.read_metadata(storage.localize(index)).num_rows
            total += n
            per_city[city] = per_city.get(city, 0) + n
    with Ledger(run_path) as ledger:
        # parts a killed driver never committed: adopted when they verify (finished work is kept), else removed
        sweep = adopt_orphans(run_path, ledger, manifest.model_version)
        done_dir = run_path / "_done"
        done = _write_done(ledger, [c for c in cities if c not in missing], manifest.model_version, done_dir)
        done_counts = {city: table.num_rows for city, table in done.items()}
        skipped = sum(done_counts.values())
        pairs = _parts_with_work(pairs, done)
        remaining = {c: n - done_counts.get(c, 0) for c, n in per_city.items()}
        predicted = failed = 0
        synced = time.monotonic()
        if pairs and total > skipped:
            cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
            ds = ray.data.from_items(pairs, override_num_blocks=len(pairs))
            # one task per part: its graph rows, minus done tiles, plus its windows' pixels (CPU, many in parallel)
            ds = ds.map_batches(load_and_read, fn_kwargs={"done_dir": str(done_dir), "attempts": cfg.read_attempts}, batch_size=1,
                                batch_format="pyarrow", num_cpus=cfg.cpus_per_read)
            # the actors predict and write their own parts: probabilities never travel back through the object store
            ds = ds.map_batches(PredictAndWrite, fn_constructor_kwargs={"predictor": predictor, "predictor_kwargs": predictor_kwargs,
                                                                        "run_path": str(run_path), "model_version": manifest.model_version},
                                batch_size=cfg.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=cfg.pool_size(cluster_cpus)),
                                num_cpus=cfg.cpus_per_actor, **cfg.actor_resources())
            for batch in ds.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow"):
                rows = batch.to_pylist()
                previous = ledger.attempts([r["tile_id"] for r in rows if r["status"] != "ok"])
                for r in rows:
                    r["model_version"] = manifest.model_version
                    r["attempts"] = int(r["attempts"]) + previous.get(r["tile_id"], 0)
                ledger.commit(rows)
                for r in rows:
                    remaining[r["city"]] -= 1
                    if remaining[r["city"]] == 0 and on_city_done:
                        city = r["city"]
                        on_city_done(city, ledger.committed(city), ledger.summary(city).get(city, {}).get("failed", 0))
                n_ok = sum(r["status"] == "ok" for r in rows)
                predicted += n_ok
                failed += len(rows) - n_ok
                if on_commit:
                    on_commit(len(rows), total - skipped)
                if time.monotonic() - synced > LEDGER_SYNC_S:
                    ledger.sync()
                    synced = time.monotonic()
        summary = ledger.summary()
        if pairs and total > skipped:
            adopt_orphans(run_path, ledger, manifest.model_version)  # parts of batches redone after a lost node or actor
    return InferenceResult(predicted=predicted, failed=failed, skipped=skipped, seconds=time.perf_counter() - t0,
                           cities={c: summary.get(c, {"ok": 0, "failed": 0}) for c in cities if c not in missing}, missing=missing,
                           adopted=sweep.adopted_tiles)

