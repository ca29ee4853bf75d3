"""Vintages in the generator (issue 22): the first date is the single-date city, the later one changes as real cities,
sensors and OSM histories do, and the change truth agrees with the two truth rasters and the blocks' fates."""

import hashlib
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import yaml
from rasterio.features import rasterize

from engine.schema import CLASS_ID
from engine.synth.city import city_rng
from engine.synth.config import SynthConfig, VintageConfig, draw_city_params
from engine.synth.demo import demo_city_specs, write_demo
from engine.synth.layout import build_layout
from engine.synth.vintage import CHANGE_CODES, CHANGE_NODATA, check_vintages, evolve_layout, generate_city_vintages, vintage_rng
from engine.workspace import Workspace

VINTAGES = ("2018", "2024")
# villages in every city, enough OSM to have stale tags to find; no clouds, so the shift can be measured everywhere
CFG = SynthConfig(size_km=0.8, uv_share_mean=0.2, cloud_prob=0.0, osm_completeness=(0.7, 0.95), vintage=VintageConfig(osm_stale_share=0.6))
N_CITIES, SEED = 4, 3
SAME = ("imagery.tif", "truth.tif", "osm.parquet", "reference.parquet", "buildings.parquet", "population.tif", "co2.tif",
        "population_buildings.parquet")
FATE_CODE = {"other": 0, "persisted": 1, "demolished": 2, "redeveloped": 2, "new_uv": 3}
UV = "urban_village"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> tuple[Path, Path]:
    """The same demo written with two vintages and with one date."""
    root = tmp_path_factory.mktemp("vintages")
    write_demo(root / "dated", n_cities=N_CITIES, cfg=CFG, seed=SEED, workers=2, vintages=VINTAGES)
    write_demo(root / "single", n_cities=N_CITIES, cfg=CFG, seed=SEED, workers=2)
    return root / "dated", root / "single"


@pytest.fixture(scope="module")
def cities(workspaces) -> list[dict]:
    """Per city: its folder, both dates' truth and imagery arrays, meta and the change files."""
    dated, _ = workspaces
    out = []
    for spec in demo_city_specs(N_CITIES):
        d = dated / "cities" / spec.city
        rec = {"city": spec.city, "dir": d, "blocks": gpd.read_parquet(d / "change_blocks.parquet")}
        for v in VINTAGES:
            with rasterio.open(d / v / "truth.tif") as src:
                rec[f"truth_{v}"], rec["transform"], rec["crs"] = src.read(1), src.transform, src.crs
            with rasterio.open(d / v / "imagery.tif") as src:
                rec[f"rgb_{v}"] = src.read().astype(np.float32)
                assert src.transform == rec["transform"] and src.crs == rec["crs"]  # every date on the first date's grid
            rec[f"meta_{v}"] = json.loads((d / v / "meta.json").read_text())
        with rasterio.open(d / "change_truth.tif") as src:
            rec["change"], change_transform, nodata = src.read(1), src.transform, src.nodata
        assert change_transform == rec["transform"] and nodata == CHANGE_NODATA
        out.append(rec)
    return out


def test_first_vintage_is_the_single_date_city(workspaces):
    dated, single = workspaces
    for spec in demo_city_specs(N_CITIES):
        first, alone = dated / "cities" / spec.city / VINTAGES[0], single / "cities" / spec.city
        assert {f: _sha(first / f) for f in SAME} == {f: _sha(alone / f) for f in SAME}, spec.city
        meta = json.loads((first / "meta.json").read_text())
        assert meta.pop("vintage") == {"name": "2018", "index": 0, "vintages": list(VINTAGES)}
        assert meta == json.loads((alone / "meta.json").read_text())


def test_catalog_has_a_row_per_city_and_vintage(workspaces):
    dated, _ = workspaces
    rows = yaml.safe_load((dated / "catalog.yaml").read_text())["cities"]
    assert len(rows) == 2 * N_CITIES
    assert len({(r["city"], r["vintage"]) for r in rows}) == len(rows)
    ws = Workspace.at(dated)
    for spec in demo_city_specs(N_CITIES):
        mine = [r for r in rows if r["city"] == spec.city]
        assert [r["vintage"] for r in mine] == list(VINTAGES)
        for key in ("region", "split", "aoi"):
            assert mine[0][key] == mine[1][key]
        for r in mine:
            for key in ("imagery", "osm", "buildings", "reference", "population", "co2"):
                assert r[key] == f"cities/{spec.city}/{r['vintage']}/{Path(r[key]).name}" and (dated / r[key]).is_file()
        assert (ws.city_inputs(spec.city) / "change_truth.tif").is_file()
        assert (ws.city_inputs(spec.city) / "change_blocks.parquet").is_file()


