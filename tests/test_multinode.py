"""Multi-node behaviour on one machine: a Ray cluster of a head and two worker nodes (``ray.cluster_utils.Cluster``,
in ``tests/cluster_harness.py``) runs the job entry points exactly as docs/CLUSTER.md submits them, and loses a
node, gains one, or loses its driver mid-run.

- ``map`` while the node running predictor actors is removed: the run completes, its products equal those of an
  undisturbed run, and the ledger holds each tile once.
- ``map`` whose driver is killed (SIGKILL) and started again: it resumes from the ledger (tiles committed before
  the kill are kept, not redone) and ends with the same products.
- elastic ``pretrain`` (``--workers 1-3``) while the node running two of its three workers is removed, then a node
  added: training goes on with a smaller group from the last checkpoint, and the final bundle loads.

The mapping runs use ``--model reference`` (the reference polygons as a perfect model), so products are exactly
reproducible and any difference is the pipeline's.
"""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from engine import product_layout as layout
from engine.catalog import find_catalog, load_catalog
from engine.mapping.store import Ledger, run_dir
from engine.pipelines.infer import InferenceConfig
from engine.pipelines.map import REFERENCE_MODEL, MapConfig, run_map
from engine.synth.demo import write_demo
from geolink_model.checkpoint import load_model
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow
MAP_ARGS = ["--model", REFERENCE_MODEL, "--tile-size", "128", "--actors", "2", "--batch-size", "8"]  # docs/CLUSTER.md shows them
# one actor, one tile per batch: the first driver is still predicting when it is killed (with the reference model
# and 4-tile batches it could commit all 109 tiles before the harness saw its first progress line)
RESTART_ARGS = ["--model", REFERENCE_MODEL, "--tile-size", "128", "--actors", "1", "--batch-size", "1"]
PRETRAIN_ARGS = ["--name", "elastic", "--preset", "tiny", "--epochs", "2", "--workers", "1-3", "--cpus-per-worker", "1",
                 "--checkpoint-every", "2", "--max-failures", "3"]


def _harness(scenario: str, workspace, job_args: list[str], log) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.cluster_harness", scenario, "--workspace", str(workspace), "--log", str(log),
                          "--timeout", "240", "--", *job_args], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, f"harness failed:\n{out.stderr[-3000:]}"
    story = json.loads(out.stdout.strip().splitlines()[-1])
    assert story["exit"] == 0, f"the job failed; its log:\n{log.read_text(errors='replace')[-4000:]}"
    return story


@pytest.fixture(scope="module")
def calm(ray_session, tmp_path_factory):
    """Two demo cities mapped once, undisturbed, on the session's Ray (the products every scenario must equal)."""
    ws = tmp_path_factory.mktemp("multinode")
    write_demo(ws, n_cities=2, cfg=TINY, seed=21, workers=1)
    catalog = load_catalog(find_catalog(ws))
    report = run_map(catalog, ws, MapConfig(run="calm", model_dir=REFERENCE_MODEL, tile_size_px=128,
                                            inference=InferenceConfig(batch_size=8, actors=1)))
    assert all(c.status == "ok" for c in report.cities)
    return ws, catalog


def _ledger(ws, run: str):
    with Ledger(run_dir(ws, run), read_only=True) as ledger:
        return ledger.table()


def _assert_same_products(ws, run: str, catalog) -> None:
    a, b = (pq.read_table(ws / "products" / r / layout.UV_PARQUET) for r in ("calm", run))
    assert a.num_rows > 0 and a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None))
    for city in catalog["city"].to_pylist():
        for cog in layout.COGS.values():
            with rasterio.open(ws / "products" / "calm" / layout.CITIES_DIR / city / cog) as x, \
                 rasterio.open(ws / "products" / run / layout.CITIES_DIR / city / cog) as y:
                assert np.array_equal(x.read(), y.read()), (city, cog)


def _assert_clean_ledger(ws, run: str) -> None:
    calm, table = _ledger(ws, "calm"), _ledger(ws, run)
    tiles = table["tile_id"].to_pylist()
    assert len(tiles) == len(set(tiles)) and sorted(tiles) == sorted(calm["tile_id"].to_pylist())
    assert set(table["status"].to_pylist()) == {"ok"}
    referenced = set(table["part"].to_pylist())
    on_disk = {p.relative_to(run_dir(ws, run)).as_posix() for p in (run_dir(ws, run) / "predictions").rglob("*.parquet")}
    assert on_disk == referenced, "no orphan parts are left, none is missing"


def test_map_survives_a_lost_worker_node(calm, tmp_path):
    ws, catalog = calm
    story = _harness("map-node-loss", ws, [*MAP_ARGS, "--run", "stormy"], tmp_path / "job.log")
    lost = [e for e in story["events"] if e["event"] == "removed a worker node"]
    assert lost and lost[0]["actors_on_lost_node"] >= 1, story  # the node that went held predictor actors
    _assert_clean_ledger(ws, "stormy")
    _assert_same_products(ws, "stormy", catalog)


def test_killed_driver_resumes_from_the_ledger(calm, tmp_path):
    ws, catalog = calm
    story = _harness("map-driver-restart", ws, [*RESTART_ARGS, "--run", "restarted"], tmp_path / "job.log")
    killed = next(e for e in story["events"] if e["event"] == "killed the driver")
    table = _ledger(ws, "restarted")
    committed_at = np.array(table["committed_at"].to_pylist())
    assert (committed_at < killed["time"]).any(), f"tiles committed by the first driver were kept: {story}"
    assert (committed_at > killed["time"]).any(), f"the second driver did the rest: {story}"
    assert set(table["attempts"].to_pylist()) == {1}, "no committed tile was predicted twice"
    _assert_clean_ledger(ws, "restarted")
    _assert_same_products(ws, "restarted", catalog)


def test_elastic_pretrain_goes_on_with_fewer_workers_from_the_last_checkpoint(calm, tmp_path):
    ws, _ = calm
    storage = tmp_path / "train"
    story = _harness("pretrain-elastic", ws, [*PRETRAIN_ARGS, "--storage", str(storage)], tmp_path / "job.log")
    sizes = story["group_sizes"]
    assert sizes[0] == 3 and min(sizes[1:]) < 3, sizes  # three workers, then fewer once a node was gone
    lost = next(e for e in story["events"] if e["event"] == "removed a worker node")
    assert lost["checkpoints"] >= 1 and lost["actors_on_lost_node"] >= 1
    state = json.loads((ws / "models" / "elastic" / "trainer_state.json").read_text())
    assert state["resumed"] and state["resumed"][0] > 0, state["resumed"]  # from a checkpoint, not from step 0
    model, _ = load_model(ws / "models" / "elastic")  # strict: every weight present and of the right shape
    assert model.cfg.img_size == 128 and state["step"] >= 2 * len(state["history"])
