"""The embedded default: N synthetic cities at real Chinese city locations, written with their catalog.

Cities come in the order of ``cities.csv`` (its first 12 rows are a mix of regions); past its end, cities repeat
with a numeric suffix and a shifted centre, so any N works (a 342-city national run included).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from importlib import resources
from pathlib import Path

from engine.catalog import write_catalog
from engine.synth.city import CitySpec, generate_city
from engine.synth.config import SynthConfig
from engine.synth.vintage import check_vintages, generate_city_vintages
from engine.workspace import Workspace

# split of the i-th city, cycling: half train, the rest val / test / map, so 12 cities give 6/2/2/2
SPLIT_CYCLE = ("train", "train", "val", "train", "test", "map", "train", "val", "train", "test", "map", "train")


def load_city_table() -> list[CitySpec]:
    """Real Chinese cities (slug, name, region, centre) shipped with the package."""
    with resources.files("engine.synth").joinpath("cities.csv").open(encoding="utf-8") as fh:
        return [CitySpec(r["city"], r["name"], r["region"], float(r["lat"]), float(r["lon"])) for r in csv.DictReader(fh)]


def demo_city_specs(n: int) -> list[CitySpec]:
    """The first ``n`` demo cities; beyond the table, repeats ``<slug>-2``, ``-3``... shifted 0.2 degrees east."""
    if n < 1:
        raise ValueError(f"--cities must be at least 1 (got {n})")
    table = load_city_table()
    specs = []
    for i in range(n):
        base = table[i % len(table)]
        round_ = i // len(table)
        if round_ == 0:
            specs.append(base)
        else:
            specs.append(CitySpec(f"{base.city}-{round_ + 1}", f"{base.name} {round_ + 1}", base.region, base.lat, base.lon + 0.2 * round_))
    return specs


def generate_cities(specs: list, cfg: SynthConfig, seed: int, out_dir: Path, workers: int | None = None,
                    on_city: Callable[[dict], None] | None = None, vintages: tuple[str, ...] | None = None) -> list[dict]:
    """Each spec's city generated under ``out_dir`` (in processes when ``workers`` > 1; rows in the specs' order,
    so the catalog is the same bytes whatever the worker count); ``on_city(row)`` after each city.

    With ``vintages``, each city at every vintage (:func:`engine.synth.vintage.generate_city_vintages`): one row
    per city and vintage, the city's vintages in order; ``on_city`` gets the city's first row, once a city."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    one = partial(_city_rows, cfg=cfg, seed=seed, out_dir=out_dir, vintages=vintages)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        mapped = map(one, specs) if workers == 1 else stack.enter_context(ProcessPoolExecutor(max_workers=workers)).map(one, specs)
        for city_rows in mapped:
            rows.extend(city_rows)
            if on_city:
                on_city(city_rows[0])
    return rows


def _city_rows(spec: CitySpec, cfg: SynthConfig, seed: int, out_dir: Path, vintages: tuple[str, ...] | None) -> list[dict]:
    """One city's catalog rows: its single date, or each of its vintages."""
    if vintages is None:
        return [generate_city(spec, cfg, seed, out_dir)]
    return generate_city_vintages(spec, cfg, seed, out_dir, vintages)


def write_demo(workspace: Workspace | str | Path, n_cities: int = 12, cfg: SynthConfig | None = None, seed: int = 0, workers: int | None = None,
               on_city: Callable[[dict], None] | None = None, vintages: tuple[str, ...] | None = None) -> Path:
    """Generate ``n_cities`` under ``workspace/cities/`` and write ``workspace/catalog.yaml``; return the catalog path.

    Cities are generated in a process pool (``workers``, default: all cores); reruns overwrite atomically and give
    the same bytes for the same arguments.

    ``vintages`` (two or more dates in chronological order, e.g. ``("2018", "2024")``): each city is drawn at every
    date on the same ground (``cities/<city>/<vintage>/``, plus ``change_truth.tif`` and ``change_blocks.parquet``
    in ``cities/<city>/``; docs/synth.md, "Vintages"); the catalog has one row per city and vintage, with the same
    ``city``, ``region``, ``split`` and ``aoi`` at every date. ``cfg.vintage`` sets the rates of change.

    Example:
        >>> import tempfile
        >>> p = write_demo(tempfile.mkdtemp(), n_cities=2, cfg=SynthConfig(size_km=0.3), workers=1)
        >>> p.name
        'catalog.yaml'
    """
    cfg = cfg or SynthConfig()
    vintages = check_vintages(vintages) if vintages is not None else None
    ws = Workspace.at(workspace)  # a remote workspace: written here, then uploaded
    workspace, out_dir = ws.root, ws.cities
    specs = demo_city_specs(n_cities)
    split = {spec.city: SPLIT_CYCLE[i % len(SPLIT_CYCLE)] for i, spec in enumerate(specs)}
    rows = generate_cities(specs, cfg, seed, out_dir, workers, on_city, vintages)
    for row in rows:
        row["split"] = split[row["city"]]
        for key in ("imagery", "osm", "buildings", "reference", "population", "co2"):  # relative to the catalog, so the workspace can move
            if row.get(key):
                row[key] = os.path.relpath(row[key], workspace)
    catalog = write_catalog(rows, ws.demo_catalog)
    ws.publish(out_dir)
    ws.publish(catalog)  # last: a catalog in the store means its cities are there
    return catalog
