"""Model bundles: ``model.safetensors`` (weights) + ``config.json`` (the GeoLinkConfig). No pickle anywhere.

A bundle carries everything needed to rebuild and run the model, so ``load_model(dir)`` is all a predictor needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from geolink_model.config import GeoLinkConfig
from geolink_model.image_encoder import resample_pos_embed
from geolink_model.model import GeoLink, build_model

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_model(model: GeoLink, directory: str | os.PathLike[str], extra: dict | None = None) -> Path:
    """Write the bundle (``extra`` goes into ``config.json`` under ``"extra"``, e.g. the model version)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = directory / f".{WEIGHTS}.tmp", directory / f".{CONFIG}.tmp"
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps({"config": json.loads(model.cfg.to_json()), "extra": extra or {}}, indent=2, sort_keys=True))
    os.replace(tmp_w, directory / WEIGHTS)
    os.replace(tmp_c, directory / CONFIG)
    return directory


def load_config(directory: str | os.PathLike[str]) -> tuple[GeoLinkConfig, dict]:
    doc = json.loads((Path(directory) / CONFIG).read_text())
    return GeoLinkConfig.from_json(json.dumps(doc["config"])), doc.get("extra", {})


def load_model(directory: str | os.PathLike[str], device: str = "cpu") -> tuple[GeoLink, dict]:
    """Rebuild the model from its bundle; every weight must match (strict), else the error names what differs."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"model bundle {directory}: missing {name} (train one with `geolink-engine pretrain/finetune`)")
    cfg, extra = load_config(directory)
    model = build_model(cfg)
    state = load_file(str(directory / WEIGHTS), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"model bundle {directory}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device), extra


def load_init(directory: str | os.PathLike[str], cfg: GeoLinkConfig) -> GeoLink:
    """The model of ``cfg`` started from the bundle's weights (fine-tuning ``--init-from``): every tensor carries
    over but the class layer (``seg_decoder.classify``, fresh for the task's classes), and a saved position table
    (``pos_embed`` ``learned``/``fixed``) is resampled to ``cfg``'s patch grid when the tile size differs.

    Why here: the bundle's sizes and ``cfg``'s must agree on everything else (the caller builds ``cfg`` from the
    bundle's own config), and only the model package knows which tensors follow the tile size.
    """
    init, _ = load_model(directory)
    model = build_model(cfg)
    state = {k: v for k, v in init.state_dict().items() if not k.startswith("seg_decoder.classify")}
    key = "image_encoder.pos_embed"
    if key in state and cfg.pos_embed != "sincos":
        state[key] = resample_pos_embed(state[key], cfg.grid_size, 1 if cfg.class_token else 0)
    model.load_state_dict(state, strict=False)
    return model
