"""Products publishing: STAC (written, validated offline, deterministic) and the offline preview page.

The fixture is a tiny products folder built in ``tmp_path``: two cities with 64x64 COGs in UTM (alpha in 50N, beta
in 49N with imagery in EPSG:4326, so the page reprojects), one failed city without COGs, GeoParquet polygons.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from engine.mapping.store import RunManifest
from engine.products import STACProductsError, validate_stac, write_page, write_stac

CITIES = {  # city: (CRS, origin x, origin y, pixel m)
    "alpha": ("EPSG:32650", 500_000.0, 3_400_000.0, 10.0),
    "beta": ("EPSG:32649", 300_000.0, 2_500_000.0, 8.0),
}
SIZE = 64


def _write_raster(path: Path, data: np.ndarray, crs: str, transform, driver: str = "COG", nodata: int | None = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": driver, "count": data.shape[0], "height": data.shape[1], "width": data.shape[2], "dtype": data.dtype,
               "crs": crs, "transform": transform, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def make_products(root: Path) -> tuple[Path, list[dict]]:
    """A products folder (two cities with COGs, one failed) and catalog rows with imagery; seeded, a few KB."""
    rng = np.random.default_rng(0)
    products = root / "products" / "demo"
    rows, polys = [], []
    for city, (crs, x0, y0, px) in CITIES.items():
        transform = from_origin(x0, y0, px, px)
        prob = np.clip(rng.normal(0.3, 0.3, (1, SIZE, SIZE)), 0, 1)
        prob[:, 20:40, 20:40] = 0.9
        uv = np.rint(prob * 250).astype(np.uint8)
        uv[:, :4, :4] = 255  # some nodata
        _write_raster(products / "cities" / city / "uv_prob.tif", uv, crs, transform)
        _write_raster(products / "cities" / city / "class.tif", (prob > 0.5).astype(np.uint8), crs, transform)
        box_utm = shapely.box(x0 + 20 * px, y0 - 40 * px, x0 + 40 * px, y0 - 20 * px)
        poly = gpd.GeoSeries([box_utm], crs=crs).to_crs("EPSG:4326").iloc[0]
        polys.append({"uv_id": f"{city}-1", "city": city, "region": "south", "area_m2": box_utm.area, "mean_prob": 0.9,
                      "n_tiles": 1, "model_version": "v1", "geometry": poly})
        # imagery: alpha in its UTM grid at 2x resolution, beta in EPSG:4326 (the page must reproject onto it)
        if city == "alpha":
            img_crs, img_transform, shape = crs, from_origin(x0, y0, px / 2, px / 2), (3, 2 * SIZE, 2 * SIZE)
        else:
            w, s, e, n = transform_bounds(crs, "EPSG:4326", x0, y0 - SIZE * px, x0 + SIZE * px, y0)
            img_crs, img_transform, shape = "EPSG:4326", from_origin(w, n, (e - w) / 100, (n - s) / 100), (3, 100, 100)
        imagery = root / "imagery" / f"{city}.tif"
        _write_raster(imagery, rng.integers(0, 255, shape, dtype=np.uint8), img_crs, img_transform, driver="GTiff", nodata=None)
        rows.append({"city": city, "region": "south", "imagery": str(imagery)})
    rows.append({"city": "gamma", "region": "north", "imagery": str(root / "imagery" / "gamma.tif")})  # never written
    gdf = gpd.GeoDataFrame(polys, crs="EPSG:4326")
    gdf.to_parquet(products / "urban_villages.parquet")
    gdf.to_file(products / "urban_villages.gpkg", layer="urban_villages")
    (products / "city_stats.csv").write_text(
        "city,region,uv_area_m2,built_up_area_m2,uv_share,polygons,tiles_ok,tiles_failed\n"
        f"alpha,south,{polys[0]['area_m2']},200000.0,0.2,1,4,0\n"
        f"beta,south,{polys[1]['area_m2']},100000.0,0.256,1,3,1\n"
        "gamma,north,0.0,0.0,,0,0,4\n")
    manifest = RunManifest(run="demo", model_dir="models/m", model_version="v1", classes=("other", "urban_village"),
                           mode="fused", tile_size_px=256, overlap_px=32)
    (products / "run.json").write_text(manifest.to_json())
    return products, rows


@pytest.fixture
def products(tmp_path: Path) -> tuple[Path, list[dict]]:
    return make_products(tmp_path)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails loudly (validation must never fetch a schema)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _stac_bytes(products: Path) -> dict[str, bytes]:
    return {p.relative_to(products).as_posix(): p.read_bytes() for p in sorted((products / "stac").rglob("*")) if p.is_file()}


def test_stac_validates_offline(products, offline):
    products, _ = products
    collection_path = write_stac(products)
    assert collection_path == products / "stac" / "collection.json"
    assert validate_stac(products) == 3  # collection + alpha + beta; gamma failed and has no COGs
    assert sorted(_stac_bytes(products)) == ["stac/alpha/alpha.json", "stac/beta/beta.json", "stac/collection.json"]
    collection = json.loads(collection_path.read_text())
    assert collection["stac_version"] == "1.1.0" and collection["type"] == "Collection" and collection["id"] == "demo"
    assert not [link for link in collection["links"] if link["rel"] == "self"]  # self-contained
    assert collection["assets"]["urban_villages_parquet"]["type"] == "application/vnd.apache.parquet"
    assert collection["assets"]["urban_villages_gpkg"]["type"] == "application/geopackage+sqlite3"


def test_item_geometry_proj_and_stats(products):
    products, _ = products
    write_stac(products)
    bboxes = []
    for city, (crs, x0, y0, px) in CITIES.items():
        item = json.loads((products / "stac" / city / f"{city}.json").read_text())
        expected = transform_bounds(crs, "EPSG:4326", x0, y0 - SIZE * px, x0 + SIZE * px, y0, densify_pts=21)
        assert item["bbox"] == pytest.approx(expected, abs=2e-7)
        footprint = shapely.geometry.shape(item["geometry"])
        assert shapely.box(*item["bbox"]).covers(footprint)
        props = item["properties"]
        assert props["proj:code"] == crs and props["proj:shape"] == [SIZE, SIZE]
        assert props["proj:transform"] == [px, 0.0, x0, 0.0, -px, y0]
        assert props["datetime"] == "1970-01-01T00:00:00Z"
        assert props["geolink:region"] == "south" and props["geolink:tiles_ok"] in (3, 4)
        assert item["assets"]["uv_prob"]["type"] == "image/tiff; application=geotiff; profile=cloud-optimized"
        assert item["assets"]["uv_prob"]["roles"] == ["data"]
        bboxes.append(item["bbox"])
    extent = json.loads((products / "stac" / "collection.json").read_text())["extent"]["spatial"]["bbox"][0]
    assert extent == [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes), max(b[3] for b in bboxes)]


def test_hrefs_are_relative_and_resolve(products):
    products, _ = products
    write_stac(products)
    for path in (products / "stac").rglob("*.json"):
        doc = json.loads(path.read_text())
        hrefs = [a["href"] for a in doc["assets"].values()] + [link["href"] for link in doc["links"]]
        for href in hrefs:
            assert not Path(href).is_absolute() and "://" not in href, (path, href)
            assert (path.parent / href).is_file(), (path, href)
    item = json.loads((products / "stac" / "alpha" / "alpha.json").read_text())
    assert item["assets"]["class"]["href"] == "../../cities/alpha/class.tif"


@pytest.mark.parametrize("breakage, expected", [
    (lambda item: item["properties"].pop("datetime"), "datetime"),
    (lambda item: item.pop("geometry"), "geometry"),
    (lambda item: item["properties"].__setitem__("proj:shape", "64x64"), "proj:shape"),
    (lambda item: item["properties"].__setitem__("proj:epsg", 32649), "proj:epsg"),  # removed in projection v2.0.0
    (lambda item: item["assets"]["uv_prob"].__setitem__("href", "../../cities/beta/missing.tif"), "does not resolve"),
])
def test_broken_item_fails_with_clear_error(products, offline, breakage, expected):
    products, _ = products
    write_stac(products)
    path = products / "stac" / "beta" / "beta.json"
    item = json.loads(path.read_text())
    breakage(item)
    path.write_text(json.dumps(item))
    with pytest.raises(STACProductsError) as info:
        validate_stac(products)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "alpha.json" not in message  # only the broken file is named


def test_extension_without_bundled_schema_is_an_error_not_a_download(products, offline):
    products, _ = products
    write_stac(products)
    path = products / "stac" / "alpha" / "alpha.json"
    item = json.loads(path.read_text())
    item["stac_extensions"].append("https://stac-extensions.github.io/eo/v2.0.0/schema.json")
    path.write_text(json.dumps(item))
    with pytest.raises(STACProductsError, match="eo/v2.0.0/schema.json has no bundled schema"):
        validate_stac(products)


def test_stac_rerun_is_byte_identical(products):
    products, _ = products
    write_stac(products)
    first = _stac_bytes(products)
    write_stac(products)
    assert _stac_bytes(products) == first
    assert not [p for p in products.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_page_and_previews(products, offline):
    products, rows = products
    index = write_page(products, rows)
    text = index.read_text()
    assert "run demo" in text and "model v1" in text
    for city in ("alpha", "beta", "gamma"):
        assert f'id="city-{city}"' in text
    assert '<tr class="failed"><td class="name"><a href="#city-gamma">' in text
    assert '<tr class="partial"><td class="name"><a href="#city-beta">' in text
    assert "http://" not in text and "https://" not in text and "<script" not in text  # works offline
    for city in CITIES:
        png = products / "cities" / city / "preview.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="cities/{city}/preview.png"' in text
    assert not (products / "cities" / "gamma" / "preview.png").exists()
    assert (products / "overview.png").is_file()

    # with the page in place, the STAC lists it (and the previews) and still validates
    write_stac(products)
    assert validate_stac(products) == 3
    collection = json.loads((products / "stac" / "collection.json").read_text())
    assert collection["assets"]["index"]["href"] == "../index.html"
    assert json.loads((products / "stac" / "beta" / "beta.json").read_text())["assets"]["preview"]["type"] == "image/png"


def test_page_reads_imagery_decimated(products, monkeypatch):
    """Every raster read of the page asks for a reduced ``out_shape`` (never the full raster of a large city)."""
    products, rows = products
    calls = []
    real_read = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("out_shape"))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    write_page(products, rows, max_px=32)
    assert calls and all(shape is not None and max(shape[-2:]) <= 32 for shape in calls)


def test_missing_products_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json.*stitch"):
        write_stac(tmp_path)
