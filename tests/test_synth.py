import hashlib
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.features import rasterize

from engine.catalog import load_catalog
from engine.geoparquet import read_geoparquet_crs
from engine.schema import CITY_SLUG_RE, CLASS_ID, OSM_FEATURES_SCHEMA, schema_problems
from engine.synth.city import CitySpec, generate_city
from engine.synth.config import SynthConfig
from engine.synth.demo import demo_city_specs, load_city_table

from .conftest import TINY

FILES = ("imagery.tif", "truth.tif", "osm.parquet", "reference.parquet", "meta.json")


def _digests(city_dir: Path) -> dict[str, str]:
    return {f: hashlib.sha256((city_dir / f).read_bytes()).hexdigest() for f in FILES}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = CitySpec("chengdu", "Chengdu", "southwest", 30.657, 104.066)
    generate_city(spec, TINY, 3, tmp_path / "a")
    generate_city(spec, TINY, 3, tmp_path / "b")
    generate_city(spec, TINY, 4, tmp_path / "c")
    assert _digests(tmp_path / "a" / "chengdu") == _digests(tmp_path / "b" / "chengdu")
    other = _digests(tmp_path / "c" / "chengdu")
    assert all(other[f] != _digests(tmp_path / "a" / "chengdu")[f] for f in FILES)


def test_imagery_is_utm_tiled_compressed_with_nodata_outside_aoi(demo_workspace):
    for row in load_catalog(demo_workspace / "catalog.yaml").to_pylist():
        meta = json.loads((Path(row["imagery"]).parent / "meta.json").read_text())
        lon, lat = meta["centre_lonlat"]
        with rasterio.open(row["imagery"]) as src:
            assert src.crs.to_epsg() == 32600 + int((lon + 180) // 6) + 1
            assert src.count == 3 and src.dtypes == ("uint8",) * 3 and src.nodata == 0
            assert 0.5 <= src.res[0] == src.res[1] <= 1.2
            assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1)
            assert [ci.name for ci in src.colorinterp] == ["red", "green", "blue"]
            # the city centre lies inside the raster, at its middle
            x, y = rasterio.warp.transform("EPSG:4326", src.crs, [lon], [lat])
            r, c = src.index(x[0], y[0])
            assert abs(r - src.height / 2) <= 1 and abs(c - src.width / 2) <= 1
            img = src.read()
            aoi_mask = src.dataset_mask() > 0
        assert (img[:, ~aoi_mask] == 0).all() and (img[:, aoi_mask] > 0).all()
        assert 0.5 < aoi_mask.mean() < 0.98  # an irregular city outline, not the whole square


def test_reference_polygons_land_on_their_pixels(demo_workspace):
    """Reference polygons (EPSG:4326) reprojected and burned into the imagery grid match the truth raster."""
    for row in load_catalog(demo_workspace / "catalog.yaml").to_pylist():
        truth_path = Path(row["imagery"]).parent / "truth.tif"
        with rasterio.open(truth_path) as src:
            truth, transform, crs, shape = src.read(1), src.transform, src.crs, (src.height, src.width)
        with rasterio.open(row["imagery"]) as src:
            assert src.transform == transform and src.crs == crs
            img = src.read().astype(np.float32)
        ref = gpd.read_parquet(row["reference"])
        assert ref.crs.to_epsg() == 4326
        ref = ref.to_crs(crs)
        burned = rasterize(zip(ref.geometry, [CLASS_ID[c] for c in ref["class"]]), out_shape=shape, transform=transform, fill=0, dtype="uint8")
        inside = burned > 0
        agreement = (burned[inside] == truth[inside]).mean()
        assert agreement > 0.985, f"{row['city']}: only {agreement:.3f} of reference pixels match the truth raster"
        # and the imagery under them shows the class's signature
        water = burned == CLASS_ID["water"]
        if water.sum() > 500:
            assert img[2][water].mean() > img[0][water].mean() - 5  # water is not red
        vegetated = np.isin(burned, [CLASS_ID["green"], CLASS_ID["farmland"]])
        built = np.isin(burned, [CLASS_ID["industrial"], CLASS_ID["commercial"]])
        if vegetated.sum() > 500 and built.sum() > 500:
            greenness = (img[1] - (img[0] + img[2]) / 2)
            assert greenness[vegetated].mean() > greenness[built].mean()


