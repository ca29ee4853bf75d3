"""Buildings as an input (issue 18): the catalog's optional ``buildings`` file in any CRS, else OSM's ``building=*``;
bad files give one line naming the city and the file, and never stop the other cities."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.features import rasterize

from engine.buildings import (
    BuildingsError,
    buildings_from_osm,
    buildings_summary,
    city_buildings,
    imagery_bounds_4326,
    read_buildings,
)
from engine.catalog import load_catalog
from engine.schema import BUILDINGS_SCHEMA, BUILT_UP_CLASSES, CLASS_ID, schema_problems


def _rows(ws: Path) -> list[dict]:
    return load_catalog(ws / "catalog.yaml").to_pylist()


def _footprints_near(row: dict, n: int = 6) -> list[shapely.Polygon]:
    """``n`` small squares inside the row's imagery, in EPSG:4326."""
    west, south, east, north = imagery_bounds_4326(row["imagery"])
    cx, cy = (west + east) / 2, (south + north) / 2
    d = 0.00008  # about 8 m
    return [shapely.box(cx + i * 2 * d, cy, cx + i * 2 * d + d, cy + d) for i in range(n)]


def test_demo_buildings_file_is_read_reprojected_and_lands_on_built_up_pixels(demo_workspace):
    for row in _rows(demo_workspace):
        assert row["buildings"] and Path(row["buildings"]).is_file()
        read = city_buildings(row)
        meta = json.loads((Path(row["imagery"]).parent / "meta.json").read_text())
        truth = meta["stats"]["buildings_truth"]
        assert read.source == "catalog" and read.path == row["buildings"]
        assert read.crs_from == f"EPSG:{meta['epsg']}"  # written in the city's UTM zone, read in EPSG:4326
        assert schema_problems(read.table.schema, BUILDINGS_SCHEMA) == []
        assert read.count == truth["in_file"] and read.repaired == read.dropped == 0
        assert 0.8 <= truth["file_completeness"] <= 0.99 or truth["drawn"] < 60
        heights = np.array(read.table["height_m"].to_pylist(), dtype=float)
        levels = np.array(read.table["levels"].to_pylist(), dtype=float)
        assert np.isfinite(heights).all() and 0.8 < np.isfinite(levels).mean() <= 1.0
        # footprints (jittered under a metre) fall on built-up pixels of the truth raster
        with rasterio.open(Path(row["imagery"]).parent / "truth.tif") as src:
            t, transform, crs = src.read(1), src.transform, src.crs
        geoms = gpd.GeoSeries(shapely.from_wkb(read.table["geometry"].to_numpy(zero_copy_only=False)), crs=4326).to_crs(crs)
        burned = rasterize(((g, 1) for g in geoms), out_shape=t.shape, transform=transform, fill=0, dtype="uint8").astype(bool)
        built = np.isin(t, [CLASS_ID[c] for c in BUILT_UP_CLASSES + ("vacant",)])
        burned &= t != CLASS_ID["nodata"]  # buildings of blocks that straddle the AOI's outline
        assert burned.sum() > 0 and built[burned].mean() > 0.9, (row["city"], built[burned].mean())


def test_without_a_buildings_file_the_osm_building_polygons_are_used(demo_workspace):
    row = dict(_rows(demo_workspace)[2], buildings=None)
    read = city_buildings(row)
    assert read.source == "osm" and read.path == row["osm"]
    tags = pq.read_table(row["osm"])["tags"].to_pylist()
    n_osm = sum(1 for t in tags if "building" in dict(t))
    assert 0 < read.count <= n_osm
    levels = np.array(read.table["levels"].to_pylist(), dtype=float)
    assert np.isfinite(levels).any() and (levels[np.isfinite(levels)] >= 1).all()  # building:levels tags
    assert buildings_from_osm(row["osm"]).count == n_osm  # no bbox: every building polygon


def test_any_crs_multipolygons_split_and_heights_from_alternative_columns(demo_workspace, tmp_path):
    row = _rows(demo_workspace)[0]
    boxes = _footprints_near(row, 4)
    multi = shapely.MultiPolygon(boxes[2:])
    gdf = gpd.GeoDataFrame({"height": [9.5, None, 30.0], "building:levels": ["3", "", "10"]}, geometry=boxes[:2] + [multi], crs=4326)
    path = tmp_path / "b.gpkg"
    gdf.to_crs(4547).to_file(path)  # CGCS2000 / 3-degree Gauss-Kruger CM 114E: a national CRS
    read = read_buildings(path, imagery_bounds_4326(row["imagery"]), city=row["city"])
    assert read.crs_from == "EPSG:4547" and read.count == 4  # the multipolygon became two buildings
    assert read.table["building_id"].to_pylist() == [1, 2, 3, 4]
    assert read.table["height_m"].to_pylist() == [9.5, None, 30.0, 30.0]
    assert read.table["levels"].to_pylist() == [3.0, None, 10.0, 10.0]
    got = shapely.from_wkb(read.table["geometry"].to_numpy(zero_copy_only=False))
    assert shapely.equals_exact(got[0], boxes[0], tolerance=1e-7)


