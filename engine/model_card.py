"""``MODEL_CARD.md``: what a model bundle is for, in words a person reads before mapping with it.

A pure function of what the bundle already records (its ``train_config.json``, the last epoch's metrics, the
cities of each split): :func:`model_card`; :func:`write_model_card` puts it beside the weights (``run_training``
and ``import-weights`` call it inside the bundle's temporary folder, so a bundle never lacks its card).

Why a card and not only ``train_config.json``: the JSON is what the engine reads back; the card says what the
numbers mean for use (which imagery the model has seen, at which ground resolution, where it was never tested,
what its labels were), so a bundle handed to another team carries its limits with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.pixels import NORMALISATION

CARD = "MODEL_CARD.md"


def model_card(name: str, train: dict[str, Any], *, metrics: dict[str, Any] | None = None,
               splits: dict[str, list[str]] | None = None, regions: dict[str, str] | None = None,
               init: dict[str, Any] | None = None) -> str:
    """The card of bundle ``name`` as Markdown.

    Args:
        name: the bundle's folder name.
        train: its ``train_config.json`` (``task``, ``model``, ``classes``, ``mode``, ``bands``, ``normalisation``,
            ``gsd_m``, ``gsd_range_m``, ``radiometry``, ``init_from``, ``imported_from``, ...; missing keys are said
            to be unrecorded, never guessed).
        metrics: the last epoch's record of ``metrics.jsonl`` (None: not trained here).
        splits: the cities per split (``train``, ``val``, ``test``).
        regions: city -> region, for the regions the model has seen.
        init: the ``train_config.json`` of the bundle it started from (its ``imported_from`` is repeated here).

    Example:
        >>> card = model_card("m", {"task": "finetune", "classes": "binary", "gsd_range_m": [0.5, 1.2]},
        ...                   splits={"train": ["a"], "val": ["b"], "test": []})
        >>> "0.5-1.2 m" in card and "| train | a |" in card
        True
    """
    model = train.get("model") or {}
    lines = [f"# Model card: {name}", ""]
    lines += _what(train, model)
    lines += ["", "## Inputs", ""] + _inputs(train, model)
    lines += ["", "## Training data", ""] + _data(train, splits, regions)
    lines += ["", "## Metrics", ""] + _metrics(metrics)
    lines += ["", "## Provenance", ""] + _provenance(train, init)
    lines += ["", "## Intended use and known limits", ""] + _limits(train, splits, regions)
    return "\n".join(lines) + "\n"


def _what(train: dict, model: dict) -> list[str]:
    task = train.get("task", "unrecorded")
    size = (f"ViT (embed_dim {model['embed_dim']}, depth {model['depth']}, heads {model['num_heads']}, patch {model['patch_size']})"
            if {"embed_dim", "depth", "num_heads", "patch_size"} <= set(model) else "unrecorded")
    rows = [("task", task), ("image encoder", size), ("architecture", train.get("architecture") or "GeoLink"),
            ("mode", train.get("mode", "fused")), ("classes", _classes(train, model))]
    if train.get("target") not in (None, "segmentation"):  # a tile-level regression (Rose's protocol)
        rows.append(("regression target", f"{train['target']} per tile ({'log1p' if train.get('log_target', True) else 'linear'} "
                                          "scale; MAE, RMSE and R2 in its units)"))
    return _table(("", ""), rows)


def _classes(train: dict, model: dict) -> str:
    classes = train.get("classes")
    if classes is None:
        return f"{model.get('num_classes', '?')} (names unrecorded)"
    return f"{classes} ({model['num_classes']} classes)" if "num_classes" in model else str(classes)


def _inputs(train: dict, model: dict) -> list[str]:
    norm = train.get("normalisation") or {"mean": list(NORMALISATION[0]), "std": list(NORMALISATION[1])}
    default = "" if train.get("normalisation") else " (the engine default)"
    bands = train.get("bands")
    rows = [("bands", ", ".join(map(str, bands)) if bands else f"the first {model.get('in_chans', 3)} (unrecorded)"),
            ("pixel values", "8-bit, scaled to [0, 1], then (x - mean) / std"),
            ("normalisation", f"mean {norm.get('mean')}, std {norm.get('std')}{default}"),
            ("ground sample distance", _gsd(train)),
            ("tile size", f"{model['img_size']} px" if "img_size" in model else "unrecorded"),
            ("radiometry", str(train["radiometry"]) if train.get("radiometry") else "unrecorded (8-bit imagery as it is)")]
    return _table(("", ""), rows)


def _gsd(train: dict) -> str:
    gsd, span = train.get("gsd_m"), train.get("gsd_range_m")
    parts = []
    if gsd:
        parts.append(f"{gsd:g} m (median)" if span else f"{gsd:g} m")
    if span:
        parts.append(f"range {span[0]:g}-{span[1]:g} m")
    return ", ".join(parts) if parts else "unrecorded"


def _data(train: dict, splits: dict | None, regions: dict | None) -> list[str]:
    if not splits:
        return ["None: these weights were not trained by the engine on labelled cities."]
    rows = [(split, ", ".join(splits.get(split) or []) or "none") for split in ("train", "val", "test")]
    out = _table(("split", "cities"), rows)
    seen = _regions_seen(splits, regions)
    if seen:
        out += ["", f"Regions seen in training and validation: {', '.join(seen)}."]
    if train.get("label_fraction", 1.0) < 1.0:
        out += ["", f"Labels on {train['label_fraction']:.0%} of the training tiles."]
    return out


def _regions_seen(splits: dict, regions: dict | None) -> list[str]:
    cities = (splits.get("train") or []) + (splits.get("val") or [])
    return sorted({regions[c] for c in cities if regions and regions.get(c)})


def _metrics(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["None recorded (no labelled epoch)."]
    epoch = metrics.get("epoch")
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items() if k != "epoch"]
    head = [f"Last epoch ({epoch}); `val_*` on the val cities, `train_*` on the training tiles:", ""] if epoch else []
    return head + _table(("metric", "value"), rows)


def _provenance(train: dict, init: dict | None) -> list[str]:
    rows = []
    if train.get("init_from"):
        rows.append(("init from", str(train["init_from"])))
    for label, doc in (("imported from", train), ("init imported from", init or {})):
        src = doc.get("imported_from")
        if isinstance(src, dict):
            rows.append((label, f"{src.get('path')} (sha256 {src.get('sha256')})"))
            if doc is init and doc.get("architecture"):
                rows.append(("init architecture", str(doc["architecture"])))
    if train.get("seed") is not None:
        rows.append(("seed", str(train["seed"])))
    return _table(("", ""), rows) if rows else ["Trained from scratch by the engine."]


def _limits(train: dict, splits: dict | None, regions: dict | None) -> list[str]:
    out = []
    if train.get("task") == "import":
        out.append("- A starting point for `geolink-engine finetune --init-from`, not a mapping model: only the image encoder "
                   "holds the published weights; the OSM encoder, fusion and decoders are freshly initialised.")
    else:
        out.append("- Urban-village mapping with `geolink-engine map` on imagery like its training imagery.")
    if train.get("target") not in (None, "segmentation") and splits:
        out.append(f"- Summed {train['target']} totals take their intervals from the val cities' true and predicted totals in "
                   "`calibration.json` (held-out city ratios; no interval with fewer than 2 val cities).")
    span = train.get("gsd_range_m")
    if span:
        out.append(f"- Ground sample distance {span[0]:g}-{span[1]:g} m: `map` warns beyond 1.5x outside this range and refuses "
                   "beyond 3x (`--allow-gsd-mismatch`).")
    elif train.get("gsd_m"):
        out.append(f"- Trained on imagery of about {train['gsd_m']:g} m; `map` cannot check a range the bundle does not record.")
    seen = _regions_seen(splits or {}, regions)
    if seen:
        out.append(f"- Seen only {', '.join(seen)}; accuracy elsewhere is unmeasured until `geolink-engine assess` says so.")
    if splits:
        out.append("- Labels are rasterised from the catalog's reference polygons: their errors and their definition of a "
                   "village are what the model learnt.")
        if not splits.get("test"):
            out.append("- No test cities: the metrics above are validation scores, not an independent estimate.")
    return out


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {a} | {_cell(b)} |" for a, b in rows]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_model_card(folder: Path, name: str, train: dict[str, Any], *, splits: dict[str, list[str]] | None = None,
                     regions: dict[str, str] | None = None, init: dict[str, Any] | None = None) -> Path:
    """Write ``folder/MODEL_CARD.md`` (:func:`model_card`), the metrics being the last record of the folder's
    ``metrics.jsonl`` when it has one."""
    history = folder / "metrics.jsonl"
    lines = history.read_text().splitlines() if history.is_file() else []
    metrics = json.loads(lines[-1]) if lines else None
    path = folder / CARD
    path.write_text(model_card(name, train, metrics=metrics, splits=splits, regions=regions, init=init))
    return path
