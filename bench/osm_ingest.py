"""Benchmark the country-scale OSM ingest (engine/osm/dataset_writer.py): features per second per core, and peak RSS
when a 10x larger PBF streams into the partitioned dataset.

Usage: python bench/osm_ingest.py [--cities 24] [--scale 10] [--city-km 4] [--flush-rows 50000]

Input: one synthetic city's OSM (engine.synth: layout + draw_osm, ~7,000 features for 4 km) copied to ``cities``
positions 0.25 degrees apart on a square grid (16 cities per 1-degree cell: a larger country has more cells, not
denser ones), each copy with its own node/way/relation ids, written with ``osmium.SimpleWriter`` into one PBF: tagged
nodes for points, ways over untagged vertex nodes for lines and polygons, and every 20th polygon as a multipolygon
relation (an untagged outer way plus a hole), so the area assembler works too. The 1x and ``--scale`` x PBFs are
ingested each in a fresh subprocess (``ingest_osm_dataset``, 1-degree cells, default flush size); its peak RSS is its
own ``ru_maxrss`` at the end (the PBFs are written by other subprocesses, so the parent stays small and no writer's
peak is counted), and a sampler thread in the child records peak anonymous memory
(``RssAnon``) and peak file-backed memory (``RssFile``: shared libraries and the pages of the on-disk node index that
are mapped between two batches; the writer hands those back to the kernel after each batch). Writes
bench/results/osm_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import run_json_child, write_results  # noqa: E402

console = Console(width=160)
SPACING_DEG = 0.25
ORIGIN = (100.125, 20.125)  # south-west city centre (lon, lat): 16 cities per 1-degree cell, none on a cell edge


def city_template(city_km: float, seed: int = 0):
    """One synthetic city's OSM as lon/lat offsets from its centre: (points, lines, polygons) with tags."""
    import numpy as np
    import shapely

    from engine.synth.city import city_rng
    from engine.synth.config import SynthConfig, draw_city_params
    from engine.synth.layout import build_layout
    from engine.synth.osm import draw_osm

    cfg = SynthConfig(size_km=city_km, osm_completeness=(0.9, 0.95))
    rng = city_rng(seed, "osm-ingest-bench")
    params = draw_city_params(cfg, rng, None)
    layout = build_layout(params, city_km * 1000.0, rng)
    osm = draw_osm(layout, params, rng)
    half = city_km * 500.0
    m_per_deg_lat, m_per_deg_lon = 110_574.0, 111_320.0 * math.cos(math.radians(ORIGIN[1]))
    geoms = shapely.transform(osm.geometry, lambda xy: (xy - half) / np.array([m_per_deg_lon, m_per_deg_lat]))
    points, lines, polygons = [], [], []
    for geom, tags in zip(geoms, osm.tags):
        for part in shapely.get_parts(geom):
            if part.geom_type == "Point":
                points.append((part.x, part.y, tags))
            elif part.geom_type == "LineString":
                lines.append((np.asarray(part.coords), tags))
            elif part.geom_type == "Polygon" and len(part.exterior.coords) >= 4:
                polygons.append((np.asarray(part.exterior.coords)[:-1], tags))
    return points, lines, polygons


