"""GAIR's geolocation encoder and INR lookup: determinism, distinct places, the location loss, the fused input,
old configs and bundles, the lookup's exactness at patch centres, and lon/lat from a batch into a training step."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from geolink_model import batch_graphs, build_model, create_config
from geolink_model.checkpoint import load_model, save_model
from geolink_model.config import GeoLinkConfig
from geolink_model.inr import InrLookup, inr_loss, lookup
from geolink_model.location import LocationEncoder
from geolink_model.osm_graph import OsmGraphConfig, build_tile_graph, tokenize_tags

CFG = create_config("test", img_size=64, with_location=True)
# tile centres, degrees: six cities 700-2,000 km apart
CITIES = torch.tensor([[116.40, 39.90], [121.47, 31.23], [113.26, 23.13], [104.07, 30.67], [108.94, 34.34], [114.31, 30.59]],
                      dtype=torch.float64)
KM_PER_DEG_LAT = 111.2


def _graph(seed: int):
    import shapely

    rng = np.random.default_rng(seed)
    geoms = [shapely.box(*rng.uniform(0, 40, 2), *rng.uniform(44, 64, 2)), shapely.Point(rng.uniform(0, 64, 2))]
    cfg = OsmGraphConfig()
    tokens = tokenize_tags([{"building": "yes"}, {"shop": "kiosk"}], cfg)
    return build_tile_graph(np.array(geoms, dtype=object), np.array(["polygon", "point"]), tokens, np.arange(2), (0.0, 0.0, 64.0, 64.0), cfg)


@pytest.fixture(scope="module")
def graphs():
    return [_graph(i) for i in range(len(CITIES))]


# --- the location encoder ---------------------------------------------------------------------------------------
def test_location_features_are_fixed_and_the_encoder_deterministic():
    torch.manual_seed(0)
    a = LocationEncoder(CFG)
    torch.manual_seed(1)
    b = LocationEncoder(CFG)
    torch.testing.assert_close(a.features(CITIES), b.features(CITIES), rtol=0, atol=0)  # computed from the config, not sampled
    assert torch.equal(a(CITIES), a(CITIES))
    plain = a.features(CITIES)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float64 under autocast too (bf16 would scramble the 1 km phases)
        assert torch.equal(a.features(CITIES), plain)
    assert a.features(CITIES).shape == (6, 2 * 8 * CFG.location_scales)
    assert not [k for k, _ in a.named_buffers() if k in a.state_dict()]  # nothing of it is saved in a bundle


def test_distinct_places_have_distinct_embeddings():
    enc = LocationEncoder(CFG)
    beijing = CITIES[:1]
    east_500km = beijing + torch.tensor([[500 / (KM_PER_DEG_LAT * np.cos(np.radians(39.9))), 0.0]], dtype=torch.float64)
    north_1km = beijing + torch.tensor([[0.0, 1 / KM_PER_DEG_LAT]], dtype=torch.float64)
    for other in (east_500km, north_1km):
        for f in (enc.features, enc):
            cos = torch.nn.functional.cosine_similarity(f(beijing), f(other)).item()
            assert cos < 0.999, (f, cos)
    # injective on a grid: the whole globe at 10 degrees, and a 1 km grid around one city
    lon, lat = torch.meshgrid(torch.arange(-180.0, 180.0, 10.0), torch.arange(-80.0, 81.0, 10.0), indexing="ij")
    world = torch.stack([lon.reshape(-1), lat.reshape(-1)], dim=1).double()
    step = 1 / KM_PER_DEG_LAT
    dx, dy = torch.meshgrid(torch.arange(10) * step, torch.arange(10) * step, indexing="ij")
    city = beijing + torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=1).double()
    for points in (world, city):
        feats = enc.features(points)
        dist = torch.cdist(feats, feats) + torch.eye(len(points)) * 1e9
        assert dist.min() > 0.1, dist.min()
    # no seam at the antimeridian: 11 m apart across it, features as close as 11 m apart anywhere
    across = enc.features(torch.tensor([[179.99995, 0.0], [-179.99995, 0.0]], dtype=torch.float64))
    beside = enc.features(torch.tensor([[10.0, 0.0], [10.0001, 0.0]], dtype=torch.float64))
    assert (across[0] - across[1]).norm() < min(0.2, 2 * (beside[0] - beside[1]).norm())


def test_location_needs_a_global_coarsest_wavelength():
    with pytest.raises(ValueError, match="diameter"):
        create_config("test", with_location=True, location_max_km=5000.0)


# --- pretraining and the fused model ----------------------------------------------------------------------------
def test_location_loss_is_finite_and_falls(graphs):
    torch.manual_seed(0)
    model = build_model(CFG)
    images = torch.randn(len(CITIES), 3, 64, 64)
    data = batch_graphs(graphs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for _ in range(30):
        torch.manual_seed(7)  # the same masks every step
        losses = model.pretrain_losses(images, data, lonlat=CITIES)
        assert all(torch.isfinite(v) for v in losses.values())
        history.append(float(losses["location"].detach()))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert history[-1] < 0.5 * history[0], history
    assert float(model.pretrain_losses(images, data)["location"]) == 0.0  # without lon/lat: nothing to contrast
    assert "location" not in build_model(create_config("test", img_size=64)).pretrain_losses(images, data)


def test_fused_forward_with_and_without_location(graphs):
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    images, data = torch.randn(2, 3, 64, 64), batch_graphs(graphs[:2])
    with torch.no_grad():
        plain = model(images, data, "fused")
        # the location projection starts at zero: a model given location first computes what it did without
        torch.testing.assert_close(model(images, data, "fused", CITIES[:2]), plain, rtol=0, atol=0)
        torch.nn.init.normal_(model.location.to_tokens.weight, std=0.5)  # as if trained
        here, there = model(images, data, "fused", CITIES[:2]), model(images, data, "fused", CITIES[[1, 0]])
        assert here.shape == (2, CFG.num_classes, 64, 64) and torch.isfinite(here).all()
        assert not torch.allclose(here, plain) and not torch.allclose(here, there)
        unknown = model(images, data, "fused", torch.tensor([[float("nan")] * 2, CITIES[1].tolist()], dtype=torch.float64))
        torch.testing.assert_close(unknown[0], plain[0])  # a non-finite row = no location for that tile
        torch.testing.assert_close(unknown[1], here[1])
        for mode in ("image", "osm"):
            assert model(images, data, mode, CITIES[:2]).shape == here.shape
        plain_model = build_model(create_config("test", img_size=64)).eval()
        assert plain_model(images, data, "fused", CITIES[:2]).shape == here.shape  # a model without the encoder ignores lon/lat


def test_old_configs_and_bundles_load_unchanged(tmp_path, graphs):
    plain, located = build_model(create_config("test")), build_model(create_config("test", with_location=True, inr=True))
    keys, extra = set(plain.state_dict()), set(located.state_dict()) - set(plain.state_dict())
    assert not [k for k in keys if k.startswith(("location.", "inr."))]
    assert extra and all(k.startswith(("location.", "inr.")) for k in extra) and keys <= set(located.state_dict())
    # a bundle from before the switches: its config.json lacks their fields and the new losses' weights
    torch.manual_seed(0)
    model = build_model(create_config("test", img_size=64)).eval()
    bundle = save_model(model, tmp_path / "old")
    doc = json.loads((bundle / "config.json").read_text())
    for name in ("with_location", "location_scales", "location_min_km", "location_max_km", "inr"):
        del doc["config"][name]
    doc["config"]["loss_weights"] = {"mae": 1.0, "contrastive": 0.5, "node": 0.5}
    (bundle / "config.json").write_text(json.dumps(doc))
    loaded, _ = load_model(bundle)  # strict: every weight matches
    assert not loaded.cfg.with_location and loaded.location is None and loaded.inr is None
    assert loaded.cfg.loss_weights["location"] == 0.5  # a location encoder added later (finetune --with-location) gets a weight
    images, data = torch.randn(2, 3, 64, 64), batch_graphs(graphs[:2])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images, data, "fused"), model(images, data, "fused"))
    # a config that says its losses keeps them as they are
    said = json.loads(create_config("test", with_location=True, loss_weights={"mae": 1.0, "location": 2.0}).to_json())
    assert GeoLinkConfig.from_json(json.dumps(said)).loss_weights == {"mae": 1.0, "location": 2.0}


# --- the INR lookup ---------------------------------------------------------------------------------------------
def _trained_like(dim: int) -> InrLookup:
    torch.manual_seed(3)
    inr = InrLookup(dim)
    torch.nn.init.normal_(inr.mlp[-1].weight, std=0.3)  # a non-zero correction, as after training
    return inr


def test_inr_lookup_is_exact_at_patch_centres_continuous_between_and_clamped_at_edges():
    g, d = 8, 16
    torch.manual_seed(0)
    tokens = torch.randn(2, g * g, d)
    idx = (torch.arange(g, dtype=torch.float32) + 0.5) / g
    yy, xx = torch.meshgrid(idx, idx, indexing="ij")
    centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1).expand(2, -1, -1)
    for inr in (None, _trained_like(d)):
        torch.testing.assert_close(lookup(tokens, centres, inr), tokens, rtol=1e-6, atol=1e-6)
        as_map = tokens.transpose(1, 2).reshape(2, d, g, g)
        torch.testing.assert_close(lookup(as_map, centres, inr), tokens)  # (B, D, g, g) the same as (B, N, D)
        # continuous: tiny steps give tiny changes, across patch centres and cell boundaries alike
        line = torch.linspace(0.0, 1.0, 2001)
        points = torch.stack([line, torch.full_like(line, 0.37)], dim=-1)[None].expand(2, -1, -1)
        values = lookup(tokens, points, inr)
        steps = (values[:, 1:] - values[:, :-1]).norm(dim=-1)
        assert steps.max() < 0.1 * tokens.norm(dim=-1).mean(), steps.max()
        # outside the tile: clamped to its edge
        torch.testing.assert_close(lookup(tokens, torch.tensor([[[-0.3, 1.4]]] * 2), inr), lookup(tokens, torch.tensor([[[0.0, 1.0]]] * 2), inr))
    # without the MLP, beyond the outermost centres the edge patch answers, and midway between two centres the mean
    torch.testing.assert_close(lookup(tokens, torch.tensor([[[0.01, 0.01]]] * 2))[:, 0], tokens[:, 0])
    torch.testing.assert_close(lookup(tokens, torch.tensor([[[1.0 / g, 0.5 / g]]] * 2))[:, 0], (tokens[:, 0] + tokens[:, 1]) / 2)


def test_inr_is_trained_by_its_pretraining_loss(graphs):
    torch.manual_seed(0)
    model = build_model(create_config("test", img_size=64, inr=True, with_location=True))
    images = torch.randn(2, 3, 64, 64)
    losses = model.pretrain_losses(images, batch_graphs(graphs[:2]), lonlat=CITIES[:2])
    assert torch.isfinite(losses["inr"]) and losses["inr"].requires_grad
    opt = torch.optim.Adam(model.inr.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        gen = torch.Generator().manual_seed(5)  # the same shift every step: a fixed objective
        loss = inr_loss(model.image_encoder, model.inr, images, model.cfg.patch_size, gen)
        history.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.8 * history[0], history
    assert all(p.grad is None for p in model.image_encoder.parameters())  # only the INR learns from it


# --- lon/lat from a batch of tiles to the model -----------------------------------------------------------------
def _sample_batch(graphs, lonlat: bool) -> pa.Table:
    from engine.pixels import to_tensor_column
    from engine.tiles.graph_store import graphs_to_table

    n = len(graphs)
    table = graphs_to_table([f"t{i}" for i in range(n)], graphs, OsmGraphConfig().tokens_per_node)
    rng = np.random.default_rng(0)
    table = table.append_column("image", to_tensor_column([rng.integers(0, 255, (3, 64, 64), dtype=np.uint8) for _ in range(n)]))
    table = table.append_column("label", to_tensor_column([rng.integers(0, 2, (64, 64), dtype=np.uint8) for _ in range(n)]))
    if lonlat:
        half = 0.001
        for name, col, sign in (("lon_min", 0, -1), ("lat_min", 1, -1), ("lon_max", 0, 1), ("lat_max", 1, 1)):
            table = table.append_column(name, pa.array((CITIES[:n, col] + sign * half).tolist(), pa.float64()))
    return table


def test_a_training_step_reads_lonlat_through_collate(graphs, tmp_path):
    from engine.mapping.predict import ModelPredictor
    from engine.pixels import collate, tile_lonlat

    batch = _sample_batch(graphs, lonlat=True)
    images, data, labels = collate(batch)
    lonlat = tile_lonlat(batch)
    assert lonlat.dtype == torch.float64 and torch.allclose(lonlat, CITIES)
    assert tile_lonlat(_sample_batch(graphs, lonlat=False)) is None
    torch.manual_seed(0)
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(images, data, "pretrain", lonlat)  # as the Ray Train loop calls it
    losses["loss"].backward()
    opt.step()
    assert float(losses["location"]) > 0
    logits = model(images, data, "fused", lonlat)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    # inference: the predictor passes the tile centres to a location bundle
    bundle = save_model(model.eval(), tmp_path / "located")
    probs = ModelPredictor(str(bundle), mode="fused", device="cpu").predict(batch)
    assert probs.shape == (len(CITIES), CFG.num_classes, 64, 64)
    with torch.no_grad():
        expected = torch.softmax(model(images, data, "fused", lonlat), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)


def test_training_commands_take_with_location():
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.pipelines.train import TrainConfig

    assert TrainConfig(task="pretrain", with_location=True).with_location
    for command in ("pretrain", "finetune"):
        result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "--with-location" in result.output, result.output
