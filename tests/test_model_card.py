"""MODEL_CARD.md: the card says what the bundle records, says 'unrecorded' where it records nothing, and never guesses."""

import json

from engine.model_card import CARD, model_card, write_model_card

TRAIN = {
    "task": "finetune", "classes": "builtup", "mode": "fused", "bands": [3, 2, 1], "gsd_m": 0.6, "gsd_range_m": [0.5, 1.2],
    "radiometry": "percentile:2,98", "normalisation": {"mean": [0.4, 0.41, 0.42], "std": [0.2, 0.21, 0.22]}, "seed": 0,
    "label_fraction": 0.5, "init_from": "models/geolink-vitl",
    "model": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16, "img_size": 224, "num_classes": 3, "in_chans": 3},
}
SPLITS = {"train": ["beijing", "xian"], "val": ["shanghai"], "test": ["shenzhen"]}
REGIONS = {"beijing": "north", "xian": "northwest", "shanghai": "east", "shenzhen": "south"}
INIT = {"task": "import", "architecture": "vit_large_patch16_224", "imported_from": {"path": "/w/geolink.pth", "sha256": "ab12"}}


def test_a_finetuned_card_says_inputs_data_metrics_provenance_and_limits():
    card = model_card("uv-l", TRAIN, metrics={"epoch": 3, "val_miou": 0.61234, "train_loss": 0.2}, splits=SPLITS, regions=REGIONS, init=INIT)
    assert card.startswith("# Model card: uv-l\n")
    for text in ("| bands | 3, 2, 1 |", "mean [0.4, 0.41, 0.42], std [0.2, 0.21, 0.22]", "0.6 m (median), range 0.5-1.2 m",
                 "| tile size | 224 px |", "| radiometry | percentile:2,98 |", "builtup (3 classes)",
                 "| train | beijing, xian |", "| val | shanghai |", "| test | shenzhen |", "Labels on 50% of the training tiles",
                 "Last epoch (3)", "| val_miou | 0.6123 |", "| init from | models/geolink-vitl |",
                 "| init imported from | /w/geolink.pth (sha256 ab12) |", "| init architecture | vit_large_patch16_224 |",
                 "Ground sample distance 0.5-1.2 m", "Seen only east, north, northwest", "reference polygons"):
        assert text in card, text
    assert "south" not in card.split("Seen only")[1].split("\n")[0]  # a test city's region is not a region it has seen


def test_an_imported_card_says_what_is_not_known(tmp_path):
    train = {"task": "import", "architecture": "vit_tiny_patch16_224", "imported_from": {"path": "/w/x.pth", "sha256": "cd34"},
             "model": {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16, "img_size": 224, "num_classes": 3}}
    path = write_model_card(tmp_path, "ti", train)
    card = path.read_text()
    assert path.name == CARD
    for text in ("| architecture | vit_tiny_patch16_224 |", "(the engine default)", "| ground sample distance | unrecorded |",
                 "not trained by the engine", "None recorded", "| imported from | /w/x.pth (sha256 cd34) |", "finetune --init-from"):
        assert text in card, text
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_miou": 0.5}) + "\n" + json.dumps({"epoch": 2, "val_miou": 0.75}) + "\n")
    assert "| val_miou | 0.7500 |" in write_model_card(tmp_path, "ti", train).read_text()  # the last epoch's
