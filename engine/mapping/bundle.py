"""What a model bundle says about itself, and a check of the bundle made in the driver before any stage runs.

A bundle (``models/<name>/``) is ``model.safetensors`` + ``config.json`` (:mod:`geolink_model.checkpoint`), with
``train_config.json`` beside them when the engine trained it (classes, mode, and the ground sample distance of its
training imagery).

Why check in the driver first: a truncated or mismatched bundle otherwise surfaces after prepare, inside every
predictor actor, as tracebacks that never name the file. :func:`check_bundle` reads the config and the safetensors
header (no weights), compares every tensor's name and shape with the model the config builds (on the ``meta``
device: no memory, no time), and raises one :class:`BundleError` line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.schema import LABEL_SETS
from geolink_model.config import MODES, GeoLinkConfig

WEIGHTS, CONFIG, TRAIN_CONFIG = "model.safetensors", "config.json", "train_config.json"


class BundleError(ValueError):
    """The model bundle cannot be used; the message names the file and what is wrong with it."""


def check_bundle(model_dir: str | os.PathLike[str]) -> GeoLinkConfig:
    """Check a bundle without loading its weights; return its model config.

    Raises:
        BundleError: a missing or unreadable ``config.json``, a missing, truncated or corrupt ``model.safetensors``,
            or tensors whose names or shapes differ from what the config builds.
    """
    import torch
    from safetensors import safe_open

    from geolink_model.checkpoint import load_config
    from geolink_model.model import build_model

    folder = Path(model_dir)
    weights, config = folder / WEIGHTS, folder / CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise BundleError(f"model bundle {folder}: no {path.name} (a bundle from `geolink-engine finetune` holds "
                              f"{WEIGHTS} and {CONFIG})")
    try:
        cfg, _ = load_config(folder)
    except Exception as exc:  # noqa: BLE001 (bad JSON, unknown keys, invalid values: all one line)
        raise BundleError(f"model bundle {config}: not a GeoLink config ({type(exc).__name__}: {exc})") from None
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 (safetensors' own error type for a short or corrupt file)
        raise BundleError(f"model bundle {weights}: unreadable, truncated or corrupt "
                          f"({os.path.getsize(weights)} bytes; {type(exc).__name__}: {exc})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        what = []
        if missing:
            what.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            what.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {shapes[wrong[0]]}, config wants {expected[wrong[0]]})")
        raise BundleError(f"model bundle {weights}: does not match {config.name}: {'; '.join(what)}")
    return cfg


def _train_config(model_dir: str | os.PathLike[str]) -> dict:
    path = Path(model_dir) / TRAIN_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def model_classes(model_dir: str | os.PathLike[str], num_classes: int) -> tuple[str, ...]:
    """The class names a bundle predicts: from its training config, else the label set of that size."""
    name = _train_config(model_dir).get("classes")
    if name in LABEL_SETS:
        return LABEL_SETS[name]
    for names in LABEL_SETS.values():
        if len(names) == num_classes:
            return names
    return tuple(f"class_{i}" for i in range(num_classes))


def model_mode(model_dir: str | os.PathLike[str]) -> str:
    """The mode the bundle was fine-tuned in (``fused`` when it does not say)."""
    mode = _train_config(model_dir).get("mode")
    return mode if mode in MODES else "fused"


def model_gsd_range(model_dir: str | os.PathLike[str]) -> tuple[float, float] | None:
    """``(min, max)`` ground GSD in metres of the imagery the bundle was trained on; None when it does not say
    (a bundle from before GSDs were recorded, or one made outside the engine)."""
    gsd = _train_config(model_dir).get("gsd_range_m")
    if isinstance(gsd, list | tuple) and len(gsd) == 2 and all(isinstance(v, int | float) and v > 0 for v in gsd):
        return float(min(gsd)), float(max(gsd))
    return None
