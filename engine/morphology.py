"""Building-level morphology of zones (UV polygons, formal residential, built-up land): a pure, vectorised core.

Issue 18 part 4. Nothing here reads or writes workspace files except :func:`morphology_figure` (to the path it is
given); the stitch stage calls :func:`zone_stats` per city and zone set, keeps :meth:`ZoneStats.table` as new columns,
and folds :func:`summarise` results into a :class:`MorphologyRollup`, whose rows become ``morphology.csv``.

Inputs are shapely arrays in one metric (projected, metres) CRS: zones (Polygon or MultiPolygon) and building
footprints (Polygon); optional per-building ``height_m`` and ``levels`` (NaN, None, non-finite or <= 0 mean unknown).

Definitions (also in :data:`MORPHOLOGY_COLUMNS`, for the data dictionary):

* **Assignment.** A building belongs to the zone containing its representative point (``shapely.point_on_surface``,
  always inside the footprint, unlike the centroid of an L-shaped building). One point, one zone: a building
  straddling two zones is counted once. A point on a shared edge (or in overlapping zones) goes to the zone with the
  lowest index. Buildings whose point lies in no zone are not counted anywhere.
* **Coverage** = footprint area *clipped to the zone* (every footprint that intersects it, whichever zone the
  building is counted in) / zone area: the ground-space index. It stays within [0, 1] for non-overlapping footprints
  and adds up over adjacent zones. Footprint mean and median use the *whole* footprint of the counted buildings.
* **FAR** (floor-area ratio) = sum(clipped footprint x levels) / zone area, levels from ``levels`` where known, else
  ``height_m / 3.0`` m (:data:`STOREY_HEIGHT_M`). Buildings with neither take the area-weighted mean levels of the
  zone's buildings that have them (FAR = coverage x that mean); NaN where no building in the zone has either.
* **Height and levels means** are plain means over the counted buildings where that value is known (no imputation).
* **Spacing** ``nn_spacing_m``: edge-to-edge: for every counted building, the distance (``shapely.distance``, 0 for
  touching footprints) to the nearest *other* building counted in the same zone, averaged over the zone's buildings;
  NaN with fewer than 2 buildings; a duplicated footprint is another building at 0 m. Exact, found without
  measuring every pair: nearest bounding-box centres (KD-tree) as candidates, then a bound that sends the few
  buildings it cannot settle to an STRtree ``dwithin`` query (see ``_nn_distance``).
* **Groups** (:func:`summarise`): totals over the group's zones: density = buildings / area, coverage = clipped
  footprint / area, FAR = coverage x area-weighted levels as above, footprint mean and height, levels and spacing means
  over all buildings of the group. Footprint median: exact per city (a city's footprints are kept, a bounded
  array); per region (merged with ``keep_values=False``) from a fixed log-spaced histogram, 1000 bins per decade
  from 0.1 m^2 to 10^6 m^2, so within 0.25 % of the exact median, in memory that does not grow with the buildings.

Everything is vectorised (shapely 2 STRtree queries, scipy cKDTree, numpy ``bincount``); no Python loop over buildings
or zones.

Example:
    >>> import shapely
    >>> zone = np.array([shapely.box(0, 0, 100, 100)])                  # 1 ha
    >>> fps = np.array([shapely.box(10, 10, 20, 20), shapely.box(30, 10, 50, 20)])
    >>> row = polygon_morphology(zone, fps, None, np.array([2.0, 3.0])).to_pylist()[0]
    >>> row["n_buildings"], row["density_per_ha"], row["coverage_ratio"], row["far"], row["nn_spacing_m"]
    (2, 2.0, 0.03, 0.08, 10.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from engine.atomic import atomic_path
from engine.schema import MORPHOLOGY_COLUMNS, MORPHOLOGY_SCHEMA  # noqa: F401  (the contract lives with the others)

STOREY_HEIGHT_M = 3.0  # metres per storey where levels are unknown but the height is known

# morphology.csv: one row per (level, region, city, group); region rows have city ""
ROW_KEYS: tuple[str, ...] = ("level", "region", "city", "group", "n_zones", "area_ha", *MORPHOLOGY_COLUMNS)
UV_GROUP, FORMAL_GROUP, BUILT_UP_GROUP = "uv", "formal_residential", "built_up"

# footprint histogram for medians in bounded memory: log10 edges, 1000 per decade, 0.1 m2 .. 1e6 m2, plus under/over
_HIST_LO, _HIST_HI, _HIST_PER_DECADE = -1.0, 6.0, 1000
_HIST_N = int((_HIST_HI - _HIST_LO) * _HIST_PER_DECADE)


def _values(a, n: int) -> np.ndarray:
    """Per-building float64 values with NaN for unknown (None, null, non-finite, <= 0); all NaN for ``None``."""
    if a is None:
        return np.full(n, np.nan)
    if isinstance(a, pa.ChunkedArray | pa.Array):
        a = a.to_numpy(zero_copy_only=False)
    v = np.array(a, dtype=np.float64)  # copy: None -> nan
    if v.shape != (n,):
        raise ValueError(f"expected {n} per-building values, got shape {v.shape}")
    v[~(np.isfinite(v) & (v > 0))] = np.nan
    return v


def _hist_index(areas: np.ndarray) -> np.ndarray:
    """Bin of each area: 0 = under 0.1 m2, 1.._HIST_N the log bins, _HIST_N + 1 = over 1e6 m2."""
    with np.errstate(divide="ignore"):
        k = np.floor((np.log10(np.maximum(areas, 1e-300)) - _HIST_LO) * _HIST_PER_DECADE)
    return (np.clip(k, -1, _HIST_N) + 1).astype(np.int64)


def _hist_quantile(hist: np.ndarray, rank: int) -> float:
    """Value at 0-based ``rank`` from the footprint histogram, interpolated geometrically inside its bin."""
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, rank, side="right"))
    before = cum[k - 1] if k else 0
    frac = (rank - before + 0.5) / hist[k]
    k = min(max(k, 1), _HIST_N)  # under/overflow: the edge bin's value
    lo = _HIST_LO + (k - 1) / _HIST_PER_DECADE
    return float(10.0 ** (lo + frac / _HIST_PER_DECADE))


def _median(hist: np.ndarray, n: int) -> float:
    if n == 0:
        return math.nan
    if n % 2:
        return _hist_quantile(hist, n // 2)
    return 0.5 * (_hist_quantile(hist, n // 2 - 1) + _hist_quantile(hist, n // 2))


@dataclass
class ZoneStats:
    """Per-zone sufficient statistics of one :func:`zone_stats` call (one city, one zone set).

    Arrays ``area_m2`` .. ``nn_n`` have one entry per zone; ``building_zone`` and ``building_area_m2`` one per
    counted building (sorted by zone), for medians.
    """

    area_m2: np.ndarray
    n_buildings: np.ndarray
    footprint_m2: np.ndarray  # whole footprints of the counted buildings
    covered_m2: np.ndarray  # footprints clipped to the zone, all intersecting buildings
    height_sum: np.ndarray
    height_n: np.ndarray
    levels_sum: np.ndarray
    levels_n: np.ndarray
    floor_known_m2: np.ndarray  # clipped footprint x levels, pieces with known (or height-derived) levels
    covered_known_m2: np.ndarray  # clipped footprint of those pieces
    nn_sum: np.ndarray
    nn_n: np.ndarray
    building_zone: np.ndarray
    building_area_m2: np.ndarray

    def table(self) -> pa.Table:
        """The per-zone metrics (:data:`MORPHOLOGY_SCHEMA`), one row per zone in zone order."""
        return pa.Table.from_pydict(_metrics(self), schema=MORPHOLOGY_SCHEMA)


def _div(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _metrics(s) -> dict:
    """Metric columns from sums (works for :class:`ZoneStats` arrays and :class:`MorphologySummary` scalars)."""
    n = np.asarray(s.n_buildings)
    area = np.asarray(s.area_m2, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        density = np.where(area > 0, _div(n, area / 1e4), np.nan)
        coverage = _div(s.covered_m2, area)
        far = _div(s.floor_known_m2, area) * _div(s.covered_m2, s.covered_known_m2)  # exact when all known
    if isinstance(s, ZoneStats):
        median = np.full(len(n), np.nan)
        if len(s.building_zone):
            # per-zone median on the zone-sorted building areas: sort within zones by (zone, area)
            order = np.lexsort((s.building_area_m2, s.building_zone))
            a = s.building_area_m2[order]
            starts = np.concatenate([[0], np.cumsum(n)[:-1]])
            has = n > 0
            lo = starts[has] + (n[has] - 1) // 2
            hi = starts[has] + n[has] // 2
            median[has] = 0.5 * (a[lo] + a[hi])
    else:
        median = s.footprint_median()
    return {
        "n_buildings": n.astype(np.int32),
        "density_per_ha": density,
        "coverage_ratio": coverage,
        "footprint_mean_m2": _div(s.footprint_m2, n),
        "footprint_median_m2": median,
        "height_mean_m": _div(s.height_sum, s.height_n),
        "levels_mean": _div(s.levels_sum, s.levels_n),
        "far": far,
        "nn_spacing_m": _div(s.nn_sum, s.nn_n),
    }


def _assign(zones: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Zone index of each point (lowest index where several contain it, -1 where none)."""
    out = np.full(len(points), -1, dtype=np.int64)
    zi, bi = shapely.STRtree(points).query(zones, predicate="intersects")
    if len(bi):
        order = np.lexsort((zi, bi))
        bi, zi = bi[order], zi[order]
        first = np.ones(len(bi), dtype=bool)
        first[1:] = bi[1:] != bi[:-1]
        out[bi[first]] = zi[first]
    return out


