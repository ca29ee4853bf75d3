"""Change-area accuracy (engine.accuracy.change) on small hand-made change maps with known map errors."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from PIL import Image
from pyproj import Transformer
from rasterio.transform import from_origin

from engine.accuracy import AccuracyInputError, estimates_from_counts
from engine.accuracy.change import (
    ChangeAssessConfig,
    change_code,
    change_coverage,
    run_change_assess,
)
from engine.accuracy.reference import label_land, load_reference
from engine.accuracy.sampling import MemoryLocator, draw_sample, locate, open_city_grid, plan_design, scan_city
from engine.change.codes import CHANGE_CLASSES

EPSG = 32650
SIZE = 200  # pixels of 1 m
UV = "urban_village"
# per city: region, truth UV before / after, mapped UV before / after (pixel boxes: x0, y0, x1, y1; y down)
B = shapely.box
CITIES = {
    "a": ("east",
          [B(20, 20, 80, 80), B(120, 20, 170, 60)], [B(20, 20, 80, 80), B(30, 120, 90, 170)],
          # map: the persistent village shifted 4 px, the new one cut short, a false new blob
          [B(24, 20, 84, 80), B(120, 20, 170, 60)], [B(24, 20, 84, 80), B(30, 120, 80, 170), B(150, 150, 170, 170)]),
    "b": ("east",
          [B(10, 10, 60, 60), B(100, 100, 150, 140)], [B(10, 10, 60, 60), B(150, 20, 190, 60)],
          # map: half the demolition missed (still UV after), the new village 10 px short, a missed small demolition
          [B(10, 10, 60, 60), B(100, 100, 150, 140)], [B(10, 10, 60, 60), B(100, 100, 125, 140), B(150, 30, 190, 60)]),
    "c": ("west",
          [B(50, 50, 120, 120), B(140, 10, 190, 50)], [B(50, 50, 120, 120), B(10, 140, 60, 190), B(150, 150, 170, 170)],
          # map: persistent exact (a stratum without errors), the demolition mapped, the big new village missed
          [B(50, 50, 120, 120), B(140, 10, 190, 50)], [B(50, 50, 120, 120), B(150, 150, 170, 170)]),
}
NODATA_ROWS = 8


def _origin(i: int) -> tuple[float, float]:
    return 500_000.0 + 1_000.0 * i, 3_400_000.0


def _burn(geoms: list[shapely.Geometry]) -> np.ndarray:
    """Pixels whose centre lies in a (pixel-coordinate) geometry."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    out = np.zeros((SIZE, SIZE), bool)
    for g in geoms:
        out |= shapely.contains_xy(g, xx, yy)
    return out


def _to_wgs84(geom: shapely.Geometry, i: int) -> shapely.Geometry:
    x0, y0 = _origin(i)
    t = Transformer.from_crs(EPSG, 4326, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(t.transform(x0 + xy[:, 0], y0 - xy[:, 1])))


def _truth_codes(city: str) -> np.ndarray:
    _, tb, ta, _, _ = CITIES[city]
    return change_code(_burn(tb), _burn(ta))


def _map_codes(city: str) -> np.ndarray:
    _, _, _, mb, ma = CITIES[city]
    codes = change_code(_burn(mb), _burn(ma))
    codes[-NODATA_ROWS:] = 255
    return codes


def _write_reference(path: Path, uv: list[shapely.Geometry], i: int) -> str:
    geoms = [_to_wgs84(g, i) for g in uv] + [_to_wgs84(B(0, 180, 40, 200), i)]  # plus a built-up, non-UV block
    gpd.GeoDataFrame({"class": [UV] * len(uv) + ["commercial"]}, geometry=geoms, crs=4326).to_file(path, driver="GPKG")
    return str(path)


