"""How many people live in urban villages: a population model's tile values spread over the mapped classes.

`map --population-model DIR` predicts, per tile, the residents inside the tile's window (a regression model,
``finetune --task population``; engine.mapping.regress). This module turns those tile values into the products:

1. **densities** (:func:`fit_densities`): residents per m2 of urban village, of other built-up land and of the
   rest, fitted by non-negative least squares of every tile's value on its window's area of each class (the
   stitched ``class.tif``). Why: a tile value says how many people, not where in the tile; a UV pixel holds
   several times the people of an office block's (engine/synth/truth.py, and every census), and the fit learns
   that ratio from the model's own values over the whole run, with no census needed at map time. This is
   dasymetric mapping (Mennis 2003) with empirically fitted class densities.
2. **allocation** (:func:`allocate`): each tile's value spread over its window's pixels in proportion to their
   class density; a pixel's residents are taken from the tile whose core holds it (the cores partition the
   raster, so every resident is counted once and a tile's value is never counted twice).
3. the products (:func:`write_population`): ``cities/<city>/population_100m.tif`` (residents per cell of
   ``round(100 m / GSD)`` pixels), ``uv_population.parquet`` (residents per UV polygon) and ``population.csv``
   (per city, region and nation: population, UV population, UV share, each with a 95 % prediction interval from
   the model's held-out error: engine.training.calibration).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import rasterize
from rasterio.windows import Window
from scipy.optimize import nnls

from engine.atomic import atomic_path
from engine.geoparquet import write_geoparquet
from engine.imagery import ground_gsd_m
from engine.product_layout import (
    COGS,
    POPULATION_COG,
    POPULATION_CSV,
    POPULATION_PNG,
    UV_PARQUET,
    UV_POPULATION_PARQUET,
    city_folder,
    write_csv,
)
from engine.schema import POPULATION_COLUMNS, UV_POPULATION_SCHEMA
from engine.training.calibration import (
    calibration_factor,
    interval,
    prediction_factors,
    share_factors,
)

CELL_M = 100.0  # the population raster's cell side (ground metres), as WorldPop / GHS-POP publish
NODATA = -1.0  # population_100m.tif: a cell with a pixel no tile value reached (a failed tile)
GROUPS = ("urban_village", "built_up", "other")  # density groups; class.tif's nodata (255) weighs nothing
CLASS_NODATA = 255
LEVEL = 0.95


# --- pure pieces ---------------------------------------------------------------------------------------------------
def group_lut(classes: tuple[str, ...] | list[str], built_up: tuple[str, ...] | list[str]) -> np.ndarray:
    """uint8 lookup ``class value -> group`` (0 urban_village, 1 other built-up, 2 the rest, 3 nodata) for a run's
    classes and its built-up definition (``run.json``'s ``built_up.classes``).

    Example:
        >>> group_lut(["other", "urban_village", "built_up"], ["urban_village", "built_up"])[[0, 1, 2, 255]].tolist()
        [2, 0, 1, 3]
    """
    lut = np.full(256, 3, np.uint8)
    for value, name in enumerate(classes):
        lut[value] = 0 if name == "urban_village" else 1 if name in built_up else 2
    return lut


def fit_densities(counts: np.ndarray, values: np.ndarray, pixel_area_m2: float) -> np.ndarray:
    """Residents per m2 of each group (:data:`GROUPS`) from tiles' class pixel counts ``(n, 3)`` and their values ``(n,)``:
    non-negative least squares of value on area. When the fit gives built-up land no residents at all (a model
    whose values do not follow the map), every built-up pixel weighs the same (the values are still spread, never lost).

    Example:
        >>> counts = np.array([[100, 0, 0], [0, 100, 0], [0, 0, 100], [50, 50, 0]], float)
        >>> np.round(fit_densities(counts, np.array([300.0, 100.0, 0.0, 200.0]), 1.0), 3).tolist()
        [3.0, 1.0, 0.0]
    """
    counts = np.asarray(counts, float)
    values = np.asarray(values, float)
    keep = counts.sum(axis=1) > 0
    if keep.sum() >= 2:
        area = counts[keep] * pixel_area_m2
        scale = area.max(axis=0)
        scale[scale == 0] = 1.0
        d, _ = nnls(area / scale, values[keep])
        d = d / scale
        if d[0] + d[1] > 0:
            return d
    built = values.sum() / max(1.0, (counts[:, :2].sum()) * pixel_area_m2)
    return np.array([built, built, 0.0])


def allocate(value: float, groups: np.ndarray, core: tuple[slice, slice], densities: np.ndarray) -> np.ndarray:
    """The residents of a tile's core pixels (float64, the core's shape): the tile's ``value`` spread over its window
    ``groups`` (group per pixel, 3 = nodata) in proportion to each pixel's density; when the window holds no density
    at all, evenly over its valid pixels; all zero when it has none (a window outside the city).

    Example:
        >>> g = np.array([[0, 1], [2, 3]], np.uint8)
        >>> allocate(40.0, g, (slice(0, 2), slice(0, 2)), np.array([3.0, 1.0, 0.0])).tolist()
        [[30.0, 10.0], [0.0, 0.0]]
    """
    weights = np.append(np.asarray(densities, float), 0.0)[groups]
    total = weights.sum()
    if total <= 0:
        weights = (groups != 3).astype(float)
        total = weights.sum()
        if total == 0:
            return np.zeros(weights[core].shape)
    return weights[core] * (value / total)


def read_padded(src: rasterio.io.DatasetReader, col: int, row: int, width: int, height: int, fill: int = CLASS_NODATA) -> np.ndarray:
    """Band 1 of ``src`` over a window that may reach past the raster (a tile's halo at the city's edge), padded
    with ``fill``: a plain inner read, cheaper than a boundless one."""
    out = np.full((height, width), fill, dtype=src.dtypes[0])
    c0, r0 = max(col, 0), max(row, 0)
    c1, r1 = min(col + width, src.width), min(row + height, src.height)
    if c1 > c0 and r1 > r0:
        out[r0 - row:r1 - row, c0 - col:c1 - col] = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
    return out


# --- one city --------------------------------------------------------------------------------------------------------
@dataclass
class CityPopulation:
    """One city's allocation: residents per 100 m cell, per UV polygon, and its totals."""

    city: str
    population: float = 0.0
    uv_population: float = 0.0
    tiles_ok: int = 0
    tiles_failed: int = 0
    uv: dict[str, float] = field(default_factory=dict)  # uv_id -> residents
    incomplete: set[str] = field(default_factory=set)  # uv ids a failed tile touches
    cog: Path | None = None


