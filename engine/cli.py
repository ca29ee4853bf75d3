"""The `geolink-engine` command line: one command per stage, each body one call into the engine.

Shared options (`--workspace`, `--catalog`, `--verbose`) live in the app callback and travel in ``ctx.obj``.
Expected failures (bad catalog, bad arguments) print one clear message and exit non-zero, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, NoReturn

import pyarrow as pa
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from engine import storage
from engine.catalog import (
    CatalogError,
    check_city_names,
    find_catalog,
    load_catalog,
    select_cities,
    select_vintage,
    validate_catalog,
)
from engine.workspace import Workspace, check_name

app = typer.Typer(help="geolink-engine: city-scale urban-village mapping with GeoLink (imagery + OSM).", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
catalog_app = typer.Typer(help="Show and validate the city catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")

# piped output (logs, CI) gets 140 columns instead of rich's 80, so the summary tables stay readable
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
log = logging.getLogger("geolink")


@dataclass(frozen=True)
class Settings:
    """Options shared by every command."""

    workspace: Workspace
    catalog: Path | None
    verbosity: int = 0  # -v: each stage's details and the engine's debug log; -vv: everything on the console
    vintage: str | None = None  # the catalog vintage worked on (a multi-date catalog); the workspace is scoped to it

    def for_vintage(self, vintage: str | None) -> Settings:
        """These settings for one vintage (its catalog rows, its prepared tiles and imagery VRTs)."""
        if vintage is None or vintage == self.vintage:
            return self
        return replace(self, vintage=vintage, workspace=self.workspace.with_vintage(vintage))

    def for_run(self, run: str) -> Settings:
        """These settings for an existing run: the vintage it mapped (its ``run.json``), unless --vintage says one."""
        if self.vintage is not None:
            return self
        with contextlib.suppress(ValueError, OSError):  # no run yet or a bad name: the command says so itself
            for path in (self.workspace.run(run).manifest, self.workspace.products(run) / "run.json"):
                if Workspace.fetch(path).is_file():
                    return self.for_vintage(json.loads(path.read_text()).get("vintage"))
        return self

    def catalog_path(self) -> Path:
        return self.catalog if self.catalog is not None else find_catalog(self.workspace)


@app.callback()
def _main(
    ctx: typer.Context,
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="Root of all stage outputs: a folder, or s3://bucket/prefix (gs://) shared by a cluster.",
                                           envvar="GEOLINK_WORKSPACE")] = "geolink-data",
    catalog: Annotated[str | None, typer.Option("--catalog", help="Catalog file (YAML, CSV or Parquet; path or URI); default: the workspace's catalog.*")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="-v: each stage's details and debug messages; -vv: "
                                         "everything on the console as it comes (Ray, Ray Data, Ray Train, torch, GDAL), no live "
                                         "display. By default `map` shows its stages and keeps the rest in runs/<run>/logs/.")] = 0,
    vintage: Annotated[str | None, typer.Option("--vintage", help="The catalog vintage (imagery date, e.g. 2024) to work on, "
                                                "for a catalog with several dates (its `vintage` column). Commands on a run "
                                                "take the run's own.")] = None,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    for name in ("geolink", "engine"):  # -v: the engine's own debug messages, not every library's
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # GDAL's errors reach us as exceptions (their causes are in every message); its log lines would be a wall
    for name in ("rasterio", "pyogrio", "botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    storage.configure_process()
    try:
        ws = Workspace.at(workspace).with_vintage(vintage)
    except ValueError as exc:
        _fail(str(exc))
    ctx.obj = Settings(workspace=ws, catalog=storage.local_path(catalog) if catalog else None, verbosity=verbose, vintage=vintage)


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("demo-data")
def demo_data(
    ctx: typer.Context,
    cities: Annotated[int, typer.Option("--cities", "-n", min=1, help="Number of synthetic cities.")] = 12,
    size_km: Annotated[float | None, typer.Option("--size-km", help="Side of each city's square extent in km (default 1; "
                                                  "0.8 with --benchmark).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed writes the same bytes.")] = 0,
    preview: Annotated[bool, typer.Option("--preview", help="Also write preview/<city>.png (imagery with OSM and reference).")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Processes (default: all cores).")] = None,
    benchmark: Annotated[bool, typer.Option("--benchmark", help="Write the held-out benchmark instead (engine/synth/benchmark.py, "
                                            "docs/synth.md): --per-region cities in each of the 7 regions, fixed splits and a "
                                            "region-held-out region_split; --cities is then ignored.")] = False,
    per_region: Annotated[int, typer.Option("--per-region", min=2, help="With --benchmark: cities per region.")] = 10,
    vintages: Annotated[str | None, typer.Option("--vintages", help="Two or more dates, e.g. 2018,2024: each city on the same ground at "
                                                 "each date (villages demolished, redeveloped and new between them; another "
                                                 "sensor, season and a 0-3 px misregistration; OSM as it grew), with the "
                                                 "change truth (docs/synth.md).")] = None,
) -> None:
    """Write the embedded default: synthetic cities at real Chinese city locations plus their catalog."""
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo

    settings: Settings = ctx.obj
    if benchmark:
        from engine.synth.benchmark import REGIONS, benchmark_config, write_benchmark

        try:
            cfg = benchmark_config() if size_km is None else benchmark_config(size_km)
        except ValueError as exc:
            _fail(str(exc))
        cities = per_region * len(REGIONS)
        with _progress() as progress:
            task = progress.add_task("generating benchmark cities", total=cities)
            path = write_benchmark(settings.workspace, per_region, cfg, seed=seed, workers=workers, on_city=lambda row: progress.advance(task))
    else:
        try:
            cfg = SynthConfig(size_km=1.0 if size_km is None else size_km)
        except ValueError as exc:
            _fail(str(exc))
        with _progress() as progress:
            task = progress.add_task("generating cities", total=cities)
            dates = tuple(v.strip() for v in vintages.split(",") if v.strip()) if vintages else None
            try:
                path = write_demo(settings.workspace, cities, cfg, seed=seed, workers=workers,
                                  on_city=lambda row: progress.advance(task), vintages=dates)
            except ValueError as exc:
                _fail(str(exc))
    console.print(f"wrote {cities} cities" + (f" at {len(dates)} vintages ({', '.join(dates)})" if not benchmark and dates else "")
                  + f" and [bold]{path}[/]")
    if preview:
        from engine.preview import render_preview

        rows = select_vintage(load_catalog(path), None if benchmark or not vintages else dates[0]).to_pylist()
        with _progress() as progress:
            task = progress.add_task("drawing previews", total=len(rows))
            for row in rows:
                render_preview(row, settings.workspace.preview(row["city"]))
                progress.advance(task)
        console.print(f"previews in [bold]{settings.workspace.preview(rows[0]['city']).parent if rows else settings.workspace.root}[/]")


@app.command("ingest-osm")
def ingest_osm_command(
    source: Annotated[str, typer.Argument(help="OSM input: .osm.pbf, GeoParquet, GeoPackage or GeoJSON (any CRS); or a "
                                               "';' list of files or a folder of them, read as one.")],
    out: Annotated[Path, typer.Argument(help="OUT.parquet: one GeoParquet file in the OSM feature contract (EPSG:4326). "
                                             "OUT/ (no .parquet suffix, or an existing folder): a partitioned dataset "
                                             "streamed in bounded memory, for country extracts (cell=.../ folders + "
                                             "_dataset.json), which the catalog's osm can name for every city.")],
    bbox: Annotated[str | None, typer.Option("--bbox", help="west,south,east,north in EPSG:4326: keep features intersecting it.")] = None,
    partitioned: Annotated[bool | None, typer.Option("--partitioned/--single-file",
                                                     help="Force a partitioned dataset or one file (default: by OUT's form).")] = None,
    cell_deg: Annotated[float, typer.Option("--cell-deg", help="Dataset grid cell size in degrees (one partition per cell).")] = 1.0,
    flush_rows: Annotated[int, typer.Option("--flush-rows", help="Dataset: features cleaned and written per batch (the memory knob).")] = 50_000,
) -> None:
    """Convert OSM into the feature contract (osm_id, kind, tags, WKB geometry), repairing broken geometries."""
    from engine.osm import DatasetReport, OsmIngestError, ingest_osm_any

    box = None
    if bbox:
        try:
            box = tuple(float(v) for v in bbox.split(","))
            if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError
        except ValueError:
            _fail(f"--bbox {bbox!r}: expected west,south,east,north with west < east and south < north")
    try:
        report = ingest_osm_any(source, out, bbox=box, partitioned=partitioned, cell_deg=cell_deg, flush_rows=flush_rows)
    except OsmIngestError as exc:
        _fail(str(exc))
    kinds = ", ".join(f"{n} {k}s" for k, n in report.by_kind.items())
    extra = f"; reprojected from {report.reprojected_from}" if report.reprojected_from else ""
    if isinstance(report, DatasetReport):
        extra += f"; {report.partitions} partitions of {report.cell_deg:g} degrees"
    console.print(f"wrote [bold]{out}[/]: {report.features} features ({kinds}); {report.repaired} repaired, {report.dropped} dropped{extra}", soft_wrap=True)


_INPUT_OPTIONS = {
    "gsd": typer.Option("--gsd", help="Resample every city's imagery on read to this ground GSD in metres (default: prepare: "
                        "each city's own; map: cities outside the model's training GSD range are resampled to its nearer end)."),
    "bands": typer.Option("--bands", help="Source bands read as R,G,B, e.g. 3,2,1 (a catalog 'bands' cell overrides it per city)."),
    "radiometry": typer.Option("--radiometry", help="How pixel values become 8-bit: auto (8-bit as is, else percentile:2,98 per city), "
                               "uint8, percentile:LO,HI or range:MIN,MAX (a catalog 'radiometry' cell overrides it per city)."),
}


def _input_spec(gsd: float | None, bands: str | None, radiometry: str | None, allow_gsd_mismatch: bool = False):
    """The prepare options as an :class:`engine.model_input.InputSpec`; a bad value is one line, exit 2."""
    from engine.model_input import InputSpec, Radiometry, parse_bands

    try:
        return InputSpec(bands=parse_bands(bands), radiometry=Radiometry.parse(radiometry), gsd_m=gsd,
                         allow_gsd_mismatch=allow_gsd_mismatch)
    except ValueError as exc:
        _fail(str(exc))


@app.command("prepare")
def prepare(
    ctx: typer.Context,
    cities: Annotated[str, typer.Option("--cities", help="'all' or a comma list of city slugs.")] = "all",
    tile_size: Annotated[int, typer.Option("--tile-size", help="Tile (window) size in pixels.")] = 224,
    overlap: Annotated[int, typer.Option("--overlap", help="Overlap of neighbouring windows in pixels (even).")] = 32,
    force: Annotated[bool, typer.Option("--force", help="Rebuild cities whose inputs did not change.")] = False,
    address: Annotated[str | None, typer.Option("--address", help="Ray address ('auto', 'ray://host:10001'); default: a local Ray.")] = None,
    gsd: Annotated[float | None, _INPUT_OPTIONS["gsd"]] = None,
    bands: Annotated[str | None, _INPUT_OPTIONS["bands"]] = None,
    radiometry: Annotated[str | None, _INPUT_OPTIONS["radiometry"]] = None,
    allow_gsd_mismatch: Annotated[bool, typer.Option("--allow-gsd-mismatch", help="With --gsd: resample even imagery more than 3x "
                                                     "coarser than it (refused otherwise: upsampling adds no detail).")] = False,
) -> None:
    """Build the tile index and per-tile OSM graphs for the catalog's cities (Ray Data, resumable)."""
    from engine.pipelines.prepare import run_prepare
    from engine.pipelines.runtime import init_ray
    from engine.tiles.city import PrepareConfig
    from engine.tiles.grid import TileGridConfig

    settings: Settings = ctx.obj
    path, table = _load_catalog(settings)
    try:
        table = select_cities(table, cities)
        cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=tile_size, overlap_px=overlap))
        check_city_names(table, path)  # before Ray starts; run_prepare refuses them too
    except (CatalogError, ValueError) as exc:
        _fail(str(exc))
    spec = _input_spec(gsd, bands, radiometry, allow_gsd_mismatch)
    with _Quiet(settings, settings.workspace.logs / "prepare.log") as quiet:
        done: list = []

        def one(r) -> None:
            done.append(r)
            quiet.say(f"{r.city} {r.status} ({r.tiles} tiles)" + (f": {r.error}" if r.error else ""))
            if quiet.on_step:
                quiet.on_step("prepare", len(done), table.num_rows, f"{sum(x.tiles for x in done)} tiles",
                              failed=len(done) == table.num_rows and all(x.status == "failed" for x in done))

        init_ray(address)
        if quiet.on_step:
            quiet.on_step("prepare", 0, table.num_rows)
        results = run_prepare(table, settings.workspace, cfg, force=force, imagery=spec, on_result=one)
    view = Table(title=f"prepare: {settings.workspace.tiles}")
    for name in ("city", "status", "tiles", "seconds", "error"):
        view.add_column(name, overflow="fold")
    for r in results:
        colour = {"done": "green", "skipped": "cyan", "failed": "red"}[r.status]
        view.add_row(r.city, f"[{colour}]{r.status}[/]", str(r.tiles), f"{r.seconds:.1f}", escape(r.error))
    console.print(view)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:  # each failure in full on a line of its own (the table folds long causes)
        console.print(f"[red]{escape(r.city)}:[/] {escape(r.error)}", soft_wrap=True, highlight=False)
    if failed:
        _fail(f"{len(failed)} of {len(results)} cities failed: {', '.join(r.city for r in failed)}", code=1)
    console.print(f"[green]ok:[/] {sum(r.tiles for r in results)} tiles in {len(results)} cities")


