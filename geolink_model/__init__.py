"""GeoLink model: ViT image encoder + heterogeneous OSM graph encoder fused by cross-modal attention.

Pure PyTorch + timm + torch_geometric: never imports ``ray`` or ``engine``. The public names below load lazily, so
``geolink_model.osm_graph`` (numpy + shapely only) can be used without importing torch.

Example:
    >>> from geolink_model import build_model, create_config
    >>> model = build_model(create_config("tiny", img_size=64, depth=2, feature_layers=(0, 1)))
"""

from __future__ import annotations

import importlib
import warnings

# Filtered, not fixed: torch_geometric (2.8, imported by the model modules) calls torch.jit.script on two of its own
# NamedTuples when imported (torch_geometric/nn/pool/{connect,select}/base.py), and torch 2.10+ deprecates
# torch.jit.script with a FutureWarning, in every process that builds a model (the CLI, each Ray worker). Nothing
# here calls torch.jit.script; only that message, from torch's jit module, is ignored.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning, module=r"torch\.jit\._script")

_EXPORTS = {
    "PRESETS": "geolink_model.config",
    "GeoLinkConfig": "geolink_model.config",
    "create_config": "geolink_model.config",
    "GeoLink": "geolink_model.model",
    "batch_graphs": "geolink_model.model",
    "build_model": "geolink_model.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'geolink_model' has no attribute {name!r}")
