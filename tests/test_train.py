"""Ray Train V2 on CPU: 2 workers (0.5 CPU each) fine-tune, checkpoint, survive an injected failure, resume."""

import json
import shutil

import pytest
import torch

from engine.pipelines.train import TrainConfig, run_training
from engine.training import faults
from engine.training.schedule import BACKBONE
from geolink_model.checkpoint import load_model


@pytest.fixture(scope="module")
def small_tiles(prepared_demo, tmp_path_factory):
    """A copy (training writes its bundles under ``models/``) of the demo cities prepared at 128 px."""
    shared, catalog = prepared_demo
    return shutil.copytree(shared, tmp_path_factory.mktemp("train") / "ws"), catalog


def test_two_worker_finetune_survives_a_failure_and_resumes(small_tiles, tmp_path, monkeypatch):
    ws, catalog = small_tiles
    monkeypatch.setenv(faults.FAIL_AT_STEP, "3")  # rank 0 raises once at step 3 (the test hook; undone after the test)
    cfg = TrainConfig(task="finetune", preset="test", classes="binary", epochs=2, batch_size=8, checkpoint_every=2, num_workers=2,
                      cpus_per_worker=0.5, max_failures=1, warmup_steps=2)
    out = run_training(catalog, ws, cfg, name="ft-resume", storage=str(tmp_path / "runs"))
    assert (tmp_path / "runs" / ".ft-resume.failed-once").exists(), "the injected failure happened"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["resumed"] == [2], "restarted from the checkpoint written at step 2, before the failure at step 3"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0.0 <= h["val_iou_urban_village"] <= 1.0 and "val_miou" in h for h in history)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"] and splits["val"] and not set(splits["train"]) & set(splits["val"])
    # the bundle records the ground GSD of its training imagery: `map` checks every city against it
    import rasterio

    from engine.model_bundle import model_gsd_range

    sides = []
    for row in catalog.to_pylist():
        if row["city"] in splits["train"] + splits["val"]:
            with rasterio.open(row["imagery"]) as src:
                sides.append(abs(src.transform.a))  # UTM metres: ground metres within the zone's scale factor
    lo, hi = model_gsd_range(out)
    assert lo == pytest.approx(min(sides), rel=2e-3) and hi == pytest.approx(max(sides), rel=2e-3)
    model, extra = load_model(out)
    assert extra["task"] == "finetune" and model.cfg.img_size == 128 and model.cfg.num_classes == 2


def test_pretrain_then_finetune_from_it(small_tiles, tmp_path):
    ws, catalog = small_tiles
    pre = run_training(catalog, ws, TrainConfig(task="pretrain", preset="test", epochs=1, batch_size=8, checkpoint_every=50,
                                                num_workers=1, cpus_per_worker=0.5, max_zoom=1.5), name="pre", storage=str(tmp_path / "runs"))
    record = json.loads((pre / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(record[f"train_{k}"] > 0 for k in ("mae", "contrastive", "node"))
    ft = run_training(catalog, ws, TrainConfig(task="finetune", preset="test", epochs=1, batch_size=8, num_workers=1,
                                               cpus_per_worker=0.5, init_from=str(pre), label_fraction=0.5, mode="fused",
                                               image_dropout=0.5, max_zoom=1.5, backbone_lr_scale=0.0),
                      name="ft-from-pre", storage=str(tmp_path / "runs"))
    saved = json.loads((ft / "train_config.json").read_text())
    assert saved["init_from"] == str(pre) and saved["max_zoom"] == 1.5 and saved["backbone_lr_scale"] == 0.0
    # a backbone lr scale of 0 freezes what pretraining taught; the new decoder still learns
    before, after = load_model(pre)[0].state_dict(), load_model(ft)[0].state_dict()
    backbone = [k for k in after if k.startswith(BACKBONE) and after[k].is_floating_point()]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before["seg_decoder.merge.0.weight"], after["seg_decoder.merge.0.weight"])


def test_bad_training_requests_fail_clearly(small_tiles):
    ws, catalog = small_tiles
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="distill")
    with pytest.raises(ValueError, match="image_dropout"):
        TrainConfig(task="finetune", image_dropout=1.0)
    with pytest.raises(ValueError, match="max_zoom"):
        TrainConfig(task="finetune", max_zoom=0.5)
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        TrainConfig(task="finetune", backbone_lr_scale=1.5)
    with pytest.raises(ValueError, match="run name"):
        run_training(catalog, ws, TrainConfig(task="finetune"), name="../escape")
    rows = [{**r, "split": "map"} for r in catalog.to_pylist()]
    import pyarrow as pa

    with pytest.raises(ValueError, match="split 'train'"):
        run_training(pa.Table.from_pylist(rows, schema=catalog.schema), ws, TrainConfig(task="finetune"), name="nothing")


def test_training_cities_follow_the_splits():
    from engine.pipelines.train import training_cities

    split = {"a": "train", "b": "val", "c": "test", "d": "map"}
    assert training_cities(split, "pretrain") == (["a", "b", "d"], [])
    assert training_cities(split, "pretrain", pretrain_on_test=True) == (["a", "b", "c", "d"], [])
    assert training_cities(split, "finetune") == (["a"], ["b"])
    with pytest.raises(ValueError, match="split 'train'"):
        training_cities({"c": "test"}, "finetune")
    with pytest.raises(ValueError, match="pretraining only"):
        TrainConfig(task="finetune", pretrain_on_test=True)


