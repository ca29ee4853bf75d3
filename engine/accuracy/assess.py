"""The `assess` stage: a design-based accuracy assessment of a mapping run's products.

``products/<run>/cities/<city>/class.tif`` -> strata and their areas -> a stratified random sample of points ->
reference labels (catalog reference polygons, or a blind labelling sheet filled by people) -> Stehman (2014)
estimates nationally, per region and per city, with the census comparison where the reference is the full truth
-> ``products/<run>/accuracy/`` (see :mod:`engine.accuracy.report`).

Why one city's failure never stops the run: a nationwide product has hundreds of cities; a city whose class map is
missing or unreadable is listed in ``skipped_cities`` with its reason, and the estimates describe the others (the
report says so).
"""

from __future__ import annotations

import csv
import json
import os
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.accuracy.estimators import INTERVALS, area_ratio_estimates, stratified_estimates
from engine.accuracy.reference import (
    export_label_sheet,
    label_land,
    load_reference,
    read_labels,
    to_ref_class,
    truth_strips,
)
from engine.accuracy.report import (
    AssessReport,
    Census,
    DomainResult,
    degenerate_flags,
    write_report,
    write_samples,
    write_tables,
)
from engine.accuracy.sampling import (
    ASSESS_CLASSES,
    BUILT_UP,
    LAND_CLASSES,
    OTHER_CLASS,
    UV_CLASS,
    CityStrata,
    SampleConfig,
    SampleDesign,
    draw_sample,
    open_city_grid,
    plan_design,
    scan_city,
)
from engine.db import connect
from engine.product_layout import ACCURACY_DIR, CITY_STATS, COGS, RUN_JSON, city_folder
from engine.workspace import Workspace

CLASS_TIF = COGS["class"]


def check_assess_options(cfg) -> None:
    """The options an assessment and a change assessment share (``interval``, ``min_domain_samples``, ``chip_px``,
    ``workers``): a ValueError naming the bad one."""
    if cfg.interval not in INTERVALS:
        raise ValueError(f"interval={cfg.interval!r}: use one of {INTERVALS}")
    if cfg.min_domain_samples < 2:
        raise ValueError(f"min_domain_samples={cfg.min_domain_samples}: need at least 2 (variance)")
    if not 8 <= cfg.chip_px <= 1024:
        raise ValueError(f"chip_px={cfg.chip_px}: use 8 to 1024")
    if cfg.workers < 0:
        raise ValueError(f"workers={cfg.workers}: need 0 (automatic) or more")


@dataclass(frozen=True)
class AssessConfig:
    """How a run is assessed.

    Args:
        sampling: the sample design (strata, buffer, sample size, seed), see :class:`SampleConfig`.
        use_catalog_reference: label points from the catalog's ``reference`` polygons where a city has them; off:
            every point goes to the labelling sheet (e.g. real cities whose reference is only training polygons).
        census: compare with the census of the catalog reference rasterised on the class grid; meaningful only
            where the reference maps every village (synthetic cities).
        min_domain_samples: points each stratum part of a region or city needs for that domain's own estimate.
        chip_px: side of the labelling sheet's image chips, in imagery pixels.
        fpc: finite population correction; off by default because the points are i.i.d. on a continuous area.
        workers: cities scanned at once (threads); 0 = up to 4, one per core.
        interval: the 95% CIs: ``jeffreys`` (default; the stratified Jeffreys posterior interval, never of zero
            width) or ``wald`` (estimate +- 1.96 SE, the classical one), see :mod:`engine.accuracy.estimators`.

    Example:
        >>> AssessConfig(sampling=SampleConfig(buffer_m=30.0)).sampling.buffer_m
        30.0
    """

    sampling: SampleConfig = field(default_factory=SampleConfig)
    use_catalog_reference: bool = True
    census: bool = True
    min_domain_samples: int = 2
    chip_px: int = 96
    fpc: bool = False
    workers: int = 0
    interval: str = "jeffreys"

    def __post_init__(self) -> None:
        check_assess_options(self)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["sampling"]["users_accuracy"] = dict(self.sampling.users_accuracy)
        return doc


