"""Ray job entry point for `prepare` (same code as `geolink-engine prepare`).

    ray job submit --working-dir . -- python jobs/prepare.py --workspace /shared/geolink-data --cities all
"""

from __future__ import annotations

import argparse
import sys

from engine.model_input import InputSpec, Radiometry, parse_bands
from engine.pipelines.prepare import run_prepare
from engine.pipelines.runtime import init_ray
from engine.tiles.city import PrepareConfig
from engine.tiles.grid import TileGridConfig
from scope import add_scope_args, load_scope  # jobs/ is the script's folder, first on sys.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scope_args(parser)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--gsd", type=float, default=None, help="resample every city on read to this ground GSD (m); default: its own")
    parser.add_argument("--bands", default=None, help="source bands read as R,G,B, e.g. 3,2,1 (a catalog 'bands' cell overrides it)")
    parser.add_argument("--radiometry", default=None, help="auto | uint8 | percentile:LO,HI | range:MIN,MAX (a catalog cell overrides it)")
    parser.add_argument("--allow-gsd-mismatch", action="store_true", help="with --gsd: resample even imagery more than 3x coarser")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    try:
        workspace, catalog = load_scope(args)
        cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=args.tile_size, overlap_px=args.overlap))
        spec = InputSpec(bands=parse_bands(args.bands), radiometry=Radiometry.parse(args.radiometry), gsd_m=args.gsd,
                         allow_gsd_mismatch=args.allow_gsd_mismatch)
    except ValueError as exc:  # CatalogError too: one line, before Ray starts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray("auto")
    results = run_prepare(catalog, workspace, cfg, force=args.force, imagery=spec)
    for r in results:
        print(f"{r.city}\t{r.status}\t{r.tiles}\t{r.error}")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
