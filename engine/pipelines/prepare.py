"""`prepare` on Ray Data: cities in parallel, each city's tiles in parallel chunks, streamed, resumable.

Stages (one direction):
1. ``flat_map(plan)`` per city: input hash; skip when the city's marker holds the same hash; else grid the city,
   stage its OSM (one read, one reprojection, one tokenisation) and emit one row per chunk of tiles.
   A city that fails (unreadable imagery, no OSM overlap, ...) emits one ``failed`` row instead; others go on.
2. ``map(build)`` per chunk: tile-index and tile-graph rows written as Parquet parts in the city's staging folder.
3. The driver streams the small status rows (never the data); when a city's last chunk is in, its staging
   output is renamed into ``tiles/city=<city>/`` (atomic) and then its marker is written, last.

Output: ``tiles/city=<city>/index/*.parquet`` and ``tiles/city=<city>/graphs/*.parquet`` (Hive-partitioned by
city), ``tiles/_state/<city>.json`` (input hash, tile count: the completion marker).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.atomic import atomic_path
from engine.model_input import InputPlan, InputSpec, resolve_catalog
from engine.tiles.city import (
    PrepareConfig,
    build_chunk,
    city_input_hash,
    file_digest,
    osm_digest,
    plan_city,
)
from engine.workspace import Workspace

STATUS_KEYS = ("city", "status", "error", "chunk", "n_chunks", "staging", "imagery_digest", "input_hash", "tiles", "seconds")


@dataclass(frozen=True)
class CityResult:
    """How one city's prepare ended: ``done``, ``skipped`` (inputs unchanged) or ``failed`` (with the error)."""

    city: str
    status: str
    tiles: int
    seconds: float
    error: str = ""


def city_output_dir(workspace: Workspace | str | os.PathLike[str], city: str) -> Path:
    """``tiles/city=<city>`` (the slug is validated first)."""
    return Workspace.at(workspace).city_tiles(city)


def prepared_imagery(catalog: pa.Table, workspace: Workspace | str | os.PathLike[str]) -> pa.Table:
    """``catalog`` with each prepared city's ``imagery`` as prepare read it (its marker's ``input.imagery``: the
    model VRT of a stretched, resampled or tiled source), so commands run on their own (stitch, assess,
    merge-runs) see the same raster as `map` did; cities never prepared keep the catalog's."""
    ws = Workspace.at(workspace)
    rows = catalog.to_pylist()
    for row in rows:
        try:
            read = ((read_marker(ws, row["city"]) or {}).get("input") or {}).get("imagery")
        except (ValueError, OSError):
            read = None
        if read:
            row.update(imagery=read, zoom=None, asset=None, bands=None, radiometry=None)
    return pa.Table.from_pylist(rows, schema=catalog.schema)


def read_marker(workspace: Workspace | str | os.PathLike[str], city: str) -> dict | None:
    ws = Workspace.at(workspace)
    path = ws.fetch(ws.tiles_marker(city))
    return json.loads(path.read_text()) if path.is_file() else None


def _status(**kw) -> dict:
    row = {k: None for k in STATUS_KEYS}
    row.update(kw)
    row["chunk"] = list(row["chunk"] or [])
    row["n_chunks"] = int(row["n_chunks"] or 0)
    row["tiles"] = int(row["tiles"] or 0)
    row["seconds"] = float(row["seconds"] or 0.0)
    for k in ("error", "staging", "imagery_digest", "input_hash"):
        row[k] = row[k] or ""
    return row


def _plan(row: dict, cfg: PrepareConfig, workspace: Workspace, force: bool) -> list[dict]:
    t0 = time.perf_counter()
    city = row.get("city") or "?"
    try:
        workspace.city_tiles(city)  # the slug is checked before anything is read or written
        imagery_digest, osm_hash = file_digest(row["imagery"]), osm_digest(row["osm"])
        input_hash = city_input_hash(row, cfg, imagery_digest, osm_hash)
        marker = read_marker(workspace, city)
        if not force and marker and marker.get("input_hash") == input_hash and storage.list_files(workspace.tile_index(city), ".parquet"):
            return [_status(city=city, status="skipped", tiles=marker.get("tiles", 0), input_hash=input_hash)]
        staging = workspace.tiles_staging(city, input_hash)
        shutil.rmtree(staging, ignore_errors=True)
        Workspace.publish(staging)  # a remote workspace: clear what a killed run left there too
        with storage.raster_env():
            plan = plan_city(row, cfg, staging, imagery_digest, input_hash)
        pq.write_table(plan.grid, staging / "grid.parquet")
        Workspace.publish(staging)  # the chunks may be built on other nodes
        seconds = time.perf_counter() - t0
        return [_status(city=city, status="chunk", chunk=ch, n_chunks=len(plan.chunks), staging=str(staging), imagery_digest=imagery_digest,
                        input_hash=input_hash, seconds=seconds / len(plan.chunks)) for ch in plan.chunks]
    except Exception as exc:  # one bad city is reported, never fatal to the run
        error = _describe(exc)
        inputs = [f"{k} {row.get(k)}" for k in ("imagery", "osm") if row.get(k) and str(row.get(k)) not in error]
        if inputs:  # name the files, so the message says what to fix
            error += f" [{'; '.join(inputs)}]"
        return [_status(city=city, status="failed", error=error, seconds=time.perf_counter() - t0)]


