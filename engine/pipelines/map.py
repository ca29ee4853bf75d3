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

from engine import storage
from engine.catalog import check_city_names
from engine.errors import describe_error
from engine.imagery import (
    GSD_REFUSE_RATIO,
    GSD_WARN_RATIO,
    ImageryFacts,
    format_gsd,
    gsd_ratio,
)
from engine.mapping.predict import ModelPredictor, OraclePredictor, Predictor
from engine.mapping.status import record_stitch
from engine.mapping.store import RunManifest
from engine.model_bundle import BundleError, ModelBundle
from engine.model_input import InputPlan, InputSpec, Radiometry, parse_bands, resolve_catalog
from engine.pipelines.assess import assess
from engine.pipelines.infer import InferenceConfig, InferenceResult, run_inference
from engine.pipelines.population import PopulationReport, population_bundle, run_population
from engine.pipelines.prepare import CityResult, run_prepare
from engine.pipelines.publish import publish_products
from engine.pipelines.report import CityReport
from engine.pipelines.stitch import StreamingStitch, stitch_products
from engine.schema import LABEL_SETS
from engine.stitch import StitchConfig
from engine.tiles.city import PrepareConfig
from engine.tiles.grid import TileGridConfig
from engine.workspace import Workspace, check_name
from geolink_model.config import MODES

if TYPE_CHECKING:
    from engine.accuracy.report import AssessReport

DEFAULT_MODEL = "default"
DEMO_CITIES = 12  # the embedded default: a workspace without a catalog is mapped on this many demo cities
STAGES = ("prepare", "train", "infer", "stitch", "population", "assess", "publish")  # run_map's on_step stages, in order
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
        gsd_m: resample every city's imagery on read to this ground GSD (metres): one stated resolution for the
            whole product. Default: a city whose GSD lies more than 1.5x outside the model's training range (the
            ratio `map` warned at before) is resampled to the nearer end of it (a 0.2 m source for a 0.5-1.2 m model
            is read at 0.5 m; a model trained at one GSD, e.g. imported, reads everything at it), so one model serves
            sources from 0.2 m to 1.2 m; the others are read as they are. Without a model before prepare (the
            default model, trained in the run), each city is read at its own GSD.
        bands, radiometry: the model input's band order and 8-bit conversion for every city without its own catalog
            ``bands``/``radiometry`` (engine.model_input); default: bands 1,2,3, and the bundle's radiometry for
            sources that are not 8-bit (8-bit sources are read as they are unless ``radiometry`` says otherwise).
        population_model: a population regression bundle (``finetune --task population``, same tile size): after
            stitching, residents per tile are predicted and spread over the map (engine.pipelines.population):
            ``cities/<city>/population_100m.tif``, ``uv_population.parquet``, ``population.csv``.
        vintage: the catalog vintage (imagery date) this run maps: recorded in ``run.json`` (a run maps one date;
            `geolink-engine change` pairs two runs), and its prepared tiles and imagery VRTs live under
            ``vintage=<v>/`` of the workspace (:meth:`engine.workspace.Workspace.with_vintage`).
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
    gsd_m: float | None = None
    bands: str | None = None
    radiometry: str | None = None
    population_model: str | None = None
    vintage: str | None = None

    def __post_init__(self) -> None:
        check_name("run", self.run)  # the run name becomes a folder: refuse a bad one before any work
        if self.vintage is not None:
            check_name("vintage", self.vintage)
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {MODES}")
        self.input_spec(None)  # a bad --bands / --radiometry / --gsd is refused before any work

    def input_spec(self, bundle: ModelBundle | None) -> InputSpec:
        """What every city's imagery is read as: this run's options, else the bundle's record (engine.model_input)."""
        # bands are the sources' layout (a catalog or run fact), not the model's: never taken from the bundle; its
        # radiometry is for sources like its training imagery, so a new 8-bit city is still read as it is
        return InputSpec(bands=parse_bands(self.bands), radiometry=Radiometry.parse(self.radiometry or (bundle.radiometry if bundle else None)),
                         gsd_m=self.gsd_m, gsd_range_m=trained_gsd(bundle), allow_gsd_mismatch=self.allow_gsd_mismatch,
                         keep_8bit=not self.radiometry)


