"""The model input of real imagery (engine.model_input): bands, 16-bit radiometry and ground resolution, each
applied on read by a VRT, on the real GeoLink example scenes (data nobody here made)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio

from engine.imagery import read_imagery_facts
from engine.model_input import (
    InputSpec,
    ModelInputError,
    Radiometry,
    model_imagery,
    parse_bands,
    resolve_catalog,
)
from engine.imagery_sources import vrt_sources
from engine.scenes import scene_to_city
from tests import real_inputs


@pytest.fixture(scope="module")
def scene(examples_dir, tmp_path_factory):
    """The Boise scene (EPSG:4326, 0.6 m) and its variants: Web Mercator, UTM, 16-bit 4-band, half nodata."""
    root = tmp_path_factory.mktemp("model-input")
    row = scene_to_city(examples_dir / "osm_scenes" / "a702502933_US_21", root / "src")
    src = row["imagery"]
    return {
        "4326": src,
        "3857": str(real_inputs.warp(src, root / "us-3857.tif", "EPSG:3857")),
        "utm": str(real_inputs.warp(src, root / "us-utm.tif", real_inputs.utm_of(src))),
        "uint16": str(real_inputs.uint16_four_band(src, root / "us-uint16.tif")),
        "half": str(real_inputs.half_nodata(src, root / "us-half.tif")),
        "row": row,
    }


def _read(path: str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_8_bit_rgb_at_its_own_gsd_is_read_directly(scene, tmp_path):
    path, plan = model_imagery(scene["4326"], InputSpec(), tmp_path)
    assert path == scene["4326"] and plan.identity and plan.describe() == ""
    assert not any(tmp_path.iterdir()), "nothing is written when nothing must change"


def test_16_bit_with_its_fixed_range_gives_the_8_bit_pixels_back(scene, tmp_path):
    path, plan = model_imagery(scene["uint16"], InputSpec(radiometry=Radiometry.parse("range:0,65535")), tmp_path)
    with rasterio.open(path) as src:
        assert src.count == 3 and src.dtypes == ("uint8",) * 3
    assert np.array_equal(_read(path), _read(scene["4326"]))  # x * 257 * 255 / 65535 = x: exactly the 8-bit scene
    assert plan.describe() == "range:0,65535 (values 0-65535 -> 8-bit)"


def test_16_bit_auto_is_a_per_band_percentile_stretch_from_the_overviews(scene, tmp_path):
    path, plan = model_imagery(scene["uint16"], InputSpec(), tmp_path)
    assert str(plan.radiometry) == "percentile:2,98" and len(plan.value_ranges) == 3
    pixels = _read(path).astype(float)
    for band, (lo, hi) in zip(pixels, plan.value_ranges):
        assert 0 < lo < hi < 65535
        assert 1.0 <= (band == 0).mean() * 100 <= 4.0 and 1.0 <= (band == 255).mean() * 100 <= 4.0  # ~2% clipped each end
    eight = _read(scene["4326"]).astype(float)
    assert np.corrcoef(pixels.ravel(), eight.ravel())[0, 1] > 0.98  # a stretch of the same picture


def test_band_order_is_chosen_by_number(scene, tmp_path):
    path, plan = model_imagery(scene["uint16"], InputSpec(bands=(3, 2, 1), radiometry=Radiometry.parse("range:0,65535")), tmp_path)
    assert np.array_equal(_read(path), _read(scene["4326"])[::-1])
    assert plan.describe().startswith("bands 3,2,1")
    with pytest.raises(ModelInputError, match=r"us-uint16.tif has 4 band\(s\); bands 5,2,1 asks for band 5"):
        model_imagery(scene["uint16"], InputSpec(bands=(5, 2, 1)), tmp_path / "x")


def test_16_bit_declared_8_bit_is_one_line_naming_the_file(scene, tmp_path):
    with pytest.raises(ModelInputError) as err:
        model_imagery(scene["uint16"], InputSpec(radiometry=Radiometry("uint8")), tmp_path)
    assert "us-uint16.tif is uint16 but its radiometry is declared uint8" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("crs", ["4326", "3857", "utm"])
def test_resampled_on_read_to_the_stated_ground_gsd_in_any_crs(scene, crs, tmp_path):
    """In EPSG:3857 a pixel's ground size is its nominal size x cos(latitude): the target is met on the ground."""
    source = scene[crs]
    native = read_imagery_facts(source)
    for target in (0.8, 0.45):
        path, plan = model_imagery(source, InputSpec(gsd_m=target), tmp_path / f"{target}")
        got = read_imagery_facts(path)
        assert got.gsd_m == pytest.approx(target, rel=2e-3) and plan.native_gsd_m == pytest.approx(native.gsd_m)
        with rasterio.open(source) as a, rasterio.open(path) as b:
            pixel = max(abs(b.transform.a), abs(b.transform.e))
            assert all(abs(x - y) <= pixel for x, y in zip(a.bounds, b.bounds)), "the footprint is kept within one pixel"
            assert b.read(window=((b.height - 1, b.height), (0, b.width))).mean() > 20, "no empty edge row"
        assert plan.describe() == f"resampled {native.gsd_m:.2f} m -> {target:.2f} m"


def test_a_source_much_coarser_than_the_model_is_refused_unless_allowed(scene, tmp_path):
    with pytest.raises(ModelInputError, match=r"ground GSD 0.60 m is 6.0x coarser than the model's 0.10 m .*--allow-gsd-mismatch"):
        model_imagery(scene["4326"], InputSpec(gsd_m=0.1), tmp_path)
    path, _ = model_imagery(scene["4326"], InputSpec(gsd_m=0.3, allow_gsd_mismatch=True), tmp_path)  # 2x: within the limit
    assert read_imagery_facts(path).gsd_m == pytest.approx(0.3, rel=2e-3)


