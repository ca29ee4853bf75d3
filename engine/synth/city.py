"""Generate one synthetic city into the catalog contract: imagery COG, OSM GeoParquet, reference, truth, meta.

Layout of a city directory::

    <out>/<city>/imagery.tif     RGB uint8 COG (UTM, 256 px tiles, deflate, overviews), nodata 0 outside the AOI
    <out>/<city>/truth.tif       uint8 land-use class per pixel (engine.schema.LANDUSE_CLASSES), same grid
    <out>/<city>/osm.parquet     OSM features (GeoParquet, EPSG:4326)
    <out>/<city>/buildings.parquet  building footprints with height_m and levels (GeoParquet, the city's UTM zone),
                                 shaped like a real building dataset: incomplete and slightly misregistered
    <out>/<city>/reference.parquet  land-use polygons with ``class`` (GeoParquet, EPSG:4326)
    <out>/<city>/meta.json       the parameters drawn and the realised statistics
    <out>/<city>/population.tif  float32 residents per 100 m cell (the city's CRS, from the imagery's corner)
    <out>/<city>/co2.tif         float32 t CO2/yr per 100 m cell, same grid (engine.synth.truth)
    <out>/<city>/population_buildings.parquet  residents per building (building_id of the buildings file)

A city drawn at several vintages (engine.synth.vintage) has these files in ``<out>/<city>/<vintage>/``, plus
``change_truth.tif`` and ``change_blocks.parquet`` in ``<out>/<city>/``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.io import MemoryFile

from engine.atomic import atomic_path
from engine.geo import WGS84, lonlat_to_crs, utm_epsg_for
from engine.geoparquet import write_geoparquet
from engine.schema import (
    BUILDINGS_SCHEMA,
    BUILT_UP_CLASSES,
    CITY_SLUG_RE,
    CLASS_ID,
    LANDUSE_CLASSES,
    OSM_FEATURES_SCHEMA,
    REFERENCE_SCHEMA,
)
from engine.synth.config import CityParams, SynthConfig, draw_city_params
from engine.synth.layout import CityLayout, build_layout
from engine.synth.osm import OsmDraw, draw_osm
from engine.synth.render import NODATA, Scene, render_scene
from engine.synth.truth import city_truth, write_city_truth


@dataclass(frozen=True)
class CitySpec:
    """Where a synthetic city stands: a real city's slug, display name, region stratum and centre."""

    city: str
    name: str
    region: str
    lat: float
    lon: float

    def __post_init__(self) -> None:
        if not CITY_SLUG_RE.match(self.city):
            raise ValueError(f"city slug {self.city!r} must match {CITY_SLUG_RE.pattern}")


def city_rng(seed: int, city: str) -> np.random.Generator:
    """The city's own generator: depends on the run seed and the slug only (stable across processes)."""
    return np.random.default_rng([int(seed), zlib.crc32(city.encode())])


def generate_city(spec: CitySpec, cfg: SynthConfig, seed: int, out_dir: str | Path) -> dict:
    """Generate ``spec`` under ``out_dir/<city>/`` and return its catalog row.

    Deterministic: the same ``(spec, cfg, seed)`` writes the same bytes.

    Example:
        >>> import tempfile
        >>> row = generate_city(CitySpec("wuhan", "Wuhan", "central", 30.59, 114.30), SynthConfig(size_km=0.3), 0,
        ...                     Path(tempfile.mkdtemp()) / "cities")
        >>> row["city"], Path(row["imagery"]).name
        ('wuhan', 'imagery.tif')
    """
    return write_city(Path(out_dir) / spec.city, spec, seed, draw_city(spec, cfg, seed))


@dataclass(frozen=True)
class Georef:
    """Where the local frame lands: the city's UTM zone and the local origin in it (a pixel corner of the grid)."""

    epsg: int
    east: float
    north: float

    @property
    def crs(self) -> CRS:
        return CRS.from_epsg(self.epsg)


def city_georef(spec: CitySpec, pixel_size_m: float) -> Georef:
    """The UTM zone of the city's centre and the centre snapped to a pixel corner of the UTM grid."""
    epsg = utm_epsg_for(spec.lon, spec.lat)
    east, north = lonlat_to_crs(epsg, spec.lon, spec.lat)
    east, north = round(east / pixel_size_m) * pixel_size_m, round(north / pixel_size_m) * pixel_size_m
    return Georef(epsg, east, north)