@pytest.mark.parametrize("suffix", ["geojson", "parquet"])
def test_broken_geometries_are_repaired_or_dropped_and_counted(demo_workspace, tmp_path, suffix):
    row = _rows(demo_workspace)[0]
    boxes = _footprints_near(row, 3)
    (x0, y0, x1, y1) = boxes[1].bounds
    bowtie = shapely.Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])  # self-intersecting: repaired into two triangles
    line = shapely.LineString([(x0, y0), (x1, y1)])  # not a footprint: dropped
    gdf = gpd.GeoDataFrame({"height_m": [6.0, 9.0, 12.0, 3.0, 4.0]},
                           geometry=[boxes[0], bowtie, line, None, boxes[2]], crs=4326)
    path = tmp_path / f"broken.{suffix}"
    if suffix == "parquet":  # GeoParquet in the city's UTM zone (read by row group, filtered in its own CRS)
        gdf.to_crs(32650).to_parquet(path)
    else:
        gdf.to_file(path)
    read = read_buildings(path, imagery_bounds_4326(row["imagery"]), city=row["city"])
    assert read.repaired == 1 and read.dropped == 1  # the line (a row without geometry lies in no imagery's bounds)
    assert read_buildings(path).dropped == 2  # without bounds it is counted too
    assert read.count == 4  # box, the bowtie's two triangles, box
    got = shapely.from_wkb(read.table["geometry"].to_numpy(zero_copy_only=False))
    assert shapely.is_valid(got).all() and set(shapely.get_type_id(got)) == {3}
    assert read.table["height_m"].to_pylist() == [6.0, 9.0, 9.0, 4.0]
    assert read.crs_from == ("EPSG:32650" if suffix == "parquet" else None)
    row = dict(row, buildings=str(path))
    assert buildings_summary([row])[0]["buildings_repaired"] == 1


def test_bad_buildings_inputs_each_name_city_and_file_and_never_stop_the_others(demo_workspace, tmp_path):
    rows = _rows(demo_workspace)
    a = rows[0]
    boxes = _footprints_near(a)
    import warnings

    no_crs = tmp_path / "no_crs.gpkg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gpd.GeoDataFrame({"height_m": [3.0] * len(boxes)}, geometry=boxes).to_file(no_crs)
    far = tmp_path / "far.parquet"
    gpd.GeoDataFrame({"height_m": [3.0] * len(boxes)}, geometry=[shapely.affinity.translate(b, -180.0, -60.0) for b in boxes],
                     crs=4326).to_parquet(far)
    text_height = tmp_path / "text_height.geojson"
    gpd.GeoDataFrame({"height_m": ["12", "12.5", "tall", None, "9", "3"]}, geometry=boxes, crs=4326).to_file(text_height)
    bad = {"no-crs": no_crs, "far-away": far, "text-height": text_height, "missing": tmp_path / "nope.gpkg"}
    catalog = [dict(a, city=c, buildings=str(p)) for c, p in bad.items()] + rows[1:]
    summary = {r["city"]: r for r in buildings_summary(catalog)}
    assert set(summary) == set(bad) | {r["city"] for r in rows[1:]}
    for city, path in bad.items():
        error = summary[city]["buildings_error"]
        assert error.startswith(f"city {city}: buildings {path}") and "\n" not in error, error
        assert summary[city]["buildings_source"] is None
    assert "has no CRS" in summary["no-crs"]["buildings_error"]
    far_error = summary["far-away"]["buildings_error"]
    assert "does not overlap the imagery" in far_error and far_error.count("[") == 2  # both extents named
    text_error = summary["text-height"]["buildings_error"]
    assert "'height_m'" in text_error and "'tall'" in text_error and "1 value(s)" in text_error
    assert "file not found" in summary["missing"]["buildings_error"]
    for row in rows[1:]:  # the good cities after the bad ones were all read
        assert summary[row["city"]]["buildings_error"] is None and summary[row["city"]]["buildings"] > 0
    with pytest.raises(BuildingsError, match=r"^city no-crs: buildings .*no_crs\.gpkg has no CRS; "):
        city_buildings(catalog[0])


def test_numeric_text_heights_are_accepted(tmp_path):
    boxes = [shapely.box(114.3 + i * 1e-4, 30.59, 114.30005 + i * 1e-4, 30.59005) for i in range(3)]
    path = tmp_path / "b.geojson"
    gpd.GeoDataFrame({"height_m": ["12", " 7.5 ", None], "levels": [4, None, 2]}, geometry=boxes, crs=4326).to_file(path)
    read = read_buildings(path)
    assert read.table["height_m"].to_pylist() == [12.0, 7.5, None]
    assert read.table["levels"].to_pylist() == [4.0, None, 2.0]
