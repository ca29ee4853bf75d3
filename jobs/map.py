"""Ray job: the main mapping run (same code as `geolink-engine map`).

    ray job submit --working-dir . -- python jobs/map.py --workspace /shared/geolink-data --cities all --devices 8
"""

from __future__ import annotations

import argparse
import sys

from engine.catalog import find_catalog, load_catalog, select_cities
from engine.mapping.infer import InferenceConfig
from engine.pipelines.map import MapConfig, default_model, run_map
from engine.pipelines.runtime import init_ray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="geolink-data")
    parser.add_argument("--catalog", default=None)
    parser.add_argument("--cities", default="all")
    parser.add_argument("--model", default=None, help="model bundle; default: models/default (trained first if absent)")
    parser.add_argument("--run", default="default")
    parser.add_argument("--mode", default=None, choices=["fused", "image", "osm"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=0, help="GPUs (one predictor actor each)")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--address", default="auto")
    args = parser.parse_args()
    catalog = select_cities(load_catalog(args.catalog or find_catalog(args.workspace)), args.cities)
    init_ray(args.address)
    cfg = MapConfig(run=args.run, model_dir=args.model, mode=args.mode,
                    inference=InferenceConfig(batch_size=args.batch_size, gpus=args.devices, actors=args.actors))
    report = run_map(catalog, args.workspace, cfg, ensure_model=lambda cat: default_model(args.workspace, cat, use_gpu=args.devices > 0, say=print),
                     on_stage=print)
    for c in report.cities:
        print(f"{c.city}\t{c.status}\t{c.tiles_ok}\t{c.tiles_failed}\t{c.polygons}\t{c.uv_area_m2:.0f}\t{c.stage}\t{c.error}")
    print(f"products: {report.products}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
