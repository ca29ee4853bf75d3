"""`geolink-engine change` on two hand-made map runs: the products, the refusals, a city at one date only, reruns.

Two runs (vintages 2018 and 2024) of three cities with 120x120 class COGs in UTM: city ``a`` loses one village and
gains one, ``b`` is the same villages shifted by 2 px (misregistration only), ``c`` is mapped in 2018 only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from engine.change.codes import DEMOLISHED_UV, NEW_UV
from engine.mapping.store import RunManifest
from engine.pipelines.change import ChangeConfig, run_change
from engine.product_layout import read_run
from engine.products.stac import validate_stac
from engine.schema import CATALOG_SCHEMA

CRS = "EPSG:32650"
PX = 1.0
SIZE = 120
ORIGIN = {"a": (500_000.0, 3_400_000.0), "b": (510_000.0, 3_400_000.0), "c": (520_000.0, 3_400_000.0)}
BLOBS = {  # city -> date -> villages as (row0, row1, col0, col1)
    "a": {"2018": [(10, 40, 10, 40), (60, 100, 60, 100)], "2024": [(60, 100, 60, 100), (10, 40, 70, 110)]},
    "b": {"2018": [(20, 60, 20, 60)], "2024": [(22, 62, 22, 62)]},
    "c": {"2018": [(20, 50, 20, 50)]},
}


def _write_run(ws: Path, run: str, vintage: str, blobs: dict = BLOBS) -> None:
    products = ws / "products" / run
    rows, polys = [], []
    for city, dates in blobs.items():
        if vintage not in dates:
            continue
        x0, y0 = ORIGIN[city]
        cls = np.zeros((SIZE, SIZE), np.uint8)
        for k, (r0, r1, c0, c1) in enumerate(dates[vintage], start=1):
            cls[r0:r1, c0:c1] = 1
            box = shapely.box(x0 + c0 * PX, y0 - r1 * PX, x0 + c1 * PX, y0 - r0 * PX)
            polys.append({"uv_id": f"{city}-{k}", "city": city, "region": "south" if city != "b" else "north",
                          "geometry": gpd.GeoSeries([box], crs=CRS).to_crs(4326).iloc[0]})
        path = products / "cities" / city / "class.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", driver="COG", width=SIZE, height=SIZE, count=1, dtype="uint8", crs=CRS,
                           transform=from_origin(x0, y0, PX, PX), nodata=255) as dst:
            dst.write(cls[None])
        rows.append(f"{city},{'north' if city == 'b' else 'south'},1,1,1,1,{len(dates[vintage])},4,0")
    gpd.GeoDataFrame(polys, crs=4326).to_parquet(products / "urban_villages.parquet")
    (products / "city_stats.csv").write_text("city,region,uv_area_m2,built_up_area_m2,uv_share,buildings,polygons,tiles_ok,tiles_failed\n"
                                             + "\n".join(rows) + "\n")
    manifest = RunManifest(run=run, model_dir="models/m", model_version="m-1", classes=("other", "urban_village"),
                           mode="fused", tile_size_px=224, overlap_px=32, vintage=vintage, datetime="2024-06-01T00:00:00Z")
    (products / "run.json").write_text(manifest.to_json())


def _catalog() -> pa.Table:
    rows = [{"city": c, "region": "south", "imagery": "x.tif", "osm": "x.parquet", "vintage": v} for c in BLOBS for v in BLOBS[c]]
    return pa.Table.from_pylist([{n: r.get(n) for n in CATALOG_SCHEMA.names} for r in rows], schema=CATALOG_SCHEMA)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("change")
    _write_run(ws, "y2018", "2018")
    _write_run(ws, "y2024", "2024")
    return ws


def test_change_products_and_a_city_at_one_date(runs: Path) -> None:
    report = run_change(runs, "y2018", "y2024", _catalog(), cfg=ChangeConfig(assess=False, workers=2))
    out = runs / "products" / "y2018-to-y2024"
    assert report.run == "y2018-to-y2024" and report.vintages == ("2018", "2024")
    status = {c.city: c.status for c in report.cities}
    assert status == {"a": "done", "b": "done", "c": "missing"}
    assert "vintage is missing" in next(c.error for c in report.cities if c.city == "c")
    with rasterio.open(out / "cities" / "a" / "change.tif") as src:
        codes = src.read(1)
    assert (codes[15:35, 15:35] == DEMOLISHED_UV).all() and (codes[15:35, 75:105] == NEW_UV).all()
    with rasterio.open(out / "cities" / "b" / "change.tif") as src:  # a 2 px shift alone is no change
        assert not np.isin(src.read(1), [DEMOLISHED_UV, NEW_UV]).any()
    fates = gpd.read_parquet(out / "change_polygons.parquet")
    got = {(r.city, r.date, r.uv_id): r.fate for r in fates.itertuples()}
    assert got[("a", "before", "a-1")] == "demolished" and got[("a", "after", "a-2")] == "new"
    assert got[("b", "before", "b-1")] == "persisted"
    manifest = read_run(out)
    assert manifest["kind"] == "change" and manifest["vintages"] == ["2018", "2024"]
    assert validate_stac(out) > 0 and (out / "index.html").is_file() and (out / "cities" / "a" / "change.png").is_file()
    national = next(r for r in report.stats if r["level"] == "national")
    # ground areas (EPSG:6933) of 1 m UTM pixels: within the zone's scale factor of the nominal 900 and 1200 m2
    assert national["demolished_uv_m2"] == pytest.approx(900.0, rel=5e-3) and national["new_uv_m2"] == pytest.approx(1200.0, rel=5e-3)


def test_rerun_writes_the_same_bytes(runs: Path) -> None:
    run_change(runs, "y2018", "y2024", _catalog(), into="again", cfg=ChangeConfig(assess=False))
    out = runs / "products" / "again"
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    run_change(runs, "y2018", "y2024", _catalog(), into="again", cfg=ChangeConfig(assess=False))
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == first


@pytest.mark.parametrize("edit, message", [
    ({"model_version": "m-2"}, "different models"),
    ({"tile_size_px": 256}, "different tile grids"),
    ({"vintage": "2018"}, "both map vintage 2018"),
    ({"vintage": None}, "records no vintage"),
    ({"vintage": "2010"}, "later than --after"),
])
def test_runs_that_cannot_be_compared_are_refused(runs: Path, edit: dict, message: str) -> None:
    bad = runs / "products" / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(runs / "products" / "y2024", bad)
    doc = json.loads((bad / "run.json").read_text())
    doc.update(run="bad", **edit)
    (bad / "run.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        run_change(runs, "y2018", "bad", _catalog(), cfg=ChangeConfig(assess=False))


def test_runs_sharing_no_city_are_refused(tmp_path: Path) -> None:
    _write_run(tmp_path, "old", "2018", {"a": BLOBS["a"]})
    _write_run(tmp_path, "new", "2024", {"b": BLOBS["b"]})
    with pytest.raises(ValueError, match="share no mapped city"):
        run_change(tmp_path, "old", "new", _catalog(), cfg=ChangeConfig(assess=False))


def test_change_accuracy_from_both_dates_references(runs: Path, tmp_path: Path) -> None:
    """With each date's reference polygons in the catalog, the change map is assessed: here the map is the truth
    itself (up to the 2 px shift of city b), so every class's interval holds its census area."""
    rows = []
    for city, dates in BLOBS.items():
        x0, y0 = ORIGIN[city]
        for vintage, blobs in dates.items():
            boxes = [shapely.box(x0 + c0 * PX, y0 - r1 * PX, x0 + c1 * PX, y0 - r0 * PX) for r0, r1, c0, c1 in blobs]
            path = tmp_path / f"{city}-{vintage}.parquet"
            gpd.GeoDataFrame({"class": ["urban_village"] * len(boxes)}, geometry=boxes, crs=CRS).to_crs(4326).to_parquet(path)
            rows.append({"city": city, "region": "north" if city == "b" else "south", "imagery": "x.tif", "osm": "x.parquet",
                         "vintage": vintage, "reference": str(path)})
    catalog = pa.Table.from_pylist([{n: r.get(n) for n in CATALOG_SCHEMA.names} for r in rows], schema=CATALOG_SCHEMA)
    report = run_change(runs, "y2018", "y2024", catalog, into="assessed", cfg=ChangeConfig(min_rare=20, n_total=200))
    assessment = report.assessment
    assert not isinstance(assessment, str), assessment
    assert assessment.status == "done" and len(assessment.points) >= 200
    result = assessment.national.result
    census = assessment.census["national"]["national"].values()["area"]
    for name in ("demolished_uv", "new_uv"):
        lo, hi = result.area[name].ci95
        assert lo <= census[name] <= hi and hi > lo, (name, lo, census[name], hi)
    out = runs / "products" / "assessed"
    assert (out / "accuracy" / "report.json").is_file() and "Accuracy of the change map" in (out / "index.html").read_text()
    assert validate_stac(out) > 0
