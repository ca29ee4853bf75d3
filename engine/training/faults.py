"""Test-only fault injection for the training loop, kept out of every config: environment variables.

``GEOLINK_TEST_FAIL_AT_STEP=N`` set in the driver makes rank 0 of a training run raise once at step N, the way a
lost worker would, so a test proves that Ray Train resumes from the latest checkpoint (``tests/test_train.py``).
A marker file records the failure, so the resumed attempt goes on: ``$GEOLINK_TEST_FAIL_MARKER`` when set, else
``<storage>/.<run>.failed-once`` beside the run's checkpoints (under ``<workspace>/runs/train`` when the checkpoints
are in an object store: the marker is a plain file, written with ``open``).

Why environment variables: Ray Train runs the loop in worker processes that a module-level registry in the driver
never reaches, and the job's environment is fixed when Ray starts. :func:`worker_runtime_env` hands the variables
to the workers (``RunConfig(worker_runtime_env=...)``) for this run only; unset (always, outside tests), it returns
None and the run is exactly what it is without this module.
"""

from __future__ import annotations

import os
from pathlib import Path

FAIL_AT_STEP = "GEOLINK_TEST_FAIL_AT_STEP"
FAIL_MARKER = "GEOLINK_TEST_FAIL_MARKER"


def worker_runtime_env(name: str, storage_path: str, storage_fs: object | None, train_runs: str | os.PathLike[str]) -> dict | None:
    """The runtime environment that carries the fault hook to the run's workers; None when no hook is set."""
    step = os.environ.get(FAIL_AT_STEP)
    if not step:
        return None
    if not step.strip().isdigit():
        raise ValueError(f"{FAIL_AT_STEP}={step!r}: a step number")
    marker = os.environ.get(FAIL_MARKER) or os.path.join(
        storage_path if storage_fs is None else str(train_runs), f".{name}.failed-once")
    return {"env_vars": {FAIL_AT_STEP: step.strip(), FAIL_MARKER: marker}}


def maybe_fail(step: int, rank: int) -> None:
    """In a worker: raise once, on rank 0 at the hooked step (then the marker exists and later attempts go on)."""
    at = os.environ.get(FAIL_AT_STEP)
    if not at or rank != 0 or step != int(at):
        return
    marker = Path(os.environ[FAIL_MARKER])
    if not marker.exists():  # fail once, the way a lost worker would, to prove resume
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("failed once")
        raise RuntimeError(f"injected failure at step {step}")