@dataclass(frozen=True)
class CityDraw:
    """One date of a city, drawn and not yet written: what :func:`write_city` writes.

    ``osm_serial`` numbers the OSM features (1.. at the first date); a feature keeps its number at later dates, as
    OSM ids persist, and the written ``osm_id`` is it plus the city's offset (``crc32(slug) << 24``).
    """

    params: CityParams
    layout: CityLayout
    scene: Scene
    osm: OsmDraw
    osm_serial: np.ndarray
    georef: Georef
    buildings: pa.Table
    buildings_kept: np.ndarray


def draw_city(spec: CitySpec, cfg: SynthConfig, seed: int) -> CityDraw:
    """Draw a city (its single date, or the first of its vintages) from its own generator, in the order the
    generator always has: parameters, layout, rendering, OSM, buildings file."""
    rng = city_rng(seed, spec.city)
    params = draw_city_params(cfg, rng, spec.region)
    layout = build_layout(params, cfg.size_km * 1000.0, rng)
    scene = render_scene(layout, params, rng)
    osm = draw_osm(layout, params, rng)
    georef = city_georef(spec, params.pixel_size_m)
    buildings, kept = buildings_file(layout, params, rng, georef.east, georef.north)
    return CityDraw(params, layout, scene, osm, np.arange(1, len(osm.geometry) + 1, dtype=np.int64), georef, buildings, kept)


def write_city(city_dir: str | Path, spec: CitySpec, seed: int, draw: CityDraw, meta_extra: dict | None = None) -> dict:
    """Write a drawn city (one date of it) into ``city_dir``: imagery, truth, OSM, buildings, reference, meta and
    the regression truth; return its catalog row (absolute paths). ``meta_extra`` adds keys to ``meta.json``."""
    city_dir = Path(city_dir)
    city_dir.mkdir(parents=True, exist_ok=True)
    layout, params, osm, scene, g = draw.layout, draw.params, draw.osm, draw.scene, draw.georef
    truth, local_transform = scene.truth, scene.transform
    transform = Affine.translation(g.east, g.north) @ local_transform
    crs = g.crs

    write_raster(city_dir / "imagery.tif", scene.rgb, transform, crs, nodata=NODATA, resampling="AVERAGE")
    write_raster(city_dir / "truth.tif", truth[None], transform, crs, nodata=CLASS_ID["nodata"], resampling="MODE")

    to_wgs84 = local_to_wgs84(crs, g.east, g.north)
    osm_table = pa.table(
        {
            "osm_id": pa.array(draw.osm_serial + (zlib.crc32(spec.city.encode()) << 24)),
            "kind": pa.array(osm.kind, pa.string()),
            "tags": pa.array([list(t.items()) for t in osm.tags], pa.map_(pa.string(), pa.string())),
            "geometry": pa.array(shapely.to_wkb(to_wgs84(osm.geometry)), pa.binary()),
        },
        schema=OSM_FEATURES_SCHEMA,
    )
    write_geoparquet(osm_table, city_dir / "osm.parquet", WGS84)
    write_geoparquet(draw.buildings, city_dir / "buildings.parquet", crs)

    reference = reference_polygons(layout)
    write_geoparquet(
        pa.table(
            {
                "class": pa.array(reference[1], pa.string()),
                "block_id": pa.array(reference[2], pa.int64()),
                "geometry": pa.array(shapely.to_wkb(to_wgs84(reference[0])), pa.binary()),
            },
            schema=REFERENCE_SCHEMA,
        ),
        city_dir / "reference.parquet",
        WGS84,
    )
    aoi_wgs84 = to_wgs84(np.array([layout.aoi], dtype=object))[0]
    meta = {
        "city": spec.city,
        "name": spec.name,
        "region": spec.region,
        "seed": int(seed),
        "epsg": g.epsg,
        "centre_lonlat": [spec.lon, spec.lat],
        "size_px": list(truth.shape),
        "params": params.to_json(),
        "stats": {**_stats(layout, truth, osm.kind, osm.tags, params), "buildings_truth": _building_stats(layout, draw.buildings_kept)},
        **(meta_extra or {}),
    }
    with atomic_path(city_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, sort_keys=True))
    # regression truth last, from its own generators: the outputs above do not depend on it
    truth_paths = write_city_truth(city_dir, city_truth(layout, osm, truth, local_transform, seed, spec.city), g.east, g.north, crs,
                                   draw.buildings_kept)
    return {
        "city": spec.city,
        "region": spec.region,
        "imagery": str(city_dir / "imagery.tif"),
        "osm": str(city_dir / "osm.parquet"),
        "buildings": str(city_dir / "buildings.parquet"),
        "aoi": shapely.to_wkt(aoi_wgs84, rounding_precision=7),
        "reference": str(city_dir / "reference.parquet"),
        **truth_paths,
    }