@dataclass(frozen=True)
class MapReport:
    run: str
    model_version: str
    products: Path
    cities: list[CityReport]
    inference: InferenceResult | None
    seconds: dict[str, float]
    assessment: AssessReport | str | None = None  # "failed: ..." when the assessment could not run
    population: PopulationReport | str | None = None  # `--population-model`; "failed: ..." when the pass could not run
    warnings: tuple[str, ...] = ()  # things the user should know that failed nothing (a GSD near the limit, ...)

    @property
    def failed(self) -> list[CityReport]:
        """Cities that did not end ``ok``: failed at a stage, missing tiles, or left out of the assessment."""
        return [c for c in self.cities if c.status != "ok"]

    @property
    def assessment_failed(self) -> bool:
        return isinstance(self.assessment, str)


def trained_gsd(bundle: ModelBundle | None) -> tuple[float, float] | None:
    """The ground GSD range a bundle was trained at: its ``gsd_range_m``, or its one ``gsd_m`` (an imported bundle)."""
    if bundle is None:
        return None
    return bundle.gsd_range_m or ((bundle.gsd_m, bundle.gsd_m) if bundle.gsd_m else None)


def check_model(cfg: MapConfig, workspace: str | os.PathLike[str]) -> ModelBundle | None:
    """The run's model bundle, checked before any stage runs (config, safetensors header, tensor shapes).

    None for ``--model reference``, and for the default model when it has not been trained yet.

    Raises:
        BundleError: one line naming the bundle's file and what is wrong with it.
    """
    if cfg.model_dir == REFERENCE_MODEL:
        return None
    if cfg.model_dir:
        return _segmentation_bundle(ModelBundle.load(storage.local_path(cfg.model_dir)))
    ws = Workspace.at(workspace)
    default = ws.fetch(ws.model(DEFAULT_MODEL))
    return _segmentation_bundle(ModelBundle.load(default)) if (default / "model.safetensors").is_file() or (default / "config.json").is_file() else None


def _segmentation_bundle(bundle: ModelBundle) -> ModelBundle:
    """``bundle`` when it maps urban villages; a regression model (``finetune --task population|co2``: its
    segmentation head was never trained) is one line, before any stage."""
    target = bundle.train.get("target")
    if target not in (None, "segmentation"):
        raise BundleError(f"model bundle {bundle.path} is a {target} regression model (finetune --task {target}); "
                          f"map needs a segmentation model (finetune without --task)")
    return bundle


def map_catalog(workspace: Workspace | str | os.PathLike[str], catalog: str | os.PathLike[str] | None = None, cities: str = "all",
                say: Callable[[str], None] | None = None,
                on_demo_city: Callable[[int, int], None] | None = None, vintage: str | None = None) -> tuple[Path, pa.Table]:
    """The catalog a map run works on (the CLI and ``jobs/map.py`` alike): ``catalog``, else the workspace's own,
    else (a workspace with none: the embedded default) the 12 demo cities, written first; then the rows of
    ``vintage`` (required when the catalog holds several dates) and ``cities`` of them.

    Raises:
        CatalogError: the file cannot be used, a city is unknown, or a city name is not a valid slug or is repeated
            (names become folders: checked here, before anything is written).
    """
    from engine.catalog import CatalogError, find_catalog, load_catalog, select_cities, select_vintage

    ws = Workspace.at(workspace)
    if catalog is None:
        try:
            catalog = find_catalog(ws)
        except CatalogError:
            from engine.synth.config import SynthConfig
            from engine.synth.demo import write_demo

            if say:
                say(f"no catalog in {ws.location}: writing the {DEMO_CITIES} demo cities (embedded default)")
            catalog = write_demo(ws, DEMO_CITIES, SynthConfig(), seed=0,
                                 on_city=_count(on_demo_city, DEMO_CITIES) if on_demo_city else None)
    return Path(catalog), check_city_names(select_cities(select_vintage(load_catalog(catalog), vintage), cities), catalog)


