"""The `assess` stage on small hand-made products: sample design, points in their strata, census, report, labels."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyogrio
import pytest
import rasterio
import shapely
from PIL import Image
from pyproj import Transformer
from rasterio.transform import from_origin
from scipy import ndimage

from engine.accuracy import AccuracyInputError, assess_table
from engine.accuracy.assess import AssessConfig, run_assess
from engine.accuracy.reference import label_land, label_points, load_reference, read_labels, truth_strips
from engine.accuracy.sampling import (
    SampleConfig,
    draw_sample,
    open_city_grid,
    plan_design,
    scan_city,
    stratum_codes,
)
from engine.geoparquet import write_geoparquet
from engine.schema import CATALOG_SCHEMA, REFERENCE_SCHEMA

CLASSES = ("other", "urban_village", "formal_residential")  # a multi-class run: collapsed to UV / other
EPSG = 32650
SIZE = 100  # pixels of 1 m
RUN = "r1"
# the hand case of city "a", in pixel coordinates (x right, y down): truth UV and mapped UV, rows 90-99 nodata
TRUTH_A = shapely.box(20, 20, 60, 60)  # 1600 px
MAP_A = shapely.box(30, 20, 70, 60)  # 1600 px, 1200 of them true UV


def _origin(i: int) -> tuple[float, float]:
    return 500_000.0 + 1_000.0 * i, 3_400_000.0


def _to_wgs84(geom: shapely.Geometry, i: int) -> shapely.Geometry:
    x0, y0 = _origin(i)
    t = Transformer.from_crs(EPSG, 4326, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(t.transform(x0 + xy[:, 0], y0 - xy[:, 1])))


def _burn(geoms: list[shapely.Geometry], value: int, out: np.ndarray) -> None:
    """Set pixels whose centre lies in a (pixel-coordinate) geometry."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for g in geoms:
        out[shapely.contains_xy(g, xx, yy)] = value


def _write_city(ws: Path, city: str, i: int, mapped: list[shapely.Geometry], truth: list[shapely.Geometry] | None,
                formal: list[shapely.Geometry] = (), nodata_rows: int = 10) -> dict:
    """class.tif (run classes), imagery.tif and reference.parquet of a 100 x 100 m city at origin i."""
    cls = np.zeros((SIZE, SIZE), np.uint8)
    _burn(list(formal), 2, cls)
    _burn(mapped, 1, cls)
    if nodata_rows:
        cls[-nodata_rows:] = 255
    transform = from_origin(*_origin(i), 1.0, 1.0)
    folder = ws / "products" / RUN / "cities" / city
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(folder / "class.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8",
                       crs=f"EPSG:{EPSG}", transform=transform, nodata=255, tiled=True, blockxsize=32, blockysize=32) as dst:
        dst.write(cls, 1)
        dst.update_tags(1, classes=json.dumps(list(CLASSES)))
    src = ws / "cities" / city
    src.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(i).integers(1, 255, size=(3, SIZE, SIZE), dtype=np.uint8)
    with rasterio.open(src / "imagery.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs=f"EPSG:{EPSG}", transform=transform) as dst:
        dst.write(rgb)
    reference = None
    if truth is not None:
        shapes = [("urban_village", g) for g in truth] + [("formal_residential", shapely.box(0, 70, 40, 90))]
        write_geoparquet(pa.table({
            "class": pa.array([c for c, _ in shapes], pa.string()),
            "block_id": pa.array(range(len(shapes)), pa.int64()),
            "geometry": pa.array([_to_wgs84(g, i).wkb for _, g in shapes], pa.binary()),
        }, schema=REFERENCE_SCHEMA), src / "reference.parquet", 4326)
        reference = str(src / "reference.parquet")
    return {"city": city, "imagery": str(src / "imagery.tif"), "osm": str(src / "osm.parquet"), "aoi": None,
            "reference": reference, "split": "map"}


def _catalog(rows: list[dict]) -> pa.Table:
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in CATALOG_SCHEMA.names})