def test_change_truth_follows_the_truth_rasters_references_and_fates(cities):
    uv = CLASS_ID[UV]
    for c in cities:
        before, after = c["truth_2018"], c["truth_2024"]
        expected = np.where(before == uv, np.where(after == uv, 1, 2), np.where(after == uv, 3, 0)).astype(np.uint8)
        expected[before == CLASS_ID["nodata"]] = CHANGE_NODATA
        assert (c["change"] == expected).all(), c["city"]
        assert ((before == 0) == (after == 0)).all()  # the same AOI at both dates

        blocks = c["blocks"]
        assert list(blocks.columns) == ["block_id", "class_2018", "class_2024", "fate", "geometry"] and blocks.crs.to_epsg() == 4326
        for v in VINTAGES:  # each date's reference holds that date's blocks and classes
            ref = gpd.read_parquet(c["dir"] / v / "reference.parquet")
            ref = ref[ref["block_id"] >= 0].set_index("block_id")
            assert ref.loc[blocks["block_id"], "class"].tolist() == blocks[f"class_{v}"].tolist()
        # each block's pixels carry the code of its fate
        ids = rasterize(zip(blocks.to_crs(c["crs"]).geometry, range(1, len(blocks) + 1)), out_shape=before.shape, transform=c["transform"],
                        fill=0, dtype="int32")
        for i, fate in enumerate(blocks["fate"], start=1):
            codes = c["change"][(ids == i) & (c["change"] != CHANGE_NODATA)]
            if codes.size >= 20:
                assert np.bincount(codes, minlength=4).argmax() == FATE_CODE[fate], (c["city"], i, fate)


def test_villages_are_demolished_redeveloped_and_founded_near_the_knobs(cities):
    knobs = CFG.vintage
    totals = {k: 0.0 for k in ("uv", "demolished", "redeveloped", "new_uv")}
    for c in cities:
        blocks = c["blocks"].to_crs(c["crs"])
        area = blocks.area
        was_uv = (blocks["class_2018"] == UV).to_numpy()
        uv_area = float(area[was_uv].sum())
        half_block = float(area[was_uv].max()) / 2 + 1.0
        got = {f: float(area[blocks["fate"] == f].sum()) for f in ("demolished", "redeveloped", "new_uv")}
        # whole blocks: each amount within half the largest village block of its target
        assert abs(got["demolished"] - knobs.demolish_share * uv_area) <= half_block, c["city"]
        assert abs(got["redeveloped"] - knobs.redevelop_share * uv_area) <= half_block, c["city"]
        assert (blocks.loc[blocks["fate"] == "demolished", "class_2024"] == "vacant").all()
        assert blocks.loc[blocks["fate"] == "redeveloped", "class_2024"].isin(["formal_residential", "commercial"]).all()
        assert blocks.loc[blocks["fate"] == "new_uv", "class_2018"].isin(["vacant", "farmland", "green"]).all()
        totals["uv"] += uv_area
        for k, v in got.items():
            totals[k] += v
    for key, share in (("demolished", knobs.demolish_share), ("redeveloped", knobs.redevelop_share), ("new_uv", knobs.new_uv_share)):
        assert 0.5 * share < totals[key] / totals["uv"] < 1.6 * share, (key, totals)
    # in pixels too: the change map's demolished share of the first date's villages
    codes = np.concatenate([c["change"].ravel() for c in cities])
    lost = (codes == 2).sum() / np.isin(codes, (1, 2)).sum()
    assert 0.5 * (knobs.demolish_share + knobs.redevelop_share) < lost < 1.6 * (knobs.demolish_share + knobs.redevelop_share)


