"""Shared argument parsing for the training job entry points (jobs/pretrain.py, jobs/finetune.py)."""

from __future__ import annotations

import argparse

from engine.pipelines.runtime import init_ray
from engine.pipelines.train import TrainConfig, parse_workers, run_training
from scope import add_scope_args, load_scope  # jobs/ is the script's folder, first on sys.path


def build_parser(task: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or f"Ray job: GeoLink {task}")
    add_scope_args(parser, cities=False)
    parser.add_argument("--name", default=task)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", default="1", help="N or MIN-MAX (elastic: goes on with fewer when nodes are lost)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (and every epoch end)")
    parser.add_argument("--max-failures", type=int, default=2, help="lost workers/nodes survived by resuming from the last checkpoint")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--mode", default="fused")
    parser.add_argument("--classes", default="builtup", help="builtup (UV, other built-up, the rest), binary or landuse")
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--image-dropout", type=float, default=0.0, help="fused fine-tuning: share of samples with the image blanked")
    parser.add_argument("--max-zoom", type=float, default=1.0, help="random zoom in/out by up to this factor (1 = off)")
    parser.add_argument("--init-from", default=None)
    parser.add_argument("--backbone-lr-scale", type=float, default=1.0, help="fine-tuning: the pretrained backbone learns at this share of --lr")
    parser.add_argument("--pretrain-on-test", action="store_true", help="pretraining: the test cities' imagery and OSM too (no labels)")
    parser.add_argument("--with-location", action="store_true", help="the geolocation encoder: each tile centre's lon/lat")
    parser.add_argument("--storage", default=None, help="local path or s3://bucket/prefix")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(task: str, description: str) -> None:
    args = build_parser(task, description).parse_args()
    workspace, catalog = load_scope(args)
    cfg = TrainConfig(task=task, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      num_workers=parse_workers(args.workers), use_gpu=args.gpu, mode=args.mode, classes=args.classes,
                      label_fraction=args.label_fraction, init_from=args.init_from, seed=args.seed, cpus_per_worker=args.cpus_per_worker,
                      checkpoint_every=args.checkpoint_every, max_failures=args.max_failures,
                      image_dropout=args.image_dropout, max_zoom=args.max_zoom, backbone_lr_scale=args.backbone_lr_scale,
                      pretrain_on_test=args.pretrain_on_test, with_location=args.with_location)
    init_ray("auto")
    print(run_training(catalog, workspace, cfg, name=args.name, storage=args.storage))