def _count(on_done: Callable[[int, int], None], total: int) -> Callable[[dict], None]:
    done = [0]

    def on_item(_row: dict) -> None:
        done[0] += 1
        on_done(done[0], total)

    return on_item


def summarise_inputs(plans: dict[str, InputPlan]) -> str:
    """One line on what the model input changed, e.g. ``of 12 cities read, 3 resampled to 0.50 m, 1 stretched to
    8-bit (percentile:2,98) on read``; empty when every city is read as it is. Per city: the tiles' marker (``input``)."""
    changed = {c: p for c, p in plans.items() if not p.identity}
    if not changed:
        return ""
    parts = []
    resampled = [p for p in changed.values() if p.size is not None]
    if resampled:
        lo, hi = min(p.gsd_m for p in resampled), max(p.gsd_m for p in resampled)
        to = format_gsd(lo) if math.isclose(lo, hi, rel_tol=1e-3) else f"{format_gsd(lo)[:-2]}-{format_gsd(hi)}"
        parts.append(f"{len(resampled)} resampled to {to}")
    stretched = sorted({str(p.radiometry) for p in changed.values() if p.value_ranges is not None})
    if stretched:
        parts.append(f"{sum(p.value_ranges is not None for p in changed.values())} stretched to 8-bit ({', '.join(stretched)})")
    reordered = sum(p.bands != (1, 2, 3) for p in changed.values())
    if reordered:
        parts.append(f"{reordered} with bands reordered")
    return f"of {len(plans)} cities read, " + ", ".join(parts) + " on read (a VRT per city in imagery/<city>/)"


