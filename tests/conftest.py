"""Shared fixtures: a tiny synthetic workspace (seeded, generated once per session), that workspace prepared, a
seeded random model bundle, the real example data, a local S3 server and Ray.

Session fixtures are shared by every test that asks for them: a test that writes into one copies it first
(``shutil.copytree``). A fixture that changes the process environment undoes the change when it ends.
"""

from __future__ import annotations

import contextlib
import shutil
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.synth.config import SynthConfig
from engine.synth.demo import write_demo

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "data" / "geolink_examples"
TINY = SynthConfig(size_km=0.5)
PREPARED_TILE_PX, PREPARED_OVERLAP_PX = 128, 32  # the `test` model preset's img_size


@contextlib.contextmanager
def environ_restored():
    """Undo, on exit, every change to ``os.environ`` made inside: the fixture's own and the engine's (for example
    ``storage.configure_process`` filling the GDAL variables)."""
    saved = os.environ.copy()
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    if not EXAMPLES.is_dir():
        raise FileNotFoundError(f"real example data not found at {EXAMPLES}: the repository expects shared/ beside it")
    return EXAMPLES


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 0.5 km synthetic cities (two regions or more) with their catalog."""
    ws = tmp_path_factory.mktemp("demo")
    write_demo(ws, n_cities=4, cfg=TINY, seed=7, workers=2)
    return ws


@pytest.fixture(scope="session")
def prepared_demo(ray_session, demo_workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(workspace, catalog)``: the demo cities prepared at 128 px tiles (32 px overlap) into their own workspace.

    Shared and read-only: a test that maps, trains or otherwise writes into it copies it first (``shutil.copytree``).
    """
    from engine.catalog import load_catalog
    from engine.pipelines.prepare import run_prepare
    from engine.tiles.city import PrepareConfig
    from engine.tiles.grid import TileGridConfig

    ws = tmp_path_factory.mktemp("prepared")
    catalog = load_catalog(demo_workspace / "catalog.yaml")
    grid = TileGridConfig(tile_size_px=PREPARED_TILE_PX, overlap_px=PREPARED_OVERLAP_PX)
    results = run_prepare(catalog, ws, PrepareConfig(grid=grid))
    assert {r.status for r in results} == {"done"}
    return ws, catalog


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model bundle of the ``test`` preset (128 px, 2 classes), seeded (``torch.manual_seed(0)``).

    Shared and read-only: copy it (``shutil.copytree``) where a test needs it inside a workspace or a bucket.
    """
    import torch

    from geolink_model.checkpoint import save_model
    from geolink_model.config import create_config
    from geolink_model.model import build_model

    torch.manual_seed(0)
    return save_model(build_model(create_config("test")), tmp_path_factory.mktemp("model") / "random")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local S3-compatible server (moto, loopback only) and the environment that points the engine at it.

    The server runs in its own process: GDAL holds the GIL while it reads ``/vsis3/``, so a server thread in this
    process could never answer. The environment is set before Ray starts, so Ray's workers inherit it; the
    engine's node cache goes to a session folder. The environment is restored, and the server stopped, at the end.
    """
    from engine import storage

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
    try:
        with environ_restored():
            os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_REGION="us-east-1", GEOLINK_CACHE_DIR=str(tmp_path_factory.mktemp("node-cache")))
            storage.configure_process()
            yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the local S3 server, named for the test."""
    import boto3

    name = "t-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole session (2 CPUs, no dashboard), for the tests that need Ray (storage env included)."""
    import ray

    # address="local": always a fresh instance, never a stale one named in /tmp/ray/ray_current_cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def population_model(prepared_demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A population regression bundle (``finetune --task population``, ``test`` preset, 2 epochs, 128 px) fine-tuned
    on the prepared demo cities, with its held-out calibration. Shared and read-only: copy it where a test writes."""
    from engine.pipelines.train import TrainConfig, run_training

    src, catalog = prepared_demo
    ws = tmp_path_factory.mktemp("population-train") / "ws"
    shutil.copytree(src, ws)
    cfg = TrainConfig(task="finetune", target="population", preset="test", epochs=2, batch_size=8, cpus_per_worker=0.5,
                      augment=False, mode="fused")
    return run_training(catalog, ws, cfg, name="population-test")