def write_pbf(path: Path, cities: int, template) -> dict:
    """``cities`` copies of the template on a 0.25-degree grid, one PBF (all nodes, then all ways, then relations)."""
    import osmium
    from osmium.osm.mutable import Node, Relation, Way

    points, lines, polygons = template
    shrink = 0.5  # the hole of every 20th polygon (a multipolygon relation): the outer ring scaled about its mean
    rings = [[ring] + ([ring.mean(axis=0) + (ring - ring.mean(axis=0)) * shrink] if j % 20 == 0 else [])
             for j, (ring, _) in enumerate(polygons)]
    # template-local ids: nodes numbered points, line vertices, ring vertices; ways lines then rings
    nid = len(points)
    line_nodes = []
    for coords, _ in lines:
        line_nodes.append(list(range(nid, nid + len(coords))))
        nid += len(coords)
    ring_nodes = []
    for rs in rings:
        ring_nodes.append([])
        for r in rs:
            ring_nodes[-1].append(list(range(nid, nid + len(r))))
            nid += len(r)
    n_nodes, n_ways, n_rels = nid, len(lines) + sum(len(rs) for rs in rings), sum(len(rs) > 1 for rs in rings)
    side = math.ceil(math.sqrt(cities))
    t0 = time.perf_counter()
    with osmium.SimpleWriter(str(path), overwrite=True) as writer:
        for k in range(cities):
            dx, dy = ORIGIN[0] + (k % side) * SPACING_DEG, ORIGIN[1] + (k // side) * SPACING_DEG
            base = k * n_nodes + 1
            for i, (x, y, tags) in enumerate(points):
                writer.add_node(Node(id=base + i, location=(x + dx, y + dy), tags=tags))
            for (coords, _), ids in zip(lines, line_nodes):
                for (x, y), i in zip(coords.tolist(), ids):
                    writer.add_node(Node(id=base + i, location=(x + dx, y + dy)))
            for rs, ids_of_rings in zip(rings, ring_nodes):
                for r, ids in zip(rs, ids_of_rings):
                    for (x, y), i in zip(r.tolist(), ids):
                        writer.add_node(Node(id=base + i, location=(x + dx, y + dy)))
        for k in range(cities):
            base, wid = k * n_nodes + 1, k * n_ways + 1
            for (_, tags), ids in zip(lines, line_nodes):
                writer.add_way(Way(id=wid, nodes=[base + i for i in ids], tags=tags))
                wid += 1
            for (_, tags), ids_of_rings in zip(polygons, ring_nodes):
                for ids in ids_of_rings:  # a relation's rings are untagged: the relation carries the tags
                    writer.add_way(Way(id=wid, nodes=[base + i for i in ids + ids[:1]], tags=tags if len(ids_of_rings) == 1 else {}))
                    wid += 1
        for k in range(cities):
            rid, wid = k * n_rels + 1, k * n_ways + 1 + len(lines)
            for (_, tags), ids_of_rings in zip(polygons, ring_nodes):
                if len(ids_of_rings) > 1:
                    writer.add_relation(Relation(id=rid, members=[("w", wid, "outer"), ("w", wid + 1, "inner")],
                                                 tags={"type": "multipolygon", **tags}))
                    rid += 1
                wid += len(ids_of_rings)
    return {"nodes": n_nodes * cities, "ways": n_ways * cities, "relations": n_rels * cities,
            "write_s": time.perf_counter() - t0, "pbf_mib": path.stat().st_size / 2**20}


def _sample_memory(peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
            for key in ("RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(fields[key].split()[0]))
        except (OSError, KeyError, ValueError):
            return
        stop.wait(0.02)


def ingest(pbf: str, out: str, flush_rows: int) -> dict:
    """Child process: one dataset ingest, timed, with the memory sampler running."""
    from engine.osm.dataset_writer import ingest_osm_dataset

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(peaks, stop), daemon=True)
    sampler.start()
    w0, c0 = time.perf_counter(), time.process_time()
    report = ingest_osm_dataset(pbf, out, flush_rows=flush_rows)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    stop.set()
    sampler.join()
    return {"features": report.features, "by_kind": report.by_kind, "partitions": report.partitions,
            "dropped": report.dropped, "repaired": report.repaired, "ingest_wall_s": wall, "ingest_cpu_s": cpu,
            "rss_after_imports_mib": rss_imports / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_anon_mib": peaks.get("RssAnon", 0) / 1024,
            "peak_rss_file_mib": peaks.get("RssFile", 0) / 1024}


def child(pbf: Path, out: Path, flush_rows: int) -> dict:
    """One ingest in a fresh process; the parent stays small, so the child's ``ru_maxrss`` is its own."""
    t0 = time.perf_counter()
    doc = run_json_child([sys.executable, __file__, "--child", str(pbf), str(out), "--flush-rows", str(flush_rows)])
    doc["process_wall_s"] = time.perf_counter() - t0
    doc["dataset_mib"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cities", type=int, default=24)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--city-km", type=float, default=4.0)
    parser.add_argument("--flush-rows", type=int, default=50_000)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ingest(*args.child, flush_rows=args.flush_rows)))
        return
    if args.write:
        print(json.dumps(write_pbf(Path(args.write[0]), int(args.write[1]), city_template(args.city_km))))
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="osm-ingest-bench-") as tmp:
        for n in (args.cities, args.cities * args.scale):  # the smaller first: RUSAGE_CHILDREN keeps the maximum
            pbf = Path(tmp) / f"country-{n}.osm.pbf"
            written = run_json_child([sys.executable, __file__, "--write", str(pbf), str(n), "--city-km", str(args.city_km)])
            run = child(pbf, Path(tmp) / f"dataset-{n}", args.flush_rows)
            runs.append({"cities": n, **written, **run})
            pbf.unlink()
    view = Table(title=f"OSM PBF -> partitioned GeoParquet (1-degree cells, flush {args.flush_rows:,} features), fresh process each")
    for col in ("run", "cities", "PBF MiB", "nodes", "features", "partitions", "ingest s (wall / cpu)",
                "features/s (wall)", "features/s per core (cpu)", "peak RSS MiB", "peak anon / file MiB", "RSS after imports"):
        view.add_column(col)
    for name, r in zip(("1x", f"{args.scale}x"), runs, strict=True):
        r["features_per_s_wall"] = r["features"] / r["ingest_wall_s"]
        r["features_per_s_per_core"] = r["features"] / r["ingest_cpu_s"]
        view.add_row(name, str(r["cities"]), f"{r['pbf_mib']:.1f}", f"{r['nodes']:,}", f"{r['features']:,}", str(r["partitions"]),
                     f"{r['ingest_wall_s']:.1f} / {r['ingest_cpu_s']:.1f}", f"{r['features_per_s_wall']:,.0f}",
                     f"{r['features_per_s_per_core']:,.0f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['peak_rss_anon_mib']:.0f} / {r['peak_rss_file_mib']:.0f}", f"{r['rss_after_imports_mib']:.0f}")
    console.print(view)
    ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    anon_ratio = runs[1]["peak_rss_anon_mib"] / runs[0]["peak_rss_anon_mib"]
    ok = ratio <= 1.3
    console.print(f"peak RSS {args.scale}x / 1x = {ratio:.3f} (target <= 1.3): {'ok' if ok else 'FAILED'}; "
                  f"anonymous memory {anon_ratio:.3f}")
    metrics = {
        "features_per_s_per_core": round(runs[1]["features_per_s_per_core"]),
        "features_per_s_wall": round(runs[1]["features_per_s_wall"]),
        "peak_rss_ratio_10x_over_1x": round(ratio, 3),
        "peak_rss_anon_ratio_10x_over_1x": round(anon_ratio, 3),
        "peak_rss_target_met": ok,
        "runs": {name: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                 for name, r in zip(("1x", f"{args.scale}x"), runs, strict=True)},
    }
    path = write_results("osm_ingest", metrics, {
        "setup": f"one synthetic {args.city_km:g} km city's OSM copied to {args.cities} (1x) and {args.cities * args.scale} "
                 f"({args.scale}x) positions {SPACING_DEG} degrees apart, one PBF each (osmium.SimpleWriter; every 20th polygon a "
                 "multipolygon relation with a hole); each ingest_osm_dataset run in a fresh process (1-degree cells, "
                 f"flush {args.flush_rows:,}, sparse_file_array node index, DuckDB merge limit 512MB); PBF writing not timed"})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