def test_urban_villages_look_dense_and_mixed(tmp_path):
    cfg = SynthConfig(size_km=1.0, pixel_size_m=(0.6, 0.6), haze_max=0.0, cloud_prob=0.0, uv_share_mean=0.15, uv_share_max=0.3)
    row = generate_city(CitySpec("guangzhou", "Guangzhou", "south", 23.129, 113.264), cfg, 1, tmp_path)
    with rasterio.open(Path(row["imagery"]).parent / "truth.tif") as src:
        truth = src.read(1)
    with rasterio.open(row["imagery"]) as src:
        img = src.read().astype(np.float32)
    from scipy import ndimage

    # local (5 px) colour variation: villages' small mixed roofs and alleys vary more than formal estates' lawns
    local_std = np.mean([ndimage.generic_filter(img[b, ::2, ::2], np.std, size=5) for b in range(3)], axis=0)
    t = truth[::2, ::2]
    uv, formal = local_std[t == CLASS_ID["urban_village"]], local_std[t == CLASS_ID["formal_residential"]]
    assert uv.size > 1000 and formal.size > 1000
    assert np.median(uv) > 1.2 * np.median(formal)


def test_class_statistics_within_configured_ranges(tmp_path):
    cfg = SynthConfig(size_km=1.2)
    shares, targets, completeness = [], [], []
    specs = demo_city_specs(8)
    for spec in specs:
        generate_city(spec, cfg, 11, tmp_path)
        meta = json.loads((tmp_path / spec.city / "meta.json").read_text())
        stats, params = meta["stats"], meta["params"]
        shares.append(stats["uv_share_of_built_up_area"])
        targets.append(params["uv_share_target"])
        completeness.append(params["osm_completeness"])
        assert cfg.pixel_size_m[0] <= params["pixel_size_m"] <= cfg.pixel_size_m[1]
        assert 0.0 <= stats["uv_share_of_built_up_area"] <= cfg.uv_share_max + 0.03
        assert abs(stats["uv_share_of_built_up_area"] - stats["uv_share_of_built_up_px"]) < 0.02
        fractions = stats["class_fraction_px"]
        assert 0.1 < fractions["road"] < 0.4
        assert sum(fractions[c] for c in ("formal_residential", "commercial", "industrial", "institutional", "urban_village")) > 0.2
        osm = pq.read_table(tmp_path / spec.city / "osm.parquet")
        kinds = set(osm["kind"].to_pylist())
        assert kinds <= {"point", "line", "polygon"} and "line" in kinds
    assert all(cfg.osm_completeness[0] <= c <= cfg.osm_completeness[1] for c in completeness)
    assert 0.02 < np.mean(shares) < 0.16, shares  # mean near 8% of built-up land
    assert np.corrcoef(shares, targets)[0, 1] > 0.8  # cities realise their own drawn share


def test_osm_follows_contract_and_real_vocabulary(demo_workspace, examples_dir):
    known_keys = set(json.loads((examples_dir / "osm_tag_key_frequency.json").read_text()))
    for row in load_catalog(demo_workspace / "catalog.yaml").to_pylist():
        table = pq.read_table(row["osm"])
        assert schema_problems(table.schema, OSM_FEATURES_SCHEMA) == []
        assert read_geoparquet_crs(row["osm"]).to_epsg() == 4326
        assert table["osm_id"].to_numpy().size == len(set(table["osm_id"].to_pylist()))
        # the frequency table writes ':' as ' ' and leaves out free-text names
        keys = {k.replace(":", " ") for tags in table["tags"].to_pylist() for k, _ in tags} - {"name"}
        assert len(keys) >= 8 and keys <= known_keys, f"keys not in real OSM: {keys - known_keys}"
        gdf = gpd.read_parquet(row["osm"])
        assert gdf.geometry.is_valid.all()
        kinds = dict(zip(gdf.geom_type.unique(), gdf.geom_type.unique()))
        assert set(kinds) <= {"Point", "LineString", "Polygon", "MultiLineString", "MultiPolygon"}