def city_counts(class_tif: str | os.PathLike[str], tiles: pa.Table, lut: np.ndarray) -> np.ndarray:
    """Pixels of each group (:data:`GROUPS`) in every tile's window, ``(n_tiles, 3)`` in ``tiles``' order."""
    out = np.zeros((tiles.num_rows, 3))
    with rasterio.open(class_tif) as src:
        for i, t in enumerate(tiles.select(["window_col_off", "window_row_off", "window_width", "window_height"]).to_pylist()):
            groups = lut[read_padded(src, t["window_col_off"], t["window_row_off"], t["window_width"], t["window_height"])]
            out[i] = np.bincount(groups.ravel(), minlength=4)[:3]
    return out


def pixel_area(class_tif: str | os.PathLike[str]) -> tuple[float, int]:
    """``(ground m2 of a pixel, pixels per population cell side)`` of a class raster (any CRS: ground GSD)."""
    with rasterio.open(class_tif) as src:
        gx, gy = ground_gsd_m(src.transform, src.crs, src.width, src.height)
    return gx * gy, max(1, round(CELL_M / math.sqrt(gx * gy)))


def allocate_city(city: str, class_tif: str | os.PathLike[str], tiles: pa.Table, values: dict[str, float], lut: np.ndarray,
                  densities: np.ndarray, villages: list[tuple[str, shapely.Geometry]], out_tif: Path, model_version: str) -> CityPopulation:
    """Spread a city's tile values (``values``: tile id -> residents in its window; a tile without one failed) over
    its mapped classes; write ``out_tif`` (residents per 100 m cell, COG) and return the totals and per-UV residents.
    ``villages`` are the city's UV polygons in the class raster's CRS."""
    result = CityPopulation(city)
    tree = shapely.STRtree([g for _, g in villages]) if villages else None
    with rasterio.open(class_tif) as src:
        _, cell = pixel_area(class_tif)
        rows, cols = math.ceil(src.height / cell), math.ceil(src.width / cell)
        cells = np.zeros(rows * cols)
        missing = np.zeros(rows * cols, bool)
        for t in tiles.to_pylist():
            c0, r0 = t["core_col_off"], t["core_row_off"]
            w, h = t["core_width"], t["core_height"]
            rr, cc = np.meshgrid(np.arange(r0, r0 + h) // cell, np.arange(c0, c0 + w) // cell, indexing="ij")
            index = (rr * cols + cc).ravel()
            value = values.get(t["tile_id"])
            if value is None:
                result.tiles_failed += 1
                missing[index] = True
            groups = lut[read_padded(src, t["window_col_off"], t["window_row_off"], t["window_width"], t["window_height"])]
            core = (slice(r0 - t["window_row_off"], r0 - t["window_row_off"] + h), slice(c0 - t["window_col_off"], c0 - t["window_col_off"] + w))
            people = allocate(value, groups, core, densities) if value is not None else np.zeros((h, w))
            if value is not None:
                result.tiles_ok += 1
                result.population += float(people.sum())
                cells += np.bincount(index, weights=people.ravel(), minlength=rows * cols)
            if tree is None:
                continue
            transform = src.transform @ Affine.translation(c0, r0)
            bounds = shapely.box(*rasterio.transform.array_bounds(h, w, transform))
            hits = tree.query(bounds, predicate="intersects")
            if not len(hits):
                continue
            ids = rasterize([(villages[i][1], n + 1) for n, i in enumerate(hits)], out_shape=(h, w), transform=transform, fill=0,
                            dtype="int32")
            sums = np.bincount(ids.ravel(), weights=people.ravel(), minlength=len(hits) + 1)
            for n, i in enumerate(hits):
                uv_id = villages[i][0]
                if value is None and (ids == n + 1).any():
                    result.incomplete.add(uv_id)
                result.uv[uv_id] = result.uv.get(uv_id, 0.0) + float(sums[n + 1])
        grid = np.where(missing, NODATA, cells).reshape(rows, cols).astype(np.float32)
        profile = {"driver": "COG", "dtype": "float32", "count": 1, "width": cols, "height": rows, "crs": src.crs, "nodata": NODATA,
                   "transform": src.transform @ Affine.scale(cell), "compress": "deflate", "predictor": 3}
    for uv_id, _ in villages:
        result.uv.setdefault(uv_id, 0.0)
    result.uv_population = float(sum(result.uv.values()))
    out_tif.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_tif) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(grid, 1)
            dst.update_tags(units="residents per cell", cell_m=f"{CELL_M:g}", cell_px=str(cell), model_version=model_version,
                            method="tile values spread over class densities (engine.products.population)")
    result.cog = out_tif
    return result


