"""The real GeoLink example scenes go into the catalog contract and validate: data nobody here made."""

import json

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import rasterio

from engine.catalog import load_catalog, validate_catalog, write_catalog
from engine.osm import parse_label_tags
from engine.scenes import scene_to_city
from engine.schema import OSM_FEATURES_SCHEMA, schema_problems


@pytest.fixture(scope="module")
def scene_catalog(examples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    scenes = sorted(p for p in (examples_dir / "osm_scenes").iterdir() if p.is_dir())
    assert len(scenes) == 5
    rows = [scene_to_city(s, out / "cities") for s in scenes]
    return scenes, rows, write_catalog(rows, out / "catalog.yaml")


def test_scenes_validate_as_a_catalog(scene_catalog):
    _, _, path = scene_catalog
    table = load_catalog(path)
    assert table.num_rows == 5
    assert validate_catalog(table) == []


def test_scene_imagery_is_georeferenced_to_its_bbox(scene_catalog):
    scenes, rows, _ = scene_catalog
    for scene, row in zip(scenes, rows):
        west, south, east, north = json.loads((scene / "meta.json").read_text())["bbox_wsen"]
        with rasterio.open(row["imagery"]) as src, rasterio.open(scene / "image.jpg") as jpg:
            assert src.crs.to_epsg() == 4326 and src.count >= 3
            assert (src.width, src.height) == (jpg.width, jpg.height)
            for got, want in zip(src.bounds, (west, south, east, north)):
                assert abs(got - want) < 1e-9
            assert (src.read(window=((0, 16), (0, 16))) == jpg.read(window=((0, 16), (0, 16)))).all()


def test_scene_osm_keeps_every_feature_and_its_tags(scene_catalog):
    scenes, rows, _ = scene_catalog
    for scene, row in zip(scenes, rows):
        table = pq.read_table(row["osm"])
        assert schema_problems(table.schema, OSM_FEATURES_SCHEMA) == []
        kinds = table["kind"].to_pylist()
        for kind in ("point", "line", "polygon"):
            layer = scene / f"osm_{kind}.geojson"
            expected = len(gpd.read_file(layer)) if layer.exists() else 0
            assert kinds.count(kind) == expected, (scene.name, kind)
        # tags survive: the scene's centre feature tags appear on some feature
        centre = json.loads((scene / "meta.json").read_text())["center_tags"]
        all_tags = [dict(t) for t in table["tags"].to_pylist()]
        assert any(all(t.get(k) == v for k, v in centre.items()) for t in all_tags), scene.name


def test_label_parsing():
    assert parse_label_tags("natural:glacier") == {"natural": "glacier"}
    assert parse_label_tags("name:Rue: A;building:yes") == {"name": "Rue: A", "building": "yes"}
    assert parse_label_tags("") == {} and parse_label_tags(None) == {} and parse_label_tags(";:x;") == {}