def _train(ctx: typer.Context, task: str, name: str, storage: str | None, address: str | None, workers: str, **fields) -> None:
    """One training command: ``fields`` are :class:`TrainConfig` fields, built and checked here (one line on error)."""
    from engine.pipelines.runtime import init_ray
    from engine.pipelines.train import TrainConfig, parse_workers, run_training

    settings: Settings = ctx.obj
    path, table = _load_catalog(settings)
    try:
        cfg = TrainConfig(task=task, num_workers=parse_workers(workers), **fields)
        check_name("model", name)  # it becomes models/<name>
    except ValueError as exc:
        _fail(str(exc))
    with _Quiet(settings, settings.workspace.logs / f"{task}-{name}.log") as quiet:
        init_ray(address)
        if quiet.on_step:
            quiet.on_step("train", 0, None, f"{task}, preset {cfg.preset}, {cfg.epochs} epochs")
        out = run_training(table, settings.workspace, cfg, name=name, storage=storage)
        if quiet.on_step:
            quiet.on_step("train", 1, 1, f"model {out}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    console.print(f"[green]ok:[/] {task} model in [bold]{out}[/] (last epoch: {shown})", soft_wrap=True)


_TRAIN_OPTIONS = {
    "name": typer.Option("--name", help="Run name: checkpoints in <storage>/<name>, model in <workspace>/models/<name>; rerun resumes."),
    "preset": typer.Option("--preset", help="GeoLink preset: test (the test suite's, smallest), tiny (CPU), base, large."),
    "epochs": typer.Option("--epochs", min=1, help="Epochs over the training tiles."),
    "batch_size": typer.Option("--batch-size", min=1, help="Tiles per step per worker."),
    "lr": typer.Option("--lr", help="Peak learning rate (AdamW, warmup + cosine)."),
    "workers": typer.Option("--workers", help="DDP workers: N, or MIN-MAX for elastic training."),
    "gpu": typer.Option("--gpu", help="Use one GPU per worker (NCCL, bf16 autocast)."),
    "storage": typer.Option("--storage", help="Checkpoint storage (local path or s3://...); default <workspace>/runs/train."),
    "seed": typer.Option("--seed", help="Random seed."),
    "address": typer.Option("--address", help="Ray address; default: a local Ray."),
    "max_zoom": typer.Option("--max-zoom", help="Random zoom in/out by up to this factor (image, labels, OSM alike); 1 = off."),
    "with_location": typer.Option("--with-location", help="Build the model with the geolocation encoder: each tile centre's lon/lat "
                                  "(contrasted with the image in pretraining, added to the tokens before fusion)."),
}


@app.command("pretrain")
def pretrain(
    ctx: typer.Context,
    name: Annotated[str, _TRAIN_OPTIONS["name"]] = "pretrain",
    preset: Annotated[str, _TRAIN_OPTIONS["preset"]] = "tiny",
    epochs: Annotated[int, _TRAIN_OPTIONS["epochs"]] = 3,
    batch_size: Annotated[int, _TRAIN_OPTIONS["batch_size"]] = 8,
    lr: Annotated[float, _TRAIN_OPTIONS["lr"]] = 3e-4,
    workers: Annotated[str, _TRAIN_OPTIONS["workers"]] = "1",
    gpu: Annotated[bool, _TRAIN_OPTIONS["gpu"]] = False,
    storage: Annotated[str | None, _TRAIN_OPTIONS["storage"]] = None,
    seed: Annotated[int, _TRAIN_OPTIONS["seed"]] = 0,
    address: Annotated[str | None, _TRAIN_OPTIONS["address"]] = None,
    max_zoom: Annotated[float, _TRAIN_OPTIONS["max_zoom"]] = 1.0,
    pretrain_on_test: Annotated[bool, typer.Option("--pretrain-on-test", help="Pretrain on the test cities' imagery and OSM too (no labels are read).")] = False,
    with_location: Annotated[bool, _TRAIN_OPTIONS["with_location"]] = False,
) -> None:
    """Self-supervised pretraining (masked patches, image-graph contrast, masked OSM nodes) on Ray Train."""
    _train(ctx, "pretrain", name, storage, address, workers, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr, use_gpu=gpu,
           seed=seed, max_zoom=max_zoom, pretrain_on_test=pretrain_on_test, with_location=with_location)


@app.command("finetune")
def finetune(
    ctx: typer.Context,
    name: Annotated[str, _TRAIN_OPTIONS["name"]] = "finetune",
    preset: Annotated[str, typer.Option("--preset", help="GeoLink preset: test (the test suite's, smallest), tiny (CPU), base, large; "
                                        "ignored with --init-from (the model is the init bundle's).")] = "tiny",
    epochs: Annotated[int, _TRAIN_OPTIONS["epochs"]] = 3,
    batch_size: Annotated[int, _TRAIN_OPTIONS["batch_size"]] = 8,
    lr: Annotated[float, _TRAIN_OPTIONS["lr"]] = 3e-4,
    workers: Annotated[str, _TRAIN_OPTIONS["workers"]] = "1",
    gpu: Annotated[bool, _TRAIN_OPTIONS["gpu"]] = False,
    mode: Annotated[str, typer.Option("--mode", help="Input: fused, image or osm.")] = "fused",
    classes: Annotated[str, typer.Option("--classes", help="builtup (UV, other built-up land, the rest: UV share is measured), "
                                         "binary (UV vs not) or landuse (all classes).")] = "builtup",
    label_fraction: Annotated[float, typer.Option("--label-fraction", help="Share of training tiles with labels.")] = 1.0,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Start from this model bundle (folder or s3:// URI: a pretrained model, or one "
                                                  "from import-weights); its config is kept, only the classes and tile size follow this run.")] = None,
    storage: Annotated[str | None, _TRAIN_OPTIONS["storage"]] = None,
    seed: Annotated[int, _TRAIN_OPTIONS["seed"]] = 0,
    address: Annotated[str | None, _TRAIN_OPTIONS["address"]] = None,
    image_dropout: Annotated[float, typer.Option("--image-dropout", help="Fused mode: share of training samples with the image blanked (modality dropout).")] = 0.0,
    max_zoom: Annotated[float, _TRAIN_OPTIONS["max_zoom"]] = 1.0,
    target: Annotated[str, typer.Option("--task", help="segmentation (UV and land use from reference polygons), or population / "
                                        "co2: a tile-level regression on the catalog's truth raster of that name (MAE, RMSE, R2).")] = "segmentation",
    log_target: Annotated[bool, typer.Option("--log-target/--linear-target", help="Regression on log1p of the quantity (default) "
                                             "or on the quantity itself.")] = True,
    backbone_lr_scale: Annotated[float, typer.Option("--backbone-lr-scale", help="The pretrained encoders and fusion learn at this share of --lr (0 freezes them).")] = 1.0,
    with_location: Annotated[bool, _TRAIN_OPTIONS["with_location"]] = False,
) -> None:
    """Fine-tune for urban-village segmentation on the train split; IoU/F1/mIoU on the val split each epoch."""
    _train(ctx, "finetune", name, storage, address, workers, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr, use_gpu=gpu,
           seed=seed, mode=mode, classes=classes, label_fraction=label_fraction, init_from=init_from, image_dropout=image_dropout,
           max_zoom=max_zoom, backbone_lr_scale=backbone_lr_scale, with_location=with_location, target=target, log_target=log_target)


