"""`map --population-model`: tile values spread over the map, per 100 m cell, per UV polygon, per city and region."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from engine.products.population import allocate_city, fit_densities, group_lut, summary_rows


def _tiles(n: int, size: int) -> pa.Table:
    """An ``n x n`` grid of ``size`` px tiles without overlap (window == core)."""
    rows = []
    for r in range(n):
        for c in range(n):
            rows.append({"tile_id": f"t{r}_{c}", "window_col_off": c * size, "window_row_off": r * size, "window_width": size,
                         "window_height": size, "core_col_off": c * size, "core_row_off": r * size, "core_width": size,
                         "core_height": size})
    return pa.Table.from_pylist(rows)


def _class_raster(path, classes: np.ndarray, gsd: float = 1.0):
    with rasterio.open(path, "w", driver="GTiff", width=classes.shape[1], height=classes.shape[0], count=1, dtype="uint8",
                       crs="EPSG:32650", transform=from_origin(500000, 3000000, gsd, gsd), nodata=255) as dst:
        dst.write(classes, 1)


def test_every_resident_lands_once_and_villages_get_their_pixels(tmp_path):
    classes = np.full((200, 200), 2, np.uint8)  # other built-up
    classes[20:60, 20:60] = 1  # a village across four tiles
    classes[150:, 150:] = 0  # open land
    tif = tmp_path / "class.tif"
    _class_raster(tif, classes)
    tiles = _tiles(4, 50)
    values = {t: 100.0 + 10 * i for i, t in enumerate(tiles["tile_id"].to_pylist())}
    values.pop("t3_0")  # a failed tile
    village = shapely.box(500020, 3000000 - 60, 500060, 3000000 - 20)
    lut = group_lut(["other", "urban_village", "built_up"], ["urban_village", "built_up"])
    out = allocate_city("c", tif, tiles, values, lut, np.array([0.03, 0.01, 0.0]), [("c-1", village)], tmp_path / "pop.tif", "v1")
    assert math.isclose(out.population, sum(values.values()), rel_tol=1e-9)  # no overlap: every value lands, once
    assert out.tiles_ok == 15 and out.tiles_failed == 1
    # tile t0_0 (100 residents) holds 30x30 village px at 3x the weight of its 2500 - 900 built-up px
    expected = (100.0 * 900 * 3 / (900 * 3 + 1600) + 110.0 * 300 * 3 / (300 * 3 + 2200) + 140.0 * 300 * 3 / (300 * 3 + 2200)
                + 150.0 * 100 * 3 / (100 * 3 + 2400))
    assert math.isclose(out.uv["c-1"], expected, rel_tol=1e-6) and out.uv_population == out.uv["c-1"]
    with rasterio.open(out.cog) as src:
        cells = src.read(1, masked=True)
        assert src.res == (100.0, 100.0) and cells.shape == (2, 2) and src.tags()["units"] == "residents per cell"
        assert cells.mask[1, 0]  # the failed tile's cell has no value, never a made-up zero
        assert math.isclose(float(cells.sum()), sum(v for t, v in values.items() if t not in ("t2_0", "t2_1", "t3_1")), rel_tol=1e-5)


def test_densities_follow_the_values_and_never_drop_them():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 400, (60, 3)).astype(float)
    values = counts @ np.array([0.05, 0.015, 0.0])
    assert np.allclose(fit_densities(counts, values, 1.0), [0.05, 0.015, 0.0], atol=1e-9)
    flat = fit_densities(counts[:, [2, 2, 2]] * [0, 0, 1], values, 1.0)  # nothing built: spread evenly, not lost
    assert flat[0] == flat[1] > 0


def _fake_results():
    from engine.products.population import CityPopulation

    return {c: CityPopulation(c, population=p, uv_population=u, tiles_ok=10) for c, p, u in
            (("a", 1000.0, 200.0), ("b", 3000.0, 300.0), ("c", 500.0, 0.0))}


def test_city_region_and_national_rows_add_up_with_intervals_around_them():
    doc = {"version": 1, "target": "population", "cities": [
        {"city": f"h{i}", "tiles": 20, "truth": t, "pred": p, "uv_tiles": 3, "uv_truth": ut, "uv_pred": up}
        for i, (t, p, ut, up) in enumerate(((900, 1000, 120, 100), (1100, 1000, 90, 100), (1000, 950, 110, 100)))]}
    rows = summary_rows(_fake_results(), {"a": "north", "b": "north", "c": "south"}, np.array([0.03, 0.01, 0.0]), doc, "v1")
    by = {(r["level"], r["name"]): r for r in rows}
    assert by[("region", "north")]["population"] == 4000.0 and by[("national", "national")]["uv_population"] == 500.0
    assert by[("region", "north")]["cities"] == 2 and by[("national", "national")]["uv_share"] == pytest.approx(500 / 4500)
    for r in rows:
        assert r["population_lo"] < r["population"] < r["population_hi"], r
        assert r["held_out_cities"] == 3 and "held-out city ratios" in r["interval"]
    city_c = by[("city", "c")]
    assert city_c["uv_population"] == 0 and city_c["uv_population_lo"] == 0 == city_c["uv_population_hi"]
    # a sum over cities is not narrowed as if their errors were independent (they are not: bench/population_coverage.py)
    one, nation = by[("city", "a")], by[("national", "national")]
    assert nation["population_hi"] / nation["population"] == pytest.approx(one["population_hi"] / one["population"])
    none = summary_rows(_fake_results(), {}, np.array([0.03, 0.01, 0.0]), None, "v1")
    assert all(math.isnan(r["population_lo"]) and r["interval"].startswith("none:") for r in none)


def test_a_segmentation_model_as_population_model_is_one_line(random_model, population_model, tmp_path):
    from engine.model_bundle import BundleError
    from engine.pipelines.population import population_bundle

    with pytest.raises(BundleError, match=r"is a segmentation model .*finetune --task population"):
        population_bundle(str(random_model))
    co2 = tmp_path / "co2"
    shutil.copytree(population_model, co2)
    train = json.loads((co2 / "train_config.json").read_text())
    (co2 / "train_config.json").write_text(json.dumps({**train, "target": "co2"}))
    with pytest.raises(BundleError, match=r"is a co2 regression model \(finetune --task co2\)"):
        population_bundle(str(co2))


@pytest.mark.slow
def test_map_with_a_population_model_writes_listed_products_and_reruns_the_same(prepared_demo, population_model, tmp_path):
    from engine.pipelines.map import MapConfig, run_map
    from engine.product_layout import POPULATION_CSV, UV_PARQUET, UV_POPULATION_PARQUET

    src, catalog = prepared_demo
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    cfg = MapConfig(run="pop", model_dir="reference", tile_size_px=128, population_model=str(population_model), assess=False)
    report = run_map(catalog, ws, cfg)
    assert not isinstance(report.population, str), report.population
    products = ws / "products" / "pop"
    rows = list(csv.DictReader((products / POPULATION_CSV).open()))
    cities = [r for r in rows if r["level"] == "city"]
    assert {r["name"] for r in cities} == set(catalog["city"].to_pylist())
    national = next(r for r in rows if r["level"] == "national")
    assert float(national["population"]) == pytest.approx(sum(float(r["population"]) for r in cities))
    villages = pq.read_table(products / UV_POPULATION_PARQUET)
    assert villages.num_rows == pq.read_table(products / UV_PARQUET).num_rows > 0
    assert float(national["uv_population"]) == pytest.approx(sum(villages["population"].to_pylist()))
    assert 0 < float(national["uv_share"]) < 1
    for city in cities:  # the COG holds the city's residents (no failed tile here)
        with rasterio.open(products / "cities" / city["name"] / "population_100m.tif") as cog:
            assert float(cog.read(1, masked=True).sum()) == pytest.approx(float(city["population"]), rel=1e-4)
    collection = json.loads((products / "stac" / "collection.json").read_text())
    assert {"population", "uv_population"} <= set(collection["assets"])
    item = json.loads((products / "stac" / cities[0]["name"] / f"{cities[0]['name']}.json").read_text())
    assert "population" in item["assets"]
    # the demo's one val city gives no interval: said, never a zero-width one
    assert national["population_lo"] == "" and "fewer than 2 held-out cities" in national["interval"]
    before = (products / POPULATION_CSV).read_bytes()
    again = run_map(catalog, ws, cfg)
    assert again.population.inference.predicted == 0 and again.population.inference.skipped > 0  # resumed, nothing redone
    assert (products / POPULATION_CSV).read_bytes() == before
