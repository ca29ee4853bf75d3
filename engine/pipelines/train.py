"""`pretrain` and `finetune` on Ray Train V2: samples streamed by Ray Data from the prepared tiles, DDP workers.

The run lives in ``<storage>/<name>`` (checkpoints, resumable: rerunning with the same name continues from the
latest checkpoint); the finished model bundle goes to ``<workspace>/models/<name>/`` with its metrics, its
training config and the data splits it was trained on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import atomic_path
from engine.model_bundle import TARGET_SCALE, ModelBundle, write_bundle
from engine.model_card import write_model_card
from engine.pixels import NORMALISATION
from engine.pipelines.prepare import read_marker
from engine.storage import filesystem, is_remote, local_path, raster_env, uri_of
from engine.training import faults
from engine.training.calibration import heldout_calibration, write_calibration
from engine.training.samples import LABEL_SETS, add_pixels, load_part, part_pairs
from engine.training.targets import add_targets
from engine.workspace import Workspace, check_name
from geolink_model.config import MODES, create_config

TASKS = ("pretrain", "finetune")
TARGETS = ("segmentation", "population", "co2")  # what fine-tuning learns: UV segmentation, or a tile-level quantity
# keys of train_config.json that TrainConfig no longer has, written as before so the file keeps its keys and bytes
# (fault injection moved to a test hook, engine.training.faults)
RETIRED_KEYS = {"fail_at_step": None}


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        task: ``pretrain`` (self-supervised, no labels) or ``finetune`` (UV segmentation on the train split).
        preset, model_overrides: the GeoLink preset and field overrides (``img_size`` follows the prepared tiles).
        epochs, batch_size, lr, weight_decay, warmup_steps: AdamW with linear warmup and cosine decay.
        checkpoint_every: steps between checkpoints (each epoch end is checkpointed too).
        num_workers: DDP workers, or ``(min, max)`` for elastic training; cpus_per_worker, use_gpu: resources.
        mode, classes, label_fraction, uv_weight: fine-tuning input mode, label set, share of training tiles
            with labels (deterministic by tile id), and the loss weight of the non-background classes.
        augment: photometric augmentation (colour, haze, blur, noise) so the image branch carries over to new cities.
        image_dropout: ``fused`` fine-tuning only: share of samples whose image is blanked (modality dropout), so
            the model also reads OSM and predicts where imagery is cloudy or unlike the training cities'.
        max_zoom: random zoom in and out by up to this factor (image, labels and OSM nodes alike; 1 = off), so
            the image branch sees every city's pixel size (0.5-1.2 m in the demo catalog).
        init_from: a model bundle to start from (a pretrained model for fine-tuning).
        backbone_lr_scale: fine-tuning only: the image encoder, OSM encoder and fusion learn at this share of
            ``lr`` (the new decoder at ``lr``), so few labels adjust the pretrained backbone rather than overwrite it.
        pretrain_on_test: pretraining only: the test cities' imagery and OSM join pretraining (no labels are read,
            so self-supervision may see every city to be mapped; it lifts the 10%-label results there,
            docs/EXPERIMENTS.md). Off, the test cities stay wholly unseen until evaluation.
        with_location: build the model with the geolocation encoder (``GeoLinkConfig.with_location``): each tile
            centre's lon/lat is contrasted with its image in pretraining and added to the tokens before fusion. With
            ``init_from`` a bundle without it gains a fresh one (which adds nothing until trained); off, the
            bundle's own setting is kept.
        target: ``segmentation`` (UV and land use from reference polygons), or ``population`` / ``co2``: a
            tile-level regression head (Rose's protocol) on the catalog's truth raster of that name (the quantity
            inside each tile's window, engine.training.targets); MAE, RMSE and R2 on the val cities.
        log_target: regression on ``log1p`` of the quantity (tile populations span orders of magnitude); off, on the
            quantity / TARGET_SCALE. Metrics are in the quantity's units either way.
        max_failures: worker failures survived by resuming from the latest checkpoint.
    """

    task: str
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    checkpoint_every: int = 50
    num_workers: int | tuple[int, int] = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    mode: str = "fused"
    classes: str = "builtup"
    label_fraction: float = 1.0
    uv_weight: float = 3.0
    augment: bool = True
    image_dropout: float = 0.0
    max_zoom: float = 1.0
    init_from: str | None = None
    backbone_lr_scale: float = 1.0
    pretrain_on_test: bool = False
    with_location: bool = False
    target: str = "segmentation"
    log_target: bool = True
    seed: int = 0
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: use one of {TASKS}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {MODES}")
        if self.target not in TARGETS:
            raise ValueError(f"task {self.target!r}: use one of {TARGETS}")
        if self.target != "segmentation" and self.task != "finetune":
            raise ValueError(f"--task {self.target} is a fine-tuning task (pretraining reads no targets)")
        if self.target != "segmentation" and self.max_zoom != 1.0:
            raise ValueError(f"--task {self.target} with --max-zoom {self.max_zoom}: zoom changes the area a tile shows, "
                             "so its population or CO2 would no longer be the tile's; use --max-zoom 1")
        if self.classes not in LABEL_SETS:
            raise ValueError(f"classes {self.classes!r}: use one of {tuple(LABEL_SETS)}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError("label_fraction must be in (0, 1]")
        if not 0.0 <= self.image_dropout < 1.0:
            raise ValueError(f"image_dropout={self.image_dropout}: must be in [0, 1)")
        if not 1.0 <= self.max_zoom <= 4.0:
            raise ValueError(f"max_zoom={self.max_zoom}: must be in [1, 4] (1 = no zoom augmentation)")
        if not 0.0 <= self.backbone_lr_scale <= 1.0:
            raise ValueError(f"backbone_lr_scale={self.backbone_lr_scale}: must be in [0, 1] (0 freezes the backbone)")
        if self.pretrain_on_test and self.task != "pretrain":
            raise ValueError("pretrain_on_test is for pretraining only: fine-tuning never reads the test cities")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, batch_size and checkpoint_every must be >= 1")


def parse_workers(text: str) -> int | tuple[int, int]:
    """``--workers`` as the CLI and the Ray jobs both take it: ``N``, or ``MIN-MAX`` for elastic training.

    >>> parse_workers("2"), parse_workers("2-4")
    (2, (2, 4))
    """
    lo, _, hi = str(text).strip().partition("-")
    try:
        return (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise ValueError(f"--workers {text!r} is not a number: --workers takes N or MIN-MAX") from None


def _load_parts(pairs: pa.Table, fraction: float = 1.0, seed: int = 0) -> pa.Table:
    """Ray Data step: prepared parts -> sample rows; with ``fraction`` < 1 keep that share of tiles, chosen by a
    stable hash of (seed, tile_id), so the same runs see the same labelled subset."""
    tables = [load_part(p) for p in pairs.to_pylist()]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if fraction < 1.0:
        keep = [(zlib.crc32(f"{seed}:{t}".encode()) % 10_000) < fraction * 10_000 for t in table["tile_id"].to_pylist()]
        table = table.filter(pa.array(keep))
    return table


def sample_dataset(workspace: Workspace | str, cities: list[str], references: dict[str, str] | None, classes: tuple[str, ...],
                   fraction: float = 1.0, seed: int = 0, targets: dict[str, str] | None = None):
    """Ray Dataset of training samples: graph + index rows per tile, then pixels (and labels) read by window; with
    ``targets`` (a truth raster per city), each tile's regression ``target`` first (tiles without one dropped)."""
    import ray

    pairs = part_pairs(workspace, cities)
    ds = ray.data.from_items(pairs, override_num_blocks=max(1, len(pairs)))
    ds = ds.map_batches(_load_parts, fn_kwargs={"fraction": fraction, "seed": seed}, batch_size=1, batch_format="pyarrow")
    if targets is not None:
        ds = ds.map_batches(add_targets, fn_kwargs={"rasters": targets}, batch_size=64, batch_format="pyarrow")
    return ds.map_batches(add_pixels, fn_kwargs={"references": references, "classes": classes}, batch_size=16, batch_format="pyarrow")


def count_tiles(workspace: Workspace | str, cities: list[str]) -> tuple[int, int]:
    """Tiles of ``cities`` and their tile size, from Parquet footers and one column."""
    n, size = 0, None
    for pair in part_pairs(workspace, cities):
        index = Workspace.fetch(pair["index"])
        n += pq.read_metadata(index).num_rows
        if size is None:
            sizes = pq.read_table(index, columns=["tile_size_px"])["tile_size_px"]
            size = int(sizes[0].as_py()) if len(sizes) else None
    return n, size or 224


def training_cities(split: dict[str, str], task: str, pretrain_on_test: bool = False) -> tuple[list[str], list[str]]:
    """(cities to train on, cities to validate on) from each city's split. Pretraining reads no labels, so it may
    take every city but the test ones (or all, ``pretrain_on_test``); fine-tuning takes ``train`` and ``val``."""
    if task == "pretrain":
        train = [c for c, s in split.items() if pretrain_on_test or s != "test"]
        val: list[str] = []
    else:
        train = [c for c, s in split.items() if s == "train"]
        val = [c for c, s in split.items() if s == "val"]
    if not train:
        raise ValueError(f"no cities to {task} on: the catalog needs rows with split 'train'")
    return train, val


def run_training(catalog: pa.Table, workspace: str | os.PathLike[str], cfg: TrainConfig, name: str,
                 storage: str | None = None) -> Path:
    """Train on Ray and write ``<workspace>/models/<name>/``; returns that folder.

    Splits (``training_cities``): pretraining uses every city but the test split (all of them with
    ``pretrain_on_test``; no labels needed); fine-tuning trains on ``train`` cities and validates on ``val``
    cities. Raises ValueError naming what is missing (no train cities, no reference for a train city, unprepared city).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.pipelines.train_loop import train_loop_per_worker

    ws = Workspace.at(workspace)
    check_name("run", name)  # the training run's name becomes its model's folder and its checkpoints' folder
    rows = catalog.to_pylist()
    split = {r["city"]: (r.get("split") or "train") for r in rows}
    train_cities, val_cities = training_cities(split, cfg.task, cfg.pretrain_on_test)
    references, targets = None, None
    classes = LABEL_SETS[cfg.classes]
    regression = cfg.target != "segmentation"
    if regression:  # the truth raster of the quantity, for every train and val city (no reference polygons needed)
        targets = {r["city"]: r.get(cfg.target) for r in rows if r["city"] in train_cities + val_cities}
        missing = [c for c, path in targets.items() if not path]
        if missing:
            raise ValueError(f"fine-tuning --task {cfg.target} needs a '{cfg.target}' raster in the catalog; missing for "
                             f"{', '.join(missing)}")
    elif cfg.task == "finetune":
        references = {r["city"]: r.get("reference") for r in rows if r["city"] in train_cities + val_cities}
        missing = [c for c, ref in references.items() if not ref]
        if missing:
            raise ValueError(f"fine-tuning needs reference polygons; missing for {', '.join(missing)}")
    n_tiles, tile_size = count_tiles(ws, train_cities)
    gsd = training_inputs(ws, {r["city"]: r["imagery"] for r in rows if r["city"] in train_cities + val_cities})
    # from a bundle (pretrained, imported): its config, whatever its size (the preset is ignored); classes and tile size follow the run
    init = ModelBundle.load(local_path(cfg.init_from)) if cfg.init_from else None
    overrides = {**cfg.model_overrides, **({"with_location": True} if cfg.with_location else {})}
    heads = {"img_size": tile_size, "num_classes": len(classes), "regression_targets": 1 if regression else 0}
    model_cfg = (replace(init.config, **{**overrides, **heads}) if init else create_config(cfg.preset, **{**overrides, **heads}))
    norm = init.normalisation if init else NORMALISATION  # an imported encoder's pixel statistics, in training and inference alike
    workers = cfg.num_workers if isinstance(cfg.num_workers, int) else cfg.num_workers[1]
    steps_per_epoch = max(1, math.ceil(n_tiles * cfg.label_fraction / (cfg.batch_size * workers)))
    storage_path, storage_fs = train_storage(storage, ws)
    loop_config = {
        "task": cfg.task, "model_config": model_cfg.to_json(), "seed": cfg.seed, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps, "total_steps": steps_per_epoch * cfg.epochs, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "checkpoint_every": cfg.checkpoint_every, "mode": cfg.mode, "classes": list(classes), "has_val": bool(val_cities),
        "class_weights": [1.0] + [cfg.uv_weight] * (len(classes) - 1), "init_from": cfg.init_from, "augment": cfg.augment,
        "backbone_lr_scale": cfg.backbone_lr_scale if cfg.task == "finetune" else 1.0,
        "max_zoom": cfg.max_zoom, "image_dropout": cfg.image_dropout if cfg.task == "finetune" and cfg.mode == "fused" else 0.0,
        "normalisation": [list(norm[0]), list(norm[1])],
        "regression": cfg.target if regression else None, "log_target": cfg.log_target, "target_scale": TARGET_SCALE,
    }
    datasets = {"train": sample_dataset(ws, train_cities, references, classes, cfg.label_fraction, cfg.seed, targets)}
    if val_cities:
        datasets["val"] = sample_dataset(ws, val_cities, references, classes, targets=targets)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env=faults.worker_runtime_env(name, storage_path, storage_fs, ws.train_runs)),  # tests only
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint ({result.error})")
    out = ws.model(name)
    with result.checkpoint.as_directory() as d, atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        train = {**asdict(cfg), **RETIRED_KEYS, "model": json.loads(model_cfg.to_json()), **gsd}
        if norm != NORMALISATION:
            train["normalisation"] = {"mean": list(norm[0]), "std": list(norm[1])}
        if regression:  # what the head's raw (not log) outputs are multiplied by, for every reader of the bundle
            train["target_scale"] = TARGET_SCALE
        write_bundle(tmp, copy_from=d, train=train)
        for f in ("metrics.jsonl", "trainer_state.json"):
            shutil.copy2(Path(d) / f, tmp / f)
        if regression and val_cities:  # the held-out cities' totals, for the intervals of map's summed totals
            write_calibration(tmp, heldout_calibration(tmp, ws, val_cities, {c: targets[c] for c in val_cities},
                                                       {r["city"]: r.get("reference") for r in rows},
                                                       {r["city"]: r.get("region") for r in rows}, name=name))
        splits = {"train": train_cities, "val": val_cities, "test": [c for c, s in split.items() if s == "test"]}
        (tmp / "splits.json").write_text(json.dumps(splits, indent=2))
        write_model_card(tmp, name, train, splits=splits, regions={r["city"]: r.get("region") for r in rows},
                         init=init.train if init else None)
    ws.publish(out)  # a remote workspace: the bundle every map node will fetch
    return out


def training_inputs(workspace: Workspace, imagery: dict[str, str]) -> dict:
    """What the bundle records of its training imagery, from what prepare read for each city (its marker's
    ``input``: its read GSD and radiometry; the catalog's imagery for a city prepared before markers said):
    ``gsd_m``/``gsd_range_m`` (:func:`training_gsd`) and ``radiometry`` when every city agrees (``per-city``
    otherwise), so `map` reads new cities the way training read these. Not the source band numbers: they describe
    each city's files, not the model (whose input is always R, G, B)."""
    from engine.imagery import read_imagery_facts

    gsds, radiometry = [], set()
    with raster_env():
        for city, path in imagery.items():
            used = (read_marker(workspace, city) or {}).get("input") or {}
            gsds.append(float(used["gsd_m"]) if used.get("gsd_m") else read_imagery_facts(path).gsd_m)
            radiometry.add(used.get("radiometry") or "uint8")
    out = training_gsd(gsds)
    if radiometry:
        # one 8-bit source and one stretched source are both "auto"; anything else must agree to be recorded
        methods = {"auto" if m in ("uint8", "percentile:2,98") else m for m in radiometry}
        out["radiometry"] = methods.pop() if len(methods) == 1 else "per-city"
    return out


def training_gsd(gsds: list[float]) -> dict:
    """``gsd_m`` (median) and ``gsd_range_m`` ([min, max]) of the training cities' ground GSD in metres, for the bundle:
    `map` reads every city at ``gsd_m`` (a model sees villages at the size in pixels it learnt them) and compares
    each city's own GSD with the range."""
    values = sorted(gsds)
    if not values:
        return {}
    return {"gsd_m": round(float(np.median(values)), 4), "gsd_range_m": [round(values[0], 4), round(values[-1], 4)]}


def train_storage(location: str | None, workspace: Workspace | str) -> tuple[str, object | None]:
    """Ray Train's ``(storage_path, storage_filesystem)``: checkpoints in ``location`` (a folder or ``s3://``/``gs://``
    URI), by default ``<workspace>/runs/train`` (in the object store when the workspace is remote), so that every
    worker node writes, and a restarted run reads, the same checkpoints."""
    train_runs = Workspace.at(workspace).train_runs
    location = location or uri_of(train_runs) or str(train_runs)
    if is_remote(location):
        fs, key = filesystem(location)  # explicit, so an S3-compatible endpoint (AWS_ENDPOINT_URL) is used
        return key, fs
    return os.path.abspath(location), None
