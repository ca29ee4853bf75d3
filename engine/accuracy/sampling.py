"""The sample design of an accuracy assessment: strata from the class maps, their sizes, allocation, random points.

Strata are ``unit x map stratum``: the unit is the region (default) or the city, the map stratum is
``urban_village`` or ``other`` (a multi-class run is collapsed to these two), plus optionally ``buffer``: pixels
mapped as other within ``buffer_m`` of a mapped UV pixel, where the UV the map missed (omission) concentrates, so
a few dozen points there shrink the producer's accuracy CI far more than the same points spread over all of other.

Why points and not pixels: a stratum spans cities of different pixel sizes (0.5-1.2 m), so the sampling unit is a
point drawn uniformly over the stratum's *area*: the stratum's n is split over its cities by a multinomial on their
areas, each city's points fall on pixels chosen uniformly (with replacement) among its stratum pixels, and each
point gets a uniform offset inside its pixel. The points are i.i.d. uniform on the stratum's area, so stratum sizes
are areas (m2) and no finite population correction applies (the population of points is infinite).

Any CRS: the sample is drawn in the class map's own grid (UTM, Web Mercator, EPSG:4326 degrees...), while areas are
ground areas in an equal-area CRS (EPSG:6933), pixel by pixel row: where a pixel's ground area changes across the
map (degrees of longitude shrink with latitude; Mercator stretches), each strip's stratum area is the sum of its
rows' areas, and a stratum's points are spread over strips in proportion to those areas, so they stay uniform on
the ground (within a strip rows differ by less than 1e-4 of their area). Distances for the buffer are ground metres
at the map's centre.

Why two passes over each class map, strip by strip: memory stays at one strip (plus a halo of ``buffer_m`` for the
distance transform) whatever the city's size. The first pass counts stratum pixels per strip; the draw picks ranks
among a stratum's pixels (in raster order, so the points do not depend on the strip height); the second pass reads
only the strips holding a drawn rank and finds its pixel.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window
from scipy import ndimage

from engine.accuracy.design import allocate, sample_size_overall
from engine.imagery import ground_gsd_m
from engine.db import connect
from engine.schema import BUILT_UP_LABEL, is_built_up

UV_CLASS = "urban_village"
OTHER_CLASS = "other"
BUILT_UP = BUILT_UP_LABEL  # reference land class: built-up land that is not an urban village
BUFFER = "buffer"
ASSESS_CLASSES = (OTHER_CLASS, UV_CLASS)  # the two classes every estimate is made for, in report order
LAND_CLASSES = (OTHER_CLASS, UV_CLASS, BUILT_UP)  # a point's reference land class (ref_land): built-up land splits
MAP_STRATA = (OTHER_CLASS, UV_CLASS, BUFFER)  # stratum codes 0, 1, 2 of the stratum strips
CODE_NODATA = 255
RARE_STRATA = (UV_CLASS, BUFFER)
STRATA_BY = ("region", "city")
EQUAL_AREA_CRS = "EPSG:6933"  # the products measure areas here (engine.stitch.merge), so the assessment does too


@dataclass(frozen=True)
class SampleConfig:
    """How the sample is designed and drawn.

    Args:
        strata: the unit of the strata, ``region`` (default) or ``city`` (crossed with the map strata).
        buffer_m: width of the buffer stratum (``other`` within this distance of mapped UV); 0 = no buffer stratum.
        users_accuracy: anticipated user's accuracy per map class, for Cochran's sample size.
        target_se: wanted standard error of overall accuracy, for Cochran's sample size.
        min_rare: minimum points per rare stratum (``urban_village``, ``buffer``); added on top of Cochran's n, so
            the area-proportional rest still meets ``target_se``.
        min_common: minimum points per ``other`` stratum (>= 2, so its variance is estimable). Default 100, the
            upper end of Olofsson et al.'s (2014) 50-100 per stratum: the ``other`` strata hold the rare, heavily
            weighted omission errors, and with fewer points a region's omission is mostly unsampled or rests on one
            point (bench/accuracy_coverage.py: with 10, the default until issue 18, the national producer's
            accuracy interval covered 97.0%, at the edge of 93-97%, and two regions' 89.6%; with 100, 94.2% and
            one region's 88.9%, the others 96.8-98.2%).
        n_total: fix the total instead (still at least the sum of the minimums).
        seed: seed of the random draw (numpy ``default_rng``): the same seed and class maps give the same points.
        block_rows: class-map rows per strip (memory: about 20 bytes per pixel of a strip plus its halo).

    Example:
        >>> SampleConfig(buffer_m=30.0, seed=1).strata
        'region'
    """

    strata: str = "region"
    buffer_m: float = 0.0
    users_accuracy: Mapping[str, float] = field(default_factory=lambda: {UV_CLASS: 0.7, OTHER_CLASS: 0.95})
    target_se: float = 0.01
    min_rare: int = 50
    min_common: int = 100
    n_total: int | None = None
    seed: int = 0
    block_rows: int = 256

    def __post_init__(self) -> None:
        if self.strata not in STRATA_BY:
            raise ValueError(f"strata={self.strata!r}: use one of {STRATA_BY}")
        if not (math.isfinite(self.buffer_m) and self.buffer_m >= 0):
            raise ValueError(f"buffer_m={self.buffer_m}: must be >= 0 (0 = no buffer stratum)")
        missing = [c for c in ASSESS_CLASSES if c not in self.users_accuracy]
        if missing or set(self.users_accuracy) - set(ASSESS_CLASSES):
            raise ValueError(f"users_accuracy={dict(self.users_accuracy)}: give exactly the classes {ASSESS_CLASSES}")
        if not all(0 <= float(v) <= 1 for v in self.users_accuracy.values()):
            raise ValueError(f"users_accuracy={dict(self.users_accuracy)}: values must lie in [0, 1]")
        if not (math.isfinite(self.target_se) and self.target_se > 0):
            raise ValueError(f"target_se={self.target_se}: must be > 0")
        if self.min_rare < 2 or self.min_common < 2:
            raise ValueError(f"min_rare={self.min_rare}, min_common={self.min_common}: need at least 2 each "
                             f"(a stratum with one point has no estimable variance)")
        if self.n_total is not None and self.n_total < 1:
            raise ValueError(f"n_total={self.n_total}: must be >= 1 (or None for Cochran's size)")
        if self.block_rows < 1:
            raise ValueError(f"block_rows={self.block_rows}: need at least 1")


# ---------------------------------------------------------------------------------------------------------------
# one city's class map -> stratum strips


@dataclass(frozen=True)
class CityGrid:
    """A city's class map: where it is, its grid, which index is UV and the ground area of one pixel."""

    city: str
    region: str
    path: Path
    width_px: int
    height_px: int
    transform: Affine
    crs: CRS
    n_classes: int
    uv_index: int
    nodata: int
    pixel_area_m2: float  # in EPSG:6933, at the map's centre
    ground_res_m: tuple[float, float] = (0.0, 0.0)  # pixel height and width on the ground at the centre (metres)
    row_area_m2: np.ndarray | None = field(default=None, repr=False, compare=False)  # area of one pixel of each row; None: all equal
    built_up_indices: tuple[int, ...] = ()  # map classes other than UV that are built-up land (none: a binary map)
    classes: tuple[str, ...] = ()  # the map's classes (index = pixel value)
    strata_are_classes: bool = False  # every class is its own map stratum, code = pixel value (e.g. a change map)

    @property
    def res_m(self) -> tuple[float, float]:
        """Pixel height and width in ground metres at the map's centre (any CRS: degrees and Mercator included)."""
        return self.ground_res_m

    @property
    def stratum_names(self) -> tuple[str, ...]:
        """The map stratum of each stratum code: :data:`MAP_STRATA` (other, UV, buffer), or the map's own classes
        where ``strata_are_classes``."""
        return self.classes if self.strata_are_classes else MAP_STRATA

    @property
    def map_index(self) -> np.ndarray:
        """The map class (row of the census) of each stratum code: UV 1, other and buffer 0; or the code itself
        where ``strata_are_classes``."""
        return np.arange(len(self.classes)) if self.strata_are_classes else np.array([0, 1, 0])


def open_city_grid(path: str | os.PathLike[str], city: str, region: str, classes: tuple[str, ...],
                   strata_are_classes: bool = False) -> CityGrid:
    """Open and check a city's ``class.tif`` (one uint8 band, north-up, any CRS).

    Args:
        strata_are_classes: every class of ``classes`` is its own map stratum (stratum code = pixel value, no buffer,
            no UV class needed): e.g. a change map (``other``, ``persistent_uv``, ``demolished_uv``, ``new_uv``).
            Default: the strata of :func:`stratum_codes` (other, UV, buffer).

    Raises:
        ValueError: naming the city and file: not a single uint8 band, rotated, no CRS, or a ``classes`` tag that
            disagrees with the run's classes.
    """
    path = Path(path)
    classes = tuple(classes)
    if UV_CLASS not in classes and not strata_are_classes:
        raise ValueError(f"the run's classes {list(classes)} have no {UV_CLASS!r}; nothing to assess")
    with rasterio.open(path) as src:
        where = f"city {city}: {path}"
        if src.count != 1 or src.dtypes[0] != "uint8":
            raise ValueError(f"{where}: expected one uint8 band of class indices, found {src.count} band(s) of {src.dtypes[0]}")
        if src.transform.b != 0 or src.transform.d != 0 or src.transform.e >= 0:
            raise ValueError(f"{where}: the grid is rotated or south-up; the class map must be north-up")
        crs = CRS.from_user_input(src.crs) if src.crs else None
        if crs is None:
            raise ValueError(f"{where}: the class map has no CRS; stitch the run again")
        tag = src.tags(1).get("classes")
        if tag is not None and tuple(json.loads(tag)) != tuple(classes):
            raise ValueError(f"{where}: its classes tag {json.loads(tag)} differs from the run's {list(classes)}; "
                             f"stitch the run again")
        nodata = 255 if src.nodata is None else int(src.nodata)
        grid = CityGrid(city, region, path, src.width, src.height, src.transform, crs, len(classes),
                        classes.index(UV_CLASS) if UV_CLASS in classes else -1, nodata, 0.0,
                        built_up_indices=() if strata_are_classes else
                        tuple(i for i, c in enumerate(classes) if c != UV_CLASS and is_built_up(c)),
                        classes=classes, strata_are_classes=strata_are_classes)
    rows = _row_areas_m2(grid)
    centre = float(rows[grid.height_px // 2])
    uniform = float(np.ptp(rows)) <= ROW_AREA_TOLERANCE * centre  # a projected grid: one area for every pixel
    return replace(grid, pixel_area_m2=centre, ground_res_m=_ground_res_m(grid), row_area_m2=None if uniform else rows)


ROW_AREA_TOLERANCE = 1e-6  # pixel areas closer than this (relative) are one area: projected grids keep the old sums
GRID_METRES_TOLERANCE = 0.01  # a metre grid within 1% of the ground (UTM, Gauss-Kruger) measures buffers in its own metres


def _ground_res_m(grid: CityGrid) -> tuple[float, float]:
    """Pixel height and width in metres for the buffer's distances: the grid's own metres where they are ground
    metres within 1% (UTM, national transverse Mercator grids, so buffers stay exact in pixels there), else the
    centre pixel's sides measured on the ellipsoid (degrees; Web Mercator, whose metres stretch by 1/cos(lat))."""
    gx, gy = ground_gsd_m(grid.transform, grid.crs, grid.width_px, grid.height_px)
    if grid.crs.is_projected and grid.crs.axis_info[0].unit_name in ("metre", "meter"):
        own = abs(grid.transform.e), abs(grid.transform.a)
        if abs(gy / own[0] - 1) < GRID_METRES_TOLERANCE and abs(gx / own[1] - 1) < GRID_METRES_TOLERANCE:
            return own
    return gy, gx


def _row_areas_m2(grid: CityGrid) -> np.ndarray:
    """Ground area in the equal-area CRS of one pixel of each row, at the centre column (the quadrilateral of its
    projected corners). In a north-up geographic or Mercator grid a pixel's area depends on its row only."""
    col = grid.width_px // 2
    rows = np.arange(grid.height_px, dtype=float)
    to_area = Transformer.from_crs(grid.crs, CRS.from_user_input(EQUAL_AREA_CRS), always_xy=True)
    xs, ys = [], []
    for dc, dr in ((0, 0), (1, 0), (1, 1), (0, 1)):
        x, y = grid.transform @ (np.full_like(rows, col + dc), rows + dr)
        x, y = to_area.transform(x, y)
        xs.append(np.asarray(x, float))
        ys.append(np.asarray(y, float))
    x = np.stack(xs) - xs[0]  # local origin per row: absolute coordinates (~1e7 m) would cancel
    y = np.stack(ys) - ys[0]
    return 0.5 * np.abs((x * np.roll(y, -1, axis=0)).sum(axis=0) - (np.roll(x, -1, axis=0) * y).sum(axis=0))


def stratum_codes(classes_px: np.ndarray, grid: CityGrid, buffer_m: float) -> np.ndarray:
    """Stratum code per pixel: 0 other, 1 UV, 2 buffer (other within ``buffer_m`` of UV), 255 nodata; where
    ``grid.strata_are_classes``, the class index itself (no buffer).

    Distances are Euclidean between pixel centres (``scipy.ndimage.distance_transform_edt`` with the pixel size in
    metres); a pixel at exactly ``buffer_m`` is in the buffer.

    Raises:
        ValueError: a pixel holds a class index the run does not have.
    """
    valid = classes_px != grid.nodata
    bad = valid & (classes_px >= grid.n_classes)
    if bad.any():
        raise ValueError(f"city {grid.city}: {grid.path} holds class index {int(classes_px[bad][0])}, but the run has "
                         f"{grid.n_classes} classes")
    if getattr(grid, "strata_are_classes", False):
        return np.where(valid, classes_px, np.uint8(CODE_NODATA)).astype(np.uint8)
    uv = valid & (classes_px == grid.uv_index)
    codes = np.where(valid, uv.astype(np.uint8), np.uint8(CODE_NODATA))
    if buffer_m > 0 and uv.any() and not uv.all():
        dist = ndimage.distance_transform_edt(~uv, sampling=grid.res_m)
        codes[valid & ~uv & (dist <= buffer_m)] = 2
    return codes


def strip_rows(grid: CityGrid, block_rows: int) -> list[tuple[int, int]]:
    """``(y0, y1)`` of every strip, top to bottom."""
    return [(y0, min(y0 + block_rows, grid.height_px)) for y0 in range(0, grid.height_px, block_rows)]


def strata_strips(grid: CityGrid, buffer_m: float, block_rows: int,
                  only: set[int] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(strip index, y0, codes)`` per strip (``only``: just those strips), codes of rows ``[y0, y1)``.

    Each strip is read with a halo of ``ceil(buffer_m / pixel)`` rows above and below, so every UV pixel within
    ``buffer_m`` of the strip's pixels is seen and the buffer is exact (the same as on the whole raster).
    """
    for i, y0, codes, _ in _strips(grid, buffer_m, block_rows, only):
        yield i, y0, codes


def _strips(grid: CityGrid, buffer_m: float, block_rows: int,
            only: set[int] | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """:func:`strata_strips` with each strip's class indices as well."""
    halo = math.ceil(buffer_m / min(grid.res_m)) + 1 if buffer_m > 0 else 0
    with rasterio.open(grid.path) as src:
        for i, (y0, y1) in enumerate(strip_rows(grid, block_rows)):
            if only is not None and i not in only:
                continue
            e0, e1 = max(0, y0 - halo), min(grid.height_px, y1 + halo)
            block = src.read(1, window=Window(0, e0, grid.width_px, e1 - e0))
            yield i, y0, stratum_codes(block, grid, buffer_m)[y0 - e0:y1 - e0], block[y0 - e0:y1 - e0]


TruthStrip = Callable[[int, int], np.ndarray]  # (y0, y1) -> land code of those rows' pixels (index in LAND_CLASSES)


@dataclass(frozen=True)
class CityStrata:
    """First pass over a city: stratum pixels per strip, the pixels mapped as built-up land, and the census
    confusion when the truth is given.

    ``census[i, j]``: pixels with map class i (index in :data:`ASSESS_CLASSES`) and true land class j (index in
    :data:`LAND_CLASSES`: other, urban village, other built-up land).
    """

    grid: CityGrid
    buffer_m: float
    block_rows: int
    strip_counts: np.ndarray  # (strips, codes) int64: pixels of each stratum code per strip (codes: grid.stratum_names)
    census: np.ndarray | None
    strip_areas: np.ndarray | None = None  # (strips, codes) float: their ground area (m2); None: pixels x pixel_area_m2
    census_m2: np.ndarray | None = None  # the census as ground areas (m2)
    built_up_m2: np.ndarray | None = None  # (codes,): area per stratum code mapped as built-up; None: the map has no built-up class

    @property
    def pixels(self) -> np.ndarray:
        """Pixels per stratum code (other, UV, buffer; or ``grid.stratum_names``)."""
        return self.strip_counts.sum(axis=0)

    @property
    def areas_m2(self) -> np.ndarray:
        """Ground area (m2) per stratum code (other, UV, buffer)."""
        if self.strip_areas is None:
            return self.pixels * self.grid.pixel_area_m2
        return self.strip_areas.sum(axis=0)

    @property
    def census_area_m2(self) -> np.ndarray | None:
        """``census`` in m2 (row by row where pixel areas differ)."""
        if self.census is None:
            return None
        return self.census_m2 if self.census_m2 is not None else self.census * self.grid.pixel_area_m2


def scan_city(grid: CityGrid, buffer_m: float, block_rows: int, truth: TruthStrip | None = None,
              truth_classes: int = len(LAND_CLASSES)) -> CityStrata:
    """Count each stratum's pixels per strip (and the census confusion against ``truth``) in one pass.

    ``truth`` gives codes below ``truth_classes`` (default: the :data:`LAND_CLASSES`); the census rows are the map
    classes of ``grid.map_index`` (other, UV; or each class where ``grid.strata_are_classes``).

    Example::

        scan_city(open_city_grid("products/run/cities/wuhan/class.tif", "wuhan", "central", classes), 30.0, 256)
    """
    counts, areas = [], []
    k = int(truth_classes)
    m = len(grid.stratum_names)  # stratum codes
    map_of = np.zeros(256, np.int64)
    map_of[:m] = grid.map_index
    rows_c = int(grid.map_index.max()) + 1  # census rows: map classes
    census = np.zeros((rows_c, k), np.int64) if truth is not None else None
    census_m2 = np.zeros((rows_c, k)) if truth is not None and grid.row_area_m2 is not None else None
    built_up = np.zeros(m) if grid.built_up_indices else None  # built-up pixels (or m2) mapped in each stratum code
    for _, y0, codes, classes in _strips(grid, buffer_m, block_rows):
        counts.append(np.bincount(codes.ravel(), minlength=256)[:m])
        row_area = grid.row_area_m2[y0:y0 + codes.shape[0]] if grid.row_area_m2 is not None else None
        if row_area is not None:  # per row: pixels of each code x that row's pixel area
            per_row = np.stack([(codes == c).sum(axis=1) for c in range(m)], axis=1)
            areas.append(row_area @ per_row)
        if built_up is not None:
            mapped = (codes != CODE_NODATA) & (np.isin(classes, grid.built_up_indices) | (codes == 1))
            weights = None if row_area is None else np.broadcast_to(row_area[:, None], codes.shape)[mapped]
            built_up += np.bincount(codes[mapped], weights=weights, minlength=m)[:m]
        if truth is not None:
            ref = truth(y0, y0 + codes.shape[0])
            valid = codes != CODE_NODATA
            cell = map_of[codes] * k + ref
            census += np.bincount(cell[valid], minlength=rows_c * k).reshape(rows_c, k)
            if census_m2 is not None:
                weights = np.broadcast_to(row_area[:, None], codes.shape)[valid]
                census_m2 += np.bincount(cell[valid], weights=weights, minlength=rows_c * k).reshape(rows_c, k)
    strip_areas = np.array(areas, float).reshape(-1, m) if grid.row_area_m2 is not None else None
    if built_up is not None and grid.row_area_m2 is None:
        built_up = built_up * grid.pixel_area_m2
    return CityStrata(grid, buffer_m, block_rows, np.array(counts, np.int64).reshape(-1, m), census, strip_areas, census_m2,
                      built_up)


# ---------------------------------------------------------------------------------------------------------------
# strata sizes and allocation (DuckDB does the bookkeeping)

CELLS_SCHEMA = pa.schema([("city", pa.string()), ("region", pa.string()), ("map_stratum", pa.string()),
                          ("pixels", pa.int64()), ("area_m2", pa.float64()), ("built_up_m2", pa.float64())])

STRATA_SQL = """
SELECT CASE WHEN $by = 'city' THEN city ELSE region END AS unit,
       map_stratum,
       (CASE WHEN $by = 'city' THEN city ELSE region END) || ':' || map_stratum AS stratum,
       SUM(pixels)::BIGINT AS pixels,
       SUM(area_m2) AS area_m2,
       COUNT(*)::INTEGER AS cities
FROM cells
WHERE pixels > 0
GROUP BY ALL
ORDER BY unit, map_stratum
"""


@dataclass(frozen=True)
class SampleDesign:
    """Strata, their sizes and sample sizes.

    ``cells``: one row per city and map stratum with pixels > 0 (``city, region, map_stratum, stratum, pixels,
    area_m2, built_up_m2``), in city then code order: the pieces a stratum's points are split over
    (``built_up_m2``: the part mapped as built-up land, NaN where the map has no built-up class). ``strata``: one row per
    stratum (``stratum, unit, map_stratum, map_class, pixels, area_m2, cities, n``).
    """

    config: SampleConfig
    cells: pd.DataFrame
    strata: pd.DataFrame
    n_cochran: int

    @property
    def n_total(self) -> int:
        return int(self.strata["n"].sum())

    def sizes(self) -> dict[str, float]:
        """Stratum -> area in m2 (what the estimators take)."""
        return dict(zip(self.strata["stratum"], self.strata["area_m2"].astype(float)))


def city_cells(scan: CityStrata) -> list[dict]:
    """The city's rows of the cells table (every map stratum, pixels and m2, and the m2 mapped as built-up)."""
    names = scan.grid.stratum_names
    built = [None] * len(names) if scan.built_up_m2 is None else [float(v) for v in scan.built_up_m2]
    return [{"city": scan.grid.city, "region": scan.grid.region, "map_stratum": name, "pixels": int(px),
             "area_m2": float(area), "built_up_m2": b} for name, px, area, b in zip(names, scan.pixels, scan.areas_m2, built)]


def plan_design(scans: list[CityStrata], cfg: SampleConfig, classes: Sequence[str] = ASSESS_CLASSES,
                users_accuracy: Mapping[str, float] | None = None,
                rare_strata: Sequence[str] = RARE_STRATA) -> SampleDesign:
    """Aggregate the cities' stratum pixels into strata (DuckDB) and allocate the sample.

    ``n = sample_size_overall(W, U, target_se)`` with ``W`` the mapped area shares of UV and other (buffer counted
    as other) and ``U`` the anticipated user's accuracies; then :func:`engine.accuracy.design.allocate` of
    ``n + min_rare x (rare strata)`` points, at least ``min_rare`` per rare stratum and ``min_common`` per other
    stratum, the rest proportional to area.

    Args:
        classes: the map classes of the estimates; a map stratum that is not one of them (the buffer) is mapped
            ``other``. Default: urban village and other.
        users_accuracy: anticipated user's accuracy of each class of ``classes`` (default ``cfg.users_accuracy``).
        rare_strata: the map strata that get ``min_rare`` points (the others ``min_common``).

    Raises:
        ValueError: no city has a valid pixel.
    """
    rows = [r for s in scans for r in city_cells(s)]
    cells = pa.Table.from_pylist(rows, schema=CELLS_SCHEMA)
    con = connect(threads=1)  # one thread: the float sums come out in the same order every time
    try:
        con.register("cells", cells)
        strata = con.execute(STRATA_SQL, {"by": cfg.strata}).df()
    finally:
        con.close()
    if strata.empty:
        raise ValueError("no city has a valid pixel in its class map: nothing to sample")
    strata["map_class"] = np.where(strata["map_stratum"].isin(list(classes)), strata["map_stratum"], OTHER_CLASS)
    area_by_class = strata.groupby("map_class")["area_m2"].sum()
    n_cochran = sample_size_overall(area_by_class.to_dict(), cfg.users_accuracy if users_accuracy is None else users_accuracy,
                                    cfg.target_se)
    rare = strata["map_stratum"].isin(list(rare_strata)).to_numpy()
    mins = dict(zip(strata["stratum"], np.where(rare, cfg.min_rare, cfg.min_common).tolist()))
    n_wanted = cfg.n_total if cfg.n_total is not None else n_cochran + cfg.min_rare * int(rare.sum())
    n = allocate(dict(zip(strata["stratum"], strata["area_m2"])), n_wanted, mins)
    strata["n"] = [n[h] for h in strata["stratum"]]
    cells_df = cells.to_pandas()
    cells_df = cells_df[cells_df["pixels"] > 0].reset_index(drop=True)
    cells_df["stratum"] = cells_df[cfg.strata] + ":" + cells_df["map_stratum"]
    return SampleDesign(cfg, cells_df, strata, n_cochran)


# ---------------------------------------------------------------------------------------------------------------
# the random draw


def draw_ranks(cell_stratum: np.ndarray, cell_area: np.ndarray, cell_pixels: np.ndarray, n_per_stratum: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which cell (city part of a stratum) and which of its pixels (rank in raster order) each point lands on.

    A stratum's ``n`` is split over its cells by a multinomial on their areas, then each point picks a pixel of
    its cell uniformly (with replacement): together, i.i.d. points uniform on the stratum's area. Numpy only, so a
    benchmark can redraw thousands of times in milliseconds.

    Args:
        cell_stratum: stratum index of every cell; cell_area, cell_pixels: its area and pixel count (> 0).
        n_per_stratum: points per stratum index.

    Returns:
        ``(cell, rank)`` per point, grouped by cell in cell order.
    """
    counts = np.zeros(len(cell_stratum), np.int64)
    for h, n in enumerate(n_per_stratum):
        idx = np.flatnonzero(cell_stratum == h)
        if n and idx.size:
            area = cell_area[idx]
            counts[idx] = rng.multinomial(int(n), area / area.sum())
    cell = np.repeat(np.arange(len(cell_stratum)), counts)
    rank = np.minimum((rng.random(cell.size) * cell_pixels[cell]).astype(np.int64), cell_pixels[cell] - 1)
    return cell, rank


def area_weighted_ranks(scan: CityStrata, code: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks (raster order within each stratum code) for points of ``scan``'s city whose pixels differ in area by
    row: each point picks a strip with probability proportional to its stratum's ground area there, then a pixel of
    that strip uniformly. So points are uniform on the ground, as the stratum sizes (areas) assume."""
    cum = np.cumsum(scan.strip_counts, axis=0)
    before = np.vstack([np.zeros((1, cum.shape[1]), np.int64), cum[:-1]])
    out = np.zeros(code.size, np.int64)
    for c in np.unique(code):
        mine = np.flatnonzero(code == c)
        weights = scan.strip_areas[:, c]
        strips = rng.choice(len(weights), size=mine.size, p=weights / weights.sum())
        within = np.minimum((rng.random(mine.size) * scan.strip_counts[strips, c]).astype(np.int64), scan.strip_counts[strips, c] - 1)
        out[mine] = before[strips, c] + within
    return out


def locate(scan: CityStrata, code: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the ``rank``-th pixel (raster order) of stratum ``code``, reading only the needed strips."""
    rows = np.zeros(rank.size, np.int64)
    cols = np.zeros(rank.size, np.int64)
    if rank.size == 0:
        return rows, cols
    cum = np.cumsum(scan.strip_counts, axis=0)  # (strips, 3)
    strip = np.zeros(rank.size, np.int64)
    for c in np.unique(code):
        strip[code == c] = np.searchsorted(cum[:, c], rank[code == c], side="right")
    if (strip >= len(cum)).any():
        raise ValueError(f"city {scan.grid.city}: a drawn pixel lies beyond the class map; has {scan.grid.path} "
                         f"changed since it was scanned?")
    before = np.where(strip > 0, cum[np.maximum(strip - 1, 0), code], 0)
    for i, y0, codes in strata_strips(scan.grid, scan.buffer_m, scan.block_rows, set(strip.tolist())):
        flat = codes.ravel()
        for c in np.unique(code[strip == i]):
            mine = np.flatnonzero((strip == i) & (code == c))
            pos = np.flatnonzero(flat == c)[rank[mine] - before[mine]]
            rows[mine] = y0 + pos // scan.grid.width_px
            cols[mine] = pos % scan.grid.width_px
    return rows, cols


class MemoryLocator:
    """:func:`locate` from stratum codes held in memory: each city's codes are read once (strip by strip, one byte
    per pixel), with per-row counts of every code, so a redraw reads no raster and visits one row per point. For
    repeated draws on the same maps (coverage studies); it finds the same pixels as :func:`locate`.

    Example::

        locator = MemoryLocator()
        points = draw_sample(scans, replace(design, config=replace(design.config, seed=7)), locator)
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[CityStrata, np.ndarray, np.ndarray]] = {}  # id -> (scan, codes, cumulative counts)

    def _codes(self, scan: CityStrata) -> tuple[np.ndarray, np.ndarray]:
        key = id(scan)  # the scan is kept in the entry, so its id is not reused while cached
        if key not in self._cache:
            codes = np.empty((scan.grid.height_px, scan.grid.width_px), np.uint8)
            for _, y0, strip in strata_strips(scan.grid, scan.buffer_m, scan.block_rows):
                codes[y0:y0 + strip.shape[0]] = strip
            m = scan.strip_counts.shape[1]
            per_row = np.stack([(codes == c).sum(axis=1) for c in range(m)], axis=1)  # (rows, codes)
            self._cache[key] = (scan, codes, np.cumsum(per_row, axis=0))
        return self._cache[key][1:]

    def __call__(self, scan: CityStrata, code: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes, cum = self._codes(scan)
        rows = np.zeros(rank.size, np.int64)
        cols = np.zeros(rank.size, np.int64)
        for c in np.unique(code):
            mine = np.flatnonzero(code == c)
            rows[mine] = np.searchsorted(cum[:, c], rank[mine], side="right")
        if (rows >= codes.shape[0]).any():
            raise ValueError(f"city {scan.grid.city}: a drawn pixel lies beyond the class map")
        within = rank - np.where(rows > 0, cum[np.maximum(rows - 1, 0), code], 0)  # rank among the row's pixels of code
        key = rows * cum.shape[1] + code
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
        for mine in np.split(order, starts[1:]):  # one (row, code) at a time
            r, c = rows[mine[0]], code[mine[0]]
            cols[mine] = np.flatnonzero(codes[r] == c)[within[mine]]
        return rows, cols


POINT_COLUMNS = ("id", "city", "region", "stratum", "map_stratum", "map_class", "row", "col", "x", "y", "crs", "lon", "lat")


Locator = Callable[["CityStrata", np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (scan, code, rank) -> rows, cols


def draw_sample(scans: list[CityStrata], design: SampleDesign, locator: Locator | None = None) -> pd.DataFrame:
    """The sample points of ``design`` (seeded by ``design.config.seed``), sorted by id.

    Ids (``p00001``...) are assigned in a random order, so neither their order nor the sheet's row order tells a
    labeller the stratum (which would reveal the map class).

    ``locator`` finds each drawn pixel (default :func:`locate`, which reads the strips holding one;
    :class:`MemoryLocator` answers from stratum codes held in memory, for repeated draws on the same maps: the same
    points).

    Returns:
        One row per point: :data:`POINT_COLUMNS` (``x``/``y`` in the city's CRS ``crs``, ``lon``/``lat`` in
        EPSG:4326, ``row``/``col`` the pixel of the class map).
    """
    rng = np.random.default_rng(design.config.seed)
    cells, strata = design.cells, design.strata
    h_index = {h: i for i, h in enumerate(strata["stratum"])}
    cell, rank = draw_ranks(cells["stratum"].map(h_index).to_numpy(), cells["area_m2"].to_numpy(),
                            cells["pixels"].to_numpy(), strata["n"].to_numpy(), rng)
    offset = rng.random((cell.size, 2))
    order = rng.permutation(cell.size)
    width = max(5, len(str(cell.size)))
    ids = np.array([f"p{i + 1:0{width}d}" for i in order], dtype=object)
    by_city = {s.grid.city: s for s in scans}
    locator = locate if locator is None else locator
    parts = []
    for city, idx in pd.Series(np.arange(cell.size)).groupby(cells["city"].to_numpy()[cell]):
        idx = idx.to_numpy()
        scan = by_city[city]
        names = scan.grid.stratum_names
        code = cells["map_stratum"].map({name: i for i, name in enumerate(names)}).to_numpy()[cell[idx]]
        if scan.strip_areas is not None:  # pixel areas differ by row: uniform on the ground, not on pixels
            rank[idx] = area_weighted_ranks(scan, code, rng)
        rows, cols = locator(scan, code, rank[idx])
        x, y = scan.grid.transform @ (cols + offset[idx, 0], rows + offset[idx, 1])
        lon, lat = Transformer.from_crs(scan.grid.crs, "EPSG:4326", always_xy=True).transform(x, y)
        parts.append(pd.DataFrame({
            "id": ids[idx], "city": city, "region": scan.grid.region, "stratum": cells["stratum"].to_numpy()[cell[idx]],
            "map_stratum": np.array(names, dtype=object)[code], "row": rows, "col": cols,
            "x": np.asarray(x, float), "y": np.asarray(y, float), "crs": scan.grid.crs.to_string(),
            "lon": np.asarray(lon, float), "lat": np.asarray(lat, float)}))
    points = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(POINT_COLUMNS))
    map_class = dict(zip(strata["stratum"], strata["map_class"]))  # the buffer is mapped other
    points["map_class"] = points["stratum"].map(map_class).astype(object)
    return points[list(POINT_COLUMNS)].sort_values("id", kind="stable").reset_index(drop=True)