def run_assess(workspace: Workspace | str | os.PathLike[str], run: str, catalog: pa.Table, cfg: AssessConfig = AssessConfig(),
               reference_labels: str | os.PathLike[str] | None = None,
               say: Callable[[str], None] | None = None) -> AssessReport:
    """Assess run ``run``'s products for the cities of ``catalog``; write ``products/<run>/accuracy/``.

    Args:
        workspace: the workspace holding ``products/<run>/``.
        run: the run name.
        catalog: the catalog (``city``, ``region``, ``imagery``, optional ``reference``).
        cfg: the assessment's settings.
        reference_labels: a filled labelling sheet (CSV with ``id``, ``label``); its labels override the catalog
            reference for the points it names, and every point without a catalog reference must be in it.
        say: progress messages (the CLI prints them).

    Returns:
        The :class:`AssessReport` (``status`` ``awaiting_labels`` when points still need labels: the sheet was
        written and no estimates were made).

    Raises:
        FileNotFoundError: the run has no products (``run.json``).
        ValueError: the run's classes lack ``urban_village``, or no city has a readable class map.
        engine.accuracy.AccuracyInputError: a bad labels file (naming the file and line).

    Example::

        report = run_assess("geolink-data", "default", load_catalog("geolink-data/catalog.yaml"))
        report.national.result.overall_accuracy.estimate
    """
    say = say or (lambda _msg: None)
    products = Workspace.at(workspace).products(run)
    manifest = _read_run(products)
    classes = tuple(manifest["classes"])
    if UV_CLASS not in classes:
        raise ValueError(f"run {run}: classes {list(classes)} have no {UV_CLASS!r}; nothing to assess")
    out_dir = products / ACCURACY_DIR
    all_rows = [r for r in catalog.to_pylist() if r.get("city")]
    warnings: list[str] = []
    # a reference that cannot be used (unreadable, no `class` column) is an input error of its city: the city is
    # left out (and reported), never silently sent to the labelling sheet
    references, skipped = _load_references(all_rows)
    rows = [r for r in all_rows if r["city"] not in skipped]
    stats = _stitch_status(products)

    say(f"assess: scanning {len(rows)} class maps")
    scans: list[CityStrata] = []
    workers = max(1, min(cfg.workers or min(4, os.cpu_count() or 1), len(rows) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row, outcome in zip(rows, pool.map(lambda r: _scan(products, r, classes, cfg, references, stats), rows)):
            if isinstance(outcome, str):
                skipped[row["city"]] = outcome
            else:
                scans.append(outcome)
    if not scans:
        hint = f"; run `geolink-engine stitch --run {run}` first" if any(CLASS_TIF in w for w in skipped.values()) else ""
        raise ValueError(f"run {run}: no city has a readable class map (or each one's reference is unusable): "
                         f"{'; '.join(f'{c}: {w}' for c, w in skipped.items())}{hint}")
    if skipped:
        warnings.append(f"{len(skipped)} of {len(all_rows)} cities skipped (see skipped_cities): the estimates describe "
                        f"the {len(scans)} others only and are not national")

    design = plan_design(scans, cfg.sampling)
    say(f"assess: {design.n_total} points in {len(design.strata)} strata")
    points = draw_sample(scans, design)
    stamp = str(manifest.get("datetime") or "")  # the GeoPackages' last_change: the run's start, stable across reruns
    points, sheet_files = _reference(points, rows, references, cfg, reference_labels, out_dir, warnings, stamp)
    status = "awaiting_labels" if points["ref_class"].isna().any() else "done"

    regions = sorted({s.grid.region for s in scans})
    cities = sorted(s.grid.city for s in scans)
    if status == "done":
        national = estimate_domain(points, design, "national", "national", None, cfg)
        by_region = {r: estimate_domain(points, design, "region", r, [s.grid.city for s in scans if s.grid.region == r], cfg)
                     for r in regions}
        by_city = {c: estimate_domain(points, design, "city", c, [c], cfg) for c in cities}
        warnings += [f"national: {w}" for w in (national.result.warnings if national.result else ()) + national.flags]
    else:
        national = _pending(design, "national", "national", None, points)
        by_region = {r: _pending(design, "region", r, [s.grid.city for s in scans if s.grid.region == r], points) for r in regions}
        by_city = {c: _pending(design, "city", c, [c], points) for c in cities}
    census = census_tables(scans) if any(s.census is not None for s in scans) else None

    files = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md",
             "samples_gpkg": out_dir / "samples.gpkg", **{f"sheet_{k}": p for k, p in sheet_files.items()}}
    if status == "done":
        files.update({"accuracy_chart": out_dir / "accuracy_by_region.png", "area_chart": out_dir / "uv_area_by_region.png",
                      "samples_csv": out_dir / "samples.csv", "strata_csv": out_dir / "strata.csv"})
    report = AssessReport(run=run, model_version=str(manifest.get("model_version", "")), status=status, out_dir=out_dir,
                          config=cfg.to_json(), design=design, points=points, national=national, regions=by_region,
                          cities=by_city, census=census, skipped=skipped, files=files, warnings=tuple(warnings))
    write_samples(points, out_dir, stamp)
    if status == "done":
        write_tables(points, design, out_dir)
    write_report(report)
    say(f"assess: {status}; wrote {out_dir}")
    return report


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _read_run(products: Path) -> dict:
    path = products / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"products {products}: no {RUN_JSON}; run `geolink-engine stitch` for this run first")
    run = json.loads(path.read_text())
    if not run.get("classes"):
        raise ValueError(f"{path}: no classes; it must be the RunManifest copied by stitch")
    return run