def write_raster(path: Path, data: np.ndarray, transform: Affine, crs: CRS, nodata: int, resampling: str) -> None:
    """Write a Cloud-Optimised GeoTIFF (GDAL's COG driver: 256 px tiles, deflate, internal overviews), atomically.

    ``resampling`` builds the overviews: ``AVERAGE`` for imagery, ``MODE`` for class rasters.
    """
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name,
                   crs=crs, transform=transform, nodata=nodata)
    if data.shape[0] == 3:
        profile["photometric"] = "RGB"
    with MemoryFile() as mem, atomic_path(path) as tmp:
        with mem.open(**profile) as dst:
            dst.write(data)
        with mem.open() as src:
            rasterio.shutil.copy(src, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="2", BLOCKSIZE="256", LEVEL="6",
                                 OVERVIEW_RESAMPLING=resampling, NUM_THREADS="1")


def local_to_wgs84(crs: CRS, east: float, north: float):
    """A function projecting arrays of local-frame geometries (origin ``east, north`` in ``crs``) to EPSG:4326."""
    transformer = Transformer.from_crs(crs, WGS84, always_xy=True)

    def project(geoms: np.ndarray) -> np.ndarray:
        def fn(xy: np.ndarray) -> np.ndarray:
            lon, lat = transformer.transform(xy[:, 0] + east, xy[:, 1] + north)
            return np.column_stack([lon, lat])

        return shapely.transform(geoms, fn)

    return project


def buildings_file(layout: CityLayout, params: CityParams, rng: np.random.Generator, east: float, north: float) -> tuple[pa.Table, np.ndarray]:
    """The city's building dataset as a real one looks: ``params.buildings_completeness`` of the drawn footprints,
    each moved by up to ``params.buildings_jitter_m`` and turned by up to 2 degrees, ``height_m`` to 0.1 m with
    about 0.5 m of measurement noise, ``levels`` known for 90%; in UTM coordinates. Returns the table and the mask of
    the drawn buildings it holds."""
    b = layout.buildings
    n = len(b.polygons)
    kept = rng.random(n) < params.buildings_completeness
    shift = rng.uniform(0.0, params.buildings_jitter_m, n)
    direction = rng.uniform(0.0, 2 * np.pi, n)
    turn = np.radians(np.clip(rng.normal(0.0, 0.7, n), -2.0, 2.0))
    height = np.round(np.maximum(b.height_m + rng.normal(0.0, 0.5, n), 2.0), 1)
    levels_known = rng.random(n) < 0.9
    idx = np.flatnonzero(kept)
    polys = b.polygons[idx]
    if len(idx):
        counts = shapely.get_num_coordinates(shapely.get_exterior_ring(polys))
        owner = np.repeat(np.arange(len(idx)), counts)
        xy = shapely.get_coordinates(shapely.get_exterior_ring(polys))
        centre = shapely.get_coordinates(shapely.centroid(polys))[owner]
        c, s = np.cos(turn[idx])[owner], np.sin(turn[idx])[owner]
        dx, dy = xy[:, 0] - centre[:, 0], xy[:, 1] - centre[:, 1]
        moved = np.column_stack([
            centre[:, 0] + dx * c - dy * s + (shift * np.cos(direction))[idx][owner] + east,
            centre[:, 1] + dx * s + dy * c + (shift * np.sin(direction))[idx][owner] + north,
        ])
        polys = shapely.polygons(shapely.linearrings(moved, indices=owner))
    levels = np.where(levels_known[idx], b.levels[idx], np.nan)
    table = pa.table(
        {
            "building_id": pa.array(np.arange(1, len(idx) + 1, dtype=np.int64)),
            "height_m": pa.array(height[idx], pa.float64()),
            "levels": pa.array(levels, pa.float64(), from_pandas=True),
            "geometry": pa.array(shapely.to_wkb(polys) if len(idx) else [], pa.binary()),
        },
        schema=BUILDINGS_SCHEMA,
    )
    return table, kept


