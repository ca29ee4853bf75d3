"""Benchmark `assess`: are the design-based estimates unbiased, and do their 95% CIs cover the census values?

Usage: python bench/accuracy_coverage.py [--cities 12] [--size-km 1.5] [--reps 2000] [--other-reps 500]
                                         [--buffer-m 25] [--quick]

Results and their reading: docs/ACCURACY.md.

1. Demo cities (``engine.synth``, full truth known), each with a class map made by perturbing the truth the way
   a model errs: villages missed whole, eroded or dilated, wiggly borders, formal estates and industrial blocks
   taken for villages, small false blobs. Written as a run's products (``class.tif`` + ``run.json``).
2. ``run_assess`` end to end once per design (no buffer / buffer), timed; its census is the pixel census of the
   catalog reference rasterised on each class grid.
3. Coverage: each design (``plan_design``), then independent draws (``draw_ranks``, the function ``run_assess``
   draws with) labelled from the rasterised truth (reference land class: other, urban village, other built-up
   land) and estimated with ``estimates_from_counts`` and ``area_ratio_from_counts`` (what ``run_assess`` calls),
   under both intervals: ``jeffreys`` (the default) and ``wald`` (the classical one). Per quantity (OA, UA and PA
   of UV, UV area, built-up area, UV share of built-up land; nationally and per region): bias, SE ratio (mean SE /
   empirical SD), 95% CI coverage and mean CI width of each interval, and for PA how often a draw found no omission
   outside the buffer. Designs: the defaults without buffer (``--reps`` draws: the headline numbers); the buffer
   design (``--buffer-m``, defaults); no buffer at the buffer design's n (like for like); other buffer widths
   (``--sweep``) at that n; the buffer with ``--regional-min-common`` points per ``other`` stratum (``--other-reps``
   draws each).

Writes bench/results/accuracy_coverage.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402
from engine.accuracy.assess import AssessConfig, run_assess  # noqa: E402
from engine.accuracy.estimators import DEFAULT_INTERVAL, area_ratio_from_counts, estimates_from_counts  # noqa: E402
from engine.accuracy.reference import load_reference, truth_strips  # noqa: E402
from engine.accuracy.sampling import (  # noqa: E402
    ASSESS_CLASSES,
    BUILT_UP,
    LAND_CLASSES,
    MAP_STRATA,
    UV_CLASS,
    SampleConfig,
    SampleDesign,
    draw_ranks,
    open_city_grid,
    plan_design,
    scan_city,
    strata_strips,
)
from engine.catalog import load_catalog  # noqa: E402
from engine.schema import CLASS_ID  # noqa: E402
from engine.synth.config import SynthConfig  # noqa: E402
from engine.synth.demo import write_demo  # noqa: E402

console = Console(width=170)
RUN = "perturbed"
CLASSES = ("other", "urban_village")
UV = CLASS_ID["urban_village"]
QUANTITIES = ("overall_accuracy", "users_accuracy_uv", "producers_accuracy_uv", "uv_area", "built_up_area",
              "uv_share_of_built_up")
OLD_QUANTITIES = QUANTITIES[:4]  # the keys of the first version of this benchmark
REQUIRED = ("overall_accuracy", "users_accuracy_uv", "producers_accuracy_uv", "uv_area", "uv_share_of_built_up")
INTERVALS = (DEFAULT_INTERVAL, "wald")
BAND = (0.93, 0.97)  # the national 95% CI coverage the default design must reach


# ---------------------------------------------------------------------------------------------------------------
# 1. perturbed class maps


def perturb(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A realistic wrong UV map from the land-use truth: uint8 0 other, 1 UV, 255 outside the AOI."""
    valid = truth != CLASS_ID["nodata"]
    uv = truth == UV
    villages, n = ndimage.label(uv, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(uv, villages, np.arange(1, n + 1)) if n else np.zeros(0)
    small = sizes < (np.median(sizes) if n else 0)
    mapped = np.zeros_like(uv)
    for k in range(1, n + 1):
        v = villages == k
        p_omit = 0.25 if small[k - 1] else 0.05  # small villages are missed more often
        action = rng.choice(["omit", "erode", "dilate", "keep"], p=[p_omit, 0.3, 0.3, 0.4 - p_omit])
        if action == "erode":
            v = ndimage.binary_erosion(v, iterations=int(rng.integers(2, 7)))
        elif action == "dilate":
            v = ndimage.binary_dilation(v, iterations=int(rng.integers(1, 6)))
        if action != "omit":
            mapped |= v
    for cls, p in (("formal_residential", 0.05), ("industrial", 0.02)):  # blocks taken for villages
        blocks, m = ndimage.label(truth == CLASS_ID[cls])
        chosen = np.flatnonzero(rng.random(m) < p) + 1
        mapped |= np.isin(blocks, chosen)
    h, w = truth.shape
    for _ in range(int(rng.integers(3, 9))):  # small false blobs in built-up land
        y, x, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(4, 13))
        yy, xx = np.ogrid[:h, :w]
        mapped |= ((yy - y) ** 2 + (xx - x) ** 2 <= r * r) & (truth >= CLASS_ID["urban_village"])
    # wiggly borders: shift the boundary by a smooth random field of +-2-3 px
    inside = ndimage.distance_transform_edt(mapped) - ndimage.distance_transform_edt(~mapped)
    noise = ndimage.gaussian_filter(rng.normal(size=truth.shape), 4)
    mapped = inside + 2.5 * noise / (noise.std() + 1e-12) > 0
    return np.where(valid, mapped.astype(np.uint8), np.uint8(255))


