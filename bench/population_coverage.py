"""Do `map --population-model`'s 95% intervals hold their coverage on cities the model never saw? Measured.

Usage: python bench/population_coverage.py --workspace /tmp/geolink-bench/ws [--seeds 0,1,2] [--epochs 4] [--preset test]

The workspace is the prepared held-out benchmark (`geolink-engine demo-data --benchmark`, then `prepare`;
bench/experiments_benchmark.py writes one): 70 cities in 7 regions with their population truth rasters. It is
copied first (training writes models into it). Per seed and per split scheme:

- ``split``: cities of every region in train, val and test;
- ``region_split``: three whole regions held out as test (a new region: is the interval still honest there?).

1. `finetune --task population` on the scheme's train cities (Ray Train, the engine's own run_training); the bundle's
   calibration.json is its val cities' record (engine.training.calibration), m = the number of val cities;
2. the same record on the test cities (:func:`heldout_calibration`: per city, the truth raster's residents in the
   tiles' cores against the model's window predictions times the core share: the totals `map` reports before its
   dasymetric split, which moves residents between classes inside a tile but not between tiles' cores);
3. per test city: does the truth lie in the model's total times the interval's factors (``prediction_factors``
   with n = 1)? Likewise the UV totals (cities with a village) and the UV share, and each test region's sum
   (n = its number of test cities).

Writes bench/results/population_coverage.json: per scheme, coverage of the 95% intervals (cities, UV, share,
regions), the median interval width (hi / lo), m, and the bias factor, pooled over seeds and per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402

console = Console(width=150)
SCHEMES = ("split", "region_split")
RESAMPLED_M = (7, 14, 21)  # calibration cities per draw: the benchmark's 7 val cities, and twice and thrice that


def covered(truth: float, pred: float, factors) -> bool | None:
    """Whether ``truth`` lies in ``pred x factors``; None when there is no interval or no prediction."""
    if factors is None or pred <= 0:
        return None
    return pred * factors[0] <= truth <= pred * factors[1]


def score(cal: dict, test: dict) -> dict:
    """Coverage rows of one model: each test city (all, UV, share) and each test region's sum."""
    from engine.training.calibration import calibration_factor, prediction_factors, share_factors

    rows = {"city": [], "uv": [], "share": [], "region": [], "region_single": [], "width_city": []}
    f_all, f_uv, f_share = prediction_factors(cal, "all", 1), prediction_factors(cal, "uv", 1), share_factors(cal, 1)
    for c in test["cities"]:
        rows["city"].append(covered(c["truth"], c["pred"], f_all))
        if c.get("uv_tiles"):
            rows["uv"].append(covered(c["uv_truth"], c["uv_pred"], f_uv))
            if c["pred"] > 0 and c["truth"] > 0 and c["uv_pred"] > 0:
                rows["share"].append(covered(c["uv_truth"] / c["truth"], c["uv_pred"] / c["pred"], f_share))
    regions: dict[str, list[dict]] = {}
    for c in test["cities"]:
        regions.setdefault(c.get("region") or "", []).append(c)
    for cities in regions.values():  # a sum over n cities: narrowed as if their errors were independent, and not narrowed
        truth, pred = sum(c["truth"] for c in cities), sum(c["pred"] for c in cities)
        rows["region"].append(covered(truth, pred, prediction_factors(cal, "all", len(cities))))
        rows["region_single"].append(covered(truth, pred, f_all))
    if f_all:
        rows["width_city"].append(f_all[1] / f_all[0])
    rows["m"] = f_all[2] if f_all else len(cal.get("cities", []))
    rows["bias_factor"] = calibration_factor(cal)
    rows["raw_in_truth_ratio"] = statistics.median(c["truth"] / c["pred"] for c in test["cities"] if c["pred"] > 0)
    return rows


