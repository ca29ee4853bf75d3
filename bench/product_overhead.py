"""What GeoLink-UV's analysis products add to the demo `map` run: building morphology per city and the regional table.

Writes the 12 demo cities, runs `map --cities all --model reference` once (a model with no training time, so the
base is the smallest and the ratio the strictest), then times again, on the same products, the work the analysis
products add: each city's morphology (:func:`engine.stitch.city_morphology.city_morphology`: buildings read,
zones traced, metrics), and ``morphology.csv``/``regions.csv`` with their charts. Reports the sum as a share of the
run's wall time (target: at most 10%), in ``bench/results/product_overhead.json``.

    .venv/bin/python bench/product_overhead.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from engine.catalog import load_catalog
    from engine.mapping.store import read_manifest
    from engine.morphology import MorphologyRollup
    from engine.pipelines.map import REFERENCE_MODEL, MapConfig, run_map
    from engine.products.regions import write_regions
    from engine.stitch.city_morphology import city_morphology
    from engine.stitch.products import write_morphology
    from engine.synth.demo import write_demo
    from engine.workspace import Workspace

    ws = Workspace.at(Path(args.workdir or tempfile.mkdtemp(prefix="overhead-")) / "ws")
    catalog = load_catalog(write_demo(ws, 12, seed=0))
    t0 = time.perf_counter()
    report = run_map(catalog, ws, MapConfig(run="overhead", model_dir=REFERENCE_MODEL))
    wall = time.perf_counter() - t0
    assert not report.failed, report.failed

    products = ws.products("overhead")
    manifest = read_manifest(ws.run("overhead").root)
    villages = pq.read_table(products / "urban_villages.parquet", columns=["city", "geometry"])
    rollup, buildings = MorphologyRollup(), 0
    t1 = time.perf_counter()
    for row in catalog.to_pylist():
        wkb = [g for c, g in zip(villages["city"].to_pylist(), villages["geometry"].to_pylist()) if c == row["city"]]
        morph = city_morphology(row, wkb, products / "cities" / row["city"] / "class.tif", manifest.classes, True)
        buildings += morph.buildings
        rollup.add_city(row["city"], row["region"], morph.summaries)
    morphology_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    write_morphology(rollup.rows(), products)
    write_regions(products)
    tables_s = time.perf_counter() - t2

    added = morphology_s + tables_s
    metrics = {"map_wall_s": round(wall, 2), "morphology_s": round(morphology_s, 2), "tables_and_charts_s": round(tables_s, 2),
               "added_share_of_map_wall": round(added / wall, 4), "target_met": added / wall <= 0.10, "cities": catalog.num_rows,
               "buildings": buildings, "stages_s": {k: round(v, 2) for k, v in report.seconds.items()}}
    table = Table(title="analysis products' cost in the demo map run (reference model)")
    for key in ("map_wall_s", "morphology_s", "tables_and_charts_s", "added_share_of_map_wall", "buildings"):
        table.add_row(key, str(metrics[key]))
    console.print(table)
    path = write_results("product_overhead", metrics, {
        "setup": "12 demo cities (1 km, seed 0), `map --model reference` in one process with a local Ray; the added work "
                 "re-timed on the same products after the run (one process, the driver's core)"})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