def write_products(ws: Path, catalog) -> None:
    """``products/<RUN>/``: run.json and one class.tif (COG) per city, perturbed from its truth."""
    products = ws / "products" / RUN
    (products / "cities").mkdir(parents=True, exist_ok=True)
    (products / "run.json").write_text(json.dumps({"run": RUN, "model_version": "perturbed-truth", "classes": list(CLASSES),
                                                   "mode": "oracle-perturbed"}))
    for i, row in enumerate(catalog.to_pylist()):
        truth_path = Path(row["imagery"]).with_name("truth.tif")
        with rasterio.open(truth_path) as src:
            truth, profile = src.read(1), src.profile
        cls = perturb(truth, np.random.default_rng(1000 + i))
        folder = products / "cities" / row["city"]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".class-tmp.tif"
        profile.update(driver="GTiff", dtype="uint8", count=1, nodata=255, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(cls, 1)
            dst.update_tags(1, classes=json.dumps(list(CLASSES)))
        rasterio.shutil.copy(tmp, folder / "class.tif", driver="COG", COMPRESS="DEFLATE", OVERVIEW_RESAMPLING="MODE")
        tmp.unlink()


# ---------------------------------------------------------------------------------------------------------------
# 3. repeated draws on in-memory stratum pixels


class Population:
    """Per cell (city x map stratum, the design's ``cells`` order): the true land class of its pixels in raster
    order (index in LAND_CLASSES), so a drawn ``(cell, rank)`` is labelled by one array lookup."""

    def __init__(self, design: SampleDesign, grids: dict, references: dict) -> None:
        cells = design.cells
        truths = []
        for city, stratum_name in zip(cells["city"], cells["map_stratum"]):
            grid = grids[city]
            [(_, _, codes)] = list(strata_strips(grid, design.config.buffer_m, grid.height_px))
            truth = truth_strips(references[city], grid)(0, grid.height_px)
            truths.append(truth.ravel()[np.flatnonzero(codes.ravel() == MAP_STRATA.index(stratum_name))])
        self.offset = np.concatenate([[0], np.cumsum([t.size for t in truths])[:-1]])
        self.truth = np.concatenate(truths).astype(np.int64)
        h_index = {h: i for i, h in enumerate(design.strata["stratum"])}
        self.cell_stratum = cells["stratum"].map(h_index).to_numpy()
        self.cell_map = (cells["map_stratum"] == UV_CLASS).to_numpy().astype(np.int64)
        self.cell_area = cells["area_m2"].to_numpy()
        self.cell_pixels = cells["pixels"].to_numpy()
        self.n = design.strata["n"].to_numpy()
        self.sizes = design.sizes()
        self.strata = list(design.strata["stratum"])
        self.region_of_stratum = design.strata["unit"].to_numpy()
        self.far_other = (design.strata["map_stratum"] == "other").to_numpy()  # other, outside any buffer

    def draw_counts(self, rng: np.random.Generator) -> np.ndarray:
        """One sample's count cube ``C[h, map, ref]``: map index in ASSESS_CLASSES, reference in LAND_CLASSES."""
        cell, rank = draw_ranks(self.cell_stratum, self.cell_area, self.cell_pixels, self.n, rng)
        ref = self.truth[self.offset[cell] + rank]
        k = len(LAND_CLASSES)
        flat = (self.cell_stratum[cell] * 2 + self.cell_map[cell]) * k + ref
        return np.bincount(flat, minlength=len(self.strata) * 2 * k).reshape(-1, 2, k)


def estimate(cube: np.ndarray, sizes: dict[str, float], interval: str) -> tuple:
    """What ``run_assess`` computes for a domain, from its count cube ``C[h, map, land]``: the accuracy result (the
    reference collapsed to UV / other) and the UV share of built-up land."""
    assert ASSESS_CLASSES == ("other", UV_CLASS) and LAND_CLASSES == ("other", UV_CLASS, BUILT_UP)
    acc = np.stack([cube[..., 0] + cube[..., 2], cube[..., 1]], axis=-1)
    land = np.zeros((cube.shape[0], 3, 3), np.int64)
    land[:, :2, :] = cube
    result = estimates_from_counts(acc, sizes, ASSESS_CLASSES, fpc=False, interval=interval)
    share = area_ratio_from_counts(land, sizes, LAND_CLASSES, [UV_CLASS], [UV_CLASS, BUILT_UP], fpc=False, interval=interval)
    return result, share


def _values(result, share) -> dict[str, tuple[float, float, float, float]]:
    """quantity -> (estimate, se, lo, hi)."""
    pick = {"overall_accuracy": result.overall_accuracy, "users_accuracy_uv": result.users_accuracy[UV_CLASS],
            "producers_accuracy_uv": result.producers_accuracy[UV_CLASS], "uv_area": result.area[UV_CLASS],
            "built_up_area": share.denominator, "uv_share_of_built_up": share.ratio}
    return {q: (e.estimate, e.se, e.ci95[0], e.ci95[1]) for q, e in pick.items()}


def _census_values(census) -> dict[str, float]:
    v = census.values()
    return {"overall_accuracy": v["overall_accuracy"], "users_accuracy_uv": v["users_accuracy"][UV_CLASS],
            "producers_accuracy_uv": v["producers_accuracy"][UV_CLASS], "uv_area": v["area"][UV_CLASS],
            "built_up_area": v["built_up_area"], "uv_share_of_built_up": v["uv_share_of_built_up"]}


def repeat(pop: Population, census: dict, reps: int, seed: int) -> dict:
    """Draw ``reps`` samples; national and per-region estimates of each under both intervals; coverage, bias, SE
    ratio, CI width (``coverage``/``ci_width``: the default interval; ``coverage_wald``/``ci_width_wald``)."""
    rng = np.random.default_rng(seed)
    regions = sorted(census["region"])
    domains = {"national": np.arange(len(pop.strata))} | {r: np.flatnonzero(pop.region_of_stratum == r) for r in regions}
    truth = {"national": _census_values(census["national"]["national"])} | {r: _census_values(census["region"][r]) for r in regions}
    rec = {i: {d: {q: [] for q in QUANTITIES} for d in domains} for i in INTERVALS}
    no_omission = {d: [] for d in domains}  # draws without a point in the far-other strata whose reference is UV
    t_draw, t_est = 0.0, dict.fromkeys(INTERVALS, 0.0)
    for _ in range(reps):
        t0 = time.perf_counter()
        cube = pop.draw_counts(rng)
        t_draw += time.perf_counter() - t0
        for d, idx in domains.items():
            no_omission[d].append(cube[idx[pop.far_other[idx]], 0, 1].sum() == 0)
            sizes = {pop.strata[h]: pop.sizes[pop.strata[h]] for h in idx}
            for interval in INTERVALS:
                t1 = time.perf_counter()
                values = _values(*estimate(cube[idx], sizes, interval))
                t_est[interval] += time.perf_counter() - t1
                for q, v in values.items():
                    rec[interval][d][q].append(v)

    def summarise(values: list, wald: list, true: float) -> dict:
        a = np.array(values, float)  # (reps, 4)
        est, se, lo, hi = a.T
        _, _, wlo, whi = np.array(wald, float).T
        ok = ~np.isnan(est)
        sd = float(np.nanstd(est, ddof=1))
        return {"census": true, "mean": float(np.nanmean(est)), "bias": float(np.nanmean(est) - true),
                "relative_bias": float((np.nanmean(est) - true) / true), "sd": sd,
                "se_ratio": float(np.nanmean(se) / sd) if sd > 0 else float("nan"),
                "coverage": float(np.mean((lo[ok] <= true) & (true <= hi[ok]))), "ci_width": float(np.nanmean(hi - lo)),
                "zero_width": int(np.sum(hi[ok] - lo[ok] <= 0)),
                "coverage_wald": float(np.mean((wlo[ok] <= true) & (true <= whi[ok]))),
                "ci_width_wald": float(np.nanmean(whi - wlo)), "zero_width_wald": int(np.sum(whi[ok] - wlo[ok] <= 0)),
                "not_estimable": int((~ok).sum())}

    main = rec[DEFAULT_INTERVAL]
    out = {d: {q: summarise(main[d][q], rec["wald"][d][q], truth[d][q]) for q in QUANTITIES} for d in domains}
    for d in domains:  # PA's coverage is lost in the draws that sampled no omission at all (PA = 1, SE = 0)
        miss = np.array(no_omission[d])
        true = truth[d]["producers_accuracy_uv"]
        out[d]["producers_accuracy_uv"]["draws_without_omission"] = float(miss.mean())
        for key, interval in (("coverage_given_omission_sampled", DEFAULT_INTERVAL), ("coverage_given_omission_sampled_wald", "wald"),
                              ("coverage_given_no_omission", DEFAULT_INTERVAL), ("coverage_given_no_omission_wald", "wald")):
            pa = np.array(rec[interval][d]["producers_accuracy_uv"], float)
            hit = (pa[:, 2] <= true) & (true <= pa[:, 3])
            sel = miss if "no_omission" in key else ~miss
            out[d]["producers_accuracy_uv"][key] = float(hit[sel].mean()) if sel.any() else None
    pooled = {}
    for q in QUANTITIES:
        cov = [out[r][q]["coverage"] for r in regions]
        wald = [out[r][q]["coverage_wald"] for r in regions]
        pooled[q] = {"coverage_mean": float(np.mean(cov)), "coverage_min": float(np.min(cov)),
                     "coverage_min_region": regions[int(np.argmin(cov))],
                     "coverage_mean_wald": float(np.mean(wald)), "coverage_min_wald": float(np.min(wald)),
                     "regions_below_band": [r for r, c in zip(regions, cov) if c < BAND[0]]}
    pooled["producers_accuracy_uv"]["draws_without_omission_mean"] = float(np.mean(
        [out[r]["producers_accuracy_uv"]["draws_without_omission"] for r in regions]))
    given = [out[r]["producers_accuracy_uv"]["coverage_given_omission_sampled"] for r in regions]
    pooled["producers_accuracy_uv"]["coverage_given_omission_sampled_mean"] = float(np.mean([g for g in given if g is not None]))
    return {"national": out["national"], "regions": {r: out[r] for r in regions}, "regions_pooled": pooled, "reps": reps,
            "ms_per_draw": 1e3 * t_draw / reps,
            "ms_per_estimate": {i: 1e3 * t / reps / len(domains) for i, t in t_est.items()}}


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cities", type=int, default=12)
    parser.add_argument("--size-km", type=float, default=1.5)
    parser.add_argument("--reps", type=int, default=2000, help="draws of the default design (the headline coverage)")
    parser.add_argument("--other-reps", type=int, default=500, help="draws of every other design")
    parser.add_argument("--buffer-m", type=float, default=25.0)
    parser.add_argument("--sweep", type=float, nargs="*", default=[10.0, 50.0, 100.0], help="other buffer widths (m)")
    parser.add_argument("--regional-min-common", type=int, default=150,
                        help="min points per 'other' stratum of the regional-precision variant")
    parser.add_argument("--workspace", default=str(Path(tempfile.gettempdir()) / "geolink-bench-accuracy"))
    parser.add_argument("--quick", action="store_true", help="4 cities of 1 km, 200 draws")
    args = parser.parse_args()
    if args.quick:
        args.cities, args.size_km, args.reps, args.other_reps = 4, 1.0, 200, 100
    ws = Path(args.workspace) / f"{args.cities}x{args.size_km:g}km"

    t0 = time.perf_counter()
    if not (ws / "catalog.yaml").is_file():
        console.print(f"generating {args.cities} demo cities of {args.size_km} km in {ws}")
        write_demo(ws, n_cities=args.cities, cfg=SynthConfig(size_km=args.size_km), seed=0)
    catalog = load_catalog(ws / "catalog.yaml")
    write_products(ws, catalog)
    console.print(f"cities and perturbed class maps ready in {time.perf_counter() - t0:.1f} s")

    with_buffer = SampleConfig(buffer_m=args.buffer_m, seed=0)
    e2e = {}
    t0 = time.perf_counter()
    report = run_assess(ws, RUN, catalog, AssessConfig(sampling=with_buffer))
    e2e["buffer"] = _e2e(report, time.perf_counter() - t0)
    # how often a point's polygon label (what run_assess uses) differs from its pixel's rasterised truth (the census)
    e2e["buffer"]["points_off_pixel_truth"] = _edge_disagreement(report.points, ws, catalog)
    census = report.census
    base = SampleConfig(seed=0, n_total=report.design.n_total)  # the same total n: a like-for-like comparison
    t0 = time.perf_counter()
    e2e["no_buffer"] = _e2e(run_assess(ws, RUN, catalog, AssessConfig(sampling=base)), time.perf_counter() - t0)
    for name, e in e2e.items():
        console.print(f"run_assess ({name}): {e['seconds']:.1f} s, n={e['n']}, national "
                      + ", ".join(f"{q} {v:.4g}" for q, v in e["national"].items()))
    grids, references = {}, {}
    for row in catalog.to_pylist():
        path = ws / "products" / RUN / "cities" / row["city"] / "class.tif"
        grids[row["city"]] = open_city_grid(path, row["city"], row["region"], CLASSES)
        references[row["city"]] = load_reference(row["reference"])
    n_equal = report.design.n_total
    # no_buffer_default: the defaults (Cochran + 50 per UV stratum): the headline coverage. no_buffer: the buffer
    # design's n without a buffer (like for like), i.e. what switching the buffer on costs and buys
    designs = {"no_buffer_default": (SampleConfig(seed=0), args.reps),
               # the default until issue 18: 10 points per other stratum (proportional allocation of Cochran's n)
               "no_buffer_min_common_10": (SampleConfig(seed=0, min_common=10), args.reps),
               "no_buffer": (base, args.other_reps), "buffer": (with_buffer, args.other_reps)}
    for width in args.sweep:  # other buffer widths at the same n
        if width != args.buffer_m:
            designs[f"buffer_{width:g}m"] = (SampleConfig(buffer_m=width, seed=0, n_total=n_equal), args.other_reps)
    designs["buffer_regional"] = (SampleConfig(buffer_m=args.buffer_m, seed=0, min_common=args.regional_min_common),
                                  args.other_reps)
    results = {}
    for name, (scfg, reps) in designs.items():
        scans = [scan_city(g, scfg.buffer_m, scfg.block_rows) for g in grids.values()]
        design = plan_design(scans, scfg)
        pop = Population(design, grids, references)
        t0 = time.perf_counter()
        results[name] = repeat(pop, census, reps, seed=1)
        results[name].update(seconds=time.perf_counter() - t0, n=design.n_total, strata=len(design.strata),
                             buffer_m=scfg.buffer_m, min_common=scfg.min_common)
        ms = results[name]["ms_per_estimate"]
        console.print(f"{name}: {reps} draws of n={design.n_total} in {results[name]['seconds']:.1f} s "
                      f"({results[name]['ms_per_draw']:.2f} ms per draw; per domain estimate "
                      + ", ".join(f"{i} {v:.2f} ms" for i, v in ms.items()) + ")")

    table = Table(title="Stratified samples of the demo cities: national estimates vs census (95% CI: "
                        f"{DEFAULT_INTERVAL}, and wald)")
    for col in ("design", "n", "draws", "quantity", "census", "mean est.", "rel. bias", "SE ratio", "coverage", "CI width",
                "Wald coverage", "Wald width", "regions: mean / min coverage"):
        table.add_column(col, justify="right" if col not in ("design", "quantity") else "left")
    for name in ("no_buffer_default", "no_buffer_min_common_10", "no_buffer", "buffer", "buffer_regional"):
        for q in QUANTITIES:
            r = results[name]
            s, p = r["national"][q], r["regions_pooled"][q]
            fmt = (lambda v: f"{v / 1e4:,.2f} ha") if q in ("uv_area", "built_up_area") else (lambda v: f"{100 * v:.2f}%")
            table.add_row(name, str(r["n"]), str(r["reps"]), q, fmt(s["census"]), fmt(s["mean"]),
                          f"{100 * s['relative_bias']:+.2f}%", f"{s['se_ratio']:.3f}", f"{100 * s['coverage']:.1f}%",
                          fmt(s["ci_width"]), f"{100 * s['coverage_wald']:.1f}%", fmt(s["ci_width_wald"]),
                          f"{100 * p['coverage_mean']:.1f}% / {100 * p['coverage_min']:.1f}% ({p['coverage_min_region']})")
    console.print(table)
    default = results["no_buffer_default"]
    previous = results["no_buffer_min_common_10"]
    regional = Table(title=f"Default design (n = {default['n']}, {default['reps']} draws): 95% CI coverage per region "
                           f"({DEFAULT_INTERVAL}; Wald in brackets)")
    regional.add_column("region")
    for q in REQUIRED:
        regional.add_column(q, justify="right")
    for region, out in [("national", default["national"])] + list(default["regions"].items()):
        regional.add_row(region, *[f"{100 * out[q]['coverage']:.1f}% ({100 * out[q]['coverage_wald']:.1f}%)" for q in REQUIRED])
    for region, out in [("national", previous["national"])] + list(previous["regions"].items()):
        regional.add_row(f"{region} (min_common 10, n={previous['n']})",
                         *[f"{100 * out[q]['coverage']:.1f}% ({100 * out[q]['coverage_wald']:.1f}%)" for q in REQUIRED])
    console.print(regional)
    sweep = Table(title=f"Buffer width at the same n = {n_equal}: producer's accuracy of UV ({DEFAULT_INTERVAL})")
    for col in ("design", "buffer (m)", "PA CI width", "change vs no buffer", "PA coverage", "regions: PA coverage (mean)",
                "regions: draws w/o far omission", "regions: coverage given far omission sampled"):
        sweep.add_column(col, justify="left" if col == "design" else "right")
    pa_width = {name: r["national"]["producers_accuracy_uv"]["ci_width"] for name, r in results.items()}
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["n"] != n_equal, kv[1]["buffer_m"])):
        pa, pooled = r["national"]["producers_accuracy_uv"], r["regions_pooled"]["producers_accuracy_uv"]
        sweep.add_row(name + ("" if r["n"] == n_equal else f" (n={r['n']})"), f"{r['buffer_m']:g}", f"{100 * pa['ci_width']:.2f} pp",
                      f"{100 * (pa['ci_width'] / pa_width['no_buffer'] - 1):+.1f}%", f"{100 * pa['coverage']:.1f}%",
                      f"{100 * pooled['coverage_mean']:.1f}%", f"{100 * pooled['draws_without_omission_mean']:.1f}%",
                      f"{100 * pooled['coverage_given_omission_sampled_mean']:.1f}%")
    console.print(sweep)
    change = pa_width["buffer"] / pa_width["no_buffer"] - 1

    def cov(name: str, key: str = "coverage", qs=OLD_QUANTITIES) -> dict:
        return {q: results[name]["national"][q][key] for q in qs}

    def reg(name: str, key: str = "coverage_mean", qs=OLD_QUANTITIES) -> dict:
        return {q: results[name]["regions_pooled"][q][key] for q in qs}

    in_band = {q: BAND[0] <= default["national"][q]["coverage"] <= BAND[1] for q in REQUIRED}
    metrics = {
        "interval": DEFAULT_INTERVAL,
        # the criterion: national 95% CI coverage of the default design, default interval
        "ci95_coverage_default": cov("no_buffer_default", qs=QUANTITIES),
        "ci95_coverage_default_in_band": in_band,
        "ci95_coverage_default_wald": cov("no_buffer_default", "coverage_wald", QUANTITIES),
        "ci95_coverage_default_regions": {r: {q: out[q]["coverage"] for q in QUANTITIES} for r, out in default["regions"].items()},
        "ci95_coverage_default_regions_wald": {r: {q: out[q]["coverage_wald"] for q in QUANTITIES}
                                               for r, out in default["regions"].items()},
        "ci95_coverage_default_regions_below_band": {q: default["regions_pooled"][q]["regions_below_band"] for q in REQUIRED},
        "zero_width_intervals_default": {i: sum(out[q][k] for out in [default["national"], *default["regions"].values()]
                                                for q in QUANTITIES)
                                         for i, k in ((DEFAULT_INTERVAL, "zero_width"), ("wald", "zero_width_wald"))},
        "reps_default": default["reps"],
        "n_points_default": default["n"],
        # the default design until issue 18 (min_common 10, n = Cochran + 50 per UV stratum), same draws
        "previous_default": {"n_points": previous["n"], "min_common": 10,
                             "ci95_coverage": cov("no_buffer_min_common_10", qs=QUANTITIES),
                             "ci95_coverage_wald": cov("no_buffer_min_common_10", "coverage_wald", QUANTITIES),
                             "ci95_coverage_regions": {r: {q: out[q]["coverage"] for q in QUANTITIES}
                                                       for r, out in previous["regions"].items()},
                             "ci95_coverage_regions_below_band": {q: previous["regions_pooled"][q]["regions_below_band"]
                                                                  for q in REQUIRED}},
        # the keys of the first version: the same designs and quantities, now with the default interval (Wald: *_wald)
        "ci95_coverage": cov("no_buffer") | {f"{q}_buffer": v for q, v in cov("buffer").items()},
        "ci95_coverage_wald": cov("no_buffer", "coverage_wald") | {f"{q}_buffer": v for q, v in cov("buffer", "coverage_wald").items()},
        "ci95_coverage_regions_mean": reg("no_buffer") | {f"{q}_buffer": v for q, v in reg("buffer").items()},
        "relative_bias": cov("no_buffer", "relative_bias", QUANTITIES)
        | {f"{q}_buffer": v for q, v in cov("buffer", "relative_bias").items()},
        "se_ratio": cov("no_buffer", "se_ratio", QUANTITIES) | {f"{q}_buffer": v for q, v in cov("buffer", "se_ratio").items()},
        "pa_uv_ci95_width": {"no_buffer": pa_width["no_buffer"], "buffer": pa_width["buffer"], "relative_change": change}
        | {f"buffer_{results[k]['buffer_m']:g}m": v for k, v in pa_width.items() if k.startswith("buffer_") and k != "buffer_regional"},
        "default_designs": {"n_points": {"no_buffer": default["n"], "buffer": results["buffer"]["n"]},
                            "ci95_coverage_no_buffer": cov("no_buffer_default"),
                            "pa_uv_ci95_width_no_buffer": pa_width["no_buffer_default"]},
        "regional_variant": {"n_points": results["buffer_regional"]["n"], "min_common": args.regional_min_common,
                             "ci95_coverage_regions_mean": reg("buffer_regional", qs=QUANTITIES),
                             "ci95_coverage": cov("buffer_regional", qs=QUANTITIES)},
        "census": {q: default["national"][q]["census"] for q in QUANTITIES},
        "n_points": results["buffer"]["n"],
        "reps": args.other_reps,
        "ms_per_draw": default["ms_per_draw"],
        "ms_per_estimate": default["ms_per_estimate"][DEFAULT_INTERVAL],
        "ms_per_estimate_wald": default["ms_per_estimate"]["wald"],
        "run_assess_seconds": {k: v["seconds"] for k, v in e2e.items()},
    }
    out = write_results("accuracy_coverage", metrics, {
        "setup": {"cities": args.cities, "size_km": args.size_km, "buffer_m": args.buffer_m, "regions": sorted(census["region"]),
                  "design": "strata region x map class (+ buffer), Cochran n (UA 0.7/0.95, SE(OA) 0.01) + 50 per rare stratum, "
                            "at least 100 per other stratum (min_common); no-buffer design at the same total n",
                  "interval": f"{DEFAULT_INTERVAL} (the default; coverage_wald: estimate +- 1.96 SE)",
                  "reps": {name: reps for name, (_, reps) in designs.items()}, "band": list(BAND)},
        "detail": results, "run_assess": e2e})
    console.print(f"national 95% CI coverage of the default design ({DEFAULT_INTERVAL}), band {BAND}: "
                  + ", ".join(f"{q} {default['national'][q]['coverage']:.3f}{'' if ok else ' (OUT)'}" for q, ok in in_band.items()))
    console.print(f"wrote {out}")


def _e2e(report, seconds: float) -> dict:
    return {"seconds": seconds, "n": report.design.n_total, "strata": len(report.design.strata),
            "national": {q: v[0] for q, v in _values(report.national.result, report.national.land).items()}}


def _edge_disagreement(points, ws: Path, catalog) -> float:
    """Share of points whose polygon label differs from the rasterised truth of their pixel (pixel-edge effect)."""
    diff = 0
    for row in catalog.to_pylist():
        pts = points[points["city"] == row["city"]]
        if pts.empty:
            continue
        grid = open_city_grid(ws / "products" / RUN / "cities" / row["city"] / "class.tif", row["city"], row["region"], CLASSES)
        truth = truth_strips(load_reference(row["reference"]), grid)(0, grid.height_px)
        pixel = np.array(LAND_CLASSES, dtype=object)[truth[pts["row"], pts["col"]]]
        diff += int((pixel != pts["ref_land"].to_numpy()).sum())
    return diff / len(points)


if __name__ == "__main__":
    main()
