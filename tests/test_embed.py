"""`embed`: tile and patch encodings as GeoParquet, resume after a kill, points, refused modes, a linear probe."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import shapely
from typer.testing import CliRunner

from engine.catalog import select_cities
from engine.cli import app
from engine.mapping.embed import PointsError, core_patches
from engine.mapping.store import Ledger
from engine.model_bundle import BundleError
from engine.pipelines.embed import EmbedConfig, run_embed
from engine.pipelines.infer import InferenceConfig
from engine.schema import LABEL_SETS, embeddings_schema
from engine.workspace import Workspace

ONE_ACTOR = InferenceConfig(batch_size=8, actors=1)  # the session's Ray has 2 CPUs: one actor leaves one for the reads


@pytest.fixture(scope="module")
def ws(prepared_demo, random_model, tmp_path_factory):
    """A copy of the prepared demo (this module writes runs and products into it), its catalog, the random model."""
    shared, catalog = prepared_demo
    root = Path(shutil.copytree(shared, tmp_path_factory.mktemp("embed") / "ws"))
    model = Path(shutil.copytree(random_model, root / "models" / "random"))
    return root, catalog, model


def _index(root: Path, cities: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(Workspace.at(root).tile_index(c)) for c in cities]).sort_by("tile_id")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small(catalog: pa.Table, n: int = 2) -> pa.Table:
    """The first ``n`` demo cities by name (beijing first: 25 tiles, the smallest)."""
    return select_cities(catalog, ",".join(sorted(catalog["city"].to_pylist())[:n]))


def _vectors(table: pa.Table) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    return column.values.to_numpy().reshape(len(column), column.type.list_size)


def _inside_cities(table: pa.Table, index: pa.Table) -> None:
    """Every geometry lies in EPSG:4326 within its city's tile windows (lon/lat bounds of the index)."""
    geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    for city in set(table["city"].to_pylist()):
        rows = index.filter(pc.equal(index["city"], city))
        box = shapely.box(min(rows["lon_min"].to_pylist()), min(rows["lat_min"].to_pylist()),
                          max(rows["lon_max"].to_pylist()), max(rows["lat_max"].to_pylist())).buffer(1e-7)
        mine = geoms[np.asarray(table["city"].to_pylist()) == city]
        assert shapely.within(mine, box).all(), city


@pytest.fixture(scope="module")
def tile_pass(ws):
    """Image-mode tile encodings of every demo city (the probe's features too)."""
    root, catalog, model = ws
    report = run_embed(catalog, root, EmbedConfig(run="demo", model_dir=str(model), mode="image", level="tile",
                                                  inference=InferenceConfig(batch_size=16, actors=1)))
    return report


def test_tile_level_encodings(ws, tile_pass):
    root, catalog, model = ws
    report = tile_pass
    assert report.path == root / "products" / "demo" / "embeddings" / "image_tile.parquet"
    table = pq.read_table(report.path)
    assert table.schema.remove_metadata().equals(embeddings_schema(96, "tile"))
    index = _index(root, catalog["city"].to_pylist())
    assert table["tile_id"].to_pylist() == index["tile_id"].to_pylist(), "one row per tile, sorted by city and tile"
    assert report.rows == table.num_rows == index.num_rows and report.inference.failed == 0
    assert np.isfinite(_vectors(table)).all() and _vectors(table).std() > 0
    assert set(table["mode"].to_pylist()) == {"image"} and set(table["model_version"].to_pylist()) == {report.model_version}
    assert table["crs"].to_pylist() == index["crs"].to_pylist()
    assert gpd.read_parquet(report.path).crs.to_epsg() == 4326
    _inside_cities(table, index)
    # the pass is a run folder of its own, with the map run's files: manifest, ledger (one row per tile), parts
    folder = Workspace.at(root).embedding_run("demo", "image", "tile")
    with Ledger(folder.root, read_only=True) as ledger:
        assert ledger.table().num_rows == index.num_rows
    assert json.loads(folder.manifest.read_text())["mode"] == "image"


