"""The change cores (engine/change): change codes robust to misregistration, the after map warped onto the before
grid, nodata, strip independence, the fates of UV polygons and the change statistics."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.features import rasterize
from scipy import ndimage
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from engine.change import (
    CHANGE_CLASSES,
    CHANGE_NODATA,
    FATE_COLUMNS,
    change_codes,
    change_stats,
    colormap,
    fate_counts,
    legend,
    uv_fates,
    write_change_city,
)
from engine.change.codes import DEMOLISHED_UV, NEW_UV, PERSISTENT_UV
from engine.change.stats import CHANGE_STATS_COLUMNS

CRS_UTM = "EPSG:32650"
X0, Y0 = 500_000.0, 3_000_000.0  # top-left of the before grid (UTM 50N, about 27 N 117 E)
H, W = 300, 320  # pixels of 1 m: a little over one COG block, so the COG has an overview
GRID = Affine(1.0, 0.0, X0, 0.0, -1.0, Y0)
CLASSES_BEFORE = ("other", "formal_residential", "urban_village")  # UV index 2
CLASSES_AFTER = ("other", "urban_village")  # a binary model after: UV index 1
UV_B, UV_A = 2, 1


def _blob(cx: float, cy: float, r: float, seed: int, lobes: int = 7):
    """An irregular village outline around (cx, cy) metres from the grid's top-left (y down), with a courtyard."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    radius = r * (1 + 0.25 * np.sin(lobes * angles + rng.uniform(0, 6)) + 0.08 * rng.standard_normal(angles.size))
    poly = Polygon(np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles)]).buffer(0)
    poly = poly.difference(Point(cx + 0.2 * r, cy).buffer(0.15 * r))  # a hole (a pond, a square)
    return affinity.affine_transform(poly, [1, 0, 0, -1, X0, Y0])  # to UTM (y up)


BLOBS = {  # name -> outline (UTM)
    "a": _blob(70, 70, 40, 1), "b": _blob(230, 80, 35, 2), "c": _blob(90, 220, 45, 3), "d": _blob(240, 215, 30, 4),
}
FORMAL = box(X0 + 150, Y0 - 160, X0 + 190, Y0 - 130)  # another built-up class between the villages
SPECKS = [Point(X0 + x, Y0 - y).buffer(1.2) for x, y in ((160, 40), (20, 150), (300, 150), (170, 280))]  # tiny UV bits


def _class_map(blobs, transform, shape, uv: int, formal: int | None, crs_from: str | None = None, crs_to: str | None = None):
    """Rasterise the scene onto a grid (pixel centres), optionally reprojecting the outlines first."""
    geoms = [(g, uv) for g in blobs] + [(g, uv) for g in SPECKS]
    if formal is not None:
        geoms = [(FORMAL, formal)] + geoms
    if crs_from and crs_to:
        tr = Transformer.from_crs(crs_from, crs_to, always_xy=True)
        geoms = [(shapely.transform(g, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))), v) for g, v in geoms]
    return rasterize(geoms, out_shape=shape, transform=transform, fill=0, dtype="uint8")