def _workspace(ws: Path, with_reference: bool = True) -> pa.Table:
    """Three cities in two regions plus one (d) whose class.tif is missing."""
    (ws / "products" / RUN).mkdir(parents=True, exist_ok=True)
    (ws / "products" / RUN / "run.json").write_text(json.dumps({"run": RUN, "model_version": "test-1", "classes": list(CLASSES)}))
    specs = [
        ("a", "east", [MAP_A], [TRUTH_A], [shapely.box(0, 70, 40, 90)]),
        ("b", "east", [shapely.box(10, 10, 30, 40)], [shapely.box(10, 15, 30, 40), shapely.box(70, 60, 85, 75)], []),
        ("c", "west", [shapely.box(50, 5, 80, 35), shapely.box(5, 60, 20, 80)], [shapely.box(50, 5, 80, 35)], []),
    ]
    rows = []
    for i, (city, region, mapped, truth, formal) in enumerate(specs):
        row = _write_city(ws, city, i, mapped, truth if with_reference else None, formal)
        rows.append({**row, "region": region})
    rows.append({"city": "d", "region": "west", "imagery": rows[0]["imagery"], "osm": "x", "aoi": None, "reference": None,
                 "split": "map"})
    return _catalog(rows)


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    ws = tmp_path_factory.mktemp("assess")
    return ws, _workspace(ws)


def _scans(ws: Path, catalog: pa.Table, cfg: SampleConfig, census: bool = False) -> list:
    out = []
    for row in catalog.to_pylist():
        path = ws / "products" / RUN / "cities" / row["city"] / "class.tif"
        if path.is_file():
            grid = open_city_grid(path, row["city"], row["region"], CLASSES)
            truth = truth_strips(load_reference(row["reference"]), grid) if census else None
            out.append(scan_city(grid, cfg.buffer_m, cfg.block_rows, truth))
    return out


# ---------------------------------------------------------------------------------------------------------------
# design and sampling


def test_sampling_is_reproducible_by_seed_and_independent_of_strip_height(products) -> None:
    ws, catalog = products
    cfg = SampleConfig(buffer_m=6.0, seed=11, min_rare=20, min_common=5)
    draw = lambda c: draw_sample(_scans(ws, catalog, c), plan_design(_scans(ws, catalog, c), c))  # noqa: E731
    first = draw(cfg)
    pd.testing.assert_frame_equal(first, draw(cfg))
    strips = SampleConfig(**{**cfg.__dict__, "block_rows": 7})  # strips with halos must give the very same points
    pd.testing.assert_frame_equal(first, draw(strips))
    other = draw(SampleConfig(**{**cfg.__dict__, "seed": 12}))
    assert not np.allclose(first["x"].to_numpy(), other["x"].to_numpy())
    assert first["id"].is_unique and list(first["id"]) == sorted(first["id"])
    assert set(first["map_class"]) == {"other", "urban_village"}


def test_points_fall_inside_their_stratum(products) -> None:
    ws, catalog = products
    cfg = SampleConfig(buffer_m=6.0, seed=3, min_rare=40, min_common=40)
    scans = _scans(ws, catalog, cfg)
    points = draw_sample(scans, plan_design(scans, cfg))
    for city, pts in points.groupby("city"):
        path = ws / "products" / RUN / "cities" / city / "class.tif"
        with rasterio.open(path) as src:
            cls = src.read(1)
            values = np.array([v[0] for v in src.sample(zip(pts["x"], pts["y"]))])
            rows, cols = rasterio.transform.rowcol(src.transform, pts["x"].to_numpy(), pts["y"].to_numpy())
        assert (np.asarray(rows) == pts["row"].to_numpy()).all() and (np.asarray(cols) == pts["col"].to_numpy()).all()
        dist = ndimage.distance_transform_edt(cls != 1)[pts["row"], pts["col"]]
        uv = pts["map_stratum"].to_numpy() == "urban_village"
        buffer = pts["map_stratum"].to_numpy() == "buffer"
        assert (values != 255).all()
        assert (values[uv] == 1).all() and (values[~uv] != 1).all()  # class 2 (formal) counts as other
        assert (dist[buffer] <= 6.0).all() and (dist[~uv & ~buffer] > 6.0).all()
        assert (pts.loc[uv, "map_class"] == "urban_village").all() and (pts.loc[~uv, "map_class"] == "other").all()
        back = Transformer.from_crs(EPSG, 4326, always_xy=True).transform(pts["x"].to_numpy(), pts["y"].to_numpy())
        assert np.allclose(back, (pts["lon"], pts["lat"]))


