"""`map`: prepare (when inputs changed) -> fused inference (Ray Data) -> stitch (DuckDB) -> STAC + preview page.

The same function serves the CLI (`geolink-engine map`) and the Ray job (`jobs/map.py`). Every stage is resumable:
prepare skips unchanged cities, inference skips tiles the ledger holds, stitching rewrites products atomically.
A city that fails at any stage is carried to the end as a failed row of the report; the others complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import rasterio

from engine import storage
from engine.errors import describe_error
from engine.imagery import GSD_REFUSE_RATIO, GSD_WARN_RATIO, ImageryFacts, format_gsd, gsd_ratio, inspect_imagery
from engine.mapping.bundle import check_bundle, model_classes, model_gsd_range, model_mode
from engine.mapping.infer import InferenceConfig, InferenceResult, run_inference
from engine.mapping.predict import ModelPredictor, OraclePredictor, Predictor, model_version
from engine.mapping.store import Ledger, RunManifest, run_dir
from engine.pipelines.prepare import CityResult, run_prepare
from engine.stitch import StitchConfig, StreamingStitch
from engine.tiles.city import PrepareConfig
from engine.tiles.grid import TileGridConfig
from engine.schema import LABEL_SETS
from geolink_model.config import MODES, GeoLinkConfig

if TYPE_CHECKING:
    from engine.accuracy.assess import AssessConfig
    from engine.accuracy.report import AssessReport

DEFAULT_MODEL = "default"
REFERENCE_MODEL = "reference"  # `--model reference`: the catalog's reference polygons as a perfect model (pipeline checks)


@dataclass(frozen=True)
class MapConfig:
    """One mapping run.

    Args:
        run: run name (folder under ``runs/`` and ``products/``); rerunning the same name resumes it.
        model_dir: a model bundle (``models/<name>`` or a URI); its tile size fixes the prepared grid.
            ``"reference"`` predicts each city's reference polygons instead (a perfect model, exactly
            reproducible: it checks the pipeline, e.g. a new cluster, independently of any model).
        mode: ``fused``, ``image`` or ``osm``; default: the mode the model was fine-tuned in.
        overlap_px: tile overlap of the prepared grid.
        inference: batch size, actors, GPUs.
        min_area_m2: polygons smaller than this are dropped as slivers.
        fail_tiles: fault drill: these tiles raise in the predictor (proves a run completes and reports them).
        assess: run the accuracy assessment on the products (reference from the catalog, or a labelling sheet).
        tile_size_px: the prepared grid's tile size when no model fixes it (the reference model, a default model).
        allow_gsd_mismatch: map cities whose ground GSD lies more than 3x outside the model's training GSD (they are
            refused otherwise; beyond 1.5x they are mapped with a warning).
    """

    run: str = "default"
    model_dir: str | None = None
    mode: str | None = None
    overlap_px: int = 32
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    min_area_m2: float = 100.0
    fail_tiles: tuple[str, ...] = ()
    assess: bool = True
    tile_size_px: int = 224
    allow_gsd_mismatch: bool = False

    def __post_init__(self) -> None:
        run_dir(".", self.run)  # the run name becomes a folder: refuse a bad one before any work
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {MODES}")


@dataclass(frozen=True)
class CityReport:
    """Where one city ended: ``ok``, or ``failed`` with the stage and the error."""

    city: str
    region: str
    status: str
    tiles_ok: int = 0
    tiles_failed: int = 0
    polygons: int = 0
    uv_area_m2: float = 0.0
    uv_share: float | None = None
    stage: str = ""
    error: str = ""


@dataclass(frozen=True)
class MapReport:
    run: str
    model_version: str
    products: Path
    cities: list[CityReport]
    inference: InferenceResult | None
    seconds: dict[str, float]
    assessment: AssessReport | str | None = None  # "failed: ..." when the assessment could not run
    warnings: tuple[str, ...] = ()  # things the user should know that failed nothing (a GSD near the limit, ...)

    @property
    def failed(self) -> list[CityReport]:
        """Cities that did not end ``ok``: failed at a stage, missing tiles, or left out of the assessment."""
        return [c for c in self.cities if c.status != "ok"]

    @property
    def assessment_failed(self) -> bool:
        return isinstance(self.assessment, str)


def check_model(cfg: MapConfig, workspace: str | os.PathLike[str]) -> GeoLinkConfig | None:
    """The run's model bundle, checked before any stage runs (config, safetensors header, tensor shapes); its config.

    None for ``--model reference``, and for the default model when it has not been trained yet.

    Raises:
        BundleError: one line naming the bundle's file and what is wrong with it.
    """
    if cfg.model_dir == REFERENCE_MODEL:
        return None
    if cfg.model_dir:
        return check_bundle(storage.local_path(cfg.model_dir))
    default = storage.localize(storage.workspace_root(workspace) / "models" / DEFAULT_MODEL)
    return check_bundle(default) if (default / "model.safetensors").is_file() or (default / "config.json").is_file() else None


def check_imagery(rows: dict[str, dict]) -> tuple[dict[str, ImageryFacts], dict[str, str]]:
    """Each city's imagery facts, and the cities whose imagery the model cannot take or GDAL cannot read, with why.

    Reads the header, the smallest overview and the first and last block of each band (:func:`probe_blocks`): a
    truncated file fails its city here in one line instead of failing its tiles one by one. A raster that cannot be
    opened at all is left to ``prepare``, which reports it with GDAL's error.
    """
    facts, refused = {}, {}
    with storage.raster_env():
        for city, row in rows.items():
            try:
                with rasterio.open(row["imagery"]) as src:
                    if src.crs is None:
                        continue  # prepare says how to assign one
                    facts[city], problem, damage = inspect_imagery(src, row["imagery"])
                    problem = problem or (damage and f"imagery {damage}")
            except Exception:  # noqa: BLE001 (prepare names the file and the error)
                continue
            if problem:
                refused[city] = f"city {city}: {problem}"
    return facts, refused


def check_gsd(facts: dict[str, ImageryFacts], trained_m: tuple[float, float], allow_mismatch: bool,
              model: str) -> tuple[dict[str, str], list[str]]:
    """Cities refused for a ground GSD more than ``GSD_REFUSE_RATIO`` outside the model's training range (unless
    ``allow_mismatch``), and warnings for those beyond ``GSD_WARN_RATIO``.

    Why: the model's receptive field is in pixels; at another ground resolution a village is another size in
    pixels, and the model answers with confidence anyway (a 10 m scene gave 49.6 ha of villages on a glacier).
    """
    lo, hi = trained_m
    trained = format_gsd(lo) if math.isclose(lo, hi, rel_tol=1e-3) else f"{format_gsd(lo)[:-2]}-{format_gsd(hi)}"
    refused, warnings = {}, []
    for city, f in sorted(facts.items()):
        ratio = gsd_ratio(f.gsd_m, trained_m)
        if ratio <= GSD_WARN_RATIO:
            continue
        what = (f"city {city}: ground GSD {format_gsd(f.gsd_m)} is {ratio:.1f}x {'coarser' if f.gsd_m > hi else 'finer'} "
                f"than the {trained} model {model} was trained at")
        if ratio > GSD_REFUSE_RATIO and not allow_mismatch:
            refused[city] = f"{what} (limit {GSD_REFUSE_RATIO:g}x): resample the imagery, or map it anyway with --allow-gsd-mismatch"
        else:
            warnings.append(f"{what}; its map may be unreliable")
    return refused, warnings


def run_map(catalog: pa.Table, workspace: str | os.PathLike[str], cfg: MapConfig,
            ensure_model: Callable[[pa.Table], str] | None = None,
            on_stage: Callable[[str], None] | None = None,
            on_commit: Callable[[int, int], None] | None = None, address: str | None = None) -> MapReport:
    """Run every stage for ``catalog`` and return the per-city report (products under ``products/<run>/``).

    Before anything runs, the model bundle is checked (a broken one raises :class:`BundleError`) and each city's
    imagery header is read: imagery that is not 3+ bands of uint8, or whose ground GSD lies more than 3x outside
    the model's training GSD, fails its city with one line (never rescaled, never mapped blind).
    ``ensure_model(prepared_catalog) -> model_dir`` is called when ``cfg.model_dir`` is None (the CLI trains the
    default quick model there). Ray is started (``address``, see :func:`init_ray`) unless it already is.
    """
    from engine.pipelines.runtime import init_ray

    workspace = str(storage.workspace_root(workspace))  # a remote workspace is worked on through its mirror
    say = on_stage or (lambda _msg: None)
    seconds: dict[str, float] = {}
    rows = {r["city"]: r for r in catalog.to_pylist()}
    failures: dict[str, tuple[str, str]] = {}
    warnings: list[str] = []

    oracle = cfg.model_dir == REFERENCE_MODEL
    model_cfg = check_model(cfg, workspace)
    model_dir = str(storage.local_path(cfg.model_dir)) if cfg.model_dir and not oracle else None
    facts, refused = check_imagery(rows)
    for city, why in refused.items():
        failures[city] = ("imagery", why)
    init_ray(address)
    tile_size = model_cfg.img_size if model_dir else cfg.tile_size_px
    prepare_cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=tile_size, overlap_px=cfg.overlap_px))
    to_prepare = catalog.filter(pa.array([c not in failures for c in catalog["city"].to_pylist()]))
    say(f"prepare: {to_prepare.num_rows} cities ({tile_size} px tiles, {cfg.overlap_px} px overlap)")
    t0 = time.perf_counter()
    prepared: list[CityResult] = run_prepare(to_prepare, workspace, prepare_cfg) if to_prepare.num_rows else []
    seconds["prepare"] = time.perf_counter() - t0
    for r in prepared:
        if r.status == "failed":
            failures[r.city] = ("prepare", r.error)
    ok_cities = [c for c in rows if c not in failures]

    if oracle:
        for city in ok_cities:
            if not rows[city].get("reference"):
                failures[city] = ("inference", f"city {city} has no reference polygons to map with --model {REFERENCE_MODEL}")
        ok_cities = [c for c in ok_cities if c not in failures]
    elif model_dir is None:
        if ensure_model is None:
            raise ValueError("no model: pass --model DIR (a bundle from `geolink-engine finetune`)")
        t0 = time.perf_counter()
        ok_catalog = catalog.filter(pa.array([c in ok_cities for c in catalog["city"].to_pylist()]))
        model_dir = ensure_model(ok_catalog)
        model_cfg = check_bundle(model_dir)
        seconds["train"] = time.perf_counter() - t0
    if not oracle:
        trained = model_gsd_range(model_dir)
        if trained is None:
            warnings.append(f"model {model_dir} does not record the ground GSD it was trained at (a bundle from before "
                            f"GSDs were recorded): the cities' GSD was not checked")
        else:
            gsd_refused, gsd_warnings = check_gsd({c: facts[c] for c in ok_cities if c in facts}, trained,
                                                  cfg.allow_gsd_mismatch, Path(model_dir).name)
            warnings += gsd_warnings
            for city, why in gsd_refused.items():
                failures[city] = ("imagery", why)
            ok_cities = [c for c in ok_cities if c not in failures]
    for warning in warnings:
        say(f"warning: {warning}")
    if oracle:
        manifest, predictor, kwargs = _reference_predictor(cfg, tile_size, {c: rows[c]["reference"] for c in ok_cities})
    else:
        manifest, predictor, kwargs = _model_predictor(cfg, tile_size, model_dir, model_cfg)
    say(f"inference: model {manifest.model_version} ({manifest.mode}) on {len(ok_cities)} cities")
    t0 = time.perf_counter()
    stitcher = StreamingStitch(workspace, cfg.run, catalog, StitchConfig(min_area_m2=cfg.min_area_m2), manifest=manifest)
    try:
        inference = run_inference(workspace, manifest, ok_cities, predictor, kwargs, cfg.inference, on_commit=on_commit,
                                  imagery={c: rows[c]["imagery"] for c in ok_cities}, on_city_done=stitcher.submit)
    except BaseException:
        stitcher.close()
        raise
    seconds["inference"] = time.perf_counter() - t0
    kept = f" ({inference.adopted} of them from prediction parts a killed run left, verified and kept)" if inference.adopted else ""
    say(f"inference: {inference.predicted} tiles predicted, {inference.failed} failed, {inference.skipped} done before{kept}")
    for city, why in inference.missing.items():
        failures[city] = ("inference", why)
    say("stitch: the cities not stitched during inference, then the run-wide products")
    report = stitch_products(workspace, cfg.run, catalog, cfg.min_area_m2, failures, say, seconds, publish=False, stitcher=stitcher)
    assessment = None
    if cfg.assess:
        say("assess: stratified sample, design-based accuracy and area estimates")
        t0 = time.perf_counter()
        try:
            assessment = assess(workspace, cfg.run, catalog)
        except Exception as exc:  # an assessment that cannot run never takes the products down; it is reported
            assessment = f"failed: {describe_error(exc)}"
            say(f"assess {assessment}")
        seconds["assess"] = time.perf_counter() - t0
        if not isinstance(assessment, str):
            report = [_unassessed(c, assessment.skipped.get(c.city)) for c in report]
    t0 = time.perf_counter()
    publish_products(Path(workspace) / "products" / cfg.run, catalog)
    seconds["publish"] = time.perf_counter() - t0
    return MapReport(run=cfg.run, model_version=manifest.model_version, products=Path(workspace) / "products" / cfg.run,
                     cities=report, inference=inference, seconds=seconds, assessment=assessment, warnings=tuple(warnings))


def _unassessed(city: CityReport, why: str | None) -> CityReport:
    """A city mapped ``ok`` that the assessment left out (e.g. its reference has no ``class`` column): ``partial``,
    stage ``assess``, so the console shows why and the exit code says something is missing."""
    if why is None or city.status != "ok":
        return city
    return replace(city, status="partial", stage="assess", error=why)


def _model_predictor(cfg: MapConfig, tile_size: int, model_dir: str, model_cfg: GeoLinkConfig) -> tuple[RunManifest, type[Predictor], dict]:
    if model_cfg.img_size != tile_size:
        raise ValueError(f"model {model_dir} expects {model_cfg.img_size} px tiles, the workspace was prepared with {tile_size} px")
    manifest = RunManifest(run=cfg.run, model_dir=str(Path(model_dir).resolve()), model_version=model_version(model_dir),
                           classes=model_classes(model_dir, model_cfg.num_classes), mode=cfg.mode or model_mode(model_dir),
                           tile_size_px=tile_size, overlap_px=cfg.overlap_px)
    kwargs = {"model_dir": manifest.model_dir, "mode": manifest.mode, "device": "cuda" if cfg.inference.gpus else "cpu",
              "torch_threads": max(1, int(cfg.inference.cpus_per_actor)), "fail_tiles": tuple(cfg.fail_tiles)}
    return manifest, ModelPredictor, kwargs


def _reference_predictor(cfg: MapConfig, tile_size: int, references: dict[str, str]) -> tuple[RunManifest, type[Predictor], dict]:
    """The reference polygons as the model; its version is the references' content, so a changed reference redoes tiles."""
    from engine.tiles.city import file_digest

    digests = {city: file_digest(path) for city, path in sorted(references.items())}
    version = f"{REFERENCE_MODEL}-{hashlib.blake2b(json.dumps(digests).encode(), digest_size=6).hexdigest()}"
    classes = LABEL_SETS["binary"]
    manifest = RunManifest(run=cfg.run, model_dir=REFERENCE_MODEL, model_version=version, classes=classes, mode=REFERENCE_MODEL,
                           tile_size_px=tile_size, overlap_px=cfg.overlap_px)
    return manifest, OraclePredictor, {"references": references, "classes": classes, "fail_tiles": tuple(cfg.fail_tiles)}