def _build(row: dict, cfg: PrepareConfig) -> dict:
    if row["status"] != "chunk":
        return row
    t0 = time.perf_counter()
    try:
        staging = Path(row["staging"])
        grid = pq.read_table(Workspace.fetch(staging / "grid.parquet"))
        features = Workspace.fetch(staging / "features.parquet")
        index, graphs = build_chunk(grid, features, tuple(row["chunk"]), row["imagery_digest"], cfg)
        name = "part-r{:04d}-c{:04d}.parquet".format(row["chunk"][0], row["chunk"][2])
        for kind, table in (("index", index), ("graphs", graphs)):
            target = Workspace.staged_part(staging, kind, name)
            with atomic_path(target) as tmp:
                pq.write_table(table, tmp, compression="zstd")
            Workspace.publish(target)
        return {**row, "status": "built", "tiles": index.num_rows, "seconds": row["seconds"] + time.perf_counter() - t0}
    except Exception as exc:
        return {**row, "status": "failed", "error": _describe(exc), "seconds": row["seconds"] + time.perf_counter() - t0}


def _describe(exc: Exception) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _finalize(workspace: Workspace, city: str, staging: Path, input_hash: str, tiles: int, seconds: float, cfg: PrepareConfig,
              read: dict | None = None) -> None:
    """Move a city's staged output into place (atomic directory swap; server-side copies in an object store), then
    write its marker, last: the marker is the completion point readers and reruns trust."""
    storage.move_tree(Workspace.staged_tiles(staging), workspace.city_tiles(city))
    marker = workspace.tiles_marker(city)
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"city": city, "input_hash": input_hash, "tiles": tiles, "seconds": round(seconds, 3),
                                   "config": cfg.to_json(), "input": read}, indent=2, sort_keys=True))
    Workspace.publish(marker)
    shutil.rmtree(staging, ignore_errors=True)
    Workspace.publish(staging)


def run_prepare(catalog: pa.Table, workspace: str | os.PathLike[str], cfg: PrepareConfig | None = None, force: bool = False,
                on_result: Callable[[CityResult], None] | None = None, imagery: InputSpec | None = None,
                resolved: dict[str, InputPlan] | None = None) -> list[CityResult]:
    """Prepare every city of ``catalog`` into ``workspace/tiles`` with Ray Data; return one result per city.

    Ray must be initialised (``engine.pipelines.runtime.init_ray``). Cities whose inputs did not change are
    skipped; a failing city is reported with its error and the others complete. Each city's imagery is first
    resolved to what the model reads (``imagery``: bands, radiometry, target GSD; :mod:`engine.model_input`), in
    the driver: headers and a decimated read each, and the tiles then point at that one path. ``resolved``: the
    plans of a catalog resolved already (by `map`), recorded in the markers as they are.

    Example::

        ray.init(); results = run_prepare(load_catalog("geolink-data/catalog.yaml"), "geolink-data")
    """
    import ray

    from engine.catalog import check_city_names

    cfg = cfg or PrepareConfig()
    workspace = Workspace.at(workspace)  # a remote workspace: its mirror path, the same on every node
    check_city_names(catalog)  # names become folders: never prepare with an invalid or repeated one
    if not catalog.num_rows:
        return []
    if resolved is None:
        catalog, plans, refused = resolve_catalog(catalog, workspace.city_imagery, imagery or InputSpec())
    else:
        plans, refused = resolved, {}
    rows = catalog.to_pylist()
    read = {r["city"]: r["imagery"] for r in rows}
    results: dict[str, CityResult] = {}

    def settle(result: CityResult) -> None:
        results[result.city] = result
        if on_result:
            on_result(result)

    for city, why in refused.items():
        settle(CityResult(city, "failed", 0, 0.0, why))
    todo = [r for r in rows if r["city"] not in refused]
    if not todo:
        return [results[r["city"]] for r in rows]
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.flat_map(_plan, fn_kwargs={"cfg": cfg, "workspace": workspace, "force": force})
    # one chunk per block (streaming split, no shuffle), so a large city's chunks spread over all workers
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map(_build, fn_kwargs={"cfg": cfg})

    progress: dict[str, dict] = defaultdict(lambda: {"built": 0, "tiles": 0, "seconds": 0.0, "n_chunks": 0, "failed": ""})
    for row in ds.iter_rows():
        city = row["city"]
        if city in results:
            continue  # a failed city's remaining chunks
        if row["status"] == "skipped":
            settle(CityResult(city, "skipped", int(row["tiles"]), 0.0))
            continue
        state = progress[city]
        state["seconds"] += float(row["seconds"])
        if row["status"] == "failed":
            settle(CityResult(city, "failed", 0, state["seconds"], row["error"]))
            continue
        state["built"] += 1
        state["tiles"] += int(row["tiles"])
        state["n_chunks"] = int(row["n_chunks"])
        if state["built"] == state["n_chunks"]:
            try:
                _finalize(workspace, city, Path(row["staging"]), row["input_hash"], state["tiles"], state["seconds"], cfg,
                              {"imagery": read[city], **plans[city].to_json()} if city in plans else None)
                settle(CityResult(city, "done", state["tiles"], state["seconds"]))
            except OSError as exc:
                settle(CityResult(city, "failed", 0, state["seconds"], _describe(exc)))
    for row in rows:  # a city with no status row at all would be a bug; say so rather than lose it
        if row["city"] not in results:
            settle(CityResult(row["city"], "failed", 0, 0.0, "no result came back from the pipeline"))
    shutil.rmtree(workspace.tiles_staging_root, ignore_errors=True)
    Workspace.publish(workspace.tiles_staging_root)
    return [results[r["city"]] for r in rows]
