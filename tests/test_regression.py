"""Tile-level population/CO2 regression (Rose's protocol, issue 20): the head trains and its loss falls, the
targets are the truth rasters' quantities inside each tile, and `finetune --task population` trains on Ray Train
and reports MAE, RMSE and R2 on the held-out cities."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch

from engine.training.targets import area_weighted_sum, tile_targets
from geolink_model import batch_graphs, build_model, create_config
from geolink_model.regression import from_model_scale, regression_loss, regression_metrics, regression_sums
from tests.test_model import _graph


@pytest.mark.parametrize("mode", ["image", "osm", "fused"])
def test_the_head_trains_and_its_loss_falls(mode):
    torch.manual_seed(0)
    model = build_model(create_config("test", img_size=64, regression_targets=1))
    images = torch.randn(4, 3, 64, 64)
    graphs = batch_graphs([_graph(4, seed=1), _graph(2, seed=2), _graph(6, seed=3), _graph(1, seed=4)])
    target = torch.tensor([10.0, 300.0, 5000.0, 80.0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        pred = model.regress(images if mode != "osm" else None, graphs, mode)
        loss = regression_loss(pred, target, log_target=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert pred.shape == (4, 1) and np.isfinite(losses).all()
    assert losses[-1] < 0.2 * losses[0], losses[::5]
    if mode != "osm":  # the four images are told apart at once; four small random graphs take longer
        back = from_model_scale(pred.detach(), log_target=True).reshape(-1)
        assert torch.allclose(back, target, rtol=0.5)  # fitted, in persons


def test_a_model_without_a_head_is_unchanged_and_refuses_to_regress():
    plain, with_head = create_config("test"), create_config("test", regression_targets=1)
    torch.manual_seed(0)
    keys = list(build_model(plain).state_dict())
    torch.manual_seed(0)
    head_keys = list(build_model(with_head).state_dict())
    assert head_keys[: len(keys)] == keys and all(k.startswith("regression_head.") for k in head_keys[len(keys):])
    with pytest.raises(ValueError, match="no regression head"):
        build_model(plain).regress(torch.randn(1, 3, 128, 128), None, "image")


def test_metrics_are_those_of_the_definitions():
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 200.0, 500)
    p = y + rng.normal(0, 50, 500)
    got = regression_metrics(regression_sums(torch.tensor(p), torch.tensor(y)))
    assert got["mae"] == pytest.approx(np.abs(p - y).mean())
    assert got["rmse"] == pytest.approx(np.sqrt(((p - y) ** 2).mean()))
    assert got["r2"] == pytest.approx(1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_tile_targets_split_cells_by_area_and_add_up(prepared_demo):
    """Over a city's grid of tile cores the targets add up to the raster's total; windows (with the halo) overlap,
    so their sum exceeds it by the overlap's share."""
    ws, catalog = prepared_demo
    row = next(r for r in catalog.to_pylist() if r.get("population"))
    index = pq.read_table(next((ws / "tiles" / f"city={row['city']}" / "index").glob("*.parquet"))).to_pylist()
    targets = tile_targets(index, row["population"])
    assert all(t is None or t >= 0 for t in targets) and any(t for t in targets)
    with rasterio.open(row["population"]) as src:
        px = (index[0]["maxx"] - index[0]["minx"]) / index[0]["window_width"]
        cores = [(r["minx"] + (r["core_col_off"] - r["window_col_off"]) * px,
                  r["maxy"] - (r["core_row_off"] - r["window_row_off"] + r["core_height"]) * px,
                  r["minx"] + (r["core_col_off"] - r["window_col_off"] + r["core_width"]) * px,
                  r["maxy"] - (r["core_row_off"] - r["window_row_off"]) * px) for r in index]
        core_sum = sum(area_weighted_sum(src, b) or 0.0 for b in cores)
        inside = src.read(1, masked=True).filled(0).sum()
    assert core_sum == pytest.approx(inside, rel=0.02)  # every resident counted once (cores partition the city)


@pytest.mark.slow
def test_finetune_population_reports_mae_rmse_r2_on_held_out_cities(population_model):
    from engine.model_bundle import ModelBundle

    out = population_model  # conftest: `finetune --task population` on the prepared demo, shared with test_population
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("val_mae", "val_rmse", "val_r2"):
        assert np.isfinite(last[key]), last
    assert last["val_mae"] > 0 and last["val_rmse"] >= last["val_mae"]
    bundle = ModelBundle.load(out)
    assert bundle.config.regression_targets == 1 and bundle.train["target"] == "population"
    assert "population" in (out / "MODEL_CARD.md").read_text() and "calibration.json" in (out / "MODEL_CARD.md").read_text()
    # the held-out record (engine.training.calibration) is published with the bundle: one row per val city
    from engine.training.calibration import prediction_factors, read_calibration

    doc = read_calibration(out)
    val = json.loads((out / "splits.json").read_text())["val"]
    assert doc["target"] == "population" and doc["units"] == "residents" and doc["model_version"] == bundle.version
    assert [c["city"] for c in doc["cities"]] == val and val
    for city in doc["cities"]:
        assert city["tiles"] > 0 and city["truth"] > 0 and city["pred"] > 0, city
    assert bundle.train["target_scale"] == 1000.0
    if len(val) < 2:  # the demo has one val city: no interval can be honest
        assert prediction_factors(doc) is None


def test_a_regression_model_given_to_map_is_one_line(random_model, tmp_path):
    import shutil as sh

    from engine.model_bundle import BundleError
    from engine.pipelines.map import MapConfig, check_model

    model = tmp_path / "models" / "pop"
    sh.copytree(random_model, model)
    (model / "train_config.json").write_text(json.dumps({"task": "finetune", "target": "population", "classes": "binary"}))
    with pytest.raises(BundleError, match=r"pop is a population regression model \(finetune --task population\); map needs a segmentation"):
        check_model(MapConfig(model_dir=str(model)), tmp_path / "ws")