def city_villages(table: pa.Table, crs) -> list[tuple[str, shapely.Geometry]]:
    """UV polygons (rows of ``urban_villages.parquet``: ``uv_id``, ``geometry`` in EPSG:4326) in ``crs``, sorted by id."""
    if table.num_rows == 0:
        return []
    to_city = Transformer.from_crs("EPSG:4326", CRS.from_user_input(crs), always_xy=True)
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    geoms = shapely.transform(geoms, lambda xy: np.column_stack(to_city.transform(xy[:, 0], xy[:, 1])))
    return sorted(zip(table["uv_id"].to_pylist(), geoms), key=lambda p: p[0])


# --- the run's products -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PopulationProducts:
    """What :func:`write_population` wrote, and the numbers the console shows."""

    csv: Path
    uv_parquet: Path
    cogs: dict[str, Path]
    densities: np.ndarray  # residents per m2: urban village, other built-up, the rest
    rows: list[dict]
    skipped: dict[str, str]  # city -> why it has no population (not stitched, no tile values)


def write_population(products_dir: Path, tiles: dict[str, pa.Table], values: dict[str, dict[str, float]], run: dict,
                     regions: dict[str, str], model_version: str, calibration: dict | None) -> PopulationProducts:
    """The population products of a stitched run: ``tiles`` (city -> its tile index), ``values`` (city -> tile id ->
    residents), ``run`` (``run.json``: classes and built-up definition), ``calibration`` (the model's held-out record,
    engine.training.calibration; None: no interval, said in the ``interval`` column)."""
    lut = group_lut(run["classes"], (run.get("built_up") or {}).get("classes") or [c for c in run["classes"] if c != "other"])
    skipped: dict[str, str] = {}
    counts, targets = [], []
    cities = []
    for city in sorted(tiles):
        class_tif = city_folder(products_dir, city) / COGS["class"]
        if not class_tif.is_file():
            skipped[city] = f"city {city} has no {COGS['class']} (it was not stitched)"
            continue
        if not values.get(city):
            skipped[city] = f"city {city}: no tile has a population value"
            continue
        cities.append(city)
        ids = tiles[city]["tile_id"].to_pylist()
        n = city_counts(class_tif, tiles[city], lut)
        have = [i for i, t in enumerate(ids) if t in values[city]]
        counts.append(n[have] * pixel_area(class_tif)[0])  # m2 of each group: cities' pixels may differ in size
        targets.append(np.array([values[city][ids[i]] for i in have]))
    if not cities:
        raise ValueError("no stitched city has tile population values: " + "; ".join(skipped.values()))
    factor = calibration_factor(calibration)  # the held-out bias, corrected in every product (intervals centre on it)
    values = {city: {t: v * factor for t, v in per_tile.items()} for city, per_tile in values.items()}
    densities = fit_densities(np.concatenate(counts), np.concatenate(targets), 1.0)
    results: dict[str, CityPopulation] = {}
    uv_rows: list[dict] = []
    uv_table = pq.read_table(products_dir / UV_PARQUET, columns=["uv_id", "city", "region", "area_m2", "geometry"]) \
        if (products_dir / UV_PARQUET).is_file() else None
    for city in cities:
        class_tif = city_folder(products_dir, city) / COGS["class"]
        with rasterio.open(class_tif) as src:
            crs = src.crs
        villages = city_villages(uv_table.filter(pc.equal(uv_table["city"], city)), crs) if uv_table is not None else []
        res = allocate_city(city, class_tif, tiles[city], values[city], lut, densities, villages,
                            city_folder(products_dir, city) / POPULATION_COG, model_version)
        results[city] = res
    if uv_table is not None:
        uv_table = uv_table.filter(pc.is_in(uv_table["city"], value_set=pa.array(cities, pa.string())))
        for row in uv_table.to_pylist():
            res = results[row["city"]]
            people = res.uv.get(row["uv_id"], 0.0)
            uv_rows.append({**row, "population": people, "population_per_ha": people / (row["area_m2"] / 1e4) if row["area_m2"] > 0 else 0.0,
                            "complete": row["uv_id"] not in res.incomplete, "model_version": model_version})
    uv_out = products_dir / UV_POPULATION_PARQUET
    write_geoparquet(pa.Table.from_pylist(uv_rows, schema=UV_POPULATION_SCHEMA), uv_out, "EPSG:4326")
    rows = summary_rows(results, regions, densities, calibration, model_version, factor)
    csv = write_csv(products_dir / POPULATION_CSV, POPULATION_COLUMNS, rows)
    figure(rows, products_dir / POPULATION_PNG)
    return PopulationProducts(csv=csv, uv_parquet=uv_out, cogs={c: r.cog for c, r in results.items() if r.cog}, densities=densities,
                              rows=rows, skipped=skipped)


