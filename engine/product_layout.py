"""The files of a run's products folder (``products/<run>/``): their names, and how the publishing steps read them back.

Why a module of its own: the STAC writer and the preview page read the same files (run manifest, city stats,
per-city COGs) and must agree on names and on how a failed city looks (a stats row, maybe no COGs).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from engine.atomic import atomic_path
from engine.workspace import check_name

RUN_JSON = "run.json"
UV_PARQUET = "urban_villages.parquet"
UV_GPKG = "urban_villages.gpkg"
CITY_STATS = "city_stats.csv"
MORPHOLOGY_CSV = "morphology.csv"  # building morphology per city, region and nation, for UVs, formal residential, built-up
MORPHOLOGY_PNG = "morphology.png"
REGIONS_CSV = "regions.csv"  # UV area and share per region and nationally: map values beside design-based estimates
REGIONS_PNG = "regions.png"
INDEX_HTML = "index.html"
MAP_HTML = "map.html"  # the interactive web map (engine.products.webmap); its files are under web/
WEB_DIR = "web"
OVERVIEW_PNG = "overview.png"
STAC_DIR = "stac"
CITIES_DIR = "cities"
ACCURACY_DIR = "accuracy"
PREVIEW_PNG = "preview.png"
COGS = {"uv_prob": "uv_prob.tif", "class": "class.tif"}  # every mapped city's
POPULATION_COG = "population_100m.tif"  # `map --population-model`: residents per 100 m cell
CHANGE_COG = "change.tif"  # `geolink-engine change`: change codes between two dates (engine.change.codes)
CITY_COGS = {**COGS, "population": POPULATION_COG, "change": CHANGE_COG}  # every COG a city may hold, by STAC asset key
CHANGE_STATS_CSV = "change_stats.csv"  # `change`: UV change per city, region and nation (engine.change.stats)
CHANGE_POLYGONS_PARQUET = "change_polygons.parquet"  # `change`: every UV polygon of both dates with its fate
CHANGE_POLYGONS_GPKG = "change_polygons.gpkg"
UV_POPULATION_PARQUET = "uv_population.parquet"  # `map --population-model`: residents per UV polygon
POPULATION_CSV = "population.csv"  # residents, UV residents and UV share per city, region and nation, with intervals
POPULATION_PNG = "population.png"  # residents and their UV share by region, with the intervals
EMBEDDINGS_DIR = "embeddings"  # `geolink-engine embed`: <mode>_<level>.parquet (level tile, patch or points)
PROB_SCALE = 250  # uv_prob.tif stores round(p * 250); 255 is nodata
PROB_NODATA = 255

STATS_INT = ("polygons", "tiles_ok", "tiles_failed", "buildings")
STATS_FLOAT = ("uv_area_m2", "built_up_area_m2", "uv_share")


def read_run(products_dir: str | os.PathLike[str]) -> dict:
    """The run manifest as a dict (extra keys such as ``start_datetime`` kept); error says how to make it."""
    path = Path(products_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"products {products_dir}: no {RUN_JSON}; run `geolink-engine stitch` for this run first")
    run = json.loads(path.read_text())
    missing = [k for k in ("run", "model_version") if not run.get(k)]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; it must be a RunManifest written by `map`")
    return run


def write_csv(path: Path, columns: tuple[str, ...] | list[str], rows: Iterable[dict]) -> Path:
    """A product table as CSV, atomically: ``columns`` in order; numbers as Python writes them (``repr``, so they
    read back exactly), NaN and missing values as empty cells (the dictionary's "not measured")."""
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(name)) for name in columns])
    return Path(path)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def read_city_stats(products_dir: str | os.PathLike[str]) -> list[dict]:
    """Rows of ``city_stats.csv`` with numbers parsed (empty or NaN cells become ``None``), sorted by city."""
    path = Path(products_dir) / CITY_STATS
    if not path.is_file():
        raise FileNotFoundError(f"products {products_dir}: no {CITY_STATS}; run `geolink-engine stitch` for this run first")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, row in enumerate(rows, start=1):
        if not row.get("city"):
            raise ValueError(f"{path} row {i}: empty city")
        parsed: dict = {}
        for key, value in row.items():
            value = (value or "").strip()
            try:
                if key in STATS_INT:
                    parsed[key] = int(float(value)) if value else None
                elif key in STATS_FLOAT:
                    number = float(value) if value else None
                    parsed[key] = None if number is None or math.isnan(number) else number
                else:
                    parsed[key] = value or None
            except ValueError:
                raise ValueError(f"{path} row {i} ({row['city']}): {key}={value!r} is not a number") from None
        out.append(parsed)
    return sorted(out, key=lambda r: r["city"])


def read_change_cities(products_dir: str | os.PathLike[str]) -> list[dict]:
    """The city rows of a change run's ``change_stats.csv`` (numbers parsed, empty cells None), sorted by city: what
    the STAC Items of a change run carry."""
    path = Path(products_dir) / CHANGE_STATS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"products {products_dir}: no {CHANGE_STATS_CSV}; run `geolink-engine change` first")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("level") == "city"]
    out = []
    for row in rows:
        parsed: dict = {}
        for key, value in row.items():
            if key == "level" or value in (None, ""):
                continue
            try:
                number = float(value)
                parsed[key] = int(number) if number.is_integer() and (key.startswith("polygons") or key == "cities") else number
                if isinstance(parsed[key], float) and math.isnan(parsed[key]):
                    del parsed[key]
            except ValueError:
                parsed[key] = value
        out.append(parsed)
    return sorted(out, key=lambda r: r["city"])


def city_folder(products_dir: str | os.PathLike[str], city: str) -> Path:
    """``products/<run>/cities/<city>`` after the slug check (no value can point outside the folder)."""
    return Path(products_dir) / CITIES_DIR / check_name("city", city)


def city_cogs(products_dir: str | os.PathLike[str], city: str) -> dict[str, Path]:
    """The COGs of a city that exist, by asset key (``uv_prob``, ``class``, ``population``); empty for a failed city."""
    folder = city_folder(products_dir, city)
    return {key: folder / name for key, name in CITY_COGS.items() if (folder / name).is_file()}


def embeddings_file(products_dir: str | os.PathLike[str], mode: str, level: str) -> Path:
    """``products/<run>/embeddings/<mode>_<level>.parquet`` (``level``: ``tile``, ``patch`` or ``points``)."""
    return Path(products_dir) / EMBEDDINGS_DIR / f"{mode}_{level}.parquet"


def embeddings_files(products_dir: str | os.PathLike[str]) -> list[Path]:
    """The embeddings products present, sorted by name (the STAC lists each)."""
    folder = Path(products_dir) / EMBEDDINGS_DIR
    return sorted(p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []


def product_cities(products_dir: str | os.PathLike[str], stats: list[dict]) -> list[str]:
    """Every city named in the stats or holding a folder under ``cities/``, sorted."""
    root = Path(products_dir) / CITIES_DIR
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()
    return sorted(folders | {r["city"] for r in stats})
