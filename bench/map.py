"""Benchmark `map`: end-to-end inference vs model-only throughput, stitching cost, and scaling with cities.

Usage: python bench/map.py [--quick] [--preset tiny] [--batch-size 16]

1. Model-only: the predictor (same model, same batch size, one actor's threads) on tiles already in memory
   (pixels read and graphs collated beforehand), tiles/s.
2. End to end on the 12 demo cities (1 km): prepare, then inference through Ray Data (window reads, graph rows,
   actor pool, atomic Parquet parts, ledger commits), then stitching, each timed; in a fresh process.
   ``e2e_over_model_only`` = steady inference tiles/s (after the first committed batch) / (model-only tiles/s x
   predictor actors); ``e2e_over_model_only_incl_startup`` uses the whole inference wall time instead, including
   the one-off actor start-up (``actor_startup_s``: torch/timm/PyG imports and the model load, once per actor).
   ``stitch_fraction_of_inference`` = the wall time stitching adds after inference (as `map` runs it: each city is
   stitched in a background thread as soon as its last tile is committed) / inference seconds; the cost of
   stitching every city again after inference is reported too (``stitch_alone_fraction_of_inference``).
3. Scale: 12 vs 48 vs 192 small cities (0.5 km), each in a fresh process: tiles/s of inference and stitching and
   the driver's peak RSS (``driver_rss_ratio_192_vs_12`` must stay within 1.3).

The model is a seeded, untrained bundle of the preset (throughput does not depend on the weights).
Writes bench/results/map.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_json_child, write_results  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()

CHILD = r"""
import json, sys, threading, time
import psutil
from engine.catalog import load_catalog
from engine.pipelines.infer import InferenceConfig, run_inference
from engine.mapping.predict import ModelPredictor
from engine.mapping.store import RunManifest
from engine.model_bundle import model_classes, model_version
from engine.pipelines.stitch import StreamingStitch, stitch_products, stitch_run
from engine.pipelines.prepare import run_prepare
from engine.pipelines.runtime import init_ray
from geolink_model.checkpoint import load_config

catalog_path, ws, model_dir, batch_size, devices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
me = psutil.Process()
peak = {"driver": 0}
stop = False
def sample():
    while not stop:
        peak["driver"] = max(peak["driver"], me.memory_info().rss)
        time.sleep(0.1)
thread = threading.Thread(target=sample, daemon=True); thread.start()
init_ray()
import ray
catalog = load_catalog(catalog_path)
t0 = time.perf_counter(); prepared = run_prepare(catalog, ws); t_prepare = time.perf_counter() - t0
cfg_model, _ = load_config(model_dir)
manifest = RunManifest(run="bench", model_dir=model_dir, model_version=model_version(model_dir),
                       classes=model_classes(model_dir, cfg_model.num_classes), mode="fused", tile_size_px=cfg_model.img_size, overlap_px=32)
cfg = InferenceConfig(batch_size=batch_size, gpus=devices)
commits = []
stitcher = StreamingStitch(ws, "bench", catalog, manifest=manifest)  # as `map` does: cities stitched as they complete
t_inf0 = time.perf_counter()
result = run_inference(ws, manifest, catalog["city"].to_pylist(), ModelPredictor,
                       {"model_dir": model_dir, "torch_threads": 1, "device": "cuda" if devices else "cpu"}, cfg,
                       on_commit=lambda n, total: commits.append((time.perf_counter(), n)), on_city_done=stitcher.submit)
t_infer = time.perf_counter() - t_inf0
seconds = {}
cities_seconds = []
report = stitch_products(ws, "bench", catalog, seconds=seconds, stitcher=stitcher)
t_stitch, t_publish = seconds["stitch"], seconds["publish"]
t0 = time.perf_counter()
serial = stitch_run(ws, "bench", catalog)  # the same stitching again, alone after inference: its full cost
t_stitch_alone = time.perf_counter() - t0
stop = True; thread.join()
# steady state: tiles after the first committed batch over the time since it (actor start-up, ~imports + model load,
# is paid once per actor and amortised over a national run; it is reported separately as startup_s)
steady = (sum(n for _, n in commits[1:]) / (commits[-1][0] - commits[0][0])) if len(commits) > 2 else None
startup = commits[0][0] - t_inf0 if commits else None
print(json.dumps({"cities": len(prepared), "tiles": result.predicted, "failed": result.failed, "prepare_s": t_prepare,
                  "inference_s": t_infer, "stitch_s": t_stitch, "stitch_alone_s": t_stitch_alone,
                  "stitch_city_seconds": sum(r.seconds for r in serial), "publish_s": t_publish, "inference_tiles_per_s": result.predicted / t_infer,
                  "steady_tiles_per_s": steady, "startup_s": startup, "map_tiles_per_s": result.predicted / (t_infer + t_stitch),
                  "actors": cfg.pool_size(ray.cluster_resources().get("CPU", 1)), "stitched_ok": sum(c.status == "ok" for c in report),
                  "driver_peak_rss_mb": peak["driver"] / 2**20}))
