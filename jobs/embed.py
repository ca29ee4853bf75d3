"""Ray job: encodings of the prepared tiles (same code as `geolink-engine embed`).

    ray job submit --working-dir . -- python jobs/embed.py --workspace s3://BUCKET/geolink --run national --level tile --devices 8

A rerun of the same command resumes from the pass's ledger (runs/<run>/embeddings/<mode>_<level>/): committed tiles
are not encoded again.
"""

from __future__ import annotations

import argparse
import sys

from engine.pipelines.embed import EmbedConfig, run_embed
from engine.pipelines.infer import InferenceConfig
from map import progress_printer  # jobs/ is the script's folder, first on sys.path (as train_args for the training jobs)
from scope import add_scope_args, load_scope


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scope_args(parser)
    parser.add_argument("--run", default="default")
    parser.add_argument("--model", default=None, help="model bundle (folder or URI); default: the map run's model, else models/default")
    parser.add_argument("--mode", default=None, choices=["fused", "image", "osm"])
    parser.add_argument("--level", default="tile", choices=["tile", "patch"])
    parser.add_argument("--points", default=None, help="points file (vector with a CRS, or CSV of lon/lat): the embedding at each point")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per model call (default: 16 on CPU, 64 on GPUs)")
    parser.add_argument("--devices", type=int, default=0, help="GPUs (one encoder actor each)")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--address", default="auto", help="'auto' (RAY_ADDRESS or the local cluster), ray://host:10001, or 'local'")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    try:
        workspace, catalog = load_scope(args)
        cfg = EmbedConfig(run=args.run, model_dir=args.model, mode=args.mode, level=args.level, points=args.points,
                          inference=InferenceConfig(batch_size=args.batch_size, gpus=args.devices, actors=args.actors))
        report = run_embed(catalog, workspace, cfg, on_stage=lambda msg: print(msg, flush=True), on_commit=progress_printer(),
                           address=args.address)
    except (ValueError, FileNotFoundError) as exc:  # a bad catalog, model, mode or points file: one line, before Ray
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{report.rows} rows ({report.mode}, {report.level}) in {report.path}; {report.inference.predicted} tiles encoded, "
          f"{report.inference.skipped} done before, {report.inference.failed} failed", flush=True)
    if line := report.unmatched_line():
        print(f"warning: {line}", flush=True)
    for city, tile, attempts, error in report.failures:
        print(f"failed\t{city}\t{tile}\t{attempts}\t{error}")
    return 1 if report.failures or report.points_without_tile else 0


if __name__ == "__main__":
    sys.exit(main())
