"""Regression truth of a synthetic city: residents per building and a CO2 emission proxy, on 100 m cells.

Why a module of its own: the truth is derived *after* the city is drawn, from its layout (land use, buildings with
their true floors), the road classes its OSM gives, and its truth raster (where there is imagery). It draws from
generators of its own, seeded from ``(seed, crc32(slug), tag)``, never from the city's generator, so adding it
left every earlier output (imagery, truth, OSM, buildings, reference, meta) byte-identical.

The figures (sources in ``docs/synth.md``, "Population and CO2 truth"):

- residents = floor area (footprint x floors) x residents per m^2 of floor area by land use
  (:data:`RESIDENTS_PER_FLOOR_M2`), x a log-normal city factor, block (estate or village) factor and building
  factor, each with mean 1;
- CO2 (t/yr) per cell = traffic (road length by OSM highway class x :data:`ROAD_TRAFFIC`) + industry (industrial
  floor area and land) + residential energy (residential floor area) + services energy (commercial and
  institutional floor area), each with a log-normal city factor.

Cells: 100 m squares from the imagery's top-left corner (a partial last row or column where the extent is not a
multiple of 100 m); a cell is nodata where none of its area has imagery. A building counts where the imagery pixel
under its centroid is valid, and goes to the cell that holds its centroid, so the raster sums the table exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import shapely
from affine import Affine
from pyproj import CRS

from engine.atomic import atomic_path
from engine.schema import CLASS_ID, POPULATION_BUILDINGS_SCHEMA
from engine.synth.layout import CityLayout
from engine.synth.osm import ARTERIAL_HIGHWAYS, LOCAL_HIGHWAYS, OsmDraw

CELL_M = 100.0
NODATA = -9999.0
POPULATION_TAG = zlib.crc32(b"population")
CO2_TAG = zlib.crc32(b"co2")

# residents per m^2 of floor area (gross, footprint x floors): 1 / (floor area per resident)
RESIDENTS_PER_FLOOR_M2: dict[str, float] = {
    "urban_village": 1 / 11.0,  # 10-15 m^2 per person in rented village rooms (Shenzhen / Guangzhou UV surveys)
    "formal_residential": 1 / 42.0,  # 36.5 m^2 per urban resident (2020 census) with ~12% of flats vacant
}
POPULATION_SIGMA = {"city": 0.15, "block": 0.2, "building": 0.25}  # log-normal spreads, each factor with mean 1

# OSM highway class: (annual average daily traffic, veh/day; fleet-average emission factor, kg CO2 per veh-km)
ROAD_TRAFFIC: dict[str, tuple[float, float]] = {
    "motorway": (100_000.0, 0.30),  # urban expressway
    "trunk": (70_000.0, 0.30),
    "primary": (40_000.0, 0.25),  # 6-8 lane arterial
    "secondary": (20_000.0, 0.25),
    "tertiary": (8_000.0, 0.22),
    "unclassified": (2_000.0, 0.22),
    "residential": (1_000.0, 0.20),
    "service": (300.0, 0.20),
}
GRID_KG_PER_KWH = 0.581  # China's national grid average emission factor (MEE, 2022 notice), kg CO2 per kWh
RESIDENTIAL_KWH_PER_M2 = 35.0  # urban housing: electricity and household fuels per m^2 and year (district heating aside)
SERVICES_KWH_PER_M2 = 80.0  # commercial and public buildings per m^2 of floor area and year
INDUSTRY_KG_PER_FLOOR_M2 = 250.0  # manufacturing: ~300 kWh/m^2 of electricity x the grid factor + on-site fuels
INDUSTRY_KG_PER_LAND_M2 = 50.0  # industrial land: yards, boilers, kilns, on-site freight
CO2_SIGMA = {"traffic": 0.2, "industry": 0.25, "residential": 0.15, "services": 0.15, "road": 0.3, "building": 0.3}
CO2_COMPONENTS: tuple[str, ...] = ("traffic", "industry", "residential", "services")

RESIDENTIAL = ("urban_village", "formal_residential")
SERVICES = ("commercial", "institutional")
_NAME = {v: k for k, v in CLASS_ID.items()}


def truth_rng(seed: int, city: str, tag: int) -> np.random.Generator:
    """A generator for one kind of truth: depends on the run seed, the slug and ``tag`` only, and shares no draws
    with the city's own generator (:func:`engine.synth.city.city_rng`), so the city's other outputs do not move.

    Example:
        >>> a, b = truth_rng(0, "wuhan", POPULATION_TAG), truth_rng(0, "wuhan", CO2_TAG)
        >>> a.random() == truth_rng(0, "wuhan", POPULATION_TAG).random(), a.random() == b.random()
        (True, False)
    """
    return np.random.default_rng([int(seed), zlib.crc32(city.encode()), int(tag)])


@dataclass(frozen=True)
class CellGrid:
    """The 100 m truth cells over the imagery, in the imagery's frame: top-left corner ``(x0, y0)``, ``rows x cols``
    cells of ``cell_m``; ``valid`` marks the cells any of whose area has valid imagery."""

    x0: float
    y0: float
    cell_m: float
    valid: np.ndarray  # bool (rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape

    @property
    def transform(self) -> Affine:
        return Affine(self.cell_m, 0.0, self.x0, 0.0, -self.cell_m, self.y0)

    def cell_of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of the cells holding points ``(x, y)`` (clipped to the grid)."""
        rows, cols = self.shape
        r = np.clip(np.floor((self.y0 - y) / self.cell_m).astype(np.int64), 0, rows - 1)
        c = np.clip(np.floor((x - self.x0) / self.cell_m).astype(np.int64), 0, cols - 1)
        return r, c

    def boxes(self) -> np.ndarray:
        """Every cell as a polygon, row-major."""
        rows, cols = self.shape
        c, r = np.meshgrid(np.arange(cols), np.arange(rows))
        x, y = self.x0 + c.ravel() * self.cell_m, self.y0 - r.ravel() * self.cell_m
        return shapely.box(x, y - self.cell_m, x + self.cell_m, y)


