"""`geolink-engine change`: urban-village change between two map runs of the same cities at two dates.

The two runs are two vintages of one catalog (``map --vintage 2018``, ``map --vintage 2024``) made by the same model
on the same tile grid; anything else would paint the difference between two models, or two grids, as change on
the ground, so it is refused before any work. Per city shared by both runs (a city missing at one date is
reported and the others are done):

- the change COG (``cities/<city>/change.tif``, engine.change.raster): persistent, demolished and new UV, with a
  misregistration tolerance so a 1-3 px shift between the dates' imagery is not read as change;
- every UV polygon of either date with its fate (``change_polygons.parquet``/``.gpkg``, engine.change.fates);
- then ``change_stats.csv`` per city, region and nation, the change-area accuracy assessment (``accuracy/``,
  engine.accuracy.change) where the catalog has both dates' references or people label the sample, and the page
  and STAC collection.

Cities run on driver threads (GDAL, numpy and GEOS release the GIL): the per-city work is seconds for a demo city
and minutes for a 60,000 px one, far below a map run's, so it needs no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import rasterio

from engine.accuracy.tables import AccuracyInputError
from engine.atomic import atomic_path
from engine.catalog import catalog_vintages, select_vintage
from engine.change.codes import CHANGE_CLASSES
from engine.change.fates import FATE_COLUMNS, fate_counts, uv_fates
from engine.change.raster import write_change_city
from engine.change.stats import CHANGE_STATS_COLUMNS, change_stats
from engine.errors import describe_error
from engine.geoparquet import write_geoparquet
from engine.gpkg import write_gpkg
from engine.product_layout import (
    CHANGE_COG,
    CHANGE_POLYGONS_GPKG,
    CHANGE_POLYGONS_PARQUET,
    CHANGE_STATS_CSV,
    COGS,
    RUN_JSON,
    UV_PARQUET,
    city_folder,
    read_city_stats,
    read_run,
    write_csv,
)
from engine.workspace import Workspace, check_name

UV_CLASS = "urban_village"
CHANGE_LAYER = "change_polygons"


@dataclass(frozen=True)
class ChangeConfig:
    """One change run.

    Args:
        tolerance_px: misregistration tolerance in pixels of the before map (engine.change.raster): UV of one date
            with the other date's UV this close is persistent, not demolished or new. 3 covers the 0-3 px shifts of
            real archives; a true change narrower than it is missed (docs/CHANGE.md).
        area_threshold: relative area change of a matched group of polygons that counts as shrunk or grew.
        assess: run the change-area accuracy assessment (engine.accuracy.change).
        n_total: total sample size of the assessment (default: its own rule).
        min_rare: sample points at least in each demolished / new / persistent stratum.
        seed: seed of the sample.
        workers: cities at once (driver threads); default: the CPUs.
    """

    tolerance_px: int = 3
    area_threshold: float = 0.2
    assess: bool = True
    n_total: int | None = None
    min_rare: int = 50
    seed: int = 0
    workers: int | None = None

    def __post_init__(self) -> None:
        if int(self.tolerance_px) != self.tolerance_px or not 0 <= self.tolerance_px <= 50:
            raise ValueError(f"--tolerance-px {self.tolerance_px}: use a whole number of pixels from 0 to 50")


@dataclass(frozen=True)
class ChangeCity:
    city: str
    region: str
    status: str  # done | failed | missing (no products at one of the dates)
    error: str = ""
    row: dict = field(default_factory=dict)  # areas and fate counts (engine.change.stats input)


@dataclass(frozen=True)
class ChangeReport:
    run: str
    before: str
    after: str
    vintages: tuple[str, str]
    products: Path
    cities: list[ChangeCity]
    stats: list[dict]
    seconds: dict[str, float]
    assessment: object | None = None  # engine.accuracy.change's report, or "failed: ..." text
    warnings: tuple[str, ...] = ()

    @property
    def failed(self) -> list[ChangeCity]:
        return [c for c in self.cities if c.status != "done"]


def change_run_name(before: str, after: str) -> str:
    """The default name of the change run of ``before`` -> ``after``: ``<before>-to-<after>``, shortened to a slug."""
    name = f"{before}-to-{after}"
    return name if len(name) <= 63 else f"change-{hashlib.blake2b(name.encode(), digest_size=5).hexdigest()}"


def check_runs(before: dict, after: dict) -> tuple[str, str]:
    """The two vintages, after refusing runs that cannot be compared: different models, classes or tile grids,
    no recorded vintage, the same vintage, or the dates in the wrong order. One line each, naming both runs."""
    b, a = before["run"], after["run"]
    if before.get("kind") == "change" or after.get("kind") == "change":
        raise ValueError(f"runs {b} and {a}: give two map runs, not a change run")
    for key, what in (("model_version", "models"), ("classes", "class sets"), ("mode", "modes")):
        if before.get(key) != after.get(key):
            raise ValueError(f"runs {b} and {a} were made by different {what} ({before.get(key)} and {after.get(key)}): "
                             f"change needs both dates mapped by one model; rerun one date with --model of the other")
    for key in ("tile_size_px", "overlap_px"):
        if before.get(key) != after.get(key):
            raise ValueError(f"runs {b} and {a} use different tile grids ({key} {before.get(key)} and {after.get(key)}): "
                             f"map both dates on the same grid")
    vb, va = before.get("vintage"), after.get("vintage")
    for run, vintage in ((b, vb), (a, va)):
        if not vintage:
            raise ValueError(f"run {run} records no vintage: map each date of a catalog with a `vintage` column with "
                             f"`geolink-engine map --vintage V`")
    if vb == va:
        raise ValueError(f"runs {b} and {a} both map vintage {vb}: give runs of two dates")
    if str(vb) > str(va):
        raise ValueError(f"--before {b} maps vintage {vb}, later than --after {a} ({va}): swap them")
    if UV_CLASS not in before.get("classes", []):
        raise ValueError(f"run {b}: its classes {before.get('classes')} have no {UV_CLASS}")
    return str(vb), str(va)


def run_change(workspace: Workspace | str | os.PathLike[str], before: str, after: str, catalog: pa.Table,
               into: str | None = None, cfg: ChangeConfig = ChangeConfig(),
               say: Callable[[str], None] | None = None, on_step: Callable[..., None] | None = None,
               reference_labels: str | os.PathLike[str] | None = None) -> ChangeReport:
    """Compare run ``before`` with run ``after`` into ``products/<into>/`` (see the module docstring).

    Args:
        workspace: the workspace holding both runs' products.
        before, after: the two map runs (``map --vintage``), earlier date first.
        catalog: the catalog with both vintages' rows (each date's ``reference`` and ``imagery`` for the assessment
            and the labelling sheet).
        into: the change run's name; default :func:`change_run_name`.
        say, on_step: a line per stage; the stage display (``change``, ``assess``, ``publish``).
        reference_labels: a filled two-date labelling sheet (``label`` one of the change classes; from
            ``accuracy/samples_to_label.csv`` or ``geolink-engine label --export`` on the change run).

    Raises:
        ValueError: runs that cannot be compared (:func:`check_runs`), or share no city; a bad name.
        FileNotFoundError: a run without products.
    """
    ws = Workspace.at(workspace)
    say = say or (lambda _m: None)
    step = on_step or (lambda *_a, **_k: None)
    into = check_name("run", into or change_run_name(before, after))
    if into in (before, after):
        raise ValueError(f"--into {into}: the change run needs a name of its own (not one of the map runs)")
    pb, pa_ = ws.products(before), ws.products(after)
    run_b, run_a = read_run(Workspace.fetch(pb)), read_run(Workspace.fetch(pa_))
    vintages = check_runs(run_b, run_a)
    by_vintage = _catalog_rows(catalog, ws, vintages)
    stats_b, stats_a = ({r["city"]: r for r in read_city_stats(p)} for p in (pb, pa_))
    mapped_b, mapped_a = ({c for c in s if (city_folder(p, c) / COGS["class"]).is_file()} for s, p in ((stats_b, pb), (stats_a, pa_)))
    shared = sorted(mapped_b & mapped_a)
    if not shared:
        raise ValueError(f"runs {before} ({vintages[0]}) and {after} ({vintages[1]}) share no mapped city "
                         f"({len(mapped_b)} and {len(mapped_a)} cities mapped): map the same cities at both dates")
    out = ws.products(into)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    cities: list[ChangeCity] = []
    for city in sorted((mapped_b | mapped_a | set(stats_b) | set(stats_a)) - set(shared)):
        missing = [f"{run} ({v})" for run, v, mapped in ((before, vintages[0], mapped_b), (after, vintages[1], mapped_a))
                   if city not in mapped]
        region = (stats_b.get(city) or stats_a.get(city) or {}).get("region") or ""
        cities.append(ChangeCity(city, region, "missing", f"city {city}: no class map in run {' or '.join(missing)} "
                                                          f"(that vintage is missing for it, or it failed there)"))
        _drop_city(out, city)
    say(f"change: {len(shared)} cities in both {before} ({vintages[0]}) and {after} ({vintages[1]}); tolerance "
        f"{cfg.tolerance_px} px" + (f"; {len(cities)} at one date only" if cities else ""))
    step("change", 0, len(shared))
    polygons_b, polygons_a = _villages(pb), _villages(pa_)
    uv_b, uv_a = run_b["classes"].index(UV_CLASS), run_a["classes"].index(UV_CLASS)

    def one(city: str) -> tuple[ChangeCity, gpd.GeoDataFrame | None]:
        region = (stats_b.get(city) or {}).get("region") or (stats_a.get(city) or {}).get("region") or ""
        try:
            cog = city_folder(out, city) / CHANGE_COG
            areas = write_change_city(city_folder(pb, city) / COGS["class"], city_folder(pa_, city) / COGS["class"], cog,
                                      uv_b, uv_a, tolerance_px=cfg.tolerance_px)
            with rasterio.open(cog) as src:
                crs, pixel_m = src.crs, abs(src.transform.a)
            metric = crs if crs is not None and crs.is_projected else None
            tolerance_m = cfg.tolerance_px * (pixel_m if metric is not None else float(areas.get("pixel_area_m2") or 1.0) ** 0.5)
            fates = uv_fates(polygons_b[polygons_b["city"] == city], polygons_a[polygons_a["city"] == city], metric,
                             tolerance_m, area_threshold=cfg.area_threshold, city=city)
            if "region" in fates.columns:
                fates["region"] = fates["region"].fillna(region)
            row = {"city": city, "region": region, "status": "done", **areas, **fate_counts(fates)}
            return ChangeCity(city, region, "done", "", row), fates
        except Exception as exc:  # noqa: BLE001 (one bad city never stops the others; it is reported with its cause)
            _drop_city(out, city)
            return ChangeCity(city, region, "failed", f"city {city}: {describe_error(exc)}"), None

    fate_frames = []
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.workers or os.cpu_count() or 1, len(shared)))) as pool:
        for done, (result, fates) in enumerate(pool.map(one, shared), start=1):
            cities.append(result)
            if fates is not None and len(fates):
                fate_frames.append(fates)
            if result.status != "done":
                say(f"warning: {result.error}")
            step("change", done, len(shared), f"{sum(c.status == 'done' for c in cities)} cities compared")
    cities.sort(key=lambda c: c.city)
    seconds["change"] = time.perf_counter() - t0

    manifest = {"run": into, "kind": "change", "before": before, "after": after, "vintages": list(vintages),
                "model_version": run_b["model_version"], "model_dir": run_b.get("model_dir"), "classes": list(CHANGE_CLASSES),
                "tolerance_px": cfg.tolerance_px, "area_threshold": cfg.area_threshold,
                "datetime": run_a.get("datetime") or "", "tile_size_px": run_b.get("tile_size_px"), "overlap_px": run_b.get("overlap_px")}
    with atomic_path(out / RUN_JSON) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _write_fates(fate_frames, out, manifest["datetime"])
    rows = [c.row if c.status == "done" else {"city": c.city, "region": c.region, "status": c.status} for c in cities]
    stats = change_stats(rows)
    write_csv(out / CHANGE_STATS_CSV, CHANGE_STATS_COLUMNS, stats)

    assessment = None
    if cfg.assess:
        t1 = time.perf_counter()
        step("assess", 0, None, "stratified sample of the change map")
        try:
            assessment = _assess(out, [c for c in cities if c.status == "done"], by_vintage, cfg, reference_labels, say)
            step("assess", 1, 1, f"{len(assessment.points)} points" + ("" if assessment.status == "done" else ", awaiting labels"))
        except AccuracyInputError:  # a bad --reference sheet is the user's to fix: one line, exit 2
            raise
        except Exception as exc:  # noqa: BLE001 (the change products stand without it; the report says why)
            assessment = f"failed: {describe_error(exc)}"
            say(f"change assessment {assessment}")
            step("assess", 1, 1, "failed (below)", failed=True)
        seconds["assess"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    step("publish", 0, None)
    _publish(out, catalog)
    seconds["publish"] = time.perf_counter() - t2
    step("publish", 1, 1, str(out))
    Workspace.publish(out)
    return ChangeReport(run=into, before=before, after=after, vintages=vintages, products=out, cities=cities, stats=stats,
                        seconds=seconds, assessment=assessment)


def dated_rows(catalog: pa.Table, workspace: Workspace, vintage: str) -> list[dict]:
    """The catalog rows of one vintage (rows without a vintage belong to every date), each city's ``imagery`` as
    that date's prepare read it (the model VRT of a tiled, stretched or resampled source), so chips and labels
    show what the model saw at that date."""
    from engine.pipelines.prepare import prepared_imagery

    return prepared_imagery(select_vintage(catalog, vintage), workspace.with_vintage(vintage)).to_pylist()


def _catalog_rows(catalog: pa.Table, workspace: Workspace, vintages: tuple[str, str]) -> dict[str, dict[str, dict]]:
    """vintage -> city -> catalog row of that date (:func:`dated_rows`); a vintage absent from the catalog has none."""
    present = set(catalog_vintages(catalog))
    return {v: ({r["city"]: r for r in dated_rows(catalog, workspace, v)} if v in present else {}) for v in vintages}


def _villages(products: Path) -> gpd.GeoDataFrame:
    path = products / UV_PARQUET
    if not path.is_file():
        return gpd.GeoDataFrame({"uv_id": [], "city": [], "region": []}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    return gpd.read_parquet(path, columns=["uv_id", "city", "region", "geometry"])


def _drop_city(out: Path, city: str) -> None:
    """No stale change map for a city this run could not compare (a rerun after its failure must not show one)."""
    (city_folder(out, city) / CHANGE_COG).unlink(missing_ok=True)


def _write_fates(frames: list[gpd.GeoDataFrame], out: Path, timestamp: str) -> None:
    """``change_polygons.parquet`` (GeoParquet, EPSG:4326) and ``.gpkg``, sorted by city, change id, date, uv_id."""
    if frames:
        gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs="EPSG:4326")
        gdf = gdf.sort_values(["city", "change_id", "date", "uv_id"], kind="stable").reset_index(drop=True)
    else:
        gdf = gpd.GeoDataFrame({c: [] for c in FATE_COLUMNS if c != "geometry"}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    gdf = gdf[[c for c in FATE_COLUMNS if c in gdf.columns]]
    table = pa.Table.from_pandas(gdf.to_wkb(), preserve_index=False)
    write_geoparquet(table, out / CHANGE_POLYGONS_PARQUET, 4326)
    write_gpkg(gdf, out / CHANGE_POLYGONS_GPKG, CHANGE_LAYER, timestamp, **({"geometry_type": "Polygon"} if len(gdf) == 0 else {}))


def _assess(out: Path, cities: list[ChangeCity], by_vintage: dict[str, dict[str, dict]], cfg: ChangeConfig,
            reference_labels: str | os.PathLike[str] | None, say: Callable[[str], None]):
    from engine.accuracy.change import ChangeAssessConfig, run_change_assess

    before, after = list(by_vintage)
    rows = []
    for c in cities:
        b, a = by_vintage[before].get(c.city) or {}, by_vintage[after].get(c.city) or {}
        rows.append({"city": c.city, "region": c.region, "reference_before": b.get("reference"), "reference_after": a.get("reference"),
                     "imagery_before": b.get("imagery"), "imagery_after": a.get("imagery")})
    return run_change_assess(out, rows, ChangeAssessConfig(n_total=cfg.n_total, min_rare=cfg.min_rare, seed=cfg.seed),
                             reference_labels=reference_labels, say=say)


def _publish(out: Path, catalog: pa.Table) -> None:
    from engine.products.change_page import write_change_page
    from engine.products.stac import validate_stac, write_stac

    write_change_page(out)
    write_stac(out)
    validate_stac(out)
