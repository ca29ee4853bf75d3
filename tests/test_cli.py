import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["demo-data"], ["catalog"], ["catalog", "show"], ["catalog", "validate"]])
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
        assert im.width > 800 and len(set(im.convert("L").resize((64, 32)).getdata())) > 20  # a picture, not a blank
    result = runner.invoke(app, ["--workspace", str(ws), "catalog", "validate"])
    assert result.exit_code == 0 and "2 cities valid" in result.output


def test_bad_option_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["--workspace", str(tmp_path), "demo-data", "--size-km", "0.01"])
    assert result.exit_code == 2
    assert "size_km=0.01" in result.output and "Traceback" not in result.output