def _stitch_status(products: Path) -> dict[str, str]:
    """city -> ``status: error``-ish text from ``city_stats.csv`` (to say why a class map is missing); {} if absent."""
    path = products / CITY_STATS
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {r["city"]: r.get("status") or "" for r in csv.DictReader(fh) if r.get("city")}


def _load_references(rows: list[dict]) -> tuple[dict[str, object], dict[str, str]]:
    """city -> reference polygons, each file read once (several cities may share one national file); and city ->
    why its reference cannot be used."""
    by_path: dict[str, object] = {}
    out, bad = {}, {}
    for row in rows:
        path = row.get("reference")
        if not path:
            continue
        if path not in by_path:
            try:
                by_path[path] = load_reference(path)
            except ValueError as exc:
                by_path[path] = str(exc)
        if isinstance(by_path[path], str):
            bad[row["city"]] = by_path[path]
        else:
            out[row["city"]] = by_path[path]
    return out, bad


def _scan(products: Path, row: dict, classes: tuple[str, ...], cfg: AssessConfig, references: dict,
          stats: dict[str, str]) -> CityStrata | str:
    """The city's first pass, or why it is skipped (never raises)."""
    city = row["city"]
    try:
        path = city_folder(products, city) / CLASS_TIF
        if not path.is_file():
            why = f"no {CLASS_TIF} at {path}"
            if stats.get(city):
                why += f" (stitch status: {stats[city]})"
            return why
        grid = open_city_grid(path, city, row.get("region") or "", classes)
        truth = truth_strips(references[city], grid) if cfg.census and city in references else None
        return scan_city(grid, cfg.sampling.buffer_m, cfg.sampling.block_rows, truth)
    except Exception as exc:  # noqa: BLE001 (one city never stops the others)
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        return f"{type(exc).__name__}: {exc}{where}"


def _reference(points: pd.DataFrame, rows: list[dict], references: dict, cfg: AssessConfig,
               labels_csv: str | os.PathLike[str] | None, out_dir: Path,
               warnings: list[str], timestamp: str = "") -> tuple[pd.DataFrame, dict[str, Path]]:
    """Points with ``ref_class``/``ref_source``; exports the labelling sheet for points still without a label."""
    points = points.copy()
    ref = np.full(len(points), None, dtype=object)  # the reference land class (LAND_CLASSES)
    source = np.full(len(points), None, dtype=object)
    if cfg.use_catalog_reference:
        for city, idx in points.groupby("city").groups.items():
            if city in references:
                pos = points.index.get_indexer(idx)
                ref[pos] = label_land(points.loc[idx, "lon"].to_numpy(), points.loc[idx, "lat"].to_numpy(), references[city])
                source[pos] = "catalog"
    if labels_csv is not None:
        labels = read_labels(labels_csv, points, required=set(points["id"][pd.isna(ref)]))
        pos = points.index.get_indexer(points.index[points["id"].isin(labels["id"])])
        lookup = dict(zip(labels["id"], labels["ref_land"]))
        ref[pos] = points["id"].iloc[pos].map(lookup).to_numpy()
        source[pos] = "labels"
    known = ~pd.isna(ref)
    points["ref_class"] = np.where(known, to_ref_class(np.where(known, ref, OTHER_CLASS)), None)
    points["ref_land"] = ref
    points["ref_source"] = source
    pending = pd.isna(ref)
    if not pending.any():
        return points, {}
    imagery = {r["city"]: r.get("imagery") for r in rows}
    files, chip_warnings = export_label_sheet(points[pending], imagery, out_dir, cfg.chip_px, timestamp)
    warnings += chip_warnings
    warnings.append(f"{int(pending.sum())} points have no reference label: fill {files['csv'].name} and run the "
                    f"assessment again with it")
    return points, files


# ---------------------------------------------------------------------------------------------------------------
# estimates


def _domain_cells(design: SampleDesign, cities: list[str] | None) -> pd.DataFrame:
    return design.cells if cities is None else design.cells[design.cells["city"].isin(cities)]


def _mapped(cells: pd.DataFrame) -> dict[str, float]:
    by_class = cells.groupby(np.where(cells["map_stratum"] == UV_CLASS, UV_CLASS, OTHER_CLASS))["area_m2"].sum()
    return {c: float(by_class.get(c, 0.0)) for c in ASSESS_CLASSES}


def _mapped_built_up(cells: pd.DataFrame) -> float | None:
    """Area the map puts in a built-up class (urban villages included); None where a city's map has no built-up
    class (a binary UV map does not say where built-up land is)."""
    built = cells["built_up_m2"] if "built_up_m2" in cells else pd.Series(np.nan, index=cells.index)
    if cells.empty or built.isna().any():
        return None
    return float(built.sum())


