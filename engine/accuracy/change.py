"""Accuracy of a change run: design-based estimates of the area of each change class, and its coverage.

A change run holds, per city, ``products/<change-run>/cities/<city>/change.tif``: one uint8 code per pixel of the
before-date's class grid (:mod:`engine.change.codes`: 0 ``other``, 1 ``persistent_uv``, 2 ``demolished_uv``,
3 ``new_uv``, 255 nodata). What a reader needs is not the mapped area of demolished or new villages (a map's
omission and commission errors do not cancel) but an estimate of the *true* area with a confidence interval, and the
user's and producer's accuracy of each change class: the good practice of Olofsson et al. (2014) for land change.

```
change.tif ─► strata (change class x region|city) ─► allocation ─► points ─► reference change class ─► estimates ─► accuracy/
             (sampling.scan_city, strip by strip)   (plan_design)  (draw_sample)  (two dates' polygons,   (Stehman 2014,
                                                                                   or a two-date sheet)    Jeffreys CIs)
```

- **Sample design**: the machinery of :mod:`engine.accuracy.sampling` with every change class its own map stratum
  (``open_city_grid(..., strata_are_classes=True)``): points i.i.d. uniform on each stratum's ground area, any CRS,
  reproducible by seed and independent of the strip height. Cochran's n for the target SE of overall accuracy (four
  map classes with their anticipated user's accuracies), plus ``min_rare`` per rare stratum (``persistent_uv``,
  ``demolished_uv``, ``new_uv``); every rare stratum gets at least ``min_rare`` points, every ``other`` stratum at
  least ``min_common``, the rest by area (:func:`engine.accuracy.design.allocate`).
- **Reference change class** of a point: UV at the before-reference? UV at the after-reference? (point in or on a
  polygon of class ``urban_village``, :class:`engine.accuracy.reference.LandLabeller`) -> ``other`` (neither),
  ``persistent_uv`` (both), ``demolished_uv`` (before only), ``new_uv`` (after only). Cities without both
  references go to a blind labelling sheet whose chips show the before and the after imagery side by side.
- **Estimates**: :func:`engine.accuracy.estimators.estimates_from_counts` for K = 4 classes (Stehman 2014 ratio
  estimators; the stratified Jeffreys posterior interval, never of zero width), nationally and per region: area
  per change class, user's and producer's accuracy per class, overall accuracy.
- **Census** (synthetic cities, where the references are the full truth): both references rasterised onto each change
  grid (pixel centres, strip by strip) give the true area of each change class and the true accuracies, beside the
  estimates with "within CI" flags.
- **Coverage** (:func:`change_coverage`): the sample redrawn with other seeds against the census; the strata scan,
  the stratum codes (in memory) and the reference trees are made once, each replicate only draws, labels and
  estimates.

References: Olofsson, P. et al. (2014). Good practices for estimating area and assessing accuracy of land change.
Remote Sens. Environ. 148, 42-57. Stehman, S. V. (2014). Int. J. Remote Sens. 35, 4923-4939.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine.accuracy.assess import check_assess_options
from engine.accuracy.estimators import Estimate, count_cube, estimates_from_counts
from engine.accuracy.reference import (
    LandLabeller,
    export_label_sheet,
    load_reference,
    read_labels,
    truth_strips,
)
from engine.accuracy.report import (
    DomainResult,
    _pct,
    files_json,
    strata_json,
    degenerate_flags,
    write_samples,
    write_tables,
)
from engine.accuracy.sampling import (
    LAND_CLASSES,
    UV_CLASS,
    CityGrid,
    CityStrata,
    MemoryLocator,
    SampleConfig,
    SampleDesign,
    TruthStrip,
    draw_sample,
    open_city_grid,
    plan_design,
    scan_city,
)
from engine.atomic import atomic_path
from engine.change.codes import CHANGE_CLASSES, CHANGE_NODATA
from engine.product_layout import ACCURACY_DIR, CHANGE_COG, RUN_JSON, city_folder

CHANGE_TIF = CHANGE_COG  # the products name it (engine.product_layout)
OTHER, PERSISTENT, DEMOLISHED, NEW = CHANGE_CLASSES
RARE_CHANGE = (PERSISTENT, DEMOLISHED, NEW)  # the strata that get min_rare points
DEFAULT_USERS_ACCURACY = {OTHER: 0.95, PERSISTENT: 0.85, DEMOLISHED: 0.7, NEW: 0.7}  # anticipated, for Cochran's n
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
UV_LAND = LAND_CLASSES.index(UV_CLASS)
QUANTITY_NAMES = {"area": "area", "users_accuracy": "user's accuracy", "producers_accuracy": "producer's accuracy"}


def change_code(before_uv: np.ndarray, after_uv: np.ndarray) -> np.ndarray:
    """The change code (index in ``CHANGE_CLASSES``) of UV at the before date and UV at the after date.

    Example:
        >>> change_code(np.array([False, True, True, False]), np.array([False, True, False, True])).tolist()
        [0, 1, 2, 3]
    """
    b, a = np.asarray(before_uv, bool), np.asarray(after_uv, bool)
    return np.where(b & a, 1, np.where(b, 2, np.where(a, 3, 0))).astype(np.uint8)


@dataclass(frozen=True)
class ChangeAssessConfig:
    """How a change run is assessed.

    Args:
        strata: the unit crossed with the change classes, ``region`` (default) or ``city``.
        users_accuracy: anticipated user's accuracy of each change class, for Cochran's n.
        target_se: wanted SE of overall accuracy, for Cochran's n.
        min_rare: minimum points per ``persistent_uv``, ``demolished_uv`` and ``new_uv`` stratum (added on top of
            Cochran's n, as in :func:`engine.accuracy.sampling.plan_design`).
        min_common: minimum points per ``other`` stratum (the omission of demolished and new villages lies there).
        n_total: fix the total instead (still at least the sum of the minimums).
        seed: of the random draw; block_rows: change-map rows per strip.
        use_reference: label points from the cities' before/after reference polygons where both exist; off: every
            point goes to the labelling sheet.
        census: compare with both references rasterised on the change grids (meaningful where they are the full
            truth: synthetic cities).
        min_domain_samples: points each stratum of a domain needs for its estimate.
        chip_px: side of each date's chip of the labelling sheet (imagery pixels).
        fpc: finite population correction (off: points are i.i.d. on a continuous area).
        workers: cities scanned at once (threads); 0 = up to 4.
        interval: ``jeffreys`` (default, never of zero width) or ``wald``.
        split_errors: off (default): the project's Jeffreys prior, 1/2 on every cell of the domain's 4 x 4 error
            matrix (1.5 pseudo-errors per row and per column); on: 1/2 on each correct cell and 1/2 spread over a
            row's three error cells (user's accuracy then gets the binomial Jeffreys interval, as with two classes;
            see :func:`engine.accuracy.estimators.posterior_bounds`). On the synthetic case of
            tests/test_change_accuracy.py (400 redraws) area coverage is the same either way (94-98% nationally);
            on lifts overall accuracy (92.5% -> 95.0%, a region 89% -> 94%) and lowers the producer's accuracy of
            persistent_uv, whose omission is rarely sampled (93.5% -> 89%).

    Example:
        >>> ChangeAssessConfig(min_rare=60).sampling().min_rare
        60
    """

    strata: str = "region"
    users_accuracy: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_USERS_ACCURACY))
    target_se: float = 0.01
    min_rare: int = 50
    min_common: int = 100
    n_total: int | None = None
    seed: int = 0
    block_rows: int = 256
    use_reference: bool = True
    census: bool = True
    min_domain_samples: int = 2
    chip_px: int = 96
    fpc: bool = False
    workers: int = 0
    interval: str = "jeffreys"
    split_errors: bool = False

    def __post_init__(self) -> None:
        if set(self.users_accuracy) != set(CHANGE_CLASSES):
            raise ValueError(f"users_accuracy={dict(self.users_accuracy)}: give exactly the classes {CHANGE_CLASSES}")
        if not all(0 <= float(v) <= 1 for v in self.users_accuracy.values()):
            raise ValueError(f"users_accuracy={dict(self.users_accuracy)}: values must lie in [0, 1]")
        check_assess_options(self)
        self.sampling()  # strata, target_se, minimums, n_total, block_rows: checked there

    def sampling(self) -> SampleConfig:
        """The sampler's settings (no buffer stratum; the user's accuracies go to ``plan_design`` directly)."""
        return SampleConfig(strata=self.strata, buffer_m=0.0, target_se=self.target_se, min_rare=self.min_rare,
                            min_common=self.min_common, n_total=self.n_total, seed=self.seed, block_rows=self.block_rows)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["users_accuracy"] = {k: float(self.users_accuracy[k]) for k in CHANGE_CLASSES}
        return doc


@dataclass(frozen=True)
class ChangeCensus:
    """The census of one domain: ``confusion_m2[i, j]`` = area mapped as change class i whose true class is j."""

    pixels: int
    confusion_m2: np.ndarray

    def values(self) -> dict:
        """True overall accuracy, user's and producer's accuracy and area per class, and the mapped area (NaN where
        undefined)."""
        c = self.confusion_m2
        total = c.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            ua = np.diag(c) / c.sum(axis=1)
            pa = np.diag(c) / c.sum(axis=0)
        return {"overall_accuracy": float(np.trace(c) / total) if total > 0 else math.nan,
                "users_accuracy": dict(zip(CHANGE_CLASSES, ua.tolist())),
                "producers_accuracy": dict(zip(CHANGE_CLASSES, pa.tolist())),
                "area": dict(zip(CHANGE_CLASSES, c.sum(axis=0).tolist())),
                "mapped_area_m2": dict(zip(CHANGE_CLASSES, c.sum(axis=1).tolist()))}


@dataclass(frozen=True)
class ChangeAssessReport:
    """What :func:`run_change_assess` found and wrote.

    ``status``: ``done`` or ``awaiting_labels`` (the two-date labelling sheet was written; rerun with it filled).
    ``points``: every sample point with ``ref_class`` (the reference change class; None while awaiting a label),
    ``ref_before``/``ref_after`` (the land class at each date where labelled from the references) and
    ``ref_source`` (``reference``/``labels``). ``census``: ``national``/``region`` -> name -> census, or None.
    """

    products: Path
    status: str
    out_dir: Path
    config: dict
    design: SampleDesign
    points: pd.DataFrame
    national: DomainResult
    regions: dict[str, DomainResult]
    census: dict[str, dict[str, ChangeCensus]] | None
    skipped: dict[str, str]
    files: dict[str, Path]
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The ``report.json`` document."""
        return report_json(self)


