"""What became of each urban village between two dates: every UV polygon of either run gets a fate.

**Matching.** A before polygon ``b`` and an after polygon ``a`` match when ``b`` buffered by ``tolerance_m`` overlaps
``a`` by at least ``min_overlap`` of the smaller of the two (areas in ``crs_metric``). The buffer absorbs the
misregistration between the dates (a village shifted by a few metres still overlaps itself); the overlap share keeps
two distinct villages that merely lie within the tolerance of each other (neighbours across a narrow road, or a new
village beside a demolished one) from matching through a thin sliver. Candidates come from one shapely
:class:`~shapely.STRtree` query.

**Groups (merges and splits).** Matches form a bipartite graph between the dates; each connected component is one
*change group* (``change_id``), and every polygon of a group gets the group's fate, decided on the group's total
areas. So two villages that merged into one, or one that split into several (a road cut through it, or the model now
sees a gap), are judged by how much UV land the group holds at each date, not by polygon counts: a merge of 1000 m²
and 1000 m² into 2100 m² is ``persisted``, a split of 2000 m² into 900 + 900 m² is ``persisted``, and a split that
keeps 900 m² of 2000 m² is ``shrunk``. ``match`` says which kind of group it is.

**Fates** (``ratio`` = group after area / group before area, equal-area):

| fate | rule |
|---|---|
| ``demolished`` | a before polygon with no match |
| ``new`` | an after polygon with no match |
| ``shrunk`` | matched, ``ratio < 1 - area_threshold`` |
| ``grew`` | matched, ``ratio > 1 + area_threshold`` |
| ``persisted`` | matched, otherwise |

``area_threshold`` (default 0.2): two runs of one model on two images of an unchanged village give outlines that
differ by a few per cent (misregistration, haze, the model's own noise); 20% is well above that and well below a
real partial demolition or extension of a village.

**Output columns** (one row per polygon of either date; rows ordered by ``change_id``, then ``date`` (before first),
then ``uv_id``; groups numbered by their first before polygon in ``uv_id`` order, then after-only groups likewise):

| column | unit | definition |
|---|---|---|
| ``change_id`` | text | ``<city>-c<n>``: the change group; rows of both dates that match each other share it |
| ``city``, ``region`` | text | the city and its region (from the polygons' rows) |
| ``date`` | text | ``before`` or ``after``: which run the polygon comes from |
| ``uv_id`` | text | the polygon's ``uv_id`` in its run's ``urban_villages.parquet`` |
| ``fate`` | text | ``persisted``, ``shrunk``, ``grew``, ``demolished`` or ``new`` (the group's) |
| ``match`` | text | ``one_to_one``, ``merge`` (several before, one after), ``split`` (one before, several after), ``many_to_many``, or ``unmatched`` |
| ``area_m2`` | m² | the polygon's area, equal-area (EPSG:6933) |
| ``overlap_m2`` | m² | area of the polygon that lies in the other date's polygons it matches (no buffer), EPSG:6933 |
| ``overlap_share`` | fraction | ``overlap_m2 / area_m2`` (0 when unmatched) |
| ``matched_ids`` | text | ``uv_id`` of the other date's polygons it matches, comma-separated, sorted; empty when unmatched |
| ``n_matched`` | count | how many those are |
| ``group_before_m2``, ``group_after_m2`` | m² | total area of the group's polygons at each date |
| ``area_ratio`` | m²/m² | ``group_after_m2 / group_before_m2``; NaN for an unmatched polygon |
| ``geometry`` | EPSG:4326 | the polygon |
"""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from engine.geo import WGS84, utm_epsg_for
from engine.stitch.merge import EQUAL_AREA_CRS

FATES = ("persisted", "shrunk", "grew", "demolished", "new")
MATCHES = ("one_to_one", "merge", "split", "many_to_many", "unmatched")
DATES = ("before", "after")
FATE_COLUMNS = ("change_id", "city", "region", "date", "uv_id", "fate", "match", "area_m2", "overlap_m2", "overlap_share",
                "matched_ids", "n_matched", "group_before_m2", "group_after_m2", "area_ratio", "geometry")


