"""`map --population-model`: the tile population pass (Ray Data), then the population products.

1. :func:`population_bundle` checks, before any stage runs, that the bundle is a population regression model
   (``finetune --task population``): a segmentation model, or a CO2 one, is one line naming it;
2. :func:`run_population`: the model's value per prepared tile, through :func:`engine.pipelines.infer.run_inference`
   with :class:`~engine.mapping.regress.TileRegressor` in the pass's own run folder ``runs/<run>/population/`` (the
   ledger, commit point, orphan adoption and resume of `map`: a killed pass redoes no committed tile);
3. :func:`engine.products.population.write_population` on the stitched cities: the 100 m COGs, residents per UV
   polygon, and ``population.csv`` with the intervals of the model's held-out calibration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.compute as pc

from engine import storage
from engine.mapping.embed import EncodeAndWrite, read_vectors
from engine.mapping.regress import TileRegressor
from engine.mapping.store import Ledger, RunManifest
from engine.model_bundle import BundleError, ModelBundle
from engine.pipelines.embed import prepared_grid
from engine.pipelines.infer import InferenceConfig, InferenceResult, run_inference
from engine.product_layout import read_run
from engine.products.population import PopulationProducts, write_population
from engine.workspace import Workspace

POPULATION_TARGET = "population"


def population_bundle(model_dir: str) -> ModelBundle:
    """The bundle of ``--population-model``, checked: a population regression model, or one line saying what it is.

    Raises:
        BundleError: a broken bundle, a segmentation model, or a regression model of another quantity.
    """
    bundle = ModelBundle.load(storage.local_path(model_dir))
    target = bundle.train.get("target")
    if target == POPULATION_TARGET and bundle.config.regression_targets:
        return bundle
    what = (f"a {target} regression model (finetune --task {target})" if target not in (None, "segmentation")
            else "a segmentation model (it maps classes; its regression head was never trained)")
    raise BundleError(f"--population-model {model_dir} is {what}; give a model from `geolink-engine finetune --task population`"
                      + (" (and give this one as --model)" if target in (None, "segmentation") else ""))


@dataclass(frozen=True)
class PopulationReport:
    """The population pass and its products (None when no stitched city had values)."""

    model_version: str
    inference: InferenceResult
    products: PopulationProducts | None
    failures: list[tuple[str, str, int, str]] = field(default_factory=list)  # failed tiles (city, tile, attempts, error)
    seconds: dict[str, float] = field(default_factory=dict)


def run_population(workspace: Workspace, run: str, cities: list[str], bundle: ModelBundle, imagery: dict[str, str],
                   regions: dict[str, str], cfg: InferenceConfig, say: Callable[[str], None] | None = None,
                   on_commit: Callable[[int, int], None] | None = None) -> PopulationReport:
    """Predict every prepared tile of ``cities`` with ``bundle`` (resumable) and write the population products of
    run ``run`` (stitched first: its ``class.tif`` and UV polygons). Ray must be initialised."""
    from engine.training.calibration import read_calibration

    say = say or (lambda _msg: None)
    seconds: dict[str, float] = {}
    index, _, overlap = prepared_grid(workspace, cities, bundle.tile_size_px)
    folder = workspace.population_run(run)
    manifest = RunManifest(run=run, model_dir=str(bundle.path.resolve()), model_version=bundle.version, classes=bundle.classes,
                           mode=bundle.mode, tile_size_px=bundle.tile_size_px, overlap_px=overlap)
    kwargs = {"model_dir": manifest.model_dir, "mode": bundle.mode, "device": "cuda" if cfg.gpus else "cpu",
              "torch_threads": max(1, int(cfg.cpus_per_actor))}
    say(f"population: model {bundle.version} ({bundle.mode}) on {len(index)} cities")
    t0 = time.perf_counter()
    result = run_inference(workspace, manifest, sorted(index), TileRegressor, kwargs, cfg, on_commit=on_commit, actor=EncodeAndWrite,
                           run_folder=folder, imagery={c: imagery[c] for c in index if imagery.get(c)})
    seconds["population_tiles"] = time.perf_counter() - t0
    values: dict[str, dict[str, float]] = {}
    with Ledger(folder.root, read_only=True) as ledger:
        for city in sorted(index):
            committed = ledger.committed(city)
            committed = committed.filter(pc.equal(committed["model_version"], bundle.version))
            values[city] = {tile: float(v[0, 0]) for tile, v in read_vectors(folder.root, committed)}
        failures = [f for f in ledger.failures() if f[0] in index]
    t0 = time.perf_counter()
    products = workspace.products(run)
    Workspace.fetch(products)
    try:
        written = write_population(products, index, values, read_run(products), regions, bundle.version,
                                   read_calibration(bundle.path))
    except ValueError as exc:  # no stitched city with values: said, the run's other products stand
        say(f"population: {exc}")
        written = None
    seconds["population_products"] = time.perf_counter() - t0
    if written is not None:
        for why in written.skipped.values():
            say(f"population: {why}")
        for path in (written.csv, written.uv_parquet, *written.cogs.values()):
            Workspace.publish(path)
    return PopulationReport(model_version=bundle.version, inference=result, products=written, failures=failures, seconds=seconds)

