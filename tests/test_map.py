"""`map` end to end on Ray Data: ledger and resume, faults, the CLI; products are checked in test_stitch/test_products."""

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from typer.testing import CliRunner

from engine.catalog import write_catalog
from engine.cli import app
from engine.mapping.predict import OraclePredictor
from engine.mapping.store import Ledger, RunManifest, run_dir
from engine.pipelines.infer import InferenceConfig, run_inference
from engine.pipelines.map import MapConfig, run_map
from engine.pipelines.stitch import StreamingStitch, stitch_products
from engine.schema import LABEL_SETS


@pytest.fixture(scope="module")
def prepared(prepared_demo, random_model, tmp_path_factory):
    """A copy (this module maps into it) of the demo cities prepared at 128 px, plus the (untrained, seeded) `test`
    model bundle in it."""
    shared, catalog = prepared_demo
    ws = Path(shutil.copytree(shared, tmp_path_factory.mktemp("map") / "ws"))
    model_dir = Path(shutil.copytree(random_model, ws / "models" / "random"))
    return ws, catalog, model_dir


def _oracle(catalog: pa.Table) -> dict:
    return {"references": {r["city"]: r["reference"] for r in catalog.to_pylist()}, "classes": LABEL_SETS["binary"]}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_run_resumes_to_the_same_products(prepared):
    ws, catalog, _ = prepared
    cities = catalog["city"].to_pylist()
    clean = RunManifest(run="clean", model_dir="oracle", model_version="oracle-1", classes=LABEL_SETS["binary"], mode="fused",
                        tile_size_px=128, overlap_px=32)
    cfg = InferenceConfig(batch_size=4, actors=1)
    stitcher = StreamingStitch(ws, "clean", catalog, manifest=clean)  # the clean run stitches cities as they complete
    first = run_inference(ws, clean, cities, OraclePredictor, _oracle(catalog), cfg, on_city_done=stitcher.submit)
    assert set(stitcher.futures) == set(cities), "every city was stitched during inference"
    total = first.predicted
    assert first.failed == 0 and total > 50

    resumed = replace(clean, run="resumed")
    commits = []

    def interrupt(n: int, _total: int) -> None:  # Ctrl-C after a few committed batches
        commits.append(n)
        if len(commits) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_inference(ws, resumed, cities, OraclePredictor, _oracle(catalog), cfg, on_commit=interrupt)
    path = run_dir(ws, "resumed")
    with Ledger(path, read_only=True) as ledger:
        committed = ledger.table().num_rows
    assert 0 < committed < total
    # a worker wrote a part that never reached the ledger (the driver died in between): it must not count
    some_part = next((path / "predictions").rglob("*.parquet"))
    shutil.copy(some_part, some_part.with_name("part-orphan.parquet"))

    again = run_inference(ws, resumed, cities, OraclePredictor, _oracle(catalog), cfg)
    # parts the actors finished but the driver never committed are verified and adopted, not predicted again
    assert again.skipped == committed + again.adopted and again.predicted == total - committed - again.adopted
    assert not list((path / "predictions").rglob("part-orphan.parquet"))
    with Ledger(path, read_only=True) as a, Ledger(run_dir(ws, "clean"), read_only=True) as b:
        ta, tb = a.table(), b.table()
    assert ta.num_rows == tb.num_rows == total == len(set(ta["tile_id"].to_pylist()))
    assert ta["tile_id"].to_pylist() == tb["tile_id"].to_pylist() and set(ta["status"].to_pylist()) == {"ok"}
    # a rerun of a finished run does nothing
    assert run_inference(ws, resumed, cities, OraclePredictor, _oracle(catalog), cfg).predicted == 0

    for run, done in (("clean", stitcher), ("resumed", None)):  # streamed during inference vs stitched afterwards
        report = stitch_products(str(ws), run, catalog, stitcher=done)
        assert {c.status for c in report} == {"ok"}, report
    products = ws / "products"
    for name in ("urban_villages.parquet", "city_stats.csv"):
        assert _digest(products / "clean" / name) == _digest(products / "resumed" / name), name
    for city in cities:
        with rasterio.open(products / "clean" / "cities" / city / "class.tif") as a, \
                rasterio.open(products / "resumed" / "cities" / city / "class.tif") as b:
            assert (a.read() == b.read()).all()


