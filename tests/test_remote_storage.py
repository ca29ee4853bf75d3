"""Remote workspaces against a local S3 server (moto on loopback): the mirror primitives, then prepare -> map ->
products with the workspace, the catalog inputs and the model all in the bucket, and a "fresh node" that resumes
from the bucket alone."""

import hashlib
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from engine import product_layout as layout
from engine import storage
from engine.catalog import find_catalog, load_catalog
from engine.cli import app
from engine.mapping.store import Ledger, run_dir
from engine.pipelines.infer import InferenceConfig
from engine.pipelines.map import MapConfig, run_map
from engine.pipelines.stitch import stitch_run
from engine.stitch import StitchConfig
from engine.synth.demo import write_demo
from tests.conftest import TINY


def _keys(bucket: str, prefix: str = "") -> set[str]:
    fs, key = storage.filesystem(f"s3://{bucket}/{prefix}".rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True))
    return {i.path[len(bucket) + 1:] for i in infos if i.type == pafs.FileType.File}


def _wipe_node_cache() -> None:
    """What a fresh node has: nothing."""
    shutil.rmtree(storage.cache_root() / "mirror", ignore_errors=True)


def test_mirror_round_trip_listing_and_deletes(bucket):
    root = storage.workspace_root(f"s3://{bucket}/ws")
    assert storage.uri_of(root) == f"s3://{bucket}/ws" and storage.uri_of("/tmp/elsewhere") is None
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.txt").write_text("x")
    (root / "a" / "y.txt").write_text("y")
    (root / "a" / ".y.tmp-1234.txt").write_text("a temporary is never uploaded")
    storage.publish(root / "a")
    assert _keys(bucket) == {"ws/a/b/x.txt", "ws/a/y.txt"}
    assert [p.name for p in storage.list_files(root / "a", ".txt")] == ["y.txt"]
    assert [p.relative_to(root).as_posix() for p in storage.list_files(root / "a", ".txt", recursive=True)] == ["a/b/x.txt", "a/y.txt"]

    _wipe_node_cache()
    assert (storage.localize(root / "a") / "b" / "x.txt").read_text() == "x"
    fs, key = storage.filesystem(f"s3://{bucket}/ws/a/y.txt")
    with fs.open_output_stream(key) as out:  # another node rewrote it: the stale copy is replaced
        out.write(b"y, longer now")
    assert storage.localize(root / "a" / "y.txt").read_text() == "y, longer now"
    storage.remove(root / "a" / "y.txt")
    assert _keys(bucket) == {"ws/a/b/x.txt"} and not (root / "a" / "y.txt").exists()

    storage.move_tree(root / "a", root / "c")
    assert _keys(bucket) == {"ws/c/b/x.txt"}
    assert (storage.localize(root / "c") / "b" / "x.txt").read_text() == "x"
    with pytest.raises(storage.StorageError, match=r"\.\."):
        storage.mirror_path(f"s3://{bucket}/../etc")
    with pytest.raises(storage.StorageError, match="no-such-bucket"):
        storage.object_stamp("s3://no-such-bucket/x.tif")