def test_buffer_codes_match_the_whole_raster() -> None:
    cls = np.zeros((40, 50), np.uint8)
    cls[18:21, 10:12] = 1
    cls[0, :] = 255

    class G:  # the fields stratum_codes reads
        city, path, nodata, n_classes, uv_index, res_m = "t", "t.tif", 255, 2, 1, (2.0, 1.0)

    codes = stratum_codes(cls, G, 4.0)
    dist = ndimage.distance_transform_edt(cls != 1, sampling=(2.0, 1.0))
    assert ((codes == 2) == ((cls == 0) & (dist <= 4.0))).all()
    assert (codes[0] == 255).all() and (codes[cls == 1] == 1).all()
    with pytest.raises(ValueError, match="class index 7"):
        stratum_codes(np.full((2, 2), 7, np.uint8), G, 0.0)


def test_allocation_honours_minimums_and_totals(products) -> None:
    ws, catalog = products
    cfg = SampleConfig(buffer_m=6.0, min_rare=30, min_common=12)
    design = plan_design(_scans(ws, catalog, cfg), cfg)
    s = design.strata
    rare = s["map_stratum"].isin(["urban_village", "buffer"])
    assert set(s["stratum"]) == {f"{r}:{m}" for r in ("east", "west") for m in ("other", "urban_village", "buffer")}
    assert design.n_total == design.n_cochran + 30 * int(rare.sum())
    assert (s.loc[rare, "n"] >= 30).all() and (s.loc[~rare, "n"] >= 12).all()
    # the rest is proportional to area: the larger 'other' stratum gets more points
    other = s[~rare].set_index("stratum")
    assert (other["n"].rank() == other["area_m2"].rank()).all()
    # areas and pixels add up to the cities' valid pixels
    assert s["pixels"].sum() == 3 * SIZE * (SIZE - 10)
    fixed = plan_design(_scans(ws, catalog, cfg), SampleConfig(**{**cfg.__dict__, "n_total": 500}))
    assert fixed.n_total == 500
    by_city = plan_design(_scans(ws, catalog, cfg), SampleConfig(**{**cfg.__dict__, "strata": "city"}))
    assert set(by_city.strata["unit"]) == {"a", "b", "c"}


# ---------------------------------------------------------------------------------------------------------------
# census and labels


def test_census_of_a_hand_made_case_is_exact(products) -> None:
    ws, catalog = products
    cfg = SampleConfig()
    [a] = [s for s in _scans(ws, catalog.slice(0, 1), cfg, census=True)]
    # 9000 valid pixels: TP 1200, FP 400 (x 60-70), FN 400 (x 20-30), TN 7000 of which 800 true built-up land (the
    # formal_residential reference block, x 0-40, y 70-90); columns: true other, urban village, other built-up
    assert a.census.tolist() == [[6200, 400, 800], [400, 1200, 0]]
    assert a.pixels.tolist() == [9000 - 1600, 1600, 0]
    assert 0.99 < a.grid.pixel_area_m2 < 1.01
    # mapped built-up land: the run's formal_residential class (800 px, in the other stratum) and every UV pixel
    assert a.grid.built_up_indices == (2,)
    assert (a.built_up_m2 / a.grid.pixel_area_m2).round().tolist() == [800, 1600, 0]
    ref = load_reference(catalog["reference"][0].as_py())
    centres = shapely.points([25.5, 35.5, 65.5, 5.5], [25.5, 35.5, 25.5, 75.5])
    lonlat = shapely.get_coordinates(_to_wgs84(shapely.multipoints(centres), 0))
    assert label_points(lonlat[:, 0], lonlat[:, 1], ref).tolist() == ["urban_village", "urban_village", "other", "other"]
    assert label_land(lonlat[:, 0], lonlat[:, 1], ref).tolist() == ["urban_village", "urban_village", "other", "built_up"]


