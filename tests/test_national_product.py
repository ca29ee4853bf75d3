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