def test_rasters_are_read_in_place_by_range_requests(bucket):
    local = storage.mirror_path(f"s3://{bucket}/r.tif")
    local.parent.mkdir(parents=True)
    data = np.arange(3 * 256 * 256, dtype=np.uint32).reshape(3, 256, 256).astype(np.uint8)
    with rasterio.open(local, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8", crs="EPSG:32650",
                       transform=from_origin(500000, 3400000, 0.5, 0.5), tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(data)
    storage.publish(local, keep_local=False)
    assert not local.exists()
    with rasterio.open(f"s3://{bucket}/r.tif") as src:
        assert src.crs.to_epsg() == 32650
        assert (src.read(window=((64, 96), (128, 160))) == data[:, 64:96, 128:160]).all()
    assert not local.exists()  # read through GDAL /vsis3/, never downloaded


def test_map_on_a_remote_workspace_and_a_fresh_node_resumes_from_the_bucket(ray_session, bucket, random_model):
    ws = f"s3://{bucket}/geolink"
    write_demo(ws, n_cities=2, cfg=TINY, seed=11, workers=1)  # written through the mirror, then uploaded
    model_local = shutil.copytree(random_model, storage.mirror_path(f"s3://{bucket}/models/random"))
    storage.publish(model_local)
    _wipe_node_cache()

    catalog = load_catalog(find_catalog(ws))
    assert all(v.startswith(f"s3://{bucket}/geolink/cities/") for v in catalog["imagery"].to_pylist())  # read in place
    cfg = MapConfig(run="remote", model_dir=f"s3://{bucket}/models/random", inference=InferenceConfig(batch_size=8, actors=1))
    report = run_map(catalog, ws, cfg)
    assert [c.status for c in report.cities] == ["ok", "ok"], [c.error for c in report.cities]
    keys = _keys(bucket, "geolink")
    for city in catalog["city"].to_pylist():
        assert f"geolink/tiles/_state/{city}.json" in keys
        assert any(k.startswith(f"geolink/tiles/city={city}/graphs/") for k in keys)
        assert any(k.startswith(f"geolink/runs/remote/predictions/city={city}/") for k in keys)
        for cog in layout.COGS.values():
            assert f"geolink/products/remote/{layout.CITIES_DIR}/{city}/{cog}" in keys, (city, cog)
    for name in (layout.UV_PARQUET, layout.UV_GPKG, layout.CITY_STATS, layout.INDEX_HTML, f"{layout.STAC_DIR}/collection.json"):
        assert f"geolink/products/remote/{name}" in keys, name
    assert "geolink/runs/remote/ledger.duckdb" in keys and not any("_staging" in k for k in keys)
    products = storage.mirror_path(f"{ws}/products/remote/urban_villages.parquet")
    first = hashlib.sha256(products.read_bytes()).hexdigest()
    tiles = report.inference.predicted

    _wipe_node_cache()  # a driver on a fresh node: everything comes back from the bucket
    again = run_map(load_catalog(find_catalog(ws)), ws, cfg)
    assert again.inference.predicted == 0 and again.inference.skipped == tiles > 0
    assert hashlib.sha256(storage.localize(products).read_bytes()).hexdigest() == first
    with Ledger(run_dir(storage.workspace_root(ws), "remote"), read_only=True) as ledger:
        table = ledger.table()
    assert table.num_rows == tiles == len(set(table["tile_id"].to_pylist()))  # one row per tile, no duplicates

    # stitching as Ray tasks (a cluster's way): each task publishes its city's COGs itself, the driver mirrors them
    fs, _ = storage.filesystem(ws)
    cog_keys = sorted(k for k in _keys(bucket, "geolink/products/remote/" + layout.CITIES_DIR))
    for key in cog_keys:
        fs.delete_file(f"{bucket}/{key}")
    mirror = storage.workspace_root(ws)
    before = {p.relative_to(mirror): hashlib.sha256(p.read_bytes()).hexdigest() for p in (mirror / "products" / "remote" / layout.CITIES_DIR).rglob("*.tif")}
    results = stitch_run(mirror, "remote", load_catalog(find_catalog(ws)), StitchConfig(ray_tasks=True))
    assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
    assert sorted(k for k in _keys(bucket, "geolink/products/remote/" + layout.CITIES_DIR)) == cog_keys, "the tasks published them"
    after = {p.relative_to(mirror): hashlib.sha256(p.read_bytes()).hexdigest() for p in (mirror / "products" / "remote" / layout.CITIES_DIR).rglob("*.tif")}
    assert after == before and len(after) == 2 * len(layout.COGS)


def test_cli_takes_a_workspace_uri(s3_endpoint, bucket):
    write_demo(f"s3://{bucket}/ws", n_cities=1, cfg=TINY, seed=3, workers=1)
    _wipe_node_cache()
    result = CliRunner().invoke(app, ["--workspace", f"s3://{bucket}/ws", "catalog", "validate"])
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(app, ["--workspace", f"s3://{bucket}/nothing-here", "catalog", "validate"])
    assert missing.exit_code != 0 and "no catalog" in missing.output


def test_a_model_vrt_in_a_remote_workspace_is_read_from_the_bucket_by_every_node(bucket):
    """16-bit imagery in the bucket, a remote workspace: the model VRT (stretch + resampling) is published and named
    by its URI, its source by GDAL's /vsis3/ name, so a node with an empty cache reads the same pixels."""
    import pyarrow as pa

    from engine.model_input import InputSpec, resolve_catalog
    from engine.schema import CATALOG_SCHEMA
    from engine.workspace import Workspace

    local = storage.mirror_path(f"s3://{bucket}/imagery/u16.tif")
    local.parent.mkdir(parents=True)
    ramp = np.add.outer(np.arange(256) * 7, np.arange(256) * 8)  # smooth, below 4000: averages of it are well defined
    data = np.stack([ramp, ramp[::-1], ramp[:, ::-1]]).astype(np.uint16)
    with rasterio.open(local, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint16", crs="EPSG:32650",
                       transform=from_origin(500000, 3400000, 0.3, 0.3), tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(data)
    storage.publish(local, keep_local=False)
    ws = Workspace.at(f"s3://{bucket}/vrt-ws")
    row = {n: None for n in CATALOG_SCHEMA.names} | {"city": "u16", "region": "r", "imagery": f"s3://{bucket}/imagery/u16.tif",
                                                    "osm": "x", "radiometry": "range:0,4000"}
    with storage.raster_env():
        resolved, plans, errors = resolve_catalog(pa.Table.from_pylist([row], schema=CATALOG_SCHEMA), ws.city_imagery, InputSpec(gsd_m=0.6))
    assert not errors
    uri = resolved["imagery"][0].as_py()
    assert uri == f"s3://{bucket}/vrt-ws/imagery/u16/model.vrt" and plans["u16"].describe().endswith("resampled 0.30 m -> 0.60 m")
    assert f"/vsis3/{bucket}/imagery/u16.tif" in (storage.localize(ws.city_imagery("u16") / "model.vrt")).read_text()
    _wipe_node_cache()
    with storage.raster_env(), rasterio.open(uri) as src:
        assert (src.count, src.width, src.dtypes[0]) == (3, 128, "uint8")
        pixels = src.read()
    expected = (data.reshape(3, 128, 2, 128, 2).mean(axis=(2, 4)) * 255 / 4000)
    assert np.abs(pixels.astype(float) - expected).max() <= 1.0
