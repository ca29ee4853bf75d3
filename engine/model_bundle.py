"""A model bundle (``models/<name>/``): what it holds, what it says about itself, its check; written and read here only.

Files: ``model.safetensors`` + ``config.json`` (the weights and the :class:`GeoLinkConfig`, through
:mod:`geolink_model.checkpoint`), and ``train_config.json`` when the engine trained it (the
:class:`~engine.pipelines.train.TrainConfig` fields, the model config, and ``gsd_m``/``gsd_range_m``: the ground
sample distance of the training imagery). :func:`write_bundle` writes them; :meth:`ModelBundle.load` reads them.

Old bundles stay readable: without ``train_config.json`` (made outside the engine), or with one from before a key
was recorded, each fact falls back to what the engine has always assumed: classes = the label set of the model's
class count, mode ``fused``, the :data:`engine.pixels.NORMALISATION` pixel normalisation, no GSD, no band list.

Why check in the driver first: a truncated or mismatched bundle otherwise surfaces after prepare, inside every
predictor actor, as tracebacks that never name the file. :func:`check_bundle` reads the config and the safetensors
header (no weights), compares every tensor's name and shape with the model the config builds (on the ``meta``
device: no memory, no time), and raises one :class:`BundleError` line naming the file and what is wrong.

torch is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.pixels import NORMALISATION
from engine.schema import LABEL_SETS
from geolink_model.config import MODES, GeoLinkConfig

if TYPE_CHECKING:
    from geolink_model.model import GeoLink

WEIGHTS, CONFIG, TRAIN_CONFIG = "model.safetensors", "config.json", "train_config.json"
TARGET_SCALE = 1000.0  # a raw (not log) regression target is learnt divided by this: persons, t CO2 per tile
DEFAULT_MODE = "fused"  # the mode of a bundle that does not say
MODE_INPUTS = {"image": frozenset(("image",)), "osm": frozenset(("osm",)), "fused": frozenset(("image", "osm"))}  # what each mode reads


class BundleError(ValueError):
    """The model bundle cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class ModelBundle:
    """A checked model bundle and what it says about itself (:meth:`load`); the weights stay on disk until
    :meth:`load_model`.

    Attributes:
        path: the bundle's folder (local).
        config: the model config (``config.json``).
        classes: the class names it predicts, class 0 first.
        mode: the input mode it was fine-tuned in (``fused``, ``image``, ``osm``).
        normalisation: ``(mean, std)`` applied to pixels scaled to ``[0, 1]``; one value each = every band.
        bands: the imagery bands it reads (1-based), None when the bundle does not say (the first ``in_chans``).
        gsd_m, gsd_range_m: median and ``(min, max)`` ground GSD in metres of its training imagery; None when the
            bundle does not say (from before GSDs were recorded, or made outside the engine). `map` resamples each
            city's imagery to ``gsd_m`` on read (engine.model_input).
        radiometry: how its training imagery became 8-bit (engine.model_input.Radiometry text; ``auto`` = 8-bit
            as it is, other pixel types stretched 2-98 percentile per city); `map` applies the same.
        train: the raw ``train_config.json`` (empty without one), for anything else it records.
    """

    path: Path
    config: GeoLinkConfig
    classes: tuple[str, ...]
    mode: str = DEFAULT_MODE
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] = NORMALISATION
    bands: tuple[int, ...] | None = None
    gsd_m: float | None = None
    gsd_range_m: tuple[float, float] | None = None
    radiometry: str = "auto"
    train: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelBundle:
        """Check the bundle at ``path`` (:func:`check_bundle`: config, safetensors header, tensor shapes; no
        weights read) and read what it says about itself.

        Raises:
            BundleError: one line naming the file and what is wrong with it.
        """
        folder = Path(path)
        config = check_bundle(folder)
        train = read_train_config(folder)
        return cls(path=folder, config=config, classes=_classes(train, config.num_classes), mode=_mode(train),
                   normalisation=_normalisation(train, folder / TRAIN_CONFIG), bands=_bands(train), gsd_m=_gsd(train),
                   gsd_range_m=_gsd_range(train), radiometry=_radiometry(train, folder / TRAIN_CONFIG), train=train)

    @property
    def tile_size_px(self) -> int:
        """The tile size in pixels the model takes (its square input)."""
        return self.config.img_size

    @cached_property
    def version(self) -> str:
        """``<folder name>-<12 hex of the weights' digest>`` (:func:`model_version`; read once, on first use)."""
        return model_version(self.path)

    @property
    def trained_inputs(self) -> frozenset[str]:
        """The inputs (``image``, ``osm``) whose encoders this bundle's own training trained (``train_config.json``
        ``task``): fine-tuning in mode M trains what M reads (:data:`MODE_INPUTS`); pretraining trains the image and
        OSM encoders and the fusion (its three losses); an import (``import-weights``) only the image encoder. A bundle
        that does not say (made outside the engine) counts as its mode's, ``fused`` by default: what the engine has
        always assumed of it."""
        task = self.train.get("task")
        if task == "pretrain":
            return frozenset(("image", "osm"))
        if task == "import":
            return frozenset(("image",))
        return MODE_INPUTS[self.mode]

    @property
    def regression_scale(self) -> tuple[bool, float]:
        """``(log_target, target_scale)``: how the regression head's output maps back to the target's units
        (:func:`geolink_model.regression.from_model_scale`); a bundle from before the scale was recorded used
        :data:`TARGET_SCALE`."""
        return bool(self.train.get("log_target", True)), float(self.train.get("target_scale") or TARGET_SCALE)

    @property
    def encodable_modes(self) -> tuple[str, ...]:
        """The modes whose encodings this bundle can give (`geolink-engine embed`): those whose inputs it was trained
        on (:attr:`trained_inputs`). E.g. a bundle fine-tuned in ``image`` mode holds an OSM encoder and a fusion too,
        but never trained: their tokens would be noise, so ``osm`` and ``fused`` are refused for it."""
        return tuple(m for m in MODES if MODE_INPUTS[m] <= self.trained_inputs)

    def check_encodable(self, mode: str) -> None:
        """Raise one :class:`BundleError` line when :attr:`encodable_modes` lacks ``mode``."""
        if mode not in MODES:
            raise BundleError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if mode not in self.encodable_modes:
            task = self.train.get("task")
            how = {"pretrain": "pretrained", "import": "imported"}.get(task, f"fine-tuned in {self.mode} mode")
            untrained = " and ".join(sorted(MODE_INPUTS[mode] - self.trained_inputs))
            raise BundleError(f"model {self.path.name} cannot give {mode} encodings: it was {how}, so its {untrained} encoder was "
                              f"never trained; use --mode {' or '.join(self.encodable_modes)}, or a bundle trained with {mode} inputs")

    def load_model(self, device: str = "cpu") -> GeoLink:
        """The model with its weights, on ``device`` (strict: every weight must match the config)."""
        from geolink_model.checkpoint import load_model

        return load_model(self.path, device=device)[0]


