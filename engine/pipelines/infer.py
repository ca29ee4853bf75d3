"""Inference on Ray Data over prepared tiles, committed tile by tile to the run's ledger.

Pipeline (streaming, one direction; the driver only ever sees small status rows), its steps in
:mod:`engine.mapping.batches`:

1. ``from_items(parts)``: one row per prepared Parquet part (a chunk of up to 16 x 16 tiles of one city);
2. ``map_batches(load_and_read)``, one task per part: the part's tile-index + graph rows, minus tiles the ledger
   already holds for this model version with the same input hash, then each window's pixels;
3. ``map_batches(PredictAndWrite, compute=ActorPoolStrategy)``: the model, loaded once per actor (GPU when asked),
   then one Parquet part per city per batch, written atomically by the actor;
4. the driver commits each batch's status rows to the ledger in one transaction: that is the commit point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.atomic import atomic_path
from engine.mapping.batches import PredictAndWrite, load_and_read, tile_keys
from engine.mapping.predict import Predictor
from engine.mapping.status import StatusWriter
from engine.mapping.store import PREDICTION_PARTS, Ledger, RunManifest, adopt_orphans, write_manifest
from engine.workspace import RunFolder, Workspace

LEDGER_SYNC_S = 30.0  # a remote workspace's ledger is uploaded this often (and at the end): what a new driver resumes from


@dataclass(frozen=True)
class InferenceConfig:
    """How inference is spread over the cluster.

    Args:
        batch_size: tiles per model call; default 16 on CPU, 64 on GPUs (one rule for the CLI and the Ray job).
        actors: predictor actors (default: ``gpus x actors_per_gpu`` when using GPUs, else half the CPUs, at least 1).
        gpus: GPUs to use (0 = CPU).
        actors_per_gpu: predictor actors sharing one GPU (each asks for ``1/actors_per_gpu`` of it). Why: an actor's
            host work per tile (collate, encoding, Parquet) runs in series with its forward pass; on a fast GPU
            several actors keep it busy (docs/CAPACITY.md).
        cpus_per_actor: CPUs reserved per actor (its torch threads on CPU).
        cpus_per_read: CPUs reserved per read/write task (window reads are mostly I/O and decompression).
        read_attempts: tries per window read before the tile is recorded as failed.
    """

    batch_size: int | None = None
    actors: int | None = None
    gpus: int = 0
    actors_per_gpu: int = 1
    cpus_per_actor: float = 1.0
    cpus_per_read: float = 0.5
    read_attempts: int = 2

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", 64 if self.gpus else 16)
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


def _write_done(ledger: Ledger, cities: list[str], model_version: str, done_dir: Path) -> dict[str, pa.Table]:
    """Per city, the tiles already done for this model version (``tile_id, input_hash``), written as small Parquet
    files the read tasks filter on; returns them."""
    out = {}
    done_dir.mkdir(parents=True, exist_ok=True)
    for city in cities:
        out[city] = done = ledger.done(model_version, city)
        with atomic_path(done_dir / f"{city}.parquet") as tmp:
            pq.write_table(done, tmp)
        Workspace.publish(done_dir / f"{city}.parquet")  # read by tasks on every node
    return out


def _parts_with_work(pairs: list[dict], done: dict[str, pa.Table]) -> list[dict]:
    """The parts that still hold a tile to predict (a resumed run: parts whose tiles are all done are not sent).

    Only cities with done tiles are checked, by the parts' ``tile_id``/``input_hash`` columns (small reads); a part
    limited to some tiles (``only``) is checked on those."""
    done_keys = {city: set(tile_keys(table).to_pylist()) for city, table in done.items() if table.num_rows}
    out = []
    for pair in pairs:
        keys = done_keys.get(pair["city"])
        if keys is not None:
            index = pq.read_table(Workspace.fetch(pair["index"]), columns=["tile_id", "input_hash"])
            if pair["only"]:
                index = index.filter(pc.is_in(index["tile_id"], value_set=pa.array(pair["only"].split("\n"))))
            if all(k in keys for k in tile_keys(index).to_pylist()):
                continue  # every tile of the part is done
        out.append(pair)
    return out


def run_inference(workspace: str | os.PathLike[str], manifest: RunManifest, cities: list[str], predictor: type[Predictor],
                  predictor_kwargs: dict, cfg: InferenceConfig | None = None,
                  on_commit: Callable[[int, int], None] | None = None, imagery: dict[str, str] | None = None,
                  on_city_done: Callable[[str, pa.Table, int], None] | None = None, *, actor: type = PredictAndWrite,
                  run_folder: RunFolder | None = None, tiles: dict[str, set[str]] | None = None) -> InferenceResult:
    """Predict every prepared tile of ``cities`` not yet in the run's ledger; returns counts per city.

    The same pipeline, ledger and resume serve other per-tile outputs: ``actor`` is the callable class that runs the
    predictor and writes its parts (constructor ``(predictor, predictor_kwargs, run_path, model_version)``, attribute
    ``parts``: their :class:`~engine.mapping.store.PartKind`), ``run_folder`` where the manifest, ledger and parts
    go (default ``runs/<manifest.run>``), ``tiles`` (city -> tile ids) limits the pass to those tiles
    (`geolink-engine embed --points`: the tiles holding a point).

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
    ws = Workspace.at(workspace)
    run_path = (run_folder or ws.run(manifest.run)).root
    kind = getattr(actor, "parts", PREDICTION_PARTS)
    run_path.mkdir(parents=True, exist_ok=True)
    write_manifest(run_path, manifest)
    pairs, missing, total, per_city = [], {}, 0, {}
    for city in cities:
        root = ws.tile_index(city)  # the slug is checked before it becomes a path
        found = storage.list_files(root, ".parquet")
        if not found:
            missing[city] = f"no prepared tiles in {ws.city_tiles(city)}"
            continue
        for index in found:
            only = ""
            if tiles is not None:  # a pass over some tiles: the part's tiles among them, one per line (tile ids are slugs)
                wanted = [t for t in pq.read_table(Workspace.fetch(index), columns=["tile_id"])["tile_id"].to_pylist() if t in tiles.get(city, ())]
                if not wanted:
                    continue
                only, n = "\n".join(wanted), len(wanted)
            else:
                n = pq.read_metadata(Workspace.fetch(index)).num_rows
            pairs.append({"index": str(index), "graphs": str(Workspace.graphs_beside(index)), "city": city,
                          "imagery": (imagery or {}).get(city) or "", "only": only})
            total += n
            per_city[city] = per_city.get(city, 0) + n
    status = StatusWriter(RunFolder(run_path), per_city, missing)  # runs/<run>/status.json: what `status` reads meanwhile
    with Ledger(run_path) as ledger, status:
        # parts a killed driver never committed: adopted when they verify (finished work is kept), else removed
        sweep = adopt_orphans(run_path, ledger, manifest.model_version, kind)
        done_dir = RunFolder(run_path).done
        done = _write_done(ledger, [c for c in cities if c not in missing], manifest.model_version, done_dir)
        if tiles is not None:  # counted among the pass's tiles only
            done = {c: t.filter(pc.is_in(t["tile_id"], value_set=pa.array(sorted(tiles.get(c, ())), pa.string()))) for c, t in done.items()}
        done_counts = {city: table.num_rows for city, table in done.items()}
        skipped = sum(done_counts.values())
        pairs = _parts_with_work(pairs, done)
        remaining = {c: n - done_counts.get(c, 0) for c, n in per_city.items()}
        status.start(done_counts)
        predicted = failed = 0
        synced = time.monotonic()
        if pairs and total > skipped:
            cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
            ds = ray.data.from_items(pairs, override_num_blocks=len(pairs))
            # one task per part: its graph rows, minus done tiles, plus its windows' pixels (CPU, many in parallel)
            ds = ds.map_batches(load_and_read, fn_kwargs={"done_dir": str(done_dir), "attempts": cfg.read_attempts}, batch_size=1,
                                batch_format="pyarrow", num_cpus=cfg.cpus_per_read)
            # the actors predict and write their own parts: probabilities never travel back through the object store
            ds = ds.map_batches(actor, fn_constructor_kwargs={"predictor": predictor, "predictor_kwargs": predictor_kwargs,
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
                status.commit(rows)  # at most every STATUS_EVERY_S
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
            adopt_orphans(run_path, ledger, manifest.model_version, kind)  # parts of batches redone after a lost node or actor
    return InferenceResult(predicted=predicted, failed=failed, skipped=skipped, seconds=time.perf_counter() - t0,
                           cities={c: summary.get(c, {"ok": 0, "failed": 0}) for c in cities if c not in missing}, missing=missing,
                           adopted=sweep.adopted_tiles)