def test_renewal_projects_take_neighbouring_villages_together():
    """Demolitions cluster: the demolished blocks of a city lie much closer together than as many village blocks
    picked at random (villages themselves cluster, so the comparison is with random villages, not random land)."""
    cfg = SynthConfig(size_km=1.5, uv_share_mean=0.25)
    knobs = VintageConfig(demolish_share=0.3, redevelop_share=0.0, new_uv_share=0.0)
    ratios = []
    for spec in demo_city_specs(8):
        rng = city_rng(1, spec.city)
        params = draw_city_params(cfg, rng, spec.region)
        layout = build_layout(params, cfg.size_km * 1000.0, rng)
        _, fate = evolve_layout(layout, params, knobs, vintage_rng(1, spec.city, "2024"))
        uv = np.flatnonzero(layout.block_class == CLASS_ID[UV])
        picked = np.flatnonzero(fate == 2)
        if len(picked) < 3:
            continue

        def spread(chosen: np.ndarray) -> float:
            d = shapely.distance(layout.blocks[chosen][:, None], layout.blocks[chosen][None, :])
            return float(d[~np.eye(len(chosen), dtype=bool)].mean())

        draws = np.random.default_rng(0)
        ratios.append(spread(picked) / np.mean([spread(draws.choice(uv, len(picked), replace=False)) for _ in range(30)]))
    assert len(ratios) >= 5
    assert np.median(ratios) < 0.6, ratios