def resampled(records: list[dict], m: int, draws: int, seed: int) -> dict[str, list[float]]:
    """The interval's coverage averaged over which held-out cities calibrate: ``draws`` times, ``m`` of ``records``
    (every held-out city of one model: val and test alike, never trained on) calibrate and the rest are scored.
    Per draw: the share of scored cities (UV, share, regions) covered, and the city interval's width (hi / lo).
    Why: one fixed val set of 7 cities is one draw; its coverage varies a lot from draw to draw, and the method's
    promise (95%) is over draws, so both the mean and the spread are reported."""
    rng = np.random.default_rng(1000 + seed)
    out: dict[str, list[float]] = {"city": [], "uv": [], "share": [], "region": [], "region_single": [], "width": []}
    for _ in range(draws):
        order = rng.permutation(len(records))
        cal = {"cities": [records[i] for i in order[:m]]}
        rows = score(cal, {"cities": [records[i] for i in order[m:]]})
        for key in ("city", "uv", "share", "region", "region_single"):
            have = [v for v in rows[key] if v is not None]
            if have:
                out[key].append(sum(have) / len(have))
        out["width"] += rows["width_city"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/geolink-bench/ws"))
    parser.add_argument("--copy", type=Path, default=Path("/tmp/population-coverage-ws"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--preset", default="test")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--draws", type=int, default=2000, help="calibration sets drawn per model (split scheme)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    schemes = [s for s in args.schemes.split(",") if s]

    import pyarrow as pa
    import ray

    from engine.catalog import load_catalog
    from engine.pipelines.train import TrainConfig, run_training
    from engine.synth.benchmark import load_region_split
    from engine.training.calibration import heldout_calibration, read_calibration

    if not args.copy.exists():
        shutil.copytree(args.workspace, args.copy, ignore=shutil.ignore_patterns("models", "runs"))
    ws = args.copy
    catalog = load_catalog(ws / "catalog.yaml")
    region_split = load_region_split(ws / "catalog.yaml")
    rows = catalog.to_pylist()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict] = {}
    t_start = time.perf_counter()
    for scheme in schemes:
        split = {r["city"]: (r.get("split") if scheme == "split" else region_split.get(r["city"])) or "train" for r in rows}
        table = catalog.set_column(catalog.schema.get_field_index("split"), "split", pa.array([split[r["city"]] for r in rows]))
        test = [c for c, s in split.items() if s == "test"]
        per_seed = []
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = TrainConfig(task="finetune", target="population", preset=args.preset, epochs=args.epochs, batch_size=16,
                              cpus_per_worker=1.0, augment=False, mode="fused", seed=seed)
            name = f"pop-{scheme.replace('_', '-')}-s{seed}"
            model = ws / "models" / name
            if not (model / "calibration.json").is_file():  # resumable: a trained model is kept
                model = run_training(table, ws, cfg, name=name)
            cal = read_calibration(model)
            cache = ws / "coverage" / f"{name}.json"
            if cache.is_file():
                test_doc = json.loads(cache.read_text())
            else:
                test_doc = heldout_calibration(model, ws, test, {r["city"]: r["population"] for r in rows},
                                               {r["city"]: r.get("reference") for r in rows}, {r["city"]: r.get("region") for r in rows})
                cache.parent.mkdir(exist_ok=True)
                cache.write_text(json.dumps(test_doc))
            s = score(cal, test_doc)
            if scheme == "split":  # exchangeable cities: which of them calibrate is chance; average over that chance
                s["resampled"] = {m: resampled(cal["cities"] + test_doc["cities"], m, args.draws, seed) for m in RESAMPLED_M}
            s["seconds"] = round(time.perf_counter() - t0, 1)
            per_seed.append(s)
            console.print(f"{scheme} seed {seed}: m={s['m']}, city coverage {_rate(s['city'])}, uv {_rate(s['uv'])}, "
                          f"share {_rate(s['share'])}, regions {_rate(s['region'])} ({s['seconds']} s)")
        pooled = {k: [v for s in per_seed for v in s[k]] for k in ("city", "uv", "share", "region", "region_single", "width_city")}
        results[scheme] = {
            "test_cities": len(test), "m": per_seed[0]["m"],
            **{f"coverage_{k}": _frac(pooled[k]) for k in ("city", "uv", "share", "region", "region_single")},
            **{f"n_{k}": sum(v is not None for v in pooled[k]) for k in ("city", "uv", "share", "region", "region_single")},
            "median_interval_width_city": statistics.median(pooled["width_city"]) if pooled["width_city"] else None,
            "bias_factor_per_seed": [round(s["bias_factor"], 4) for s in per_seed],
            "coverage_city_per_seed": [_frac(s["city"]) for s in per_seed],
        }
        if scheme == "split":
            for m in RESAMPLED_M:
                for key in ("city", "uv", "share", "region", "region_single"):
                    conditional = [c for s in per_seed for c in s["resampled"][m][key]]
                    results[scheme][f"resampled_m{m}_{key}_marginal"] = round(float(np.mean(conditional)), 4)
                    results[scheme][f"resampled_m{m}_{key}_conditional_p05"] = round(float(np.percentile(conditional, 5)), 4)
                width = [w for s in per_seed for w in s["resampled"][m]["width"]]
                results[scheme][f"resampled_m{m}_median_width_city"] = round(float(np.median(width)), 3)
    table = Table(title="population intervals: measured coverage of the nominal 95% on the benchmark's test cities")
    for col in ("scheme", "test cities", "m (val)", "cities", "UV", "UV share", "regions", "regions, not narrowed", "width hi/lo"):
        table.add_column(col)
    for scheme, r in results.items():
        table.add_row(scheme, str(r["test_cities"]), str(r["m"]), *(f"{r[f'coverage_{k}']:.3f} (n={r[f'n_{k}']})" if r[f"coverage_{k}"] is not None
                                                                     else "-" for k in ("city", "uv", "share", "region", "region_single")),
                      f"{r['median_interval_width_city']:.2f}" if r["median_interval_width_city"] else "-")
    console.print(table)
    if "split" in results:
        table = Table(title="the same, averaged over which held-out cities calibrate (split scheme, 3 models): marginal "
                            "coverage [5th percentile of one calibration set's coverage]")
        for col in ("m", "cities", "UV", "UV share", "regions", "regions, not narrowed", "median width hi/lo"):
            table.add_column(col)
        r = results["split"]
        for m in RESAMPLED_M:
            table.add_row(str(m), *(f"{r[f'resampled_m{m}_{k}_marginal']:.3f} [{r[f'resampled_m{m}_{k}_conditional_p05']:.2f}]"
                                    for k in ("city", "uv", "share", "region", "region_single")), f"{r[f'resampled_m{m}_median_width_city']:.2f}")
        console.print(table)
    metrics = {f"{scheme}_{k}": v for scheme, r in results.items() for k, v in r.items()}
    path = write_results("population_coverage", metrics, {"protocol": {"seeds": seeds, "epochs": args.epochs, "preset": args.preset,
                                                                        "workspace": str(args.workspace), "level": 0.95},
                                                           "wall_s": round(time.perf_counter() - t_start, 1)})
    console.print(f"wrote {path}")


def _frac(values: list) -> float | None:
    have = [v for v in values if v is not None]
    return round(sum(have) / len(have), 4) if have else None


def _rate(values: list) -> str:
    have = [v for v in values if v is not None]
    return f"{sum(have)}/{len(have)}" if have else "-"


if __name__ == "__main__":
    main()
