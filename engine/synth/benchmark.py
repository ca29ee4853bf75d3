"""A held-out benchmark of synthetic cities: many test cities in every region, fixed splits, a region-held-out split.

The 12-city demo scores a claim on 2 test cities; seed spread then swamps most gains. The benchmark draws
``per_region`` cities from each of the 7 region strata of ``cities.csv`` (the first ones of each region, in table
order) and assigns two fixed splits, both written to ``catalog.yaml``:

- ``split`` (the catalog's own column): in every region, cities cycle through :data:`CITY_SPLIT_CYCLE` in table
  order (half test, then train, val), so each region has test cities and the test split spans all regions;
- ``region_split`` (an extra catalog column; :func:`load_region_split` reads it, :func:`~engine.catalog.load_catalog`
  ignores it): whole regions are held out. Cities of :data:`HELD_OUT_REGIONS` are ``test``; in the other regions
  the ``val`` cities of ``split`` stay ``val`` and the rest are ``train``. A model trained on it has never seen a
  city of the test regions: what transfers to a new region (and whether knowing the location helps there).

Deterministic: the same arguments write the same bytes. ``geolink-engine demo-data --benchmark`` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import yaml

from engine.catalog import write_catalog
from engine.synth.city import CitySpec
from engine.synth.config import REGION_PROFILES, SynthConfig
from engine.synth.demo import generate_cities, load_city_table
from engine.workspace import Workspace

REGIONS: tuple[str, ...] = tuple(REGION_PROFILES)  # south, central, southwest, east, north, northwest, northeast
# split of the i-th city of a region (table order), cycling: with 10 per region, 5 test, 4 train, 1 val
CITY_SPLIT_CYCLE: tuple[str, ...] = ("test", "train", "test", "train", "test", "val", "test", "train", "test", "train")
# whole regions held out in `region_split`: one of high UV prevalence, one average, one low (REGION_PROFILES)
HELD_OUT_REGIONS: tuple[str, ...] = ("central", "southwest", "northeast")
BENCHMARK_SIZE_KM = 0.8
BENCHMARK_PIXEL_M = (1.0, 1.0)  # fixed: tiles per city and the cost per tile are then known


def benchmark_config(size_km: float = BENCHMARK_SIZE_KM) -> SynthConfig:
    """The generator settings of the benchmark: small cities (many of them) at a fixed 1 m pixel."""
    return SynthConfig(size_km=size_km, pixel_size_m=BENCHMARK_PIXEL_M)


def benchmark_specs(per_region: int = 10) -> list[tuple[CitySpec, str, str]]:
    """``(spec, split, region_split)`` of each benchmark city: the first ``per_region`` cities of each region."""
    if per_region < 2:
        raise ValueError(f"per_region={per_region}: need at least 2 (a test and a train city per region)")
    table = load_city_table()
    out = []
    for region in REGIONS:
        cities = [c for c in table if c.region == region][:per_region]
        if len(cities) < per_region:
            raise ValueError(f"region {region!r} has only {len(cities)} cities in cities.csv (asked for {per_region})")
        for i, spec in enumerate(cities):
            split = CITY_SPLIT_CYCLE[i % len(CITY_SPLIT_CYCLE)]
            region_split = "test" if region in HELD_OUT_REGIONS else ("val" if split == "val" else "train")
            out.append((spec, split, region_split))
    return out


def write_benchmark(workspace: Workspace | str | Path, per_region: int = 10, cfg: SynthConfig | None = None, seed: int = 0,
                    workers: int | None = None, on_city: Callable[[dict], None] | None = None) -> Path:
    """Generate the benchmark cities under ``workspace/cities/`` and write ``workspace/catalog.yaml``; return its path.

    ``per_region`` cities in each of the 7 regions (default 70 cities: 35 test, 28 train, 7 val; ``region_split``
    holds out 30 cities of 3 regions). ``cfg`` defaults to :func:`benchmark_config` (0.8 km cities at 1 m).

    Example:
        >>> import tempfile
        >>> p = write_benchmark(tempfile.mkdtemp(), per_region=2, cfg=benchmark_config(0.3), workers=1)
        >>> sorted(set(load_region_split(p).values()))
        ['test', 'train']
    """
    cfg = cfg or benchmark_config()
    ws = Workspace.at(workspace)
    workspace, out_dir = ws.root, ws.cities
    chosen = benchmark_specs(per_region)
    specs = [s for s, _, _ in chosen]
    rows = generate_cities(specs, cfg, seed, out_dir, workers, on_city)
    for row, (_, split, region_split) in zip(rows, chosen):
        row["split"] = split
        for key in ("imagery", "osm", "buildings", "reference", "population", "co2"):
            if row.get(key):
                row[key] = os.path.relpath(row[key], workspace)
    catalog = write_catalog(rows, ws.demo_catalog)
    # the extra column: write_catalog keeps only the contract's columns, so add region_split to each row after it
    doc = yaml.safe_load(catalog.read_text())
    for entry, (_, _, region_split) in zip(doc["cities"], chosen):
        entry["region_split"] = region_split
    catalog.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000))
    ws.publish(out_dir)
    ws.publish(catalog)
    return catalog


def load_region_split(catalog: str | Path) -> dict[str, str]:
    """``{city: region_split}`` of a benchmark catalog (cities without the column are left out)."""
    doc = yaml.safe_load(Path(catalog).read_text())
    return {c["city"]: c["region_split"] for c in doc.get("cities", []) if c.get("region_split")}
