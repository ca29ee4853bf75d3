"""Ray job entry point: write the synthetic demo workspace (same code as `geolink-engine demo-data`).

    ray job submit --working-dir . -- python jobs/demo_data.py --workspace /shared/geolink-data --cities 342
"""

from __future__ import annotations

import argparse

from engine.synth.config import SynthConfig
from engine.synth.demo import write_demo
from engine.workspace import Workspace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="geolink-data", help="folder or s3://bucket/prefix shared by every node")
    parser.add_argument("--cities", type=int, default=12)
    parser.add_argument("--size-km", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    path = write_demo(Workspace.at(args.workspace), args.cities, SynthConfig(size_km=args.size_km), seed=args.seed, workers=args.workers)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
