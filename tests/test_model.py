"""GeoLink model invariants: shapes, masking, losses, batching, modes, empty graphs, checkpoints, presets."""

import numpy as np
import pytest
import shapely
import torch

from geolink_model import PRESETS, batch_graphs, build_model, create_config
from geolink_model.checkpoint import load_model, save_model
from geolink_model.config import GeoLinkConfig
from geolink_model.osm_graph import OsmGraphConfig, build_tile_graph, tokenize_tags

CFG = create_config("test", img_size=64)
GRAPH_CFG = OsmGraphConfig()


def _graph(n_polygons: int, points: bool = True, lines: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    geoms, kinds, tags = [], [], []
    for _ in range(n_polygons):
        x, y = rng.uniform(0, 50, 2)
        geoms.append(shapely.box(x, y, x + rng.uniform(3, 14), y + rng.uniform(3, 14)))
        kinds.append("polygon")
        tags.append({"building": str(rng.choice(["yes", "house", "apartments"]))})
    if points:
        geoms += [shapely.Point(rng.uniform(0, 64, 2)) for _ in range(3)]
        kinds += ["point"] * 3
        tags += [{"shop": "convenience"}, {"amenity": "restaurant"}, {"shop": "kiosk"}]
    if lines:
        geoms.append(shapely.LineString([(0, rng.uniform(0, 64)), (64, rng.uniform(0, 64))]))
        kinds.append("line")
        tags.append({"highway": "residential"})
    return build_tile_graph(np.array(geoms, dtype=object), np.array(kinds), tokenize_tags(tags, GRAPH_CFG), np.arange(len(geoms)),
                            (0.0, 0.0, 64.0, 64.0), GRAPH_CFG)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    graphs = [_graph(4, seed=1), _graph(0, points=False, lines=False), _graph(7, seed=2), _graph(2, points=False, seed=3)]
    return torch.randn(4, 3, 64, 64), graphs


def test_masking_keeps_the_configured_share_of_patches():
    model = build_model(CFG)
    images = torch.randn(3, 3, 64, 64)
    enc = model.image_encoder(images, mask_ratio=0.75)
    n = CFG.num_patches
    assert enc.tokens.shape == (3, round(n * 0.25), CFG.embed_dim)
    assert enc.mask.shape == (3, n) and (enc.mask.sum(dim=1) == n - round(n * 0.25)).all()
    for row, keep in zip(enc.mask, enc.keep):
        assert len(set(keep.tolist())) == len(keep) and (row[keep] == 0).all()  # kept patches are the unmasked ones
    full = model.image_encoder(images, return_layers=(0, 1))
    assert full.tokens.shape == (3, n, CFG.embed_dim) and full.keep is None and len(full.layers) == 2


def test_each_pretraining_loss_is_finite_and_decreases(batch):
    images, graphs = batch
    torch.manual_seed(0)
    model = build_model(CFG)
    data = batch_graphs(graphs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(12):
        torch.manual_seed(123)  # the same masks every step: a fixed objective that must go down
        losses = model.pretrain_losses(images, data)
        assert all(torch.isfinite(v) for v in losses.values())
        history.append({k: float(v) for k, v in losses.items()})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    for name in ("mae", "contrastive", "node", "loss"):
        assert history[-1][name] < history[0][name] * 0.9, (name, history[0][name], history[-1][name])


@pytest.mark.parametrize("mode", ["image", "osm", "fused"])
def test_batched_forward_equals_per_graph_forward(batch, mode):
    images, graphs = batch
    model = build_model(CFG).eval()
    with torch.no_grad():
        together = model(images, batch_graphs(graphs), mode)
        alone = torch.cat([model(images[i:i + 1], batch_graphs([g]), mode) for i, g in enumerate(graphs)])
    assert together.shape == (4, CFG.num_classes, 64, 64)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_graphs_without_nodes_of_some_or_all_types_work(batch):
    images, _ = batch
    model = build_model(CFG).eval()
    empty = batch_graphs([_graph(0, points=False, lines=False)] * 2)
    only_points = batch_graphs([_graph(0, lines=False), _graph(0, lines=False, seed=5)])
    with torch.no_grad():
        for data in (empty, only_points):
            for mode in ("osm", "fused"):
                out = model(images[:2], data, mode)
                assert out.shape == (2, 2, 64, 64) and torch.isfinite(out).all()
    losses = build_model(CFG).pretrain_losses(images[:2], empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["contrastive"]) == 0.0 and float(losses["node"]) == 0.0  # nothing to contrast or rebuild


def test_osm_position_guides_fusion(batch):
    """Moving the OSM changes the fused prediction where it moved (the node position embedding is used)."""
    images, _ = batch
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    left = batch_graphs([_graph(5, seed=7)])
    shifted = _graph(5, seed=7)
    shifted.nodes["polygon"].geom[:, [0, 2, 4]] = 1.0 - shifted.nodes["polygon"].geom[:, [0, 2, 4]]
    with torch.no_grad():
        a = model(images[:1], left, "fused")
        b = model(images[:1], batch_graphs([shifted]), "fused")
    assert not torch.allclose(a, b)


def test_checkpoint_round_trip_is_bit_exact(tmp_path, batch):
    images, graphs = batch
    model = build_model(CFG).eval()
    save_model(model, tmp_path / "m", extra={"model_version": "test-1"})
    loaded, extra = load_model(tmp_path / "m")
    loaded.eval()
    assert extra == {"model_version": "test-1"} and loaded.cfg == CFG
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(images, batch_graphs(graphs), "fused"), loaded(images, batch_graphs(graphs), "fused"))
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.pkl"))
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds(preset):
    cfg = create_config(preset)
    with torch.device("meta"):  # no memory: checks the architecture is consistent at the paper's sizes too
        model = build_model(cfg)
    n = sum(p.numel() for p in model.image_encoder.parameters())
    expected = {"test": (2.5e5, 3.5e5), "tiny": (1.5e6, 2.5e6), "base": (80e6, 90e6), "large": (290e6, 310e6)}[preset]  # ViT-B/16 86M, ViT-L/16 304M
    assert expected[0] < n < expected[1], n
    assert GeoLinkConfig.from_json(cfg.to_json()) == cfg


def test_bundles_saved_before_the_osm_grid_switch_keep_their_fused_forward():
    import json

    old = json.loads(create_config("tiny").to_json())
    del old["osm_grid_in_fused"]  # a config written before the field existed
    assert GeoLinkConfig.from_json(json.dumps(old)).osm_grid_in_fused is False
    assert create_config("tiny").osm_grid_in_fused is True  # new models get it


def test_config_rejects_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match="unknown preset"):
        create_config("huge")
    with pytest.raises(ValueError, match="unknown GeoLinkConfig fields"):
        create_config("tiny", depht=2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_config("tiny", img_size=100)
    with pytest.raises(ValueError, match="mode"):
        build_model(CFG)(torch.zeros(1, 3, 64, 64), None, "both")