def uv_fates(before: gpd.GeoDataFrame, after: gpd.GeoDataFrame, crs_metric=None, tolerance_m: float = 3.0, *,
             area_threshold: float = 0.2, min_overlap: float = 0.25, city: str | None = None) -> gpd.GeoDataFrame:
    """The fate of every UV polygon of one city at two dates (columns and rules: this module's docstring).

    Args:
        before, after: the city's rows of each run's ``urban_villages.parquet`` (``uv_id``, ``geometry``; ``city``
            and ``region`` used when present), any CRS (EPSG:4326 in the products). Rows without a geometry (or
            with an empty one) cannot be placed and are left out; ``urban_villages.parquet`` has none.
        crs_metric: a metric CRS for buffers and overlap shares (e.g. the city's UTM zone); None: the UTM zone of
            the polygons' centre (:func:`engine.geo.utm_epsg_for`).
        tolerance_m: the misregistration tolerance, metres (e.g. the change map's ``tolerance_px`` times the pixel
            size, so the raster and the polygons tolerate the same shift).
        area_threshold: the relative area change of a matched group that counts as ``shrunk`` or ``grew``.
        min_overlap: share of the smaller polygon that the buffered before polygon must cover for a match.
        city: the city slug; None: from the rows' ``city`` column.

    Example:
        >>> from shapely.geometry import box
        >>> b = gpd.GeoDataFrame({"uv_id": ["x-1", "x-2"]}, geometry=[box(0, 0, 100, 100), box(300, 0, 400, 100)], crs=32650)
        >>> a = gpd.GeoDataFrame({"uv_id": ["x-1"]}, geometry=[box(2, 1, 102, 101)], crs=32650)
        >>> uv_fates(b, a, 32650, 3.0, city="x")[["change_id", "date", "uv_id", "fate"]].values.tolist()
        [['x-c1', 'before', 'x-1', 'persisted'], ['x-c1', 'after', 'x-1', 'persisted'], ['x-c2', 'before', 'x-2', 'demolished']]
    """
    if not tolerance_m >= 0:
        raise ValueError(f"tolerance_m={tolerance_m}: must be >= 0")
    if not 0 <= area_threshold < 1:
        raise ValueError(f"area_threshold={area_threshold}: must be in [0, 1)")
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap={min_overlap}: must be in (0, 1]")
    frames = [_prepared(before, "before"), _prepared(after, "after")]
    city = city if city is not None else _first(frames, "city")
    region = _first(frames, "region")
    nb, na = len(frames[0]), len(frames[1])
    if nb + na == 0:
        return _empty()
    if crs_metric is None:
        minx, miny, maxx, maxy = pd.concat([f.geometry for f in frames]).total_bounds
        crs_metric = utm_epsg_for((minx + maxx) / 2, (miny + maxy) / 2)
    metric = [f.geometry.to_crs(CRS.from_user_input(crs_metric)).values for f in frames]
    equal = [f.geometry.to_crs(EQUAL_AREA_CRS).values for f in frames]
    gb, ga = (np.asarray(shapely.make_valid(g), dtype=object) for g in metric)
    eb, ea = (np.asarray(shapely.make_valid(g), dtype=object) for g in equal)

    # matches: buffered before polygon x after polygon, kept where the overlap is a real share of the smaller one
    bi, aj = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if nb and na:
        buffered = shapely.buffer(gb, tolerance_m) if tolerance_m > 0 else gb
        bi, aj = shapely.STRtree(ga).query(buffered, predicate="intersects")
        shared = shapely.area(shapely.intersection(buffered[bi], ga[aj]))
        keep = (shared > 0) & (shared >= min_overlap * np.minimum(shapely.area(gb[bi]), shapely.area(ga[aj])))
        order = np.lexsort((aj[keep], bi[keep]))
        bi, aj = bi[keep][order].astype(np.int64), aj[keep][order].astype(np.int64)
    overlap = shapely.area(shapely.intersection(eb[bi], ea[aj])) if len(bi) else np.zeros(0)

    # groups: connected components over before rows 0..nb-1 and after rows nb..nb+na-1, numbered by first member
    n = nb + na
    graph = coo_matrix((np.ones(len(bi), np.int8), (bi, aj + nb)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[labels]  # 0..G-1 in order of each group's first row (before rows come first)

    area = np.concatenate([shapely.area(eb), shapely.area(ea)]) if n else np.zeros(0)
    is_before = np.arange(n) < nb
    n_groups = len(first)
    g_before = np.bincount(group, weights=np.where(is_before, area, 0.0), minlength=n_groups)
    g_after = np.bincount(group, weights=np.where(is_before, 0.0, area), minlength=n_groups)
    nb_group = np.bincount(group, weights=is_before.astype(float), minlength=n_groups).astype(np.int64)
    na_group = np.bincount(group, weights=(~is_before).astype(float), minlength=n_groups).astype(np.int64)

    uv_ids = np.concatenate([frames[0]["uv_id"].to_numpy(object), frames[1]["uv_id"].to_numpy(object)])
    row_overlap = np.zeros(n)
    np.add.at(row_overlap, bi, overlap)
    np.add.at(row_overlap, aj + nb, overlap)
    partners: list[list[str]] = [[] for _ in range(n)]
    for i, j in zip(bi.tolist(), aj.tolist()):
        partners[i].append(uv_ids[nb + j])
        partners[nb + j].append(uv_ids[i])

    width = max(1, len(str(n_groups)))
    rows = []
    for k in range(n):
        g = group[k]
        fate = _fate(g_before[g], g_after[g], nb_group[g], na_group[g], area_threshold)
        matched = sorted(partners[k])
        rows.append({
            "change_id": f"{city}-c{g + 1:0{width}d}",
            "city": city,
            "region": region,
            "date": "before" if is_before[k] else "after",
            "uv_id": uv_ids[k],
            "fate": fate,
            "match": _match(nb_group[g], na_group[g]),
            "area_m2": float(area[k]),
            "overlap_m2": float(row_overlap[k]),
            "overlap_share": float(row_overlap[k] / area[k]) if area[k] > 0 else 0.0,
            "matched_ids": ",".join(matched),
            "n_matched": len(matched),
            "group_before_m2": float(g_before[g]),
            "group_after_m2": float(g_after[g]),
            "area_ratio": float(g_after[g] / g_before[g]) if nb_group[g] and na_group[g] and g_before[g] > 0 else math.nan,
            "_group": int(g),
            "_date": 0 if is_before[k] else 1,
        })
    table = pd.DataFrame(rows)
    geometry = np.concatenate([frames[0].geometry.values.to_numpy(), frames[1].geometry.values.to_numpy()])
    table["geometry"] = list(geometry)
    table = table.sort_values(["_group", "_date", "uv_id"], kind="stable").drop(columns=["_group", "_date"]).reset_index(drop=True)
    out = gpd.GeoDataFrame(table, geometry="geometry", crs=WGS84)
    out["n_matched"] = out["n_matched"].astype("int32")
    return out[list(FATE_COLUMNS)]


def fate_counts(fates: gpd.GeoDataFrame | pd.DataFrame) -> dict[str, int]:
    """Polygon counts of one city by fate, for :func:`engine.change.stats.change_stats`.

    ``polygons_before`` / ``polygons_after``: polygons of each date; ``polygons_<fate>``: *before* polygons with
    that fate for ``persisted``, ``shrunk``, ``grew`` and ``demolished`` (so they add up to ``polygons_before``),
    *after* polygons for ``new``.

    Example:
        >>> df = pd.DataFrame({"date": ["before", "after", "before", "after"], "fate": ["grew", "grew", "demolished", "new"]})
        >>> fate_counts(df)["polygons_grew"], fate_counts(df)["polygons_new"], fate_counts(df)["polygons_before"]
        (1, 1, 2)
    """
    dates = fates["date"].to_numpy(object) if len(fates) else np.zeros(0, object)
    kinds = fates["fate"].to_numpy(object) if len(fates) else np.zeros(0, object)
    out = {"polygons_before": int((dates == "before").sum()), "polygons_after": int((dates == "after").sum())}
    for fate in FATES:
        date = "after" if fate == "new" else "before"
        out[f"polygons_{fate}"] = int(((dates == date) & (kinds == fate)).sum())
    return out


def _fate(before_m2: float, after_m2: float, n_before: int, n_after: int, threshold: float) -> str:
    if not n_after:
        return "demolished"
    if not n_before:
        return "new"
    ratio = after_m2 / before_m2 if before_m2 > 0 else math.inf
    if ratio < 1 - threshold:
        return "shrunk"
    if ratio > 1 + threshold:
        return "grew"
    return "persisted"


def _match(n_before: int, n_after: int) -> str:
    if not n_before or not n_after:
        return "unmatched"
    if n_before == 1 and n_after == 1:
        return "one_to_one"
    if n_after == 1:
        return "merge"
    if n_before == 1:
        return "split"
    return "many_to_many"


def _prepared(gdf: gpd.GeoDataFrame, date: str) -> gpd.GeoDataFrame:
    """The rows in EPSG:4326, sorted by ``uv_id`` (deterministic whatever the input order), without null geometry."""
    if "uv_id" not in gdf.columns:
        raise ValueError(f"{date} polygons: no uv_id column (rows of a run's urban_villages.parquet are expected)")
    if gdf.crs is None:
        raise ValueError(f"{date} polygons: no CRS (urban_villages.parquet is EPSG:4326)")
    if gdf["uv_id"].duplicated().any():
        dup = gdf.loc[gdf["uv_id"].duplicated(), "uv_id"].iloc[0]
        raise ValueError(f"{date} polygons: uv_id {dup!r} appears more than once")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf = gdf.to_crs(WGS84) if not CRS.from_user_input(gdf.crs).equals(WGS84) else gdf
    return gdf.sort_values("uv_id", kind="stable").reset_index(drop=True)


def _first(frames: list[gpd.GeoDataFrame], column: str) -> str:
    for f in frames:
        if column in f.columns:
            values = [v for v in f[column].tolist() if isinstance(v, str) and v]
            if values:
                return values[0]
    return ""


def _empty() -> gpd.GeoDataFrame:
    columns = {name: pd.Series(dtype="float64" if name.endswith(("_m2", "_share", "_ratio")) else object)
               for name in FATE_COLUMNS if name != "geometry"}
    columns["n_matched"] = pd.Series(dtype="int32")
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries([], crs=WGS84), crs=WGS84)[list(FATE_COLUMNS)]