def assess(workspace: str | os.PathLike[str], run: str, catalog: pa.Table, cfg: AssessConfig | None = None,
           reference_labels: str | os.PathLike[str] | None = None, say: Callable[[str], None] | None = None) -> AssessReport:
    """The `assess` stage on a run's products (see :func:`engine.accuracy.assess.run_assess`)."""
    from engine.accuracy.assess import AssessConfig, run_assess

    return run_assess(workspace, run, catalog, cfg or AssessConfig(), reference_labels=reference_labels, say=say)


def publish_products(products: Path, catalog: pa.Table) -> None:
    """The preview page, then the STAC collection (which lists the page and its pictures), validated offline."""
    from engine.products.page import write_page
    from engine.products.stac import validate_stac, write_stac

    write_page(products, catalog.to_pylist(), link_stac=True)
    write_stac(products)
    validate_stac(products)
    storage.publish(products)  # a remote workspace: everything under products/<run>/, last


def merge_runs(workspace: str | os.PathLike[str], runs: list[str], into: str, catalog: pa.Table) -> Path:
    """``products/<into>/`` from map runs over disjoint city shards (:mod:`engine.products.shards`), then its preview
    page and STAC collection (published, for a remote workspace); returns the folder."""
    from engine.products.shards import merge_products

    out = merge_products(workspace, runs, into, catalog)
    publish_products(out, catalog)
    return out


