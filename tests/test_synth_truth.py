"""Population and CO2 truth of synthetic cities (issue 20): the rasters sum the buildings, land uses rank as real
cities do, the cells align with the imagery, the bytes repeat, and the earlier outputs do not move."""

import hashlib
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely

import engine.synth.city as synth_city
from engine.catalog import load_catalog
from engine.schema import CLASS_ID, POPULATION_BUILDINGS_SCHEMA
from engine.synth.city import CitySpec, city_rng, generate_city
from engine.synth.config import SynthConfig, draw_city_params
from engine.synth.layout import build_layout
from engine.synth.osm import draw_osm
from engine.synth.render import render_city
from engine.synth.truth import NODATA, RESIDENTIAL, city_truth, road_classes, truth_rng

CFG = SynthConfig(size_km=0.8, uv_share_mean=0.2)  # villages in every southern and central city
# south and central: where China's villages cluster and stand 2-6 floors (docs/synth.md, "Regions")
DENSE = [CitySpec("guangzhou", "Guangzhou", "south", 23.129, 113.264), CitySpec("shenzhen", "Shenzhen", "south", 22.543, 114.058),
         CitySpec("wuhan", "Wuhan", "central", 30.593, 114.305), CitySpec("changsha", "Changsha", "central", 28.228, 112.939),
         CitySpec("zhengzhou", "Zhengzhou", "central", 34.747, 113.625)]
OTHERS = [CitySpec("harbin", "Harbin", "northeast", 45.803, 126.535), CitySpec("xian", "Xian", "northwest", 34.341, 108.94)]
EARLIER = ("imagery.tif", "truth.tif", "osm.parquet", "reference.parquet", "buildings.parquet", "meta.json")
NEW = ("population.tif", "co2.tif", "population_buildings.parquet")
MAJOR = ("motorway", "trunk", "primary")


