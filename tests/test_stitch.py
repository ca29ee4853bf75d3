"""The stitch stage on oracle predictions: seamless villages, valid products, byte-identical reruns, bad cities."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import from_origin

from engine.catalog import load_catalog, write_catalog
from engine.geoparquet import write_geoparquet
from engine.mapping.store import (
    Ledger,
    RunManifest,
    encode_probs,
    read_city_predictions,
    read_manifest,
    run_dir,
    write_manifest,
    write_part,
)
from engine.pipelines.stitch import stitch_run
from engine.schema import OSM_FEATURES_SCHEMA, PREDICTIONS_SCHEMA, REFERENCE_SCHEMA
from engine.stitch import StitchConfig
from engine.stitch.blend import GridShape, Tile, blend_strips, ramp_weights
from engine.tiles.city import PrepareConfig, tile_city
from engine.tiles.grid import TileGridConfig

CLASSES = ("other", "urban_village", "formal_residential", "commercial")
GRID = TileGridConfig(tile_size_px=64, overlap_px=16, mask_decimation=4)
EPSG = 32650
ORIGIN = (500_000.0, 3_400_000.0)  # top-left corner, 1 m pixels
SIZE_PX = 384  # 8 x 8 tiles of stride 48; more than one COG block, so the COGs get an overview
# one village crossing many tile seams (x right, y down, in pixels = metres from the top-left corner)
VILLAGE = shapely.Polygon([(50, 45), (290, 70), (310, 180), (230, 200), (250, 330), (70, 290)])
SMALL_VILLAGE = shapely.box(330, 300, 352, 322)  # 484 m2, across the seam at x = 336 - 8
SLIVER = shapely.box(340, 20, 347, 27)  # 49 m2 < min_area_m2
OTHER = [("formal_residential", shapely.box(0, 340, 200, 384)), ("commercial", shapely.box(320, 100, 384, 250))]


def _to_crs(geom: shapely.Geometry) -> shapely.Geometry:
    return shapely.transform(geom, lambda xy: np.column_stack([ORIGIN[0] + xy[:, 0], ORIGIN[1] - xy[:, 1]]))


def _to_wgs84(geom: shapely.Geometry) -> shapely.Geometry:
    t = Transformer.from_crs(EPSG, 4326, always_xy=True)
    return shapely.transform(_to_crs(geom), lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _write_city(folder: Path) -> dict:
    """A small city: imagery in UTM 50N, reference polygons, a few OSM features (GeoParquet, EPSG:4326)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(1, 255, size=(3, SIZE_PX, SIZE_PX), dtype=np.uint8)
    with rasterio.open(folder / "imagery.tif", "w", driver="GTiff", width=SIZE_PX, height=SIZE_PX, count=3, dtype="uint8",
                       crs=f"EPSG:{EPSG}", transform=from_origin(*ORIGIN, 1.0, 1.0), nodata=0, tiled=True) as dst:
        dst.write(data)
    shapes = [("urban_village", VILLAGE), ("urban_village", SMALL_VILLAGE), ("urban_village", SLIVER)] + OTHER
    write_geoparquet(pa.table({
        "class": pa.array([c for c, _ in shapes], pa.string()),
        "block_id": pa.array(range(len(shapes)), pa.int64()),
        "geometry": pa.array([_to_wgs84(g).wkb for _, g in shapes], pa.binary()),
    }, schema=REFERENCE_SCHEMA), folder / "reference.parquet", 4326)
    osm = [("polygon", {"building": "yes"}, shapely.box(100, 100, 120, 115)), ("line", {"highway": "residential"},
           shapely.LineString([(0, 200), (384, 210)])), ("point", {"amenity": "school"}, shapely.Point(300, 300))]
    write_geoparquet(pa.table({
        "osm_id": pa.array(range(1, len(osm) + 1), pa.int64()),
        "kind": pa.array([k for k, _, _ in osm], pa.string()),
        "tags": pa.array([list(t.items()) for _, t, _ in osm], pa.map_(pa.string(), pa.string())),
        "geometry": pa.array([_to_wgs84(g).wkb for _, _, g in osm], pa.binary()),
    }, schema=OSM_FEATURES_SCHEMA), folder / "osm.parquet", 4326)
    return {"city": folder.name, "region": "east", "imagery": str(folder / "imagery.tif"), "osm": str(folder / "osm.parquet"),
            "aoi": None, "reference": str(folder / "reference.parquet"), "split": "map"}