def _pending(design: SampleDesign, level: str, name: str, cities: list[str] | None, points: pd.DataFrame) -> DomainResult:
    n = len(points) if cities is None else int(points["city"].isin(cities).sum())
    cells = _domain_cells(design, cities)
    return DomainResult(level, name, "awaiting_labels", n, _mapped(cells), mapped_built_up_m2=_mapped_built_up(cells))


def estimate_domain(points: pd.DataFrame, design: SampleDesign, level: str, name: str, cities: list[str] | None,
                    cfg: AssessConfig) -> DomainResult:
    """Stehman (2014) estimates for the cities ``cities`` (None: all) from the points that fall in them.

    The domain's strata are the design strata restricted to its cities, with the domain's own areas as sizes. For a
    domain made of whole strata (the nation; a region with regional strata) this is the design's estimator; for a
    city inside regional strata it is the post-stratified domain estimator (the points of a stratum that fall in the
    city are a random sample of the city's part), valid when each part holds ``min_domain_samples`` points.
    """
    cells = _domain_cells(design, cities)
    mapped = _mapped(cells)
    built = _mapped_built_up(cells)
    sizes = cells.groupby("stratum", sort=False)["area_m2"].sum()
    mine = points if cities is None else points[points["city"].isin(cities)]
    if sizes.empty:
        return DomainResult(level, name, "no_mapped_area", 0, mapped, note="no valid pixel in the class map",
                            mapped_built_up_m2=built)
    n_h = mine["stratum"].value_counts().reindex(sizes.index, fill_value=0)
    thin = n_h[n_h < cfg.min_domain_samples]
    if len(thin):
        parts = ", ".join(f"{h} ({int(k)} points, {sizes[h] / 1e4:,.2f} ha)" for h, k in thin.items())
        return DomainResult(level, name, "too_few_samples", len(mine), mapped,
                            note=f"too few samples for an estimate: {parts} need at least {cfg.min_domain_samples} "
                                 f"points each (assess with strata=city or a larger sample)", mapped_built_up_m2=built)
    result = stratified_estimates(mine[["stratum", "map_class", "ref_class"]], sizes.to_dict(), classes=ASSESS_CLASSES,
                                  fpc=cfg.fpc, interval=cfg.interval)
    land = mine.assign(ref_land=mine["ref_land"] if "ref_land" in mine else mine["ref_class"])
    land = area_ratio_estimates(land[["stratum", "map_class", "ref_land"]], sizes.to_dict(), part=[UV_CLASS],
                                whole=[UV_CLASS, BUILT_UP], ref_column="ref_land", fpc=cfg.fpc, interval=cfg.interval)
    return DomainResult(level, name, "estimated", len(mine), mapped, result, flags=degenerate_flags(result), land=land,
                        mapped_built_up_m2=built)


CENSUS_SQL = """
SELECT CASE WHEN GROUPING(city) = 0 THEN 'city' WHEN GROUPING(region) = 0 THEN 'region' ELSE 'national' END AS level,
       COALESCE(city, region, 'national') AS name,
       map_index, ref_index,
       SUM(pixels)::BIGINT AS pixels,
       SUM(area_m2) AS area_m2
FROM census
GROUP BY GROUPING SETS ((map_index, ref_index), (region, map_index, ref_index), (city, map_index, ref_index))
ORDER BY level, name, map_index, ref_index
"""


def census_tables(scans: list[CityStrata]) -> dict[str, dict[str, Census]]:
    """Census confusion (m2, map class x true land class) per city, region and nation from the cities' pixel counts
    (DuckDB grouping sets).

    A region (or the nation) gets a census only when every one of its assessed cities has one, so a census is never
    compared with an estimate over a larger area.
    """
    rows = [{"city": s.grid.city, "region": s.grid.region, "map_index": i, "ref_index": j,
             "pixels": int(s.census[i, j]), "area_m2": float(s.census_area_m2[i, j])}
            for s in scans if s.census is not None for i in range(2) for j in range(len(LAND_CLASSES))]
    con = connect(threads=1)
    try:
        con.register("census", pa.Table.from_pylist(rows))
        df = con.execute(CENSUS_SQL).df()
    finally:
        con.close()
    out: dict[str, dict[str, Census]] = {"national": {}, "region": {}, "city": {}}
    for (level, name), g in df.groupby(["level", "name"], sort=True):
        m = np.zeros((2, len(LAND_CLASSES)))
        m[g["map_index"].to_numpy(), g["ref_index"].to_numpy()] = g["area_m2"].to_numpy()
        out[level][name] = Census(int(g["pixels"].sum()), m)
    partial = {s.grid.region for s in scans if s.census is None}
    out["region"] = {r: c for r, c in out["region"].items() if r not in partial}
    if partial:
        out["national"] = {}
    return out