# ---------------------------------------------------------------------------------------------------------------
# inputs: references, change maps, the design


@dataclass
class _Inputs:
    """The scanned change maps, the design and what labels points (shared by the assessment and the coverage)."""

    rows: list[dict]
    scans: list[CityStrata]
    design: SampleDesign
    labellers: dict[str, tuple[LandLabeller, LandLabeller]]  # city -> (before, after), in the city grid's CRS
    skipped: dict[str, str]
    warnings: list[str]


def _city_rows(cities: Sequence[Mapping]) -> list[dict]:
    rows, seen = [], set()
    for i, c in enumerate(cities):
        name = str(c.get("city") or "")
        if not name:
            raise ValueError(f"cities[{i}] has no 'city'")
        if name in seen:
            raise ValueError(f"city {name!r} is listed twice")
        seen.add(name)
        rows.append({"city": name, "region": str(c.get("region") or ""),
                     **{k: c.get(k) for k in ("reference_before", "reference_after", "imagery_before", "imagery_after")}})
    return rows


def _load_references(rows: list[dict], use: bool) -> tuple[dict[str, tuple], dict[str, str]]:
    """city -> (before, after) polygons where both are given (each file read once); city -> why a given reference
    cannot be used (the city is then skipped, never silently sent to the sheet)."""
    cache: dict[str, object] = {}
    out, bad = {}, {}
    for row in rows:
        paths = [row.get("reference_before"), row.get("reference_after")]
        loaded = []
        for path in paths:
            if not path:
                loaded.append(None)
                continue
            key = str(path)
            if key not in cache:
                try:
                    cache[key] = load_reference(path)
                except ValueError as exc:
                    cache[key] = str(exc)
            loaded.append(cache[key])
        errors = [x for x in loaded if isinstance(x, str)]
        if errors:
            bad[row["city"]] = errors[0]
        elif use and all(x is not None for x in loaded):
            out[row["city"]] = tuple(loaded)
    return out, bad