def summary_rows(results: dict[str, CityPopulation], regions: dict[str, str], densities: np.ndarray, calibration: dict | None,
                 model_version: str, factor: float = 1.0) -> list[dict]:
    """``population.csv``'s rows: each city, each region, the nation; intervals from the held-out calibration.

    ``results`` hold calibrated values (the model's times ``factor``, :func:`calibration_factor`); the intervals are
    the calibration's factors applied to the model's own sums (they contain the bias correction themselves)."""
    per_ha = densities * 1e4 * factor
    common = {"density_uv_per_ha": float(per_ha[0]), "density_built_up_per_ha": float(per_ha[1]),
              "density_other_per_ha": float(per_ha[2]), "calibration_factor": factor, "model_version": model_version}
    groups: list[tuple[str, str, str, list[str]]] = [("city", c, regions.get(c) or "", [c]) for c in sorted(results)]
    by_region: dict[str, list[str]] = {}
    for c in sorted(results):
        by_region.setdefault(regions.get(c) or "unknown", []).append(c)
    groups += [("region", r, r, cs) for r, cs in sorted(by_region.items())]
    groups.append(("national", "national", "", sorted(results)))
    rows = []
    for level, name, region, cities in groups:
        pop = sum(results[c].population for c in cities)
        uv = sum(results[c].uv_population for c in cities)
        share = uv / pop if pop > 0 else float("nan")
        n = len(cities)
        # a sum of cities gets one city's interval, not a narrower one: cities of a run share their errors (measured,
        # bench/population_coverage.py: narrowed as if independent, region sums were covered 0.87-0.89 of the time)
        f_all = prediction_factors(calibration, "all", 1, LEVEL) if calibration else None
        f_uv = prediction_factors(calibration, "uv", 1, LEVEL) if calibration else None
        f_share = share_factors(calibration, 1, LEVEL) if calibration else None
        p_lo, p_hi = interval(pop / factor, f_all)
        u_lo, u_hi = interval(uv / factor, f_uv)
        s_lo, s_hi = interval(share, f_share) if not math.isnan(share) else (float("nan"), float("nan"))
        s_hi = min(s_hi, 1.0) if not math.isnan(s_hi) else s_hi
        rows.append({"level": level, "name": name, "region": region, "cities": n,
                     "tiles_ok": sum(results[c].tiles_ok for c in cities), "tiles_failed": sum(results[c].tiles_failed for c in cities),
                     "population": pop, "population_lo": p_lo, "population_hi": p_hi,
                     "uv_population": uv, "uv_population_lo": u_lo, "uv_population_hi": u_hi,
                     "uv_share": share, "uv_share_lo": s_lo, "uv_share_hi": s_hi,
                     "held_out_cities": f_all[2] if f_all else (len(calibration.get("cities", [])) if calibration else 0),
                     "interval": interval_note(calibration, f_all, f_uv, f_share), **common})
    return rows