def _prepare(ws: Path, row: dict, grid: TileGridConfig = GRID) -> pa.Table:
    index, _ = tile_city(row, PrepareConfig(grid=grid, chunk_tiles=4), ws / "tiles" / "_staging" / row["city"])
    target = ws / "tiles" / f"city={row['city']}" / "index" / "part-0.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(index, target)
    return index


def _oracle_run(ws: Path, run: str, index: pa.Table, reference: str, classes: tuple[str, ...] = CLASSES,
                grid: TileGridConfig = GRID, batch: int = 7) -> None:
    """One-hot predictions from the reference polygons, written as a mapping run would (parts, then ledger rows)."""
    from engine.training.samples import tile_labels

    run_path = run_dir(ws, run)
    write_manifest(run_path, RunManifest(run=run, model_dir="oracle", model_version="oracle", classes=classes, mode="oracle",
                                         tile_size_px=grid.tile_size_px, overlap_px=grid.overlap_px))
    rows = index.to_pylist()[::-1]  # parts in an order unlike the grid's: stitching must not depend on it
    with Ledger(run_path) as ledger:
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            probs = []
            for row in chunk:
                labels = tile_labels(row, reference, classes)
                probs.append(encode_probs((np.arange(len(classes))[:, None, None] == labels[None]).astype(np.float32)))
            table = pa.table({
                "tile_id": [r["tile_id"] for r in chunk], "city": [r["city"] for r in chunk],
                "input_hash": [r["input_hash"] for r in chunk], "model_version": ["oracle"] * len(chunk),
                "n_classes": [len(classes)] * len(chunk), "height": [r["window_height"] for r in chunk],
                "width": [r["window_width"] for r in chunk], "probs": probs,
            }, schema=PREDICTIONS_SCHEMA)
            part = write_part(run_path, chunk[0]["city"], table)
            ledger.commit([{"tile_id": r["tile_id"], "city": r["city"], "status": "ok", "attempts": 1, "input_hash": r["input_hash"],
                            "model_version": "oracle", "part": part} for r in chunk])


def _copy_run(ws: Path, src: str, dst: str) -> Path:
    shutil.copytree(run_dir(ws, src), run_dir(ws, dst))
    write_manifest(run_dir(ws, dst), RunManifest(**{**read_manifest(run_dir(ws, src)).__dict__, "run": dst}))
    return run_dir(ws, dst)


def _catalog(rows: list[dict], path: Path) -> pa.Table:
    return load_catalog(write_catalog(rows, path))


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    """The small city prepared and predicted by the oracle, run ``oracle``; plus its catalog."""
    ws = tmp_path_factory.mktemp("stitch")
    row = _write_city(ws / "cities" / "seams")
    index = _prepare(ws, row)
    _oracle_run(ws, "oracle", index, row["reference"])
    return ws, row, index


@pytest.fixture(scope="module")
def stitched(city):
    ws, row, _ = city
    catalog = _catalog([row], ws / "catalog.yaml")
    results = stitch_run(ws, "oracle", catalog)
    return ws, row, results


def _area_6933(geom_wgs84: shapely.Geometry) -> float:
    return float(gpd.GeoSeries([geom_wgs84], crs=4326).to_crs(6933).area.iloc[0])


# --- blending ------------------------------------------------------------------------------------------------------
def test_ramp_weights_sum_to_one_across_an_overlap():
    for ramp in ("linear", "cosine"):
        w = ramp_weights(64, 16, ramp)
        assert w.min() > 0 and w.max() == 1.0
        assert np.allclose(w[-16:] + w[:16], 1.0), ramp  # the end of one window over the start of the next


