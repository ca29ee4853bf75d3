"""Shared fixtures: a tiny synthetic workspace (seeded, generated once per session) and the real example data."""

from __future__ import annotations

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
def ray_session():
    """One local Ray for the whole session (2 CPUs, no dashboard), for the tests that need Ray."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