def cell_grid(valid_px: np.ndarray, pixel_transform: Affine, cell_m: float = CELL_M) -> CellGrid:
    """The truth cells over a north-up pixel grid: ``ceil(extent / cell_m)`` cells a side, from its top-left corner.

    A cell is valid where any pixel overlapping it is valid. Pixel ``i`` spans ``[i px, (i+1) px)`` from the corner
    and overlaps cell ``k`` when ``floor(k cell / px) <= i < ceil((k+1) cell / px)``.

    Example (250 x 250 m of 1 m pixels, valid only in the first 120 rows): 3 x 3 cells, the last row and column
    50 m wide, the bottom row without imagery:
        >>> valid = np.zeros((250, 250), bool); valid[:120] = True
        >>> cell_grid(valid, Affine(1.0, 0, 500.0, 0, -1.0, 900.0)).valid.sum(axis=1).tolist()
        [3, 3, 0]
    """
    px = pixel_transform.a
    height, width = valid_px.shape
    rows, cols = int(np.ceil(height * px / cell_m - 1e-9)), int(np.ceil(width * px / cell_m - 1e-9))

    def spans(k: int, n: int) -> slice:
        return slice(int(np.floor(k * cell_m / px + 1e-9)), min(n, int(np.ceil((k + 1) * cell_m / px - 1e-9))))

    by_row = np.stack([valid_px[spans(k, height)].any(axis=0) for k in range(rows)])
    valid = np.stack([by_row[:, spans(k, width)].any(axis=1) for k in range(cols)], axis=1)
    return CellGrid(pixel_transform.c, pixel_transform.f, cell_m, valid)


def counted_buildings(xy: np.ndarray, valid_px: np.ndarray, pixel_transform: Affine) -> np.ndarray:
    """Mask of the buildings (centroids ``xy``, shape (n, 2)) standing on valid imagery: those the truth counts."""
    row = np.floor((xy[:, 1] - pixel_transform.f) / pixel_transform.e).astype(np.int64)
    col = np.floor((xy[:, 0] - pixel_transform.c) / pixel_transform.a).astype(np.int64)
    inside = (row >= 0) & (row < valid_px.shape[0]) & (col >= 0) & (col < valid_px.shape[1])
    out = np.zeros(len(xy), bool)
    out[inside] = valid_px[row[inside], col[inside]]
    return out


