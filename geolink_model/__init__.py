"""GeoLink model: ViT image encoder + heterogeneous OSM graph encoder fused by cross-modal attention.

Pure PyTorch + timm + torch_geometric: never imports ``ray`` or ``engine``. Filled in by the model issue.
"""