def test_nodata_stays_nodata_and_valid_dark_pixels_stay_valid(scene, tmp_path):
    path, _ = model_imagery(scene["half"], InputSpec(bands=(3, 2, 1)), tmp_path)
    with rasterio.open(path) as src:
        mask, pixels = src.dataset_mask(), src.read()
    half = mask.shape[1] // 2
    assert not mask[:, :half].any() and mask[:, half:].all()
    assert pixels[:, :, half:].min() >= 1, "a valid 0 reads as 1, never as nodata"


def test_the_vrt_is_rewritten_only_when_its_content_changes(scene, tmp_path):
    path, _ = model_imagery(scene["uint16"], InputSpec(), tmp_path)
    before = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
    again, _ = model_imagery(scene["uint16"], InputSpec(), tmp_path)
    assert again == path and (Path(path).read_bytes(), os.stat(path).st_mtime_ns) == before
    assert vrt_sources(path) == [str(Path(scene["uint16"]).absolute())]


def test_a_catalog_resolves_city_by_city_and_a_bad_city_is_one_line(scene, tmp_path):
    import pyarrow as pa

    from engine.schema import CATALOG_SCHEMA

    base = {n: None for n in CATALOG_SCHEMA.names}
    rows = [{**base, **scene["row"], "city": "good"},
            {**base, **scene["row"], "city": "sixteen", "imagery": scene["uint16"], "bands": "3,2,1"},
            {**base, **scene["row"], "city": "bad", "imagery": scene["uint16"], "radiometry": "uint8"},
            {**base, **scene["row"], "city": "typo", "bands": "3,2"}]
    catalog = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)
    resolved, plans, errors = resolve_catalog(catalog, lambda c: tmp_path / c, InputSpec())
    assert set(errors) == {"bad", "typo"} and set(plans) == {"good", "sixteen"}
    assert errors["bad"].startswith("city bad: imagery ") and "declared uint8" in errors["bad"]
    assert errors["typo"].startswith("city typo: bands '3,2'")
    by_city = {r["city"]: r for r in resolved.to_pylist()}
    assert by_city["good"]["imagery"] == scene["4326"]
    assert by_city["sixteen"]["imagery"] == str(tmp_path / "sixteen" / "model.vrt") and by_city["sixteen"]["bands"] is None
    # a resolved row resolves to itself: stages may resolve again without applying anything twice
    again, _, errors = resolve_catalog(resolved.filter(pa.array([c in plans for c in resolved["city"].to_pylist()])),
                                       lambda c: tmp_path / "again" / c, InputSpec())
    assert not errors and again["imagery"].to_pylist() == [by_city["good"]["imagery"], by_city["sixteen"]["imagery"]]


def test_option_texts():
    assert parse_bands(" 3,2,1 ") == (3, 2, 1) and parse_bands("") is None
    for bad in ("3,2", "a,b,c", "0,1,2"):
        with pytest.raises(ValueError, match="bands"):
            parse_bands(bad)
    assert Radiometry.parse("percentile") == Radiometry("percentile", 2.0, 98.0)
    for bad in ("stretch", "range:5,1", "percentile:1,200", "uint8:3"):
        with pytest.raises(ValueError, match="radiometry"):
            Radiometry.parse(bad)


def test_catalog_validate_checks_bands_and_radiometry_from_metadata(scene, tmp_path):
    from engine.catalog import load_catalog, validate_catalog, write_catalog

    row = scene["row"]
    rows = [{**row, "city": "declared-8-bit", "imagery": scene["uint16"], "radiometry": "uint8"},
            {**row, "city": "band-five", "imagery": scene["uint16"], "bands": "5,2,1"},
            {**row, "city": "typo", "bands": "3;2;1", "radiometry": "stretch"},
            {**row, "city": "fine", "imagery": scene["uint16"], "bands": "3,2,1", "radiometry": "range:0,65535"}]
    problems = validate_catalog(load_catalog(write_catalog(rows, tmp_path / "catalog.yaml")))
    errors = {(p.city, p.field): p.message for p in problems if p.severity == "error"}
    assert errors[("declared-8-bit", "radiometry")].startswith("declared uint8, but ") and "us-uint16.tif is uint16" in errors[
        ("declared-8-bit", "radiometry")]
    assert "asks for band 5" in errors[("band-five", "bands")]
    assert {("typo", "bands"), ("typo", "radiometry")} <= set(errors)
    assert not [p for p in problems if p.city == "fine"]


def test_float_reflectance_with_nodata_maps_onto_1_to_255(scene, tmp_path):
    """float32 reflectance (0-0.4) with a nodata value: a declared range maps it linearly onto 1..255 (0 stays
    nodata), and auto stretches it per band."""
    with rasterio.open(scene["4326"]) as src:
        reflectance, crs, transform = src.read().astype("float32") / 255 * 0.4, src.crs, src.transform
    path = real_inputs.write_cog(tmp_path / "f32.tif", reflectance, crs, transform, nodata=-9999.0)
    out, plan = model_imagery(str(path), InputSpec(radiometry=Radiometry.parse("range:0,0.4")), tmp_path / "range")
    assert np.abs(_read(out).astype(int) - np.round(reflectance / 0.4 * 254 + 1)).max() == 0
    out, plan = model_imagery(str(path), InputSpec(), tmp_path / "auto")
    assert str(plan.radiometry) == "percentile:2,98" and _read(out).min() >= 1
