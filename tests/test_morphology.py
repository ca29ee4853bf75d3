"""Building-level morphology (engine/morphology.py): hand cases with exact answers, assignment, NaN rules, group
totals, a brute-force check of the vectorised spacing and medians, and a deterministic figure."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import shapely

from engine.morphology import (
    MORPHOLOGY_COLUMNS,
    MORPHOLOGY_SCHEMA,
    ROW_KEYS,
    MorphologyRollup,
    morphology_figure,
    polygon_morphology,
    summarise,
    zone_stats,
)

ZONE = shapely.box(0, 0, 100, 100)  # 1 ha
# 4 buildings of 100, 200, 600 and 900 m2; nearest edge-to-edge neighbours 10, 10, 20 and 30 m
FOUR = np.array([shapely.box(10, 10, 20, 20), shapely.box(30, 10, 50, 20), shapely.box(10, 40, 30, 70),
                 shapely.box(60, 60, 90, 90)])


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def test_four_buildings_hand_case_is_exact():
    table = polygon_morphology(np.array([ZONE]), FOUR, np.array([6.0, 9.0, np.nan, 12.0]), np.array([2.0, 3.0, 1.0, 4.0]))
    assert table.schema == MORPHOLOGY_SCHEMA
    assert list(table.column_names) == list(MORPHOLOGY_COLUMNS)
    (row,) = rows(table)
    assert row == {
        "n_buildings": 4,
        "density_per_ha": 4.0,
        "coverage_ratio": 0.18,  # 1800 / 10000
        "footprint_mean_m2": 450.0,
        "footprint_median_m2": 400.0,  # (200 + 600) / 2
        "height_mean_m": 9.0,  # the unknown height is left out
        "levels_mean": 2.5,
        "far": 0.5,  # (100*2 + 200*3 + 600*1 + 900*4) / 10000
        "nn_spacing_m": 17.5,  # (10 + 10 + 20 + 30) / 4
    }


def test_zones_with_no_and_one_building():
    zones = np.array([shapely.box(0, 0, 100, 100), shapely.box(200, 0, 300, 100)])
    empty, one = rows(polygon_morphology(zones, np.array([shapely.box(210, 10, 230, 20)]), np.array([6.0]), None))
    assert (empty["n_buildings"], empty["density_per_ha"], empty["coverage_ratio"]) == (0, 0.0, 0.0)
    for key in ("footprint_mean_m2", "footprint_median_m2", "height_mean_m", "levels_mean", "far", "nn_spacing_m"):
        assert math.isnan(empty[key]), key
    assert (one["n_buildings"], one["density_per_ha"], one["coverage_ratio"]) == (1, 1.0, 0.02)
    assert one["footprint_median_m2"] == 200.0 and one["height_mean_m"] == 6.0
    assert one["far"] == pytest.approx(0.04)  # 200 m2 x (6 m / 3 m) / 10000
    assert math.isnan(one["levels_mean"]) and math.isnan(one["nn_spacing_m"])


def test_no_buildings_and_no_zones():
    (row,) = rows(polygon_morphology(np.array([ZONE]), np.array([], dtype=object)))
    assert (row["n_buildings"], row["density_per_ha"], row["coverage_ratio"]) == (0, 0.0, 0.0)
    assert polygon_morphology(np.array([], dtype=object), FOUR).num_rows == 0
    # missing and empty footprints are ignored
    (row,) = rows(polygon_morphology(np.array([ZONE]), np.array([None, shapely.Polygon(), FOUR[0]]), np.array([1.0, 2.0, 3.0])))
    assert (row["n_buildings"], row["height_mean_m"]) == (1, 3.0)


def test_multipolygon_zone_and_invalid_footprint():
    zone = shapely.MultiPolygon([shapely.box(0, 0, 50, 100), shapely.box(200, 0, 250, 100)])  # 1 ha in two parts
    bowtie = shapely.Polygon([(40, 30), (60, 40), (60, 30), (40, 40)])  # self-intersecting: two 50 m2 triangles
    fps = np.array([shapely.box(10, 10, 20, 20), shapely.box(210, 10, 220, 20), bowtie])
    (row,) = rows(polygon_morphology(np.array([zone]), fps, pa.chunked_array([[3.0, None, 6.0]]), None))
    assert (row["n_buildings"], row["density_per_ha"], row["height_mean_m"]) == (3, 3.0, 4.5)
    assert row["footprint_mean_m2"] == pytest.approx(100.0)  # the repaired bow tie has its 100 m2
    assert row["coverage_ratio"] == pytest.approx((100 + 100 + 50) / 10000)  # half the bow tie lies in the zone


def test_straddling_building_is_counted_once_and_clipped_for_coverage():
    zones = np.array([shapely.box(0, 0, 100, 100), shapely.box(100, 0, 200, 100)])
    straddler = shapely.box(90, 10, 130, 20)  # 100 m2 in the first zone, 300 m2 in the second
    a, b = rows(polygon_morphology(zones, np.array([straddler])))
    assert a["n_buildings"] + b["n_buildings"] == 1
    home = int(shapely.contains(zones[1], shapely.point_on_surface(straddler)))
    assert (a, b)[home]["n_buildings"] == 1 and (a, b)[home]["footprint_mean_m2"] == 400.0  # the whole footprint
    assert a["coverage_ratio"] == pytest.approx(0.01) and b["coverage_ratio"] == pytest.approx(0.03)
    # a point in two zones (overlap, or a shared edge) goes to the lowest zone index, once
    twice = np.array([ZONE, ZONE])
    first, second = rows(polygon_morphology(twice, FOUR[:1]))
    assert (first["n_buildings"], second["n_buildings"]) == (1, 0)


def test_missing_heights_and_levels_give_nan_and_are_left_out():
    zone = np.array([ZONE])
    fps = FOUR[:2]
    (row,) = rows(polygon_morphology(zone, fps, None, None))
    assert all(math.isnan(row[k]) for k in ("height_mean_m", "levels_mean", "far"))
    (row,) = rows(polygon_morphology(zone, fps, pa.array([None, None], pa.float64()), np.array([0.0, np.inf])))
    assert all(math.isnan(row[k]) for k in ("height_mean_m", "levels_mean", "far"))  # 0 and inf levels are unknown
    # one building with a height (9 m = 3 levels), one with nothing: FAR = coverage x 3 (area-weighted mean levels)
    (row,) = rows(polygon_morphology(zone, fps, pa.array([9.0, None]), None))
    assert row["height_mean_m"] == 9.0 and math.isnan(row["levels_mean"])
    assert row["far"] == pytest.approx(0.03 * 3)
    # levels win over height where both are known
    (row,) = rows(polygon_morphology(zone, fps, np.array([30.0, 30.0]), np.array([1.0, 1.0])))
    assert row["far"] == pytest.approx(0.03)
    with pytest.raises(ValueError):
        polygon_morphology(zone, fps, np.array([1.0]), None)


def test_summarise_totals_and_rollup():
    zones = np.array([shapely.box(0, 0, 100, 100), shapely.box(200, 0, 400, 100), shapely.box(0, 200, 100, 300)])
    fps = np.array([*FOUR, shapely.box(210, 10, 230, 20), shapely.box(10, 210, 20, 220)])
    stats = zone_stats(zones, fps, None, np.array([2.0, 3.0, 1.0, 4.0, 1.0, np.nan]))
    groups = summarise(stats, ["uv", "formal_residential", "uv"])
    uv, formal = groups["uv"].metrics(), groups["formal_residential"].metrics()
    assert (uv["n_zones"], uv["area_ha"], uv["n_buildings"]) == (2, 2.0, 5)
    assert uv["density_per_ha"] == 2.5  # 5 buildings / 2 ha, not the mean of 4 and 1
    assert uv["coverage_ratio"] == pytest.approx(1900 / 20000)
    assert uv["footprint_mean_m2"] == 380.0 and uv["footprint_median_m2"] == 200.0  # of 100, 100, 200, 600, 900
    assert uv["far"] == pytest.approx(5000 / 20000 * 1900 / 1800)  # the last building takes the mean levels
    assert uv["nn_spacing_m"] == 17.5  # the 1-building zone has no spacing
    assert (formal["n_buildings"], formal["density_per_ha"], formal["far"]) == (1, 0.5, 0.01)
    assert math.isnan(formal["nn_spacing_m"])
    whole = summarise(stats, "built_up")["built_up"].metrics()
    assert (whole["n_buildings"], whole["area_ha"], whole["density_per_ha"]) == (6, 4.0, 1.5)

    rollup = MorphologyRollup()
    rollup.add_city("b", "east", groups)
    rollup.add_city("a", "east", groups)
    out = rollup.rows()
    assert all(tuple(r) == ROW_KEYS for r in out)
    assert [(r["level"], r["city"], r["group"]) for r in out] == [
        ("city", "a", "formal_residential"), ("city", "a", "uv"), ("city", "b", "formal_residential"), ("city", "b", "uv"),
        ("region", "", "formal_residential"), ("region", "", "uv"),
        ("national", "", "formal_residential"), ("national", "", "uv")]
    region_uv, national_uv = out[-3], out[-1]
    assert all(region_uv[k] == national_uv[k] or (region_uv[k] != region_uv[k] and national_uv[k] != national_uv[k])
               for k in ROW_KEYS if k not in ("level", "region"))  # one region: the nation (NaN equal to NaN)
    assert (region_uv["n_buildings"], region_uv["density_per_ha"]) == (10, 2.5)
    assert region_uv["footprint_median_m2"] == pytest.approx(200.0, rel=2.5e-3)  # histogram median, bounded memory


def test_vectorised_spacing_and_median_match_brute_force():
    rng = np.random.default_rng(7)
    zones = np.array([shapely.box(x, y, x + rng.uniform(60, 250), y + rng.uniform(60, 250))
                      for x in (0.0, 300.0, 600.0) for y in (0.0, 300.0)])
    cx, cy = rng.uniform(-20, 880, 400), rng.uniform(-20, 580, 400)
    w, h = rng.uniform(4, 25, 400), rng.uniform(4, 25, 400)
    fps = shapely.box(cx, cy, cx + w, cy + h)
    # long bars and L shapes (far centres, near edges: the KD candidates cannot settle these), and a duplicate
    bars = [shapely.box(x, y, x + 140, y + 6) for x, y in rng.uniform(0, 500, (8, 2))]
    ells = [shapely.Polygon([(x, y), (x + 60, y), (x + 60, y + 5), (x + 5, y + 5), (x + 5, y + 60), (x, y + 60)])
            for x, y in rng.uniform(0, 500, (8, 2))]
    fps = np.array([*fps, *bars, *ells, fps[0]])
    got = rows(polygon_morphology(zones, fps))
    pts = shapely.point_on_surface(fps)
    for k, zone in enumerate(zones):
        mine = fps[[i for i, p in enumerate(pts) if zone.intersects(p)
                    and not any(zones[j].intersects(p) for j in range(k))]]
        assert got[k]["n_buildings"] == len(mine)
        if len(mine) == 0:
            continue
        assert got[k]["footprint_median_m2"] == pytest.approx(np.median(shapely.area(mine)))
        clipped = shapely.area(shapely.intersection(zone, fps)).sum()
        assert got[k]["coverage_ratio"] == pytest.approx(clipped / zone.area)
        if len(mine) >= 2:
            nn = [min(a.distance(b) for j, b in enumerate(mine) if j != i) for i, a in enumerate(mine)]
            assert got[k]["nn_spacing_m"] == pytest.approx(np.mean(nn))


def test_figure_bytes_are_deterministic(tmp_path):
    rows_ = []
    rng = np.random.default_rng(0)
    for region in ("north", "south"):
        for city in ("a", "b", "c"):
            for group in ("uv", "formal_residential", "built_up"):
                rows_.append({"level": "city", "region": region, "city": city, "group": group,
                              "density_per_ha": rng.uniform(20, 120), "coverage_ratio": rng.uniform(0.2, 0.6),
                              "height_mean_m": float("nan") if city == "c" else rng.uniform(6, 40),
                              "footprint_median_m2": rng.uniform(60, 400)})
        rows_.append({"level": "region", "region": region, "city": "", "group": "uv", "density_per_ha": 80.0,
                      "coverage_ratio": 0.5, "height_mean_m": 12.0, "footprint_median_m2": 90.0})
    one, two = morphology_figure(rows_, tmp_path / "one.png"), morphology_figure(rows_, tmp_path / "two.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert one.read_bytes() == two.read_bytes()
    assert morphology_figure([], tmp_path / "empty.png").is_file()
