"""One city's building morphology from its stitched map: per UV polygon, and for the city's UVs, formal residential
land and all built-up land (the groups GeoLink-UV contrasts: UVs are low-rise and dense).

Zones, all in the city's UTM zone (metres) so areas and spacings are ground metres:

- ``uv``: the city's UV polygons (the product's ``urban_villages`` rows, in their order);
- ``built_up``: the built-up classes of ``class.tif`` (:func:`engine.schema.is_built_up`), traced to polygons; only
  when the run's classes know built-up land (``run.json`` ``built_up.known``);
- ``formal_residential``: the ``formal_residential`` class of ``class.tif`` when the model maps it (``landuse``),
  else the catalog's reference polygons of that class when the city has them (said in ``formal_source``), else none.

Buildings come from :func:`engine.buildings.city_buildings` (the catalog's ``buildings`` file, else OSM's
``building=*``). Unusable buildings (a broken file, no CRS, no overlap) never fail the city: its morphology is
empty and ``note`` names the file and what is wrong. The metrics are :mod:`engine.morphology`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.features import shapes

from engine.buildings import city_buildings
from engine.errors import describe_error
from engine.geo import utm_epsg_for
from engine.morphology import (
    BUILT_UP_GROUP,
    FORMAL_GROUP,
    MORPHOLOGY_SCHEMA,
    UV_GROUP,
    MorphologySummary,
    summarise,
    zone_stats,
)
from engine.pixels import read_reference
from engine.schema import is_built_up


@dataclass
class CityMorphology:
    """The city's per-UV metrics (rows aligned with its UV polygons), group summaries, and where buildings came from."""

    uv_metrics: pa.Table
    summaries: dict[str, MorphologySummary] = field(default_factory=dict)
    source: str = ""  # catalog | osm | "" (unusable: see note)
    buildings: int = 0
    note: str = ""
    formal_source: str = ""  # map | reference | ""


def empty_metrics(n: int) -> pa.Table:
    """``n`` rows of unknown morphology (NaN, 0 buildings): the columns stay, the values say "not measured"."""
    cols = {f.name: (pa.array(np.zeros(n, np.int32)) if f.name == "n_buildings" else pa.array(np.full(n, math.nan)))
            for f in MORPHOLOGY_SCHEMA}
    return pa.table(cols, schema=MORPHOLOGY_SCHEMA)


def city_morphology(row: dict, uv_wkb_4326: list[bytes], class_tif: Path, classes: tuple[str, ...],
                    built_up_known: bool) -> CityMorphology:
    """Morphology of one city (see the module docstring); never raises for bad buildings (``note`` says why)."""
    n_uv = len(uv_wkb_4326)
    try:
        read = city_buildings(row)
    except Exception as exc:  # noqa: BLE001 (bad buildings are this city's note, never its failure)
        return CityMorphology(empty_metrics(n_uv), note=describe_error(exc))
    with rasterio.open(class_tif) as src:
        centre = src.lnglat()
        utm = CRS.from_epsg(utm_epsg_for(*centre))
        to_utm = Transformer.from_crs(CRS.from_epsg(4326), utm, always_xy=True)
        footprints = _project(shapely.from_wkb(read.table["geometry"].to_numpy(zero_copy_only=False)), to_utm)
        height = read.table["height_m"].to_numpy(zero_copy_only=False).astype(float)
        levels = read.table["levels"].to_numpy(zero_copy_only=False).astype(float)
        uv_zones = _project(shapely.from_wkb(np.asarray(uv_wkb_4326, dtype=object)), to_utm) if n_uv else np.empty(0, object)
        raster_to_utm = Transformer.from_crs(src.crs, utm, always_xy=True)
        built_ids = [i for i, name in enumerate(classes) if is_built_up(name)] if built_up_known else []
        formal_on_map = "formal_residential" in classes
        band = src.read(1) if built_ids or formal_on_map else None  # the class map, read once and only when traced
        built_zones = _trace(np.isin(band, built_ids), src.transform, raster_to_utm) if built_ids else None
        formal, formal_source = None, ""
        if formal_on_map:
            formal = _trace(band == classes.index("formal_residential"), src.transform, raster_to_utm)
            formal_source = "map"
        elif row.get("reference"):
            formal = _reference_formal(row["reference"], utm)
            formal_source = "reference" if formal is not None else ""
    uv_stats = zone_stats(uv_zones, footprints, height, levels)
    summaries = summarise(uv_stats, UV_GROUP) if n_uv else {}
    for group, zones in ((BUILT_UP_GROUP, built_zones), (FORMAL_GROUP, formal)):
        if zones is not None and len(zones):
            summaries.update(summarise(zone_stats(zones, footprints, height, levels), group))
    return CityMorphology(uv_stats.table(), summaries, read.source, int(read.table.num_rows), formal_source=formal_source)


def _project(geoms: np.ndarray, transformer: Transformer) -> np.ndarray:
    return shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _trace(mask: np.ndarray, transform, to_utm: Transformer) -> np.ndarray:
    """The connected regions of ``mask`` as polygons in UTM (rasterio's ``shapes``: the same tracing as the UVs')."""
    if not mask.any():
        return np.empty(0, dtype=object)
    geoms = [shapely.geometry.shape(g) for g, _ in shapes(mask.astype(np.uint8), mask=mask, transform=transform)]
    return _project(np.asarray(geoms, dtype=object), to_utm)


def _reference_formal(reference: str, utm: CRS) -> np.ndarray | None:
    """The catalog reference's formal-residential polygons in UTM, or None when it has no CRS or no ``class`` column."""
    ref = read_reference(reference, utm.to_string())
    if "class" not in ref.columns or ref.crs is None:
        return None
    return np.asarray(ref[ref["class"] == "formal_residential"].geometry.values, dtype=object)