def figure(rows: list[dict], png: Path) -> Path:
    """``population.png``: residents per region and their share in urban villages, with the 95% intervals where
    there are any (a region without one shows its bar alone, and the title says why)."""
    from matplotlib.figure import Figure

    regions = [r for r in rows if r["level"] == "region"]
    national = next(r for r in rows if r["level"] == "national")
    fig = Figure(figsize=(10, 4.5), dpi=100)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(regions))
    for ax, key, scale, label in ((left, "population", 1e-3, "residents (thousands)"), (right, "uv_share", 100.0, "residents in urban villages (%)")):
        values = np.array([r[key] for r in regions], float) * scale
        lo = np.array([r[f"{key}_lo"] for r in regions], float) * scale
        hi = np.array([r[f"{key}_hi"] for r in regions], float) * scale
        have = np.isfinite(lo) & np.isfinite(hi)
        ax.bar(x, values, color="#1b9e77" if key == "population" else "#d95f02")
        if have.any():
            ax.errorbar(x[have], values[have], yerr=[values[have] - lo[have], hi[have] - values[have]], fmt="none", ecolor="k",
                        capsize=3, label="95% prediction interval")
            ax.legend(fontsize=8)
            if key == "population":
                ax.set_yscale("log")
        ax.set_xticks(x, [r["name"] for r in regions], rotation=30, ha="right")
        ax.set_ylabel(label)
    share = national["uv_share"]
    fig.suptitle(f"Population (model {national['model_version']}): {national['population']:,.0f} residents, "
                 f"{share:.1%} in urban villages" + ("" if math.isfinite(national["population_lo"]) else "; no interval: "
                                                     + national["interval"].split(": ", 1)[-1][:80]), fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return png


def interval_note(calibration: dict | None, f_all, f_uv, f_share) -> str:
    """The ``interval`` column: how the row's intervals were made, or why a value has none."""
    if calibration is None:
        return "none: the population model records no held-out calibration (calibration.json); refit it with this engine"
    missing = [name for name, f in (("population", f_all), ("uv_population", f_uv), ("uv_share", f_share)) if f is None]
    base = f"95% prediction interval from held-out city ratios (m={f_all[2] if f_all else 0})"
    return base + (f"; none for {', '.join(missing)}: fewer than 2 held-out cities with that total" if missing else "")
