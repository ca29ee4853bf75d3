"""Tile-level population / CO2 regression (Rose's protocol) on the demo cities: MAE, RMSE and R2 on the held-out
(val) cities, per input mode (image, osm, fused) and variant (fine-tuned vs frozen probe), over seeds.

Usage: python bench/regression.py [--target population|co2] [--cities 12] [--seeds 0,1,2] [--epochs 4] [--preset tiny]

Protocol: one self-supervised pretraining per seed on every city but the test split (no targets read), then per mode:
``finetune`` (every weight learns, from the pretrained bundle) and ``probe`` (``--backbone-lr-scale 0``: encoders
and fusion frozen, only the head learns). Targets are the truth raster's quantity inside each tile's window
(engine/training/targets.py), learnt on ``log1p``; metrics in persons (or t CO2) per tile. Training cities are the
catalog's ``train`` split, metrics come from its ``val`` split (cities never trained on). Writes (merges)
bench/results/regression.json; rows for each (target, mode, variant, seed) and mean +- std per (target, mode, variant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import merge_results  # noqa: E402

console = Console(width=150)
MODES = ("image", "osm", "fused")
VARIANTS = {"finetune": 1.0, "probe": 0.0}  # backbone_lr_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="population", choices=["population", "co2"])
    parser.add_argument("--cities", type=int, default=12)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tile-size", type=int, default=224)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    import ray

    from engine.catalog import load_catalog
    from engine.pipelines.prepare import run_prepare
    from engine.pipelines.train import TrainConfig, run_training
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo
    from engine.tiles.city import PrepareConfig
    from engine.tiles.grid import TileGridConfig

    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        write_demo(ws, args.cities, SynthConfig(), seed=0)
        catalog = load_catalog(ws / "catalog.yaml")
        run_prepare(catalog, ws, PrepareConfig(grid=TileGridConfig(tile_size_px=args.tile_size, overlap_px=32)))
        for seed in seeds:
            pre = run_training(catalog, ws, TrainConfig(task="pretrain", preset=args.preset, epochs=args.pretrain_epochs, seed=seed,
                                                        cpus_per_worker=1.0), name=f"pre-{seed}")
            for mode in MODES:
                for variant, scale in VARIANTS.items():
                    t0 = time.perf_counter()
                    cfg = TrainConfig(task="finetune", target=args.target, mode=mode, epochs=args.epochs, seed=seed, init_from=str(pre),
                                      backbone_lr_scale=scale, cpus_per_worker=1.0)
                    out = run_training(catalog, ws, cfg, name=f"{args.target}-{mode}-{variant}-{seed}")
                    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                    rows.append({"target": args.target, "mode": mode, "variant": variant, "seed": seed, "mae": last["val_mae"],
                                 "rmse": last["val_rmse"], "r2": last["val_r2"], "seconds": round(time.perf_counter() - t0, 1)})
                    console.print(rows[-1])
    summary = {}
    for mode in MODES:
        for variant in VARIANTS:
            got = [r for r in rows if r["mode"] == mode and r["variant"] == variant]
            for key in ("mae", "rmse", "r2"):
                values = [r[key] for r in got]
                summary[f"{args.target}_{mode}_{variant}_{key}_mean"] = round(statistics.fmean(values), 4)
                summary[f"{args.target}_{mode}_{variant}_{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    table = Table(title=f"{args.target} per tile on held-out cities ({len(seeds)} seeds, {args.preset}, {args.epochs} epochs)")
    for col in ("mode", "variant", "MAE", "RMSE", "R2"):
        table.add_column(col, justify="right")
    for mode in MODES:
        for variant in VARIANTS:
            k = f"{args.target}_{mode}_{variant}"
            table.add_row(mode, variant, *(f"{summary[f'{k}_{m}_mean']:.3g} +- {summary[f'{k}_{m}_std']:.2g}" for m in ("mae", "rmse", "r2")))
    console.print(table)
    out = merge_results("regression", summary, {f"runs_{args.target}": rows, f"setup_{args.target}": {
        "cities": args.cities, "seeds": seeds, "preset": args.preset, "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
        "tile_size": args.tile_size, "seconds": round(time.perf_counter() - t_all, 1)}})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