def write_bundle(directory: str | os.PathLike[str], model: GeoLink | None = None, *, extra: dict | None = None,
                 copy_from: str | os.PathLike[str] | None = None, train: dict | None = None) -> Path:
    """Write a bundle into ``directory`` (created): the weights and ``config.json`` from ``model`` (``extra`` goes
    into ``config.json``), or copied byte for byte from ``copy_from`` (a bundle this function wrote, e.g. a training
    checkpoint); and ``train_config.json`` from ``train`` when given (JSON, indent 2, non-JSON values as ``str``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (model is None) == (copy_from is None):
        raise ValueError("write_bundle: pass either model or copy_from")
    if model is not None:
        from geolink_model.checkpoint import save_model

        save_model(model, directory, extra=extra)
    else:
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(Path(copy_from) / name, directory / name)
    if train is not None:
        (directory / TRAIN_CONFIG).write_text(json.dumps(train, indent=2, default=str))
    return directory


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


def read_train_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The bundle's ``train_config.json`` (``{}`` when it has none). Raises BundleError when it is not a JSON object."""
    return read_json_object(Path(model_dir) / TRAIN_CONFIG) or {}


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A bundle's JSON file as a dict; None when the file is absent. Raises BundleError (one line naming the file)
    when it is unreadable or not a JSON object: every JSON record beside the weights is read this way."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"model bundle {path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"model bundle {path}: not a JSON object")
    return doc