@app.command("import-weights")
def import_weights_command(
    src: Annotated[Path, typer.Argument(help="Published weights: the GeoLink authors' .pth (model_config + model_state_dict; the multimodal "
                                             "one too) or a timm ViT state dict (.safetensors or .pth).")],
    out: Annotated[Path, typer.Option("--out", help="The model bundle to write, e.g. geolink-data/models/geolink-vitl.")],
    preset: Annotated[str | None, typer.Option("--preset", help="Preset for the rest of the model; its ViT sizes must equal the weights' "
                                               "(default: the preset of the weights' width, with their sizes).")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="timm architecture, e.g. vit_base_patch16_224 (default: the file's "
                                             "model_config, else inferred from the shapes).")] = None,
    img_size: Annotated[int | None, typer.Option("--img-size", min=16, help="Tile size in pixels (default: the weights'); "
                                                 "finetune sets it to the prepared tiles' anyway.")] = None,
    classes: Annotated[str, typer.Option("--classes", help="Label set: builtup, binary or landuse.")] = "builtup",
    gsd_m: Annotated[float | None, typer.Option("--gsd-m", help="Ground sample distance (m) of the imagery the weights were trained on "
                                                "(recorded in the bundle).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the freshly initialised parts (OSM encoder, fusion, decoders).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Convert published ViT weights into a model bundle (the image encoder; the rest fresh) to fine-tune from."""
    from engine.weights_import import WeightsImportError, import_weights

    try:
        report = import_weights(src, out, preset=preset, arch=arch, img_size=img_size, classes=classes, gsd_m=gsd_m, seed=seed, force=force)
    except WeightsImportError as exc:
        _fail(str(exc))
    lines = report.summary()
    console.print(f"[green]ok:[/] imported {escape(lines[0])}", soft_wrap=True, highlight=False)
    for line in lines[1:]:
        colour = "yellow" if line.startswith(("missing", "note")) and not line.startswith("missing 0") else "default"
        console.print(f"  [{colour}]{escape(line)}[/]", soft_wrap=True, highlight=False)
    console.print(f"fine-tune it with `geolink-engine finetune --init-from {escape(str(out))}` (see {escape(str(out / 'MODEL_CARD.md'))})",
                  soft_wrap=True, highlight=False)


@app.command("map")
def map_command(
    ctx: typer.Context,
    cities: Annotated[str, typer.Option("--cities", help="'all' or a comma list of city slugs.")] = "all",
    model: Annotated[str | None, typer.Option("--model", help="Model bundle (models/<name>, or an s3:// URI); default: models/default, trained first if absent; "
                                              "'reference': the catalog's reference polygons as a perfect model (checks the pipeline).")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Run name: runs/<run> (predictions, ledger) and products/<run>; rerun resumes. "
                                            "Default: default (default-<vintage> with --vintage).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray address ('auto', 'ray://host:10001'); default: a local Ray.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="fused, image or osm; default: the model's own.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Tiles per model call (default: 16 on CPU, 64 on GPUs).")] = None,
    devices: Annotated[int, typer.Option("--devices", min=0, help="GPUs to predict on (one actor each); 0 = CPU.")] = 0,
    actors_per_gpu: Annotated[int, typer.Option("--actors-per-gpu", min=1, help="Predictor actors sharing one GPU (keeps a fast GPU busy).")] = 1,
    actors: Annotated[int | None, typer.Option("--actors", min=1, help="Predictor actors on CPU (default: half the CPUs).")] = None,
    min_area: Annotated[float, typer.Option("--min-area", help="Drop UV polygons smaller than this (m2).")] = 100.0,
    allow_gsd_mismatch: Annotated[bool, typer.Option("--allow-gsd-mismatch", help="Map cities whose ground GSD is more than 3x off the "
                                                     "model's training GSD (refused otherwise).")] = False,
    gsd: Annotated[float | None, _INPUT_OPTIONS["gsd"]] = None,
    bands: Annotated[str | None, _INPUT_OPTIONS["bands"]] = None,
    radiometry: Annotated[str | None, _INPUT_OPTIONS["radiometry"]] = None,
    population_model: Annotated[str | None, typer.Option("--population-model", help="A population model (finetune --task population, "
                                                         "same tile size): residents per 100 m cell, per UV polygon, and per city "
                                                         "and region with 95% intervals (population.csv).")] = None,
    vintage: Annotated[str | None, typer.Option("--vintage", help="Map one date of a multi-date catalog (its `vintage` column, e.g. "
                                                "2024); `geolink-engine change` compares two such runs.")] = None,
) -> None:
    """The main job: prepare -> fused inference -> stitch -> products, for the catalog's cities (demo cities if none).

    The console shows a line per stage, then the tables; Ray's, torch's and GDAL's output goes to runs/<run>/logs/
    (-v: each stage's details too; -vv: everything on the console, as it comes)."""
    from engine.pipelines.infer import InferenceConfig
    from engine.pipelines.map import MapConfig, default_model, map_catalog, run_map

    settings: Settings = ctx.obj
    vintage = vintage or settings.vintage
    run = run or (f"default-{vintage}" if vintage else "default")
    try:
        settings = settings.for_vintage(vintage)
        logs = settings.workspace.run(run).root / "logs"  # the run name is checked here, before anything is written
    except ValueError as exc:
        _fail(str(exc))
    with _Quiet(settings, logs / "map.log") as quiet:
        _, table = map_catalog(settings.workspace, settings.catalog, cities, say=quiet.say,
                               on_demo_city=quiet.counter("demo data"), vintage=vintage)
        cfg = MapConfig(run=run, model_dir=model, mode=mode, min_area_m2=min_area, allow_gsd_mismatch=allow_gsd_mismatch,
                        gsd_m=gsd, bands=bands, radiometry=radiometry, population_model=population_model, vintage=vintage,
                        inference=InferenceConfig(batch_size=batch_size, gpus=devices, actors=actors, actors_per_gpu=actors_per_gpu))
        report = run_map(table, settings.workspace, cfg, ensure_model=lambda cat: default_model(settings.workspace, cat, use_gpu=devices > 0, say=quiet.say),
                         on_stage=quiet.say, address=address, on_step=quiet.on_step)
    _print_city_report(report.cities, f"map run {report.run} (model {report.model_version})")
    if report.assessment is not None:
        _print_assessment(report.assessment)
    if report.population is not None:
        _print_population(report.population)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    console.print(f"products in [bold]{report.products}[/] (summary: {report.products / 'index.html'}); {timing}", soft_wrap=True)
    if (report.products / "map.html").is_file():
        console.print(f"interactive map: [bold]{report.products / 'map.html'}[/]; to open it run "
                      f"[bold]geolink-engine serve --run {report.run}[/]", soft_wrap=True, highlight=False)
    population_failed = isinstance(report.population, str)
    if report.failed or report.assessment_failed or population_failed:
        cities = ", ".join(f"{c.city} ({c.stage})" for c in report.failed)
        _fail(f"{len(report.failed)} of {len(report.cities)} cities failed or are incomplete" + (f": {cities}" if cities else "")
              + ("; the accuracy assessment failed" if report.assessment_failed else "")
              + ("; the population products failed" if population_failed else ""), code=1)


class _Quiet:
    """The console of a long command (map, prepare, pretrain, finetune, embed, assess): one live display of its stages,
    everything else in ``log_file`` (Ray's, Ray Data's, torch's and GDAL's output; Ray's workers keep theirs in Ray's
    session folder, linked beside the log as ``ray-session``).

    ``say`` is a stage's detail (in the log; on the console with ``-v``, and warnings always); ``on_step`` /
    ``counter`` drive the display. ``-vv`` shows everything as it comes and no display. On leaving, an input error
    (bad catalog, model, option) is its one line (exit 2); any other failure is one line naming the log that holds
    its traceback (exit 1); a Ray this command started is shut down, its messages going to the log too.
    """

    def __init__(self, settings: Settings, log_file: Path) -> None:
        self.settings = settings
        self.log_file = Path(log_file)
        self.everything = settings.verbosity >= 2
        self.captured = None
        self.display = None
        self._shown = False
        self._created: list[Path] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Quiet:
        from engine.console import CapturedOutput, StageDisplay
        from engine.pipelines.runtime import quiet_driver

        missing = [p for p in (self.log_file.parent, *self.log_file.parent.parents) if not p.exists()]
        self._created = missing  # deepest first: the folders to remove again if the command is refused
        if not self.everything:
            self.captured = self._stack.enter_context(CapturedOutput(self.log_file, console))
            quiet_driver()
        self.display = self._stack.enter_context(StageDisplay(console))
        return self

    def show_logs(self) -> None:
        """Once, when the first stage starts (a command refused by its checks is its one error line)."""
        from engine.pipelines.runtime import ray_log_dir

        if self.captured is not None and not self._shown:
            self._shown = True
            console.print(f"logs: {escape(str(self.log_file.parent))}/ (this command's Ray, torch and GDAL output: "
                          f"{escape(self.log_file.name)}; Ray's workers: "
                          f"{escape(str(ray_log_dir() or 'the Ray session folder, linked as ray-session/ once Ray starts'))})",
                          soft_wrap=True, highlight=False)

    def say(self, msg: str) -> None:
        if self.captured is not None:
            self.captured.write(f"> {msg}")
        if self.captured is None or self.settings.verbosity >= 1 or msg.startswith(("warning", "imagery:")):
            self.show_logs()
            console.print(f"[bold]>[/] {escape(msg)}", soft_wrap=True)

    def step(self, *args, **kwargs) -> None:
        self.show_logs()
        self.display.step(*args, **kwargs)

    @property
    def on_step(self) -> Callable[..., None] | None:
        """The display's ``step`` (None with ``-vv``: the stages' own output is shown instead)."""
        return None if self.everything else self.step

    def counter(self, stage: str) -> Callable[..., None] | None:
        return None if self.everything else self.display.counter(stage)

    def __exit__(self, exc_type, exc, tb) -> bool:
        from click.exceptions import ClickException, Exit

        from engine.errors import describe_error
        from engine.pipelines.runtime import ray_log_dir, shutdown_ray

        error: tuple[str, int] | None = None
        handled = False
        if exc is not None and not isinstance(exc, (typer.Exit, Exit, ClickException, KeyboardInterrupt, SystemExit)):
            if isinstance(exc, (CatalogError, ValueError, FileNotFoundError)):  # a bad catalog, bundle or option: one line
                error, handled = (str(exc), 2), True
            elif isinstance(exc, Exception) and self.captured is not None:  # anything else: one line, traceback in the log
                traceback.print_exception(exc, file=self.captured.log)
                error, handled = (f"{describe_error(exc)} (traceback in {self.captured.path})", 1), True
        refused = self.captured is not None and not self._shown and (exc is not None and (error is None or error[1] == 2))
        try:
            if self.captured is not None:
                if (ray_logs := ray_log_dir()) and not refused:
                    self.captured.write(f"Ray session logs (every worker's output): {ray_logs}")
                    _link_ray_logs(self.log_file.parent, ray_logs)
                shutdown_ray()  # a Ray this command started
        finally:
            self._stack.close()
        if refused:  # refused by its checks before any stage: its one error line, and nothing left on disk
            self._remove_log()
        if error is not None:
            _fail(*error)
        return handled

    def _remove_log(self) -> None:
        """Delete the log file and the folders entering made for it (a refused run must not appear as a run)."""
        with contextlib.suppress(OSError):
            self.log_file.unlink(missing_ok=True)
            for folder in self._created:
                folder.rmdir()  # only when empty: anything else written there stays


def _link_ray_logs(logs: Path, ray_logs: Path | None) -> None:
    """``logs/ray-session``: a link to the Ray session's log folder (every worker's output), when it is on this machine."""
    if ray_logs is None or not ray_logs.is_dir():
        return
    link = logs / "ray-session"
    with contextlib.suppress(OSError):  # a file system without links: the path is in map.log's header anyway
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ray_logs, target_is_directory=True)


def _print_population(population) -> None:
    """Residents per region and nationally, with their intervals (population.csv holds every city)."""
    if isinstance(population, str):
        console.print(f"[red]population {escape(population)}[/]", soft_wrap=True)
        return
    if population.products is None:
        return
    table = Table(title=f"population (model {population.model_version}; 95% prediction intervals)")
    for name in ("", "cities", "residents", "in urban villages", "UV share"):
        table.add_column(name, justify="left" if not name else "right")

    def span(value, lo, hi, fmt):
        inside = "" if lo is None or hi is None or lo != lo or hi != hi else f" [{fmt.format(lo)}, {fmt.format(hi)}]"
        return fmt.format(value) + inside if value == value else ""

    for r in population.products.rows:
        if r["level"] == "city":
            continue
        table.add_row(r["name"], str(r["cities"]), span(r["population"], r["population_lo"], r["population_hi"], "{:,.0f}"),
                      span(r["uv_population"], r["uv_population_lo"], r["uv_population_hi"], "{:,.0f}"),
                      span(r["uv_share"], r["uv_share_lo"], r["uv_share_hi"], "{:.1%}"))
    console.print(table)
    note = next((r["interval"] for r in population.products.rows if r["level"] == "national"), "")
    console.print(f"intervals: {escape(note)}; per city: {population.products.csv}", soft_wrap=True, highlight=False)


@app.command("embed")
def embed_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="Run name: runs/<run>/embeddings/<mode>_<level> (ledger, parts) and "
                                     "products/<run>/embeddings/; rerun resumes.")] = "default",
    model: Annotated[str | None, typer.Option("--model", help="Model bundle (folder or s3:// URI); default: the map run's model, "
                                              "else models/default.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="image, osm or fused; default: the model's own (refused when the model "
                                             "never trained what the mode reads).")] = None,
    level: Annotated[str, typer.Option("--level", help="tile (one vector per tile: mean over its core patches) or patch "
                                       "(one per core patch).")] = "tile",
    points: Annotated[str | None, typer.Option("--points", help="Points file (GeoPackage, GeoParquet, GeoJSON... with a CRS, or CSV "
                                               "of lon/lat): the embedding at each point, from its tile's patch grid (--level is not used).")] = None,
    cities: Annotated[str, typer.Option("--cities", help="'all' or a comma list of city slugs.")] = "all",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Tiles per model call (default: 16 on CPU, 64 on GPUs).")] = None,
    devices: Annotated[int, typer.Option("--devices", min=0, help="GPUs to encode on (one actor each); 0 = CPU.")] = 0,
    actors: Annotated[int | None, typer.Option("--actors", min=1, help="Encoder actors on CPU (default: half the CPUs).")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Ray address ('auto', 'ray://host:10001'); default: a local Ray.")] = None,
) -> None:
    """Encodings of the prepared tiles as GeoParquet: per tile, per patch, or at given points (Ray Data, resumable)."""
    from engine.mapping.embed import PointsError
    from engine.pipelines.embed import EmbedConfig, run_embed
    from engine.pipelines.infer import InferenceConfig

    settings: Settings = ctx.obj.for_run(run)  # the vintage the run mapped
    path, table = _load_catalog(settings)
    try:
        logs = settings.workspace.run(run).root / "logs"
        cfg = EmbedConfig(run=run, model_dir=model, mode=mode, level=level, points=points,
                          inference=InferenceConfig(batch_size=batch_size, gpus=devices, actors=actors))
        selected = select_cities(table, cities)
    except (CatalogError, ValueError) as exc:
        _fail(str(exc))
    with _Quiet(settings, logs / "embed.log") as quiet:
        try:
            report = run_embed(selected, settings.workspace, cfg, on_stage=quiet.say,
                               on_commit=None if quiet.everything else quiet.display.adder("embed"), address=address)
        except PointsError as exc:  # a bad points file: one line, before Ray
            _fail(str(exc))
    result = report.inference
    console.print(f"[green]ok:[/] {report.rows} rows ({report.mode}, {report.level}) in [bold]{report.path}[/]; tiles: {result.predicted} "
                  f"encoded, {result.skipped} done before, {result.failed} failed"
                  + (f"; STAC {report.stac}" if report.stac else ""), soft_wrap=True)
    if line := report.unmatched_line():
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False)
    for city, why in sorted(result.missing.items()):
        console.print(f"[yellow]warning:[/] {escape(city)}: {escape(why)}", soft_wrap=True, highlight=False)
    if report.failures or report.points_without_tile:
        city, tile, _, error = report.failures[0] if report.failures else ("", "", 0, "")
        _fail(f"{len(report.failures)} tiles failed to encode" + (f" (first: {tile}: {error})" if tile else "")
              + (f"; {len(report.points_without_tile)} points have no embedding" if report.points_without_tile else "")
              + "; rerun the same command to retry them", code=1)