def test_uv_buildings_are_mapped_less_often_than_formal():
    """OSM is imperfect the way real OSM is: villages' buildings are missing far more often than estates'."""
    import shapely

    from engine.synth.city import city_rng
    from engine.synth.config import draw_city_params
    from engine.synth.layout import build_layout
    from engine.synth.osm import draw_osm

    cfg = SynthConfig(size_km=1.0, uv_share_mean=0.15, uv_share_max=0.3, osm_completeness=(0.8, 0.8))
    rng = city_rng(2, "shenzhen")
    params = draw_city_params(cfg, rng)
    layout = build_layout(params, 1000.0, rng)
    osm = draw_osm(layout, params, rng)
    mapped_wkb = {shapely.to_wkb(g) for g, t in zip(osm.geometry, osm.tags) if "building" in t}
    mapped = np.array([shapely.to_wkb(g) in mapped_wkb for g in layout.buildings.polygons])
    owner = layout.block_class[layout.buildings.block]
    uv = mapped[owner == CLASS_ID["urban_village"]]
    formal = mapped[owner == CLASS_ID["formal_residential"]]
    assert uv.size > 200 and formal.size > 20
    assert uv.mean() < 0.5 * formal.mean(), (uv.mean(), formal.mean())
    assert 0.6 < formal.mean() <= 0.95