def test_augmentations_are_seeded_and_blank_whole_images():
    import torch

    from engine.training.augment import drop_images, photometric

    x = torch.randn(16, 3, 32, 32)
    a = photometric(x, torch.Generator().manual_seed(3))
    b = photometric(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape
    dropped = drop_images(x, 0.5, torch.Generator().manual_seed(0))
    blank = dropped.flatten(1).abs().sum(dim=1) == 0
    assert 0 < int(blank.sum()) < 16, "some, not all, samples blanked"
    assert torch.equal(dropped[~blank], x[~blank]), "the others untouched"
    assert drop_images(x, 0.0) is x


def test_zoom_moves_labels_and_osm_nodes_with_the_pixels():
    """A building drawn into image and labels, and its OSM polygon: after any zoom, the polygon's transformed
    bounding box and area still describe where its labelled pixels are (to a pixel)."""
    import numpy as np
    import shapely
    import torch

    from engine.training.augment import zoom
    from engine.training.metrics import IGNORE
    from geolink_model import batch_graphs
    from geolink_model.osm_graph import (
        GEOM_FEATURES,
        OsmGraphConfig,
        build_tile_graph,
        tokenize_tags,
    )

    size, boxes = 64, [(10, 20, 30, 44), (36, 4, 60, 18), (2, 2, 12, 60), (24, 24, 40, 40)]  # (x0, y0, x1, y1), y up
    cfg = OsmGraphConfig()
    graphs, labels = [], torch.zeros(len(boxes), size, size, dtype=torch.long)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        graphs.append(build_tile_graph(np.array([shapely.box(x0, y0, x1, y1)], dtype=object), np.array(["polygon"]),
                                       tokenize_tags([{"building": "yes"}], cfg), np.arange(1), (0.0, 0.0, float(size), float(size)), cfg))
        labels[i, size - y1:size - y0, x0:x1] = 1  # rows run downwards
    images = labels[:, None].float().expand(-1, 3, -1, -1) * 2 - 1
    data = batch_graphs(graphs)
    before = data["polygon"].x.clone()
    out_images, out_labels, out_graphs = zoom(images, labels, data, max_zoom=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(data["polygon"].x, before), "the input batch is left alone"
    names = GEOM_FEATURES["polygon"]
    feats = out_graphs["polygon"].x
    col = {n: names.index(n) for n in ("xmin", "ymin", "xmax", "ymax", "area")}
    extents = []
    for i in range(len(boxes)):
        rows, cols = torch.nonzero(out_labels[i] == 1, as_tuple=True)
        f = feats[i]
        inside = f[col["xmin"]] >= 0 and f[col["ymin"]] >= 0 and f[col["xmax"]] <= 1 and f[col["ymax"]] <= 1
        if inside:  # the whole building is still in view
            assert abs(cols.min().item() - f[col["xmin"]].item() * size) <= 1 and abs(cols.max().item() + 1 - f[col["xmax"]].item() * size) <= 1
            assert abs(rows.min().item() - f[col["ymin"]].item() * size) <= 1 and abs(rows.max().item() + 1 - f[col["ymax"]].item() * size) <= 1
            assert abs(len(rows) / size**2 - f[col["area"]].item()) < 0.02
        bright = out_images[i, 0] > 0
        assert ((out_labels[i] == 1) == bright).float().mean() > 0.98, "labels follow the pixels"
        extents.append((before[i, col["xmax"]] - before[i, col["xmin"]]) / (f[col["xmax"]] - f[col["xmin"]]))
    assert min(extents) < 0.95 and max(extents) > 1.05, "this seed zooms in and out"
    assert bool((out_labels == IGNORE).any()), "zooming out leaves no-data around the tile"
    assert torch.equal(zoom(images, labels, data, max_zoom=2.0, generator=torch.Generator().manual_seed(5))[1], out_labels), "seeded"
    assert zoom(images, labels, data, max_zoom=1.0)[0] is images
    with pytest.raises(ValueError, match="max_zoom"):
        zoom(images, labels, data, max_zoom=0.5)


def test_backbone_parameter_groups_cover_every_parameter_once():
    from engine.training.schedule import param_groups
    from geolink_model import build_model, create_config

    model = build_model(create_config("test", img_size=64))
    for wrapped in (model, torch.nn.ModuleDict({"module": model})):  # as is, and as DDP names it
        backbone, heads = param_groups(wrapped, 0.1)
        assert (backbone["lr_scale"], heads["lr_scale"]) == (0.1, 1.0)
        assert sorted(map(id, backbone["params"] + heads["params"])) == sorted(map(id, model.parameters()))
        assert {id(p) for p in model.image_encoder.parameters()} | {id(p) for p in model.fusion.parameters()} <= set(map(id, backbone["params"]))
        assert {id(p) for p in model.seg_decoder.parameters()} <= set(map(id, heads["params"]))