@app.command("stitch")
def stitch_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The mapping run whose predictions to stitch.")] = "default",
    cities: Annotated[str, typer.Option("--cities", help="'all' or a comma list of city slugs.")] = "all",
    min_area: Annotated[float, typer.Option("--min-area", help="Drop UV polygons smaller than this (m2).")] = 100.0,
) -> None:
    """Rebuild products/<run>/ from a run's committed predictions (blend, polygons across seams, STAC, page)."""
    from engine.pipelines.stitch import stitch_products

    settings: Settings = ctx.obj.for_run(run)  # the vintage the run mapped
    path, table = _load_catalog(settings)
    try:
        table = select_cities(table, cities)
        report = stitch_products(settings.workspace, run, table, min_area)
    except (CatalogError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    _print_city_report(report, f"stitch run {run}")
    failed = [c for c in report if c.status != "ok"]
    if failed:
        _fail(f"{len(failed)} of {len(report)} cities failed or are incomplete: " + ", ".join(f"{c.city} ({c.stage})" for c in failed), code=1)


@app.command("status")
def status_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The mapping run to report on.")] = "default",
) -> None:
    """A map run's progress, while it runs or after: per city tiles done of planned, failures, stage; rate and ETA.

    Reads runs/<run>/status.json (written by the running map) and, when no process holds it, a copy of the ledger:
    it never opens a running map's ledger, so it neither blocks nor disturbs the run."""
    import time

    from engine.mapping.status import NoSuchRun, read_status, summary_line
    from engine.workspace import BadName

    settings: Settings = ctx.obj
    try:
        status = read_status(settings.workspace, run)
    except (NoSuchRun, BadName) as exc:
        _fail(str(exc))
    now = time.time()
    view = Table(title=f"run {run} ({status.source})")
    errors = any(c.errors for c in status.cities)
    for name in ["city", "stage", "tiles ok / planned", "failed"] + (["first error"] if errors else []):
        view.add_column(name, overflow="fold", no_wrap=name != "first error")
    for c in status.cities:
        colour = {"stitched": "green", "inferred": "green", "inferring": "cyan", "failed": "red"}.get(c.stage, "white")
        cells = [c.city, f"[{colour}]{escape(c.stage)}[/]", f"{c.ok} / {c.planned}", str(c.failed)]
        if errors:
            first = c.errors[0] if c.errors else None
            more = f" (+{c.failed - 1} more)" if c.failed > 1 else ""
            cells.append(escape(f"{first[0] + ': ' if first[0] else ''}{first[1]}{more}") if first else "")
        view.add_row(*cells)
    if status.cities:
        console.print(view)
    for note in status.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    colour = {"live": "cyan", "finished": "green"}.get(status.state, "yellow")
    console.print(f"[{colour}]{escape(summary_line(status, now))}[/]", highlight=False, soft_wrap=True)