def test_blend_of_a_constant_field_is_that_field_everywhere_covered():
    grid = GridShape(height_px=150, width_px=130, tile_size_px=32, overlap_px=8)  # stride 24, halo 4
    rows, cols = -(-150 // 24), -(-130 // 24)
    truth = np.random.default_rng(1).integers(0, 256, size=(2, 150 + 32, 130 + 32)).astype(np.uint8)  # padded by the halo
    truth[0] = 255 - truth[1]
    tiles = [Tile(f"t{r}-{c}", r, r * 24 - 4, c * 24 - 4, truth[:, r * 24:r * 24 + 32, c * 24:c * 24 + 32].copy())
             for r in range(rows) for c in range(cols) if (r, c) != (2, 2)]  # one tile missing: its core is partly uncovered
    strips = list(blend_strips(tiles, grid, 2, block_rows=2))
    assert [s.row_off for s in strips] == [0, 44, 92, 140] and sum(s.height for s in strips) == 150
    prob = np.concatenate([s.prob(1) for s in strips])
    covered = np.concatenate([s.covered for s in strips])
    expected = truth[1, 4:154, 4:134] / 255.0
    assert np.allclose(prob[covered], expected[covered], atol=1e-5)
    assert not covered[48 + 4:72 - 4, 48 + 4:72 - 4].any() and covered[:48].all()  # the missing core minus neighbours' halos


# --- the stage -------------------------------------------------------------------------------------------------------
def test_one_village_across_many_tiles_is_one_polygon(stitched):
    ws, _, results = stitched
    (result,) = results
    assert result.status == "done", result.error
    gdf = gpd.read_parquet(ws / "products" / "oracle" / "urban_villages.parquet")
    assert len(gdf) == 2 == result.polygons, "the big village, the small one across a seam; the sliver dropped"
    big, small = gdf.sort_values("area_m2", ascending=False).itertuples()
    truth = _area_6933(_to_wgs84(VILLAGE))
    assert abs(big.area_m2 - truth) / truth < 0.02
    assert big.geometry.geom_type == "Polygon" and big.geometry.is_valid
    assert big.n_tiles >= 20 and small.n_tiles == 2  # 8 x 8 grid of 48 px cores; the small one spans one seam
    assert abs(small.area_m2 - _area_6933(_to_wgs84(SMALL_VILLAGE))) / small.area_m2 < 0.05
    assert big.mean_prob == pytest.approx(1.0) and big.model_version == "oracle" and big.city == "seams" and big.region == "east"
    assert shapely.intersects(big.geometry, _to_wgs84(VILLAGE.centroid))
    assert list(gdf["uv_id"]) == ["seams-00001", "seams-00002"] and gdf.iloc[0]["area_m2"] == big.area_m2  # by position
    assert result.uv_area_m2 == pytest.approx(gdf["area_m2"].sum())
    built_up = sum(_area_6933(_to_wgs84(g)) for g in [VILLAGE, SMALL_VILLAGE, SLIVER] + [g for _, g in OTHER])
    assert abs(result.built_up_area_m2 - built_up) / built_up < 0.02
    assert result.tiles_ok == 64 and result.tiles_failed == 0


def test_products_are_valid_and_readable(stitched):
    ws, row, _ = stitched
    out = ws / "products" / "oracle"
    gdf = gpd.read_parquet(out / "urban_villages.parquet")
    assert gdf.crs.to_epsg() == 4326
    assert list(gdf.columns) == ["uv_id", "city", "region", "area_m2", "mean_prob", "n_tiles", "model_version", "n_buildings",
                                 "density_per_ha", "coverage_ratio", "footprint_mean_m2", "footprint_median_m2", "height_mean_m",
                                 "levels_mean", "far", "nn_spacing_m", "geometry"]
    info = pyogrio.read_info(out / "urban_villages.gpkg", layer="urban_villages")
    assert info["features"] == len(gdf) and CRS.from_user_input(info["crs"]).to_epsg() == 4326
    stats = (out / "city_stats.csv").read_text().splitlines()
    assert stats[0] == ("city,region,uv_area_m2,built_up_area_m2,uv_share,buildings_source,buildings,buildings_note,polygons,tiles_ok,"
                        "tiles_failed,status")
    assert stats[1].startswith("seams,east,") and stats[1].endswith(",2,64,0,done")
    assert (out / "run.json").read_text() == (run_dir(ws, "oracle") / "run.json").read_text()
    with rasterio.open(row["imagery"]) as img:
        crs, transform, shape = img.crs, img.transform, img.shape
    for name in ("uv_prob.tif", "class.tif"):
        with rasterio.open(out / "cities" / "seams" / name) as src:
            assert src.crs == crs and src.transform == transform and src.shape == shape
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and src.profile["tiled"]
            assert src.overviews(1) == [2] and src.nodata == 255 and src.dtypes[0] == "uint8"
    with rasterio.open(out / "cities" / "seams" / "uv_prob.tif") as src:
        assert src.scales == (0.004,)
        prob = src.read(1)
    with rasterio.open(out / "cities" / "seams" / "class.tif") as src:
        cls = src.read(1)
    from rasterio.features import rasterize
    truth = rasterize([(_to_crs(g), 1) for g in [VILLAGE, SMALL_VILLAGE, SLIVER]], out_shape=shape, transform=transform)
    assert ((cls == 1) == (truth == 1)).all(), "one-hot oracle: the blend reproduces the labels exactly, seams included"
    assert set(np.unique(prob)) <= {0, 250} and ((prob == 250) == (truth == 1)).all()


def test_rerun_gives_identical_bytes(stitched):
    ws, row, _ = stitched
    out = ws / "products" / "oracle"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "urban_villages.parquet", out / "city_stats.csv",
                                                                          out / "cities" / "seams" / "uv_prob.tif", out / "cities" / "seams" / "class.tif")}
    stitch_run(ws, "oracle", _catalog([row], ws / "catalog.yaml"), StitchConfig(block_rows=3))  # other strips, same products
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "urban_villages.parquet", out / "city_stats.csv",
                                                                         out / "cities" / "seams" / "uv_prob.tif", out / "cities" / "seams" / "class.tif")}
    assert after["urban_villages.parquet"] == before["urban_villages.parquet"]
    assert after == before
    assert not list(out.rglob(".*")), "no temporary files left"


