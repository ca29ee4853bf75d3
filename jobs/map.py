"""Ray job: the main mapping run (same code as `geolink-engine map`).

    ray job submit --working-dir . -- python jobs/map.py --workspace s3://BUCKET/geolink --cities all --devices 16 --model s3://BUCKET/geolink/models/finetune

A rerun of the same command (same --run) resumes from the run's ledger: committed tiles are not predicted again.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.pipelines.infer import InferenceConfig
from engine.pipelines.map import MapConfig, default_model, map_catalog, run_map
from engine.workspace import Workspace


def progress_printer(every_fraction: float = 0.05, every_s: float = 30.0):
    """``on_commit`` for job logs (no progress bar there): a line per 5% of the tiles committed, or per 30 s."""
    state = {"done": 0, "printed": 0, "at": time.monotonic()}

    def on_commit(n: int, total: int) -> None:
        state["done"] += n
        if state["done"] - state["printed"] >= every_fraction * total or time.monotonic() - state["at"] >= every_s or state["done"] >= total:
            print(f"committed {state['done']}/{total} tiles", flush=True)
            state["printed"], state["at"] = state["done"], time.monotonic()

    return on_commit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="geolink-data", help="folder or s3://bucket/prefix shared by every node")
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--cities", default="all")
    parser.add_argument("--model", default=None, help="model bundle (folder or URI); default: models/default (trained first if absent); "
                                                      "'reference': the reference polygons as a perfect model")
    parser.add_argument("--run", default=None, help="run name (default: default, or default-<vintage> with --vintage)")
    parser.add_argument("--vintage", default=None, help="one date of a multi-date catalog (its `vintage` column)")
    parser.add_argument("--mode", default=None, choices=["fused", "image", "osm"])
    parser.add_argument("--tile-size", type=int, default=224, help="tile size when no model fixes it")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per model call (default: 16 on CPU, 64 on GPUs)")
    parser.add_argument("--devices", type=int, default=0, help="GPUs (one predictor actor each)")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--actors-per-gpu", type=int, default=1, help="predictor actors sharing one GPU (keeps a fast GPU busy)")
    parser.add_argument("--allow-gsd-mismatch", action="store_true", help="map cities whose ground GSD is more than 3x off the model's")
    parser.add_argument("--gsd", type=float, default=None, help="resample every city on read to this ground GSD (m); default: into the model's range")
    parser.add_argument("--bands", default=None, help="source bands read as R,G,B, e.g. 3,2,1 (a catalog 'bands' cell overrides it)")
    parser.add_argument("--radiometry", default=None, help="auto | uint8 | percentile:LO,HI | range:MIN,MAX (a catalog cell overrides it)")
    parser.add_argument("--population-model", default=None, help="population model (finetune --task population): residents per "
                                                                  "100 m cell, per UV polygon, per city and region (population.csv)")
    parser.add_argument("--address", default="auto", help="'auto' (RAY_ADDRESS or the local cluster), ray://host:10001, or 'local'")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    try:
        workspace = Workspace.at(args.workspace).with_vintage(args.vintage)
        run = args.run or (f"default-{args.vintage}" if args.vintage else "default")
        _, catalog = map_catalog(workspace, args.catalog, args.cities, say=lambda msg: print(msg, flush=True), vintage=args.vintage)
        cfg = MapConfig(run=run, model_dir=args.model, vintage=args.vintage, mode=args.mode, tile_size_px=args.tile_size,
                        allow_gsd_mismatch=args.allow_gsd_mismatch, gsd_m=args.gsd, bands=args.bands, radiometry=args.radiometry,
                        population_model=args.population_model, inference=InferenceConfig(batch_size=args.batch_size, gpus=args.devices, actors=args.actors,
                                                  actors_per_gpu=args.actors_per_gpu))
        report = run_map(catalog, workspace, cfg,
                         ensure_model=lambda cat: default_model(workspace, cat, use_gpu=args.devices > 0, say=print),
                         on_stage=lambda msg: print(msg, flush=True), on_commit=progress_printer(), address=args.address)
    except (ValueError, FileNotFoundError) as exc:  # a bad catalog or model bundle: one line, before any stage
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for c in report.cities:
        print(f"{c.city}\t{c.status}\t{c.tiles_ok}\t{c.tiles_failed}\t{c.polygons}\t{c.uv_area_m2:.0f}\t{c.stage}\t{c.error}")
    if report.assessment_failed:
        print(f"assessment {report.assessment}")
    if isinstance(report.population, str):
        print(f"population {report.population}")
    print(f"products: {report.products}")
    return 1 if report.failed or report.assessment_failed or isinstance(report.population, str) else 0


if __name__ == "__main__":
    sys.exit(main())
