"""GeoLink model: ViT image encoder + heterogeneous OSM graph encoder fused by cross-modal attention.

Pure PyTorch + timm + torch_geometric: never imports ``ray`` or ``engine``. The public names below load lazily, so
``geolink_model.osm_graph`` (numpy + shapely only) can be used without importing torch.

Example:
    >>> from geolink_model import build_model, create_config
    >>> model = build_model(create_config("tiny", img_size=64, depth=2, feature_layers=(0, 1)))
"""

from __future__ import annotations

import importlib

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