def test_ray_tasks_stitch_the_same_products(stitched, ray_session):
    ws, row, results = stitched
    out = ws / "products" / "oracle"
    files = (out / "urban_villages.parquet", out / "city_stats.csv", out / "cities" / "seams" / "uv_prob.tif", out / "cities" / "seams" / "class.tif")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    (again,) = stitch_run(ws, "oracle", _catalog([row], ws / "catalog.yaml"), StitchConfig(ray_tasks=True))  # a task, not a thread
    assert again.status == "done" and again.polygons == results[0].polygons
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before



def _lost_task(*args):
    raise RuntimeError("node lost past its retries")


def test_a_lost_stitch_task_fails_its_city_with_its_tile_counts(stitched, ray_session, monkeypatch):
    import ray

    import engine.pipelines.stitch as stitch_module

    ws, row, results = stitched
    monkeypatch.setattr(stitch_module, "_stitch_task", lambda: ray.remote(num_cpus=0.5, max_retries=0)(_lost_task))
    (lost,) = stitch_run(ws, "oracle", _catalog([row], ws / "catalog.yaml"), StitchConfig(ray_tasks=True))
    assert lost.status == "failed" and "stitch task" in lost.error and "node lost" in lost.error
    assert lost.tiles_ok == results[0].tiles_ok > 0 and lost.tiles_failed == results[0].tiles_failed

def test_bad_cities_are_reported_and_the_rest_complete(city, tmp_path):
    ws, row, _ = city
    broken = ws / "tiles" / "city=broken" / "index" / "part-0.parquet"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"PAR1 not really parquet")
    run = "bad-cities"
    with Ledger(_copy_run(ws, "oracle", run)) as ledger:
        ledger.commit([{"tile_id": "broken-t64o16-r0000-c0000", "city": "broken", "status": "ok", "attempts": 1, "input_hash": "x",
                        "model_version": "oracle", "part": "predictions/city=broken/part-none.parquet"},
                       {"tile_id": "ghost-t64o16-r0000-c0000", "city": "ghost", "status": "failed", "attempts": 2, "error": "boom",
                        "input_hash": "x", "model_version": "oracle"}])
    rows = [{**row, "city": "ghost"}, {**row, "city": "broken"}, row]
    seen = []
    results = stitch_run(ws, run, _catalog(rows, tmp_path / "catalog.yaml"), on_city=lambda r: seen.append(r.city))
    assert seen == ["ghost", "broken", "seams"]
    by_city = {r.city: r for r in results}
    assert by_city["ghost"].status == "empty" and by_city["ghost"].tiles_failed == 1
    assert by_city["broken"].status == "failed" and "city=broken" in by_city["broken"].error
    assert by_city["seams"].status == "done" and by_city["seams"].polygons == 2
    out = ws / "products" / run
    stats = {line.split(",")[0]: line for line in (out / "city_stats.csv").read_text().splitlines()[1:]}
    assert stats["ghost"].endswith(",0,0,1,empty") and stats["broken"].endswith(",failed") and stats["seams"].endswith(",done")
    assert set(gpd.read_parquet(out / "urban_villages.parquet")["city"]) == {"seams"}
    assert not (out / "cities" / "broken" / "uv_prob.tif").exists()