def model_version(model_dir: str | os.PathLike[str]) -> str:
    """``<folder name>-<12 hex of the weights' digest>``: changes whenever the weights do."""
    weights = Path(model_dir) / WEIGHTS
    h = hashlib.blake2b(digest_size=6)
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return f"{Path(model_dir).name}-{h.hexdigest()}"


def model_classes(model_dir: str | os.PathLike[str], num_classes: int) -> tuple[str, ...]:
    """The class names a bundle predicts: from its training config, else the label set of that size."""
    return _classes(read_train_config(model_dir), num_classes)


def model_mode(model_dir: str | os.PathLike[str]) -> str:
    """The mode the bundle was fine-tuned in (``fused`` when it does not say)."""
    return _mode(read_train_config(model_dir))


def model_gsd_range(model_dir: str | os.PathLike[str]) -> tuple[float, float] | None:
    """``(min, max)`` ground GSD in metres of the imagery the bundle was trained on; None when it does not say
    (a bundle from before GSDs were recorded, or one made outside the engine)."""
    return _gsd_range(read_train_config(model_dir))


def _classes(train: dict, num_classes: int) -> tuple[str, ...]:
    name = train.get("classes")
    if isinstance(name, str) and name in LABEL_SETS:
        return LABEL_SETS[name]
    for names in LABEL_SETS.values():
        if len(names) == num_classes:
            return names
    return tuple(f"class_{i}" for i in range(num_classes))


def _mode(train: dict) -> str:
    mode = train.get("mode")
    return mode if mode in MODES else DEFAULT_MODE


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _gsd(train: dict) -> float | None:
    gsd = train.get("gsd_m")
    return float(gsd) if _positive(gsd) else None


def _gsd_range(train: dict) -> tuple[float, float] | None:
    gsd = train.get("gsd_range_m")
    if isinstance(gsd, list | tuple) and len(gsd) == 2 and all(isinstance(v, int | float) and v > 0 for v in gsd):
        return float(min(gsd)), float(max(gsd))
    return None


def _bands(train: dict) -> tuple[int, ...] | None:
    bands = train.get("bands")
    if isinstance(bands, list | tuple) and bands and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands):
        return tuple(bands)
    return None


def _normalisation(train: dict, path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``train_config.json`` ``normalisation: {"mean": [...], "std": [...]}`` when recorded, else the engine's default."""
    norm = train.get("normalisation")
    if norm is None:
        return NORMALISATION
    mean, std = (norm.get("mean"), norm.get("std")) if isinstance(norm, dict) else (None, None)
    if not (isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std)
            and all(isinstance(v, int | float) for v in mean) and all(_positive(v) for v in std)):
        raise BundleError(f"model bundle {path}: normalisation must be {{\"mean\": [...], \"std\": [...]}} with one value "
                          f"each or one per band, std > 0 (got {norm!r})")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _radiometry(train: dict, path: Path) -> str:
    """``train_config.json`` ``radiometry`` (checked: a bad one is a BundleError naming the file), else ``auto``."""
    from engine.model_input import Radiometry

    text = train.get("radiometry")
    if text is None or text == "per-city":
        return "auto"
    try:
        return str(Radiometry.parse(str(text)))
    except ValueError as exc:
        raise BundleError(f"model bundle {path}: {exc}") from None
