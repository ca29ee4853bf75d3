"""Benchmark the building-morphology core (engine/morphology.py): throughput in buildings per second per core, and
peak RSS when 10x more buildings stream through city by city.

Usage: python bench/morphology.py [--cities 10] [--city-buildings 100000] [--scale 10]

Synthetic cities (seeded, one per city, generated then dropped): a lattice of 150 m cells whose corners are jittered
by up to 15 m, so zones are 1.6-2.9 ha quadrilaterals and buildings straddle their edges; 30 % of the cells are UV
zones (8-13 m footprints on a 15 m pitch), 50 % formal residential (12-25 m on 30 m), 20 % no zone (buildings that
belong to no zone); footprints rotated up to 17 degrees, positions jittered; heights and levels missing for part of
the buildings. Per city: ``zone_stats`` over all its zones, ``.table()`` (the new columns), ``summarise`` by group and
``MorphologyRollup.add_city`` (per-region totals in bounded memory): the timed "morphology" work, in one process,
so one core. Each run (1x and ``--scale`` x the buildings) is a fresh subprocess; its peak RSS is its
``ru_maxrss``. Writes bench/results/morphology.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import run_json_child, write_results  # noqa: E402

console = Console(width=150)
CELL_M = 150.0
# type: (share of cells, pitch m, footprint side range m, levels range)
TYPES = {"uv": (0.3, 15.0, (8.0, 13.0), (2, 8)), "formal_residential": (0.5, 30.0, (12.0, 25.0), (5, 30)),
         "none": (0.2, 25.0, (10.0, 20.0), (1, 6))}


def synthetic_city(seed: int, buildings: int):
    """(zones, group label per zone, footprints, height_m, levels) of about ``buildings`` buildings, metres."""
    import numpy as np
    import shapely

    rng = np.random.default_rng(seed)
    per_cell = sum(share * (CELL_M // pitch) ** 2 for share, pitch, _, _ in TYPES.values())
    side = max(1, math.ceil(math.sqrt(buildings / per_cell)))
    kinds = np.array(list(TYPES))
    cell_kind = rng.choice(len(kinds), size=(side, side), p=[t[0] for t in TYPES.values()])
    corners = np.stack(np.meshgrid(np.arange(side + 1), np.arange(side + 1), indexing="ij"), -1) * CELL_M
    corners = corners + rng.uniform(-15.0, 15.0, corners.shape)
    i, j = np.nonzero(kinds[cell_kind] != "none")
    ring = np.stack([corners[i, j], corners[i + 1, j], corners[i + 1, j + 1], corners[i, j + 1], corners[i, j]], 1)
    zones = shapely.polygons(ring)
    labels = kinds[cell_kind[i, j]]

    parts = []
    for k, (_, pitch, (lo, hi), (lv_lo, lv_hi)) in enumerate(TYPES.values()):
        ci, cj = np.nonzero(cell_kind == k)
        m = int(CELL_M // pitch)
        local = (np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij"), -1).reshape(-1, 2) + 0.5) * pitch
        centre = (np.stack([ci, cj], 1)[:, None, :] * CELL_M + local[None]).reshape(-1, 2)
        n = len(centre)
        centre = centre + rng.uniform(-1.5, 1.5, (n, 2))
        w, h = rng.uniform(lo, hi, n), rng.uniform(lo, hi, n)
        theta = rng.uniform(-0.3, 0.3, n)
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5]])
        xy = unit[None] * np.stack([w, h], 1)[:, None, :]
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        ring = np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], -1) + centre[:, None, :]
        lv = rng.integers(lv_lo, lv_hi + 1, n).astype(float)
        height = lv * 3.0 + rng.uniform(-1.0, 1.0, n)
        height[rng.random(n) < 0.4] = np.nan
        lv[rng.random(n) < 0.3] = np.nan
        parts.append((shapely.polygons(ring), height, lv))
    footprints, height, levels = (np.concatenate(p) for p in zip(*parts, strict=True))
    return zones, labels, footprints, height, levels


def stream(cities: int, city_buildings: int) -> dict:
    """Child process: ``cities`` synthetic cities through the morphology core, one at a time."""
    from engine.morphology import MorphologyRollup, summarise, zone_stats

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rollup = MorphologyRollup()
    n_buildings = n_zones = 0
    gen_s = wall_s = cpu_s = 0.0
    for c in range(cities):
        t0 = time.perf_counter()
        zones, labels, fps, height, levels = synthetic_city(c, city_buildings)
        gen_s += time.perf_counter() - t0
        w0, p0 = time.perf_counter(), time.process_time()
        stats = zone_stats(zones, fps, height, levels)
        stats.table()
        rollup.add_city(f"city-{c:04d}", f"region-{c % 4}", summarise(stats, labels))
        wall_s += time.perf_counter() - w0
        cpu_s += time.process_time() - p0
        n_buildings += len(fps)
        n_zones += len(zones)
        del zones, labels, fps, height, levels, stats
    rows = rollup.rows()
    return {"cities": cities, "buildings": n_buildings, "zones": n_zones, "generate_s": gen_s, "morphology_wall_s": wall_s,
            "morphology_cpu_s": cpu_s, "rss_after_imports_mib": rss_imports / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": len(rows),
            "sample_row": next(r for r in rows if r["level"] == "region" and r["group"] == "uv")}


def child(cities: int, city_buildings: int) -> dict:
    t0 = time.perf_counter()
    doc = run_json_child([sys.executable, __file__, "--child", str(cities), "--city-buildings", str(city_buildings)])
    doc["process_wall_s"] = time.perf_counter() - t0
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cities", type=int, default=10)
    parser.add_argument("--city-buildings", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stream(args.child, args.city_buildings)))
        return

    runs = [child(args.cities, args.city_buildings), child(args.cities * args.scale, args.city_buildings)]
    view = Table(title="building morphology, city by city, one process (one core)")
    for col in ("run", "cities", "buildings", "zones", "morphology s (wall / cpu)", "buildings/s/core (wall / cpu)",
                "generate s", "peak RSS MiB", "RSS after imports"):
        view.add_column(col)
    for name, r in zip(("1x", f"{args.scale}x"), runs, strict=True):
        r["buildings_per_s_per_core_wall"] = r["buildings"] / r["morphology_wall_s"]
        r["buildings_per_s_per_core_cpu"] = r["buildings"] / r["morphology_cpu_s"]
        view.add_row(name, str(r["cities"]), f"{r['buildings']:,}", f"{r['zones']:,}",
                     f"{r['morphology_wall_s']:.1f} / {r['morphology_cpu_s']:.1f}",
                     f"{r['buildings_per_s_per_core_wall']:,.0f} / {r['buildings_per_s_per_core_cpu']:,.0f}",
                     f"{r['generate_s']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['rss_after_imports_mib']:.0f}")
    console.print(view)
    ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    ok = ratio <= 1.3 and runs[0]["buildings"] >= 1_000_000
    console.print(f"peak RSS {args.scale}x / 1x = {ratio:.3f} (target <= 1.3): {'ok' if ok else 'FAILED'}")
    sample = runs[1].pop("sample_row")
    runs[0].pop("sample_row")
    console.print(f"a region row ({args.scale}x run): {sample}")
    metrics = {
        "buildings_per_s_per_core": round(runs[0]["buildings_per_s_per_core_wall"]),
        "buildings_per_s_per_core_cpu": round(runs[0]["buildings_per_s_per_core_cpu"]),
        "peak_rss_ratio_10x_over_1x": round(ratio, 3),
        "peak_rss_target_met": ok,
        "runs": {name: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                 for name, r in zip(("1x", f"{args.scale}x"), runs, strict=True)},
    }
    path = write_results("morphology", metrics, {
        "setup": f"synthetic cities of ~{args.city_buildings:,} buildings (zones 1.6-2.9 ha, 30 % UV, 50 % formal), "
                 f"{args.cities} cities (1x) and {args.cities * args.scale} (x{args.scale}), each run in a fresh process; "
                 "timed: zone_stats + table + summarise + rollup per city; generation not timed"})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