HOST_HELP = "Address to bind: 127.0.0.1 (this machine only) unless you name another; any other is warned about."


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run whose products to serve.")] = "default",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8765,
    host: Annotated[str, typer.Option("--host", help=HOST_HELP)] = "127.0.0.1",
) -> None:
    """Serve a run's products on localhost: map.html (pan, zoom, click a village), index.html and every file.

    Only files under products/<run>/ are served (no folder listings, no path out of it), with HTTP range requests,
    which the map's PMTiles archive needs. Ctrl-C stops it."""
    from engine.product_layout import MAP_HTML
    from engine.web.server import make_server, server_url  # make_server warns of a host other than the loopback
    from engine.workspace import BadName

    settings: Settings = ctx.obj
    try:
        products = settings.workspace.products(run)
    except BadName as exc:
        _fail(str(exc))
    Workspace.fetch(products)  # a remote workspace: its products mirrored locally first
    if not (products / MAP_HTML).is_file():
        _fail(f"run {run}: no {products / MAP_HTML}; run `geolink-engine map --run {run}` (or `stitch`) first")
    try:
        server = make_server(products, host=host, port=port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port")
    console.print(f"serving {escape(str(products))} at [bold]{server_url(server, '/' + MAP_HTML)}[/] (Ctrl-C stops)",
                  highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.server_close()


@app.command("label")
def label_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run whose accuracy sample to label (after `assess`).")] = "default",
    labeller: Annotated[str | None, typer.Option("--labeller", help="Your name (a slug): your answers go to accuracy/labels/<name>.csv.")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8766,
    host: Annotated[str, typer.Option("--host", help=HOST_HELP)] = "127.0.0.1",
    export: Annotated[bool, typer.Option("--export", help="Write --labeller's answers as the file `assess --reference` reads, and stop.")] = False,
    agreement_of: Annotated[str | None, typer.Option("--agreement", help="A,B: Cohen's kappa of two labellers with its 95% interval, and stop.")] = None,
) -> None:
    """Label the accuracy sample in a browser: each point's image chip and a wider view, blind to the map class.

    On a change run (`geolink-engine change`), both dates' chips side by side and the four change classes.

    Every answer is saved at once (atomically) in products/<run>/accuracy/labels/<labeller>.csv; a reload or a killed
    server loses nothing and the page resumes where it stopped. A second labeller on the same sample gives Cohen's
    kappa (--agreement). --export writes <labeller>.reference.csv for `assess --reference`."""
    from engine.pipelines.prepare import prepared_imagery
    from engine.pipelines.change import dated_rows
    from engine.web.label import agreement, export_reference, format_agreement, make_label_server, run_vintages
    from engine.web.server import server_url  # make_server warns of a host other than the loopback
    from engine.workspace import BadName

    settings: Settings = ctx.obj.for_run(run)  # the vintage the run mapped
    try:
        products = settings.workspace.products(run)
        if agreement_of is not None:
            a, _, b = agreement_of.partition(",")
            if not a or not b:
                _fail(f"--agreement {agreement_of!r}: give two labellers as A,B")
            console.print(escape(format_agreement(agreement(products, a.strip(), b.strip()))), soft_wrap=True, highlight=False)
            return
        if export:
            if labeller is None:
                _fail("--export needs --labeller NAME: whose answers to export")
            path = export_reference(products, labeller)
            console.print(f"[green]ok:[/] wrote {escape(str(path))}; use it with "
                          f"[bold]geolink-engine assess --run {run} --reference {escape(str(path))}[/]", soft_wrap=True, highlight=False)
            return
        vintages = run_vintages(products)
        if vintages:  # a change run: each date's chips from that date's imagery
            _, table = _load_catalog(settings, every_vintage=True)
            before_rows, after_rows = (dated_rows(table, settings.workspace, v) for v in vintages)
            server = make_label_server(products, before_rows, host=host, port=port, labeller=labeller, after_rows=after_rows)
        else:
            _, table = _load_catalog(settings)
            server = make_label_server(products, prepared_imagery(table, settings.workspace).to_pylist(), host=host, port=port,
                                       labeller=labeller)
    except (BadName, ValueError, FileNotFoundError, CatalogError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port")
    query = f"?labeller={labeller}" if labeller else ""
    console.print(f"labelling run {escape(run)}'s sample at [bold]{server_url(server, '/' + query)}[/] (answers in "
                  f"{escape(str(products / 'accuracy' / 'labels'))}/; Ctrl-C stops)", highlight=False, soft_wrap=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped; every answer was saved as it was given")
    finally:
        server.server_close()


@app.command("change")
def change_command(
    ctx: typer.Context,
    before: Annotated[str, typer.Option("--before", help="The map run of the earlier date (map --vintage V1).")],
    after: Annotated[str, typer.Option("--after", help="The map run of the later date (map --vintage V2), same model and tile grid.")],
    into: Annotated[str | None, typer.Option("--into", help="The change run's name: products/<into>/ (default <before>-to-<after>).")] = None,
    tolerance_px: Annotated[int, typer.Option("--tolerance-px", min=0, max=50, help="Misregistration tolerance (pixels): UV of one date "
                                              "with the other date's UV this close is persistent, not demolished or new.")] = 3,
    n_total: Annotated[int | None, typer.Option("--n-total", min=1, help="Sample size of the change accuracy assessment.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the assessment's sample.")] = 0,
    reference: Annotated[Path | None, typer.Option("--reference", help="Filled two-date labelling sheet (CSV: id,label with label one of "
                                                   "other, persistent_uv, demolished_uv, new_uv) for points without both references.")] = None,
) -> None:
    """Urban-village change between two dates: change COGs, each village's fate, change statistics and their accuracy.

    Writes products/<into>/: cities/<city>/change.tif (persistent, demolished, new UV), change_polygons.parquet,
    change_stats.csv, accuracy/ (area per change class with 95% CIs, user's and producer's accuracy), index.html, STAC.
    A city mapped at one date only is reported and the others are compared."""
    from engine.pipelines.change import ChangeConfig, change_run_name, run_change

    settings: Settings = ctx.obj
    try:
        name = check_name("run", into or change_run_name(check_name("run", before), check_name("run", after)))
        logs = settings.workspace.run(name).root / "logs"
        cfg = ChangeConfig(tolerance_px=tolerance_px, n_total=n_total, seed=seed)
    except ValueError as exc:
        _fail(str(exc))
    _, table = _load_catalog(settings, every_vintage=True)  # both dates' references and imagery
    with _Quiet(settings, logs / "change.log") as quiet:
        report = run_change(settings.workspace, before, after, table, into=name, cfg=cfg, say=quiet.say, on_step=quiet.on_step,
                            reference_labels=reference)
    view = Table(title=f"change {report.vintages[0]} -> {report.vintages[1]}: run {report.run}")
    for column in ("city", "region", "status", "UV before ha", "demolished ha", "new ha", "demolished share", "note"):
        view.add_column(column, overflow="fold")
    for c in report.cities:
        r = c.row
        colour = {"done": "green", "failed": "red", "missing": "yellow"}[c.status]
        share = r.get("demolished_uv_m2", 0) / r["before_uv_m2"] if r.get("before_uv_m2") else None
        view.add_row(c.city, c.region, f"[{colour}]{c.status}[/]",
                     *(f"{r[k] / 1e4:.2f}" if k in r else "" for k in ("before_uv_m2", "demolished_uv_m2", "new_uv_m2")),
                     "" if share is None else f"{share:.1%}", escape(c.error))
    console.print(view)
    national = next((r for r in report.stats if r["level"] == "national"), None)
    if national and national.get("before_uv_m2"):
        console.print(f"national: {national['demolished_uv_m2'] / 1e4:,.2f} ha of {national['before_uv_m2'] / 1e4:,.2f} ha UV demolished "
                      f"({national['demolished_share']:.1%}), {national['new_uv_m2'] / 1e4:,.2f} ha new", highlight=False, soft_wrap=True)
    if isinstance(report.assessment, str):
        console.print(f"[red]change assessment {escape(report.assessment)}[/]", soft_wrap=True)
    elif report.assessment is not None:
        _print_change_assessment(report.assessment)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    console.print(f"change products in [bold]{report.products}[/] (open {report.products / 'index.html'}); {timing}", soft_wrap=True)
    if report.failed or isinstance(report.assessment, str):
        _fail(f"{len(report.failed)} of {len(report.cities)} cities not compared: "
              + ", ".join(f"{c.city} ({c.status})" for c in report.failed) if report.failed else "the change assessment failed", code=1)


def _print_change_assessment(report) -> None:
    """National area per change class with its 95% CI (beside the census where the truth is known), user's and
    producer's accuracy; or what the assessment awaits."""
    national = report.national
    if report.status != "done" or national.result is None:
        console.print(f"[yellow]change accuracy:[/] {escape(report.status)}"
                      + (f" ({escape(national.note)})" if national.note else "")
                      + "".join(f"; {escape(w)}" for w in report.warnings), soft_wrap=True, highlight=False)
        return
    result = national.result
    census = (report.census or {}).get("national", {}).get("national") if report.census else None
    truth = census.values() if census is not None else None
    view = Table(title=f"change accuracy, national: n={national.n}, estimate [95% CI] (design-based)")
    for column in ["class", "area ha"] + (["census ha"] if truth else []) + ["user's", "producer's"]:
        view.add_column(column, justify="left" if column == "class" else "right")

    def span(e, factor: float = 1.0, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(e.estimate * factor)} [{fmt.format(e.ci95[0] * factor)}, {fmt.format(e.ci95[1] * factor)}]"

    for name in result.area:
        cells = [name, span(result.area[name], 1e-4, "{:,.2f}")]
        if truth:
            cells.append(f"{truth['area'][name] / 1e4:,.2f}" if name in truth.get("area", {}) else "")
        cells += [span(result.users_accuracy[name]), span(result.producers_accuracy[name])]
        view.add_row(*cells)
    console.print(view)
    console.print(f"overall accuracy {span(result.overall_accuracy)}; report: {report.files.get('report_md', report.out_dir)}",
                  soft_wrap=True, highlight=False)


@app.command("merge-runs")
def merge_runs_command(
    ctx: typer.Context,
    runs: Annotated[str, typer.Option("--runs", help="Comma list of the map runs to merge (disjoint city shards).")],
    into: Annotated[str, typer.Option("--into", help="Name of the merged run (products/<into>/).")],
) -> None:
    """Merge the products of map runs over disjoint city shards into one product set (page and STAC included)."""
    from engine.pipelines.merge_runs import merge_runs
    from engine.product_layout import read_city_stats

    settings: Settings = ctx.obj
    _, table = _load_catalog(settings)
    try:
        out = merge_runs(settings.workspace, [r.strip() for r in runs.split(",") if r.strip()], into, table)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    stats = read_city_stats(out)
    console.print(f"[green]ok:[/] {len(stats)} cities, {sum(r['polygons'] or 0 for r in stats)} villages in {out}; "
                  f"assess them with `geolink-engine assess --run {into}`")
    missing = sorted(set(table["city"].to_pylist()) - {r["city"] for r in stats})
    if missing:  # a national product without some catalog cities: say which, never silently
        console.print(f"[yellow]warning:[/] {len(missing)} catalog cities are in none of the runs: {', '.join(missing)}")


@app.command("assess")
def assess_command(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The mapping run whose products to assess.")] = "default",
    cities: Annotated[str, typer.Option("--cities", help="'all' or a comma list of city slugs.")] = "all",
    strata: Annotated[str, typer.Option("--strata", help="Strata: region or city, crossed with the map class.")] = "region",
    buffer_m: Annotated[float, typer.Option("--buffer-m", help="Buffer stratum: 'other' within this many metres of mapped UV (0 = none).")] = 0.0,
    n_total: Annotated[int | None, typer.Option("--n-total", min=1, help="Total sample size (default: Cochran's n + minimums).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample.")] = 0,
    reference: Annotated[Path | None, typer.Option("--reference", help="Filled labelling sheet (CSV: id,label) for points without a catalog reference.")] = None,
    interval: Annotated[str, typer.Option("--interval", help="95% CIs: jeffreys (stratified Jeffreys posterior, never zero-width; "
                                          "docs/ACCURACY.md) or wald (the classical Olofsson/Stehman interval).")] = "jeffreys",
) -> None:
    """Design-based accuracy and area estimates (stratified random sample, Stehman 2014) for a run's products."""
    from engine.accuracy.assess import AssessConfig
    from engine.accuracy.sampling import SampleConfig
    from engine.pipelines.assess import assess

    settings: Settings = ctx.obj.for_run(run)  # the vintage the run mapped
    path, table = _load_catalog(settings)
    try:
        logs = settings.workspace.run(run).root / "logs"
        table = select_cities(table, cities)
        cfg = AssessConfig(sampling=SampleConfig(strata=strata, buffer_m=buffer_m, n_total=n_total, seed=seed), interval=interval)
    except (CatalogError, ValueError) as exc:
        _fail(str(exc))
    with _Quiet(settings, logs / "assess.log") as quiet:
        if quiet.on_step:
            quiet.on_step("assess", 0, None, f"run {run}")
        result = assess(settings.workspace, run, table, cfg, reference_labels=reference, say=quiet.say, publish=True)
        if quiet.on_step:
            quiet.on_step("assess", 1, 1, f"{len(result.points)} points" + (", awaiting labels" if result.status != "done" else ""))
    _print_assessment(result)
    if result.skipped:
        _fail(f"{len(result.skipped)} of {len(result.skipped) + len(result.cities)} cities not assessed: "
              + ", ".join(sorted(result.skipped)), code=1)


@app.command("assess-table")
def assess_table_command(
    samples: Annotated[Path, typer.Option("--samples", help="CSV, one row per sample unit: stratum,map_class,ref_class.")],
    strata: Annotated[Path, typer.Option("--strata", help="CSV: stratum,size (any area unit; areas come out in it).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the estimates (JSON).")],
    no_fpc: Annotated[bool, typer.Option("--no-fpc", help="No finite population correction (sizes are areas, not unit counts).")] = False,
) -> None:
    """Stratified estimators (Stehman 2014) on your own sample: accuracy and area with SE and 95% CI."""
    from engine.accuracy import AccuracyInputError, assess_table

    try:
        result = assess_table(samples, strata, out, fpc=not no_fpc)
    except (AccuracyInputError, FileNotFoundError) as exc:
        _fail(str(exc))
    oa = result.overall_accuracy
    console.print(f"[green]ok:[/] n={result.n}, overall accuracy {oa.estimate:.3f} (SE {oa.se:.3f}, 95% CI {oa.ci95[0]:.3f}-{oa.ci95[1]:.3f}); "
                  f"wrote {out}", soft_wrap=True)
    for warning in result.warnings:
        console.print(f"[yellow]warning[/] {escape(warning)}", soft_wrap=True)


def _print_assessment(result) -> None:
    from engine.accuracy.report import overall_label

    if isinstance(result, str):
        console.print(f"[red]accuracy assessment {escape(result)}[/]", soft_wrap=True)
        return
    for city, why in sorted(result.skipped.items()):  # one line per city the estimates leave out
        console.print(f"[yellow]accuracy: {escape(city)} not assessed:[/] {escape(why)}", soft_wrap=True, highlight=False)
    if result.status != "done":
        sheet = result.files.get("sheet_csv") or result.out_dir
        pending = int(result.points["ref_class"].isna().sum())
        console.print(f"[yellow]accuracy:[/] {pending} of {len(result.points)} points need a reference label: fill {sheet} and "
                      "rerun `geolink-engine assess --reference FILLED.csv`", soft_wrap=True)
        return
    overall = overall_label({"skipped_cities": result.skipped, "cities": result.cities})
    scope = "" if overall == "national" else f" over {overall}"
    view = Table(title=f"accuracy{scope}, estimate [95% CI] (design-based): {result.out_dir / 'report.md'}")
    for name in ("domain", "n", "overall", "UV user's", "UV producer's", "UV km2"):
        view.add_column(name, overflow="fold")

    def fmt(est, scale: float = 1.0) -> str:
        if est is None or est.estimate != est.estimate:
            return "n/a"
        return f"{est.estimate * scale:.2f} [{est.ci95[0] * scale:.2f}, {est.ci95[1] * scale:.2f}]"

    for domain in [result.national, *result.regions.values()]:
        r = domain.result
        name = overall if domain is result.national else domain.name
        if r is None:
            view.add_row(name, str(domain.n), escape(domain.status), "", "", "")
            continue
        view.add_row(name, str(domain.n), fmt(r.overall_accuracy), fmt(r.users_accuracy.get("urban_village")),
                     fmt(r.producers_accuracy.get("urban_village")), fmt(r.area.get("urban_village"), 1e-6))
    console.print(view)


def _print_city_report(cities: list, title: str) -> None:
    view = Table(title=title)
    errors = any(c.error for c in cities)
    shares = any(c.uv_share is not None for c in cities)
    names = ["city", "region", "status", "tiles", "failed", "UVs", "UV ha"] + (["UV share"] if shares else []) + (["error"] if errors else [])
    for name in names:
        view.add_column(name, overflow="fold", no_wrap=name not in ("error",))
    for c in cities:
        colour = {"ok": "green", "partial": "yellow"}.get(c.status, "red")
        cells = [c.city, c.region, f"[{colour}]{c.status}[/]", str(c.tiles_ok), str(c.tiles_failed), str(c.polygons),
                 f"{c.uv_area_m2 / 1e4:.1f}" if c.uv_area_m2 == c.uv_area_m2 else ""]
        if shares:
            cells.append(f"{c.uv_share:.1%}" if c.uv_share is not None else "")
        if errors:
            cells.append(escape(f"{c.stage}: {c.error}" if c.error else ""))
        view.add_row(*cells)
    console.print(view)


@catalog_app.command("show")
def catalog_show(ctx: typer.Context) -> None:
    """List the catalog's cities."""
    path, table = _load_catalog(ctx.obj, every_vintage=True)
    view = Table(title=f"{path} ({table.num_rows} cities)")
    for name in ("city", "region", "split", "imagery", "osm", "reference"):
        view.add_column(name, overflow="fold")
    for row in table.to_pylist():
        view.add_row(*(_short(row.get(n)) for n in ("city", "region", "split", "imagery", "osm", "reference")))
    console.print(view)


@catalog_app.command("validate")
def catalog_validate(ctx: typer.Context) -> None:
    """Check every row (slug, unique city, readable imagery with a CRS and intact blocks, readable OSM, overlap,
    reference) and show each raster's CRS, size, bands, pixel type and ground GSD in metres."""
    from engine.imagery import format_gsd

    path, table = _load_catalog(ctx.obj, every_vintage=True)
    facts: dict = {}
    problems = validate_catalog(table, facts)
    if facts:  # what each raster is, on the ground: the model needs 8-bit RGB near the GSD it was trained at
        view = Table(title=f"imagery of {path}")
        for name in ("city", "CRS", "size (px)", "bands", "pixel type", "ground GSD"):
            view.add_column(name, overflow="fold")
        for city, f in facts.items():
            view.add_row(city, f.crs, f"{f.width_px} x {f.height_px}", str(f.bands), f.dtype, format_gsd(f.gsd_m))
        console.print(view)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    for p in problems:  # one line per problem, so logs and CI output stay greppable
        colour = "red" if p.severity == "error" else "yellow"
        console.print(f"[{colour}]{p.severity}[/] {escape(str(p))}", highlight=False, soft_wrap=True)
    if errors:
        _fail(f"{len(errors)} error(s), {len(warnings)} warning(s) in {table.num_rows} cities of {path}", code=1)
    console.print(f"[green]ok:[/] {table.num_rows} cities valid ({len(warnings)} warning(s)) in {path}")


def _load_catalog(settings: Settings, every_vintage: bool = False) -> tuple[Path, pa.Table]:
    """The catalog named by the shared options (the rows of ``settings.vintage``, unless ``every_vintage``), or a
    clean exit naming what is wrong with it."""
    try:
        path = settings.catalog_path()
        table = load_catalog(path)
        return path, table if every_vintage else select_vintage(table, settings.vintage)
    except CatalogError as exc:
        _fail(str(exc))


def _short(value: str | None) -> str:
    if value is None:
        return ""
    try:
        return os.path.relpath(value)
    except ValueError:
        return value


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


class _Bars:
    """Progress bars that appear only when the first one does: a run refused before any work prints its one error
    line and nothing else (a ``Progress`` that was started prints its empty frame on stop)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def counter(self, description: str) -> Callable[[int, int], None]:
        """``on_done(done, total)`` for an engine call: its bar is added when the first item is done."""
        task: list = []

        def on_done(done: int, total: int) -> None:
            if self.progress is None:
                self.progress = _progress()
                self.progress.start()
            if not task:
                task.append(self.progress.add_task(description, total=total))
            self.progress.update(task[0], completed=done, total=total)

        return on_done

    def adder(self, description: str) -> Callable[[int, int], None]:
        """``on_commit(n, total)``: like :meth:`counter`, for callers that report how many were added, not done."""
        count, done = self.counter(description), [0]

        def add(n: int, total: int) -> None:
            done[0] += n
            count(done[0], total)

        return add


def main() -> None:
    """Console-script entry point."""
    app()