def test_patch_level_encodings_from_the_cli(ws, demo_workspace):
    root, catalog, model = ws
    cities = sorted(catalog["city"].to_pylist())[:2]
    result = CliRunner().invoke(app, ["--workspace", str(root), "--catalog", str(demo_workspace / "catalog.yaml"), "embed", "--run", "demo",
                                      "--model", str(model), "--mode", "fused", "--level", "patch", "--cities", ",".join(cities),
                                      "--batch-size", "8", "--actors", "1"])
    assert result.exit_code == 0, result.output
    path = root / "products" / "demo" / "embeddings" / "fused_patch.parquet"
    assert "fused_patch.parquet" in " ".join(result.output.split())
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(embeddings_schema(96, "patch"))
    index = _index(root, cities)
    owned = {r["tile_id"]: core_patches(r, 16, 8) for r in index.to_pylist()}
    assert table.num_rows == sum(int(m.sum()) for m in owned.values()), "one row per core patch"
    keys = list(zip(table["tile_id"].to_pylist(), table["patch_row"].to_pylist(), table["patch_col"].to_pylist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(owned[t][i, j] for t, i, j in keys)
    assert np.isfinite(_vectors(table)).all()
    _inside_cities(table, index)
    # patch squares are 16 px: a 0.5 m demo pixel makes them ~8 m on the ground
    areas = gpd.read_parquet(path).to_crs(6933).area
    assert 40 < areas.median() < 100


def test_killed_pass_resumes_with_each_tile_once_and_the_same_bytes(ws):
    root, catalog, model = ws
    one = _small(catalog, 1)  # 25 tiles; one per batch, so every tile's forward pass is the same computation in every run
    base = EmbedConfig(run="clean", model_dir=str(model), mode="osm", level="tile", inference=InferenceConfig(batch_size=1, actors=1))
    clean = run_embed(one, root, base)
    total = clean.inference.predicted

    killed = replace(base, run="killed")
    commits = []

    def interrupt(n: int, _total: int) -> None:  # Ctrl-C after a few committed batches
        commits.append(n)
        if len(commits) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(one, root, killed, on_commit=interrupt)
    folder = Workspace.at(root).embedding_run("killed", "osm", "tile")
    with Ledger(folder.root, read_only=True) as ledger:
        done = set(ledger.table()["tile_id"].to_pylist())
    assert 0 < len(done) < total
    # the actors had finished two more tiles the driver never committed (adopted on resume), and left a broken part
    src = Workspace.at(root).embedding_run("clean", "osm", "tile")
    with Ledger(src.root, read_only=True) as ledger:
        finished = [r for r in ledger.committed().to_pylist() if r["tile_id"] not in done][:2]
    for r in finished:
        target = folder.root / r["part"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.root / r["part"], target)
    broken = folder.predictions_city(one["city"][0].as_py()) / "part-broken.parquet"
    broken.write_bytes((src.root / finished[0]["part"]).read_bytes()[:200])

    again = run_embed(one, root, killed)
    adopted = again.inference.adopted  # the two copied, and any the actors wrote before the interrupt reached them
    assert adopted >= 2 and again.inference.skipped == len(done) + adopted
    assert again.inference.predicted == total - len(done) - adopted and not broken.exists()
    with Ledger(folder.root, read_only=True) as ledger:
        rows = ledger.table()
    assert rows.num_rows == total == len(set(rows["tile_id"].to_pylist())) and set(rows["status"].to_pylist()) == {"ok"}
    assert pq.read_table(again.path).num_rows == total
    assert _digest(again.path) == _digest(clean.path), "the resumed pass wrote the clean pass's bytes"
    # a rerun of a finished pass encodes nothing and rewrites the same bytes
    assert run_embed(one, root, killed).inference.predicted == 0 and _digest(again.path) == _digest(clean.path)


def test_points_at_patch_centres_equal_the_patch_embeddings(ws, tmp_path):
    root, catalog, model = ws
    cities = sorted(catalog["city"].to_pylist())[:2]
    two = select_cities(catalog, ",".join(cities))
    patch = run_embed(two, root, EmbedConfig(run="demo", model_dir=str(model), mode="fused", level="patch", inference=ONE_ACTOR))
    patches = pq.read_table(patch.path)
    vectors = _vectors(patches)
    where = {(t, i, j): k for k, (t, i, j) in enumerate(zip(patches["tile_id"].to_pylist(), patches["patch_row"].to_pylist(),
                                                            patches["patch_col"].to_pylist()))}
    index = {r["tile_id"]: r for r in _index(root, cities).to_pylist()}
    candidates = [key for key in where if index[key[0]]["city"] == cities[1]]  # one city: its CRS is the file's
    picked = [candidates[k] for k in np.random.default_rng(0).choice(len(candidates), 8, replace=False)]
    xs, ys = [], []
    for tile, i, j in picked:  # the patch centre in the city's CRS
        r = index[tile]
        px = (r["maxx"] - r["minx"]) / r["window_width"]
        xs.append(r["minx"] + (j + 0.5) * 16 * px)
        ys.append(r["maxy"] - (i + 0.5) * 16 * px)
    crs = index[picked[0][0]]["crs"]
    ids = [f"p{k}" for k in range(len(picked))] + ["far-1", "far-2"]
    xs += [xs[0] + 1e6, xs[0] - 1e6]
    ys += [ys[0], ys[0]]
    points = tmp_path / "points.gpkg"
    gpd.GeoDataFrame({"id": ids}, geometry=gpd.points_from_xy(xs, ys), crs=crs).to_file(points)

    report = run_embed(two, root, EmbedConfig(run="demo", model_dir=str(model), mode="fused", points=str(points), inference=ONE_ACTOR))
    assert report.inference.predicted == 0, "the patch pass's ledger already holds every tile"
    assert report.path.name == "fused_points.parquet" and report.unmatched == ["far-1", "far-2"]
    assert report.unmatched_line().startswith("2 points lie outside every prepared tile (ids far-1, far-2)")
    out = pq.read_table(report.path)
    assert out.schema.remove_metadata().equals(embeddings_schema(96, "points"))
    assert out["point_id"].to_pylist() == ids and out["matched"].to_pylist() == [True] * len(picked) + [False, False]
    assert out["tile_id"].to_pylist()[:len(picked)] == [p[0] for p in picked] and out["embedding"].to_pylist()[-2:] == [None, None]
    got = np.array(out["embedding"].to_pylist()[:len(picked)], np.float32)
    want = vectors[[where[p] for p in picked]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert gpd.read_parquet(report.path).crs.to_epsg() == 4326


def test_points_without_a_crs_are_refused_in_one_line(ws, demo_workspace, tmp_path):
    root, catalog, model = ws
    csv = tmp_path / "points.csv"
    csv.write_text("id,x,y\na,1,2\n")
    nocrs = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame({"id": ["a"]}, geometry=[shapely.Point(1, 2)], crs=None).to_file(nocrs)
    for path in (csv, nocrs):
        with pytest.raises(PointsError, match="no CRS"):
            run_embed(_small(catalog), root, EmbedConfig(run="nocrs", model_dir=str(model), points=str(path)))
    result = CliRunner().invoke(app, ["--workspace", str(root), "--catalog", str(demo_workspace / "catalog.yaml"), "embed", "--run", "nocrs",
                                      "--model", str(model), "--points", str(csv)])
    assert result.exit_code == 2 and "no CRS" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (root / "runs" / "nocrs").exists(), "refused before any work"


def test_a_mode_the_model_never_trained_is_refused_before_any_work(ws, demo_workspace, tmp_path):
    root, catalog, model = ws
    image_only = Path(shutil.copytree(model, tmp_path / "image-only"))
    (image_only / "train_config.json").write_text(json.dumps({"task": "finetune", "mode": "image", "classes": "binary"}))
    with pytest.raises(BundleError, match="cannot give osm encodings: it was fine-tuned in image mode, so its osm encoder"):
        run_embed(_small(catalog), root, EmbedConfig(run="lacking", model_dir=str(image_only), mode="osm"))
    result = CliRunner().invoke(app, ["--workspace", str(root), "--catalog", str(demo_workspace / "catalog.yaml"), "embed", "--run", "lacking",
                                      "--model", str(image_only), "--mode", "fused"])
    assert result.exit_code == 2 and "cannot give fused encodings" in result.output and "--mode image" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (root / "runs" / "lacking").exists()


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U over ranks)."""
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(1, len(score) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_a_linear_probe_on_tile_embeddings_recovers_uv_presence_in_held_out_cities(ws, tile_pass):
    """Tile-level UV presence (any UV pixel of the reference in the tile's core) from the exported tile embeddings,
    by a ridge-regularised linear probe trained on the other cities: better than chance in each held-out city.

    The model is the seeded, untrained `test` preset: random ViT features already carry texture and colour, which
    is what tells a village's dense small roofs apart here (no fine-tuning needed, measured AUC 0.73-0.83)."""
    from engine.pixels import tile_labels

    root, catalog, _ = ws
    table = pq.read_table(tile_pass.path)
    index = {r["tile_id"]: r for r in _index(root, catalog["city"].to_pylist()).to_pylist()}
    refs = {r["city"]: r["reference"] for r in catalog.to_pylist()}
    y = []
    for tile in table["tile_id"].to_pylist():
        r = index[tile]
        labels = tile_labels(r, refs[r["city"]], LABEL_SETS["binary"])
        y0, x0 = r["core_row_off"] - r["window_row_off"], r["core_col_off"] - r["window_col_off"]
        y.append(int((labels[y0:y0 + r["core_height"], x0:x0 + r["core_width"]] == 1).any()))
    y, x = np.array(y), _vectors(table).astype(np.float64)
    cities = np.array(table["city"].to_pylist())
    aucs = {}
    for held in sorted(set(cities)):
        train, test = cities != held, cities == held
        if y[test].sum() < 5 or (1 - y[test]).sum() < 5:
            continue  # too few villages (or too few others) in the city to measure an AUC
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        a = np.c_[(x[train] - mean) / std, np.ones(train.sum())]
        w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ (2.0 * y[train] - 1.0))
        aucs[held] = _auc(np.c_[(x[test] - mean) / std, np.ones(test.sum())] @ w, y[test])
    assert len(aucs) >= 2, aucs
    assert min(aucs.values()) > 0.6, aucs


def test_a_mapped_runs_stac_lists_its_embeddings_and_its_model_is_the_default(ws):
    from engine.pipelines.map import MapConfig, run_map
    from engine.products.stac import validate_stac

    root, catalog, model = ws
    one = _small(catalog, 1)
    run_map(one, root, MapConfig(run="mapped", model_dir=str(model), assess=False, inference=ONE_ACTOR))
    report = run_embed(one, root, EmbedConfig(run="mapped", level="tile", inference=ONE_ACTOR))  # no --model: the run's
    assert report.model_version.startswith("random-") and report.mode == "fused"
    collection = json.loads((root / "products" / "mapped" / "stac" / "collection.json").read_text())
    asset = collection["assets"]["embeddings_fused_tile"]
    assert asset["href"] == "../embeddings/fused_tile.parquet" and asset["roles"] == ["data"] and report.stac is not None
    validate_stac(root / "products" / "mapped")


def test_encode_returns_the_decoders_top_input_in_each_mode(random_model):
    import torch

    from engine.model_bundle import ModelBundle
    from geolink_model.model import batch_graphs

    model = ModelBundle.load(random_model).load_model().eval()
    images = torch.randn(2, 3, 128, 128)
    graphs = batch_graphs([_graph(), _graph(empty=True)])
    with torch.inference_mode():
        assert torch.equal(model.encode(images, None, "image"), model.image_encoder(images).tokens)
        for mode in ("osm", "fused"):
            seen = []
            hook = model.seg_decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0][-1]))
            model(images, graphs, mode)
            hook.remove()
            tokens = model.encode(images, graphs, mode)
            assert tokens.shape == (2, 64, 96) and torch.equal(tokens, seen[0]), mode
    assert not model.seg_decoder._forward_pre_hooks, "encode leaves no hook behind"
    with pytest.raises(ValueError, match="mode 'pretrain'"):
        model.encode(images, graphs, "pretrain")


