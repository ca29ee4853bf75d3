"""What `geolink-engine change` costs next to one vintage's `map`, how much true demolition it finds, and how much
false change an unchanged city shows. Measured on the demo cities at two vintages.

Usage: python bench/change.py [--work /tmp/geolink-change] [--cities 12] [--keep]

1. `demo-data --vintages 2018,2024` (the default change knobs), `map --vintage 2018` (trains the default model),
   then, timed in the same run: `map --vintage 2024` (the model exists: prepare, infer, stitch, assess, publish) and
   `change --before default-2018 --after default-2024`. The speed target is change <= 20% of that map.
2. Demolished-UV recall (and new-UV recall, and each class's precision) against the generator's change truth
   (`cities/<city>/change_truth.tif`, the two truth rasters' difference), pixel by pixel on the change grid.
3. An unchanged second workspace (the same cities, every change knob 0, the later date still shifted 0-3 px and
   imaged by another sensor in another season), mapped at both dates with the same model: demolished + new area as a
   share of the UV area, per city. With `--model reference`-like perfect maps this is exactly the shift tolerance's
   work (tests/test_change_core.py: 0%); with the demo model it is what the model's own noise across sensors adds.

Writes bench/results/change.json. The machine is shared: compare the ratio, not the seconds, and rerun on a quiet
machine before quoting them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402
from rasterio.vrt import WarpedVRT  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import write_results  # noqa: E402

console = Console(width=150)
CLI = str(Path(sys.executable).with_name("geolink-engine"))
VINTAGES = ("2018", "2024")
CHANGE_RUN = "default-2018-to-default-2024"


def run(ws: Path, *args: str) -> float:
    """One CLI command in ``ws``'s parent, quiet; its wall seconds (a failure stops the bench with its output)."""
    t0 = time.perf_counter()
    out = subprocess.run([CLI, "--workspace", str(ws), *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    seconds = time.perf_counter() - t0
    if out.returncode not in (0,):
        console.print(out.stdout[-3000:], out.stderr[-3000:])
        raise SystemExit(f"{' '.join(args)} exited {out.returncode}")
    return seconds


def confusion(ws: Path, change_run: str) -> dict[str, np.ndarray]:
    """Per city, the 4x4 pixel table truth change code (rows) x mapped change code (columns)."""
    out = {}
    for cog in sorted((ws / "products" / change_run / "cities").glob("*/change.tif")):
        city = cog.parent.name
        truth_path = ws / "cities" / city / "change_truth.tif"
        with rasterio.open(cog) as mapped, rasterio.open(truth_path) as truth_src:
            codes = mapped.read(1)
            with WarpedVRT(truth_src, crs=mapped.crs, transform=mapped.transform, width=mapped.width, height=mapped.height,
                           resampling=Resampling.nearest, nodata=255) as truth:
                true = truth.read(1)
        ok = (codes < 4) & (true < 4)
        table = np.zeros((4, 4), np.int64)
        np.add.at(table, (true[ok].astype(int), codes[ok].astype(int)), 1)
        out[city] = table
    return out


def unchanged_share(ws: Path, change_run: str) -> dict[str, float]:
    """Per city: (demolished + new) / before-UV area of the change map (change_stats.csv)."""
    import csv

    rows = list(csv.DictReader((ws / "products" / change_run / "change_stats.csv").open()))
    return {r["city"] or r["region"] or "national": (float(r["demolished_uv_m2"]) + float(r["new_uv_m2"])) / float(r["before_uv_m2"])
            for r in rows if r.get("before_uv_m2") not in ("", None) and float(r["before_uv_m2"]) > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/geolink-change")
    parser.add_argument("--cities", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ws, still = work / "ws", work / "unchanged"

    seconds = {"demo_data": run(ws, "demo-data", "--cities", str(args.cities), "--vintages", ",".join(VINTAGES), "--workers", "2")}
    seconds["map_2018_with_training"] = run(ws, "map", "--vintage", VINTAGES[0])
    seconds["map_2024"] = run(ws, "map", "--vintage", VINTAGES[1])
    seconds["change"] = run(ws, "change", "--before", f"default-{VINTAGES[0]}", "--after", f"default-{VINTAGES[1]}")
    ratio = seconds["change"] / seconds["map_2024"]

    tables = confusion(ws, CHANGE_RUN)
    total = sum(tables.values())
    names = ("other", "persistent_uv", "demolished_uv", "new_uv")
    recall = {n: float(total[i, i] / total[i].sum()) if total[i].sum() else None for i, n in enumerate(names)}
    precision = {n: float(total[i, i] / total[:, i].sum()) if total[:, i].sum() else None for i, n in enumerate(names)}
    # a demolished village counted as found where the map says demolished OR the map lost its UV there
    truth_area = {n: int(total[i].sum()) for i, n in enumerate(names)}

    # the unchanged cities: same ground, no change, shifted and re-sensed later image, the same model
    from engine.synth.config import SynthConfig, VintageConfig
    from engine.synth.demo import write_demo

    frozen = VintageConfig(demolish_share=0.0, redevelop_share=0.0, new_uv_share=0.0, roof_recolour_share=0.0, tree_growth=0.0)
    write_demo(still, args.cities, replace(SynthConfig(), vintage=frozen), seed=0, workers=2, vintages=VINTAGES)
    shutil.copytree(ws / "models" / "default", still / "models" / "default")
    for v in VINTAGES:
        run(still, "map", "--vintage", v)
    run(still, "change", "--before", f"default-{VINTAGES[0]}", "--after", f"default-{VINTAGES[1]}")
    false_change = unchanged_share(still, CHANGE_RUN)
    still_tables = confusion(still, CHANGE_RUN)
    still_total = sum(still_tables.values())

    view = Table(title=f"change on {args.cities} demo cities, 2 vintages (shared machine: compare the ratio)")
    view.add_column("metric")
    view.add_column("value", justify="right")
    for k, v in seconds.items():
        view.add_row(f"{k} (s)", f"{v:.1f}")
    view.add_row("change / map 2024 (target <= 0.20)", f"{ratio:.3f}")
    for n in names:
        view.add_row(f"{n}: recall / precision vs truth (pixels)",
                     f"{recall[n] if recall[n] is not None else float('nan'):.3f} / {precision[n] if precision[n] is not None else float('nan'):.3f}")
    view.add_row("unchanged cities: (demolished + new) / UV, national", f"{false_change.get('national', float('nan')):.3f}")
    view.add_row("unchanged cities: pixels mapped as change where nothing changed", str(int(still_total[:, 2:].sum() - still_total[2:, 2:].sum())))
    console.print(view)

    metrics = {"seconds": seconds, "change_over_map_ratio": ratio, "target_ratio": 0.2,
               "recall_vs_truth": recall, "precision_vs_truth": precision, "truth_pixels": truth_area,
               "confusion_truth_x_map_pixels": total.tolist(),
               "unchanged_false_change_share": false_change,
               "unchanged_confusion_truth_x_map_pixels": still_total.tolist()}
    path = write_results("change", metrics, {"note": "demo model (tiny, 3 epochs); shared 2-core machine"})
    console.print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
