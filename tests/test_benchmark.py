"""The held-out benchmark's generator (engine/synth/benchmark.py): its splits and catalog, on a tiny configuration."""

from __future__ import annotations

from collections import Counter

import yaml

from engine.catalog import load_catalog
from engine.synth.benchmark import HELD_OUT_REGIONS, REGIONS, benchmark_config, benchmark_specs, load_region_split, write_benchmark


def test_default_benchmark_splits_span_every_region():
    specs = benchmark_specs(10)
    assert len(specs) == 70
    test = Counter(s.region for s, split, _ in specs if split == "test")
    assert sum(test.values()) >= 24 and set(test) == set(REGIONS) and min(test.values()) == 5
    assert {split for _, split, _ in specs} == {"train", "val", "test"}
    assert Counter(s.region for s, split, _ in specs if split == "train").keys() == set(REGIONS)
    # region_split: the held-out regions whole, nothing else
    assert {s.region for s, _, r in specs if r == "test"} == set(HELD_OUT_REGIONS)
    assert all((r == "test") == (s.region in HELD_OUT_REGIONS) for s, _, r in specs)


def test_write_benchmark_small(tmp_path):
    path = write_benchmark(tmp_path, per_region=2, cfg=benchmark_config(0.2), workers=1)
    table = load_catalog(path)  # the extra column does not bother the loader
    rows = table.to_pylist()
    assert len(rows) == 2 * len(REGIONS)
    assert {r["region"] for r in rows if r["split"] == "test"} == set(REGIONS)
    region_split = load_region_split(path)
    assert set(region_split) == {r["city"] for r in rows}
    by_region: dict[str, set[str]] = {}
    for r in rows:
        by_region.setdefault(r["region"], set()).add(region_split[r["city"]])
    for region, splits in by_region.items():  # a region is held out whole or not at all
        assert splits == ({"test"} if region in HELD_OUT_REGIONS else {"train"}), (region, splits)
    raw = yaml.safe_load(path.read_text())["cities"]
    assert all("region_split" in c and c["split"] in ("train", "val", "test") for c in raw)
    assert all(not c["imagery"].startswith("/") for c in raw)  # relative paths: the workspace can move


def test_cli_demo_data_benchmark(tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, ["--workspace", str(tmp_path), "demo-data", "--benchmark", "--per-region", "2", "--size-km", "0.2",
                                      "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(load_region_split(tmp_path / "catalog.yaml")) == 2 * len(REGIONS)
