"""`geolink-engine status`: a run's progress from its status file while `map` holds the ledger, and after it."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.mapping.status import StatusWriter, ledger_holder, read_status
from engine.mapping.store import Ledger
from engine.workspace import RunFolder, Workspace

ROOT = Path(__file__).resolve().parents[1]


def _rows(city: str, n: int, start: int = 0, failed: tuple[int, ...] = ()) -> list[dict]:
    return [{"tile_id": f"{city}-{i:04d}", "city": city, "status": "failed" if i in failed else "ok", "attempts": 1,
             "error": "read: boom" if i in failed else "", "input_hash": "h", "model_version": "v1",
             "part": None if i in failed else "predictions/p.parquet", "read_s": None, "predict_s": None}
            for i in range(start, start + n)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def connects(monkeypatch):
    """Every database path the status reader opens with DuckDB (it must never be the run's own ledger)."""
    opened = []
    real = duckdb.connect

    def spy(database=":memory:", read_only=False, *args, **kwargs):
        opened.append((str(database), read_only))
        return real(database, read_only, *args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", spy)
    return opened


DRIVER = textwrap.dedent("""
    import sys, time
    from engine.mapping.status import StatusWriter
    from engine.mapping.store import Ledger
    from engine.workspace import Workspace
    from tests.test_status import _rows

    folder = Workspace.at(sys.argv[1]).run("live")
    status = StatusWriter(folder, {"alpha": 10, "beta": 4}, {"gamma": "no prepared tiles in tiles/city=gamma"}, every_s=0.0)
    with Ledger(folder.root) as ledger, status:  # held read-write, as run_inference holds it
        status.start({})
        for rows in (_rows("alpha", 4, failed=(2,)), _rows("beta", 4)):
            ledger.commit(rows)
            status.commit(rows)
        print("ready", flush=True)
        sys.stdin.readline()  # the test reads the status meanwhile
        rows = _rows("alpha", 6, start=4)
        ledger.commit(rows)  # the driver goes on committing: the reader blocked nothing
        status.commit(rows)
        print(ledger.table().num_rows, flush=True)
""")


def test_status_of_a_live_run_reads_the_status_file_and_never_the_ledger(tmp_path, connects):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready", driver.stderr.read()
        folder = Workspace.at(tmp_path).run("live")
        before = _digest(folder.ledger)
        assert ledger_holder(folder.ledger) == driver.pid  # DuckDB's lock, seen without taking it

        t0 = time.perf_counter()
        status = read_status(tmp_path, "live")
        assert time.perf_counter() - t0 < 5
        assert status.state == "live" and status.phase == "infer" and status.source == "status file"
        by_city = {c.city: c for c in status.cities}
        assert (by_city["alpha"].ok, by_city["alpha"].failed, by_city["alpha"].planned, by_city["alpha"].stage) == (3, 1, 10, "inferring")
        assert by_city["alpha"].errors == (("alpha-0002", "read: boom"),)
        assert (by_city["beta"].ok, by_city["beta"].stage) == (4, "inferred")
        assert by_city["gamma"].stage == "failed" and "no prepared tiles" in by_city["gamma"].errors[0][1]
        assert (status.done, status.planned) == (8, 14) and status.rate_tiles_s and status.eta_s is not None
        assert any(f"process {driver.pid}" in n for n in status.notes)

        result = CliRunner().invoke(app, ["--workspace", str(tmp_path), "status", "--run", "live"])
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "alpha" in text and "3 / 10" in text and "read: boom" in text and "8 / 14 tiles done" in text and "live" in text
        assert "ETA" in text and "tiles/s" in text
        assert connects == [], "the reader opened a database while the driver held the ledger"
        assert _digest(folder.ledger) == before

        driver.stdin.write("\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=60)
        assert driver.returncode == 0, err
        assert out.strip() == "14"  # the driver committed after the reads: nothing blocked it
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = read_status(tmp_path, "live")  # the pass ended (phase inferred), the ledger is free: a copy of it is read
    assert finished.state == "finished" and finished.source == "status file + ledger" and finished.eta_s is None
    assert {c.city: (c.ok, c.failed) for c in finished.cities} == {"alpha": (9, 1), "beta": (4, 0), "gamma": (0, 0)}
    ledger = str(Workspace.at(tmp_path).run("live").ledger)
    assert connects and all(path != ledger and read_only for path, read_only in connects), connects


def test_status_in_the_drivers_own_process_leaves_the_ledger_alone(tmp_path, connects):
    """POSIX locks are per process, so the probe cannot see the caller's own lock: the live status file decides."""
    folder = Workspace.at(tmp_path).run("here")
    with Ledger(folder.root) as ledger, StatusWriter(folder, {"alpha": 5}, {}, every_s=0.0) as writer:
        writer.start({})
        rows = _rows("alpha", 2)
        ledger.commit(rows)
        writer.commit(rows)
        connects.clear()
        status = read_status(tmp_path, "here")
        assert status.state == "live" and [(c.ok, c.planned) for c in status.cities] == [(2, 5)]
        assert connects == []
        ledger.commit(_rows("alpha", 3, start=2))  # still the only writer, unharmed
        assert ledger.table().num_rows == 5


def test_a_killed_driver_reads_as_stopped_with_the_ledgers_counts(tmp_path, connects):
    folder = Workspace.at(tmp_path).run("killed")
    with Ledger(folder.root) as ledger:
        ledger.commit(_rows("alpha", 3))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    doc = {"run": "killed", "pid": int(dead), "host": __import__("socket").gethostname(), "phase": "infer", "started_at": time.time() - 100,
           "updated_at": time.time() - 60, "pass_tiles": 8, "pass_done": 2, "rate_tiles_s": 0.5,
           "cities": {"alpha": {"planned": 8, "ok": 2, "failed": 0, "stage": "inferring", "errors": []}}}
    folder.status.write_text(json.dumps(doc))  # written 2 tiles in, before the last commit: the ledger knows better
    before = _digest(folder.ledger)
    connects.clear()
    status = read_status(tmp_path, "killed")
    assert status.state == "stopped" and status.rate_tiles_s is None and status.eta_s is None
    assert [(c.ok, c.planned, c.stage) for c in status.cities] == [(3, 8, "inferring")]
    assert any("map --run killed" in n for n in status.notes)
    assert connects and all(path != str(folder.ledger) and ro for path, ro in connects)
    assert _digest(folder.ledger) == before


def test_a_run_from_before_status_files_reads_from_its_ledger(tmp_path):
    folder = Workspace.at(tmp_path).run("old")
    with Ledger(folder.root) as ledger:
        ledger.commit(_rows("alpha", 4, failed=(1,)))
    status = read_status(tmp_path, "old")
    assert status.source == "ledger" and status.state == "unknown"
    assert [(c.city, c.ok, c.failed, c.errors[0][0]) for c in status.cities] == [("alpha", 3, 1, "alpha-0001")]


def test_bad_run_name_is_one_line(tmp_path):
    Workspace.at(tmp_path).run("present").root.mkdir(parents=True)
    (Workspace.at(tmp_path).run("present").manifest).write_text("{}")
    (tmp_path / "runs" / "train").mkdir()
    runner = CliRunner()
    for name, expected in (("nope", "no run 'nope'"), ("../x", "run name")):
        result = runner.invoke(app, ["--workspace", str(tmp_path), "status", "--run", name])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and expected in result.output, result.output
    assert "runs present: present" in " ".join(runner.invoke(app, ["--workspace", str(tmp_path), "status", "--run", "nope"]).output.split())


def test_status_after_a_finished_map_run(prepared_demo, tmp_path):
    """A `--model reference` map on two prepared demo cities: every city stitched, counts equal to the ledger's."""
    from engine.pipelines.infer import InferenceConfig
    from engine.pipelines.map import REFERENCE_MODEL, MapConfig, run_map

    shared, catalog = prepared_demo
    ws = Path(shutil.copytree(shared, tmp_path / "ws"))
    catalog = catalog.slice(0, 2)
    report = run_map(catalog, ws, MapConfig(run="done", model_dir=REFERENCE_MODEL, tile_size_px=128, assess=False,
                                            inference=InferenceConfig(batch_size=8, actors=1)))
    assert {c.status for c in report.cities} == {"ok"}
    with Ledger(RunFolder(ws / "runs" / "done").root, read_only=True) as ledger:
        summary = ledger.summary()
    status = read_status(ws, "done")
    assert status.state == "finished" and status.phase == "stitched" and status.eta_s is None
    assert {c.city: (c.ok, c.failed, c.planned, c.stage) for c in status.cities} == {
        city: (counts["ok"], counts["failed"], counts["ok"] + counts["failed"], "stitched") for city, counts in summary.items()}
    result = CliRunner().invoke(app, ["--workspace", str(ws), "status", "--run", "done"])
    assert result.exit_code == 0, result.output
    done = sum(c["ok"] for c in summary.values())
    assert f"{done} / {done} tiles done" in " ".join(result.output.split()) and "finished" in result.output



def test_map_records_each_citys_stitch_outcome(tmp_path):
    from engine.mapping.status import record_stitch
    from engine.pipelines.report import CityReport

    folder = Workspace.at(tmp_path).run("m")
    with StatusWriter(folder, {"alpha": 4, "beta": 2}, {}, every_s=0.0) as writer:
        writer.start({})
        writer.commit(_rows("alpha", 4, failed=(3,)) + _rows("beta", 2))
    record_stitch(folder, [CityReport("alpha", "r", "partial", tiles_ok=3, tiles_failed=1),
                           CityReport("beta", "r", "failed", tiles_ok=2, stage="stitch", error="no polygons"),
                           CityReport("broken", "r", "failed", stage="imagery", error="broken.tif: not a TIFF")])
    status = read_status(tmp_path, "m")
    assert status.state == "finished" and status.phase == "stitched"
    got = {c.city: (c.stage, c.ok, c.failed, c.planned, c.errors[0][1] if c.errors else "") for c in status.cities}
    assert got == {"alpha": ("stitched", 3, 1, 4, "read: boom"), "beta": ("failed", 2, 0, 2, "stitch: no polygons"),
                   "broken": ("failed", 0, 0, 0, "imagery: broken.tif: not a TIFF")}


def test_status_of_a_run_in_a_remote_workspace_from_another_node(bucket):
    """The driver's node published status.json and the ledger; a node without the run's mirror reads them from the
    store (never by overwriting a mirror a driver may be writing)."""
    from engine.mapping.status import record_stitch
    from engine.pipelines.report import CityReport

    ws = Workspace.at(f"s3://{bucket}/ws")
    folder = ws.run("far")
    with Ledger(folder.root) as ledger, StatusWriter(folder, {"alpha": 3}, {}, every_s=0.0) as writer:
        writer.start({})
        rows = _rows("alpha", 3, failed=(0,))
        ledger.commit(rows)
        writer.commit(rows)
    record_stitch(folder, [CityReport("alpha", "r", "partial", tiles_ok=2, tiles_failed=1)])
    shutil.rmtree(folder.root)  # another node: no mirror of the run
    status = read_status(ws.location, "far")
    assert status.state == "finished" and status.source == "status file + ledger"
    assert [(c.city, c.stage, c.ok, c.failed, c.planned) for c in status.cities] == [("alpha", "stitched", 2, 1, 3)]
    assert not folder.ledger.exists()
    with pytest.raises(ValueError, match="runs present: far"):
        read_status(ws.location, "near")