def test_stale_predictions_fail_the_city(city, tmp_path):
    ws, row, _ = city
    run = "stale"
    with Ledger(_copy_run(ws, "oracle", run)) as ledger:
        first = ledger.committed("seams").to_pylist()[0]
        ledger.commit([{**first, "status": "ok", "attempts": 1, "input_hash": "changed"}])
    (result,) = stitch_run(ws, run, _catalog([row], tmp_path / "catalog.yaml"))
    assert result.status == "failed" and "rerun `geolink-engine map --run stale`" in result.error


def test_binary_run_has_no_built_up_area(city, tmp_path):
    ws, row, index = city
    _oracle_run(ws, "binary", index, row["reference"], classes=("other", "urban_village"), batch=64)
    (result,) = stitch_run(ws, "binary", _catalog([row], tmp_path / "catalog.yaml"), StitchConfig(simplify=False, ramp="cosine"))
    assert result.status == "done" and result.polygons == 2 and math.isnan(result.built_up_area_m2) and math.isnan(result.uv_share)
    big = gpd.read_parquet(ws / "products" / "binary" / "urban_villages.parquet").geometry.iloc[0]
    assert big.is_valid and big.geom_type == "Polygon"


def test_predictions_stream_in_the_requested_order(city):
    ws, _, _ = city
    with Ledger(run_dir(ws, "oracle"), read_only=True) as ledger:
        committed = ledger.committed("seams")
    shuffled = committed.take(np.random.default_rng(0).permutation(committed.num_rows))
    got = [tile for tile, probs in read_city_predictions(run_dir(ws, "oracle"), shuffled, batch_rows=5)]
    assert got == shuffled["tile_id"].to_pylist()


def test_demo_city_matches_its_reference_everywhere(demo_workspace, tmp_path):
    """A synthetic demo city (irregular AOI, every land use): class raster = reference, villages = its UV components."""
    from rasterio.features import rasterize
    from scipy import ndimage

    from engine.catalog import find_catalog
    from engine.training.samples import LABEL_SETS

    row = load_catalog(find_catalog(demo_workspace)).to_pylist()[0]
    grid = TileGridConfig(tile_size_px=128, overlap_px=32, mask_decimation=4)
    classes = LABEL_SETS["landuse"]
    _oracle_run(tmp_path, "demo", _prepare(tmp_path, row, grid), row["reference"], classes=classes, grid=grid, batch=5)
    (result,) = stitch_run(tmp_path, "demo", _catalog([row], tmp_path / "catalog.yaml"), StitchConfig(block_rows=1))
    assert result.status == "done", result.error
    with rasterio.open(row["imagery"]) as src:
        transform, shape, valid = src.transform, src.shape, src.dataset_mask() > 0
    ref = gpd.read_parquet(row["reference"]).to_crs(src.crs)
    lookup = {name: i for i, name in enumerate(classes)}
    truth = rasterize([(g, lookup[c]) for g, c in zip(ref.geometry, ref["class"]) if lookup.get(c, 0) > 0], out_shape=shape,
                      transform=transform, dtype="uint8")
    with rasterio.open(tmp_path / "products" / "demo" / "cities" / row["city"] / "class.tif") as src:
        cls = src.read(1)
    assert (~valid).any() and (cls[~valid] == 255).all() and (cls[valid] == truth[valid]).all()
    labels, _ = ndimage.label((truth == lookup["urban_village"]) & valid)
    big = int((np.bincount(labels.ravel())[1:] * abs(transform.a * transform.e) >= 100.0).sum())
    assert result.polygons == big > 0
    built_up = np.isin(truth, [lookup[c] for c in ("urban_village", "formal_residential", "commercial", "industrial", "institutional")])
    assert result.built_up_area_m2 == pytest.approx((built_up & valid).sum() * abs(transform.a * transform.e), rel=0.01)