def _write(path, arr, transform=GRID, crs=CRS_UTM, nodata=255):
    profile = {"driver": "GTiff", "width": arr.shape[1], "height": arr.shape[0], "count": 1, "dtype": "uint8", "crs": crs,
               "transform": transform, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(arr, 1)
    return path


def _shift(arr: np.ndarray, dx: int, dy: int, fill: int = 255) -> np.ndarray:
    """``arr`` moved by dx columns right and dy rows down; the uncovered edge is nodata (as misregistered imagery)."""
    out = np.full_like(arr, fill)
    h, w = arr.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = arr[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds


def _before(tmp_path, blobs=None):
    arr = _class_map((blobs or BLOBS).values(), GRID, (H, W), UV_B, 1)
    return arr, _write(tmp_path / "before.tif", arr)


def _run(tmp_path, before_path, after_arr_or_path, name="change.tif", **kw):
    after = after_arr_or_path if not isinstance(after_arr_or_path, np.ndarray) else _write(tmp_path / f"after-{name}", after_arr_or_path)
    out = tmp_path / name
    result = write_change_city(before_path, after, out, UV_B, UV_A, **kw)
    return result, _read(out)[0]


def _binary(arr: np.ndarray, uv_from: int = UV_B) -> np.ndarray:
    """The before map as the binary model's classes (UV -> 1, the rest -> 0, nodata kept)."""
    return np.where(arr == 255, 255, np.where(arr == uv_from, UV_A, 0)).astype(np.uint8)


# --- codes ---------------------------------------------------------------------------------------------------------

def test_codes_colours_and_legend():
    assert CHANGE_CLASSES == ("other", "persistent_uv", "demolished_uv", "new_uv") and CHANGE_NODATA == 255
    cmap = colormap()
    assert len(cmap) == 256 and len({cmap[i] for i in range(4)}) == 4
    assert [e["value"] for e in legend()] == [0, 1, 2, 3] and all(e["colour"].startswith("#") for e in legend())


# --- misregistration -----------------------------------------------------------------------------------------------

SHIFTS = [(1, 0), (0, -1), (-1, 1), (2, 0), (0, 2), (-2, -1), (2, -2), (3, 0), (0, -3), (-3, 0), (1, 2)]


@pytest.mark.parametrize("dx,dy", SHIFTS)
def test_shifted_map_is_not_change(tmp_path, dx, dy):
    """A 1-3 px misregistration (|shift| <= tolerance) paints no UV border as change: < 1% of the UV area."""
    before, before_path = _before(tmp_path)
    after = _shift(_binary(before), dx, dy)
    result, _ = _run(tmp_path, before_path, after, tolerance_px=3)
    uv_m2 = result["before_uv_m2"]
    assert uv_m2 > 10_000
    assert (result["demolished_uv_m2"] + result["new_uv_m2"]) < 0.01 * uv_m2
    # the test has teeth: without the tolerance the same shift is plenty of "change"
    plain, _ = _run(tmp_path, before_path, after, name="plain.tif", tolerance_px=0)
    assert plain["demolished_uv_m2"] + plain["new_uv_m2"] > 0.03 * uv_m2


@pytest.mark.parametrize("dx,dy", [(1, 1), (-2, 0), (0, 2), (2, -1)])
def test_shift_with_ragged_borders_is_not_change(tmp_path, dx, dy):
    """Shift plus independent 1-px noise on the after map's borders (two runs never trace a border alike)."""
    before, before_path = _before(tmp_path)
    after = _binary(before)
    uv = after == UV_A
    rng = np.random.default_rng(100 + dx * 10 + dy)
    inner = uv & ~ndimage.binary_erosion(uv)
    outer = ndimage.binary_dilation(uv) & ~uv
    after[inner & (rng.random(uv.shape) < 0.3)] = 0
    after[outer & (rng.random(uv.shape) < 0.3)] = UV_A
    result, _ = _run(tmp_path, before_path, _shift(after, dx, dy), tolerance_px=3)
    assert (result["demolished_uv_m2"] + result["new_uv_m2"]) < 0.01 * result["before_uv_m2"]


def test_diagonal_shift_needs_its_euclidean_length():
    """The tolerance is a distance: a (3, 3) shift (4.24 px) exceeds 3 px but not 5."""
    before = np.zeros((80, 80), np.uint8)
    before[20:60, 20:60] = 1
    after = _shift(before, 3, 3, fill=0)
    at3 = change_codes(before, after, 1, 1, 3)
    at5 = change_codes(before, after, 1, 1, 5)
    assert ((at3 == DEMOLISHED_UV) | (at3 == NEW_UV)).any()
    assert not ((at5 == DEMOLISHED_UV) | (at5 == NEW_UV)).any()


def test_true_change_is_recovered(tmp_path):
    """A village demolished and one new, under a 2-px shift: > 95% of each found, little change elsewhere."""
    before_blobs = {k: v for k, v in BLOBS.items() if k != "d"}
    after_blobs = {k: v for k, v in BLOBS.items() if k != "b"}
    _, before_path = _before(tmp_path, before_blobs)
    after = _shift(_class_map(after_blobs.values(), GRID, (H, W), UV_A, None), 2, -1)
    result, codes = _run(tmp_path, before_path, after, tolerance_px=3)
    gone = _class_map([BLOBS["b"]], GRID, (H, W), 1, None) == 1
    came = _shift(_class_map([BLOBS["d"]], GRID, (H, W), 1, None), 2, -1, fill=0) == 1
    assert (codes[gone] == DEMOLISHED_UV).mean() > 0.95
    assert (codes[came] == NEW_UV).mean() > 0.95
    stray = ((codes == DEMOLISHED_UV) & ~gone).sum() + ((codes == NEW_UV) & ~came).sum()
    assert stray < 0.01 * result["before_uv_px"]
    assert result["demolished_uv_px"] == (codes == DEMOLISHED_UV).sum() and result["new_uv_px"] == (codes == NEW_UV).sum()


# --- the COG, its areas, strips ------------------------------------------------------------------------------------

def test_change_cog_and_areas(tmp_path):
    before, before_path = _before(tmp_path)
    result, codes = _run(tmp_path, before_path, _shift(_binary(before), 1, 0))
    with rasterio.open(tmp_path / "change.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert (ds.width, ds.height, ds.dtypes[0], ds.nodata) == (W, H, "uint8", 255)
        assert ds.crs.to_epsg() == 32650 and ds.transform.almost_equals(GRID)
        assert ds.colormap(1)[PERSISTENT_UV] == colormap()[PERSISTENT_UV]
        assert ds.overviews(1)
        assert set(np.unique(ds.read(1, out_shape=(H // 2, W // 2)))) <= {0, 1, 2, 3, 255}
    assert not list(tmp_path.glob(".change-*")) and not list(tmp_path.glob(".change.tmp-*"))
    assert result["warped"] is False and result["pixel_area_m2"] == pytest.approx(1.0)
    counts = [result[f"{name}_px"] for name in CHANGE_CLASSES] + [result["nodata_px"]]
    assert sum(counts) == H * W and result["nodata_px"] == (codes == 255).sum() == H
    # equal-area m2 of 1 m UTM pixels near the central meridian: the scale factor 0.9996 squared
    for name in CHANGE_CLASSES:
        assert result[f"{name}_m2"] == pytest.approx(result[f"{name}_px"] * 0.9992, rel=2e-3)


def test_strip_size_does_not_change_the_result(tmp_path):
    before_blobs = {k: v for k, v in BLOBS.items() if k != "d"}
    _, before_path = _before(tmp_path, before_blobs)
    after = _shift(_class_map([v for k, v in BLOBS.items() if k != "a"], GRID, (H, W), UV_A, None), -2, 2)
    after_path = _write(tmp_path / "after.tif", after)
    big, big_codes = _run(tmp_path, before_path, after_path, name="big.tif", block_rows=512)
    for rows in (7, 1):
        small, small_codes = _run(tmp_path, before_path, after_path, name=f"small{rows}.tif", block_rows=rows)
        assert np.array_equal(big_codes, small_codes)
        assert {k: v for k, v in small.items() if not k.endswith("_m2")} == {k: v for k, v in big.items() if not k.endswith("_m2")}
        for key in (k for k in big if k.endswith("_m2")):
            assert small[key] == pytest.approx(big[key], rel=1e-12)


def test_nodata(tmp_path):
    """Nodata where either date has none; it neither counts as UV nor as land."""
    before, _ = _before(tmp_path)
    before[:, :40] = 255  # before imagery starts at column 40
    before_path = _write(tmp_path / "before-nd.tif", before)
    after = _binary(_class_map(BLOBS.values(), GRID, (H, W), UV_B, 1))
    after[250:, :] = 255  # after imagery ends at row 250
    result, codes = _run(tmp_path, before_path, after)
    expect = (before == 255) | (after == 255)
    assert np.array_equal(codes == 255, expect)
    assert result["nodata_px"] == expect.sum()
    assert result["demolished_uv_px"] == 0 and result["new_uv_px"] == 0  # the nodata edges are not change
    assert result["before_uv_px"] == ((before == UV_B) & ~expect).sum()


def test_errors(tmp_path):
    before, before_path = _before(tmp_path)
    with pytest.raises(ValueError, match="uv_index_before"):
        write_change_city(before_path, before_path, tmp_path / "x.tif", 255, 1)
    with pytest.raises(ValueError, match="tolerance_px"):
        write_change_city(before_path, before_path, tmp_path / "x.tif", 2, 2, tolerance_px=-1)
    no_crs = tmp_path / "nocrs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=W, height=H, count=1, dtype="uint8", transform=GRID) as ds:
        ds.write(before, 1)
    with pytest.raises(ValueError, match="no CRS"):
        write_change_city(before_path, no_crs, tmp_path / "x.tif", 2, 1)
    assert not (tmp_path / "x.tif").exists() and not list(tmp_path.glob(".change-*"))


# --- different grids: the after map warped onto the before grid ----------------------------------------------------

def _after_on(tmp_path, transform, shape, crs=CRS_UTM, blobs=None, name="after-grid.tif"):
    arr = _class_map((blobs or BLOBS).values(), transform, shape, UV_A, None, CRS_UTM, crs if crs != CRS_UTM else None)
    return _write(tmp_path / name, arr, transform, crs)


@pytest.mark.parametrize("case", ["half_pixel", "coarser", "other_crs"])
def test_after_on_another_grid_is_warped(tmp_path, case):
    """Half a pixel off, at 2 m instead of 1 m, or in another CRS: read on the before grid (nearest), so the same
    villages are persistent, and a village missing after is demolished at the right place."""
    before_blobs = dict(BLOBS)
    after_blobs = {k: v for k, v in BLOBS.items() if k != "c"}
    _, before_path = _before(tmp_path, before_blobs)
    if case == "half_pixel":
        # half a pixel up and left, one pixel larger: still covers the before grid
        path = _after_on(tmp_path, GRID @ Affine.translation(-0.5, -0.5), (H + 1, W + 1), blobs=after_blobs)
    elif case == "coarser":  # 2 m pixels, a larger extent starting 10 m further left and up
        path = _after_on(tmp_path, Affine(2.0, 0, X0 - 10, 0, -2.0, Y0 + 10), (H // 2 + 10, W // 2 + 10), blobs=after_blobs)
    else:  # the neighbouring UTM zone (49N), 1 m pixels, rotated against ours by the grid convergence
        tr = Transformer.from_crs(CRS_UTM, "EPSG:32649", always_xy=True)
        xs, ys = tr.transform([X0, X0 + W, X0, X0 + W], [Y0, Y0, Y0 - H, Y0 - H])
        left, top = math.floor(min(xs)) - 5, math.ceil(max(ys)) + 5
        shape = (int(max(ys) - min(ys)) + 10, int(max(xs) - min(xs)) + 10)
        path = _after_on(tmp_path, Affine(1.0, 0, left, 0, -1.0, top), shape, crs="EPSG:32649", blobs=after_blobs)
    result, codes = _run(tmp_path, before_path, path, tolerance_px=3)
    assert result["warped"] is True
    gone = _class_map([BLOBS["c"]], GRID, (H, W), 1, None) == 1
    assert (codes[gone] == DEMOLISHED_UV).mean() > 0.95
    stray = ((codes == DEMOLISHED_UV) & ~gone).sum() + (codes == NEW_UV).sum()
    assert stray < 0.01 * result["before_uv_px"]
    assert result["nodata_px"] == 0  # the after map covers the before grid in every case


def test_after_map_smaller_than_before_is_nodata_outside(tmp_path):
    before, before_path = _before(tmp_path)
    after = _binary(before)[:, :200]  # same resolution, covers columns 0-199 only
    path = _write(tmp_path / "after-small.tif", after)
    result, codes = _run(tmp_path, before_path, path)
    assert result["warped"] is True
    assert (codes[:, 200:] == 255).all() and (codes[:, :200] != 255).all()
    assert result["demolished_uv_px"] == 0 and result["new_uv_px"] == 0


def test_geographic_crs_areas_are_ground_areas(tmp_path):
    """In EPSG:4326 every row's pixels are measured on the ground (equal-area), not as square degrees."""
    step = 1e-5
    transform = Affine(step, 0, 117.0, 0, -step, 45.0)
    before = np.zeros((200, 200), np.uint8)
    before[50:150, 50:150] = 1
    bp = _write(tmp_path / "b.tif", before, transform, "EPSG:4326")
    ap = _write(tmp_path / "a.tif", np.zeros_like(before), transform, "EPSG:4326")
    result = write_change_city(bp, ap, tmp_path / "c.tif", 1, 1, tolerance_px=2)
    assert math.isnan(result["pixel_area_m2"])
    ground, _ = Geod(ellps="WGS84").geometry_area_perimeter(box(117.0 + 50 * step, 45.0 - 150 * step, 117.0 + 150 * step, 45.0 - 50 * step))
    assert result["demolished_uv_m2"] == pytest.approx(abs(ground), rel=2e-3)


# --- fates ---------------------------------------------------------------------------------------------------------

def _gdf(boxes: dict, city="x"):
    """UTM boxes (metres from the origin) -> a city's urban_villages rows in EPSG:4326."""
    ids = list(boxes)
    geoms = [box(X0 + a, Y0 + b, X0 + c, Y0 + d) for a, b, c, d in boxes.values()]
    return gpd.GeoDataFrame({"uv_id": ids, "city": city, "region": "r"}, geometry=geoms, crs=CRS_UTM).to_crs(4326)


BEFORE = _gdf({
    "x-01": (0, 0, 100, 100),        # persisted (moved 2 m by misregistration)
    "x-02": (200, 0, 300, 100),      # shrunk to half
    "x-03": (400, 0, 450, 50),       # grew to double
    "x-04": (600, 0, 700, 100),      # demolished, and a new village built 2 m beside it
    "x-05": (0, 300, 40, 340),       # merged with x-06 into one village
    "x-06": (50, 300, 90, 340),
    "x-07": (200, 300, 300, 340),    # split in two by a new road
    "x-08": (900, 900, 950, 950),    # demolished, nothing near
})
AFTER = _gdf({
    "x-01": (2, 1, 102, 101),
    "x-02": (200, 0, 300, 50),
    "x-03": (400, 0, 450, 100),
    "x-04": (702, 0, 760, 100),
    "x-05": (0, 300, 92, 340),
    "x-06": (200, 300, 245, 340),
    "x-07": (255, 300, 300, 340),
    "x-08": (2000, 0, 2050, 50),     # new, nothing near
})


def _fates():
    return uv_fates(BEFORE, AFTER, CRS_UTM, 3.0)


def test_each_fate_on_hand_made_polygons():
    f = _fates()
    assert tuple(f.columns) == FATE_COLUMNS and f.crs.to_epsg() == 4326
    fate = {(r.date, r.uv_id): r.fate for r in f.itertuples()}
    assert fate[("before", "x-01")] == fate[("after", "x-01")] == "persisted"
    assert fate[("before", "x-02")] == fate[("after", "x-02")] == "shrunk"
    assert fate[("before", "x-03")] == fate[("after", "x-03")] == "grew"
    assert fate[("before", "x-04")] == "demolished" and fate[("after", "x-04")] == "new"  # 2 m apart: a sliver, no match
    assert fate[("before", "x-08")] == "demolished" and fate[("after", "x-08")] == "new"
    assert fate[("before", "x-05")] == fate[("before", "x-06")] == fate[("after", "x-05")] == "persisted"
    assert fate[("before", "x-07")] == fate[("after", "x-06")] == fate[("after", "x-07")] == "persisted"
    match = {(r.date, r.uv_id): r.match for r in f.itertuples()}
    assert match[("after", "x-05")] == "merge" and match[("before", "x-07")] == "split" and match[("before", "x-01")] == "one_to_one"
    assert match[("before", "x-04")] == "unmatched"


def test_fate_rows_measure_and_link():
    f = _fates()
    row = f[(f.date == "before") & (f.uv_id == "x-01")].iloc[0]
    partner = f[(f.date == "after") & (f.uv_id == "x-01")].iloc[0]
    assert row.change_id == partner.change_id == "x-c1"
    assert row.area_m2 == pytest.approx(10_000, rel=3e-3)  # equal-area of a 100 m UTM square
    assert row.overlap_m2 == pytest.approx(98 * 99, rel=3e-3) and row.overlap_share == pytest.approx(0.9702, abs=3e-3)
    assert row.matched_ids == "x-01" and row.n_matched == 1 and row.area_ratio == pytest.approx(1.0, abs=1e-3)
    merged = f[(f.date == "after") & (f.uv_id == "x-05")].iloc[0]
    assert merged.matched_ids == "x-05,x-06" and merged.n_matched == 2
    assert merged.group_before_m2 == pytest.approx(3200, rel=3e-3) and merged.group_after_m2 == pytest.approx(3680, rel=3e-3)
    gone = f[(f.date == "before") & (f.uv_id == "x-08")].iloc[0]
    assert gone.matched_ids == "" and gone.n_matched == 0 and gone.overlap_share == 0.0 and math.isnan(gone.area_ratio)
    assert (f.region == "r").all() and (f.city == "x").all()


def test_fates_are_deterministic_and_ordered():
    f = _fates()
    shuffled = uv_fates(BEFORE.sample(frac=1, random_state=3), AFTER.sample(frac=1, random_state=4), CRS_UTM, 3.0)
    assert f.drop(columns="geometry").equals(shuffled.drop(columns="geometry"))
    assert f.geometry.geom_equals_exact(shuffled.geometry, 0).all()
    groups = [int(c.split("-c")[1]) for c in f.change_id]
    assert groups == sorted(groups) and groups[0] == 1
    assert uv_fates(BEFORE, AFTER, None, 3.0).drop(columns="geometry").equals(f.drop(columns="geometry"))  # UTM chosen


def test_fates_without_tolerance_or_polygons():
    no_tol = uv_fates(BEFORE, AFTER, CRS_UTM, 0.0)
    assert no_tol.set_index(["date", "uv_id"]).loc[("before", "x-01"), "fate"] == "persisted"  # still overlapping
    only_before = uv_fates(BEFORE, AFTER.iloc[0:0], CRS_UTM, 3.0)
    assert set(only_before.fate) == {"demolished"} and len(only_before) == len(BEFORE)
    empty = uv_fates(BEFORE.iloc[0:0], AFTER.iloc[0:0], CRS_UTM, 3.0, city="x")
    assert len(empty) == 0 and tuple(empty.columns) == FATE_COLUMNS


def test_fate_counts():
    counts = fate_counts(_fates())
    assert counts == {"polygons_before": 8, "polygons_after": 8, "polygons_persisted": 4, "polygons_shrunk": 1,
                      "polygons_grew": 1, "polygons_demolished": 2, "polygons_new": 2}


# --- stats ---------------------------------------------------------------------------------------------------------

def test_change_stats_arithmetic():
    base = {"polygons_before": 4, "polygons_after": 5, "polygons_persisted": 2, "polygons_shrunk": 1, "polygons_grew": 0,
            "polygons_demolished": 1, "polygons_new": 2}
    rows = change_stats([
        {"city": "b", "region": "south", "persistent_uv_m2": 920.0, "demolished_uv_m2": 100.0, "new_uv_m2": 50.0,
         "before_uv_m2": 1000.0, "after_uv_m2": 930.0, **base},
        {"city": "a", "region": "north", "persistent_uv_m2": 310.0, "demolished_uv_m2": 0.0, "new_uv_m2": 60.0,
         "before_uv_m2": 300.0, "after_uv_m2": 350.0, **base},
        {"city": "c", "region": "south", "persistent_uv_m2": 600.0, "demolished_uv_m2": 400.0, "new_uv_m2": 0.0,
         "before_uv_m2": 1000.0, "after_uv_m2": 600.0, **base},
        {"city": "d", "region": "south", "status": "failed"},
    ])
    assert [tuple(r) for r in rows] == [CHANGE_STATS_COLUMNS] * 7
    assert [(r["level"], r["region"], r["city"]) for r in rows] == [
        ("city", "south", "b"), ("city", "north", "a"), ("city", "south", "c"), ("city", "south", "d"),
        ("region", "north", ""), ("region", "south", ""), ("national", "", "")]
    b, a, c, d, north, south, nation = rows
    assert b["demolished_share"] == pytest.approx(0.1) and b["net_change_m2"] == -50.0 and b["new_share"] == pytest.approx(0.05)
    assert a["demolished_share"] == 0.0 and a["net_change_share"] == pytest.approx(0.2)
    assert c["demolished_share"] == pytest.approx(0.4) and c["net_change_m2"] == -400.0
    assert north["cities"] == 1 and {k: north[k] for k in CHANGE_STATS_COLUMNS[3:]} == {k: a[k] for k in CHANGE_STATS_COLUMNS[3:]}
    assert d["cities"] == 0 and math.isnan(d["persistent_uv_m2"]) and d["polygons_new"] is None and math.isnan(d["demolished_share"])
    assert south["cities"] == 2 and south["persistent_uv_m2"] == 1520.0 and south["demolished_uv_m2"] == 500.0
    assert south["demolished_share"] == pytest.approx(0.25) and south["net_change_m2"] == -450.0
    assert south["polygons_new"] == 4 and south["polygons_before"] == 8
    assert nation["cities"] == 3 and nation["new_uv_m2"] == 110.0 and nation["after_uv_m2"] == 1880.0
    assert nation["demolished_share"] == pytest.approx(500 / 2300) and nation["net_change_share"] == pytest.approx(-390 / 2300)
    assert nation["polygons_persisted"] == 6


def test_change_stats_not_measured_propagates():
    rows = change_stats([
        {"city": "a", "region": "r", "persistent_uv_m2": 10.0, "demolished_uv_m2": 0.0, "new_uv_m2": 0.0,
         "before_uv_m2": 10.0, "after_uv_m2": 10.0},  # no polygon counts
        {"city": "b", "region": "r", "persistent_uv_m2": 0.0, "demolished_uv_m2": 0.0, "new_uv_m2": 5.0, "polygons_new": 1,
         "before_uv_m2": 0.0, "after_uv_m2": float("nan")},
    ])
    a, b, region, nation = rows
    assert a["polygons_new"] is None and b["polygons_new"] == 1 and region["polygons_new"] is None
    assert math.isnan(b["demolished_share"]) and math.isnan(b["after_uv_m2"]) and math.isnan(nation["after_uv_m2"])
    assert region["persistent_uv_m2"] == 10.0 and region["before_uv_m2"] == 10.0 and region["new_share"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no city"):
        change_stats([{"region": "r"}])
