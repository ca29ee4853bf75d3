"""The assessment's results (:class:`AssessReport`) and their files: JSON, Markdown, charts, sample points.

Why everything derives from one JSON document: ``report.json`` is the record; the Markdown tables and the charts
are drawn from it alone (:func:`report_markdown`, :func:`write_charts`), so the three can never disagree and a
report can be redrawn from the JSON without the products.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from matplotlib.figure import Figure

from engine.accuracy.estimators import AccuracyResult, AreaRatio, Estimate
from engine.accuracy.sampling import ASSESS_CLASSES, BUILT_UP, LAND_CLASSES, OTHER_CLASS, UV_CLASS, SampleDesign
from engine.atomic import atomic_path
from engine.gpkg import write_gpkg

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PNG = "accuracy_by_region.png"
AREA_PNG = "uv_area_by_region.png"
SAMPLES_GPKG = "samples.gpkg"
SAMPLES_LAYER = "samples"
SAMPLES_CSV = "samples.csv"  # assess-table input: stratum,map_class,ref_class (+ id, city, region, lon, lat)
STRATA_CSV = "strata.csv"  # assess-table input: stratum,size (m2)
QUANTITIES = ("overall_accuracy", "users_accuracy", "producers_accuracy", "area")
HEADLINE = ("uv_area_m2", "built_up_area_m2", "uv_share_of_built_up")  # the report.json "headline" quantities
INTERVAL_TEXT = {
    "jeffreys": "95% CI = the stratified Jeffreys posterior interval (never of zero width; see docs/ACCURACY.md)",
    "wald": "95% CI = estimate +- 1.96 SE (Wald)",
}


@dataclass(frozen=True)
class DomainResult:
    """Estimates for one domain (the nation, a region or a city), or why there are none.

    ``status``: ``estimated``; ``too_few_samples`` (a stratum part of the domain has fewer points than the
    minimum, ``note`` says which); ``no_mapped_area`` (no valid pixel); ``awaiting_labels``.
    """

    level: str
    name: str
    status: str
    n: int
    mapped_area_m2: dict[str, float]
    result: AccuracyResult | None = None
    note: str = ""
    flags: tuple[str, ...] = ()  # estimates whose CI is degenerate (SE 0 at 0 or 1): see degenerate_flags
    land: AreaRatio | None = None  # UV area, built-up area and the UV share of built-up land (when estimated)
    mapped_built_up_m2: float | None = None  # area of the map's built-up classes (None: the map has none)

    def to_json(self) -> dict:
        """``assess-table``'s R.json keys (when estimated), then status, mapped areas, the note and the flags."""
        doc = self.result.to_json() if self.result is not None else {"n": self.n}
        doc.update({"status": self.status, "mapped_area_m2": {k: float(v) for k, v in self.mapped_area_m2.items()}})
        if self.note:
            doc["note"] = self.note
        if self.flags:
            doc["flags"] = list(self.flags)
        return doc


def degenerate_flags(result: AccuracyResult) -> tuple[str, ...]:
    """Estimates at exactly 0 or 1 with SE 0: the sample holds no error of that kind.

    Why flag them: the linearised SE cannot express the uncertainty of an error too rare to be sampled (e.g. UV
    omitted far from any mapped UV, in a large ``other`` stratum with a few dozen points). With the Wald interval the
    CI is then a single point; the Jeffreys interval (the default) still has a width, which then rests on the prior
    rather than on a sampled error (bench/accuracy_coverage.py measures how often either covers the truth).
    """
    out = []
    named = [("overall accuracy", result.overall_accuracy)] + [
        (f"{what} of {k}", d[k]) for what, d in (("user's accuracy", result.users_accuracy),
                                                 ("producer's accuracy", result.producers_accuracy)) for k in result.classes]
    for name, e in named:
        if e.se == 0 and e.estimate in (0.0, 1.0):
            if result.interval == "wald":
                why = "the Wald 95% CI is a single point and understates the uncertainty"
            else:
                lo, hi = e.ci95
                why = (f"its 95% CI {lo:.3g}-{hi:.3g} (Jeffreys) rests on the prior, not on a sampled error")
            out.append(f"{name} is {e.estimate:g} with SE 0: no sampled error of this kind; {why} (more points in "
                       f"the other strata would test it)")
    return tuple(out)