def _clipped(zones: np.ndarray, footprints: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zone, building, area of the footprint inside the zone) for every intersecting pair."""
    zi, bi = shapely.STRtree(footprints).query(zones, predicate="intersects")
    inside = shapely.contains_properly(zones[zi], footprints[bi])
    piece = area[bi].copy()
    cut = ~inside
    if cut.any():
        z, b = zones[zi[cut]], footprints[bi[cut]]
        try:
            piece[cut] = shapely.area(shapely.intersection(z, b))
        except shapely.errors.GEOSException:  # an invalid zone: repaired only when clipping needs it
            piece[cut] = shapely.area(shapely.intersection(shapely.make_valid(z), shapely.make_valid(b)))
    return zi, bi, piece


_NN_CANDIDATES = 4  # nearest bounding-box centres whose footprints are measured before the exactness check


def _nn_distance(footprints: np.ndarray, zone: np.ndarray) -> np.ndarray:
    """Edge-to-edge distance from each building to the nearest other building of the same zone (exact).

    ``zone`` is sorted, every zone has >= 2 buildings. Vectorised, no loop over zones or buildings:

    1. candidates: the :data:`_NN_CANDIDATES` nearest bounding-box centres (scipy cKDTree), each zone's centres moved
       into its own cell of a grid whose gap (2 x the largest zone extent + 1 m) exceeds any distance inside a zone,
       so the candidates are the zone's own buildings; ``u`` = the smallest footprint distance (``shapely.distance``)
       to a candidate of the same zone;
    2. exactness check: a building ``j`` of the zone that is not a candidate has its centre at least ``r`` (the
       farthest candidate's) away, so its footprint is at least ``r - R_i - R_zone`` away (``R``: half the bounding
       box diagonal; ``R_zone``: the zone's largest); where that is < ``u``, every footprint within ``u`` is measured
       (STRtree ``dwithin``) instead.
    """
    from scipy.spatial import cKDTree

    n = len(footprints)
    bounds = shapely.bounds(footprints)
    starts = np.flatnonzero(np.r_[True, zone[1:] != zone[:-1]])
    lo = np.column_stack([np.minimum.reduceat(bounds[:, 0], starts), np.minimum.reduceat(bounds[:, 1], starts)])
    hi = np.column_stack([np.maximum.reduceat(bounds[:, 2], starts), np.maximum.reduceat(bounds[:, 3], starts)])
    extent = float((hi - lo).max())
    pitch = 3.0 * extent + 1.0  # gap >= 2 extent + 1 > any distance inside a zone (<= its diagonal, sqrt(2) extent)
    ncol = max(1, math.ceil(math.sqrt(len(starts))))
    k = np.arange(len(starts))
    origin = np.column_stack([(k % ncol) * pitch, (k // ncol) * pitch]) - lo
    group = np.repeat(k, np.diff(np.r_[starts, n]))
    centre = 0.5 * (bounds[:, :2] + bounds[:, 2:])
    reach = 0.5 * np.hypot(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
    zone_reach = np.maximum.reduceat(reach, starts)[group]

    kk = min(_NN_CANDIDATES + 1, n)
    cdist, cand = cKDTree(centre + origin[group]).query(centre + origin[group], k=kk)
    me = np.repeat(np.arange(n), kk)
    other = cand.ravel()
    d = np.full(len(me), np.inf)
    ok = (other != me) & (group[other] == group[me])
    d[ok] = shapely.distance(footprints[me[ok]], footprints[other[ok]])
    u = d.reshape(n, kk).min(axis=1)
    unsure = np.flatnonzero(cdist[:, -1] - reach - zone_reach < u) if kk < n else np.zeros(0, dtype=np.int64)
    if len(unsure):
        radius = np.where(np.isfinite(u[unsure]), u[unsure], 2.0 * extent)
        src, dst = shapely.STRtree(footprints).query(footprints[unsure], predicate="dwithin", distance=radius)
        mine = unsure[src]
        keep = (dst != mine) & (group[dst] == group[mine])
        np.minimum.at(u, mine[keep], shapely.distance(footprints[mine[keep]], footprints[dst[keep]]))
    return np.where(np.isfinite(u), u, np.nan)


def zone_stats(zones, footprints, height_m=None, levels=None) -> ZoneStats:
    """Per-zone sums of the building morphology of ``zones`` (see the module docstring for the definitions).

    ``zones``: shapely (Multi)Polygons; ``footprints``: shapely Polygons, same metric CRS (metres); ``height_m`` and
    ``levels``: one value per footprint or ``None`` (NaN / null / <= 0 = unknown). Missing or empty footprints are
    ignored; invalid ones are repaired (``shapely.make_valid``) first.
    """
    zones = np.asarray(zones, dtype=object)
    footprints = np.asarray(footprints, dtype=object)
    nz, nb = len(zones), len(footprints)
    height, lv = _values(height_m, nb), _values(levels, nb)
    broken = ~shapely.is_valid(footprints) & ~shapely.is_missing(footprints)
    if broken.any():  # self-intersecting rings (common in OSM): repaired, so areas and clipping agree
        footprints = footprints.copy()
        footprints[broken] = shapely.make_valid(footprints[broken])
    keep = ~(shapely.is_missing(footprints) | shapely.is_empty(footprints))
    if not keep.all():
        footprints, height, lv = footprints[keep], height[keep], lv[keep]
    shapely.prepare(zones)
    area = shapely.area(footprints)

    zone_of = _assign(zones, shapely.point_on_surface(footprints))
    counted = np.flatnonzero(zone_of >= 0)
    counted = counted[np.argsort(zone_of[counted], kind="stable")]
    bz = zone_of[counted]
    n = np.bincount(bz, minlength=nz)

    def zsum(w, z=bz):
        return np.bincount(z, weights=w, minlength=nz)

    h, l_ = height[counted], lv[counted]
    hk, lk = np.isfinite(h), np.isfinite(l_)

    zi, bi, piece = _clipped(zones, footprints, area)
    eff = np.where(np.isfinite(lv), lv, height / STOREY_HEIGHT_M)[bi]
    known = np.isfinite(eff)

    nn_sum, nn_n = np.zeros(nz), np.zeros(nz, dtype=np.int64)
    multi = n[bz] >= 2
    if multi.any():
        d = _nn_distance(footprints[counted[multi]], bz[multi])
        ok = np.isfinite(d)
        nn_sum = zsum(d[ok], bz[multi][ok])
        nn_n = np.bincount(bz[multi][ok], minlength=nz)

    return ZoneStats(
        area_m2=shapely.area(zones),
        n_buildings=n,
        footprint_m2=zsum(area[counted]),
        covered_m2=zsum(piece, zi),
        height_sum=zsum(np.where(hk, h, 0.0)),
        height_n=np.bincount(bz[hk], minlength=nz),
        levels_sum=zsum(np.where(lk, l_, 0.0)),
        levels_n=np.bincount(bz[lk], minlength=nz),
        floor_known_m2=zsum(np.where(known, piece * eff, 0.0), zi),
        covered_known_m2=zsum(np.where(known, piece, 0.0), zi),
        nn_sum=nn_sum,
        nn_n=nn_n,
        building_zone=bz,
        building_area_m2=area[counted],
    )


def polygon_morphology(zones, footprints, height_m=None, levels=None) -> pa.Table:
    """One row per zone, in zone order, with the :data:`MORPHOLOGY_COLUMNS` (``zone_stats(...).table()``)."""
    return zone_stats(zones, footprints, height_m, levels).table()


@dataclass
class MorphologySummary:
    """Mergeable totals of a group of zones (one city's UVs, a region's formal residential, ...).

    ``values`` keeps every counted building's footprint (exact median) until merged with ``keep_values=False``;
    ``hist`` (fixed log bins) always gives the median in bounded memory.
    """

    n_zones: int = 0
    area_m2: float = 0.0
    n_buildings: int = 0
    footprint_m2: float = 0.0
    covered_m2: float = 0.0
    height_sum: float = 0.0
    height_n: int = 0
    levels_sum: float = 0.0
    levels_n: int = 0
    floor_known_m2: float = 0.0
    covered_known_m2: float = 0.0
    nn_sum: float = 0.0
    nn_n: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_HIST_N + 2, dtype=np.int64))
    values: np.ndarray | None = field(default_factory=lambda: np.zeros(0))

    def merge(self, other: MorphologySummary, keep_values: bool = True) -> MorphologySummary:
        """The totals of both groups (a new object); exact values kept only if both have them and ``keep_values``."""
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name not in ("hist", "values")}
        values = (np.concatenate([self.values, other.values])
                  if keep_values and self.values is not None and other.values is not None else None)
        return replace(self, **sums, hist=self.hist + other.hist, values=values)

    def footprint_median(self) -> float:
        if self.values is not None:
            return float(np.median(self.values)) if len(self.values) else math.nan
        return _median(self.hist, int(self.hist.sum()))

    def metrics(self) -> dict:
        """``n_zones``, ``area_ha`` and the :data:`MORPHOLOGY_COLUMNS` of the group, as Python scalars."""
        m = {k: np.asarray(v).item() for k, v in _metrics(self).items()}
        return {"n_zones": int(self.n_zones), "area_ha": self.area_m2 / 1e4, **m}


def summarise(stats: ZoneStats, groups: str | Sequence[str] | np.ndarray) -> dict[str, MorphologySummary]:
    """Totals per group label of the zones in ``stats``: ``groups`` is one label for all zones or one per zone.

    Example:
        >>> import shapely
        >>> zones = np.array([shapely.box(0, 0, 100, 100), shapely.box(200, 0, 300, 100)])
        >>> fps = np.array([shapely.box(10, 10, 20, 20), shapely.box(210, 10, 230, 30)])
        >>> s = summarise(zone_stats(zones, fps), "uv")["uv"].metrics()
        >>> s["n_zones"], s["density_per_ha"], s["coverage_ratio"], s["footprint_mean_m2"], s["footprint_median_m2"]
        (2, 1.0, 0.025, 250.0, 250.0)
    """
    nz = len(stats.area_m2)
    labels = np.full(nz, groups, dtype=object) if isinstance(groups, str) else np.asarray(groups, dtype=object)
    if labels.shape != (nz,):
        raise ValueError(f"expected {nz} group labels, got shape {labels.shape}")
    out: dict[str, MorphologySummary] = {}
    hist_bin = _hist_index(stats.building_area_m2)
    b_label = labels[stats.building_zone]
    for label in sorted(set(labels.tolist())):  # a loop over the few group labels, not over zones or buildings
        z = labels == label
        b = b_label == label
        total = {f.name: getattr(stats, f.name)[z].sum().item() for f in fields(stats)
                 if f.name not in ("building_zone", "building_area_m2")}
        out[label] = MorphologySummary(n_zones=int(z.sum()), **total,
                                       hist=np.bincount(hist_bin[b], minlength=_HIST_N + 2).astype(np.int64),
                                       values=stats.building_area_m2[b].copy())
    return out


class MorphologyRollup:
    """Per-city rows as cities stream in; per-region rows merged in bounded memory (histogram medians).

    Example:
        >>> import shapely
        >>> r = MorphologyRollup()
        >>> s = summarise(zone_stats(np.array([shapely.box(0, 0, 100, 100)]), np.array([shapely.box(0, 0, 10, 10)])), "uv")
        >>> r.add_city("a", "north", s); r.add_city("b", "north", s)
        >>> [(row["level"], row["city"], row["n_buildings"]) for row in r.rows()]
        [('city', 'a', 1), ('city', 'b', 1), ('region', '', 2), ('national', '', 2)]
    """

    def __init__(self) -> None:
        self._city_rows: list[dict] = []
        self._regions: dict[tuple[str, str], MorphologySummary] = {}
        self._national: dict[str, MorphologySummary] = {}

    def add_city(self, city: str, region: str, summaries: Mapping[str, MorphologySummary]) -> None:
        for group, summary in sorted(summaries.items()):
            self._city_rows.append(_row("city", region, city, group, summary))
            key = (region, group)
            self._regions[key] = self._regions.get(key, MorphologySummary(values=None)).merge(summary, keep_values=False)
            self._national[group] = self._national.get(group, MorphologySummary(values=None)).merge(summary, keep_values=False)

    def rows(self) -> list[dict]:
        """City rows sorted by (region, city, group), then region rows sorted by (region, group), then the national rows
        (all cities, per group); keys :data:`ROW_KEYS`."""
        cities = sorted(self._city_rows, key=lambda r: (r["region"], r["city"], r["group"]))
        regions = [_row("region", region, "", group, s) for (region, group), s in sorted(self._regions.items())]
        national = [_row("national", "", "", group, s) for group, s in sorted(self._national.items())]
        return cities + regions + national


def _row(level: str, region: str, city: str, group: str, summary: MorphologySummary) -> dict:
    return {"level": level, "region": region, "city": city, "group": group, **summary.metrics()}


_PANELS = (("density_per_ha", "buildings per ha"), ("coverage_ratio", "coverage ratio"),
           ("height_mean_m", "mean height (m)"), ("footprint_median_m2", "median footprint (m²)"))
_COLOURS = {UV_GROUP: "#d95f02", FORMAL_GROUP: "#1b9e77"}
_LABELS = {UV_GROUP: "urban villages", FORMAL_GROUP: "formal residential"}


def morphology_figure(rows: Sequence[Mapping], path: str | Path, dpi: int = 100) -> Path:
    """PNG of the distributions by region, UV against formal residential: per panel (density, coverage, mean height,
    median footprint) a box and the points of the city rows, per region, two colours; region rows as black diamonds.

    Deterministic bytes (object-oriented matplotlib, fixed dpi, no software/date metadata, fixed point offsets).
    """
    # object-oriented: no pyplot, no global figure or backend state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = (UV_GROUP, FORMAL_GROUP)
    regions = sorted({str(r["region"]) for r in rows if r.get("group") in groups})
    fig = Figure(figsize=(max(7.0, 1.6 * len(regions) + 3.0), 7.0), dpi=dpi)
    axes = fig.subplots(2, 2).ravel()
    for ax, (metric, label) in zip(axes, _PANELS, strict=True):
        for gi, group in enumerate(groups):
            for ri, region in enumerate(regions):
                x = ri + (gi - 0.5) * 0.36
                vals = np.array([float(r[metric]) for r in rows if r.get("level") == "city" and r["group"] == group
                                 and str(r["region"]) == region and r.get(metric) is not None], dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                if len(vals):
                    ax.boxplot(vals, positions=[x], widths=0.3, showfliers=False, patch_artist=True,
                               boxprops={"facecolor": _COLOURS[group], "alpha": 0.35},
                               medianprops={"color": _COLOURS[group]})
                    offsets = np.linspace(-0.1, 0.1, len(vals)) if len(vals) > 1 else np.zeros(1)
                    ax.scatter(x + offsets, vals, s=10, color=_COLOURS[group], zorder=3)
                whole = [float(r[metric]) for r in rows if r.get("level") == "region" and r["group"] == group
                         and str(r["region"]) == region and r.get(metric) is not None]
                whole = [v for v in whole if math.isfinite(v)]
                if whole:
                    ax.scatter([x], whole[:1], marker="D", s=28, color="black", zorder=4)
        ax.set_xticks(range(len(regions)), regions, fontsize=8)
        ax.set_xlim(-0.7, max(len(regions), 1) - 0.3)
        ax.set_ylabel(label)
    handles = [Patch(facecolor=_COLOURS[g], alpha=0.6, label=_LABELS[g]) for g in groups]
    handles.append(Line2D([], [], marker="D", color="black", linestyle="", label="region total"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Building morphology by region (cities as points)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return path