def _building_stats(layout: CityLayout, kept: np.ndarray) -> dict:
    """The buildings' truth per land use (count, mean floors, mean footprint, coverage of the class's blocks) and the
    buildings file's realised completeness: what morphology estimates are checked against."""
    b = layout.buildings
    owner = layout.block_class[b.block] if len(b.polygons) else np.zeros(0, np.int64)
    areas = shapely.area(b.polygons) if len(b.polygons) else np.zeros(0)
    block_area = shapely.area(layout.blocks)
    by_class = {}
    for cls in BUILT_UP_CLASSES + ("vacant",):
        sel = owner == CLASS_ID[cls]
        land = float(block_area[layout.block_class == CLASS_ID[cls]].sum())
        if not sel.any():
            continue
        by_class[cls] = {
            "count": int(sel.sum()),
            "mean_levels": round(float(b.levels[sel].mean()), 3),
            "mean_height_m": round(float(b.height_m[sel].mean()), 2),
            "mean_footprint_m2": round(float(areas[sel].mean()), 2),
            "coverage": round(float(areas[sel].sum() / land), 4) if land else 0.0,
            "per_ha": round(float(sel.sum() / land * 1e4), 2) if land else 0.0,
        }
    return {"by_class": by_class, "drawn": int(len(b.polygons)), "in_file": int(kept.sum()),
            "file_completeness": round(float(kept.mean()), 4) if len(kept) else 0.0}


def reference_polygons(layout: CityLayout) -> tuple[np.ndarray, list[str], list[int]]:
    """Land-use polygons inside the AOI: every block (``block_id`` = its index in the layout), plus the river (-1);
    returns ``(polygons, classes, block ids)``."""
    names = {v: k for k, v in CLASS_ID.items()}
    clipped = shapely.intersection(layout.blocks, layout.aoi)
    keep = ~shapely.is_empty(clipped) & (shapely.area(clipped) > 0)
    geoms = list(clipped[keep])
    classes = [names[int(c)] for c in layout.block_class[keep]]
    ids = np.flatnonzero(keep).tolist()
    if layout.river is not None:
        river = layout.river.intersection(layout.aoi)
        if not river.is_empty:
            geoms.append(river)
            classes.append("water")
            ids.append(-1)
    polys = shapely.make_valid(np.array(geoms, dtype=object))
    return polys, classes, ids


def _stats(layout: CityLayout, truth: np.ndarray, kinds: list[str], tags: list[dict[str, str]], params: CityParams) -> dict:
    counts = np.bincount(truth.ravel(), minlength=len(LANDUSE_CLASSES))
    valid = counts[1:].sum()
    built_ids = [CLASS_ID[c] for c in BUILT_UP_CLASSES]
    built_px = counts[built_ids].sum()
    uv_px = counts[CLASS_ID["urban_village"]]
    n_buildings = int(len(layout.buildings.polygons))
    n_osm_buildings = sum(1 for t in tags if "building" in t)
    return {
        "class_fraction_px": {LANDUSE_CLASSES[i]: round(float(counts[i] / valid), 5) for i in range(1, len(LANDUSE_CLASSES)) if valid},
        "uv_share_of_built_up_px": round(float(uv_px / built_px), 5) if built_px else 0.0,
        "uv_share_of_built_up_area": round(layout.uv_share_of_built_up(), 5),
        "uv_share_target": round(params.uv_share_target, 5),
        "blocks": int(len(layout.blocks)),
        "buildings": n_buildings,
        "osm_features": {k: kinds.count(k) for k in ("point", "line", "polygon")},
        "osm_building_share": round(n_osm_buildings / n_buildings, 4) if n_buildings else 0.0,
    }