def building_population(layout: CityLayout, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Residents of every drawn building: floor area x :data:`RESIDENTS_PER_FLOOR_M2` of its land use x a city, a
    block and a building factor (log-normal, mean 1; :data:`POPULATION_SIGMA`); 0 for non-residential buildings.
    Returns the residents per drawn building and the city factor.

    Draws, in order: the city factor, one factor per block, one per building (whatever the land use, so the draws
    do not depend on the land-use mix).
    """
    b = layout.buildings
    city = _lognormal(rng, POPULATION_SIGMA["city"], 1)[0]
    block = _lognormal(rng, POPULATION_SIGMA["block"], len(layout.blocks))
    building = _lognormal(rng, POPULATION_SIGMA["building"], len(b.polygons))
    if not len(b.polygons):
        return np.zeros(0), float(city)
    owner = layout.block_class[b.block]
    rate = np.zeros(len(owner))
    for cls, per_m2 in RESIDENTS_PER_FLOOR_M2.items():
        rate[owner == CLASS_ID[cls]] = per_m2
    return floor_area_m2(layout) * rate * city * block[b.block] * building, float(city)


def floor_area_m2(layout: CityLayout) -> np.ndarray:
    """Gross floor area of every drawn building: footprint x true floors."""
    b = layout.buildings
    return shapely.area(b.polygons) * b.levels if len(b.polygons) else np.zeros(0)


def road_classes(layout: CityLayout, osm: OsmDraw, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Every road of the city inside its AOI (arterial and local parts) with its highway class.

    A road OSM maps keeps its OSM class (real traffic follows the class mappers give it); a road OSM misses gets one
    drawn from the same mix (:data:`engine.synth.osm.ARTERIAL_HIGHWAYS`, ``LOCAL_HIGHWAYS``). Parts are matched to
    OSM's by their exact geometry, which ``draw_osm`` cuts the same way.
    """
    mapped = {shapely.to_wkb(g): t["highway"] for g, k, t in zip(osm.geometry, osm.kind, osm.tags) if k == "line" and "highway" in t}
    lines: list = []
    classes: list[str] = []
    for family, (names, p) in ((layout.arterials, ARTERIAL_HIGHWAYS), (layout.local_streets, LOCAL_HIGHWAYS)):
        if not len(family):
            continue
        parts = shapely.get_parts(shapely.intersection(family, layout.aoi))
        parts = parts[~shapely.is_empty(parts) & (shapely.get_type_id(parts) == 1)]
        drawn = rng.choice(len(names), size=len(parts), p=np.asarray(p) / sum(p))
        for part, k in zip(parts, drawn):
            lines.append(part)
            classes.append(mapped.get(shapely.to_wkb(part), names[k]))
    return np.array(lines, dtype=object), classes


@dataclass(frozen=True)
class CityTruth:
    """A city's regression truth on its cell grid (local frame) and the per-building table's columns."""

    grid: CellGrid
    population: np.ndarray  # float64 (rows, cols), residents per cell; nodata cells hold NODATA
    co2: dict[str, np.ndarray]  # component -> float64 (rows, cols), t CO2/yr per cell; NODATA outside
    building_index: np.ndarray  # drawn-building index of each counted building
    building_population: np.ndarray
    building_floor_m2: np.ndarray
    building_class: list[str]
    building_xy: np.ndarray  # (n, 2) centroids, local frame
    factors: dict[str, float]  # the city factors drawn (written into the rasters' tags)

    @property
    def co2_total(self) -> np.ndarray:
        total = sum(np.where(self.grid.valid, self.co2[k], 0.0) for k in CO2_COMPONENTS)
        return np.where(self.grid.valid, total, NODATA)


def city_truth(layout: CityLayout, osm: OsmDraw, truth: np.ndarray, pixel_transform: Affine, seed: int, city: str) -> CityTruth:
    """The population and CO2 truth of a drawn city, in its local frame (pure: no file is read or written).

    Args:
        layout: the city's layout (local metres).
        osm: its drawn OSM (local metres), for the road classes.
        truth: its land-use raster (0 = no imagery) on ``pixel_transform``'s grid.
        seed, city: the run seed and the slug, which seed the truth's own generators.

    Returns:
        A :class:`CityTruth`; rasters are NODATA where a cell has no imagery.
    """
    valid_px = truth != CLASS_ID["nodata"]
    grid = cell_grid(valid_px, pixel_transform)
    pop_rng, co2_rng = truth_rng(seed, city, POPULATION_TAG), truth_rng(seed, city, CO2_TAG)
    b = layout.buildings
    xy = shapely.get_coordinates(shapely.centroid(b.polygons)) if len(b.polygons) else np.zeros((0, 2))
    counted = counted_buildings(xy, valid_px, pixel_transform)
    r, c = grid.cell_of(xy[:, 0], xy[:, 1])
    if not grid.valid[r[counted], c[counted]].all():  # a pixel under a centroid overlaps its cell; guard float edges
        valid = grid.valid.copy()
        valid[r[counted], c[counted]] = True
        grid = CellGrid(grid.x0, grid.y0, grid.cell_m, valid)
    people, pop_factor = building_population(layout, pop_rng)
    floor = floor_area_m2(layout)
    owner = np.array([_NAME[int(k)] for k in layout.block_class[b.block]]) if len(b.polygons) else np.zeros(0, str)

    def per_cell(values: np.ndarray, where: np.ndarray) -> np.ndarray:
        out = np.zeros(grid.shape)
        np.add.at(out, (r[where], c[where]), values[where])
        return out

    # CO2: city factors first, then per-road traffic and per-building intensity noise
    city_factor = dict(zip(CO2_COMPONENTS, (_lognormal(co2_rng, CO2_SIGMA[k], 1)[0] for k in CO2_COMPONENTS)))
    roads, classes = road_classes(layout, osm, co2_rng)
    traffic_noise = _lognormal(co2_rng, CO2_SIGMA["road"], len(roads))
    intensity_noise = _lognormal(co2_rng, CO2_SIGMA["building"], len(b.polygons))
    t_per_m = np.array([ROAD_TRAFFIC[k][0] * 365.0 * ROAD_TRAFFIC[k][1] / 1e6 for k in classes]) * traffic_noise  # t/m/yr
    traffic = _lines_per_cell(grid, roads, t_per_m) * city_factor["traffic"]
    energy = floor * intensity_noise / 1000.0  # thousands of m^2: x an intensity in kg/m^2 gives t
    industrial = counted & (owner == "industrial")
    industry = (per_cell(energy * INDUSTRY_KG_PER_FLOOR_M2, industrial)
                + _land_per_cell(grid, layout, "industrial") * INDUSTRY_KG_PER_LAND_M2 / 1000.0) * city_factor["industry"]
    residential = per_cell(energy * RESIDENTIAL_KWH_PER_M2 * GRID_KG_PER_KWH, counted & np.isin(owner, RESIDENTIAL)) * city_factor["residential"]
    services = per_cell(energy * SERVICES_KWH_PER_M2 * GRID_KG_PER_KWH, counted & np.isin(owner, SERVICES)) * city_factor["services"]
    co2 = {k: np.where(grid.valid, v, NODATA) for k, v in zip(CO2_COMPONENTS, (traffic, industry, residential, services))}

    population = np.where(grid.valid, per_cell(people, counted), NODATA)
    idx = np.flatnonzero(counted)
    factors = {"population_city_factor": pop_factor, **{f"co2_{k}_city_factor": float(v) for k, v in city_factor.items()}}
    return CityTruth(grid, population, co2, idx, people[idx], floor[idx], owner[idx].tolist(), xy[idx], factors)


def write_city_truth(city_dir: str | Path, truth: CityTruth, east: float, north: float, crs: CRS, kept: np.ndarray) -> dict[str, str]:
    """Write ``population.tif``, ``co2.tif`` (float32 GeoTIFFs, 100 m cells, the city's CRS) and
    ``population_buildings.parquet`` under ``city_dir``, atomically; return the rasters' paths by catalog column.

    ``east, north`` move the local frame into ``crs`` (as the imagery's transform does); ``kept`` is the mask of the
    drawn buildings the buildings file holds, whose ids (1.. in order) the table's ``building_id`` gives.
    """
    city_dir = Path(city_dir)
    transform = Affine.translation(east, north) @ truth.grid.transform
    paths = {"population": city_dir / "population.tif", "co2": city_dir / "co2.tif"}
    factors = {k: f"{v:.6f}" for k, v in truth.factors.items()}
    _write_float_raster(paths["population"], truth.population, transform, crs,
                        {"units": "residents per cell", "cell_m": f"{truth.grid.cell_m:g}",
                         **{k: v for k, v in factors.items() if k.startswith("population_")}})
    _write_float_raster(paths["co2"], truth.co2_total, transform, crs,
                        {"units": "t CO2 per year per cell", "cell_m": f"{truth.grid.cell_m:g}", "components": ",".join(CO2_COMPONENTS),
                         **{k: v for k, v in factors.items() if k.startswith("co2_")}})
    file_id = np.cumsum(kept)
    in_file = kept[truth.building_index]
    table = pa.table(
        {
            "building_id": pa.array(np.where(in_file, file_id[truth.building_index], 0), pa.int64(), mask=~in_file),
            "land_use": pa.array(truth.building_class, pa.string()),
            "floor_area_m2": pa.array(np.round(truth.building_floor_m2, 2), pa.float64()),
            "population": pa.array(truth.building_population, pa.float64()),
            "x": pa.array(truth.building_xy[:, 0] + east, pa.float64()),
            "y": pa.array(truth.building_xy[:, 1] + north, pa.float64()),
        },
        schema=POPULATION_BUILDINGS_SCHEMA,
    )
    with atomic_path(city_dir / "population_buildings.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return {k: str(p) for k, p in paths.items()}


def _write_float_raster(path: Path, data: np.ndarray, transform: Affine, crs: CRS, tags: dict[str, str]) -> None:
    """One-band float32 GeoTIFF (deflate, floating-point predictor), NODATA outside the imagery; atomic."""
    profile = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1, "dtype": "float32", "crs": crs,
               "transform": transform, "nodata": NODATA, "compress": "deflate", "predictor": 3}
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data.astype(np.float32)[None])
        dst.update_tags(**tags)


