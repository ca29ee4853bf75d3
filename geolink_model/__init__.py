"""GeoLink model: ViT image encoder + heterogeneous OSM graph encoder fused by cross-modal attention.

Pure PyTorch + timm + torch_geometric: never imports ``ray`` or ``engine``.

Example:
    >>> from geolink_model import build_model, create_config
    >>> model = build_model(create_config("tiny", img_size=64, depth=2, feature_layers=(0, 1)))
"""

from geolink_model.config import PRESETS, GeoLinkConfig, create_config
from geolink_model.model import GeoLink, batch_graphs, build_model

__all__ = ["PRESETS", "GeoLink", "GeoLinkConfig", "batch_graphs", "build_model", "create_config"]
