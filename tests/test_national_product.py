"""What the national product says (issue 18), checked on one reference run of the prepared demo cities against the
synthetic cities' census truth: UV share of built-up land, the built-up definition, and what a binary model says."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from engine.mapping.store import RunManifest
from engine.pipelines.map import REFERENCE_MODEL, MapConfig, run_map
from engine.schema import BUILT_UP_CLASSES, CLASS_ID, LABEL_SETS, built_up_definition, label_lookup
from tests.conftest import PREPARED_TILE_PX


@pytest.fixture(scope="module")
def reference_run(prepared_demo, tmp_path_factory):
    """``map --model reference`` (a perfect model) over the prepared demo cities, assessed."""
    src, catalog = prepared_demo
    ws = tmp_path_factory.mktemp("national") / "ws"
    shutil.copytree(src, ws)
    report = run_map(catalog, ws, MapConfig(run="ref", model_dir=REFERENCE_MODEL, tile_size_px=PREPARED_TILE_PX))
    assert not report.failed, report.failed
    return ws, catalog, report


def _truth_share(truth_tif: str) -> float:
    with rasterio.open(truth_tif) as src:
        truth = src.read(1)
    uv = np.count_nonzero(truth == CLASS_ID["urban_village"])
    built_up = np.count_nonzero(np.isin(truth, [CLASS_ID[c] for c in BUILT_UP_CLASSES]))
    return uv / built_up


def test_uv_share_of_every_city_equals_the_census_within_one_percent(reference_run):
    ws, catalog, report = reference_run
    stats = {r["city"]: r for r in csv.DictReader((ws / "products" / "ref" / "city_stats.csv").open())}
    assert set(stats) == set(catalog["city"].to_pylist())
    for row in catalog.to_pylist():
        share = float(stats[row["city"]]["uv_share"])
        truth = _truth_share(str(Path(row["imagery"]).with_name("truth.tif")))  # the generator's land-use raster
        assert float(stats[row["city"]]["built_up_area_m2"]) > 0
        assert share == pytest.approx(truth, rel=0.01), (row["city"], share, truth)
    assert all(c.uv_share is not None for c in report.cities)


def test_the_built_up_definition_travels_with_the_products(reference_run):
    ws, _, report = reference_run
    run = json.loads((ws / "products" / "ref" / "run.json").read_text())
    assert run["built_up"]["known"] and run["built_up"]["classes"] == ["urban_village", "built_up"]
    collection = json.loads((ws / "products" / "ref" / "stac" / "collection.json").read_text())
    assert collection["geolink:built_up"] == run["built_up"]
    assert not any("built-up" in w for w in report.warnings)


def test_a_binary_model_says_why_it_has_no_share():
    binary = built_up_definition(LABEL_SETS["binary"])
    assert not binary["known"] and "--classes builtup" in binary["note"]
    assert built_up_definition(LABEL_SETS["landuse"])["known"] and built_up_definition(LABEL_SETS["builtup"])["known"]
    lookup = label_lookup(LABEL_SETS["builtup"])
    assert {lookup[c] for c in BUILT_UP_CLASSES if c != "urban_village"} == {2} and lookup["urban_village"] == 1
    assert "green" not in lookup and "road" not in lookup  # not built-up: `other`
    # a run.json written before the definition existed reads, and derives it
    old = RunManifest.from_json(json.dumps({"run": "r", "model_dir": "m", "model_version": "m-1", "classes": ["other", "urban_village"],
                                            "mode": "fused", "tile_size_px": 224, "overlap_px": 32, "datetime": ""}))
    assert old.built_up == binary


def test_villages_carry_building_morphology_and_cities_their_building_source(reference_run):
    import pyarrow.parquet as pq

    from engine.schema import MORPHOLOGY_COLUMNS

    ws, catalog, _ = reference_run
    products = ws / "products" / "ref"
    villages = pq.read_table(products / "urban_villages.parquet")
    assert set(MORPHOLOGY_COLUMNS) <= set(villages.column_names) and villages.num_rows > 0
    density = villages["density_per_ha"].to_numpy()
    assert (villages["n_buildings"].to_numpy() > 0).any() and np.nanmax(density) > 10
    stats = {r["city"]: r for r in csv.DictReader((products / "city_stats.csv").open())}
    for row in catalog.to_pylist():
        assert stats[row["city"]]["buildings_source"] == ("catalog" if row.get("buildings") else "osm"), stats[row["city"]]
        assert int(stats[row["city"]]["buildings"]) > 0 and not stats[row["city"]]["buildings_note"]


def test_morphology_contrasts_villages_with_formal_housing(reference_run):
    ws, _, _ = reference_run
    rows = list(csv.DictReader((ws / "products" / "ref" / "morphology.csv").open()))
    national = {r["group"]: r for r in rows if r["level"] == "national"}
    assert {"uv", "built_up", "formal_residential"} <= set(national)
    uv, formal = national["uv"], national["formal_residential"]
    assert float(uv["density_per_ha"]) > 3 * float(formal["density_per_ha"])  # dense ...
    assert float(uv["height_mean_m"]) < float(formal["height_mean_m"])  # ... and low-rise, as the generator built them
    assert (ws / "products" / "ref" / "morphology.png").is_file()


def test_regions_table_recovers_the_generators_regional_ordering(reference_run):
    ws, catalog, _ = reference_run
    products = ws / "products" / "ref"
    rows = list(csv.DictReader((products / "regions.csv").open()))
    assert [r["level"] for r in rows][-1] == "national" and (products / "regions.png").is_file()
    mapped = {r["region"]: float(r["uv_share"]) for r in rows if r["level"] == "region"}
    truth: dict[str, list[int]] = {}
    for row in catalog.to_pylist():
        with rasterio.open(Path(row["imagery"]).with_name("truth.tif")) as src:
            t = src.read(1)
        counts = truth.setdefault(row["region"], [0, 0])
        counts[0] += np.count_nonzero(t == CLASS_ID["urban_village"])
        counts[1] += np.count_nonzero(np.isin(t, [CLASS_ID[c] for c in BUILT_UP_CLASSES]))
    truth_share = {region: uv / built for region, (uv, built) in truth.items()}
    assert sorted(mapped, key=mapped.get) == sorted(truth_share, key=truth_share.get)
    for region, share in mapped.items():
        assert share == pytest.approx(truth_share[region], rel=0.01)
    national = rows[-1]
    assert national["uv_area_m2_estimate"] and float(national["uv_area_m2_ci95_low"]) < float(national["uv_area_m2_ci95_high"])
    collection = json.loads((products / "stac" / "collection.json").read_text())
    assert {"regions", "morphology", "regions_chart", "morphology_chart"} <= set(collection["assets"])
    page = (products / "index.html").read_text()
    assert "regions.png" in page and "morphology.png" in page


def test_bad_buildings_are_a_note_on_their_city_and_the_rest_completes(reference_run, tmp_path):
    import pyarrow as pa

    from engine.pipelines.stitch import stitch_products

    src, catalog, _ = reference_run
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    no_crs = tmp_path / "no_crs.geojson"
    no_crs.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"height_m": "tall"}, '
                      '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}]}')
    bad_city = catalog["city"][0].as_py()
    column = [str(no_crs) if c == bad_city else b for c, b in zip(catalog["city"].to_pylist(), catalog["buildings"].to_pylist())]
    report = stitch_products(ws, "ref", catalog.set_column(catalog.schema.get_field_index("buildings"), "buildings", pa.array(column)))
    assert all(c.status == "ok" for c in report), report
    stats = {r["city"]: r for r in csv.DictReader((ws / "products" / "ref" / "city_stats.csv").open())}
    note = stats[bad_city]["buildings_note"]
    assert bad_city in note and "no_crs.geojson" in note and not stats[bad_city]["buildings_source"]
    assert all(stats[c]["buildings_source"] == "catalog" and not stats[c]["buildings_note"] for c in stats if c != bad_city)


def test_morphology_of_a_complete_buildings_file_equals_the_generators_truth(ray_session, tmp_path):
    """Hand-checkable cities whose buildings file holds every drawn building where it was drawn (completeness 1, no
    jitter): with the perfect model, their villages' metrics equal the generator's own counts within 1%. (Formal
    housing's zones come from the reference polygons, not the generator's blocks: compared in the contrast test.)"""
    from engine.catalog import load_catalog
    from engine.synth.config import SynthConfig
    from engine.synth.demo import write_demo

    ws = tmp_path / "ws"
    cfg = SynthConfig(size_km=0.6, buildings_completeness=(1.0, 1.0), buildings_jitter_m=(0.0, 0.0))
    catalog = load_catalog(write_demo(ws, n_cities=3, cfg=cfg, seed=11, workers=1))
    report = run_map(catalog, ws, MapConfig(run="census", model_dir=REFERENCE_MODEL, tile_size_px=PREPARED_TILE_PX, assess=False))
    assert not report.failed
    rows = {(r["city"], r["group"]): r for r in csv.DictReader((ws / "products" / "census" / "morphology.csv").open())
            if r["level"] == "city"}
    checked = 0
    for city in catalog["city"].to_pylist():
        truth = json.loads((ws / "cities" / city / "meta.json").read_text())["stats"]["buildings_truth"]
        assert truth["file_completeness"] == 1.0
        t, row = truth["by_class"].get("urban_village"), rows.get((city, "uv"))
        if not t or not row or t["count"] < 5:
            continue
        assert int(row["n_buildings"]) == t["count"], city
        assert float(row["density_per_ha"]) == pytest.approx(t["per_ha"], rel=0.01), city
        assert float(row["coverage_ratio"]) == pytest.approx(t["coverage"], rel=0.01), city
        assert float(row["footprint_mean_m2"]) == pytest.approx(t["mean_footprint_m2"], rel=0.01), city
        # the file's heights carry a real survey's noise (sd 0.5 m per building): within 1% plus 3 standard errors
        noise = 3 * 0.5 / np.sqrt(t["count"])
        assert abs(float(row["height_mean_m"]) - t["mean_height_m"]) <= 0.01 * t["mean_height_m"] + noise, city
        checked += 1
    assert checked >= 2, "the villages of several cities compared"