@dataclass(frozen=True)
class Census:
    """The census of one domain: ``confusion_m2[i, j]`` = area with map class i (ASSESS_CLASSES) and true land
    class j (LAND_CLASSES: other, urban village, other built-up land)."""

    pixels: int
    confusion_m2: np.ndarray

    def values(self) -> dict:
        """True overall/user's/producer's accuracy, true/mapped area per class, true built-up area and the true UV
        share of built-up land (NaN where undefined)."""
        land = self.confusion_m2
        c = np.stack([land[:, [LAND_CLASSES.index(k) for k in LAND_CLASSES if k != UV_CLASS]].sum(axis=1),
                      land[:, LAND_CLASSES.index(UV_CLASS)]], axis=1)  # (map, ref) in ASSESS_CLASSES order
        total = c.sum()
        uv = float(land[:, LAND_CLASSES.index(UV_CLASS)].sum())
        built = uv + float(land[:, LAND_CLASSES.index(BUILT_UP)].sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            ua = np.diag(c) / c.sum(axis=1)
            pa = np.diag(c) / c.sum(axis=0)
        return {
            "overall_accuracy": float(np.trace(c) / total) if total > 0 else math.nan,
            "users_accuracy": dict(zip(ASSESS_CLASSES, ua.tolist())),
            "producers_accuracy": dict(zip(ASSESS_CLASSES, pa.tolist())),
            "area": dict(zip(ASSESS_CLASSES, c.sum(axis=0).tolist())),
            "mapped_area_m2": dict(zip(ASSESS_CLASSES, c.sum(axis=1).tolist())),
            "built_up_area": built,
            "uv_share_of_built_up": uv / built if built > 0 else math.nan,
        }


def _unseen_bound(errors: int, n: int, area_m2: float) -> float | None:
    """Where a stratum's ``n`` points show no error: the one-sided 95% upper bound of the area its errors may cover,
    ``(1 - 0.05^(1/n)) x area`` (about ``3/n`` of it, the "rule of three"); None where errors were sampled."""
    if errors or n == 0:
        return None
    return (1.0 - 0.05 ** (1.0 / n)) * area_m2


def _num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def census_json(census: Census, domain: DomainResult | None) -> dict:
    """Census values, and per estimate whether its 95% CI holds the census value (when the domain was estimated)."""
    v = census.values()
    doc = {"pixels": int(census.pixels),
           "overall_accuracy": _num(v["overall_accuracy"]),
           "users_accuracy": {k: _num(x) for k, x in v["users_accuracy"].items()},
           "producers_accuracy": {k: _num(x) for k, x in v["producers_accuracy"].items()},
           "area": {k: _num(x) for k, x in v["area"].items()},
           "mapped_area_m2": {k: _num(x) for k, x in v["mapped_area_m2"].items()},
           "built_up_area": _num(v["built_up_area"]),
           "uv_share_of_built_up": _num(v["uv_share_of_built_up"])}
    if domain is not None and domain.result is not None:
        r = domain.result
        within = {}
        pairs = [("overall_accuracy", v["overall_accuracy"], r.overall_accuracy)] + [
            (f"{q}.{k}", v[q][k], getattr(r, q)[k]) for q in QUANTITIES[1:] for k in ASSESS_CLASSES]
        if domain.land is not None:
            pairs += [("built_up_area", v["built_up_area"], domain.land.denominator),
                      ("uv_share_of_built_up", v["uv_share_of_built_up"], domain.land.ratio)]
        for name, truth, est in pairs:
            within[name] = _within(truth, est)
        doc["within_ci95"] = within
    return doc


def _within(truth: float | None, est: Estimate | None) -> bool | None:
    if truth is None or est is None or math.isnan(truth) or math.isnan(est.ci95[0]):
        return None
    return bool(est.ci95[0] <= truth <= est.ci95[1])


def headline_json(domain: DomainResult, census: Census | None) -> dict:
    """The headline numbers of one domain: UV area, built-up area and the UV share of built-up land, each with
    the design-based estimate (``estimate``, ``se``, ``ci95``), the map's own value (``mapped``: pixel areas; None
    for built-up land where the map has no built-up class) and, where the truth is known, ``census`` and
    ``census_within_ci95``."""
    mapped_uv = domain.mapped_area_m2.get(UV_CLASS)
    built = domain.mapped_built_up_m2
    mapped = {"uv_area_m2": mapped_uv, "built_up_area_m2": built,
              "uv_share_of_built_up": mapped_uv / built if built and mapped_uv is not None else None}
    est: dict[str, Estimate] = {}
    if domain.result is not None and domain.land is not None:
        est = {"uv_area_m2": domain.result.area[UV_CLASS], "built_up_area_m2": domain.land.denominator,
               "uv_share_of_built_up": domain.land.ratio}
    truth = {}
    if census is not None:
        v = census.values()
        truth = {"uv_area_m2": v["area"][UV_CLASS], "built_up_area_m2": v["built_up_area"],
                 "uv_share_of_built_up": v["uv_share_of_built_up"]}
    doc: dict = {"status": domain.status, "n": int(domain.n)}
    for q in HEADLINE:
        e = est.get(q)
        entry = e.to_json() if e is not None else {"estimate": None, "se": None, "ci95": [None, None]}
        entry["mapped"] = _num(mapped[q])
        entry["census"] = _num(truth.get(q))
        entry["census_within_ci95"] = _within(truth.get(q), e)
        doc[q] = entry
    return doc


@dataclass(frozen=True)
class AssessReport:
    """What :func:`engine.accuracy.assess.run_assess` found and wrote.

    ``status``: ``done``, or ``awaiting_labels`` (points lack a reference: the labelling sheet was written, rerun
    with the filled sheet). ``points``: every sample point with ``ref_class`` (None while awaiting labels) and
    ``ref_source`` (``catalog``/``labels``). ``census``: level (``national``/``region``/``city``) -> name -> census,
    where the catalog reference gives the truth; None otherwise.
    """

    run: str
    model_version: str
    status: str
    out_dir: Path
    config: dict
    design: SampleDesign
    points: pd.DataFrame
    national: DomainResult
    regions: dict[str, DomainResult]
    cities: dict[str, DomainResult]
    census: dict[str, dict[str, Census]] | None
    skipped: dict[str, str]
    files: dict[str, Path]
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        """The ``report.json`` document."""
        strata = self.design.strata
        labelled = self.points[self.points["ref_class"].notna()] if "ref_class" in self.points else self.points.iloc[:0]
        errors = (labelled["map_class"] != labelled["ref_class"]).groupby(labelled["stratum"]).sum()
        census = None
        domains = {"national": {"national": self.national}, "region": self.regions, "city": self.cities}
        if self.census is not None:
            census = {level: {name: census_json(c, domains[level].get(name)) for name, c in sorted(by_name.items())}
                      for level, by_name in self.census.items()}
            census["source"] = "catalog reference polygons rasterised on each class grid (pixel centres)"

        def truth(level: str, name: str) -> Census | None:
            return None if self.census is None else self.census.get(level, {}).get(name)

        interval = self.config.get("interval", "jeffreys")
        headline = {
            "units": {"uv_area_m2": "m2", "built_up_area_m2": "m2", "uv_share_of_built_up": "fraction"},
            "interval": interval,
            "built_up": "reference: points in a polygon (or labelled) urban_village or another built-up class "
                        "(engine.schema.BUILT_UP_CLASSES, or built_up); mapped: the map's built-up classes, null "
                        "for a map without any (a binary UV map)",
            "national": headline_json(self.national, truth("national", "national")),
            "regions": {k: headline_json(v, truth("region", k)) for k, v in sorted(self.regions.items())},
            "cities": {k: headline_json(v, truth("city", k)) for k, v in sorted(self.cities.items())},
        }
        source = self.points["ref_source"].value_counts().to_dict() if "ref_source" in self.points else {}
        return {
            "run": self.run,
            "model_version": self.model_version,
            "status": self.status,
            "classes": list(ASSESS_CLASSES),
            "area_unit": "m2",
            "config": self.config,
            "design": {
                "strata_by": self.design.config.strata,
                "buffer_m": self.design.config.buffer_m,
                "seed": self.design.config.seed,
                "n_cochran": int(self.design.n_cochran),
                "n_total": int(self.design.n_total),
                "strata": strata_json(strata, errors, self.status == "done"),
            },
            "reference": {"points_by_source": {str(k): int(v) for k, v in source.items()},
                          "awaiting_labels": int(self.points["ref_class"].isna().sum()) if "ref_class" in self.points else 0,
                          "land_classes": list(LAND_CLASSES)},
            "interval": interval,
            "headline": headline,
            "national": self.national.to_json(),
            "regions": {k: v.to_json() for k, v in sorted(self.regions.items())},
            "cities": {k: v.to_json() for k, v in sorted(self.cities.items())},
            "census": census,
            "skipped_cities": dict(sorted(self.skipped.items())),
            "files": files_json(self.files, self.out_dir),
            "warnings": list(self.warnings),
        }


def strata_json(strata: pd.DataFrame, errors: pd.Series, done: bool) -> list[dict]:
    """``report.json``'s strata (an assessment's and a change assessment's alike): size, sample, and once the
    labels are in, the disagreements sampled and the bound on the error area no sample saw."""
    return [{"stratum": r.stratum, "unit": r.unit, "map_stratum": r.map_stratum, "cities": int(r.cities),
             "pixels": int(r.pixels), "area_m2": float(r.area_m2), "n": int(r.n),
             "disagreements": int(errors.get(r.stratum, 0)) if done else None,
             "unseen_error_bound_m2": _unseen_bound(int(errors.get(r.stratum, 0)), int(r.n), float(r.area_m2)) if done else None}
            for r in strata.itertuples()]


def files_json(files: dict[str, Path], out_dir: Path) -> dict[str, str]:
    """The files an assessment wrote, relative to its ``accuracy/`` folder."""
    return {k: p.name if p.parent == out_dir else str(p.relative_to(out_dir)) for k, p in files.items()}


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ha(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e4:,.2f}"


def _est_row(label: str, e: dict, fmt, truth: float | None = None, with_truth: bool = False) -> str:
    lo, hi = e["ci95"]
    cells = [label, fmt(e["estimate"]), fmt(e["se"]), f"{fmt(lo)} - {fmt(hi)}"]
    if with_truth:
        inside = "" if truth is None or lo is None else (" (in CI)" if lo <= truth <= hi else " (outside CI)")
        cells.append(fmt(truth) + inside if truth is not None else "n/a")
    return "| " + " | ".join(cells) + " |"


def _domain_table(doc: dict, census: dict | None) -> list[str]:
    with_truth = census is not None
    head = "| quantity | estimate | SE | 95% CI |" + (" census |" if with_truth else "")
    out = [head, "|" + "---|" * (5 if with_truth else 4)]
    truth = census or {}
    out.append(_est_row("overall accuracy", doc["overall_accuracy"], _pct, truth.get("overall_accuracy"), with_truth))
    for q, name in (("users_accuracy", "user's accuracy"), ("producers_accuracy", "producer's accuracy")):
        for k in ASSESS_CLASSES:
            out.append(_est_row(f"{name}, {k}", doc[q][k], _pct, (truth.get(q) or {}).get(k), with_truth))
    for k in ASSESS_CLASSES:
        out.append(_est_row(f"area (ha), {k}", doc["area"][k], _ha, (truth.get("area") or {}).get(k), with_truth))
    mapped = doc["mapped_area_m2"]
    out.append(f"| mapped area (ha), {UV_CLASS} | {_ha(mapped.get(UV_CLASS))} | | |" + (" |" if with_truth else ""))
    return out


def _summary_table(kind: str, domains: dict, census: dict | None) -> list[str]:
    out = [f"| {kind} | n | overall accuracy | UA {UV_CLASS} | PA {UV_CLASS} | UV area, ha (95% CI) | mapped UV, ha |"
           + (" census: OA / UA / PA / UV ha |" if census else ""),
           "|" + "---|" * (8 if census else 7)]
    for name, d in domains.items():
        if d["status"] != "estimated":
            out.append(f"| {name} | {d['n']} | {d['status'].replace('_', ' ')} | | | | {_ha(d['mapped_area_m2'].get(UV_CLASS))} |"
                       + (" |" if census else ""))
            continue

        def ci(e: dict, f) -> str:
            return f"{f(e['estimate'])} ({f(e['ci95'][0])} - {f(e['ci95'][1])})"
        row = [name, str(d["n"]), ci(d["overall_accuracy"], _pct), ci(d["users_accuracy"][UV_CLASS], _pct),
               ci(d["producers_accuracy"][UV_CLASS], _pct), ci(d["area"][UV_CLASS], _ha),
               _ha(d["mapped_area_m2"].get(UV_CLASS))]
        if census:
            c = census.get(name)
            row.append("n/a" if c is None else " / ".join([_pct(c["overall_accuracy"]), _pct(c["users_accuracy"][UV_CLASS]),
                                                            _pct(c["producers_accuracy"][UV_CLASS]), _ha(c["area"][UV_CLASS])]))
        out.append("| " + " | ".join(row) + " |")
    return out


def overall_label(doc: dict) -> str:
    """The name of the all-cities domain: ``national`` only when no city was left out of the assessment."""
    skipped = len(doc.get("skipped_cities") or {})
    if not skipped:
        return "national"
    n = len(doc.get("cities") or {})
    return f"{n} of {n + skipped} cities (not national)"


def report_markdown(doc: dict) -> str:
    """``report.md`` from the ``report.json`` document: design, national/regional/city tables, census, warnings."""
    d = doc["design"]
    census = doc.get("census") or {}
    out = [f"# Accuracy assessment of run `{doc['run']}`", "",
           f"Model `{doc['model_version']}`. Status: **{doc['status'].replace('_', ' ')}**. "
           f"{d['n_total']} sample points (Cochran's size for the target SE of overall accuracy: {d['n_cochran']}), "
           f"stratified by {d['strata_by']} x map class" + (f" with a {d['buffer_m']:g} m buffer stratum" if d["buffer_m"] else "")
           + f", seed {d['seed']}. Estimators: Stehman (2014) stratified ratio estimators; "
           f"{INTERVAL_TEXT.get(doc.get('interval', 'wald'), doc.get('interval'))}. "
           f"Areas in hectares (m2 in report.json, measured in EPSG:6933).", ""]
    if doc["status"] == "awaiting_labels":
        labels = doc["reference"].get("land_classes") or doc["classes"]
        out += [f"**{doc['reference']['awaiting_labels']} points have no reference label.** Label the points of "
                f"`samples_to_label.csv` (column `label`: {', '.join(labels[:-1])} or {labels[-1]}; `{BUILT_UP}` is "
                f"built-up land that is not an urban village, `{OTHER_CLASS}` land that is not built-up; chips in "
                f"`chips/`), then run `geolink-engine assess --run {doc['run']} --reference samples_to_label.csv`.", ""]
    out += ["## Design", "", "Points whose reference class differs from the map class are counted per stratum. A stratum "
            "with none adds no variance, so an error too rare to be sampled there is invisible to every CI; the last "
            "column bounds the area such unseen errors may cover (one-sided 95%, about 3/n of the stratum).", "",
            "| stratum | cities | mapped area (ha) | points | map != reference | unseen errors, ha (95% bound) |",
            "|---|---|---|---|---|---|"]
    out += [f"| {s['stratum']} | {s['cities']} | {_ha(s['area_m2'])} | {s['n']} | "
            f"{'' if s.get('disagreements') is None else s['disagreements']} | "
            f"{'' if s.get('unseen_error_bound_m2') is None else '<= ' + _ha(s['unseen_error_bound_m2'])} |" for s in d["strata"]]
    out.append("")
    if doc["status"] == "done":
        heading = "National estimates" if overall_label(doc) == "national" else \
            f"Estimates over the assessed cities: {overall_label(doc)}, see Skipped cities"
        out += [f"## {heading}", ""] + _domain_table(doc["national"], census.get("national", {}).get("national")
                                                            if census else None)
        out += [""] + _headline_section(doc)
        out += ["", f"![user's and producer's accuracy by region]({ACCURACY_PNG})",
                f"![UV area by region]({AREA_PNG})", "", "## Regions", ""]
        out += _summary_table("region", doc["regions"], census.get("region") if census else None)
        out += ["", "## Cities", "", "Cities are domains of the regional strata (post-stratified); a city is estimated only "
                "where each of its stratum parts holds enough points.", ""]
        out += _summary_table("city", doc["cities"], census.get("city") if census else None)
        notes = [f"- {name}: {c['note']}" for name, c in doc["cities"].items() if c.get("note")]
        if notes:
            out += ["", "Not estimated:", ""] + notes
        flags = [f"- {name}: {f}" for name, d in [(overall_label(doc), doc["national"])] + list(doc["regions"].items())
                 + list(doc["cities"].items()) for f in d.get("flags", [])]
        if flags:
            out += ["", "## Estimates with no sampled error", ""] + flags
        out += [""] + _coverage_section(doc)
    if doc["skipped_cities"]:
        out += ["", "## Skipped cities", ""] + [f"- {c}: {why}" for c, why in doc["skipped_cities"].items()]
    if doc["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in doc["warnings"]]
    return "\n".join(out) + "\n"


def _share(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


HEADLINE_ROWS = (("uv_area_m2", "UV area (ha)", _ha), ("built_up_area_m2", "built-up area (ha)", _ha),
                 ("uv_share_of_built_up", "UV share of built-up land", _share))


def _headline_section(doc: dict) -> list[str]:
    """The design-based UV area, built-up area and UV share of built-up land beside the map's own (pixel) values and
    the census, nationally (a table) and per region and city (one row each)."""
    head = doc.get("headline")
    if not head:
        return []
    label = overall_label(doc)
    out = ["## UV area, built-up area and UV share of built-up land", "",
           "Design-based estimates from the sample's reference labels (built-up: urban villages and the other built-up "
           "classes) beside the map's own pixel areas; the share is a ratio of two estimated areas (SE by "
           "linearisation). Mapped built-up area is n/a where the map has no built-up class.", "",
           f"| {label} | estimate | SE | 95% CI | mapped | census |", "|---|---|---|---|---|---|"]
    nat = head["national"]
    for key, name, fmt in HEADLINE_ROWS:
        e = nat[key]
        inside = "" if e["census_within_ci95"] is None else (" (in CI)" if e["census_within_ci95"] else " (outside CI)")
        out.append(f"| {name} | {fmt(e['estimate'])} | {fmt(e['se'])} | {fmt(e['ci95'][0])} - {fmt(e['ci95'][1])} | "
                   f"{fmt(e['mapped'])} | {fmt(e['census']) + inside if e['census'] is not None else 'n/a'} |")
    for kind, key in (("region", "regions"), ("city", "cities")):
        if not head[key]:
            continue
        out += ["", f"| {kind} | n | UV area, ha (95% CI) | built-up, ha (95% CI) | UV share (95% CI) | "
                    f"mapped: UV ha / built-up ha / share | census: UV ha / built-up ha / share |", "|---|---|---|---|---|---|---|"]
        for name, d in head[key].items():
            cells = [name, str(d["n"])]
            for q, _, fmt in HEADLINE_ROWS:
                e = d[q]
                cells.append(d["status"].replace("_", " ") if e["estimate"] is None else
                             f"{fmt(e['estimate'])} ({fmt(e['ci95'][0])} - {fmt(e['ci95'][1])})")
            cells.append(" / ".join(fmt(d[q]["mapped"]) for q, _, fmt in HEADLINE_ROWS))
            cells.append(" / ".join(fmt(d[q]["census"]) for q, _, fmt in HEADLINE_ROWS))
            out.append("| " + " | ".join(cells) + " |")
    return out


def _coverage_section(doc: dict) -> list[str]:
    """What the intervals can promise here: the benchmark's coverage, and per region how many errors its sample
    found and how much land one point stands for, so a reader sees which regional intervals may fall short."""
    out = ["## Interval coverage", "",
           "In bench/accuracy_coverage.py (the default design drawn 2000 times on 12 synthetic cities with a model's "
           "typical errors) the national 95% CIs (Jeffreys) of overall, user's and producer's accuracy, UV area and UV "
           "share of built-up land held the census value 94-96% of the time. **Regional intervals may not reach 95% at "
           "the default sample size:** a region's `other` strata hold about 100 points, each standing for 1/n of "
           "their land, so omitted UV covering much less than that is found in few samples and then carries the whole "
           "estimate (in the benchmark, producer's accuracy covered 89% in a region whose omitted UV was 0.1% of its "
           "`other` land, and user's accuracy 92% in a region with 50 UV points and a user's accuracy of 94%; every "
           "other regional interval 94-98%). Where regional numbers matter, give the strata more points "
           "(`min_common` for omission, `min_rare` for commission) or assess with `strata=city`."]
    d = doc["design"]
    if doc["status"] != "done" or d["strata_by"] != "region":
        return out
    rows: dict[str, dict] = {}
    for st in d["strata"]:
        if st.get("disagreements") is None:
            continue
        r = rows.setdefault(st["unit"], {"n_other": 0, "area_other": 0.0, "omitted": 0, "n_uv": 0, "commission": 0})
        if st["map_stratum"] == UV_CLASS:
            r["n_uv"] += int(st["n"])
            r["commission"] += int(st["disagreements"])
        else:
            r["n_other"] += int(st["n"])
            r["area_other"] += float(st["area_m2"])
            r["omitted"] += int(st["disagreements"])
    out += ["", "Sampled errors per region: omitted UV found in the `other` strata (the basis of producer's accuracy, "
                "UV area and UV share) and commission found in the UV strata (user's accuracy). With none found an "
                "interval rests on the prior; with one or two, each point carries the whole estimate.", "",
            "| region | points in other strata | ha of other land per point | omitted UV found | points in UV strata | "
            "commission found | caveat |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items()):
        notes = []
        if r["omitted"] == 0:
            notes.append("no omission sampled: PA / UV area / share intervals rest on the prior")
        elif r["omitted"] <= 2:
            notes.append(f"PA / UV area / share rest on {r['omitted']} point(s): may undercover if the true omission is "
                         f"much less than one point's land")
        if r["n_uv"] and r["commission"] <= 2:
            notes.append(f"UA rests on {r['commission']} sampled commission error(s)")
        per_point = r["area_other"] / r["n_other"] / 1e4 if r["n_other"] else None
        out.append(f"| {name} | {r['n_other']} | {_ha(per_point * 1e4) if per_point is not None else 'n/a'} | {r['omitted']} | "
                   f"{r['n_uv']} | {r['commission']} | {'; '.join(notes)} |")
    return out


# ---------------------------------------------------------------------------------------------------------------
# charts


def _bars(ax, x: np.ndarray, entries: list[dict | None], offset: float, label: str, color: str) -> None:
    est = np.array([np.nan if e is None or e["estimate"] is None else e["estimate"] for e in entries])
    lo = np.array([np.nan if e is None or e["ci95"][0] is None else e["ci95"][0] for e in entries])
    hi = np.array([np.nan if e is None or e["ci95"][1] is None else e["ci95"][1] for e in entries])
    ax.errorbar(x + offset, est, yerr=[est - lo, hi - est], fmt="o", capsize=4, color=color, label=label)


def write_charts(doc: dict, out_dir: Path) -> dict[str, Path]:
    """Two PNGs from the report document: UA/PA of UV with 95% CI per region (and nationally); estimated UV area
    with 95% CI against the mapped (and, when known, the census) UV area per region."""
    names = [n for n, d in doc["regions"].items() if d["status"] == "estimated"] + ["national"]
    domains = [doc["regions"].get(n) if n != "national" else doc["national"] for n in names]
    census = doc.get("census") or {}
    truth = [(census.get("national", {}).get("national") if n == "national" else census.get("region", {}).get(n))
             for n in names]
    x = np.arange(len(names), dtype=float)
    paths = {}
    labels = [overall_label(doc) if n == "national" else n for n in names]

    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))  # object-oriented: no pyplot, no global state
    ax = fig.subplots()
    _bars(ax, x, [d["users_accuracy"][UV_CLASS] for d in domains], -0.12, "user's accuracy (UV)", "tab:blue")
    _bars(ax, x, [d["producers_accuracy"][UV_CLASS] for d in domains], 0.12, "producer's accuracy (UV)", "tab:orange")
    if any(t is not None for t in truth):
        for key, off, color in (("users_accuracy", -0.12, "tab:blue"), ("producers_accuracy", 0.12, "tab:orange")):
            values = [np.nan if t is None or t[key][UV_CLASS] is None else t[key][UV_CLASS] for t in truth]
            ax.scatter(x + off, values, marker="x", s=50, color=color, zorder=3)
        ax.scatter([], [], marker="x", color="k", label="census value")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Run {doc['run']}: accuracy of the urban-village class (95% CI)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["accuracy_chart"] = _save(fig, out_dir / ACCURACY_PNG)

    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    ax = fig.subplots()
    est = [{k: (v / 1e4 if v is not None else None) if k == "estimate" else
            ([c / 1e4 if c is not None else None for c in v] if k == "ci95" else v)
            for k, v in d["area"][UV_CLASS].items()} for d in domains]
    ax.bar(x - 0.15, [d["mapped_area_m2"].get(UV_CLASS, 0) / 1e4 for d in domains], width=0.3, color="tab:gray",
           label="mapped UV area")
    _bars(ax, x, est, 0.15, "estimated UV area (95% CI)", "tab:red")
    if any(t is not None for t in truth):
        ax.scatter(x + 0.15, [np.nan if t is None else t["area"][UV_CLASS] / 1e4 for t in truth], marker="x", s=50,
                   color="k", zorder=3, label="census UV area")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("area (ha)")
    ax.set_title(f"Run {doc['run']}: urban-village area, estimated vs mapped")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["area_chart"] = _save(fig, out_dir / AREA_PNG)
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


# ---------------------------------------------------------------------------------------------------------------
# files


def write_samples(points: pd.DataFrame, out_dir: Path, timestamp: str = "") -> Path:
    """``samples.gpkg``: every point (EPSG:4326) with its stratum, map class, reference class and source; stamped
    ``timestamp`` (the run's start), so the same sample gives the same bytes."""
    path = out_dir / SAMPLES_GPKG
    gdf = gpd.GeoDataFrame(points.reset_index(drop=True),
                           geometry=shapely.points(points["lon"].to_numpy(), points["lat"].to_numpy()), crs=4326)
    write_gpkg(gdf, path, SAMPLES_LAYER, timestamp)
    return path


def write_tables(points: pd.DataFrame, design: SampleDesign, out_dir: Path) -> dict[str, Path]:
    """``samples.csv`` and ``strata.csv`` in the ``assess-table`` format (sizes in m2; use ``--no-fpc``), so anyone can
    recompute the national estimates from the files alone (``ref_land`` also gives the built-up estimates:
    :func:`engine.accuracy.area_ratio_estimates`)."""
    cols = ["stratum", "map_class", "ref_class", "ref_land", "id", "city", "region", "lon", "lat"]
    cols = [c for c in cols if c in points.columns]
    paths = {"samples_csv": out_dir / SAMPLES_CSV, "strata_csv": out_dir / STRATA_CSV}
    with atomic_path(paths["samples_csv"]) as tmp:
        points[cols].to_csv(tmp, index=False, float_format="%.8f")
    with atomic_path(paths["strata_csv"]) as tmp:
        design.strata[["stratum", "area_m2"]].rename(columns={"area_m2": "size"}).to_csv(tmp, index=False, float_format="%.6f")
    return paths


def write_report(report: AssessReport) -> dict[str, Path]:
    """``report.json``, ``report.md`` and (once estimated) the charts; returns what was written."""
    doc = report.to_json()
    out = {}
    if report.status == "done":
        out.update(write_charts(doc, report.out_dir))
    with atomic_path(report.out_dir / REPORT_MD) as tmp:
        tmp.write_text(report_markdown(doc))
    out["report_md"] = report.out_dir / REPORT_MD
    with atomic_path(report.out_dir / REPORT_JSON) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    out["report_json"] = report.out_dir / REPORT_JSON
    return out
