"""``regions.csv`` and its chart: UV prevalence per region and nationally, the map's values beside the design-based
estimates, and the villages' building morphology; read back from the products folder after stitching and assessment.

Why a table of its own: GeoLink-UV's headline is regional (UVs cluster in central and south China, with regional
differences in how they are built). Per region and for the nation:

- map values: UV area (the polygons), UV share of built-up land (``class.tif`` pixels, as in ``city_stats.csv``),
  number of villages, the villages' median morphology (median over the region's villages of each per-village
  metric of ``urban_villages.parquet``);
- estimates (``accuracy/report.json``, when the run was assessed): UV area and UV share of built-up land with their
  95% confidence intervals, from the stratified sample (docs/ACCURACY.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from engine.atomic import atomic_path
from engine.product_layout import ACCURACY_DIR, REGIONS_CSV, REGIONS_PNG, UV_PARQUET, read_city_stats, write_csv

MEDIAN_METRICS = ("density_per_ha", "coverage_ratio", "footprint_median_m2", "height_mean_m", "levels_mean", "far", "nn_spacing_m")
ESTIMATES = ("uv_area_m2", "uv_share")
REGION_COLUMNS: tuple[str, ...] = (
    "level", "region", "cities", "uv_polygons", "uv_area_m2", "built_up_area_m2", "uv_share",
    *(f"{name}_{part}" for name in ESTIMATES for part in ("estimate", "ci95_low", "ci95_high")),
    *(f"median_{name}" for name in MEDIAN_METRICS),
)


def region_rows(products_dir: Path) -> list[dict]:
    """One row per region (sorted), then the national row: :data:`REGION_COLUMNS`."""
    products_dir = Path(products_dir)
    stats = [r for r in read_city_stats(products_dir) if r.get("status") == "done"]
    uv = pq.read_table(products_dir / UV_PARQUET, columns=["region", *MEDIAN_METRICS]) if (products_dir / UV_PARQUET).is_file() else None
    report = _read_report(products_dir)
    domains = [("region", region) for region in sorted({r["region"] for r in stats})] + [("national", "")]
    out = []
    for level, region in domains:
        rows = [r for r in stats if level == "national" or r["region"] == region]
        shares = [r for r in rows if r.get("built_up_area_m2")]
        built_up = sum(r["built_up_area_m2"] for r in shares)
        uv_mapped = sum((r["uv_share"] or 0.0) * r["built_up_area_m2"] for r in shares)
        row = {"level": level, "region": region, "cities": len(rows), "uv_polygons": sum(r.get("polygons") or 0 for r in rows),
               "uv_area_m2": sum(r.get("uv_area_m2") or 0.0 for r in rows),
               "built_up_area_m2": built_up if shares else None, "uv_share": uv_mapped / built_up if built_up > 0 else None}
        headline = report.get("headline") or {}
        domain = (headline.get("national") if level == "national" else (headline.get("regions") or {}).get(region)) or {}
        for name in ESTIMATES:
            est = _estimate(domain, name)
            row[f"{name}_estimate"], row[f"{name}_ci95_low"], row[f"{name}_ci95_high"] = est
        if uv is not None:
            mask = np.ones(uv.num_rows, bool) if level == "national" else (uv["region"].to_numpy(zero_copy_only=False) == region)
            for name in MEDIAN_METRICS:
                values = uv[name].to_numpy(zero_copy_only=False)[mask].astype(float)
                values = values[np.isfinite(values)]
                row[f"median_{name}"] = float(np.median(values)) if len(values) else None
        out.append(row)
    return out


def write_regions(products_dir: Path) -> tuple[Path, Path | None]:
    """``regions.csv`` (:data:`REGION_COLUMNS`) and ``regions.png`` (UV share by region with its 95% CI when the
    run was assessed; None when no region has a share)."""
    products_dir = Path(products_dir)
    rows = region_rows(products_dir)
    path = write_csv(products_dir / REGIONS_CSV, REGION_COLUMNS, rows)
    png = products_dir / REGIONS_PNG
    regions = [r for r in rows if r["level"] == "region" and r["uv_share"] is not None]
    if not regions:
        png.unlink(missing_ok=True)
        return path, None
    _figure(regions, next(r for r in rows if r["level"] == "national"), png)
    return path, png


def _figure(regions: list[dict], national: dict, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    x = np.arange(len(regions))
    ax.bar(x - 0.2, [r["uv_share"] for r in regions], width=0.4, color="#d95f02", label="map (pixels of class.tif)")
    est = [r["uv_share_estimate"] for r in regions]
    if any(v is not None for v in est):
        have = [i for i, v in enumerate(est) if v is not None]
        lo = [est[i] - regions[i]["uv_share_ci95_low"] for i in have]
        hi = [regions[i]["uv_share_ci95_high"] - est[i] for i in have]
        ax.bar(x[have] + 0.2, [est[i] for i in have], width=0.4, color="#7570b3", yerr=[lo, hi], capsize=3,
               label="estimate, 95% CI (stratified sample)")
    if national.get("uv_share") is not None:
        ax.axhline(national["uv_share"], color="k", lw=0.8, ls="--", label=f"national map value {national['uv_share']:.1%}")
    ax.set_xticks(x, [r["region"] for r in regions], rotation=30, ha="right")
    ax.set_ylabel("UV share of built-up land")
    ax.set_title("Urban villages by region")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def _read_report(products_dir: Path) -> dict:
    import json

    path = products_dir / ACCURACY_DIR / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _estimate(domain: dict, name: str) -> tuple[float | None, float | None, float | None]:
    """``(estimate, ci95 low, ci95 high)`` of UV area (m2) or UV share of built-up land from a domain of report.json's
    ``headline`` block (engine.accuracy.report); Nones when absent (not assessed, or no built-up reference)."""
    entry = domain.get("uv_area_m2" if name == "uv_area_m2" else "uv_share_of_built_up")
    if not isinstance(entry, dict) or entry.get("estimate") is None:
        return None, None, None
    low, high = (entry.get("ci95") or [None, None])[:2]
    return entry["estimate"], low, high