def test_map_completes_past_a_corrupt_city_and_a_failing_tile(prepared, tmp_path):
    ws, catalog, model_dir = prepared
    rows = catalog.to_pylist()
    broken = tmp_path / "broken.tif"
    data = Path(rows[0]["imagery"]).read_bytes()
    broken.write_bytes(data[:1500])  # a truncated GeoTIFF: not even its header survives
    rows.append({**rows[0], "city": "broken-city", "imagery": str(broken)})
    bad_catalog = pa.Table.from_pylist(rows, schema=catalog.schema)
    index = pq.read_table(ws / "tiles" / f"city={rows[1]['city']}" / "index")
    bad_tile = sorted(index["tile_id"].to_pylist())[1]

    report = run_map(bad_catalog, ws, MapConfig(run="faults", model_dir=str(model_dir), fail_tiles=(bad_tile,),
                                                 inference=InferenceConfig(batch_size=8, actors=1)))
    by_city = {c.city: c for c in report.cities}
    # refused by the imagery check before prepare, in one line with GDAL's cause
    assert by_city["broken-city"].status == "failed" and by_city["broken-city"].stage in ("imagery", "prepare")
    assert "broken.tif" in by_city["broken-city"].error or "broken-city" in by_city["broken-city"].error
    hit = by_city[rows[1]["city"]]
    assert hit.status == "partial" and hit.tiles_failed == 1 and hit.tiles_ok == index.num_rows - 1
    assert all(c.status == "ok" and c.tiles_ok > 0 for c in report.cities if c.city not in ("broken-city", rows[1]["city"]))
    with Ledger(run_dir(ws, "faults"), read_only=True) as ledger:
        failures = ledger.failures()
    assert [(f[1], f[2]) for f in failures] == [(bad_tile, 2)] and "injected failure" in failures[0][3]
    stats = (ws / "products" / "faults" / "city_stats.csv").read_text()
    assert "broken-city" in stats and (ws / "products" / "faults" / "index.html").is_file()


def test_cli_map_reports_and_exits_nonzero_on_failure(prepared, tmp_path):
    ws, catalog, model_dir = prepared
    rows = catalog.to_pylist()[:2]
    rows.append({**rows[0], "city": "no-osm-overlap", "osm": rows[1]["osm"]})
    cat = write_catalog(rows, tmp_path / "catalog.yaml")
    runner = CliRunner()
    result = runner.invoke(app, ["--workspace", str(ws), "--catalog", str(cat), "map", "--model", str(model_dir), "--run", "cli",
                                 "--batch-size", "8", "--actors", "1"])
    assert result.exit_code == 1, result.output
    assert "no-osm-overlap" in result.output and "products in" in result.output
    assert "accuracy" in result.output and (ws / "products" / "cli" / "accuracy" / "report.json").is_file()
    # quiet by default, everything kept: a line per stage and the tables; Ray's, Ray Data's and torch's output in the log
    logs = ws / "runs" / "cli" / "logs"
    assert result.output.startswith(f"logs: {logs}/"), result.output[:300]
    for noise in ("PlacementGroupCleaner", "core_worker", "Warning", "streaming_executor", "logging_progress", "INFO"):
        assert noise not in result.output, (noise, result.output)
    assert all(stage in result.output for stage in ("prepare", "infer", "stitch", "assess", "publish"))
    assert len(result.output.splitlines()) < 80, result.output
    log = (logs / "map.log").read_text()
    assert "geolink-engine" in log and "> prepare:" in log and "streaming_executor" in log  # Ray Data's own lines, kept
    acc = ws / "products" / "cli" / "accuracy"  # the sample, re-estimated from files by anyone
    table = runner.invoke(app, ["assess-table", "--samples", str(acc / "samples.csv"), "--strata", str(acc / "strata.csv"),
                                "--out", str(tmp_path / "R.json"), "--no-fpc"])
    assert table.exit_code == 0, table.output
    assert json.loads((tmp_path / "R.json").read_text())["n"] > 0
    bad = runner.invoke(app, ["assess-table", "--samples", str(acc / "strata.csv"), "--strata", str(acc / "strata.csv"),
                              "--out", str(tmp_path / "R2.json")])
    assert bad.exit_code == 2 and "strata.csv" in bad.output
    bad = runner.invoke(app, ["--workspace", str(ws), "--catalog", str(cat), "map", "--model", str(tmp_path), "--run", "cli"])
    assert bad.exit_code == 2 and "model.safetensors" in bad.output
    bad = runner.invoke(app, ["--workspace", str(ws), "--catalog", str(cat), "map", "--model", str(model_dir), "--run", "../x"])
    assert bad.exit_code == 2 and "run name" in bad.output


