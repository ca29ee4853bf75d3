"""The held-out error of a tile-level regression bundle, and the intervals it gives to summed totals.

Why: `map --population-model` sums tile predictions into city, urban-village (UV) and region totals. A total
without an interval reads as exact; the honest interval is the one the model earned on cities it never trained
on. :func:`heldout_calibration` predicts every tile of each val city with the bundle, exactly as the train loop
validates, and records per city the true and predicted totals (``calibration.json`` beside the weights,
:func:`write_calibration`, written by ``run_training`` before the bundle is published). :func:`prediction_factors`
and :func:`share_factors` turn those city totals into multiplicative prediction intervals; :func:`interval`
applies them.

Why city ratios, not tile errors: tile errors within a city are correlated (one city's imagery, one city's
density), so adding tile variances would give intervals far too narrow. The unit of independent evidence is the
held-out city, so the interval is a t prediction interval on the log ratio truth / prediction over those cities.

What a city's totals sum (the estimator `map` must use for the interval to apply): prepared windows overlap (the
halo), so window quantities do not add up to a city. Each tile contributes its *core* (the pixels it owns; cores
partition the city): the truth is the truth raster inside the core (area-weighted, as
:mod:`engine.training.targets`), the prediction is the tile's window prediction times :func:`core_share` (the
core's share of the window's pixels). Tiles whose window has no target are left out, as training leaves them out.

torch, rasterio and scipy are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine import storage
from engine.atomic import atomic_path
from engine.model_bundle import BundleError, ModelBundle, model_version, read_json_object
from engine.pixels import IGNORE, tensor_column
from engine.schema import LABEL_SETS
from engine.training.samples import add_pixels, load_part, part_pairs
from engine.training.targets import area_weighted_sum, tile_targets
from engine.workspace import Workspace

CALIBRATION = "calibration.json"
VERSION = 1
METHOD = "held-out city ratios"
UNITS = {"population": "residents", "co2": "t CO2 per year"}
UV_CLASSES = LABEL_SETS["binary"]  # the label set whose class 1 is urban_village (reference classes mapped by label_lookup)


def core_share(row: dict) -> float:
    """The share of a tile's window pixels that its core owns: a window prediction times this is the tile's
    contribution to a total (cores partition a city; windows overlap by the halo). Assumes the quantity is spread
    evenly over the window; the held-out ratios include the error of that assumption.

    Example:
        >>> core_share({"core_width": 96, "core_height": 96, "window_width": 128, "window_height": 128})
        0.5625
    """
    window = int(row["window_width"]) * int(row["window_height"])
    return int(row["core_width"]) * int(row["core_height"]) / window if window > 0 else 0.0


def core_bounds(row: dict) -> tuple[float, float, float, float]:
    """A tile's core footprint ``(minx, miny, maxx, maxy)`` in its imagery CRS, from the tile index's window bounds
    and pixel offsets (x and y pixel sizes apart: a geographic CRS's pixels need not be square in degrees)."""
    px = (float(row["maxx"]) - float(row["minx"])) / int(row["window_width"])
    py = (float(row["maxy"]) - float(row["miny"])) / int(row["window_height"])
    c0 = int(row["core_col_off"]) - int(row["window_col_off"])
    r0 = int(row["core_row_off"]) - int(row["window_row_off"])
    maxy = float(row["maxy"]) - r0 * py
    minx = float(row["minx"]) + c0 * px
    return minx, maxy - int(row["core_height"]) * py, minx + int(row["core_width"]) * px, maxy


def heldout_calibration(bundle_dir: str | os.PathLike[str], workspace: Workspace | str | os.PathLike[str], cities: list[str],
                        rasters: dict[str, str], references: dict[str, str | None], regions: dict[str, str | None],
                        uv_min_fraction: float = 0.0, batch_size: int = 16, *, name: str | None = None) -> dict[str, Any]:
    """The held-out record of a regression bundle: per val city, its tiles' true and predicted totals.

    Runs in the calling process on CPU (no Ray: a few val cities are minutes at most, and the driver already
    holds what it needs). Tiles come from the prepared parts as training reads them (:func:`part_pairs`,
    :func:`load_part`, :func:`add_pixels`); each is predicted as the train loop validates (the bundle's mode,
    normalisation and location input, head ``regress``, then ``from_model_scale`` with the bundle's
    ``log_target``/``target_scale``).

    Args:
        bundle_dir: the bundle (possibly still its temporary folder; see ``name``).
        workspace: where the cities' prepared tiles are.
        cities: the held-out (val) cities.
        rasters: city -> truth raster of the bundle's target (the catalog's ``population`` or ``co2``).
        references: city -> reference polygons (None: the city's ``uv_*`` are null).
        regions: city -> region, recorded per city.
        uv_min_fraction: a tile counts to a city's UV totals, weighted by the share of its window's valid pixels
            (not nodata) that is urban_village in the reference, when that share is above this (default 0: every
            tile with any village; why weighted: villages are often smaller than a tile, and a threshold of one
            half left whole demo cities with no UV tile at 224 px).
        batch_size: tiles per forward pass.
        name: the bundle's final folder name, for ``model_version`` when ``bundle_dir`` is a temporary folder
            (the version is ``<name>-<weights digest>``, as :attr:`ModelBundle.version` will read once published).

    Returns:
        ``{"version": 1, "target", "units", "method": "held-out city ratios", "uv_min_fraction", "model_version",
        "cities": [{"city", "region", "tiles", "truth", "pred", "uv_tiles", "uv_truth", "uv_pred"}, ...]}``.

    Raises:
        BundleError: the bundle is not a regression bundle.
    """
    from engine.mapping.regress import TileRegressor

    bundle = ModelBundle.load(bundle_dir)
    target = bundle.train.get("target")
    if target in (None, "segmentation") or not bundle.config.regression_targets:
        raise BundleError(f"model bundle {bundle.path}: not a regression model (train_config.json target {target!r}); "
                          "held-out calibration is for `finetune --task population|co2` bundles")
    predictor = TileRegressor(str(bundle.path), bundle.mode, device="cpu")  # what `map --population-model` predicts
    version = model_version(bundle.path)
    if name:
        version = f"{name}-{version.rsplit('-', 1)[-1]}"
    ws = Workspace.at(workspace)
    rows_out = []
    for city in cities:
        reference = references.get(city)
        tiles = _city_tiles(ws, city, rasters[city])
        totals = {"tiles": 0, "truth": 0.0, "pred": 0.0, "uv_tiles": 0, "uv_truth": 0.0, "uv_pred": 0.0}
        for start in range(0, tiles.num_rows, batch_size):
            batch = add_pixels(tiles.slice(start, batch_size), {city: reference} if reference else None, UV_CLASSES)
            pred = predictor.predict(batch).reshape(-1).astype(np.float64)
            share = np.asarray(batch["core_share"].to_pylist(), np.float64)
            truth = np.asarray(batch["core_truth"].to_pylist(), np.float64)
            tile_pred = pred * share
            totals["tiles"] += batch.num_rows
            totals["truth"] += float(truth.sum())
            totals["pred"] += float(tile_pred.sum())
            if "label" in batch.column_names:  # each tile weighted by its UV share (villages are often smaller than a tile)
                weight = _uv_fraction(tensor_column(batch, "label"))
                weight = np.where(weight >= uv_min_fraction, weight, 0.0)
                totals["uv_tiles"] += int((weight > 0).sum())
                totals["uv_truth"] += float((truth * weight).sum())
                totals["uv_pred"] += float((tile_pred * weight).sum())
        if not reference:
            totals.update(uv_tiles=None, uv_truth=None, uv_pred=None)
        rows_out.append({"city": city, "region": regions.get(city), **totals})
    return {"version": VERSION, "target": target, "units": UNITS.get(target, target), "method": METHOD,
            "uv_min_fraction": float(uv_min_fraction), "model_version": version, "cities": rows_out}


def _city_tiles(ws: Workspace, city: str, raster: str) -> pa.Table:
    """A city's prepared tiles (index + graph columns) with a target, plus ``core_truth`` (the truth raster inside
    the core) and ``core_share``; tiles whose window has no target (:func:`tile_targets` None) are left out, as
    training leaves them out."""
    import rasterio

    tables = [load_part(pair) for pair in part_pairs(ws, [city])]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    keys = ("minx", "miny", "maxx", "maxy", "crs", "window_col_off", "window_row_off", "window_width", "window_height",
            "core_col_off", "core_row_off", "core_width", "core_height")
    rows = table.select(list(keys)).to_pylist()
    with storage.raster_env():
        window_truth = tile_targets(rows, raster)
        with rasterio.open(raster) as src:
            core_truth = [area_weighted_sum(src, core_bounds(r), r["crs"]) if t is not None else None
                          for r, t in zip(rows, window_truth)]
    keep = [t is not None for t in window_truth]
    table = table.append_column("core_truth", pa.array([c or 0.0 for c in core_truth], pa.float64()))
    table = table.append_column("core_share", pa.array([core_share(r) for r in rows], pa.float64()))
    return table.filter(pa.array(keep))


def _uv_fraction(labels: np.ndarray) -> np.ndarray:
    """Per tile, the share of its valid (not ``IGNORE``) pixels labelled urban_village (class 1); 0 when none is valid."""
    valid = (labels != IGNORE).reshape(len(labels), -1).sum(axis=1)
    uv = (labels == 1).reshape(len(labels), -1).sum(axis=1)
    return np.where(valid > 0, uv / np.maximum(valid, 1), 0.0)


def write_calibration(bundle_dir: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write ``doc`` as ``<bundle_dir>/calibration.json`` (temp + rename: a reader never sees half a file)."""
    path = Path(bundle_dir) / CALIBRATION
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_calibration(bundle_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The bundle's ``calibration.json``; None when it has none (a segmentation bundle, no val cities, or older).

    Raises:
        BundleError: the file exists but is not a JSON object.
    """
    return read_json_object(Path(bundle_dir) / CALIBRATION)


def _log_ratios(doc: dict[str, Any], kind: str) -> dict[str, float]:
    """City -> ``log(truth / pred)`` for ``kind`` ``all`` or ``uv``; cities with a non-positive (or null) total are
    left out, and for ``uv`` those with no UV tile."""
    if kind not in ("all", "uv"):
        raise ValueError(f"kind {kind!r}: use 'all' or 'uv'")
    t_key, p_key = ("truth", "pred") if kind == "all" else ("uv_truth", "uv_pred")
    out = {}
    for row in doc.get("cities") or []:
        if kind == "uv" and not row.get("uv_tiles"):
            continue
        truth, pred = row.get(t_key), row.get(p_key)
        if isinstance(truth, int | float) and isinstance(pred, int | float) and truth > 0 and pred > 0:
            out[row["city"]] = math.log(truth / pred)
    return out


def _factors(values: list[float], n_cities: int, level: float) -> tuple[float, float, int] | None:
    """``exp(mean ± t_{(1+level)/2, m-1} · sd · sqrt(1/n_cities + 1/m))`` of ``values``; None when m < 2."""
    from scipy.stats import t

    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level}: must be in (0, 1)")
    if n_cities < 1:
        raise ValueError(f"n_cities {n_cities}: must be >= 1")
    m = len(values)
    if m < 2:
        return None
    x = np.asarray(values, np.float64)
    half = float(t.ppf((1.0 + level) / 2.0, m - 1)) * float(x.std(ddof=1)) * math.sqrt(1.0 / n_cities + 1.0 / m)
    centre = float(x.mean())
    return math.exp(centre - half), math.exp(centre + half), m


def prediction_factors(doc: dict[str, Any], kind: str = "all", n_cities: int = 1,
                       level: float = 0.95) -> tuple[float, float, int] | None:
    """``(lo, hi, m)``: the true total of ``n_cities`` new cities lies in ``[lo, hi] × predicted total`` with
    probability ``level``, judged from the ``m`` held-out cities of ``doc`` (:func:`heldout_calibration`).

    Method: r_c = log(truth_c / pred_c) per held-out city (``kind="uv"``: the UV totals, cities without UV tiles
    left out; either kind: non-positive totals left out); with mean r̄ and sample sd s over m cities,
    ``exp(r̄ ± t_{(1+level)/2, m-1} · s · sqrt(1/n_cities + 1/m))``: a t prediction interval for a new city's log
    ratio (exact for lognormal ratios and n_cities=1), which also corrects the model's mean bias (r̄). For
    n_cities > 1 the sum's log ratio is taken as the mean of the cities' (cities of similar size); a sum dominated
    by one city is nearer n_cities=1, so pass a smaller n_cities when in doubt.

    Returns None when m < 2: no interval is honest with fewer than two held-out cities (callers report NaN and
    say why).

    Example:
        >>> doc = {"cities": [{"city": c, "truth": t, "pred": 100.0} for c, t in zip("abcd", (90.0, 110.0, 100.0, 105.0))]}
        >>> lo, hi, m = prediction_factors(doc)
        >>> m, round(lo, 3), round(hi, 3)
        (4, 0.744, 1.371)
        >>> prediction_factors({"cities": doc["cities"][:1]}) is None
        True
    """
    return _factors(list(_log_ratios(doc, kind).values()), n_cities, level)


def share_factors(doc: dict[str, Any], n_cities: int = 1, level: float = 0.95) -> tuple[float, float, int] | None:
    """``(lo, hi, m)`` for the UV share (UV total / city total): the true share lies in ``[lo, hi] × predicted
    share``. The same t interval as :func:`prediction_factors` on d_c = r_uv,c − r_all,c over the held-out cities
    that have both (a model that overestimates UV and city alike gets the share right, and this says so). The
    interval's upper end may pass a share of 1: callers clip. None when m < 2."""
    r_all, r_uv = _log_ratios(doc, "all"), _log_ratios(doc, "uv")
    return _factors([r_uv[c] - r_all[c] for c in r_uv if c in r_all], n_cities, level)


def calibration_factor(doc: dict[str, Any] | None) -> float:
    """The model's mean held-out bias as a factor: ``exp(r̄)`` over the held-out cities' ``log(truth / pred)`` (1.0
    without any). `map --population-model` multiplies every tile value by it, so its products are the bias-corrected
    estimate that :func:`prediction_factors`' intervals (which already contain ``exp(r̄)``) are centred on.

    Example:
        >>> calibration_factor({"cities": [{"city": "a", "truth": 200.0, "pred": 100.0}, {"city": "b", "truth": 50.0, "pred": 100.0}]})
        1.0
        >>> calibration_factor(None)
        1.0
    """
    values = list(_log_ratios(doc, "all").values()) if doc else []
    return math.exp(float(np.mean(values))) if values else 1.0


def interval(estimate: float, factors: tuple[float, float, int] | tuple[float, float] | None) -> tuple[float, float]:
    """``(estimate × lo, estimate × hi)``; ``(nan, nan)`` when ``factors`` is None (too few held-out cities) or the
    estimate is not finite.

    Example:
        >>> interval(1000.0, (0.8, 1.25, 5)), interval(1000.0, None)
        ((800.0, 1250.0), (nan, nan))
    """
    if factors is None or estimate is None or not math.isfinite(estimate):
        return math.nan, math.nan
    return float(estimate) * factors[0], float(estimate) * factors[1]
