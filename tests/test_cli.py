import numpy as np
import pytest
import typer
from PIL import Image
from typer.main import get_command_name
from typer.testing import CliRunner

from engine.cli import app

runner = CliRunner()


def _command_lines(typer_app: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The app itself, every command registered on it and, recursively, every sub-app (``catalog``) and its commands,
    named as Typer names them: the explicit name, else the function's name with ``_`` -> ``-``."""
    lines = [prefix]
    for info in typer_app.registered_commands:
        lines.append((*prefix, info.name or get_command_name(info.callback.__name__)))
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        name = group.name or sub.info.name or get_command_name(sub.registered_callback.callback.__name__)
        lines += _command_lines(sub, (*prefix, name))
    return lines


COMMANDS = _command_lines(app)


def test_help_walk_finds_the_commands_and_sub_commands():
    assert {(), ("demo-data",), ("catalog",), ("catalog", "show"), ("catalog", "validate"), ("ingest-osm",), ("prepare",),
            ("pretrain",), ("finetune",)} <= set(COMMANDS)
    assert len(COMMANDS) == len(set(COMMANDS))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "geolink-engine")
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_demo_data_with_preview_then_validate(tmp_path):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["--workspace", str(ws), "demo-data", "--cities", "2", "--size-km", "0.3", "--preview", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (ws / "catalog.yaml").is_file()
    pngs = sorted((ws / "preview").glob("*.png"))
    assert [p.stem for p in pngs] == ["beijing", "shanghai"]
    with Image.open(pngs[0]) as im:
        assert im.width > 800 and len(np.unique(np.asarray(im.convert("L").resize((64, 32))))) > 20  # a picture, not a blank
    result = runner.invoke(app, ["--workspace", str(ws), "catalog", "validate"])
    assert result.exit_code == 0 and "2 cities valid" in result.output


def test_bad_option_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["--workspace", str(tmp_path), "demo-data", "--size-km", "0.01"])
    assert result.exit_code == 2
    assert "size_km=0.01" in result.output and "Traceback" not in result.output


def test_ingest_osm_command_on_a_real_pbf(tmp_path):
    from pathlib import Path

    import pyarrow.parquet as pq
    import pyrosm

    pbf = Path(pyrosm.__file__).parent / "data" / "test.osm.pbf"
    out = tmp_path / "osm.parquet"
    result = runner.invoke(app, ["ingest-osm", str(pbf), str(out), "--bbox", "26.93,60.52,26.95,60.53"], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "repaired" in result.output and pq.read_table(out).num_rows > 100
    bad = runner.invoke(app, ["ingest-osm", str(pbf), str(out), "--bbox", "26.95,60.52,26.93,60.53"])
    assert bad.exit_code == 2 and "west < east" in bad.output
    missing = runner.invoke(app, ["ingest-osm", str(tmp_path / "nope.osm.pbf"), str(out)])
    assert missing.exit_code == 2 and "nope.osm.pbf" in missing.output and "Traceback" not in missing.output


def test_training_commands_fail_cleanly(ray_session, demo_workspace, tmp_path):
    catalog = str(demo_workspace / "catalog.yaml")
    bad_workers = runner.invoke(app, ["--workspace", str(tmp_path), "--catalog", catalog, "finetune", "--workers", "two"])
    assert bad_workers.exit_code == 2 and "--workers takes N or MIN-MAX" in bad_workers.output
    unprepared = runner.invoke(app, ["--workspace", str(tmp_path), "--catalog", catalog, "finetune"], terminal_width=250)
    assert unprepared.exit_code == 2 and "no prepared tiles" in unprepared.output and "geolink-engine prepare" in unprepared.output
    assert "Traceback" not in unprepared.output
