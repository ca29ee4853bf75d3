"""Published ViT weights -> an engine model bundle (``geolink-engine import-weights``).

Sources:

- the GeoLink authors' release: a ``.pth`` holding ``{"model_config": {...}, "model_state_dict": {...}}``, whose
  ``architecture`` names a timm ViT (``vit_large_patch16_224``) and whose state dict holds timm's keys
  (``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, ``cls_token``, ``pos_embed``); ``pos_embed_requires_grad``
  false means a frozen sin-cos table, kept frozen here (``pos_embed="fixed"``). Its multimodal release prefixes
  the ViT with ``img_encoder.`` and keeps the class token, position table and final norm that its forward uses at
  the top (``cls_token``, ``img_pos_embed``, ``img_norm.*``: GeoLink's ``forward_img_encoder`` never reads the ViT's
  own); those win, and everything else (the OSM encoder, the decoders) is listed as ignored;
- a timm ViT state dict in safetensors: the architecture from ``--arch``, else from the shapes (embed_dim from
  ``patch_embed``, depth from the block count, heads from :data:`HEADS_BY_WIDTH`, the standard ViT sizes).

Only the image encoder is taken; every other part of the GeoLink model is freshly initialised (seeded). The
engine's encoder is set up to compute what the published one computes (``GeoLinkConfig.class_token``,
``pos_embed``, ``final_norm``), so the imported blocks give the published model's outputs, not an approximation.

Why ``torch.load(weights_only=True)`` and nothing else: a ``.pth`` is a pickle, and unpickling runs whatever code
the file names. Plain tensors, dicts, lists, numbers and strings load; a file that needs more is refused with the
reason and how to re-save it.

Errors are one :class:`WeightsImportError` line naming the file and what is wrong: an unreadable or pickled file,
an unknown or non-ViT architecture, shapes that do not fit the named architecture or the chosen preset (a state
dict for another ViT size), a ViT variant the engine's encoder cannot hold (layer scale, qk-norm, register tokens).
torch and timm are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.atomic import atomic_path
from engine.model_bundle import ModelBundle, write_bundle
from engine.model_card import write_model_card
from engine.pixels import NORMALISATION
from engine.schema import LABEL_SETS
from engine.workspace import check_name
from geolink_model.config import PRESETS, GeoLinkConfig, create_config

if TYPE_CHECKING:
    import torch

    from geolink_model.model import GeoLink

# heads of the standard ViT widths (tiny, small, base, large, huge), for a state dict that does not name its architecture
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
SIZE_NAMES = {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
AUTO_PRESETS = ("tiny", "base", "large")  # picked by embed_dim when --preset is not given
MULTIMODAL_PREFIX = "img_encoder."
# GeoLink's multimodal model: its image forward reads these, not the ViT's own cls_token/pos_embed/norm
MULTIMODAL_TOP = {"cls_token": "cls_token", "img_pos_embed": "pos_embed", "img_norm.weight": "norm.weight", "img_norm.bias": "norm.bias"}
# timm ViT constructor arguments a model_config may carry, passed on to the named architecture
VIT_ARGS = ("patch_size", "in_chans", "depth", "embed_dim", "num_heads", "mlp_ratio")
ENCODER = "image_encoder."
SHOWN = 5  # names shown per list by `summary`


class WeightsImportError(ValueError):
    """The weights cannot be imported; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VitSpec:
    """The source ViT: its sizes and how it makes tokens (what :class:`GeoLinkConfig` must copy)."""

    architecture: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    in_chans: int
    img_size: int
    class_token: bool
    pos_embed: str
    final_norm: bool

    def describe(self) -> str:
        name = SIZE_NAMES.get(self.embed_dim, "ViT")
        return f"{name} (embed_dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, mlp_ratio {self.mlp_ratio:g})"


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_weights` did.

    Attributes:
        source, sha256, source_format: the file, its digest, and what it was (``geolink-pth``,
            ``geolink-multimodal-pth``, ``state-dict-pth``, ``timm-safetensors``).
        architecture: the timm name it was read as (or ``inferred``), preset: the preset the rest of the model
            follows; config: the model config written.
        mapped: ``(source key, engine key)`` of every tensor taken; ignored: source keys not taken (other parts of
            the source model, its classifier head); missing: engine image-encoder keys the source did not hold
            (left at their seeded initialisation).
        notes: what else was done (a position table resampled, ...); normalisation: ``(mean, std)`` recorded.
        out: the bundle written (None until written).
    """

    source: Path
    sha256: str
    source_format: str
    architecture: str
    preset: str
    config: GeoLinkConfig
    mapped: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    notes: tuple[str, ...] = ()
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] = NORMALISATION
    out: Path | None = None

    def summary(self) -> list[str]:
        """A few lines: counts, and the first few names of each list."""

        def names(items: tuple[str, ...]) -> str:
            more = f", ... (+{len(items) - SHOWN})" if len(items) > SHOWN else ""
            return (": " + ", ".join(items[:SHOWN]) + more) if items else ""

        cfg = self.config
        lines = [f"{self.source} ({self.source_format}, {self.architecture}, sha256 {self.sha256[:12]}) -> {self.out or '(not written)'}",
                 f"preset {self.preset}: embed_dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
                 f"img_size {cfg.img_size}, class_token {cfg.class_token}, pos_embed {cfg.pos_embed}, final_norm {cfg.final_norm}, "
                 f"feature_layers {list(cfg.feature_layers)}",
                 f"mapped {len(self.mapped)}{names(tuple(src for src, _ in self.mapped))}",
                 f"ignored {len(self.ignored)}{names(self.ignored)}",
                 f"missing {len(self.missing)}{names(self.missing)}"]
        return lines + [f"note: {n}" for n in self.notes]


def import_weights(src: str | os.PathLike[str], out: str | os.PathLike[str], *, preset: str | None = None, arch: str | None = None,
                   img_size: int | None = None, classes: str = "builtup", gsd_m: float | None = None, seed: int = 0,
                   force: bool = False) -> ImportReport:
    """Convert published weights at ``src`` into the model bundle ``out`` (``model.safetensors``, ``config.json``,
    ``train_config.json``, ``MODEL_CARD.md``), written atomically and checked by :meth:`ModelBundle.load`.

    Args:
        preset: the preset the rest of the model follows; its image-encoder sizes must equal the weights'. None:
            the preset of the same width (tiny 192, base 768, large 1024; else the widest narrower one), with the
            encoder's sizes taken from the weights.
        arch: the timm architecture (overrides the file's ``model_config.architecture``); None: the file's, else
            inferred from the shapes.
        img_size: the tile size in pixels (default: the source's); a learned position table is resampled to it.
        classes: the label set (:data:`engine.schema.LABEL_SETS`); gsd_m: ground sample distance in metres of the
            imagery the weights were trained on (recorded, optional); seed: seeds the fresh parts.
        force: replace an existing ``out``.

    Raises:
        WeightsImportError: one line naming the file and what is wrong.
    """
    src, out = Path(src), Path(out)
    if classes not in LABEL_SETS:
        raise WeightsImportError(f"--classes {classes!r}: use one of {', '.join(LABEL_SETS)}")
    if gsd_m is not None and not gsd_m > 0:
        raise WeightsImportError(f"--gsd-m {gsd_m}: a ground sample distance in metres must be > 0")
    try:
        check_name("model", out.name)
    except ValueError as exc:
        raise WeightsImportError(str(exc)) from None
    if out.exists() and any(out.iterdir()) and not force:
        raise WeightsImportError(f"{out} exists; pass --force to replace it")
    model, report = convert(src, preset=preset, arch=arch, img_size=img_size, num_classes=len(LABEL_SETS[classes]), seed=seed)
    mean, std = report.normalisation
    train: dict[str, Any] = {
        "task": "import", "imported_from": {"path": str(src.resolve()), "sha256": report.sha256}, "source_format": report.source_format,
        "architecture": report.architecture, "preset": report.preset, "classes": classes, "mode": "fused",
        "bands": list(range(1, report.config.in_chans + 1)), "normalisation": {"mean": list(mean), "std": list(std)}, "seed": seed,
        "model": _config_dict(report.config),
        "import_report": {"mapped": len(report.mapped), "ignored": list(report.ignored), "missing": list(report.missing), "notes": list(report.notes)},
    }
    if gsd_m is not None:
        train["gsd_m"] = float(gsd_m)
    with atomic_path(out) as tmp:
        write_bundle(tmp, model, extra={"imported_from": train["imported_from"]}, train=train)
        write_model_card(tmp, out.name, train)
        ModelBundle.load(tmp)  # the bundle every other command will read: refuse to leave one they would not
    return replace(report, out=out)


def convert(src: str | os.PathLike[str], *, preset: str | None = None, arch: str | None = None, img_size: int | None = None,
            num_classes: int = 3, seed: int = 0) -> tuple[GeoLink, ImportReport]:
    """The GeoLink model holding ``src``'s image encoder (the rest freshly initialised with ``seed``) and the report;
    nothing is written. Arguments as :func:`import_weights`."""
    import torch

    from geolink_model.model import build_model

    src = Path(src)
    state, model_config, source_format = read_weights(src)
    normalisation = _normalisation(src, model_config)
    encoder, origin, ignored, variant = split_encoder(state)
    if variant == "multimodal":
        source_format = "geolink-multimodal-pth"
        if "img_pos_embed" in state:  # GeoLink builds it with requires_grad=False: a frozen sin-cos table, kept frozen
            model_config = {"pos_embed_requires_grad": False, **model_config}
    arch = arch or model_config.get("architecture")
    spec, absent, dropped = describe_vit(src, encoder, model_config, arch)
    ignored += [origin[k] for k in dropped]
    name, cfg = engine_config(src, spec, preset, img_size, num_classes)
    weights, notes = map_encoder(encoder, spec, cfg)
    torch.manual_seed(seed)
    model = build_model(cfg)
    unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:  # the mapping and the engine's encoder disagree: a bug here, not in the file
        raise RuntimeError(f"import of {src}: engine has no {unexpected[:3]}")
    mapped = tuple((origin[k], _engine_key(k)) for k in encoder if _engine_key(k) in weights)  # in the source's order
    encoder_keys = [k for k in model.state_dict() if k.startswith(ENCODER) and not k.startswith(f"{ENCODER}vit.fc_norm.")]
    missing = tuple(k for k in encoder_keys if k not in weights)
    if spec.pos_embed == "sincos":
        notes.append("the source has no position table: the engine's sin-cos formula is used")
    if absent:
        notes.append(f"{len(absent)} tensor(s) of {spec.architecture} absent from the source (e.g. {absent[0]}): left at their seeded init")
    report = ImportReport(source=src, sha256=_sha256(src), source_format=source_format, architecture=spec.architecture, preset=name,
                          config=cfg, mapped=mapped, ignored=tuple(ignored), missing=missing, notes=tuple(notes),
                          normalisation=normalisation)
    return model, report


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(state dict, model_config, format)`` of a ``.pth`` (``weights_only=True``) or ``.safetensors`` file."""
    import pickle

    import torch

    if not path.is_file():
        raise WeightsImportError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), {}, "timm-safetensors"
        except Exception as exc:  # noqa: BLE001 (safetensors' own error type for a short or corrupt file)
            raise WeightsImportError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "global" not in reason.lower():  # not a class the file names: bytes that are no checkpoint at all
            raise WeightsImportError(f"{path}: not a PyTorch checkpoint ({reason})") from None
        raise WeightsImportError(f"{path} holds pickled Python objects ({reason}); only plain tensors/dicts are read "
                                 "(weights_only=True); re-save it with torch.save(model.state_dict())") from None
    except Exception as exc:  # noqa: BLE001 (torch raises RuntimeError/EOFError/... for files that are no checkpoint)
        raise WeightsImportError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(doc, dict):
        raise WeightsImportError(f"{path}: holds a {type(doc).__name__}, not a state dict")
    config = doc.get("model_config")
    for key, fmt in (("model_state_dict", "geolink-pth"), ("state_dict", "state-dict-pth"), ("model", "state-dict-pth")):
        if isinstance(doc.get(key), dict):
            state, source_format = doc[key], fmt
            break
    else:
        state, source_format = doc, "state-dict-pth"
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsImportError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(doc)[:8]))})")
    if config is not None and not isinstance(config, dict):
        raise WeightsImportError(f"{path}: model_config is a {type(config).__name__}, not a dict")
    return tensors, dict(config or {}), source_format


def split_encoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], str]:
    """The ViT's tensors under timm's names, ``{timm name: source key}``, the source keys left out, and the variant
    (``multimodal`` when the ViT sits under ``img_encoder.``, else ``vit``)."""
    if not any(k.startswith(MULTIMODAL_PREFIX) for k in state):
        return dict(state), {k: k for k in state}, [], "vit"
    encoder = {k[len(MULTIMODAL_PREFIX):]: v for k, v in state.items() if k.startswith(MULTIMODAL_PREFIX)}
    origin = {k: MULTIMODAL_PREFIX + k for k in encoder}
    ignored = [k for k in state if not k.startswith(MULTIMODAL_PREFIX) and k not in MULTIMODAL_TOP]
    for top, name in MULTIMODAL_TOP.items():
        if top in state:
            if name in encoder:
                ignored.append(origin[name])  # the ViT's own, which GeoLink's forward never reads
            encoder[name], origin[name] = state[top], top
    return encoder, origin, ignored, "multimodal"


def describe_vit(path: Path, encoder: dict[str, torch.Tensor], model_config: dict[str, Any],
                 arch: str | None) -> tuple[VitSpec, list[str], list[str]]:
    """The source ViT's :class:`VitSpec`, the architecture's tensors it lacks, and its keys that are no part of the
    encoder (classifier head, pooling norm, decoders); raises when its shapes do not fit ``arch`` or the engine."""
    shapes = {k: tuple(v.shape) for k, v in encoder.items()}
    if "patch_embed.proj.weight" not in shapes or not any(k.startswith("blocks.") for k in shapes):
        raise WeightsImportError(f"{path}: no ViT image encoder found (needs patch_embed.proj.weight and blocks.N.*; "
                                 f"keys start {', '.join(sorted(shapes)[:4])})")
    if "reg_token" in shapes:
        raise WeightsImportError(f"{path}: a ViT with register tokens (reg_token), which the engine's encoder cannot hold")
    dim, chans, patch, patch_w = shapes["patch_embed.proj.weight"]
    if patch != patch_w:
        raise WeightsImportError(f"{path}: non-square patches {patch}x{patch_w} (patch_embed.proj.weight)")
    class_token = "cls_token" in shapes
    src_img, table_prefix = _source_img_size(path, shapes, class_token, patch, model_config)
    pos_embed = "sincos" if "pos_embed" not in shapes else ("fixed" if model_config.get("pos_embed_requires_grad") is False else "learned")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise WeightsImportError(f"{path}: blocks.0.mlp.fc1.weight missing: not a timm ViT block")
    sizes = dict(embed_dim=dim, depth=depth, mlp_ratio=fc1[0] / dim, patch_size=patch, in_chans=chans,
                 img_size=src_img, class_token=class_token, no_embed_class=class_token and table_prefix == 0)
    ref = _reference(path, arch, sizes, model_config)
    spec = VitSpec(architecture=arch or "inferred", embed_dim=ref.embed_dim, depth=len(ref.blocks), num_heads=ref.blocks[0].attn.num_heads,
                   mlp_ratio=ref.blocks[0].mlp.fc1.out_features / ref.embed_dim, patch_size=ref.patch_embed.patch_size[0],
                   in_chans=ref.patch_embed.proj.in_channels, img_size=src_img, class_token=class_token, pos_embed=pos_embed,
                   final_norm="norm.weight" in shapes)
    if arch:
        problem = _engine_incompatibility(ref, spec)
        if problem:
            raise WeightsImportError(f"{path}: {arch} is a ViT variant the engine's encoder cannot hold ({problem})")
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if _is_encoder_key(k)}
    if "pos_embed" in want and "pos_embed" not in shapes:
        del want["pos_embed"]  # a source without a table: the engine's formula stands in (noted)
    dropped = [k for k in shapes if not _is_encoder_key(k)]
    wrong = [k for k in shapes if _is_encoder_key(k) and k in want and want[k] != shapes[k]]
    if wrong:
        k = wrong[0]
        raise WeightsImportError(f"{path}: the state dict does not fit {arch or 'the ViT its shapes describe'}: {k} is {shapes[k]}, "
                                 f"{arch or 'expected'} has {want[k]} ({len(wrong)} tensor(s) differ: weights of another ViT size?)")
    extra = sorted((k for k in shapes if _is_encoder_key(k) and k not in want), key=_natural)
    if extra:
        raise WeightsImportError(f"{path}: {len(extra)} tensor(s) the engine's ViT has no place for (e.g. {', '.join(extra[:3])}): "
                                 "layer scale, qk-norm and other ViT variants are not supported")
    # the final norm is applied only when the source has one (a pooled model keeps it in fc_norm, ignored)
    absent = sorted((k for k in want if k not in shapes and not (k.startswith("norm.") and not spec.final_norm)), key=_natural)
    return spec, absent, dropped


def engine_config(path: Path, spec: VitSpec, preset: str | None, img_size: int | None, num_classes: int) -> tuple[str, GeoLinkConfig]:
    """``(preset, GeoLinkConfig)`` for the source ViT: the image encoder as the weights say, the rest the preset's.

    With ``preset`` its encoder sizes must equal the weights' (else the one-line wrong-size error naming both);
    without, the preset of the same ``embed_dim`` (the widest narrower one for other widths), and ``feature_layers``
    the preset's when the depth agrees, else the last block of each quarter of the depth.
    """
    sizes = {"embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio}
    if preset is not None:
        if preset not in PRESETS:
            raise WeightsImportError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
        base = GeoLinkConfig(**PRESETS[preset])
        theirs = {k: getattr(base, k) for k in sizes}
        if theirs != sizes:
            fits = [p for p in AUTO_PRESETS if {k: getattr(GeoLinkConfig(**PRESETS[p]), k) for k in sizes} == sizes]
            hint = f"--preset {fits[0]}" if fits else "no --preset (the weights' own sizes)"
            raise WeightsImportError(f"{path}: a {spec.describe()} state dict does not fit --preset {preset} "
                                     f"({SIZE_NAMES.get(base.embed_dim, 'ViT')}: embed_dim {base.embed_dim}, depth {base.depth}, "
                                     f"heads {base.num_heads}, mlp_ratio {base.mlp_ratio:g}); use {hint}")
        name = preset
    else:
        narrower = [p for p in AUTO_PRESETS if PRESETS[p]["embed_dim"] <= spec.embed_dim]
        name = narrower[-1] if narrower else AUTO_PRESETS[0]
    base = GeoLinkConfig(**PRESETS[name])
    layers = base.feature_layers if base.depth == spec.depth else spread_layers(spec.depth)
    try:
        cfg = create_config(name, **sizes, patch_size=spec.patch_size, in_chans=spec.in_chans, img_size=img_size or spec.img_size,
                            feature_layers=layers, class_token=spec.class_token, pos_embed=spec.pos_embed, final_norm=spec.final_norm,
                            num_classes=num_classes)
    except ValueError as exc:
        raise WeightsImportError(f"{path}: no GeoLink config for a {spec.describe()} with preset {name}: {exc}") from None
    return name, cfg


def spread_layers(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of ``depth`` (the decoder's levels), without repeats.

    >>> spread_layers(12), spread_layers(24), spread_layers(2)
    ((2, 5, 8, 11), (5, 11, 17, 23), (0, 1))
    """
    return tuple(sorted({max(0, depth * (q + 1) // 4 - 1) for q in range(4)}))


def map_encoder(encoder: dict[str, torch.Tensor], spec: VitSpec, cfg: GeoLinkConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The engine's tensors (``image_encoder.*``) from the source ViT's, and notes on what was transformed: the
    position table gets a zero class-token row when the source adds none (``no_embed_class``) and is resampled
    (bicubic) when the tile size differs."""
    import torch

    from geolink_model.image_encoder import resample_pos_embed

    out, notes = {}, []
    for key, value in encoder.items():
        name = _engine_key(key)
        if name is None or (key == "pos_embed" and cfg.pos_embed == "sincos"):
            continue
        value = value.detach().float().contiguous()
        if key == "pos_embed":
            grid = round((value.shape[1] - (1 if spec.class_token else 0)) ** 0.5)
            if spec.class_token and grid * grid != value.shape[1] - 1:  # a table without the class token's row
                value = torch.cat([torch.zeros_like(value[:, :1]), value], dim=1)
                notes.append("pos_embed has no class-token row (no_embed_class): a zero row added")
            old = round((value.shape[1] - cfg.class_token) ** 0.5)
            value = resample_pos_embed(value, cfg.grid_size, 1 if cfg.class_token else 0).contiguous()
            if old != cfg.grid_size:
                notes.append(f"pos_embed resampled from {old}x{old} to {cfg.grid_size}x{cfg.grid_size} patches (img_size {cfg.img_size})")
        out[name] = value
    return out, notes


def _engine_key(key: str) -> str | None:
    """The engine's name of a timm ViT tensor (None: no part of the engine's encoder)."""
    if key.startswith(("patch_embed.", "blocks.", "norm.")) or key == "cls_token":
        return f"{ENCODER}vit.{key}"
    if key == "pos_embed":
        return f"{ENCODER}pos_embed"
    return None


def _is_encoder_key(key: str) -> bool:
    """Part of the ViT encoder (compared, mapped) rather than its head, pooling norm or another model's part."""
    return _engine_key(key) is not None or key.startswith(("norm_pre.", "reg_token"))


def _source_img_size(path: Path, shapes: dict, class_token: bool, patch: int, model_config: dict) -> tuple[int, int]:
    """``(img_size, rows of the position table before the patches)``: from the table when there is one."""
    if "pos_embed" not in shapes:
        return int(model_config.get("img_size") or 224), 0
    length = shapes["pos_embed"][1]
    for prefix in ((1, 0) if class_token else (0,)):
        grid = round((length - prefix) ** 0.5)
        if grid * grid == length - prefix:
            return grid * patch, prefix
    raise WeightsImportError(f"{path}: pos_embed of {length} positions is no square patch grid"
                             f"{' (plus a class token)' if class_token else ''}")


def _reference(path: Path, arch: str | None, sizes: dict[str, Any], model_config: dict[str, Any]):
    """The timm ViT the source must match, on the ``meta`` device (no memory): the named architecture (with the
    file's size arguments), or the engine's ViT at the sizes the shapes say."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    if arch:
        if not timm.is_model(arch):
            raise WeightsImportError(f"{path}: unknown architecture {arch!r} (not a timm model name; e.g. vit_large_patch16_224)")
        with torch.device("meta"):
            plain = timm.create_model(arch, pretrained=False, num_classes=0)
        if not isinstance(plain, VisionTransformer):
            raise WeightsImportError(f"{path}: architecture {arch!r} is a {type(plain).__name__}, not a timm VisionTransformer")
        kwargs = {k: model_config[k] for k in VIT_ARGS if k in model_config}
        try:
            with torch.device("meta"):
                return timm.create_model(arch, pretrained=False, num_classes=0, img_size=sizes["img_size"], **kwargs)
        except Exception as exc:  # noqa: BLE001 (timm raises TypeError/ValueError/AssertionError for arguments a model lacks)
            raise WeightsImportError(f"{path}: cannot build {arch} with {kwargs or 'its defaults'} "
                                     f"({type(exc).__name__}: {_first_line(exc)})") from None
    heads = model_config.get("num_heads") or HEADS_BY_WIDTH.get(sizes["embed_dim"])
    if heads is None:
        raise WeightsImportError(f"{path}: cannot tell the attention heads of a ViT with embed_dim {sizes['embed_dim']} "
                                 f"(standard widths: {', '.join(map(str, HEADS_BY_WIDTH))}); pass --arch with its timm name")
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, num_heads=heads, **sizes)


def _engine_incompatibility(ref, spec: VitSpec) -> str | None:
    """Why the engine's encoder (the ViT of :class:`geolink_model.image_encoder.ImageEncoder`: plain timm blocks)
    would compute something else than the named architecture, or None. Compared module by module with a one-block
    engine ViT of the same width, on the ``meta`` device."""
    import timm
    import torch

    with torch.device("meta"):
        ours = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=spec.embed_dim, depth=1,
                                 num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, class_token=spec.class_token, pos_embed="none")
    block, mine = ref.blocks[0], ours.blocks[0]
    if ref.reg_token is not None:
        return "register tokens"

    def part(module, path: str):
        for name in path.split("."):
            module = getattr(module, name, None)
        return module

    for what, path in (("layer scale", "ls1"), ("qk-norm", "attn.q_norm"), ("norm", "norm1"), ("activation", "mlp.act")):
        theirs, engine = part(block, path), part(mine, path)
        if type(theirs) is not type(engine) or repr(theirs) != repr(engine):
            return f"{what}: {theirs!r}, the engine's {engine!r}"
    if type(ref.norm_pre) is not type(ours.norm_pre):
        return f"a pre-norm {ref.norm_pre!r} before the blocks"
    if type(block) is not type(mine) or repr(block) != repr(mine):  # anything else (another block class, extra norms)
        return f"its blocks are {type(block).__name__}s unlike the engine's plain {type(mine).__name__}"
    return None


def _normalisation(path: Path, model_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``model_config``'s mean/std (on [0, 1] pixels, one value or one per band), else the engine's default."""
    mean, std = model_config.get("mean"), model_config.get("std")
    if mean is None and std is None:
        return NORMALISATION
    mean, std = (mean if isinstance(mean, list | tuple) else [mean]), (std if isinstance(std, list | tuple) else [std])
    if not (mean and len(mean) == len(std) and all(isinstance(v, int | float) for v in [*mean, *std]) and all(v > 0 for v in std)):
        raise WeightsImportError(f"{path}: model_config mean/std must be numbers, one each or one per band, std > 0 (got {mean}, {std})")
    if any(abs(v) > 1 for v in [*mean, *std]):
        raise WeightsImportError(f"{path}: model_config mean/std {list(mean)}/{list(std)} are on the 0-255 scale; the engine "
                                 "normalises pixels scaled to [0, 1]: divide them by 255 and re-save")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _config_dict(cfg: GeoLinkConfig) -> dict:
    import json

    return json.loads(cfg.to_json())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _natural(key: str) -> list:
    """Sort key: ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's long weights-only message that names what was refused (``Unsupported global: ...``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    text = (named or lines or [type(exc).__name__])[0]
    return text.removeprefix("WeightsUnpickler error: ").rstrip(".")