def test_resume_adopts_finished_parts_and_deletes_the_rest(prepared):
    """A driver killed after the actors wrote their parts but before it committed any: the rerun verifies each part
    (tiles, rows, checksum in its footer) and adopts it; a part cut short or altered is deleted and its tiles redone."""
    ws, catalog, _ = prepared
    cities = catalog["city"].to_pylist()[:2]
    full = RunManifest(run="adopt-full", model_dir="oracle", model_version="oracle-1", classes=LABEL_SETS["binary"], mode="fused",
                       tile_size_px=128, overlap_px=32)
    cfg = InferenceConfig(batch_size=8, actors=1)
    first = run_inference(ws, full, cities, OraclePredictor, _oracle(catalog), cfg)
    killed = replace(full, run="adopt-killed")
    src, dst = run_dir(ws, full.run), run_dir(ws, killed.run)
    shutil.copytree(src / "predictions", dst / "predictions")  # the parts landed; the ledger never heard of them
    parts = sorted((dst / "predictions").rglob("*.parquet"))
    cut, altered = parts[0], parts[-1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    table = pq.read_table(altered)
    probs = table["probs"].to_pylist()
    probs[0] = bytes([255 - probs[0][0]]) + probs[0][1:]
    pq.write_table(table.set_column(table.schema.get_field_index("probs"), table.schema.field("probs"), pa.array(probs, pa.binary())),
                   altered)
    with Ledger(src, read_only=True) as ledger:
        by_part = {}
        for row in ledger.committed().to_pylist():
            by_part[Path(row["part"]).name] = by_part.get(Path(row["part"]).name, 0) + 1
    redo = by_part[cut.name] + by_part[altered.name]

    again = run_inference(ws, killed, cities, OraclePredictor, _oracle(catalog), cfg)
    assert again.adopted == first.predicted - redo and again.predicted == redo and again.skipped == again.adopted
    assert not cut.exists() and not altered.exists()
    with Ledger(dst, read_only=True) as ledger:
        rows = ledger.table().to_pylist()
    assert len(rows) == first.predicted == len({r["tile_id"] for r in rows}) and {r["status"] for r in rows} == {"ok"}
    assert all((dst / r["part"]).is_file() for r in rows)
    shard = catalog.filter(pa.array([c in cities for c in catalog["city"].to_pylist()]))
    for run in (full.run, killed.run):
        stitch_products(str(ws), run, shard, publish=False)
    assert _digest(ws / "products" / full.run / "urban_villages.parquet") == _digest(ws / "products" / killed.run / "urban_villages.parquet")


def test_console_counts_the_points_awaiting_labels(prepared, tmp_path):
    ws, catalog, model_dir = prepared
    rows = catalog.to_pylist()[:2]
    rows[1] = {**rows[1], "reference": None}  # a real city: its points go to the labelling sheet
    cat = write_catalog(rows, tmp_path / "catalog.yaml")
    result = CliRunner().invoke(app, ["--workspace", str(ws), "--catalog", str(cat), "map", "--model", str(model_dir), "--run", "labels",
                                      "--batch-size", "8", "--actors", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((ws / "products" / "labels" / "accuracy" / "report.json").read_text())
    pending, total = doc["reference"]["awaiting_labels"], doc["design"]["n_total"]
    assert 0 < pending < total
    assert f"{pending} of {total} points need a reference label" in " ".join(result.output.split())


def test_ledger_upsert_keeps_one_row_per_tile_the_latest(tmp_path):
    base = dict(city="x", status="failed", attempts=1, error="read failed", input_hash="h", model_version="m", part=None,
                read_s=0.1, predict_s=None)
    with Ledger(tmp_path) as ledger:
        ledger.commit([{**base, "tile_id": "a"}, {**base, "tile_id": "b"}, {**base, "tile_id": "a", "attempts": 2}])
        ledger.commit([{**base, "tile_id": "b", "status": "ok", "error": "", "part": "predictions/city=x/p.parquet", "predict_s": 0.2}])
        rows = {r["tile_id"]: r for r in ledger.table().to_pylist()}
    assert sorted(rows) == ["a", "b"]
    assert rows["a"]["attempts"] == 2 and rows["a"]["part"] is None and rows["a"]["predict_s"] is None
    assert rows["b"]["status"] == "ok" and rows["b"]["part"] == "predictions/city=x/p.parquet"


def test_inference_pool_sizes_and_gpu_shares():
    assert InferenceConfig(gpus=2, actors_per_gpu=3).pool_size(cluster_cpus=32) == 6
    assert InferenceConfig(gpus=2, actors_per_gpu=4).actor_resources() == {"num_gpus": 0.25}
    assert InferenceConfig(gpus=1).actor_resources() == {"num_gpus": 1.0}
    assert InferenceConfig().actor_resources() == {} and InferenceConfig().pool_size(cluster_cpus=8) == 4
    assert InferenceConfig(actors=3, gpus=1, actors_per_gpu=2).pool_size(cluster_cpus=8) == 3
    with pytest.raises(ValueError, match="actors_per_gpu"):
        InferenceConfig(gpus=1, actors_per_gpu=0)


def test_shard_runs_merge_into_the_products_of_one_run(prepared, demo_workspace):
    from engine import product_layout as layout
    from engine.catalog import select_cities
    from engine.pipelines.merge_runs import merge_runs

    ws, catalog, model_dir = prepared
    cities = catalog["city"].to_pylist()
    # one model for every shard (the reference "model" would not do: its version names the shard's own references);
    # one tile per batch, so every tile's forward pass is the same computation in every run
    cfg = dict(model_dir=str(model_dir), assess=False, inference=InferenceConfig(batch_size=1, actors=1))
    run_map(catalog, ws, MapConfig(run="whole", **cfg))
    shards = (cities[:2], cities[2:])  # a national run split over two map jobs
    for k, part in enumerate(shards):
        run_map(select_cities(catalog, ",".join(part)), ws, MapConfig(run=f"shard-{k}", **cfg))
    out = merge_runs(ws, ["shard-0", "shard-1"], "national", catalog)

    whole = ws / "products" / "whole"
    assert pq.read_metadata(whole / layout.UV_PARQUET).num_rows > 0, "villages to compare"
    assert _digest(out / layout.UV_PARQUET) == _digest(whole / layout.UV_PARQUET)
    assert (out / layout.CITY_STATS).read_text() == (whole / layout.CITY_STATS).read_text()
    for city in cities:
        for cog in layout.COGS.values():
            assert _digest(out / layout.CITIES_DIR / city / cog) == _digest(whole / layout.CITIES_DIR / city / cog), (city, cog)
    run = json.loads((out / layout.RUN_JSON).read_text())
    assert run["run"] == "national" and run["merged_from"] == ["shard-0", "shard-1"]
    assert (out / layout.INDEX_HTML).is_file() and (out / layout.STAC_DIR / "collection.json").is_file()
    assert not [p for p in (ws / "products").iterdir() if p.name.startswith(".")], "no half-merged folder left"

    with pytest.raises(ValueError, match="in both runs"):
        merge_runs(ws, ["shard-0", "whole"], "overlap", catalog)
    with pytest.raises(ValueError, match="must not be one"):
        merge_runs(ws, ["shard-0", "shard-1"], "shard-0", catalog)
    with pytest.raises(FileNotFoundError, match="stitch"):
        merge_runs(ws, ["shard-0", "nowhere"], "x", catalog)
    result = CliRunner().invoke(app, ["--workspace", str(ws), "--catalog", str(demo_workspace / "catalog.yaml"), "merge-runs",
                                      "--runs", "shard-0,shard-1", "--into", "national"])
    assert result.exit_code == 0, result.output
    assert _digest(out / layout.UV_PARQUET) == _digest(whole / layout.UV_PARQUET)  # rerun: the same products