def _products(root: Path, with_reference: bool = True) -> tuple[Path, list[dict]]:
    products = root / "products" / "change-1"
    cities = []
    for i, (city, (region, tb, ta, _, _)) in enumerate(CITIES.items()):
        transform = from_origin(*_origin(i), 1.0, 1.0)
        folder = products / "cities" / city
        folder.mkdir(parents=True, exist_ok=True)
        with rasterio.open(folder / "change.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint8",
                           crs=f"EPSG:{EPSG}", transform=transform, nodata=255, tiled=True, blockxsize=64,
                           blockysize=64) as dst:
            dst.write(_map_codes(city), 1)
        src = root / "inputs" / city
        src.mkdir(parents=True, exist_ok=True)
        imagery = []
        for k, date in enumerate(("before", "after")):
            rgb = np.random.default_rng(10 * i + k).integers(1, 255, size=(3, SIZE, SIZE), dtype=np.uint8)
            with rasterio.open(src / f"{date}.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                               crs=f"EPSG:{EPSG}", transform=transform) as dst:
                dst.write(rgb)
            imagery.append(str(src / f"{date}.tif"))
        cities.append({"city": city, "region": region, "imagery_before": imagery[0], "imagery_after": imagery[1],
                       "reference_before": _write_reference(src / "ref_before.gpkg", tb, i) if with_reference else None,
                       "reference_after": _write_reference(src / "ref_after.gpkg", ta, i) if with_reference else None})
    return products, cities


@pytest.fixture(scope="module")
def change_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    return _products(tmp_path_factory.mktemp("change"))


def _scans(products: Path, cities: list[dict], block_rows: int = 256) -> list:
    return [scan_city(open_city_grid(products / "cities" / c["city"] / "change.tif", c["city"], c["region"], CHANGE_CLASSES,
                                     strata_are_classes=True), 0.0, block_rows) for c in cities]


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# design and sample


def test_sample_in_its_strata_with_minimums_reproducible_and_independent_of_strip_height(change_run) -> None:
    products, cities = change_run
    cfg = ChangeAssessConfig(min_rare=30, min_common=60)
    scfg = cfg.sampling()
    scans = _scans(products, cities)
    design = plan_design(scans, scfg, classes=CHANGE_CLASSES, users_accuracy=cfg.users_accuracy,
                         rare_strata=("persistent_uv", "demolished_uv", "new_uv"))
    strata = design.strata.set_index("stratum")
    # region x change class: west has no mapped new_uv except the false blob, every class present here
    assert set(strata["map_stratum"]) == set(CHANGE_CLASSES)
    assert (strata["map_class"] == strata["map_stratum"]).all()
    rare = strata["map_stratum"] != "other"
    assert (strata.loc[rare, "n"] >= 30).all() and (strata.loc[~rare, "n"] >= 60).all()
    assert design.n_total >= design.n_cochran + 30 * int(rare.sum())
    # stratum areas are the mapped pixels
    for h, row in strata.iterrows():
        region, cls = h.split(":")
        px = sum(int((_map_codes(c["city"]) == CHANGE_CLASSES.index(cls)).sum()) for c in cities if c["region"] == region)
        assert row["pixels"] == px

    points = draw_sample(scans, design)
    assert len(points) == design.n_total and points["id"].is_unique
    assert (points.groupby("stratum").size().reindex(strata.index) == strata["n"]).all()
    for city, g in points.groupby("city"):
        codes = _map_codes(city)
        assert (codes[g["row"], g["col"]] == g["map_stratum"].map(CHANGE_CLASSES.index)).all()
        i = list(CITIES).index(city)
        x0, y0 = _origin(i)
        assert ((g["x"] - x0 >= g["col"]) & (g["x"] - x0 < g["col"] + 1)).all()
        assert ((y0 - g["y"] >= g["row"]) & (y0 - g["y"] < g["row"] + 1)).all()
    assert (points["map_class"] == points["map_stratum"]).all()

    thin = draw_sample(_scans(products, cities, block_rows=7), plan_design(_scans(products, cities, block_rows=7),
                       replace(scfg, block_rows=7), classes=CHANGE_CLASSES, users_accuracy=cfg.users_accuracy,
                       rare_strata=("persistent_uv", "demolished_uv", "new_uv")))
    pd.testing.assert_frame_equal(points, thin)
    # the in-memory locator (coverage) finds the same pixels as the strip reader
    pd.testing.assert_frame_equal(points, draw_sample(scans, design, MemoryLocator()))
    other = draw_sample(scans, replace(design, config=replace(scfg, seed=5)))
    assert not np.array_equal(other["x"].to_numpy(), points["x"].to_numpy())
    code = np.array([0, 3, 1, 2])
    rank = np.array([0, 0, 5, 17])
    rows, cols = locate(scans[0], code, rank)
    mrows, mcols = MemoryLocator()(scans[0], code, rank)
    assert rows.tolist() == mrows.tolist() and cols.tolist() == mcols.tolist()


# ---------------------------------------------------------------------------------------------------------------
# the assessment


def test_run_labels_estimates_census_and_reruns_byte_identical(change_run) -> None:
    products, cities = change_run
    cfg = ChangeAssessConfig()
    report = run_change_assess(products, cities, cfg)
    assert report.status == "done" and not report.skipped
    pts = report.points
    assert (pts["ref_source"] == "reference").all()

    # every point's reference change class is the truth raster's at its pixel (boxes on whole pixels)
    for city, g in pts.groupby("city"):
        truth = _truth_codes(city)
        assert (g["ref_class"].map(CHANGE_CLASSES.index) == truth[g["row"], g["col"]]).all()

    # census = the rasterised truth crossed with the map, per region and nationally
    scans = {s.grid.city: s for s in _scans(products, cities)}
    conf = {}
    for c in cities:
        m, t = _map_codes(c["city"]), _truth_codes(c["city"])
        valid = m != 255
        cm = np.zeros((4, 4), np.int64)
        np.add.at(cm, (m[valid], t[valid]), 1)
        conf[c["city"]] = cm
    area = {c: conf[c] * scans[c].grid.pixel_area_m2 for c in conf}  # each city's pixel area (EPSG:6933)
    np.testing.assert_allclose(report.census["region"]["east"].confusion_m2, area["a"] + area["b"], rtol=1e-12)
    nat = conf["a"] + conf["b"] + conf["c"]
    assert report.census["national"]["national"].pixels == int(nat.sum())
    truth_area = dict(zip(CHANGE_CLASSES, sum(area.values()).sum(axis=0).tolist()))
    doc = report.to_json()
    assert doc["census"]["national"]["national"]["area"] == pytest.approx(truth_area)
    assert doc["census"]["national"]["national"]["users_accuracy"]["persistent_uv"] == pytest.approx(
        nat[1, 1] / nat[1].sum())
    # the known map errors are there: omitted new village in west's other stratum, partial demolition missed
    assert nat[0, 3] > 0 and nat[1, 2] > 0 and nat[3, 0] > 0

    # area per class by hand: sum_h A_h n_hk / n_h
    sizes = report.design.strata.set_index("stratum")["area_m2"]
    share = pd.crosstab(pts["stratum"], pts["ref_class"], normalize="index").reindex(columns=CHANGE_CLASSES, fill_value=0)
    by_hand = (share.mul(sizes.reindex(share.index), axis=0)).sum(axis=0)
    for k in CHANGE_CLASSES:
        assert report.national.result.area[k].estimate == pytest.approx(by_hand[k], rel=1e-12)
    east_h = [h for h in sizes.index if h.startswith("east:")]
    east_hand = share.loc[east_h].mul(sizes[east_h], axis=0).sum(axis=0)
    assert report.regions["east"].result.area["new_uv"].estimate == pytest.approx(east_hand["new_uv"], rel=1e-12)

    # no interval of zero width, also where a stratum sampled no error (west's persistent stratum is exact)
    strata = {s["stratum"]: s for s in doc["design"]["strata"]}
    assert strata["west:persistent_uv"]["disagreements"] == 0
    ua = report.regions["west"].result.users_accuracy["persistent_uv"]
    assert ua.estimate == 1.0 and ua.se == 0.0 and ua.ci95[0] < 1.0
    for d in [report.national, *report.regions.values()]:
        r = d.result
        for e in [r.overall_accuracy, *r.users_accuracy.values(), *r.producers_accuracy.values(), *r.area.values()]:
            assert e.ci95[1] > e.ci95[0], (d.name, e)
    # most census values inside their CI (a single draw; the coverage test measures the rate)
    within = doc["census"]["national"]["national"]["within_ci95"]
    assert sum(bool(v) for v in within.values()) >= len(within) - 2, within

    out = products / "accuracy"
    for name in ("report.json", "report.md", "samples.gpkg", "samples.csv", "strata.csv"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "demolished_uv" in md and "Region west" in md and "(in CI)" in md
    first = _digests(out)
    again = run_change_assess(products, cities, cfg)
    assert again.status == "done" and _digests(out) == first


def test_coverage_on_the_synthetic_case(change_run) -> None:
    products, cities = change_run
    cov = change_coverage(products, cities, ChangeAssessConfig(), replicates=100)
    assert cov["replicates"] == 100 and cov["zero_width_intervals"] == 0
    for k in CHANGE_CLASSES:
        area = cov["national"]["area"][k]
        assert area["estimated"] == 100
        assert area["coverage"] >= 0.85, (k, area)
        assert abs(area["relative_bias"]) < 0.1, (k, area)
        assert area["mean_ci_width"] > 0
        assert cov["n_map"][k] >= 50
    assert set(cov["regions"]) == {"east", "west"}
    print({k: cov["national"]["area"][k]["coverage"] for k in CHANGE_CLASSES}, cov["seconds"])


def test_hand_computed_area_on_a_small_cube() -> None:
    """Two strata: mapped other (900 m2, 10 points: 8 other, 2 new) and mapped new (100 m2, 5 points: 4 new, 1 other).
    Area of new = 900 x 2/10 + 100 x 4/5 = 260; of other = 900 x 8/10 + 100 x 1/5 = 740."""
    cube = np.zeros((2, 4, 4), np.int64)
    cube[0, 0, 0], cube[0, 0, 3] = 8, 2
    cube[1, 3, 3], cube[1, 3, 0] = 4, 1
    r = estimates_from_counts(cube, {"o": 900.0, "n": 100.0}, CHANGE_CLASSES, fpc=False)
    assert r.area["new_uv"].estimate == pytest.approx(260.0)
    assert r.area["other"].estimate == pytest.approx(740.0)
    assert r.area["persistent_uv"].estimate == 0.0
    # SE of new's area: sqrt(900^2 s2_o / 10 + 100^2 s2_n / 5), s2 = p(1-p) n/(n-1)
    se = math.sqrt(900**2 * 0.2 * 0.8 * 10 / 9 / 10 + 100**2 * 0.8 * 0.2 * 5 / 4 / 5)
    assert r.area["new_uv"].se == pytest.approx(se)
    assert r.users_accuracy["new_uv"].estimate == pytest.approx(0.8)
    assert r.producers_accuracy["new_uv"].estimate == pytest.approx(80 / 260)
    for e in r.area.values():  # persistent/demolished: no point anywhere, still an interval of width > 0
        assert e.ci95[1] > e.ci95[0]


# ---------------------------------------------------------------------------------------------------------------
# the two-date labelling sheet


def test_sheet_side_by_side_awaiting_labels_and_filled_sheet_round_trips(tmp_path, change_run) -> None:
    products, cities = _products(tmp_path, with_reference=False)
    cfg = ChangeAssessConfig(min_rare=8, min_common=12, n_total=1, chip_px=32)  # the minimums only: 72 points
    report = run_change_assess(products, cities, cfg)
    assert report.status == "awaiting_labels"
    out = products / "accuracy"
    sheet = pd.read_csv(out / "samples_to_label.csv", dtype={"label": str}, keep_default_na=False)
    assert list(sheet.columns) == ["id", "city", "lon", "lat", "chip", "label"]
    assert len(sheet) == report.design.n_total and (sheet["label"] == "").all()
    assert "map_class" not in sheet.columns and "stratum" not in sheet.columns
    with Image.open(out / sheet["chip"].iloc[0]) as img:
        w, h = img.size
    assert h == 32 and w == 2 * 32 + 4  # before | gap | after
    doc = (out / "report.json").read_text()
    assert '"status": "awaiting_labels"' in doc
    assert "before image on the left" in (out / "report.md").read_text()
    assert report.national.status == "awaiting_labels" and report.national.result is None

    # fill the sheet from the references of the fixture's run (the same polygons)
    _, with_ref = change_run
    refs = {c["city"]: (load_reference(c["reference_before"]), load_reference(c["reference_after"])) for c in with_ref}
    labels = []
    for city, g in sheet.groupby("city", sort=False):
        b = label_land(g["lon"].to_numpy(), g["lat"].to_numpy(), refs[city][0]) == UV
        a = label_land(g["lon"].to_numpy(), g["lat"].to_numpy(), refs[city][1]) == UV
        labels.append(pd.Series(np.array(CHANGE_CLASSES)[change_code(b, a)], index=g.index))
    sheet["label"] = pd.concat(labels)
    bad = sheet.copy()
    bad.loc[0, "label"] = UV
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(AccuracyInputError, match="is not one of"):
        run_change_assess(products, cities, cfg, reference_labels=tmp_path / "bad.csv")
    sheet.to_csv(tmp_path / "filled.csv", index=False, float_format="%.8f")
    done = run_change_assess(products, cities, cfg, reference_labels=tmp_path / "filled.csv")
    assert done.status == "done" and (done.points["ref_source"] == "labels").all()
    lookup = dict(zip(sheet["id"], sheet["label"]))
    assert (done.points["ref_class"] == done.points["id"].map(lookup)).all()
    # the labels are the truth at each point's pixel
    for city, g in done.points.groupby("city"):
        assert (g["ref_class"].map(CHANGE_CLASSES.index) == _truth_codes(city)[g["row"], g["col"]]).all()
    assert done.census is None and done.national.result is not None
    assert (out / "samples.csv").is_file()


def test_cities_without_references_go_to_the_sheet_the_others_are_labelled(tmp_path) -> None:
    products, cities = _products(tmp_path)
    cities[2] = {**cities[2], "reference_after": None}  # c: one date's reference only -> the sheet
    report = run_change_assess(products, cities, ChangeAssessConfig(min_rare=6, min_common=10, n_total=1, chip_px=16))
    assert report.status == "awaiting_labels"
    pts = report.points
    assert pts.loc[pts["city"] == "c", "ref_class"].isna().all()
    assert (pts.loc[pts["city"] != "c", "ref_source"] == "reference").all()
    sheet = pd.read_csv(products / "accuracy" / "samples_to_label.csv")
    assert set(sheet["city"]) == {"c"} and len(sheet) == int((pts["city"] == "c").sum())
    # the census needs both references: east has one, west (c) and so the nation have none
    assert set(report.census["region"]) == {"east"} and report.census["national"] == {}
    with pytest.raises(ValueError, match="both references"):
        change_coverage(products, cities, replicates=2)


def test_split_errors_prior_gives_the_binomial_jeffreys_interval_for_four_classes() -> None:
    from scipy.stats import beta

    cube = np.zeros((4, 4, 4), np.int64)
    for k in range(4):
        cube[k, k, k] = 40
    cube[2, 2, 0], cube[2, 2, 3] = 3, 2  # demolished stratum: 40 of 45 correct
    sizes = {"o": 800.0, "p": 100.0, "d": 50.0, "n": 50.0}
    split = estimates_from_counts(cube, sizes, CHANGE_CLASSES, fpc=False, split_errors=True)
    assert split.users_accuracy["demolished_uv"].ci95 == pytest.approx(tuple(beta.ppf([0.025, 0.975], 40.5, 5.5)), abs=0.006)
    plain = estimates_from_counts(cube, sizes, CHANGE_CLASSES, fpc=False)
    assert plain.users_accuracy["demolished_uv"].ci95 == pytest.approx(tuple(beta.ppf([0.025, 0.975], 40.5, 6.5)), abs=0.006)
    assert split.users_accuracy["demolished_uv"].estimate == plain.users_accuracy["demolished_uv"].estimate == 40 / 45
    two = np.array([[[30, 2], [0, 0]], [[0, 0], [1, 20]]])
    assert estimates_from_counts(two, {"a": 9.0, "b": 1.0}, ["o", "u"], fpc=False, split_errors=True) == \
        estimates_from_counts(two, {"a": 9.0, "b": 1.0}, ["o", "u"], fpc=False)  # two classes: the same prior
