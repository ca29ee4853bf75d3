"""Shared fixtures: a tiny synthetic workspace (seeded, generated once per session) and the real example data."""

from __future__ import annotations

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
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local S3-compatible server (moto, loopback only) and the environment that points the engine at it.

    The server runs in its own process: GDAL holds the GIL while it reads ``/vsis3/``, so a server thread in this
    process could never answer. The environment is set before Ray starts, so Ray's workers inherit it; the
    engine's node cache goes to a session folder.
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
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", GEOLINK_CACHE_DIR=str(tmp_path_factory.mktemp("node-cache")))
    storage.configure_process()
    yield os.environ["AWS_ENDPOINT_URL"]
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
