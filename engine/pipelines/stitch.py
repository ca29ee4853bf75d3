"""Scheduling of the `stitch` stage: which cities are stitched where, and when; then the run-wide products.

The per-city work is a pure core (:func:`engine.stitch.city.stitch_city`, no Ray); here it is spread over driver
threads on one node (numpy, GDAL and DuckDB release the GIL) or over Ray tasks on a cluster of several nodes, and
:class:`StreamingStitch` starts a city as soon as ``map`` has committed its last tile. ``geolink-engine stitch``
is :func:`stitch_products`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from engine import storage
from engine.db import connect
from engine.mapping.store import Ledger, RunManifest, read_manifest
from engine.pipelines.prepare import prepared_imagery
from engine.pipelines.publish import publish_products
from engine.pipelines.report import CityReport
from engine.product_layout import city_folder
from engine.stitch.city import (
    UV_CLASS,
    CityStitch,
    StitchConfig,
    _describe,
    stitch_city,
)
from engine.morphology import MorphologyRollup
from engine.stitch.products import copy_manifest, write_city_stats, write_morphology, write_urban_villages
from engine.workspace import Workspace, is_valid_name


def stitch_run(workspace: Workspace | str | os.PathLike[str], run: str, catalog: pa.Table, cfg: StitchConfig = StitchConfig(),
               on_city: Callable[[CityStitch], None] | None = None) -> list[CityStitch]:
    """Stitch every city of ``catalog`` from run ``run`` into ``<workspace>/products/<run>/``; one result per city.

    A city without committed tiles is ``empty``, a city whose inputs are broken is ``failed`` with its error; the
    others complete, and the run-wide products list every catalog city.

    Raises:
        FileNotFoundError: the run has no manifest or no ledger (nothing to stitch at all).
        ValueError: the run's classes have no ``urban_village``.

    Example::

        results = stitch_run("geolink-data", "default", load_catalog("geolink-data/catalog.yaml"))
    """
    catalog = prepared_imagery(catalog, workspace)  # the rasters prepare read (model VRTs), as `map` saw them
    return StreamingStitch(workspace, run, catalog, cfg).finish(on_city)


class StreamingStitch:
    """Stitching that can start before inference ends: :meth:`submit` a city as soon as its last tile is committed
    (``map`` does, from the ledger), :meth:`finish` stitches the rest and writes the run-wide products.

    Why: stitching a city needs only that city's predictions, so it overlaps with inference of the others and the
    run ends shortly after its last tile. Cities are stitched in background threads (numpy, GDAL and DuckDB release
    the GIL); results come back in catalog order, so the products are the same whichever order cities finish in.
    """

    def __init__(self, workspace: Workspace | str | os.PathLike[str], run: str, catalog: pa.Table, cfg: StitchConfig = StitchConfig(),
                 manifest: RunManifest | None = None) -> None:
        self.workspace = Workspace.at(workspace)
        self.run_path = self.workspace.run(run).root
        self.manifest = manifest or read_manifest(self.run_path)
        if UV_CLASS not in self.manifest.classes:
            raise ValueError(f"run {run}: classes {list(self.manifest.classes)} have no {UV_CLASS!r}; nothing to map")
        self.cfg = cfg
        self.rows = catalog.to_pylist()  # imagery as prepare read it: run_map's resolved catalog, or prepared_imagery's
        self.by_city = {r.get("city") or "": r for r in self.rows}
        self.out_dir = self.workspace.products(run)
        self.con = connect()
        workers = cfg.workers or min(4, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(self.rows))))
        self.use_ray = _use_ray_tasks(cfg.ray_tasks)
        self.futures: dict[str, Future | object] = {}  # a thread's Future, or a Ray task's ObjectRef
        self.counts: dict[str, tuple[int, int]] = {}  # city -> (committed, failed) tiles, for a task lost past its retries

    def submit(self, city: str, committed: pa.Table, tiles_failed: int) -> None:
        """Stitch ``city`` in the background from its committed tiles (ignored for cities not in the catalog)."""
        if city in self.by_city and city not in self.futures:
            self.futures[city] = self._start(city, committed, tiles_failed)

    def _start(self, city: str, committed: pa.Table, tiles_failed: int) -> Future | object:
        args = (self.workspace, self.run_path, self.manifest, self.by_city[city], committed, tiles_failed, self.cfg, self.out_dir)
        self.counts[city] = (committed.num_rows, tiles_failed)
        if self.use_ray:
            return _stitch_task().remote(*args)
        return self.pool.submit(stitch_city, *args, self.con)

    def _result(self, city: str) -> tuple[CityStitch, pa.Table | None]:
        future = self.futures[city]
        if isinstance(future, Future):
            return future.result()
        import ray

        try:
            result = ray.get(future)
        except Exception as exc:  # noqa: BLE001 (the task died past its retries: this city fails, the run goes on)
            row = self.by_city[city]
            tiles_ok, tiles_failed = self.counts[city]
            return CityStitch(city=city, region=row.get("region") or "", status="failed", error=f"stitch task: {_describe(exc)}",
                              tiles_ok=tiles_ok, tiles_failed=tiles_failed), None
        self.workspace.fetch(city_folder(self.out_dir, city))  # a remote workspace: the COGs that node published
        return result

    def finish(self, on_city: Callable[[CityStitch], None] | None = None) -> list[CityStitch]:
        """Stitch the cities not submitted yet (from the ledger), wait for all, write the run-wide products."""
        try:
            pending = [r.get("city") or "" for r in self.rows if (r.get("city") or "") not in self.futures]
            if pending or not self.rows:
                with Ledger(self.run_path, read_only=True) as ledger:
                    committed, summary = ledger.committed(), ledger.summary()
                for city in pending:
                    self.futures[city] = self._start(city, committed.filter(pc.equal(committed["city"], city)),
                                                     summary.get(city, {}).get("failed", 0))
            results: list[CityStitch] = []
            tables: list[pa.Table] = []
            for row in self.rows:  # catalog order, whatever order they finished in
                result, table = self._result(row.get("city") or "")
                results.append(result)
                if table is not None:
                    tables.append(table)
                if on_city:
                    on_city(result)
        finally:
            self.close(cancel=False)
        write_urban_villages(tables, self.out_dir, read_manifest(self.run_path).datetime or self.manifest.datetime)
        write_city_stats([r.stats_row() for r in results], self.out_dir)
        rollup = MorphologyRollup()
        for r in results:  # catalog order; the rows come back sorted, so the file does not depend on it
            if r.morphology:
                rollup.add_city(r.city, r.region, r.morphology)
        write_morphology(rollup.rows(), self.out_dir)
        copy_manifest(self.run_path, self.out_dir)
        return results

    def close(self, cancel: bool = True) -> None:
        """Stop: queued threads are dropped and, with ``cancel``, the Ray tasks still running are cancelled (a run
        that failed). :meth:`finish` closes without cancelling: its tasks are done (cancelling a task whose reply
        is in flight trips a check in Ray's task manager)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.use_ray and cancel:
            import ray

            for future in self.futures.values():
                if not isinstance(future, Future):
                    ray.cancel(future)
        self.con.close()


def _use_ray_tasks(wanted: bool | None) -> bool:
    import ray

    if wanted is not None:
        if wanted and not ray.is_initialized():
            raise RuntimeError("StitchConfig(ray_tasks=True) needs Ray initialised")
        return wanted
    return ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1


@functools.cache
def _stitch_task():
    """The Ray task form of :func:`stitch_city` (made on first use, so importing this module needs no Ray)."""
    import ray

    return ray.remote(num_cpus=1, max_retries=2)(_stitch_city_on_node)


def _stitch_city_on_node(workspace: Workspace, run_path: Path, manifest: RunManifest, row: dict, committed: pa.Table, tiles_failed: int,
                         cfg: StitchConfig, out_dir: Path) -> tuple[CityStitch, pa.Table | None]:
    """:func:`stitch_city` in a Ray task on any node: its own DuckDB, and the city's COGs published to the object
    store of a remote workspace before the task returns (the driver's node mirrors them from there)."""
    storage.configure_process()
    con = connect()
    try:
        result = stitch_city(workspace, run_path, manifest, row, committed, tiles_failed, cfg, out_dir, con)
    finally:
        con.close()
    city = row.get("city") or ""
    if is_valid_name(city):
        Workspace.publish(city_folder(out_dir, city))  # done: new COGs; failed or empty: the old ones are removed there too
    return result



def stitch_products(workspace: Workspace | str | os.PathLike[str], run: str, catalog: pa.Table, min_area_m2: float = 100.0,
                    failures: dict[str, tuple[str, str]] | None = None, say: Callable[[str], None] | None = None,
                    seconds: dict[str, float] | None = None, publish: bool = True,
                    stitcher: StreamingStitch | None = None) -> list[CityReport]:
    """Stitch a run's predictions into products (then, with ``publish``, the preview page and the STAC collection);
    one report row per catalog city. ``stitcher``: one that already stitched some cities during inference."""

    failures = dict(failures or {})
    seconds = seconds if seconds is not None else {}
    say = say or (lambda _msg: None)
    workspace = Workspace.at(workspace)
    run_path = workspace.run(run).root  # the name is checked first
    catalog = prepared_imagery(catalog, workspace)  # the rasters prepare read (model VRTs), as `map` saw them
    if stitcher is None:
        say("stitch: blending tiles, polygons across seams, products")
        stitcher = StreamingStitch(workspace, run, catalog, StitchConfig(min_area_m2=min_area_m2))
    t0 = time.perf_counter()
    stitched = {s.city: s for s in stitcher.finish()}
    seconds["stitch"] = time.perf_counter() - t0
    first_failures = {}
    if any(s.tiles_failed for s in stitched.values()):
        with Ledger(run_path, read_only=True) as ledger:
            first_failures = {c: f for c in stitched if stitched[c].tiles_failed and (f := ledger.first_failure(c))}
    if publish:
        t0 = time.perf_counter()
        publish_products(workspace.products(run), catalog)
        seconds["publish"] = time.perf_counter() - t0
    out = []
    for row in catalog.to_pylist():
        city = row["city"]
        s = stitched.get(city)
        if city in failures:
            stage, error = failures[city]
        elif s is None or s.status == "failed":
            stage, error = "stitch", (s.error if s else "no stitch result")
        elif s.status == "empty":  # prepared cities have tiles: none committed means the city was never mapped
            stage, error = "inference", s.error
        else:
            stage, error = "", ""
        share = s.uv_share if s is not None and s.uv_share == s.uv_share else None  # NaN: not measured
        status = "failed" if error else "ok"
        if s is not None and not error and s.tiles_failed:  # some (or all) tiles are missing: say so, with a cause
            status = "partial" if s.tiles_ok else "failed"
            example = first_failures.get(city)
            cause = f", e.g. {example[0]}: {example[1]}" if example else ""
            stage, error = "inference", f"{s.tiles_failed} tile(s) failed (all in `runs/{run}/ledger.duckdb`){cause}"
        out.append(CityReport(city=city, region=row["region"], status=status,
                              tiles_ok=s.tiles_ok if s else 0, tiles_failed=s.tiles_failed if s else 0, polygons=s.polygons if s else 0,
                              uv_area_m2=s.uv_area_m2 if s else 0.0, uv_share=share, stage=stage, error=error))
    return out