def _digests(city_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {f: hashlib.sha256((city_dir / f).read_bytes()).hexdigest() for f in names}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """Three cities written to disk: two dense ones and one northern."""
    out = tmp_path_factory.mktemp("truth")
    return {s.city: Path(generate_city(s, CFG, 5, out)["imagery"]).parent for s in (DENSE[0], DENSE[2], OTHERS[0])}


@pytest.fixture(scope="module")
def drawn() -> list[tuple]:
    """``(spec, layout, osm, truth raster, pixel transform, CityTruth)`` of seven cities, in memory."""
    out = []
    for spec in DENSE + OTHERS:
        rng = city_rng(11, spec.city)
        params = draw_city_params(CFG, rng, spec.region)
        layout = build_layout(params, CFG.size_km * 1000.0, rng)
        _, truth, transform = render_city(layout, params, rng)
        osm = draw_osm(layout, params, rng)
        out.append((spec, layout, osm, truth, transform, city_truth(layout, osm, truth, transform, 11, spec.city)))
    return out


def test_population_raster_sums_the_buildings_table(written):
    """Every building counts once, in the cell holding its centroid; the table's ids are the buildings file's."""
    for city, d in written.items():
        table = pd.read_parquet(d / "population_buildings.parquet")
        assert pq.read_schema(d / "population_buildings.parquet").remove_metadata() == POPULATION_BUILDINGS_SCHEMA
        with rasterio.open(d / "population.tif") as src:
            pop, transform = src.read(1), src.transform
        valid = pop != NODATA
        assert math.isclose(float(pop[valid].sum(dtype=np.float64)), table["population"].sum(), rel_tol=1e-6), city
        rows = np.floor((transform.f - table["y"]) / 100.0).astype(int)
        cols = np.floor((table["x"] - transform.c) / 100.0).astype(int)
        expected = np.zeros(pop.shape)
        np.add.at(expected, (rows, cols), table["population"])
        assert valid[rows, cols].all()
        np.testing.assert_allclose(pop[valid], expected[valid], rtol=1e-5, atol=1e-3)
        assert 3_000 < table["population"].sum() / (valid.sum() * 0.01) < 80_000, "residents per km^2 of a city core"
        # ids name the buildings file's footprints (moved by under a metre), null where the file misses a building
        buildings = gpd.read_parquet(d / "buildings.parquet").set_index("building_id")
        known = table.dropna(subset=["building_id"])
        assert 0.75 < len(known) / len(table) < 1.0
        centre = buildings.loc[known["building_id"].astype(int)].geometry.centroid
        assert np.hypot(centre.x.to_numpy() - known["x"], centre.y.to_numpy() - known["y"]).max() < 1.0


def test_uv_buildings_hold_the_most_residents_per_m2_of_land(drawn):
    """Per m^2 of their blocks' land, villages house the most people in the south and centre (2-6 floors, packed),
    then formal estates; commercial, industrial and institutional buildings house none. Per m^2 of floor area,
    villages are the most crowded in every city."""
    land: dict[str, float] = {}
    people: dict[str, float] = {}
    for spec, layout, _, _, _, ct in drawn:
        classes = np.array(ct.building_class)
        per_floor = {}
        for cls in ("urban_village", "formal_residential", "commercial", "industrial", "institutional"):
            sel = classes == cls
            if cls not in RESIDENTIAL:
                assert (ct.building_population[sel] == 0).all(), cls
            elif sel.any():
                per_floor[cls] = ct.building_population[sel].sum() / ct.building_floor_m2[sel].sum()
            if spec in DENSE:
                blocks = shapely.intersection(layout.blocks[layout.block_class == CLASS_ID[cls]], layout.aoi)
                land[cls] = land.get(cls, 0.0) + float(shapely.area(blocks).sum())
                people[cls] = people.get(cls, 0.0) + float(ct.building_population[sel].sum())
        if len(per_floor) == 2:
            assert per_floor["urban_village"] > 1.5 * per_floor["formal_residential"], (spec.city, per_floor)
    density = {cls: people[cls] / land[cls] * 1e6 for cls in land if land[cls]}  # residents per km^2 of land
    assert density["urban_village"] > 1.1 * density["formal_residential"] > 0, density
    assert all(density[c] == 0 for c in ("commercial", "industrial", "institutional") if c in density)
    assert 60_000 < density["urban_village"] < 250_000 and 30_000 < density["formal_residential"] < 150_000, density


def test_population_is_zero_where_no_one_lives(written):
    """Cells without a residential building hold exactly 0 residents (not nodata); cells with one hold some."""
    for city, d in written.items():
        table = pd.read_parquet(d / "population_buildings.parquet")
        with rasterio.open(d / "population.tif") as src:
            pop, t = src.read(1), src.transform
        assert (table.loc[~table["land_use"].isin(RESIDENTIAL), "population"] == 0).all()
        homes = table[table["land_use"].isin(RESIDENTIAL)]
        lived = np.zeros(pop.shape, bool)
        lived[np.floor((t.f - homes["y"]) / 100.0).astype(int), np.floor((homes["x"] - t.c) / 100.0).astype(int)] = True
        empty = (pop != NODATA) & ~lived
        assert empty.any() and (pop[empty] == 0).all(), city
        assert (pop[lived] > 0).all(), city


def test_co2_is_higher_with_industry_or_major_roads_than_in_quiet_housing(drawn):
    """Mean t CO2/yr of cells mostly industrial, or crossed by 80 m or more of trunk/primary road, exceeds that of
    quiet residential cells (mostly housing, no industry, no arterial, little commerce); traffic follows roads."""
    groups: dict[str, list[float]] = {"industry": [], "major_road": [], "quiet": []}
    for spec, layout, osm, _, _, ct in drawn:
        cells, valid = ct.grid.boxes(), ct.grid.valid.ravel()
        roads, classes = road_classes(layout, osm, truth_rng(0, spec.city, 0))
        industry, homes = _land_share(layout, cells, ("industrial",)), _land_share(layout, cells, RESIDENTIAL)
        services = _land_share(layout, cells, ("commercial", "institutional"))
        major, arterial = _road_length(cells, roads, classes, MAJOR), _road_length(cells, roads, classes, (*MAJOR, "secondary"))
        co2, traffic = ct.co2_total.ravel(), ct.co2["traffic"].ravel()
        groups["industry"] += co2[valid & (industry > 0.5)].tolist()
        groups["major_road"] += co2[valid & (major > 80)].tolist()
        groups["quiet"] += co2[valid & (homes > 0.5) & (industry == 0) & (arterial == 0) & (services < 0.1)].tolist()
        if (valid & (major > 80)).any():
            assert traffic[valid & (major > 80)].mean() > 3 * traffic[valid & (arterial == 0)].mean(), spec.city
        assert (ct.co2["industry"].ravel()[valid & (industry == 0)] == 0).all()
    assert min(len(v) for v in groups.values()) >= 15, {k: len(v) for k, v in groups.items()}
    mean = {k: float(np.mean(v)) for k, v in groups.items()}
    assert mean["industry"] > 1.2 * mean["quiet"] and mean["major_road"] > 1.2 * mean["quiet"], mean


def _land_share(layout, cells: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Share of each cell's AOI covered by blocks of ``classes``."""
    blocks = shapely.union_all(layout.blocks[np.isin(layout.block_class, [CLASS_ID[c] for c in classes])])
    in_aoi = shapely.area(shapely.intersection(cells, layout.aoi))
    return shapely.area(shapely.intersection(cells, blocks)) / np.maximum(in_aoi, 1.0)


def _road_length(cells: np.ndarray, roads: np.ndarray, classes: list[str], kinds: tuple[str, ...]) -> np.ndarray:
    """Metres of roads of ``kinds`` in each cell."""
    return shapely.length(shapely.intersection(cells, shapely.union_all(roads[np.isin(classes, kinds)])))


def test_rasters_align_with_the_imagery(written):
    """Same CRS and top-left corner as the imagery, 100 m cells covering its extent (a partial last row/column),
    float32, nodata exactly where a cell has no valid imagery pixel."""
    for city, d in written.items():
        with rasterio.open(d / "imagery.tif") as img:
            crs, t, width_m, height_m = img.crs, img.transform, img.width * img.res[0], img.height * img.res[1]
            mask = img.dataset_mask() > 0
            bounds = img.bounds
        for name in ("population.tif", "co2.tif"):
            with rasterio.open(d / name) as src:
                assert src.crs == crs and src.dtypes == ("float32",) and src.nodata == NODATA, (city, name)
                assert src.res == (100.0, 100.0) and (src.transform.c, src.transform.f) == (t.c, t.f)
                assert (src.width, src.height) == (math.ceil(width_m / 100 - 1e-9), math.ceil(height_m / 100 - 1e-9))
                assert src.bounds.right >= bounds.right and src.bounds.bottom <= bounds.bottom
                data = src.read(1)
                cell_bounds = [src.xy(r, c, offset="ul") for r in range(src.height) for c in range(src.width)]
            has_imagery = []
            for x, y in cell_bounds:
                c0, r0 = int(np.floor((x - t.c) / t.a)), int(np.floor((t.f - y) / -t.e))
                c1, r1 = int(np.ceil((x + 100 - t.c) / t.a)), int(np.ceil((t.f - y + 100) / -t.e))
                has_imagery.append(mask[max(r0, 0):r1, max(c0, 0):c1].any())
            assert ((data != NODATA).ravel() == np.array(has_imagery)).all(), (city, name)
            assert (data[data != NODATA] >= 0).all()


def test_same_city_same_bytes_and_the_catalog_names_the_rasters(tmp_path, written):
    """Generating a city again writes the same truth bytes; another seed, other bytes; the demo catalog carries
    ``population`` and ``co2`` paths that resolve to the files."""
    spec = DENSE[0]
    again = Path(generate_city(spec, CFG, 5, tmp_path / "again")["imagery"]).parent
    assert _digests(again, NEW + EARLIER) == _digests(written[spec.city], NEW + EARLIER)
    other = Path(generate_city(spec, CFG, 6, tmp_path / "other")["imagery"]).parent
    assert all(a != b for a, b in zip(_digests(other, NEW).values(), _digests(again, NEW).values()))

    from engine.synth.demo import write_demo

    catalog = load_catalog(write_demo(tmp_path / "ws", n_cities=2, cfg=SynthConfig(size_km=0.3), workers=1))
    for row in catalog.to_pylist():
        assert Path(row["population"]).name == "population.tif" and Path(row["population"]).is_file()
        assert Path(row["co2"]).name == "co2.tif" and Path(row["co2"]).is_file()
    text = (tmp_path / "ws" / "catalog.yaml").read_text()
    assert "population: cities/" in text and "co2: cities/" in text  # relative, so the workspace can move


def test_earlier_outputs_do_not_depend_on_the_truth(tmp_path, monkeypatch, written):
    """The imagery, truth, OSM, reference, buildings and meta bytes are those of a generator without the
    population/CO2 truth: it draws from its own generators, after everything else is written."""
    spec = DENSE[0]
    monkeypatch.setattr(synth_city, "city_truth", lambda *a, **k: None)
    monkeypatch.setattr(synth_city, "write_city_truth", lambda *a, **k: {})
    bare = Path(generate_city(spec, CFG, 5, tmp_path)["imagery"]).parent
    assert not any((bare / f).exists() for f in NEW)
    assert _digests(bare, EARLIER) == _digests(written[spec.city], EARLIER)
    # its generators share no draws with the city's
    assert truth_rng(5, spec.city, 1).random() != city_rng(5, spec.city).random()