def _graph(empty: bool = False):
    """A tile's OSM graph: a building polygon holding a point, or no features at all."""
    from geolink_model.osm_graph import OsmGraphConfig, build_tile_graph, tokenize_tags

    geoms = [] if empty else [shapely.box(10, 10, 60, 60), shapely.Point(30, 30)]
    kinds = [] if empty else ["polygon", "point"]
    tags = [] if empty else [{"building": "yes"}, {"shop": "bakery"}]
    cfg = OsmGraphConfig()
    return build_tile_graph(np.array(geoms, dtype=object), np.array(kinds, dtype=object),
                            tokenize_tags(tags, cfg), np.arange(len(geoms)), (0, 0, 128, 128), cfg)


def test_which_modes_a_bundle_can_encode(random_model, tmp_path):
    from engine.model_bundle import ModelBundle

    expected = {None: ("image", "osm", "fused"), ("pretrain", "fused"): ("image", "osm", "fused"), ("import", "fused"): ("image",),
                ("finetune", "image"): ("image",), ("finetune", "osm"): ("osm",), ("finetune", "fused"): ("image", "osm", "fused")}
    for k, (train, modes) in enumerate(expected.items()):
        bundle = Path(shutil.copytree(random_model, tmp_path / f"b{k}"))
        if train:
            (bundle / "train_config.json").write_text(json.dumps({"task": train[0], "mode": train[1]}))
        assert ModelBundle.load(bundle).encodable_modes == modes, train