def test_city_table_supports_hundreds_of_cities():
    table = load_city_table()
    assert len(table) >= 130 and len({c.city for c in table}) == len(table)
    assert len({c.region for c in table[:12]}) >= 3
    specs = demo_city_specs(400)
    slugs = [s.city for s in specs]
    assert len(set(slugs)) == 400 and all(CITY_SLUG_RE.match(s) for s in slugs)
    zones = {int((s.lon + 180) // 6) + 1 for s in specs}
    assert len(zones) >= 8


@pytest.mark.parametrize("kwargs", [dict(size_km=0.0), dict(pixel_size_m=(2.0, 1.0)), dict(river_prob=1.5), dict(base_landuse_mix={"mall": 1.0})])
def test_config_rejects_bad_knobs(kwargs):
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)


def test_a_hundred_and_more_cities(tmp_path):
    """`--cities N` scales past 100: every city written, unique, valid, regions and UTM zones spread."""
    from engine.catalog import validate_catalog
    from engine.synth.demo import write_demo

    path = write_demo(tmp_path, n_cities=104, cfg=SynthConfig(size_km=0.2), seed=5, workers=2)
    table = load_catalog(path)
    assert table.num_rows == 104 and len(set(table.column("city").to_pylist())) == 104
    assert len(set(table.column("region").to_pylist())) == 7
    assert set(table.column("split").to_pylist()) == {"train", "val", "test", "map"}
    assert [p for p in validate_catalog(table) if p.severity == "error"] == []


# --- buildings and regional truth (issue 18) -------------------------------------------------------------------
def _layouts_by_region(cfg: SynthConfig, per_region: int, seed: int = 0) -> dict:
    from engine.synth.city import city_rng
    from engine.synth.config import draw_city_params
    from engine.synth.layout import build_layout

    out: dict[str, list] = {}
    for spec in load_city_table():
        if len(out.setdefault(spec.region, [])) < per_region:
            rng = city_rng(seed, spec.city)
            params = draw_city_params(cfg, rng, spec.region)
            out[spec.region].append((params, build_layout(params, cfg.size_km * 1000.0, rng)))
    return out


def test_regional_truth_shows_the_configured_ordering():
    """UV prevalence is higher in central and south China and UV morphology differs by region, in the generated
    truth (the product-level check that regional estimates recover this ordering builds on it)."""
    import shapely
    from scipy.stats import spearmanr

    from engine.synth.city import city_rng
    from engine.synth.config import REGION_PROFILES, draw_city_params

    cfg = SynthConfig(size_km=0.8)
    # drawn targets over every city of the table: the national mean stays near 8%
    targets: dict[str, list[float]] = {}
    for spec in load_city_table():
        targets.setdefault(spec.region, []).append(draw_city_params(cfg, city_rng(0, spec.city), spec.region).uv_share_target)
    assert 0.06 < np.mean([t for v in targets.values() for t in v]) < 0.10
    # realised truth (block land use and buildings), 8 cities per region
    layouts = _layouts_by_region(cfg, per_region=8)
    uv = CLASS_ID["urban_village"]
    share, floors, footprint, coverage = {}, {}, {}, {}
    for region, items in layouts.items():
        share[region] = np.mean([layout.uv_share_of_built_up() for _, layout in items])
        lv, area, cov = [], [], []
        for _, layout in items:
            b = layout.buildings
            on_uv = layout.block_class[b.block] == uv
            uv_land = shapely.area(layout.blocks[layout.block_class == uv]).sum()
            if on_uv.sum() < 20:
                continue
            lv.append(b.levels[on_uv])
            area.append(shapely.area(b.polygons[on_uv]))
            cov.append(shapely.area(b.polygons[on_uv]).sum() / uv_land)
        floors[region], footprint[region], coverage[region] = np.concatenate(lv).mean(), np.concatenate(area).mean(), np.mean(cov)
    regions = sorted(REGION_PROFILES)
    assert min(share["south"], share["central"]) > max(share[r] for r in ("north", "northeast", "northwest")), share
    assert spearmanr([REGION_PROFILES[r].uv_prevalence for r in regions], [share[r] for r in regions]).statistic > 0.75, share
    assert spearmanr([sum(REGION_PROFILES[r].uv_floors) for r in regions], [floors[r] for r in regions]).statistic > 0.9, floors
    assert spearmanr([REGION_PROFILES[r].uv_size for r in regions], [footprint[r] for r in regions]).statistic > 0.6, footprint
    assert spearmanr([REGION_PROFILES[r].uv_density for r in regions], [coverage[r] for r in regions]).statistic > 0.8, coverage
    assert floors["south"] > floors["east"] > floors["north"] > floors["northeast"], floors
    assert min(footprint["north"], footprint["northeast"]) > 1.3 * footprint["south"], footprint
    assert coverage["south"] > max(coverage[r] for r in ("north", "northwest", "northeast")), coverage
    assert min(coverage["north"], coverage["northwest"]) > coverage["northeast"], coverage


def test_building_floors_follow_land_use():
    layouts = _layouts_by_region(SynthConfig(size_km=0.8), per_region=2, seed=3)
    ranges = {"urban_village": (1, 6), "formal_residential": (6, 33), "industrial": (1, 3), "commercial": (3, 35), "institutional": (3, 7)}
    seen = set()
    for items in layouts.values():
        for params, layout in items:
            b = layout.buildings
            owner = layout.block_class[b.block]
            assert (b.height_m >= 2.5 * b.levels).all() and (b.height_m <= 6.0 * b.levels).all()
            for cls, (lo, hi) in ranges.items():
                levels = b.levels[owner == CLASS_ID[cls]]
                if levels.size:
                    seen.add(cls)
                    assert lo <= levels.min() and levels.max() <= hi, (cls, levels.min(), levels.max())
            on_uv = b.levels[owner == CLASS_ID["urban_village"]]
            assert on_uv.size == 0 or (params.uv_floors[0] <= on_uv.min() and on_uv.max() <= params.uv_floors[1])
    assert seen == set(ranges)


def test_buildings_file_is_incomplete_jittered_deterministic_and_shadows_match_its_heights(tmp_path):
    """The buildings file looks like a real building dataset (80-99% of the buildings, moved under a metre) and the
    imagery's shadows are where its heights and the meta's sun put them."""
    import shapely
    from affine import Affine

    from engine.geo import lonlat_to_crs
    from engine.synth.city import city_rng
    from engine.synth.config import draw_city_params
    from engine.synth.layout import build_layout

    cfg = SynthConfig(size_km=0.6, pixel_size_m=(0.5, 0.5), haze_max=0.0, cloud_prob=0.0, uv_share_mean=0.15)
    spec = CitySpec("shenzhen", "Shenzhen", "south", 22.543, 114.058)
    generate_city(spec, cfg, 5, tmp_path / "a")
    generate_city(spec, cfg, 5, tmp_path / "b")
    city = tmp_path / "a" / "shenzhen"
    assert (city / "buildings.parquet").read_bytes() == (tmp_path / "b" / "shenzhen" / "buildings.parquet").read_bytes()
    meta = json.loads((city / "meta.json").read_text())
    gdf = gpd.read_parquet(city / "buildings.parquet")
    assert gdf.crs.to_epsg() == meta["epsg"]
    truth = meta["stats"]["buildings_truth"]
    params = meta["params"]
    assert len(gdf) == truth["in_file"] and 0.8 <= params["buildings_completeness"] <= 0.99
    assert abs(truth["file_completeness"] - params["buildings_completeness"]) < 0.05
    # each footprint sits within the jitter of a drawn building (same layout, regenerated)
    rng = city_rng(5, spec.city)
    layout = build_layout(draw_city_params(cfg, rng, spec.region), 600.0, rng)
    east, north = lonlat_to_crs(meta["epsg"], spec.lon, spec.lat)
    east, north = round(east / 0.5) * 0.5, round(north / 0.5) * 0.5
    drawn = shapely.transform(layout.buildings.polygons, lambda xy: xy + [east, north])
    tree = shapely.STRtree(shapely.centroid(drawn))
    _, dist = tree.query_nearest(shapely.centroid(gdf.geometry.values), return_distance=True)
    assert dist.max() <= params["buildings_jitter_m"] + 1e-6 and dist.mean() > 0.1 * params["buildings_jitter_m"]
    # shadows: cast from the file's footprints and heights with the meta's sun, they are dark; just beyond them not
    az, elev = np.radians(params["sun_azimuth_deg"]), np.radians(params["sun_elevation_deg"])
    direction = np.array([-np.sin(az), -np.cos(az)])

    def cast(scale: float):
        length = gdf["height_m"].to_numpy() * scale / np.tan(elev)
        moved = [shapely.affinity.translate(g, *(direction * d)) for g, d in zip(gdf.geometry, length)]
        return shapely.convex_hull(shapely.union(np.asarray(gdf.geometry.values), np.asarray(moved, dtype=object)))

    with rasterio.open(city / "imagery.tif") as src:
        img, transform, shape = src.read().astype(np.float32).mean(axis=0), src.transform, (src.height, src.width)
    with rasterio.open(city / "truth.tif") as src:
        t = src.read(1)
    roofs = rasterize(((g.buffer(1.0), 1) for g in drawn), out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)
    shadow = rasterize(((g, 1) for g in cast(0.9)), out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)
    longer = rasterize(((g, 1) for g in cast(2.0)), out_shape=shape, transform=transform, fill=0, dtype="uint8").astype(bool)
    built = np.isin(t, [CLASS_ID[c] for c in ("formal_residential", "commercial", "industrial", "institutional")])
    in_shadow, beyond = built & shadow & ~roofs, built & longer & ~shadow & ~roofs
    assert isinstance(transform, Affine) and in_shadow.sum() > 2000 and beyond.sum() > 2000
    assert np.median(img[in_shadow]) < 0.8 * np.median(img[beyond]), (np.median(img[in_shadow]), np.median(img[beyond]))