"""


def child(catalog: Path, workspace: Path, model: Path, batch_size: int, devices: int = 0) -> dict:
    return run_json_child([sys.executable, "-c", CHILD, str(catalog), str(workspace), str(model), str(batch_size), str(devices)],
                          env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})


def model_only(workspace: Path, model: Path, batch_size: int, n_tiles: int, device: str = "cpu") -> dict:
    """The predictor alone on in-memory tiles (one thread, like one CPU actor; or one GPU, like one GPU actor)."""
    import pyarrow as pa

    from engine.mapping.batches import read_pixels
    from engine.mapping.predict import ModelPredictor
    from engine.training.samples import load_part, part_pairs

    cities = sorted(p.name.split("=", 1)[1] for p in (workspace / "tiles").glob("city=*"))
    tables = [load_part(pair) for pair in part_pairs(workspace, cities)]
    tiles = pa.concat_tables(tables).slice(0, n_tiles)
    batches = [read_pixels(tiles.slice(i, batch_size)) for i in range(0, tiles.num_rows, batch_size)]
    predictor = ModelPredictor(str(model), torch_threads=1, device=device)
    predictor.predict(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        predictor.predict(b)
    seconds = time.perf_counter() - t0
    return {"tiles": tiles.num_rows, "seconds": seconds, "tiles_per_s": tiles.num_rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4/8/16 cities instead of 12/48/192 (smoke run, results not written)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--devices", type=int, default=0, help="GPUs: one predictor actor each (results in map_gpu.json)")
    args = parser.parse_args()
    import torch

    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo
    from geolink_model.checkpoint import save_model
    from geolink_model.config import create_config
    from geolink_model.model import build_model

    scales = (4, 8, 16) if args.quick else (12, 48, 192)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = save_model(build_model(create_config(args.preset, img_size=224, num_classes=2)), tmp / "model")
        write_demo(tmp / "demo", scales[0], SynthConfig(), seed=0)
        demo = child(tmp / "demo" / "catalog.yaml", tmp / "demo", model, args.batch_size, args.devices)
        torch.set_num_threads(1)
        alone = model_only(tmp / "demo", model, args.batch_size, n_tiles=96 if args.quick else 192, device="cuda" if args.devices else "cpu")
        scale = {}
        for n in scales:
            write_demo(tmp / f"s{n}", n, SynthConfig(size_km=0.5), seed=1)
            scale[n] = child(tmp / f"s{n}" / "catalog.yaml", tmp / f"s{n}", model, args.batch_size, args.devices)

    ratio = demo["inference_tiles_per_s"] / (alone["tiles_per_s"] * demo["actors"])
    table = Table(title=f"map on the demo catalog ({scales[0]} cities, {args.preset}, batch {args.batch_size}, {os.cpu_count()} cores)")
    for col in ("stage", "seconds", "tiles/s"):
        table.add_column(col, justify="right")
    table.add_row("model only (1 thread, tensors in memory)", f"{alone['seconds']:.1f}", f"{alone['tiles_per_s']:.1f}")
    table.add_row(f"inference end to end ({demo['actors']} actor(s))", f"{demo['inference_s']:.1f}", f"{demo['inference_tiles_per_s']:.1f}")
    table.add_row("  of which start-up (actor imports + model load, once per actor)", f"{demo['startup_s']:.1f}", "")
    table.add_row("  steady state", "", f"{demo['steady_tiles_per_s']:.1f}")
    table.add_row("stitch after inference (cities stitched as they complete; the rest + run-wide products)", f"{demo['stitch_s']:.1f}", "")
    table.add_row("stitch alone, all cities after inference (threads)", f"{demo['stitch_alone_s']:.1f}", "")
    table.add_row("publish (preview page + STAC)", f"{demo['publish_s']:.1f}", "")
    console.print(table)
    table = Table(title="scale: small cities (0.5 km), fresh process each")
    for col in ("cities", "tiles", "prepare s", "inference s", "stitch s", "map tiles/s", "driver peak RSS MB"):
        table.add_column(col, justify="right")
    for n, r in scale.items():
        table.add_row(str(n), str(r["tiles"]), f"{r['prepare_s']:.1f}", f"{r['inference_s']:.1f}", f"{r['stitch_s']:.1f}",
                      f"{r['map_tiles_per_s']:.1f}", f"{r['driver_peak_rss_mb']:.0f}")
    console.print(table)
    metrics = {
        # throughput once the pipeline runs (after the first committed batch): what a national run sees
        "e2e_over_model_only": round(demo["steady_tiles_per_s"] / (alone["tiles_per_s"] * demo["actors"]), 3) if demo["steady_tiles_per_s"] else None,
        # the whole inference wall time, including the one-off actor start-up (imports + model load)
        "e2e_over_model_only_incl_startup": round(ratio, 3),
        "actor_startup_s": round(demo["startup_s"], 1),
        "stitch_fraction_of_inference": round(demo["stitch_s"] / demo["inference_s"], 3),
        "stitch_alone_fraction_of_inference": round(demo["stitch_alone_s"] / demo["inference_s"], 3),
        f"driver_rss_ratio_{scales[2]}_vs_{scales[0]}": round(scale[scales[2]]["driver_peak_rss_mb"] / scale[scales[0]]["driver_peak_rss_mb"], 3),
        "map_tiles_per_s": {str(n): round(r["map_tiles_per_s"], 2) for n, r in scale.items()},
        "model_only_tiles_per_s_per_thread": round(alone["tiles_per_s"], 2),
    }
    console.print(metrics)
    if not args.quick:
        out = write_results("map_gpu" if args.devices else "map", metrics, {"preset": args.preset, "batch_size": args.batch_size, "demo": demo, "model_only": alone,
                                             "scale": {str(k): v for k, v in scale.items()}})
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
