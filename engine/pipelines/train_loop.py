"""The Ray Train worker loop shared by pretraining and fine-tuning: one ``train_loop_per_worker(config)``.

It lives in ``pipelines/`` because it is Ray Train's side of the run (context, dataset shards, DDP wrapping,
checkpoints, reports); what it computes comes from the pure cores in :mod:`engine.training`.

Resumes from ``ray.train.get_checkpoint()`` (after a worker failure, or a rerun with the same run name), reads its
shard of the ``train`` dataset, steps AdamW with linear warmup + cosine decay, and reports metrics with a
checkpoint every ``checkpoint_every`` steps. Checkpoints hold the model bundle (safetensors + JSON), the optimizer
state as safetensors + JSON, and the trainer state as JSON: nothing is pickled.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine import storage
from engine.model_bundle import write_bundle
from engine.pixels import NORMALISATION, collate, tile_lonlat
from engine.training.augment import drop_images, photometric, zoom
from engine.training.faults import maybe_fail
from engine.training.metrics import confusion, scores, segmentation_loss
from engine.training.optimizer_state import read_optimizer_state, save_optimizer
from engine.training.schedule import lr_at, param_groups
from geolink_model.checkpoint import load_init, load_model
from geolink_model.config import GeoLinkConfig
from geolink_model.model import GeoLink, build_model
from geolink_model.regression import from_model_scale, regression_loss, regression_metrics, regression_sums

STATE_JSON, HISTORY = "trainer_state.json", "metrics.jsonl"


def _unwrap(model: torch.nn.Module) -> GeoLink:
    return model.module if hasattr(model, "module") else model


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config`` holds the task, the model config JSON and the optimisation settings."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(int(config["seed"]) + rank)
    np.random.seed(int(config["seed"]) + rank)
    device = ray.train.torch.get_device()
    task = config["task"]
    classes = tuple(config.get("classes", ("other", "urban_village")))

    step, epoch, history, resumed = 0, 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model, _ = load_model(d)
            state = json.loads((Path(d) / STATE_JSON).read_text())
            step, epoch, history = state["step"], state["epoch"], state["history"]
            resumed = state.get("resumed", []) + [step]  # an interrupted epoch restarts; the step count goes on
            opt_state = read_optimizer_state(Path(d))
    else:
        if config.get("init_from"):
            # the task's config (the bundle's, with this run's classes and tile size): a fresh class layer, a resampled position table
            model = load_init(storage.local_path(config["init_from"]), GeoLinkConfig.from_json(config["model_config"]))
        else:
            model = build_model(GeoLinkConfig.from_json(config["model_config"]))
        opt_state = None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    opt = torch.optim.AdamW(param_groups(model, float(config.get("backbone_lr_scale", 1.0))), lr=config["lr"], weight_decay=config["weight_decay"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config.get("class_weights") else None
    total = int(config["total_steps"])
    use_amp = device.type == "cuda"
    with_location = _unwrap(model).cfg.with_location  # tile centres go to the model only when it reads them
    train = ray.train.get_dataset_shard("train")

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                write_bundle(tmp, _unwrap(model), extra={"task": task, "step": step})
                save_optimizer(opt, Path(tmp))
                (Path(tmp) / STATE_JSON).write_text(json.dumps({"step": step, "epoch": epoch, "history": history, "resumed": resumed}))
                (Path(tmp) / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    while epoch < int(config["epochs"]):
        model.train()
        t0, seen, running = time.perf_counter(), 0, {}
        for batch in train.iter_batches(batch_size=int(config["batch_size"]), batch_format="pyarrow", drop_last=False):
            maybe_fail(step, rank)  # tests only (engine.training.faults): a no-op unless a test set the hook
            images, graphs, labels = collate(batch, device, _normalisation(config))
            lonlat = tile_lonlat(batch, device) if with_location else None  # the tile's centre: zoom moves the view by less than a tile
            images, labels, graphs = zoom(images, labels, graphs, float(config.get("max_zoom", 1.0)))  # cities differ in pixel size
            if config.get("augment", True):  # cities differ in colour, haze, blur and noise: train across them
                images = photometric(images)
            images = drop_images(images, float(config.get("image_dropout", 0.0)))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, int(config["warmup_steps"]), float(config["lr"])) * group["lr_scale"]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                if task == "pretrain":  # through the (DDP-wrapped) forward, so gradients are synchronised
                    losses = model(images, graphs, "pretrain", lonlat)
                    loss = losses["loss"]
                elif config.get("regression"):  # a tile-level quantity (population, CO2) through the forward, as above
                    pred = model(images if config["mode"] != "osm" else None, graphs, config["mode"], lonlat, "regress")
                    loss = regression_loss(pred.float(), _targets(batch, device), bool(config.get("log_target", True)),
                                           float(config.get("target_scale", 1.0)))
                    losses = {"loss": loss}
                else:
                    logits = model(images if config["mode"] != "osm" else None, graphs, config["mode"], lonlat)
                    loss = segmentation_loss(logits.float(), labels, weights)
                    losses = {"loss": loss}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            seen += images.shape[0]
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["n"] = running.get("n", 0) + 1
            if step % int(config["checkpoint_every"]) == 0:
                report({"step": step, "epoch": epoch, **{k: v / running["n"] for k, v in running.items() if k != "n"}}, with_checkpoint=True)
        epoch += 1
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "step": step, "samples_per_s": seen / max(seconds, 1e-9),
                  **{f"train_{k}": v / max(running.get("n", 1), 1) for k, v in running.items() if k != "n"}}
        if task == "finetune" and config.get("has_val"):
            record.update(_validate(model, ray.train.get_dataset_shard("val"), config, classes, device))
        history.append(record)
        report(record, with_checkpoint=True)


def _validate(model, shard, config: dict, classes: tuple[str, ...], device: torch.device) -> dict:
    """IoU/F1 per class and mIoU on the val split, summed over all workers (MAE, RMSE and R2 for a regression)."""
    if config.get("regression"):
        return _validate_regression(model, shard, config, device)
    model.eval()
    n = len(classes)
    matrix = torch.zeros(n, n, dtype=torch.long, device=device)
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=int(config["batch_size"]), batch_format="pyarrow"):
            images, graphs, labels = collate(batch, device, _normalisation(config))
            lonlat = tile_lonlat(batch, device) if _unwrap(model).cfg.with_location else None
            logits = model(images if config["mode"] != "osm" else None, graphs, config["mode"], lonlat)
            matrix += confusion(logits.float(), labels, n).to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(matrix)
    return {f"val_{k}": v for k, v in scores(matrix.cpu().numpy(), classes).items()}


def _targets(batch, device: torch.device) -> torch.Tensor:
    """The batch's regression targets (engine.training.targets: the quantity inside each tile's window)."""
    return torch.as_tensor(batch["target"].to_numpy(), dtype=torch.float32, device=device)


def _validate_regression(model, shard, config: dict, device: torch.device) -> dict:
    """MAE, RMSE and R2 of the val tiles in the quantity's units (persons, t CO2), summed over all workers."""
    model.eval()
    log, scale = bool(config.get("log_target", True)), float(config.get("target_scale", 1.0))
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=int(config["batch_size"]), batch_format="pyarrow"):
            images, graphs, _ = collate(batch, device, _normalisation(config))
            lonlat = tile_lonlat(batch, device) if _unwrap(model).cfg.with_location else None
            pred = model(images if config["mode"] != "osm" else None, graphs, config["mode"], lonlat, "regress")
            sums += regression_sums(from_model_scale(pred.float(), log, scale), _targets(batch, device)).to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return {f"val_{k}": v for k, v in regression_metrics(sums.cpu()).items() if k != "n"}


def _normalisation(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel normalisation of the run (an imported encoder's, else the engine's): ``[mean, std]`` lists."""
    norm = config.get("normalisation")
    return (tuple(norm[0]), tuple(norm[1])) if norm else NORMALISATION