def change_truth_strips(before, after, grid: CityGrid) -> TruthStrip:
    """``(y0, y1) -> uint8 change codes`` of those rows of the city's change grid: both references rasterised there
    (:func:`engine.accuracy.reference.truth_strips`, pixel centres) and crossed (:func:`change_code`)."""
    tb, ta = truth_strips(before, grid), truth_strips(after, grid)
    return lambda y0, y1: change_code(tb(y0, y1) == UV_LAND, ta(y0, y1) == UV_LAND)


def _scan(products_dir: Path, row: dict, cfg: ChangeAssessConfig, references: dict) -> CityStrata | str:
    """The city's first pass, or why it is skipped (never raises)."""
    city = row["city"]
    try:
        path = city_folder(products_dir, city) / CHANGE_TIF
        if not path.is_file():
            return f"no {CHANGE_TIF} at {path}"
        grid = open_city_grid(path, city, row["region"], CHANGE_CLASSES, strata_are_classes=True)
        if grid.nodata != CHANGE_NODATA:
            raise ValueError(f"{path}: nodata is {grid.nodata}, a change map's is {CHANGE_NODATA}")
        truth = change_truth_strips(*references[city], grid) if cfg.census and city in references else None
        return scan_city(grid, 0.0, cfg.block_rows, truth, truth_classes=len(CHANGE_CLASSES))
    except Exception as exc:  # noqa: BLE001 (one city never stops the others)
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        return f"{type(exc).__name__}: {exc}{where}"