def check_gsd(facts: dict[str, ImageryFacts | InputPlan], trained_m: tuple[float, float], allow_mismatch: bool,
              model: str) -> tuple[dict[str, str], list[str]]:
    """Cities refused for a ground GSD (``gsd_m``: as the model reads it) more than ``GSD_REFUSE_RATIO`` outside the
    model's training range (unless ``allow_mismatch``), and warnings for those beyond ``GSD_WARN_RATIO``.

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
            on_commit: Callable[[int, int], None] | None = None, address: str | None = None,
            on_step: Callable[..., None] | None = None) -> MapReport:
    """Run every stage for ``catalog`` and return the per-city report (products under ``products/<run>/``).

    Before anything runs, the model bundle is checked (a broken one raises :class:`BundleError`) and each city's
    imagery is resolved to what the model reads (engine.model_input: form, bands, 8-bit stretch, resampling; its
    header and a block probe): unreadable, damaged or contradictory imagery, or imagery whose ground GSD lies more
    than 3x outside the model's training GSD, fails its city with one line (never mapped blind).
    ``ensure_model(prepared_catalog) -> model_dir`` is called when ``cfg.model_dir`` is None (the CLI trains the
    default quick model there). Ray is started (``address``, see :func:`init_ray`) unless it already is.

    ``on_stage(message)`` hears what each stage is doing (a line each); ``on_step(stage, done, total, note="",
    failed=False)`` follows the stages (:data:`STAGES`) for a progress display: ``total`` None while a stage has no
    count, ``done == total`` when it is over, ``note`` its outcome in a few words.
    """
    from engine.pipelines.runtime import init_ray

    workspace = Workspace.at(workspace).with_vintage(cfg.vintage)  # a remote workspace is worked on through its mirror
    check_city_names(catalog)  # names become folders: refused before any stage
    check_run_vintage(workspace, cfg.run, cfg.vintage)
    say = on_stage or (lambda _msg: None)
    step = on_step or (lambda *_args, **_kwargs: None)
    seconds: dict[str, float] = {}
    rows = {r["city"]: r for r in catalog.to_pylist()}
    failures: dict[str, tuple[str, str]] = {}
    warnings: list[str] = []

    oracle = cfg.model_dir == REFERENCE_MODEL
    bundle = check_model(cfg, workspace)
    people = population_bundle(cfg.population_model) if cfg.population_model else None  # checked before any stage
    model_dir = str(storage.local_path(cfg.model_dir)) if cfg.model_dir and not oracle else None
    catalog, plans, unreadable = resolve_catalog(catalog, workspace.city_imagery, cfg.input_spec(bundle))
    rows = {r["city"]: r for r in catalog.to_pylist()}  # imagery: what the model reads (a model VRT where needed)
    for city, why in unreadable.items():
        failures[city] = ("imagery", why)
    if summary := summarise_inputs(plans):
        say(f"imagery: {summary}")
    init_ray(address)
    tile_size = bundle.tile_size_px if model_dir else cfg.tile_size_px
    if people is not None and people.tile_size_px != tile_size:
        raise BundleError(f"--population-model {cfg.population_model} takes {people.tile_size_px} px tiles but this run maps "
                          f"{tile_size} px tiles; fine-tune the population model at {tile_size} px")
    prepare_cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=tile_size, overlap_px=cfg.overlap_px))
    to_prepare = catalog.filter(pa.array([c not in failures for c in catalog["city"].to_pylist()]))
    say(f"prepare: {to_prepare.num_rows} cities ({tile_size} px tiles, {cfg.overlap_px} px overlap)")
    t0 = time.perf_counter()
    step("prepare", 0, to_prepare.num_rows, f"{tile_size} px tiles")
    done_cities: list[CityResult] = []

    def prepared_one(result: CityResult) -> None:
        done_cities.append(result)
        step("prepare", len(done_cities), to_prepare.num_rows)

    prepared: list[CityResult] = (run_prepare(to_prepare, workspace, prepare_cfg, resolved=plans, on_result=prepared_one)
                                  if to_prepare.num_rows else [])
    seconds["prepare"] = time.perf_counter() - t0
    for r in prepared:
        if r.status == "failed":
            failures[r.city] = ("prepare", r.error)
    counts = {s: sum(r.status == s for r in prepared) for s in ("done", "skipped", "failed")}
    step("prepare", len(prepared), to_prepare.num_rows, f"{counts['done']} prepared, {counts['skipped']} unchanged"
         + (f", {counts['failed']} failed" if counts["failed"] else ""), failed=bool(prepared) and counts["failed"] == len(prepared))
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
        step("train", 0, None, f"the default model, on the {sum(r.get('split') in (None, 'train') for r in ok_catalog.to_pylist())} "
                               "train cities")
        model_dir = ensure_model(ok_catalog)
        bundle = ModelBundle.load(model_dir)
        seconds["train"] = time.perf_counter() - t0
        step("train", 1, 1, f"model {bundle.version}")
    if not oracle:
        trained = trained_gsd(bundle)
        if trained is None:
            warnings.append(f"model {model_dir} does not record the ground GSD it was trained at (a bundle from before "
                            f"GSDs were recorded): the cities' GSD was not checked")
        else:
            gsd_refused, gsd_warnings = check_gsd({c: plans[c] for c in ok_cities if c in plans}, trained,
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
        manifest, predictor, kwargs = _model_predictor(cfg, tile_size, model_dir, bundle)
    if not manifest.built_up["known"]:  # an old binary bundle still maps; the products say why built-up is missing
        warnings.append(manifest.built_up["note"])
        say(f"warning: {manifest.built_up['note']}")
    say(f"inference: model {manifest.model_version} ({manifest.mode}) on {len(ok_cities)} cities")
    step("infer", 0, None, f"model {manifest.model_version} ({manifest.mode}), {len(ok_cities)} cities")
    committed = [0]

    def commit(n: int, total: int) -> None:
        committed[0] += n
        step("infer", committed[0], total)
        if on_commit is not None:
            on_commit(n, total)

    t0 = time.perf_counter()
    stitcher = StreamingStitch(workspace, cfg.run, catalog, StitchConfig(min_area_m2=cfg.min_area_m2), manifest=manifest)
    try:
        inference = run_inference(workspace, manifest, ok_cities, predictor, kwargs, cfg.inference, on_commit=commit,
                                  imagery={c: rows[c]["imagery"] for c in ok_cities}, on_city_done=stitcher.submit)
    except BaseException:
        stitcher.close()
        raise
    seconds["inference"] = time.perf_counter() - t0
    kept = f" ({inference.adopted} of them from prediction parts a killed run left, verified and kept)" if inference.adopted else ""
    say(f"inference: {inference.predicted} tiles predicted, {inference.failed} failed, {inference.skipped} done before{kept}")
    tiles = inference.predicted + inference.failed + inference.skipped
    step("infer", tiles, tiles, f"{inference.predicted} predicted, {inference.failed} failed, {inference.skipped} done before"
         + (f" ({inference.adopted} adopted)" if inference.adopted else ""))
    for city, why in inference.missing.items():
        failures[city] = ("inference", why)
    say("stitch: the cities not stitched during inference, then the run-wide products")
    step("stitch", 0, None, "blending tiles, polygons across seams")
    report = stitch_products(workspace, cfg.run, catalog, cfg.min_area_m2, failures, say, seconds, publish=False, stitcher=stitcher)
    record_stitch(workspace.run(cfg.run), report)  # runs/<run>/status.json: each city stitched or failed (`geolink-engine status`)
    ok = [c for c in report if c.status in ("ok", "partial")]
    step("stitch", len(report), len(report), f"{len(ok)} cities mapped, {sum(c.polygons or 0 for c in ok)} villages",
         failed=not ok)
    population = None
    if people is not None:
        step("population", 0, None, f"model {people.version}")
        population = _population(workspace, cfg, people, [c.city for c in report if c.status in ("ok", "partial")], rows, say, seconds)
        step("population", 1, 1, "failed (below)" if isinstance(population, str) else "residents per 100 m cell, village, city",
             failed=isinstance(population, str))
    assessment = None
    if cfg.assess:
        say("assess: stratified sample, design-based accuracy and area estimates")
        step("assess", 0, None, "stratified sample, design-based estimates")
        t0 = time.perf_counter()
        try:
            assessment = assess(workspace, cfg.run, catalog)
        except Exception as exc:  # an assessment that cannot run never takes the products down; it is reported
            assessment = f"failed: {describe_error(exc)}"
            say(f"assess {assessment}")
        seconds["assess"] = time.perf_counter() - t0
        step("assess", 1, 1, "failed (below)" if isinstance(assessment, str) else
             f"{len(assessment.points)} points" + (", awaiting labels" if assessment.status != "done" else ""),
             failed=isinstance(assessment, str))
        if not isinstance(assessment, str):
            report = [_unassessed(c, assessment.skipped.get(c.city)) for c in report]
    t0 = time.perf_counter()
    step("publish", 0, None, "STAC, preview page")
    publish_products(workspace.products(cfg.run), catalog)
    seconds["publish"] = time.perf_counter() - t0
    step("publish", 1, 1, str(workspace.products(cfg.run)))
    return MapReport(run=cfg.run, model_version=manifest.model_version, products=workspace.products(cfg.run),
                     cities=report, inference=inference, seconds=seconds, assessment=assessment, warnings=tuple(warnings),
                     population=population)


def _population(workspace: Workspace, cfg: MapConfig, bundle: ModelBundle, cities: list[str], rows: dict[str, dict],
                say: Callable[[str], None], seconds: dict[str, float]) -> PopulationReport | str:
    """The population pass on the stitched cities; a pass that cannot run never takes the map products down."""
    t0 = time.perf_counter()
    try:
        result = run_population(workspace, cfg.run, cities, bundle, {c: rows[c]["imagery"] for c in cities},
                                {c: rows[c].get("region") or "" for c in cities}, cfg.inference, say)
    except Exception as exc:  # reported in the console and the exit code, like a failed assessment
        say(f"population failed: {describe_error(exc)}")
        return f"failed: {describe_error(exc)}"
    finally:
        seconds["population"] = time.perf_counter() - t0
    national = next((r for r in result.products.rows if r["level"] == "national"), None) if result.products else None
    if national:
        say(f"population: {national['population']:,.0f} residents, {national['uv_population']:,.0f} in urban villages "
            f"({national['uv_share']:.1%}); {result.inference.failed} tiles failed")
    return result


def _unassessed(city: CityReport, why: str | None) -> CityReport:
    """A city mapped ``ok`` that the assessment left out (e.g. its reference has no ``class`` column): ``partial``,
    stage ``assess``, so the console shows why and the exit code says something is missing."""
    if why is None or city.status != "ok":
        return city
    return replace(city, status="partial", stage="assess", error=why)


def check_run_vintage(workspace: Workspace, run: str, vintage: str | None) -> None:
    """Refuse to resume run ``run`` at another vintage than the one it mapped: its committed tiles are of that date's
    imagery, so the products would mix two dates under one name."""
    path = Workspace.fetch(workspace.run(run).manifest)
    if not path.is_file():
        return
    before = RunManifest.from_json(path.read_text()).vintage
    if before != vintage:
        raise ValueError(f"run {run} maps vintage {before or '(none)'}, not {vintage or '(none)'}: give this date its own "
                         f"--run (e.g. --run {run}-{vintage or 'all'})")


def _model_predictor(cfg: MapConfig, tile_size: int, model_dir: str, bundle: ModelBundle) -> tuple[RunManifest, type[Predictor], dict]:
    if bundle.tile_size_px != tile_size:
        raise ValueError(f"model {model_dir} expects {bundle.tile_size_px} px tiles, the workspace was prepared with {tile_size} px")
    manifest = RunManifest(run=cfg.run, model_dir=str(Path(model_dir).resolve()), model_version=bundle.version,
                           classes=bundle.classes, mode=cfg.mode or bundle.mode,
                           tile_size_px=tile_size, overlap_px=cfg.overlap_px, vintage=cfg.vintage)
    kwargs = {"model_dir": manifest.model_dir, "mode": manifest.mode, "device": "cuda" if cfg.inference.gpus else "cpu",
              "torch_threads": max(1, int(cfg.inference.cpus_per_actor)), "fail_tiles": tuple(cfg.fail_tiles)}
    return manifest, ModelPredictor, kwargs


def _reference_predictor(cfg: MapConfig, tile_size: int, references: dict[str, str]) -> tuple[RunManifest, type[Predictor], dict]:
    """The reference polygons as the model; its version is the references' content, so a changed reference redoes tiles."""
    from engine.tiles.city import file_digest

    digests = {city: file_digest(path) for city, path in sorted(references.items())}
    version = f"{REFERENCE_MODEL}-{hashlib.blake2b(json.dumps(digests).encode(), digest_size=6).hexdigest()}"
    classes = LABEL_SETS["builtup"]  # the reference's land use, built-up lumped: a perfect map of UV share too
    manifest = RunManifest(run=cfg.run, model_dir=REFERENCE_MODEL, model_version=version, classes=classes, mode=REFERENCE_MODEL,
                           tile_size_px=tile_size, overlap_px=cfg.overlap_px, vintage=cfg.vintage)
    return manifest, OraclePredictor, {"references": references, "classes": classes, "fail_tiles": tuple(cfg.fail_tiles)}


def default_model(workspace: str | os.PathLike[str], catalog: pa.Table, epochs: int = 3, use_gpu: bool = False,
                  say: Callable[[str], None] | None = None) -> str:
    """``models/default``: reused when present, else fine-tuned now (``tiny``, fused, classes ``builtup``: UV, other
    built-up, the rest, so UV share of built-up land is measured) on the train split."""
    from engine.pipelines.train import TrainConfig, run_training

    ws = Workspace.at(workspace)
    out = ws.fetch(ws.model(DEFAULT_MODEL))
    if (out / "model.safetensors").is_file():
        return str(out)
    if say:
        say(f"no model given: training the default quick model (tiny, fused, {epochs} epochs) into {out}; "
            "pass --model DIR to map with your own (e.g. one from `geolink-engine finetune`)")
    cfg = TrainConfig(task="finetune", preset="tiny", classes="builtup", epochs=epochs, batch_size=8, num_workers=1, cpus_per_worker=1.0,
                      use_gpu=use_gpu)
    return str(run_training(catalog, workspace, cfg, name=DEFAULT_MODEL))
