"""`embed`: encodings of the prepared tiles as GeoParquet, per tile, per patch or at given points.

The same function serves the CLI (`geolink-engine embed`) and the Ray job (`jobs/embed.py`):

1. checks, in the driver, before Ray starts: the model bundle (:meth:`ModelBundle.load`) and that it can give the
   asked mode (:meth:`ModelBundle.check_encodable`), the prepared grid's tile size against the model's, and the
   points file (its CRS);
2. the encodings: :func:`engine.pipelines.infer.run_inference` with :class:`~engine.mapping.embed.EncodeAndWrite`
   in the pass's own run folder ``runs/<run>/embeddings/<mode>_<level>/``: the ledger, commit point, orphan
   adoption and resume of `map`, so a pass killed anywhere and rerun gives each tile exactly once;
3. the product, ``products/<run>/embeddings/<mode>_<level>.parquet`` (``<mode>_points.parquet`` with ``--points``),
   written from the committed parts; then, when the run's products hold a STAC collection, the collection again
   (it lists every embeddings file).

``--points`` encodes only the tiles holding a point, at level ``patch`` (the same ledger as ``--level patch``, so
either reuses the other's tiles), and looks each point up in its tile's patch grid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.catalog import check_city_names
from engine.mapping.embed import (
    INDEX_COLUMNS,
    EncodeAndWrite,
    TileEncoder,
    match_points,
    read_points,
    write_embeddings,
    write_point_embeddings,
)
from engine.mapping.store import Ledger, RunManifest
from engine.model_bundle import BundleError, ModelBundle
from engine.pipelines.infer import InferenceConfig, InferenceResult, run_inference
from engine.product_layout import STAC_DIR, embeddings_file
from engine.schema import EMBEDDING_LEVELS
from engine.workspace import Workspace, check_name
from geolink_model.config import MODES

DEFAULT_MODEL = "default"
UNMATCHED_SHOWN = 5  # ids named in the one line about points outside every tile


@dataclass(frozen=True)
class EmbedConfig:
    """One embedding pass.

    Args:
        run: the run name: the pass lives in ``runs/<run>/embeddings/<mode>_<level>/`` and its product in
            ``products/<run>/embeddings/``; rerunning the same command resumes it.
        model_dir: the model bundle; default: the map run's own model (``runs/<run>/run.json``), else
            ``models/default``.
        mode: ``image``, ``osm`` or ``fused``; default: the mode the bundle was fine-tuned in. Refused before any
            work when the bundle never trained what the mode reads (:attr:`ModelBundle.encodable_modes`).
        level: ``tile`` (one vector per tile: the mean of its core patches' tokens) or ``patch`` (one per core patch).
        points: a points file (vector with a CRS, or CSV of lon/lat): the embedding at each point instead.
        inference: batch size, actors, GPUs (as for `map`).
        fail_tiles: fault drill: these tiles raise in the encoder.
    """

    run: str = "default"
    model_dir: str | None = None
    mode: str | None = None
    level: str = "tile"
    points: str | None = None
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    fail_tiles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name("run", self.run)
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.level not in EMBEDDING_LEVELS:
            raise ValueError(f"level {self.level!r}: use one of {', '.join(EMBEDDING_LEVELS)}")


@dataclass(frozen=True)
class EmbedReport:
    """One pass: the product file, its rows, tile counts, cities without prepared tiles, points outside every tile."""

    run: str
    mode: str
    level: str  # tile, patch or points
    model_version: str
    path: Path
    rows: int
    inference: InferenceResult
    failures: list[tuple[str, str, int, str]]  # (city, tile_id, attempts, error) of failed tiles
    unmatched: list[str] = field(default_factory=list)  # point ids outside every tile's core
    points_without_tile: list[str] = field(default_factory=list)  # point ids whose tile failed to encode
    stac: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def unmatched_line(self) -> str:
        """One line on the points outside every tile, or empty."""
        if not self.unmatched:
            return ""
        shown = ", ".join(self.unmatched[:UNMATCHED_SHOWN]) + (", ..." if len(self.unmatched) > UNMATCHED_SHOWN else "")
        return (f"{len(self.unmatched)} points lie outside every prepared tile (ids {shown}); their rows have matched = false "
                f"and no embedding in {self.path.name}")


def embedding_model(workspace: Workspace, run: str, model_dir: str | None) -> ModelBundle:
    """The bundle to encode with: ``model_dir``, else the map run's model, else ``models/default``.

    Raises:
        BundleError: a broken bundle (one line naming its file), or none to be found.
    """
    if model_dir:
        return ModelBundle.load(storage.local_path(model_dir))
    manifest = Workspace.fetch(workspace.run(run).manifest)
    if manifest.is_file():
        mapped = RunManifest.from_json(manifest.read_text()).model_dir
        if mapped and Path(mapped).is_dir():
            return ModelBundle.load(mapped)
    default = workspace.fetch(workspace.model(DEFAULT_MODEL))
    if (default / "config.json").is_file():
        return ModelBundle.load(default)
    raise BundleError(f"no model to encode with: run {run} has no model of its own and {default} holds none; pass --model DIR")


def prepared_grid(workspace: Workspace, cities: list[str], tile_size_px: int) -> tuple[dict[str, pa.Table], dict[str, str], int]:
    """Per prepared city its tile index (:data:`INDEX_COLUMNS`), the cities without prepared tiles (with why), and
    the grid's overlap. A city prepared at another tile size than the model's is an error (one line)."""
    index, missing, overlaps = {}, {}, set()
    for city in cities:
        parts = storage.list_files(workspace.tile_index(city), ".parquet")
        if not parts:
            missing[city] = f"no prepared tiles in {workspace.city_tiles(city)}"
            continue
        table = pa.concat_tables([pq.read_table(Workspace.fetch(p), columns=list(INDEX_COLUMNS)) for p in parts])
        sizes = set(table["tile_size_px"].to_pylist())
        if sizes != {tile_size_px}:
            raise ValueError(f"city {city} was prepared with {sorted(sizes)[0]} px tiles but the model takes {tile_size_px} px; "
                             f"run `geolink-engine prepare --tile-size {tile_size_px} --cities {city}` first")
        overlaps |= set(table["overlap_px"].to_pylist())
        index[city] = table.sort_by("tile_id")
    return index, missing, min(overlaps) if overlaps else 0


def run_embed(catalog: pa.Table, workspace: str | os.PathLike[str], cfg: EmbedConfig,
              on_stage: Callable[[str], None] | None = None, on_commit: Callable[[int, int], None] | None = None,
              address: str | None = None) -> EmbedReport:
    """Encode the prepared tiles of ``catalog``'s cities and write the product; see the module docstring.

    Raises (before Ray starts, one line each):
        BundleError: a broken bundle, or one that cannot give the asked mode.
        PointsError: a points file without a CRS, unreadable, or not of points.
        ValueError: no city with prepared tiles, or tiles of another size than the model's.
    """
    from engine.pipelines.runtime import init_ray

    ws = Workspace.at(workspace)
    say = on_stage or (lambda _msg: None)
    check_city_names(catalog)
    seconds: dict[str, float] = {}
    bundle = embedding_model(ws, cfg.run, cfg.model_dir)
    mode = cfg.mode or bundle.mode
    bundle.check_encodable(mode)
    cities = catalog["city"].to_pylist()
    index, missing, overlap = prepared_grid(ws, cities, bundle.tile_size_px)
    if not index:
        raise ValueError(f"none of the {len(cities)} cities has prepared tiles: run `geolink-engine prepare --tile-size "
                         f"{bundle.tile_size_px}` first ({next(iter(missing.values()))})")
    points = matches = None
    if cfg.points:
        points = read_points(storage.local_path(cfg.points))
        matches = match_points(points, index)
        say(f"points: {len(points) - len(matches.unmatched)} of {len(points)} lie in a prepared tile "
            f"({sum(len(t) for t in matches.tiles().values())} tiles to encode)")
    level = "patch" if points is not None else cfg.level
    folder = ws.embedding_run(cfg.run, mode, level)
    manifest = RunManifest(run=cfg.run, model_dir=str(bundle.path.resolve()), model_version=bundle.version, classes=bundle.classes, mode=mode,
                           tile_size_px=bundle.tile_size_px, overlap_px=overlap)
    kwargs = {"model_dir": manifest.model_dir, "mode": mode, "level": level, "device": "cuda" if cfg.inference.gpus else "cpu",
              "torch_threads": max(1, int(cfg.inference.cpus_per_actor)), "fail_tiles": tuple(cfg.fail_tiles)}
    init_ray(address)
    say(f"encode: model {bundle.version} ({mode}, level {level}) on {len(index)} cities into {folder.root}")
    t0 = time.perf_counter()
    result = run_inference(ws, manifest, sorted(index), TileEncoder, kwargs, cfg.inference, on_commit=on_commit, actor=EncodeAndWrite,
                           run_folder=folder, tiles=matches.tiles() if matches is not None else None)
    seconds["encode"] = time.perf_counter() - t0
    result = replace(result, missing={**missing, **result.missing})
    with Ledger(folder.root, read_only=True) as ledger:
        committed = {city: _of_version(ledger.committed(city), bundle.version) for city in sorted(index)}
        failures = [f for f in ledger.failures() if f[0] in index]
    t0 = time.perf_counter()
    products = ws.products(cfg.run)
    cfg_model = bundle.config
    if matches is not None:
        out = embeddings_file(products, mode, "points")
        inr = _inr(bundle) if mode == "image" else None
        city_crs = {city: table["crs"][0].as_py() for city, table in index.items() if table.num_rows}
        rows, no_tile = write_point_embeddings(out, points, matches, folder.root, committed, city_crs, bundle.version, mode,
                                               cfg_model.embed_dim, inr)
        unmatched = [points["point_id"].iloc[i] for i in matches.unmatched]
        without = [points["point_id"].iloc[i] for i in no_tile]
    else:
        out = embeddings_file(products, mode, level)
        written = write_embeddings(out, folder.root, committed, index, level, bundle.version, mode, cfg_model.embed_dim,
                                   cfg_model.patch_size, cfg_model.grid_size)
        rows, unmatched, without = written.rows, [], []
    Workspace.publish(out)
    stac = _restac(products)
    seconds["write"] = time.perf_counter() - t0
    return EmbedReport(run=cfg.run, mode=mode, level="points" if matches is not None else level, model_version=bundle.version, path=out,
                       rows=rows, inference=result, failures=failures, unmatched=unmatched, points_without_tile=without, stac=stac,
                       seconds=seconds)


def _of_version(committed: pa.Table, model_version: str) -> pa.Table:
    """Committed rows of this model version only (a ledger that an earlier model filled keeps its rows until redone)."""
    import pyarrow.compute as pc

    return committed.filter(pc.equal(committed["model_version"], model_version))


def _inr(bundle: ModelBundle):
    """The model's trained INR lookup (image tokens), or None (plain bilinear) when it has none."""
    if not getattr(bundle.config, "inr", False):
        return None
    return bundle.load_model().inr


def _restac(products: Path) -> Path | None:
    """Rewrite and validate the run's STAC collection when it has one (a mapped run), so it lists the embeddings.

    A remote run's products are mirrored first (the collection is rebuilt from the COG headers and validated against
    every file; on the node that ran `map` the mirror is already current)."""
    from engine.products.stac import COLLECTION_JSON, validate_stac, write_stac

    if not Workspace.fetch(products / STAC_DIR / COLLECTION_JSON).is_file():
        return None
    Workspace.fetch(products)
    path = write_stac(products)
    validate_stac(products)
    Workspace.publish(products / STAC_DIR)
    return path