def test_run_assess_writes_every_file_with_the_issue_shape(products, tmp_path: Path) -> None:
    ws, catalog = products
    cfg = AssessConfig(sampling=SampleConfig(buffer_m=5.0, seed=1, min_rare=30, min_common=20))
    report = run_assess(ws, RUN, catalog, cfg)
    out = ws / "products" / RUN / "accuracy"
    assert report.status == "done"
    for name in ("report.json", "report.md", "accuracy_by_region.png", "uv_area_by_region.png", "samples.gpkg",
                 "samples.csv", "strata.csv"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*"))
    for png in ("accuracy_by_region.png", "uv_area_by_region.png"):
        assert Image.open(out / png).size[0] > 300
    doc = json.loads((out / "report.json").read_text())
    nat = doc["national"]
    assert nat["estimator"] == "stehman2014" and nat["n"] == report.design.n_total and nat["status"] == "estimated"
    for key in ("overall_accuracy",):
        assert set(nat[key]) == {"estimate", "se", "ci95"} and len(nat[key]["ci95"]) == 2
    for key in ("users_accuracy", "producers_accuracy", "area_proportion", "area"):
        assert set(nat[key]) == {"other", "urban_village"}
        assert set(nat[key]["urban_village"]) == {"estimate", "se", "ci95"}
    assert set(doc["regions"]) == {"east", "west"} and set(doc["cities"]) == {"a", "b", "c"}
    assert "class.tif" in doc["skipped_cities"]["d"]
    assert doc["design"]["buffer_m"] == 5.0 and len(doc["design"]["strata"]) == 6
    # census: exact for city a, and every level present
    ca = doc["census"]["city"]["a"]
    assert ca["overall_accuracy"] == pytest.approx(8200 / 9000) and ca["users_accuracy"]["urban_village"] == pytest.approx(0.75)
    assert ca["producers_accuracy"]["urban_village"] == pytest.approx(0.75)
    assert ca["area"]["urban_village"] == pytest.approx(1600 * report.cities["a"].mapped_area_m2["urban_village"] / 1600)
    assert set(doc["census"]["national"]["national"]["within_ci95"]) >= {"overall_accuracy", "producers_accuracy.urban_village"}
    # the samples and the assess-table files reproduce the national estimate
    gdf = pyogrio.read_dataframe(out / "samples.gpkg")
    assert len(gdf) == nat["n"] and {"stratum", "map_class", "ref_class", "ref_source"} <= set(gdf.columns)
    assert (gdf["ref_source"] == "catalog").all()
    again = assess_table(out / "samples.csv", out / "strata.csv", tmp_path / "R.json", fpc=False)
    assert again.overall_accuracy.estimate == pytest.approx(nat["overall_accuracy"]["estimate"], rel=1e-9)
    assert again.area["urban_village"].se == pytest.approx(nat["area"]["urban_village"]["se"], rel=1e-6)
    # strata disagreements, the unseen-error bound and the flags of degenerate intervals (city c: no omission)
    strata = {s["stratum"]: s for s in doc["design"]["strata"]}
    assert sum(s["disagreements"] for s in strata.values()) == int((gdf["map_class"] != gdf["ref_class"]).sum())
    for s in strata.values():
        assert (s["unseen_error_bound_m2"] is None) == (s["disagreements"] > 0)
    assert any("producer's accuracy of urban_village is 1 with SE 0" in f for f in doc["cities"]["c"]["flags"])
    # honest intervals: no 95% CI anywhere in the report is a single point, even where no error was sampled
    cis = list(_cis(doc))
    assert len(cis) == 6 * (9 + 3) and all(hi > lo for lo, hi in cis), [c for c in cis if c[1] <= c[0]]
    pa_c = doc["cities"]["c"]["producers_accuracy"]["urban_village"]
    assert pa_c["estimate"] == 1.0 and pa_c["se"] == 0.0 and pa_c["ci95"][0] < 1.0 and doc["interval"] == "jeffreys"
    # the headline numbers: UV area, built-up area and UV share of built-up land, beside the map's pixel areas and
    # the census; city a by hand: true UV 1600 px, true built-up 1600 + 800 px (the formal block); mapped UV 1600 px,
    # mapped built-up 1600 + 800 px (the run's formal_residential class)
    head = doc["headline"]
    assert set(head) == {"units", "interval", "built_up", "national", "regions", "cities"}
    assert set(head["regions"]) == {"east", "west"} and set(head["cities"]) == {"a", "b", "c"}
    for domain in [head["national"], *head["regions"].values(), *head["cities"].values()]:
        assert domain["status"] == "estimated" and domain["n"] > 0
        for q in ("uv_area_m2", "built_up_area_m2", "uv_share_of_built_up"):
            e = domain[q]
            assert set(e) == {"estimate", "se", "ci95", "mapped", "census", "census_within_ci95"}
            assert e["ci95"][0] <= e["estimate"] <= e["ci95"][1] and e["census"] is not None
    a = head["cities"]["a"]
    px = report.cities["a"].mapped_area_m2["urban_village"] / 1600  # m2 of a pixel
    assert a["uv_area_m2"]["census"] == pytest.approx(1600 * px) and a["built_up_area_m2"]["census"] == pytest.approx(2400 * px)
    assert a["uv_share_of_built_up"]["census"] == pytest.approx(2 / 3) and a["uv_share_of_built_up"]["mapped"] == pytest.approx(2 / 3)
    assert a["built_up_area_m2"]["mapped"] == pytest.approx(2400 * px)
    assert a["uv_area_m2"]["estimate"] == doc["cities"]["a"]["area"]["urban_village"]["estimate"]
    assert doc["census"]["city"]["a"]["uv_share_of_built_up"] == pytest.approx(2 / 3)
    assert "uv_share_of_built_up" in doc["census"]["national"]["national"]["within_ci95"]
    nat = head["national"]["uv_share_of_built_up"]
    assert nat["census_within_ci95"] == (nat["ci95"][0] <= nat["census"] <= nat["ci95"][1])
    assert set(gdf["ref_land"]) <= {"other", "urban_village", "built_up"} and (gdf["ref_land"] == "built_up").any()
    assert ((gdf["ref_land"] == "urban_village") == (gdf["ref_class"] == "urban_village")).all()
    md = (out / "report.md").read_text()
    assert "## UV area, built-up area and UV share of built-up land" in md and "## Interval coverage" in md
    assert "| UV share of built-up land |" in md and "no omission sampled" in md.split("| west |")[-1]  # west found none
    # city d has no class map: the estimates cover 3 of 4 cities and must not be called national
    assert "## Estimates over the assessed cities: 3 of 4 cities (not national)" in md and "## National" not in md
    assert "| overall accuracy |" in md and "d: no class.tif" in md


def _cis(doc):
    """Every (lo, hi) of an estimated quantity in a report document."""
    if isinstance(doc, dict):
        if "ci95" in doc and doc.get("estimate") is not None:
            yield tuple(doc["ci95"])
        for v in doc.values():
            yield from _cis(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _cis(v)


def test_classical_wald_interval_stays_selectable(products) -> None:
    ws, catalog = products
    cfg = AssessConfig(sampling=SampleConfig(seed=1, min_rare=30, min_common=20), interval="wald")
    report = run_assess(ws, RUN, catalog, cfg)
    doc = json.loads((ws / "products" / RUN / "accuracy" / "report.json").read_text())
    assert doc["interval"] == "wald" and doc["headline"]["interval"] == "wald" and doc["national"]["interval"] == "wald"
    e = report.national.result.overall_accuracy
    assert e.ci95 == pytest.approx((e.estimate - 1.959964 * e.se, e.estimate + 1.959964 * e.se))
    degenerate = [f for f in doc["cities"]["c"]["flags"] if "producer's accuracy of urban_village is 1 with SE 0" in f]
    assert degenerate and "single point" in degenerate[0]
    assert doc["cities"]["c"]["producers_accuracy"]["urban_village"]["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="interval"):
        AssessConfig(interval="bootstrap")


def test_unreadable_class_map_is_reported_and_the_rest_completes(tmp_path: Path) -> None:
    catalog = _workspace(tmp_path)
    (tmp_path / "products" / RUN / "cities" / "b" / "class.tif").write_bytes(b"not a tiff")
    report = run_assess(tmp_path, RUN, catalog, AssessConfig(sampling=SampleConfig(min_rare=10, min_common=10)))
    assert report.status == "done" and set(report.skipped) == {"b", "d"}
    assert "class.tif" in report.skipped["d"] and "b" not in report.cities
    assert report.national.result is not None and any("skipped" in w for w in report.warnings)


def test_labelling_sheet_round_trip(tmp_path: Path) -> None:
    catalog = _workspace(tmp_path, with_reference=False)
    cfg = AssessConfig(sampling=SampleConfig(min_rare=10, min_common=10, seed=5), chip_px=32)
    pending = run_assess(tmp_path, RUN, catalog, cfg)
    out = tmp_path / "products" / RUN / "accuracy"
    assert pending.status == "awaiting_labels" and pending.national.result is None
    sheet = pd.read_csv(out / "samples_to_label.csv", dtype={"label": str}, keep_default_na=False)
    assert list(sheet.columns) == ["id", "city", "lon", "lat", "chip", "label"]  # no map class, no stratum
    assert len(sheet) == pending.design.n_total and (sheet["label"] == "").all()
    assert len(pyogrio.read_dataframe(out / "samples_to_label.gpkg")) == len(sheet)
    assert Image.open(out / sheet["chip"][0]).size == (32, 32)
    assert "awaiting labels" in json.loads((out / "report.json").read_text())["status"].replace("_", " ")
    # a person labels the points (here: from the truth polygons of the other fixture)
    truth = {"a": [TRUTH_A], "b": [shapely.box(10, 15, 30, 40), shapely.box(70, 60, 85, 75)], "c": [shapely.box(50, 5, 80, 35)]}
    labels = []
    for i, city in enumerate("abc"):
        ref = gpd.GeoDataFrame({"class": ["urban_village"] * len(truth[city])}, geometry=[_to_wgs84(g, i) for g in truth[city]], crs=4326)
        rows = sheet[sheet["city"] == city]
        labels.append(rows.assign(label=label_points(rows["lon"].to_numpy(), rows["lat"].to_numpy(), ref)))
    filled = pd.concat(labels).sort_index()
    filled.to_csv(tmp_path / "labels.csv", index=False, float_format="%.8f")
    done = run_assess(tmp_path, RUN, catalog, cfg, reference_labels=tmp_path / "labels.csv")
    assert done.status == "done" and (done.points["ref_source"] == "labels").all()
    # the same points labelled from the catalog reference give the same estimates
    ws2 = tmp_path / "with_reference"
    cat2 = _workspace(ws2)
    direct = run_assess(ws2, RUN, cat2, cfg)
    assert direct.national.result.overall_accuracy == done.national.result.overall_accuracy
    assert direct.national.result.producers_accuracy == done.national.result.producers_accuracy


def test_bad_label_files_name_the_row(tmp_path: Path) -> None:
    sample = pd.DataFrame({"id": ["p00001", "p00002", "p00003"], "city": ["a", "a", "b"],
                           "lon": [114.0, 114.1, 114.2], "lat": [22.0, 22.1, 22.2]})

    def check(text: str, match: str, **kw) -> None:
        path = tmp_path / "labels.csv"
        path.write_text(text)
        with pytest.raises(AccuracyInputError, match=match):
            read_labels(path, sample, **kw)

    good = "id,label\np00001,other\np00002,urban_village\np00003,built_up\n"
    labels = read_labels(_write(tmp_path / "ok.csv", good), sample)
    assert labels["ref_class"].tolist() == ["other", "urban_village", "other"] and labels.index.tolist() == [2, 3, 4]
    assert labels["ref_land"].tolist() == ["other", "urban_village", "built_up"]
    check("id,label\np00001,other\np00009,other\n", r"line 3: id 'p00009' is not a point of this run's sample")
    check("id,label\np00001,other\np00002,uv\np00003,other\n", r"line 3: label 'uv' of id 'p00002' is not one of")
    check("id,label\np00001,other\np00002,other\np00001,other\n", r"line 4: id 'p00001' is listed again \(first on line 2\)")
    check("id,label\np00001,other\np00002,\np00003,other\n", r"line 3: id 'p00002' has no label")
    check("id,label\np00001,other\np00003,other\n", r"1 sample point\(s\) have no row, e.g. id 'p00002' \(city a\)")
    check("id,lon,lat,label\np00001,114.5,22.0,other\n", r"line 2: id 'p00001' has lon '114.5'.*another draw",
          required=set())
    check("id,name\np00001,x\n", r"line 1: missing column\(s\) \['label'\]")
    assert len(read_labels(_write(tmp_path / "part.csv", "id,label\np00003,other\n"), sample, required={"p00003"})) == 1


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="strata="):
        SampleConfig(strata="province")
    with pytest.raises(ValueError, match="users_accuracy"):
        SampleConfig(users_accuracy={"urban_village": 0.7})
    with pytest.raises(ValueError, match="min_rare"):
        SampleConfig(min_rare=1)
    with pytest.raises(ValueError, match="buffer_m"):
        SampleConfig(buffer_m=-1)
    assert math.isfinite(AssessConfig().sampling.target_se)


def test_missing_products_and_runs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run.json"):
        run_assess(tmp_path, RUN, _catalog([]))
    catalog = _workspace(tmp_path)
    shutil.rmtree(tmp_path / "products" / RUN / "cities")
    with pytest.raises(ValueError, match="no city has a readable class map"):
        run_assess(tmp_path, RUN, catalog)
