import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin

from engine.tiles.grid import GridError, TileGridConfig, build_tile_grid, read_window


def _raster(path, width, height, transform=None, crs="EPSG:32650", nodata_box=None):
    data = np.random.default_rng(0).integers(1, 255, size=(3, height, width), dtype=np.uint8)
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        data[:, r0:r1, c0:c1] = 0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs, nodata=0,
                       transform=transform or from_origin(400000, 3500000, 0.8, 0.8)) as dst:
        dst.write(data)
    return data


@pytest.mark.parametrize("size,cfg", [((1001, 517), TileGridConfig()), ((224, 224), TileGridConfig()), ((193, 50), TileGridConfig()),
                                      ((640, 333), TileGridConfig(tile_size_px=64, overlap_px=10)), ((97, 131), TileGridConfig(tile_size_px=32, overlap_px=0))])
def test_cores_partition_the_raster_exactly(tmp_path, size, cfg):
    width, height = size
    _raster(tmp_path / "r.tif", width, height)
    grid = build_tile_grid("x", "east", str(tmp_path / "r.tif"), cfg).to_pylist()
    owned = np.zeros((height, width), np.int32)
    for t in grid:
        owned[t["core_row_off"]: t["core_row_off"] + t["core_height"], t["core_col_off"]: t["core_col_off"] + t["core_width"]] += 1
        # the window is the core plus the halo on every side
        assert t["window_col_off"] == t["core_col_off"] - cfg.halo_px and t["window_width"] == cfg.tile_size_px
        assert t["window_row_off"] == t["core_row_off"] - cfg.halo_px and t["window_height"] == cfg.tile_size_px
    assert (owned == 1).all(), "every pixel owned exactly once"
    assert len(grid) == -(-width // cfg.stride_px) * -(-height // cfg.stride_px)


def test_tile_ids_are_stable_and_positional(tmp_path):
    _raster(tmp_path / "r.tif", 500, 400)
    a = build_tile_grid("wuhan", "central", str(tmp_path / "r.tif"), TileGridConfig())
    b = build_tile_grid("wuhan", "central", str(tmp_path / "r.tif"), TileGridConfig())
    assert a.equals(b)
    ids = a.column("tile_id").to_pylist()
    assert ids[0] == "wuhan-t224o32-r0000-c0000" and len(set(ids)) == len(ids)
    assert "wuhan-t224o32-r0001-c0002" in ids


def test_window_bounds_match_pixels(tmp_path):
    _raster(tmp_path / "r.tif", 300, 300)
    t = build_tile_grid("x", "east", str(tmp_path / "r.tif"), TileGridConfig()).to_pylist()[0]
    assert t["minx"] == pytest.approx(400000 + 0.8 * t["window_col_off"])
    assert t["maxy"] == pytest.approx(3500000 - 0.8 * t["window_row_off"])
    assert t["maxx"] - t["minx"] == pytest.approx(0.8 * 224)
    assert 100 < t["lon_min"] < t["lon_max"] < 130 and 20 < t["lat_min"] < t["lat_max"] < 40


def test_halo_reads_are_padded_at_edges(tmp_path):
    data = _raster(tmp_path / "r.tif", 300, 250)
    grid = build_tile_grid("x", "east", str(tmp_path / "r.tif"), TileGridConfig()).to_pylist()
    first, last = grid[0], grid[-1]
    with rasterio.open(tmp_path / "r.tif") as src:
        a = read_window(src, first)
        b = read_window(src, last)
    assert a.shape == b.shape == (3, 224, 224)
    assert (a[:, :16, :] == 0).all() and (a[:, :, :16] == 0).all()  # the halo above and left of the raster
    assert (a[:, 16:, 16:] == data[:, :208, :208]).all()
    r, c = last["window_row_off"], last["window_col_off"]
    inside_h, inside_w = 250 - r, 300 - c
    assert (b[:, :inside_h, :inside_w] == data[:, r:, c:]).all() and (b[:, inside_h:, :] == 0).all()


def test_tiles_without_valid_data_or_outside_the_aoi_are_dropped(tmp_path):
    import shapely

    _raster(tmp_path / "r.tif", 600, 600, nodata_box=(0, 600, 0, 400))  # left two thirds are nodata
    grid = build_tile_grid("x", "east", str(tmp_path / "r.tif"), TileGridConfig()).to_pylist()
    assert grid and all(t["core_col_off"] + t["core_width"] > 400 for t in grid)
    assert len(grid) < 16
    # an AOI on the lower-right quarter keeps only tiles touching it
    full = build_tile_grid("x", "east", str(tmp_path / "r.tif"), TileGridConfig())
    lon = (full["lon_min"].to_numpy().min() + full["lon_max"].to_numpy().max()) / 2
    lat = (full["lat_min"].to_numpy().min() + full["lat_max"].to_numpy().max()) / 2
    aoi = shapely.box(lon, lat - 1, lon + 1, lat)
    part = build_tile_grid("x", "east", str(tmp_path / "r.tif"), TileGridConfig(), aoi_wgs84=aoi)
    assert 0 < part.num_rows < full.num_rows


@pytest.mark.parametrize("transform,crs,match", [
    (Affine(0.8, 0.1, 400000, 0.0, -0.8, 3500000), "EPSG:32650", "rotated"),
    (Affine(0.8, 0.0, 400000, 0.0, -0.5, 3500000), "EPSG:32650", "non-square"),
    (from_origin(400000, 3500000, 0.8, 0.8), None, "no CRS"),
])
def test_unusable_rasters_are_rejected_with_the_fix(tmp_path, transform, crs, match):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _raster(tmp_path / "bad.tif", 64, 64, transform=transform, crs=crs)
    with pytest.raises(GridError, match=match) as info:
        build_tile_grid("x", "east", str(tmp_path / "bad.tif"), TileGridConfig())
    assert "bad.tif" in str(info.value)


def test_config_checks():
    with pytest.raises(ValueError, match="overlap_px"):
        TileGridConfig(overlap_px=31)
    with pytest.raises(ValueError, match="overlap_px"):
        TileGridConfig(tile_size_px=64, overlap_px=32)