def _lognormal(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    """``n`` log-normal factors with mean 1 (median ``exp(-sigma^2 / 2)``)."""
    return np.exp(rng.normal(-sigma**2 / 2, sigma, n))


def _lines_per_cell(grid: CellGrid, lines: np.ndarray, per_m: np.ndarray) -> np.ndarray:
    """Sum over lines of (length inside each cell x the line's value per metre)."""
    out = np.zeros(grid.shape)
    if not len(lines):
        return out
    cells = grid.boxes()
    li, ci = shapely.STRtree(cells).query(lines, predicate="intersects")
    length = shapely.length(shapely.intersection(lines[li], cells[ci]))
    np.add.at(out.reshape(-1), ci, length * per_m[li])
    return out


def _land_per_cell(grid: CellGrid, layout: CityLayout, cls: str) -> np.ndarray:
    """Area (m^2) of the class's blocks inside the AOI within each cell."""
    out = np.zeros(grid.shape)
    blocks = layout.blocks[layout.block_class == CLASS_ID[cls]]
    if not len(blocks):
        return out
    blocks = shapely.intersection(blocks, layout.aoi)
    cells = grid.boxes()
    bi, ci = shapely.STRtree(cells).query(blocks, predicate="intersects")
    np.add.at(out.reshape(-1), ci, shapely.area(shapely.intersection(blocks[bi], cells[ci])))
    return out