def stitch_products(workspace: str, run: str, catalog: pa.Table, min_area_m2: float = 100.0,
                    failures: dict[str, tuple[str, str]] | None = None, say: Callable[[str], None] | None = None,
                    seconds: dict[str, float] | None = None, publish: bool = True,
                    stitcher: StreamingStitch | None = None) -> list[CityReport]:
    """Stitch a run's predictions into products (then, with ``publish``, the preview page and the STAC collection);
    one report row per catalog city. ``stitcher``: one that already stitched some cities during inference."""

    failures = dict(failures or {})
    seconds = seconds if seconds is not None else {}
    say = say or (lambda _msg: None)
    run_dir(workspace, run)  # validates the name
    if stitcher is None:
        say("stitch: blending tiles, polygons across seams, products")
        stitcher = StreamingStitch(workspace, run, catalog, StitchConfig(min_area_m2=min_area_m2))
    t0 = time.perf_counter()
    stitched = {s.city: s for s in stitcher.finish()}
    seconds["stitch"] = time.perf_counter() - t0
    first_failures = {}
    if any(s.tiles_failed for s in stitched.values()):
        with Ledger(run_dir(workspace, run), read_only=True) as ledger:
            first_failures = {c: f for c in stitched if stitched[c].tiles_failed and (f := ledger.first_failure(c))}
    if publish:
        t0 = time.perf_counter()
        publish_products(Path(workspace) / "products" / run, catalog)
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
        share = None
        if s is not None and s.built_up_area_m2 and s.built_up_area_m2 == s.built_up_area_m2:  # not NaN, not 0
            share = s.uv_area_m2 / s.built_up_area_m2
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


def default_model(workspace: str | os.PathLike[str], catalog: pa.Table, epochs: int = 3, use_gpu: bool = False,
                  say: Callable[[str], None] | None = None) -> str:
    """``models/default``: reused when present, else fine-tuned now (``tiny``, fused, binary UV) on the train split."""
    from engine.pipelines.train import TrainConfig, run_training

    out = storage.localize(storage.workspace_root(workspace) / "models" / DEFAULT_MODEL)
    if (out / "model.safetensors").is_file():
        return str(out)
    if say:
        say(f"no model given: training the default quick model (tiny, fused, {epochs} epochs) into {out}; "
            "pass --model DIR to map with your own (e.g. one from `geolink-engine finetune`)")
    cfg = TrainConfig(task="finetune", preset="tiny", epochs=epochs, batch_size=8, num_workers=1, cpus_per_worker=1.0, use_gpu=use_gpu)
    return str(run_training(catalog, workspace, cfg, name=DEFAULT_MODEL))