def _prepare(products_dir: Path, cities: Sequence[Mapping], cfg: ChangeAssessConfig) -> _Inputs:
    rows_all = _city_rows(cities)
    references, skipped = _load_references(rows_all, cfg.use_reference)
    rows = [r for r in rows_all if r["city"] not in skipped]
    scans: list[CityStrata] = []
    workers = max(1, min(cfg.workers or min(4, os.cpu_count() or 1), len(rows) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row, outcome in zip(rows, pool.map(lambda r: _scan(products_dir, r, cfg, references), rows)):
            if isinstance(outcome, str):
                skipped[row["city"]] = outcome
            else:
                scans.append(outcome)
    if not scans:
        raise ValueError(f"products {products_dir}: no city has a readable {CHANGE_TIF}: "
                         f"{'; '.join(f'{c}: {w}' for c, w in skipped.items())}")
    warnings = []
    if skipped:
        warnings.append(f"{len(skipped)} of {len(rows_all)} cities skipped (see skipped_cities): the estimates describe "
                        f"the {len(scans)} others only and are not national")
    design = plan_design(scans, cfg.sampling(), classes=CHANGE_CLASSES, users_accuracy=cfg.users_accuracy,
                         rare_strata=RARE_CHANGE)
    labellers = {s.grid.city: (LandLabeller(references[s.grid.city][0], s.grid.crs),
                               LandLabeller(references[s.grid.city][1], s.grid.crs))
                 for s in scans if s.grid.city in references}
    return _Inputs([r for r in rows if r["city"] in {s.grid.city for s in scans}], scans, design, labellers, skipped,
                   warnings)


def label_change(points: pd.DataFrame, labellers: Mapping[str, tuple[LandLabeller, LandLabeller]]) -> pd.DataFrame:
    """``ref_before``, ``ref_after`` (land class at each date) and ``ref_class`` (the change class) of every point
    of a city with labellers (``x``/``y`` in the city grid's CRS); None elsewhere. Vectorised per city."""
    n = len(points)
    before = np.full(n, None, dtype=object)
    after = np.full(n, None, dtype=object)
    change = np.full(n, None, dtype=object)
    land = np.array(LAND_CLASSES, dtype=object)
    for city, pos in pd.Series(np.arange(n)).groupby(points["city"].to_numpy()):
        if city not in labellers:
            continue
        pos = pos.to_numpy()
        x, y = points["x"].to_numpy()[pos], points["y"].to_numpy()[pos]
        b, a = (lab.codes(x, y) for lab in labellers[city])
        before[pos], after[pos] = land[b], land[a]
        change[pos] = np.array(CHANGE_CLASSES, dtype=object)[change_code(b == UV_LAND, a == UV_LAND)]
    return pd.DataFrame({"ref_before": before, "ref_after": after, "ref_class": change}, index=points.index)


# ---------------------------------------------------------------------------------------------------------------
# estimates


def _domains(design: SampleDesign, scans: list[CityStrata]) -> dict[tuple[str, str], list[str]]:
    """(level, name) -> the cities of the nation and of each region."""
    out = {("national", "national"): None}
    for region in sorted({s.grid.region for s in scans}):
        out[("region", region)] = [s.grid.city for s in scans if s.grid.region == region]
    return out


@dataclass(frozen=True)
class _Domain:
    """A domain's strata (their rows of the design's count cube and their sizes) and its mapped area per class."""

    level: str
    name: str
    rows: list[int]
    sizes: dict[str, float]
    mapped: dict[str, float]


def _domain(design: SampleDesign, level: str, name: str, cities: list[str] | None) -> _Domain:
    cells = design.cells if cities is None else design.cells[design.cells["city"].isin(cities)]
    sizes = cells.groupby("stratum", sort=False)["area_m2"].sum()
    by = cells.groupby("map_stratum")["area_m2"].sum()
    index = {h: i for i, h in enumerate(design.strata["stratum"])}
    return _Domain(level, name, [index[h] for h in sizes.index], {str(h): float(v) for h, v in sizes.items()},
                   {c: float(by.get(c, 0.0)) for c in CHANGE_CLASSES})


def estimate_change_domain(cube: np.ndarray, design: SampleDesign, level: str, name: str, cities: list[str] | None,
                           cfg: ChangeAssessConfig) -> DomainResult:
    """Stehman (2014) estimates of the change classes for the cities ``cities`` (None: all) from the design's count
    cube ``cube[h, i, j]`` (strata in ``design.strata`` order, map and reference change class).

    The nation and the regions are made of whole strata (with city strata, a region is the union of its cities'),
    so this is the design's own estimator.
    """
    return _estimate(cube, _domain(design, level, name, cities), cfg)


def _estimate(cube: np.ndarray, domain: _Domain, cfg: ChangeAssessConfig) -> DomainResult:
    level, name, mapped = domain.level, domain.name, domain.mapped
    if not domain.rows:
        return DomainResult(level, name, "no_mapped_area", 0, mapped, note="no valid pixel in the change maps")
    sub = cube[domain.rows]
    n_h = sub.sum(axis=(1, 2))
    n = int(n_h.sum())
    thin = [(h, int(k)) for h, k in zip(domain.sizes, n_h) if k < cfg.min_domain_samples]
    if thin:
        parts = ", ".join(f"{h} ({k} points)" for h, k in thin)
        return DomainResult(level, name, "too_few_samples", n, mapped,
                            note=f"too few samples for an estimate: {parts} need at least {cfg.min_domain_samples} "
                                 f"points each")
    result = estimates_from_counts(sub, domain.sizes, CHANGE_CLASSES, fpc=cfg.fpc, interval=cfg.interval,
                                   split_errors=cfg.split_errors)
    return DomainResult(level, name, "estimated", n, mapped, result, flags=degenerate_flags(result))


def _cube(points: pd.DataFrame, design: SampleDesign) -> np.ndarray:
    return count_cube(points[["stratum", "map_class", "ref_class"]], list(design.strata["stratum"]), CHANGE_CLASSES)


def census_tables(scans: list[CityStrata]) -> dict[str, dict[str, ChangeCensus]]:
    """Census confusion (m2, map x true change class) per region and nationally; a region (or the nation) gets one
    only when every one of its cities has one."""
    out: dict[str, dict[str, ChangeCensus]] = {"national": {}, "region": {}}
    groups = {("national", "national"): scans}
    for region in sorted({s.grid.region for s in scans}):
        groups[("region", region)] = [s for s in scans if s.grid.region == region]
    for (level, name), members in groups.items():
        if members and all(s.census is not None for s in members):
            out[level][name] = ChangeCensus(int(sum(int(s.census.sum()) for s in members)),
                                            np.sum([s.census_area_m2 for s in members], axis=0))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the assessment


def run_change_assess(products_dir: str | os.PathLike[str], cities: Sequence[Mapping],
                      cfg: ChangeAssessConfig = ChangeAssessConfig(),
                      reference_labels: str | os.PathLike[str] | None = None,
                      say: Callable[[str], None] | None = None) -> ChangeAssessReport:
    """Assess a change run's ``cities/<city>/change.tif``; write ``<products_dir>/accuracy/``.

    Args:
        products_dir: ``products/<change-run>``.
        cities: one dict per city: ``city``, ``region``, ``reference_before``, ``reference_after`` (reference polygon
            files with a ``class`` column, or None), ``imagery_before``, ``imagery_after`` (for the labelling sheet).
        cfg: the assessment's settings.
        reference_labels: a filled labelling sheet (``id``, ``label`` one of the change classes); its labels override
            the references for the points it names, and every point without references must be in it.
        say: progress messages.

    Returns:
        The :class:`ChangeAssessReport` (``status`` ``awaiting_labels`` when points still need labels: the two-date
        sheet was written and no estimates were made).

    Raises:
        ValueError: no city has a readable change map; a city listed twice.
        engine.accuracy.AccuracyInputError: a bad labels file (naming the file and line).

    Example::

        report = run_change_assess("ws/products/change-2019-2023", [{"city": "wuhan", "region": "central",
            "reference_before": "ref2019.parquet", "reference_after": "ref2023.parquet",
            "imagery_before": "2019.tif", "imagery_after": "2023.tif"}])
        report.national.result.area["demolished_uv"]          # Estimate(estimate, se, ci95) in m2
    """
    say = say or (lambda _msg: None)
    products_dir = Path(products_dir)
    out_dir = products_dir / ACCURACY_DIR
    say(f"change accuracy: scanning {len(cities)} change maps")
    inputs = _prepare(products_dir, cities, cfg)
    design, warnings = inputs.design, list(inputs.warnings)
    say(f"change accuracy: {design.n_total} points in {len(design.strata)} strata")
    points = draw_sample(inputs.scans, design)
    stamp = _timestamp(products_dir)
    points, sheet_files = _reference(points, inputs, cfg, reference_labels, out_dir, warnings, stamp)
    status = "awaiting_labels" if points["ref_class"].isna().any() else "done"

    domains = _domains(design, inputs.scans)
    results = {}
    if status == "done":
        cube = _cube(points, design)
        for (level, name), members in domains.items():
            results[(level, name)] = estimate_change_domain(cube, design, level, name, members, cfg)
        national = results[("national", "national")]
        warnings += [f"national: {w}" for w in (national.result.warnings if national.result else ()) + national.flags]
    else:
        for (level, name), members in domains.items():
            n = len(points) if members is None else int(points["city"].isin(members).sum())
            results[(level, name)] = DomainResult(level, name, "awaiting_labels", n,
                                                  _domain(design, level, name, members).mapped)
    census = census_tables(inputs.scans) if any(s.census is not None for s in inputs.scans) else None

    files = {"report_json": out_dir / REPORT_JSON, "report_md": out_dir / REPORT_MD, "samples_gpkg": out_dir / "samples.gpkg",
             **{f"sheet_{k}": p for k, p in sheet_files.items()}}
    if status == "done":
        files.update({"samples_csv": out_dir / "samples.csv", "strata_csv": out_dir / "strata.csv"})
    report = ChangeAssessReport(products=products_dir, status=status, out_dir=out_dir, config=cfg.to_json(), design=design,
                                points=points, national=results[("national", "national")],
                                regions={name: r for (level, name), r in results.items() if level == "region"},
                                census=census, skipped=dict(inputs.skipped), files=files, warnings=tuple(warnings))
    write_samples(points, out_dir, stamp)
    if status == "done":
        write_tables(points, design, out_dir)
    doc = report.to_json()
    with atomic_path(out_dir / REPORT_MD) as tmp:
        tmp.write_text(report_markdown(doc))
    with atomic_path(out_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    say(f"change accuracy: {status}; wrote {out_dir}")
    return report


def _timestamp(products_dir: Path) -> str:
    """The GeoPackages' last_change: the run's start (``run.json``), so a rerun writes the same bytes; else empty."""
    try:
        return str(json.loads((products_dir / RUN_JSON).read_text()).get("datetime") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _reference(points: pd.DataFrame, inputs: _Inputs, cfg: ChangeAssessConfig,
               labels_csv: str | os.PathLike[str] | None, out_dir: Path, warnings: list[str],
               timestamp: str) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Points with ``ref_before``, ``ref_after``, ``ref_class``, ``ref_source``; writes the two-date labelling sheet
    for the points still without a label."""
    points = points.copy()
    refs = label_change(points, inputs.labellers)
    ref = refs["ref_class"].to_numpy(dtype=object).copy()
    source = np.where(pd.isna(ref), None, "reference").astype(object)
    if labels_csv is not None:
        labels = read_labels(labels_csv, points, required=set(points["id"][pd.isna(ref)]), classes=CHANGE_CLASSES)
        lookup = dict(zip(labels["id"], labels["ref_land"]))
        named = points["id"].isin(lookup).to_numpy()
        ref[named] = points["id"][named].map(lookup).to_numpy()
        source[named] = "labels"
    points["ref_before"] = refs["ref_before"].to_numpy()
    points["ref_after"] = refs["ref_after"].to_numpy()
    points["ref_class"] = ref
    points["ref_source"] = source
    pending = pd.isna(ref)
    if not pending.any():
        return points, {}
    imagery = {r["city"]: (r.get("imagery_before"), r.get("imagery_after")) for r in inputs.rows}
    files, chip_warnings = export_label_sheet(points[pending], imagery, out_dir, cfg.chip_px, timestamp)
    warnings += chip_warnings
    warnings.append(f"{int(pending.sum())} points have no reference change class: fill {files['csv'].name} (label: one "
                    f"of {', '.join(CHANGE_CLASSES)}; each chip shows the before image left, the after image right) "
                    f"and run the assessment again with it")
    return points, files


# ---------------------------------------------------------------------------------------------------------------
# report.json and report.md


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _within(truth: float | None, est: Estimate | None) -> bool | None:
    if truth is None or est is None or math.isnan(truth) or math.isnan(est.ci95[0]):
        return None
    return bool(est.ci95[0] <= truth <= est.ci95[1])


def census_json(census: ChangeCensus, domain: DomainResult | None) -> dict:
    """Census values, and per estimate whether its 95% CI holds the census value (once estimated)."""
    v = census.values()
    doc = {"pixels": int(census.pixels), "overall_accuracy": _num(v["overall_accuracy"]),
           **{q: {k: _num(x) for k, x in v[q].items()} for q in ("users_accuracy", "producers_accuracy", "area",
                                                                 "mapped_area_m2")}}
    if domain is not None and domain.result is not None:
        r = domain.result
        within = {"overall_accuracy": _within(v["overall_accuracy"], r.overall_accuracy)}
        for q in ("area", "users_accuracy", "producers_accuracy"):
            for k in CHANGE_CLASSES:
                within[f"{q}.{k}"] = _within(v[q][k], getattr(r, q)[k])
        doc["within_ci95"] = within
    return doc


def report_json(report: ChangeAssessReport) -> dict:
    """The ``report.json`` document of a change assessment."""
    strata = report.design.strata
    pts = report.points
    labelled = pts[pts["ref_class"].notna()]
    errors = (labelled["map_class"] != labelled["ref_class"]).groupby(labelled["stratum"]).sum()
    done = report.status == "done"
    domains = {"national": {"national": report.national}, "region": report.regions}
    census = None
    if report.census is not None:
        census = {level: {name: census_json(c, domains[level].get(name)) for name, c in sorted(by.items())}
                  for level, by in report.census.items()}
        census["source"] = "the before and after reference polygons rasterised on each change grid (pixel centres)"
    cfg = report.design.config
    return {
        "kind": "change_accuracy",
        "products": report.products.name,
        "status": report.status,
        "classes": list(CHANGE_CLASSES),
        "area_unit": "m2",
        "config": report.config,
        "design": {
            "strata_by": cfg.strata, "seed": cfg.seed, "n_cochran": int(report.design.n_cochran),
            "n_total": int(report.design.n_total), "rare_strata": list(RARE_CHANGE),
            "strata": strata_json(strata, errors, done),
        },
        "reference": {"points_by_source": {str(k): int(v) for k, v in pts["ref_source"].value_counts().sort_index().items()},
                      "awaiting_labels": int(pts["ref_class"].isna().sum()),
                      "rule": "UV at the before reference and at the after reference (point in or on a polygon of "
                              "class urban_village): neither other, both persistent_uv, before only demolished_uv, "
                              "after only new_uv"},
        "interval": report.config.get("interval", "jeffreys"),
        "national": report.national.to_json(),
        "regions": {k: v.to_json() for k, v in sorted(report.regions.items())},
        "census": census,
        "skipped_cities": dict(sorted(report.skipped.items())),
        "files": files_json(report.files, report.out_dir),
        "warnings": list(report.warnings),
    }


def _km2(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:,.4f}"


def _ci(e: dict, fmt) -> str:
    return f"{fmt(e['estimate'])} ({fmt(e['ci95'][0])} - {fmt(e['ci95'][1])})"


def _truth(truth: float | None, inside: bool | None, fmt) -> str:
    if truth is None:
        return "n/a"
    return fmt(truth) + ("" if inside is None else (" (in CI)" if inside else " (outside CI)"))


def _domain_md(title: str, d: dict, census: dict | None) -> list[str]:
    out = [f"### {title}", ""]
    if d["status"] != "estimated":
        mapped = ", ".join(f"{k} {_km2(d['mapped_area_m2'].get(k))}" for k in CHANGE_CLASSES)
        return out + [f"{d['status'].replace('_', ' ')} ({d['n']} points){': ' + d['note'] if d.get('note') else ''}. "
                      f"Mapped km2: {mapped}.", ""]
    within = (census or {}).get("within_ci95") or {}
    c = census or {}
    out += [f"{d['n']} points. Overall accuracy {_ci(d['overall_accuracy'], _pct)}"
            + (f"; census {_truth(c.get('overall_accuracy'), within.get('overall_accuracy'), _pct)}" if census else "")
            + ".", "",
            "| change class | mapped (km2) | estimated area (km2) | SE | 95% CI | census |",
            "|---|---|---|---|---|---|"]
    for k in CHANGE_CLASSES:
        e = d["area"][k]
        out.append(f"| {k} | {_km2(d['mapped_area_m2'].get(k))} | {_km2(e['estimate'])} | {_km2(e['se'])} | "
                   f"{_km2(e['ci95'][0])} - {_km2(e['ci95'][1])} | "
                   f"{_truth((c.get('area') or {}).get(k), within.get(f'area.{k}'), _km2)} |")
    out += ["", "| change class | user's accuracy (95% CI) | census | producer's accuracy (95% CI) | census |",
            "|---|---|---|---|---|"]
    for k in CHANGE_CLASSES:
        ua, pa = d["users_accuracy"][k], d["producers_accuracy"][k]
        out.append(f"| {k} | {_ci(ua, _pct)} | {_truth((c.get('users_accuracy') or {}).get(k), within.get(f'users_accuracy.{k}'), _pct)} | "
                   f"{_ci(pa, _pct)} | {_truth((c.get('producers_accuracy') or {}).get(k), within.get(f'producers_accuracy.{k}'), _pct)} |")
    if d.get("flags"):
        out += [""] + [f"- {f}" for f in d["flags"]]
    return out + [""]


def report_markdown(doc: dict) -> str:
    """``report.md`` from the ``report.json`` document."""
    d = doc["design"]
    census = doc.get("census") or {}
    interval = ("the stratified Jeffreys posterior interval (never of zero width; docs/ACCURACY.md)"
                if doc["interval"] == "jeffreys" else "estimate +- 1.96 SE (Wald)")
    out = [f"# Change-area accuracy of `{doc['products']}`", "",
           f"Status: **{doc['status'].replace('_', ' ')}**. {d['n_total']} sample points (Cochran's size for the target "
           f"SE of overall accuracy: {d['n_cochran']}, plus at least {doc['config']['min_rare']} per "
           f"{', '.join(d['rare_strata'])} stratum and {doc['config']['min_common']} per other stratum), stratified by "
           f"{d['strata_by']} x mapped change class, seed {d['seed']}. Estimators: Stehman (2014) stratified ratio "
           f"estimators; 95% CI = {interval}. Reference change class: {doc['reference']['rule']}. Areas in km2 "
           f"(m2 in report.json, measured in EPSG:6933).", ""]
    if doc["status"] == "awaiting_labels":
        out += [f"**{doc['reference']['awaiting_labels']} points have no reference change class.** Label the points of "
                f"`samples_to_label.csv` (column `label`: {', '.join(CHANGE_CLASSES)}); each chip in `chips/` shows the "
                f"before image on the left and the after image on the right, the point in the yellow square. Then run "
                f"the change assessment again with the filled sheet.", ""]
    out += ["## Design", "", "| stratum | cities | mapped area (km2) | points | map != reference | unseen errors, km2 (95% bound) |",
            "|---|---|---|---|---|---|"]
    out += [f"| {s['stratum']} | {s['cities']} | {_km2(s['area_m2'])} | {s['n']} | "
            f"{'' if s['disagreements'] is None else s['disagreements']} | "
            f"{'' if s['unseen_error_bound_m2'] is None else '<= ' + _km2(s['unseen_error_bound_m2'])} |" for s in d["strata"]]
    out += ["", "## Estimates", ""]
    label = "national" if not doc["skipped_cities"] else f"{len(doc['skipped_cities'])} cities skipped (not national)"
    out += _domain_md(f"National ({label})" if label != "national" else "National", doc["national"],
                      census.get("national", {}).get("national"))
    for name, r in doc["regions"].items():
        out += _domain_md(f"Region {name}", r, census.get("region", {}).get(name))
    if doc["skipped_cities"]:
        out += ["## Skipped cities", ""] + [f"- {c}: {why}" for c, why in doc["skipped_cities"].items()] + [""]
    if doc["warnings"]:
        out += ["## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# coverage


def change_coverage(products_dir: str | os.PathLike[str], cities: Sequence[Mapping],
                    cfg: ChangeAssessConfig = ChangeAssessConfig(), replicates: int = 200,
                    seeds: Sequence[int] | None = None) -> dict:
    """How often the 95% CIs of a change assessment hold the census value, by redrawing its sample.

    The design of :func:`run_change_assess` (same ``cfg``) is drawn ``replicates`` times with seeds ``seeds``
    (default ``cfg.seed + 1 ... cfg.seed + replicates``); each draw's points are labelled from the two references
    and estimated exactly as the assessment does (:func:`estimate_change_domain`), nationally and per region, and
    compared with the census (both references rasterised on the change grids). The change maps are scanned once,
    their stratum codes kept in memory (one byte per pixel) and the references' STRtrees built once; a replicate
    only draws, labels and estimates.

    Every city needs both references (the census is the truth here).

    Returns:
        ``{"replicates", "seeds", "interval", "n_total", "n_map": {class: points mapped as it},
        "n_reference_mean": {class: mean points whose reference is it}, "census": {domain: {class: m2}},
        "national": {quantity: {class: {...}}}, "regions": {region: {quantity: {class: {...}}}},
        "zero_width_intervals", "not_estimated", "seconds"}`` where quantity is ``area``, ``users_accuracy``,
        ``producers_accuracy`` (and ``overall_accuracy`` with one entry ``all``) and each entry holds ``census``,
        ``coverage`` (share of estimated replicates whose CI holds the census), ``mean_estimate``,
        ``relative_bias`` (mean estimate / census - 1), ``mean_ci_width``, ``estimated`` (replicates with an
        estimate).

    Raises:
        ValueError: a city without both references (or skipped), or ``replicates`` < 1.
    """
    start = time.perf_counter()
    seeds = [cfg.seed + 1 + i for i in range(replicates)] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("replicates must be >= 1")
    cfg = replace(cfg, census=True, use_reference=True)
    inputs = _prepare(Path(products_dir), cities, cfg)
    missing = sorted({s.grid.city for s in inputs.scans} - set(inputs.labellers)) + sorted(inputs.skipped)
    if missing:
        why = {c: inputs.skipped.get(c, "no before and after reference") for c in missing}
        raise ValueError(f"coverage needs every city's change map and both references (the census): {why}")
    design = inputs.design
    census = census_tables(inputs.scans)
    domains = _domains(design, inputs.scans)
    truth = {key: census["national" if key[0] == "national" else "region"][key[1]].values() for key in domains}
    locator = MemoryLocator()
    quantities = ("area", "users_accuracy", "producers_accuracy")
    k = len(CHANGE_CLASSES)
    # est/lo/hi per domain, quantity x class (+ overall accuracy), replicate
    slots = [(q, c) for q in quantities for c in CHANGE_CLASSES] + [("overall_accuracy", "all")]
    rec = {key: np.full((len(seeds), len(slots), 3), np.nan) for key in domains}
    n_ref = np.zeros((len(seeds), k))
    not_estimated = dict.fromkeys(domains, 0)
    plans = {key: _domain(design, key[0], key[1], members) for key, members in domains.items()}
    for r, seed in enumerate(seeds):
        d = replace(design, config=replace(design.config, seed=seed))
        points = draw_sample(inputs.scans, d, locator)
        points["ref_class"] = label_change(points, inputs.labellers)["ref_class"].to_numpy()
        cube = _cube(points, design)
        n_ref[r] = cube.sum(axis=(0, 1))
        for key, plan in plans.items():
            res = _estimate(cube, plan, cfg).result
            if res is None:
                not_estimated[key] += 1
                continue
            for s, (q, c) in enumerate(slots):
                e = res.overall_accuracy if q == "overall_accuracy" else getattr(res, q)[c]
                rec[key][r, s] = (e.estimate, *e.ci95)

    def summary(key) -> dict:
        out: dict = {}
        values = rec[key]
        for s, (q, c) in enumerate(slots):
            t = truth[key]["overall_accuracy"] if q == "overall_accuracy" else truth[key][q][c]
            est, lo, hi = values[:, s, 0], values[:, s, 1], values[:, s, 2]
            ok = ~np.isnan(lo) & ~np.isnan(hi)
            entry = {"census": _num(t), "estimated": int(ok.sum())}
            if ok.any() and t is not None and not math.isnan(t):
                entry.update({"coverage": float(np.mean((lo[ok] <= t) & (t <= hi[ok]))),
                              "mean_estimate": float(np.mean(est[ok])),
                              "relative_bias": float(np.mean(est[ok]) / t - 1.0) if t else None,
                              "mean_ci_width": float(np.mean(hi[ok] - lo[ok]))})
            else:
                entry.update({"coverage": None, "mean_estimate": None, "relative_bias": None, "mean_ci_width": None})
            out.setdefault(q, {})[c] = entry
        return out

    zero = sum(int(np.sum(v[:, :, 2] - v[:, :, 1] <= 0)) for v in rec.values())
    n_map = design.strata.groupby("map_class")["n"].sum()
    return {
        "replicates": len(seeds),
        "seeds": [seeds[0], seeds[-1]] if seeds == list(range(seeds[0], seeds[0] + len(seeds))) else seeds,
        "interval": cfg.interval,
        "n_total": int(design.n_total),
        "n_map": {c: int(n_map.get(c, 0)) for c in CHANGE_CLASSES},
        "n_reference_mean": dict(zip(CHANGE_CLASSES, n_ref.mean(axis=0).tolist())),
        "census": {("national" if key[0] == "national" else key[1]): {c: _num(truth[key]["area"][c]) for c in CHANGE_CLASSES}
                   for key in domains},
        "national": summary(("national", "national")),
        "regions": {key[1]: summary(key) for key in domains if key[0] == "region"},
        "zero_width_intervals": zero,
        "not_estimated": {("national" if key[0] == "national" else key[1]): v for key, v in not_estimated.items()},
        "seconds": round(time.perf_counter() - start, 3),
    }