def _phase_shift(a: np.ndarray, b: np.ndarray, upsample: int = 20) -> tuple[float, float]:
    """``(dx, dy)`` that ``b``'s content is moved by relative to ``a``'s: FFT phase correlation, refined to
    1/``upsample`` px by evaluating the correlation's inverse DFT on a fine grid around the peak (Guizar-Sicairos et
    al. 2008, as skimage.registration.phase_cross_correlation does; skimage is not a dependency)."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    cross = np.fft.fft2((b - b.mean()) * window) * np.conj(np.fft.fft2((a - a.mean()) * window))
    cross /= np.abs(cross) + 1e-9
    h, w = cross.shape
    r, c = np.unravel_index(np.argmax(np.fft.ifft2(cross).real), cross.shape)
    r, c = (r - h if r > h / 2 else r), (c - w if c > w / 2 else c)
    steps = np.arange(-1.5, 1.5 + 1e-9, 1.0 / upsample)
    ys, xs = r + steps, c + steps
    fine = (np.exp(2j * np.pi * np.outer(ys, np.fft.fftfreq(h))) @ cross @ np.exp(2j * np.pi * np.outer(np.fft.fftfreq(w), xs))).real
    i, j = np.unravel_index(np.argmax(fine), fine.shape)
    return float(xs[j]), float(ys[i])


def test_later_image_is_misregistered_0_to_3_px_and_another_sensor_season_and_sun(cities):
    for c in cities:
        look = c["meta_2024"]["vintage"]["look"]
        true_dx, true_dy = look["shift_px"]
        assert np.hypot(true_dx, true_dy) <= 3.0
        # measured in the middle of the city, away from the AOI's edge (nodata in the same place at both dates)
        h, w = c["truth_2018"].shape
        half = min(256, int(0.3 * min(h, w)))
        crop = (slice(h // 2 - half, h // 2 + half), slice(w // 2 - half, w // 2 + half))
        assert (c["truth_2018"][crop] > 0).all()
        grey = [c[f"rgb_{v}"].mean(axis=0)[crop] for v in VINTAGES]
        dx, dy = _phase_shift(*grey)
        assert abs(dx - true_dx) < 0.3 and abs(dy - true_dy) < 0.3, (c["city"], (dx, dy), (true_dx, true_dy))
        # radiometry: per-band means on unchanged ground differ beyond noise, the colour balance with them
        valid = np.isin(c["change"], (0, 1)) & (c["truth_2018"] == c["truth_2024"])
        means = [c[f"rgb_{v}"][:, valid].mean(axis=1) for v in VINTAGES]
        assert np.abs(means[1] - means[0]).max() > 3.0, (c["city"], means)
        first, later = c["meta_2018"]["params"], c["meta_2024"]["params"]
        for key in ("sun_azimuth_deg", "sun_elevation_deg", "color_gain", "blur_px", "noise_dn"):
            assert later[key] != first[key], key
        assert later["pixel_size_m"] == first["pixel_size_m"]
        assert any(look["band_offset"]) and look["band_mix"] != [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_later_osm_grows_retires_changed_features_and_keeps_stale_tags(cities):
    """OSM's history: ids persist with what they map; on unchanged ground the earlier OSM is a subset of the later,
    which has more; features go only where the land use changed, and some changed blocks keep stale tags."""
    stale_found, counts = 0, {v: 0 for v in VINTAGES}
    for c in cities:
        before, after = (gpd.read_parquet(c["dir"] / v / "osm.parquet").set_index("osm_id") for v in VINTAGES)
        counts["2018"] += len(before)
        counts["2024"] += len(after)
        kept = before.index.intersection(after.index)
        assert len(kept) > 0.7 * len(before)
        assert (before.loc[kept, "geometry"].to_wkb() == after.loc[kept, "geometry"].to_wkb()).all()
        assert before.loc[kept, "tags"].map(dict).tolist() == after.loc[kept, "tags"].map(dict).tolist()
        blocks = c["blocks"]
        changed = shapely.union_all(shapely.buffer(blocks.loc[blocks["fate"].isin(["demolished", "redeveloped", "new_uv"]), "geometry"].to_numpy(), 1e-5))
        on_changed = {v: shapely.within(t.geometry.representative_point().to_numpy(), changed) for v, t in zip(VINTAGES, (before, after))}
        steady_before, steady_after = before.index[~on_changed["2018"]], after.index[~on_changed["2024"]]
        assert steady_before.difference(steady_after).empty and len(steady_after) > len(steady_before), c["city"]
        assert before.index.difference(after.index).isin(before.index[on_changed["2018"]]).all()  # gone: only from changed blocks
        # stale: a demolished or redeveloped village block still tagged as housing or a village in the later OSM
        tags = after["tags"].map(dict)
        housing = after[tags.map(lambda t: t.get("landuse") == "residential" or t.get("place") == "village")]
        pts = housing.geometry.representative_point().to_numpy()
        for poly in blocks.loc[blocks["fate"].isin(["demolished", "redeveloped"]), "geometry"]:
            stale_found += int(shapely.within(pts, shapely.buffer(poly, 1e-6)).any())
        assert c["meta_2024"]["vintage"]["osm"]["late_mapped"] > 0
    assert counts["2024"] > counts["2018"]
    assert stale_found > 0


def test_same_arguments_same_bytes(tmp_path, workspaces):
    dated, _ = workspaces
    spec = demo_city_specs(N_CITIES)[2]
    generate_city_vintages(spec, CFG, SEED, tmp_path, VINTAGES)
    ours, theirs = tmp_path / spec.city, dated / "cities" / spec.city
    files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
    assert len(files) == 2 + 2 * 9
    assert {f: _sha(ours / f) for f in files} == {f: _sha(theirs / f) for f in files}


def test_three_vintages_change_truth_spans_first_to_last(tmp_path):
    cfg = SynthConfig(size_km=0.5, uv_share_mean=0.25)
    spec = demo_city_specs(3)[2]
    rows = generate_city_vintages(spec, cfg, 0, tmp_path, ("2016", "2020", "2024"))
    assert [r["vintage"] for r in rows] == ["2016", "2020", "2024"]
    d = tmp_path / spec.city
    blocks = pq.read_table(d / "change_blocks.parquet").to_pandas()
    assert [k for k in blocks.columns if k.startswith("class_")] == ["class_2016", "class_2020", "class_2024"]
    truths = {}
    for v in ("2016", "2024"):
        with rasterio.open(d / v / "truth.tif") as src:
            truths[v] = src.read(1)
    with rasterio.open(d / "change_truth.tif") as src:
        change = src.read(1)
    uv = CLASS_ID[UV]
    assert ((change == 2) == ((truths["2016"] == uv) & (truths["2024"] != uv) & (truths["2016"] != 0))).all()
    assert ((change == 3) == ((truths["2016"] != uv) & (truths["2024"] == uv))).all()
    meta = json.loads((d / "2024" / "meta.json").read_text())["vintage"]
    assert meta["previous"] == "2020" and meta["look"]["tree_growth"] == pytest.approx(1.15**2 - 1, abs=1e-6)


@pytest.mark.parametrize("vintages, message", [(("2018",), "at least two"), (("2024", "2018"), "chronological"),
                                               (("2018", "2018"), "once"), (("2018", "Spring 2024"), "slug")])
def test_vintage_names_are_checked(tmp_path, vintages, message):
    with pytest.raises(ValueError, match=message):
        check_vintages(vintages)
    with pytest.raises(ValueError, match=message):
        write_demo(tmp_path, n_cities=1, cfg=SynthConfig(size_km=0.3), workers=1, vintages=vintages)
    assert not (tmp_path / "catalog.yaml").exists() and not (tmp_path / "cities").exists()


def test_change_codes_are_the_change_maps():
    codes = pytest.importorskip("engine.change.codes")
    assert CHANGE_CODES == {"other": codes.OTHER, "persistent_uv": codes.PERSISTENT_UV, "demolished_uv": codes.DEMOLISHED_UV,
                            "new_uv": codes.NEW_UV}
    assert CHANGE_NODATA == codes.CHANGE_NODATA
