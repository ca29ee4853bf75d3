"""Imagery forms (engine.imagery_sources): each resolves to one raster with the input's footprint and pixels, bad
inputs are one line naming the file, and `catalog validate` checks every form.

Inputs are one real scene (Boise, 0.6 m, EPSG:4326) in the forms users hold it: the GeoTIFF, a COG, a VRT, a
folder of GeoTIFF tiles, an MBTiles file and an XYZ folder at zoom 18 (and 17), and a STAC item.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, reproject, transform_bounds

from engine.catalog import load_catalog, validate_catalog, write_catalog
from engine.imagery_sources import VRT_NAME, WMS_NAME, ImagerySourceError, imagery_form, parse_zoom, resolve_imagery
from engine.scenes import scene_to_city
from engine.tiles.grid import TileGridConfig, build_tile_grid
from tests import real_inputs

ZOOM = 18  # 0.6 m nominal in EPSG:3857, 0.43 m on the ground at Boise's latitude (cos 43.6°)


@pytest.fixture(scope="module")
def forms(examples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("imagery-forms")
    scene = scene_to_city(examples_dir / "osm_scenes" / "a702502933_US_21", root / "src")
    tif = scene["imagery"]
    with rasterio.open(tif) as src:
        cog = real_inputs.write_cog(root / "scene-cog.tif", src.read(), src.crs, src.transform)
    shutil.copy(tif, root / "vrt-source.tif")
    with rasterio.open(tif) as src:
        bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">vrt-source.tif'
                        f"</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>" for b in (1, 2, 3))
        vrt = root / "scene.vrt"
        vrt.write_text(f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}"><SRS>{src.crs.to_wkt()}</SRS>'
                       f"<GeoTransform>{', '.join(map(repr, src.transform.to_gdal()))}</GeoTransform>{bands}</VRTDataset>")
    tiles = real_inputs.split_tiles(tif, root / "tiles")
    xyz = real_inputs.xyz_folder(tif, root / "xyz", ZOOM)
    real_inputs.xyz_folder(tif, root / "xyz", ZOOM - 1)
    xyz_jpg = real_inputs.xyz_folder(tif, root / "xyz-jpg", ZOOM, suffix=".jpg")
    mbt = real_inputs.mbtiles(tif, root / "scene.mbtiles", ZOOM, lower_zooms=1)
    item = root / "stac" / "item.json"
    item.parent.mkdir()
    item.write_text(json.dumps({"type": "Feature", "stac_version": "1.0.0", "id": "scene", "geometry": None, "properties": {},
                                "assets": {"thumbnail": {"href": "thumb.png", "type": "image/png"},
                                           "visual": {"href": "../scene-cog.tif", "type": "image/tiff; application=geotiff"},
                                           "cache": {"href": "../scene.mbtiles", "type": "application/vnd.mapbox-vector-tile"}}}))
    web = real_inputs.web_mercator_tiles(tif, ZOOM)
    return {"root": root, "scene": scene, "tif": tif, "cog": str(cog), "vrt": str(vrt), "tiles": tiles, "xyz": xyz,
            "xyz_jpg": xyz_jpg, "mbtiles": str(mbt), "item": str(item), "web": web}


def _valid_bounds(src) -> tuple[float, float, float, float]:
    """Bounds of the pixels the dataset mask calls valid."""
    mask = src.dataset_mask() > 0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    left, top = src.transform * (cols[0], rows[0])
    right, bottom = src.transform * (cols[-1] + 1, rows[-1] + 1)
    return left, bottom, right, top


def _assert_footprint(src, tif: str) -> None:
    """The resolved raster's valid footprint is the input's, within one of its pixels."""
    with rasterio.open(tif) as ref:
        expected = transform_bounds(ref.crs, src.crs, *ref.bounds)
    np.testing.assert_allclose(_valid_bounds(src), expected, atol=max(src.res) * 1.01)


def test_forms_are_told_from_the_path(forms):
    f = forms
    assert [imagery_form(p) for p in (f["tif"], f["cog"], f["vrt"], str(f["root"] / "tiles"), str(f["root"] / "tiles") + "/",
                                      str(f["root"] / "tiles" / "*.tif"), f["mbtiles"], str(f["xyz"]),
                                      str(f["xyz"]) + "/{z}/{x}/{y}.png", f["item"], "s3://bucket/a.tif")] == \
        ["geotiff", "geotiff", "vrt", "tiles", "tiles", "tiles", "mbtiles", "xyz", "xyz", "stac", "geotiff"]
    assert parse_zoom("18", "x") == 18 and parse_zoom(17, "x") == 17 and parse_zoom(" ", "x") is None
    for bad in ("abc", "18.5", "25", "-1"):
        with pytest.raises(ImagerySourceError, match=r"^x: zoom .* is not an integer 0-24$"):
            parse_zoom(bad, "x")


def test_geotiff_cog_and_vrt_are_returned_unchanged(forms, tmp_path):
    for path in (forms["tif"], forms["cog"], forms["vrt"]):
        assert resolve_imagery(path, out_dir=tmp_path / "out") == path
    assert not (tmp_path / "out").exists()  # nothing written
    with rasterio.open(forms["vrt"]) as vrt, rasterio.open(forms["tif"]) as tif:
        assert vrt.bounds == tif.bounds and np.array_equal(vrt.read(), tif.read())


def test_vrt_with_a_missing_source_names_it(forms, tmp_path):
    vrt = tmp_path / "scene.vrt"
    shutil.copy(forms["vrt"], vrt)  # its source, vrt-source.tif, is relative to the VRT: not beside this copy
    with pytest.raises(ImagerySourceError) as err:
        resolve_imagery(str(vrt), out_dir=tmp_path / "out")
    assert str(err.value) == f"{vrt}: VRT source file not found: {tmp_path / 'vrt-source.tif'}"


@pytest.mark.parametrize("spelling", ["folder", "glob"])
def test_tile_folder_is_a_mosaic_vrt_with_the_same_pixels(forms, tmp_path, spelling):
    folder = forms["tiles"][0].parent
    imagery = str(folder) if spelling == "folder" else str(folder / "*.tif")
    path = resolve_imagery(imagery, out_dir=tmp_path)
    assert path == str(tmp_path / VRT_NAME)
    with rasterio.open(path) as mosaic, rasterio.open(forms["tif"]) as tif:
        assert mosaic.crs == tif.crs and mosaic.shape == tif.shape and mosaic.dtypes == tif.dtypes
        np.testing.assert_allclose(tuple(mosaic.bounds), tuple(tif.bounds), rtol=0, atol=1e-12)
        assert mosaic.transform.almost_equals(tif.transform, precision=1e-12)
        assert np.array_equal(mosaic.read(), tif.read())
    # a rerun writes the same bytes and leaves the file alone (its mtime, so digests and markers stay)
    before = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
    assert resolve_imagery(imagery, out_dir=tmp_path) == path
    assert (Path(path).read_bytes(), os.stat(path).st_mtime_ns) == before


def test_tile_mosaic_keeps_declared_nodata(forms, tmp_path):
    folder = tmp_path / "tiles"
    for tile in forms["tiles"]:
        with rasterio.open(tile) as src:
            with rasterio.open(folder.mkdir(exist_ok=True) or folder / tile.name, "w", **(src.profile | {"nodata": 0})) as dst:
                dst.write(src.read())
    with rasterio.open(resolve_imagery(str(folder), out_dir=tmp_path / "out")) as mosaic:
        assert mosaic.nodata == 0


def test_tiles_of_mixed_crs_or_bands_are_refused_naming_two_tiles(forms, tmp_path):
    a, b = forms["tiles"][0], forms["tiles"][3]
    mixed = tmp_path / "mixed-crs"
    mixed.mkdir()
    shutil.copy(a, mixed / a.name)
    real_inputs.warp(b, mixed / b.name, real_inputs.utm_of(b))
    with pytest.raises(ImagerySourceError) as err:
        resolve_imagery(str(mixed), out_dir=tmp_path / "out")
    message = str(err.value)
    assert str(mixed / a.name) in message and str(mixed / b.name) in message and "differ in CRS (EPSG:4326 vs EPSG:326" in message
    assert "\n" not in message

    bands = tmp_path / "mixed-bands"
    bands.mkdir()
    shutil.copy(a, bands / a.name)
    real_inputs.uint16_four_band(b, bands / "x_four_band.tif")
    with pytest.raises(ImagerySourceError, match=r"tiles .*tile_r0_c0.tif and .*x_four_band.tif differ in band count \(3 vs 4\)"):
        resolve_imagery(str(bands), out_dir=tmp_path / "out")


def test_folder_or_glob_without_geotiffs_is_refused(forms, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no tiles here")
    with pytest.raises(ImagerySourceError, match=r"empty: folder matches no GeoTIFF"):
        resolve_imagery(str(tmp_path / "empty"), out_dir=tmp_path / "out")
    with pytest.raises(ImagerySourceError, match=r"\*\.tif: glob matches no GeoTIFF"):
        resolve_imagery(str(tmp_path / "empty" / "*.tif"), out_dir=tmp_path / "out")
    with pytest.raises(ImagerySourceError, match=r"^folder not found: "):
        resolve_imagery(str(tmp_path / "nowhere") + "/", out_dir=tmp_path / "out")


def _assert_tile_cache(path: str, forms: dict) -> None:
    rgba, transform, _, _ = forms["web"]
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 3857 and src.count == 3 and src.dtypes[0] == "uint8"
        assert src.transform.almost_equals(transform, precision=1e-6) and src.shape == rgba.shape[1:]
        _assert_footprint(src, forms["tif"])
        mask = src.dataset_mask()
        assert np.array_equal(mask > 0, rgba[3] > 0)  # alpha became the mask: outside the scene is nodata
        pixels = src.read()
        valid = mask > 0
        diff = np.abs(pixels.astype(int) - rgba[:3])[:, valid]
        assert diff.max() == 0  # PNG is lossless
        # and close to the scene itself once warped back (resampled twice: 0.6 m -> 0.43 m -> 0.6 m on the ground)
        with rasterio.open(forms["tif"]) as tif:
            back = np.zeros((3, tif.height, tif.width), np.float32)
            reproject(pixels, back, src_transform=src.transform, src_crs=src.crs, dst_transform=tif.transform, dst_crs=tif.crs,
                      resampling=Resampling.bilinear)
            inner = (slice(None), slice(4, -4), slice(4, -4))
            assert np.abs(back[inner] - tif.read()[inner]).mean() < 4  # measured: 1.9


def test_mbtiles_resolves_to_its_deepest_zoom_with_alpha_as_mask(forms, tmp_path):
    path = resolve_imagery(forms["mbtiles"], out_dir=tmp_path)
    assert path == str(tmp_path / VRT_NAME)
    assert '<OOI key="ZOOM_LEVEL">18</OOI>' in Path(path).read_text()
    _assert_tile_cache(path, forms)
    with rasterio.open(resolve_imagery(forms["mbtiles"], zoom="17", out_dir=tmp_path / "z17")) as z17:
        assert z17.shape == (forms["web"][0].shape[1] // 2, forms["web"][0].shape[2] // 2)
        np.testing.assert_allclose(z17.res, np.array(forms["web"][1][0]) * 2, rtol=1e-9)


def test_mbtiles_without_the_zoom_lists_the_zooms_it_serves(forms, tmp_path):
    with pytest.raises(ImagerySourceError) as err:
        resolve_imagery(forms["mbtiles"], zoom=19, out_dir=tmp_path)
    assert str(err.value) == f"{forms['mbtiles']}: MBTiles has no tiles at zoom 19; it serves zoom(s) 17, 18"


@pytest.mark.parametrize("spelling", ["folder", "template"])
def test_xyz_folder_resolves_through_gdal_wms_clipped_to_its_tiles(forms, tmp_path, spelling):
    imagery = str(forms["xyz"]) if spelling == "folder" else str(forms["xyz"]) + "/{z}/{x}/{y}.png"
    path = resolve_imagery(imagery, out_dir=tmp_path)  # default: the deepest zoom folder (18, not 17)
    wms = (tmp_path / WMS_NAME).read_text()
    assert "<TileLevel>18</TileLevel>" in wms and "file://" in wms and "<Cache" not in wms
    _assert_tile_cache(path, forms)
    with rasterio.open(resolve_imagery(imagery, zoom=17, out_dir=tmp_path / "z17")) as z17:
        assert z17.crs.to_epsg() == 3857 and z17.count == 3
        _assert_footprint(z17, forms["tif"])
    # a rerun rewrites nothing
    stamps = [(p.name, p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.glob("source*"))]
    resolve_imagery(imagery, out_dir=tmp_path)
    assert [(p.name, p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(tmp_path.glob("source*"))] == stamps


def test_xyz_missing_tiles_are_nodata_and_the_grid_skips_them(forms, tmp_path):
    folder = tmp_path / "xyz"
    shutil.copytree(forms["xyz"], folder)
    tiles = sorted((folder / str(ZOOM)).glob("*/*.png"))
    gone = tiles[0]  # the top-left tile present: still inside the clip window (another tile shares its column)
    gone.unlink()
    x, y = int(gone.parent.name), int(gone.stem)
    _, _, x0, y0 = forms["web"]
    path = resolve_imagery(str(folder), out_dir=tmp_path / "out")
    with rasterio.open(path) as src:
        mask = src.dataset_mask()
        hole = (slice((y - y0) * 256, (y - y0 + 1) * 256), slice((x - x0) * 256, (x - x0 + 1) * 256))
        assert mask[hole].max() == 0 and src.read(1)[hole].max() == 0 and mask.max() == 255
        full = mask > 0
    grid = build_tile_grid("xyz-city", "real", path, TileGridConfig(tile_size_px=64, overlap_px=0, mask_decimation=4))
    assert 0 < grid.num_rows < (full.shape[0] // 64) * (full.shape[1] // 64)
    for r, c in zip(grid["core_row_off"].to_pylist(), grid["core_col_off"].to_pylist()):
        assert full[r:r + 64, c:c + 64].any()  # every kept tile holds data


def test_xyz_jpeg_tiles_have_no_alpha_yet_missing_tiles_are_masked(forms, tmp_path):
    folder = tmp_path / "xyz-jpg"
    shutil.copytree(forms["xyz_jpg"], folder)
    gone = sorted((folder / str(ZOOM)).glob("*/*.jpg"))[-1]  # the bottom-right tile (its row and column keep others)
    gone.unlink()
    rgba, _, x0, y0 = forms["web"]
    path = resolve_imagery(str(folder), out_dir=tmp_path / "out")
    with rasterio.open(path) as src:
        assert src.count == 3 and src.shape == rgba.shape[1:]
        by_tile = src.dataset_mask().reshape(rgba.shape[1] // 256, 256, rgba.shape[2] // 256, 256)
        expected = np.ones(by_tile[:, 0, :, 0].shape, bool)  # a JPEG tile is opaque wherever it exists
        expected[int(gone.stem) - y0, int(gone.parent.name) - x0] = False
        assert np.array_equal(by_tile.min(axis=(1, 3)) == 255, expected)
        assert np.array_equal(by_tile.max(axis=(1, 3)) == 255, expected)
        valid = rgba[3] > 0
        valid[(int(gone.stem) - y0) * 256:, (int(gone.parent.name) - x0) * 256:] = False
        assert np.abs(src.read().astype(int) - rgba[:3])[:, valid].mean() < 4  # JPEG is lossy, not far off


def test_xyz_without_the_zoom_lists_its_zoom_folders(forms, tmp_path):
    with pytest.raises(ImagerySourceError, match=r"xyz: no tiles at zoom 16; its zoom folders are 17, 18$"):
        resolve_imagery(str(forms["xyz"]), zoom=16, out_dir=tmp_path)


def test_stac_item_resolves_to_its_asset(forms, tmp_path):
    assert resolve_imagery(forms["item"], out_dir=tmp_path) == str(Path(forms["cog"]))  # default: "visual", relative href
    assert not any(tmp_path.iterdir())
    path = resolve_imagery(forms["item"], asset="cache", zoom=17, out_dir=tmp_path)  # an MBTiles asset, at zoom 17
    assert path == str(tmp_path / VRT_NAME) and '<OOI key="ZOOM_LEVEL">17</OOI>' in Path(path).read_text()
    with pytest.raises(ImagerySourceError) as err:
        resolve_imagery(forms["item"], asset="analytic", out_dir=tmp_path)
    assert str(err.value) == f"{forms['item']}: STAC item has no asset 'analytic'; its assets: thumbnail, visual, cache"
    # without visual/image/data, the only GeoTIFF asset is taken
    item = json.loads(Path(forms["item"]).read_text())
    item["assets"]["ortho"] = item["assets"].pop("visual")
    other = Path(forms["item"]).with_name("ortho.json")
    other.write_text(json.dumps(item))
    assert resolve_imagery(str(other), out_dir=tmp_path) == str(Path(forms["cog"]))


def test_catalog_validate_checks_every_form(forms, tmp_path):
    scene, root = forms["scene"], forms["root"]
    rows = [
        {"city": "geotiff", "imagery": forms["tif"]},
        {"city": "cog", "imagery": forms["cog"]},
        {"city": "vrt", "imagery": forms["vrt"]},
        {"city": "tiles", "imagery": os.path.relpath(root / "tiles", tmp_path) + "/"},
        {"city": "tiles-glob", "imagery": os.path.relpath(root / "tiles", tmp_path) + "/*.tif"},
        {"city": "mbtiles", "imagery": forms["mbtiles"], "zoom": 18},
        {"city": "xyz", "imagery": str(forms["xyz"]), "zoom": 17},
        {"city": "stac", "imagery": forms["item"], "asset": "visual"},
    ]
    catalog = write_catalog([{"region": "real", "osm": scene["osm"], **r} for r in rows], tmp_path / "catalog.yaml")
    facts: dict = {}
    problems = validate_catalog(load_catalog(catalog), facts)
    assert problems == []
    assert set(facts) == {r["city"] for r in rows}
    assert facts["mbtiles"].crs == "EPSG:3857" and facts["tiles"].width_px == facts["geotiff"].width_px
    assert facts["xyz"].gsd_m == pytest.approx(2 * facts["mbtiles"].gsd_m, rel=1e-3)  # zoom 17: twice zoom 18's ground GSD
    assert 0.4 < facts["mbtiles"].gsd_m < 0.45  # 0.597 m nominal x cos(43.6°): measured, not assumed


def test_catalog_validate_reports_bad_forms_one_line_each(forms, tmp_path):
    scene = forms["scene"]
    (tmp_path / "empty").mkdir()
    vrt = tmp_path / "moved.vrt"
    shutil.copy(forms["vrt"], vrt)
    rows = [
        {"city": "bad-zoom", "imagery": forms["mbtiles"], "zoom": "z18"},
        {"city": "no-zoom", "imagery": forms["mbtiles"], "zoom": 19},
        {"city": "no-asset", "imagery": forms["item"], "asset": "analytic"},
        {"city": "no-tiles", "imagery": str(tmp_path / "empty")},
        {"city": "lost-source", "imagery": str(vrt)},
        {"city": "missing", "imagery": str(tmp_path / "nope.tif")},
        {"city": "zoom-ignored", "imagery": forms["tif"], "zoom": 18},
    ]
    catalog = write_catalog([{"region": "real", "osm": scene["osm"], **r} for r in rows], tmp_path / "catalog.yaml")
    problems = validate_catalog(load_catalog(catalog))
    found = {(p.city, p.field, p.severity): p.message for p in problems}
    assert set(found) == {("bad-zoom", "zoom", "error"), ("no-zoom", "imagery", "error"), ("no-asset", "imagery", "error"),
                          ("no-tiles", "imagery", "error"), ("lost-source", "imagery", "error"), ("missing", "imagery", "error"),
                          ("zoom-ignored", "zoom", "warning")}, problems
    assert "is not an integer 0-24" in found[("bad-zoom", "zoom", "error")]
    assert "it serves zoom(s) 17, 18" in found[("no-zoom", "imagery", "error")]
    assert "its assets: thumbnail, visual, cache" in found[("no-asset", "imagery", "error")]
    assert "folder matches no GeoTIFF" in found[("no-tiles", "imagery", "error")]
    assert "VRT source file not found" in found[("lost-source", "imagery", "error")]
    assert found[("missing", "imagery", "error")].startswith("file not found")
    assert all("\n" not in m for m in found.values())


def test_resolving_reads_headers_only_and_validate_then_probes_the_mosaic(forms, tmp_path):
    """A tile whose last blocks are gone resolves (headers are intact); `catalog validate` then finds the damage
    by its usual probe of the resolved raster's first and last blocks."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    for tile in forms["tiles"][:-1]:
        shutil.copy(tile, folder / tile.name)
    last = forms["tiles"][-1]
    real_inputs.truncated(last, folder / last.name)
    resolve_imagery(str(folder), out_dir=tmp_path / "out")
    catalog = write_catalog([{"city": "cut", "region": "real", "imagery": str(folder), "osm": forms["scene"]["osm"]}],
                            tmp_path / "catalog.yaml")
    (problem,) = [p for p in validate_catalog(load_catalog(catalog)) if p.severity == "error"]
    assert problem.field == "imagery" and problem.message.startswith(f"{folder} is damaged (truncated or corrupt)"), problem
