"""Published weights -> model bundle (`geolink-engine import-weights`): the imported encoder computes what the
published ViT computes, the report says what was taken, bad files are one line, and finetune starts from it.

The sources are built here from timm's own ViT with small random weights (every tensor drawn, so a swapped or
dropped tensor changes the outputs), saved the way their publishers save them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from engine.cli import app
from engine.model_bundle import ModelBundle
from engine.weights_import import WeightsImportError, convert, import_weights
from geolink_model.config import GeoLinkConfig, create_config

ARCH = "vit_tiny_patch16_224"
MEAN, STD = [0.40, 0.41, 0.42], [0.20, 0.21, 0.22]


def _vit(img: int = 64, depth: int = 2, seed: int = 0, **sizes) -> torch.nn.Module:
    """timm's ViT-Ti/16 at ``img`` px with ``depth`` blocks, every weight random (no zero biases or unit norms)."""
    torch.manual_seed(seed)
    vit = timm.create_model(ARCH, pretrained=False, img_size=img, depth=depth, **sizes).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.2)
    return vit


def _geolink_pth(path, vit, **config) -> None:
    """The GeoLink authors' release format."""
    model_config = {"architecture": ARCH, "num_classes": 0, "global_pool": "", "pos_embed_requires_grad": False, "img_size": 64,
                    "depth": len(vit.blocks), **config}
    torch.save({"model_config": model_config, "model_state_dict": vit.state_dict()}, path)


def _outputs(model, x: torch.Tensor):
    enc = model.image_encoder.eval()
    with torch.no_grad():
        out = enc(x, return_layers=tuple(range(len(enc.vit.blocks))))
    return out.layers, out.tokens


def _assert_same(layers, tokens, want_layers, want_tokens) -> None:
    assert len(layers) == len(want_layers)
    for i, (a, b) in enumerate(zip(layers, want_layers)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"block {i}: max diff {(a - b).abs().max():.2e}"
    assert torch.allclose(tokens, want_tokens, rtol=1e-4, atol=1e-4), f"tokens: max diff {(tokens - want_tokens).abs().max():.2e}"


def _timm_outputs(vit, x: torch.Tensor):
    with torch.no_grad():
        final, layers = vit.forward_intermediates(x, indices=list(range(len(vit.blocks))), output_fmt="NLC")
    return layers, final[:, vit.num_prefix_tokens:]


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_geolink_pth_gives_the_published_vits_outputs(tmp_path):
    vit = _vit()
    _geolink_pth(tmp_path / "w.pth", vit, mean=MEAN, std=STD)
    model, report = convert(tmp_path / "w.pth")
    _assert_same(*_outputs(model, X), *_timm_outputs(vit, X))
    cfg = report.config
    assert (report.preset, report.source_format, report.architecture) == ("tiny", "geolink-pth", ARCH)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.feature_layers) == (192, 2, 3, 64, (0, 1))
    assert (cfg.class_token, cfg.pos_embed, cfg.final_norm) == (True, "fixed", True)  # pos_embed_requires_grad False: kept frozen
    source = [k for k in vit.state_dict() if not k.startswith("head.")]
    assert [src for src, _ in report.mapped] == source
    assert dict(report.mapped)["norm.weight"] == "image_encoder.vit.norm.weight"
    assert report.ignored == ("head.weight", "head.bias") and report.missing == ()
    assert report.normalisation == (tuple(MEAN), tuple(STD))
    # MAE masking keeps the class token out of the outputs and never hides it
    with torch.no_grad():
        masked = model.image_encoder(X, mask_ratio=0.5, return_layers=(1,))
    assert masked.tokens.shape == (2, 8, 192) and masked.layers[0].shape == (2, 8, 192)
    # the imported weights are what the engine holds; the rest is seeded
    again, _ = convert(tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_another_tile_size_resamples_the_position_table(tmp_path):
    vit = _vit()
    _geolink_pth(tmp_path / "w.pth", vit)
    model, report = convert(tmp_path / "w.pth", img_size=128)
    table = model.image_encoder.pos_embed
    assert report.config.img_size == 128 and table.shape == (1, 1 + 64, 192)
    assert torch.equal(table[:, :1], vit.pos_embed[:, :1])  # the class token's position is kept as it is
    assert any("resampled from 4x4 to 8x8" in n for n in report.notes)
    # timm itself, at 128 px with its table resampled the same way, computes the same
    big = timm.create_model(ARCH, pretrained=False, img_size=128, depth=2).eval()
    state = {**vit.state_dict(), "pos_embed": table.detach()}
    big.load_state_dict(state)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    _assert_same(*_outputs(model, x), *_timm_outputs(big, x))


def test_multimodal_release_takes_the_encoder_its_forward_uses(tmp_path):
    """GeoLink's multimodal checkpoint: the ViT under img_encoder., and the class token, position table and final
    norm its forward_img_encoder reads at the top (the ViT's own are unused there)."""
    vit, top = _vit(seed=0), _vit(seed=1)  # `top` stands in for the wrapper's own cls_token / img_pos_embed / img_norm
    state = {f"img_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    state.update({"cls_token": top.cls_token.data, "img_pos_embed": top.pos_embed.data, "img_norm.weight": top.norm.weight.data,
                  "img_norm.bias": top.norm.bias.data, "osm_encoder.convs.0.lin.weight": torch.randn(8, 4),
                  "img_decoder_mlp.weight": torch.randn(4, 192)})
    torch.save({"model_config": {"architecture": ARCH, "img_size": 64, "depth": 2, "num_classes": 0, "global_pool": ""},
                "model_state_dict": state}, tmp_path / "mm.pth")
    model, report = convert(tmp_path / "mm.pth")
    # GeoLink's forward_img_encoder, written out
    with torch.no_grad():
        x = vit.patch_embed(X) + top.pos_embed[:, 1:]
        x = torch.cat([(top.cls_token + top.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
        want_layers = []
        for block in vit.blocks:
            x = block(x)
            want_layers.append(x[:, 1:])
        want_tokens = top.norm(x)[:, 1:]
    _assert_same(*_outputs(model, X), want_layers, want_tokens)
    assert report.source_format == "geolink-multimodal-pth" and report.config.pos_embed == "fixed"  # GeoLink never trains img_pos_embed
    mapped = dict(report.mapped)
    assert mapped["cls_token"] == "image_encoder.vit.cls_token" and mapped["img_pos_embed"] == "image_encoder.pos_embed"
    assert mapped["img_norm.weight"] == "image_encoder.vit.norm.weight" and mapped["img_encoder.blocks.1.mlp.fc2.bias"].endswith("blocks.1.mlp.fc2.bias")
    assert set(report.ignored) == {"osm_encoder.convs.0.lin.weight", "img_decoder_mlp.weight", "img_encoder.cls_token",
                                   "img_encoder.pos_embed", "img_encoder.norm.weight", "img_encoder.norm.bias"}
    assert report.missing == ()


def test_timm_safetensors_with_the_architecture_inferred(tmp_path):
    vit = _vit()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model, report = convert(tmp_path / "vit.safetensors")
    _assert_same(*_outputs(model, X), *_timm_outputs(vit, X))
    assert (report.source_format, report.architecture, report.config.num_heads) == ("timm-safetensors", "inferred", 3)
    assert report.config.pos_embed == "learned" and report.normalisation == ((0.45,), (0.25,))  # nothing says: the engine's


class Recipe:  # a custom object in a checkpoint: loading it would need full unpickling
    lr = 0.1


def test_files_needing_more_than_tensors_and_bad_files_are_one_line(tmp_path):
    vit = _vit()
    torch.save({"model_config": {"architecture": ARCH}, "model_state_dict": vit.state_dict(), "recipe": Recipe()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsImportError, match=r"pickled\.pth holds pickled Python objects \(.*Recipe.*weights_only=True.*state_dict\(\)") as err:
        convert(tmp_path / "pickled.pth")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsImportError, match="junk.pth: not a PyTorch checkpoint"):
        convert(tmp_path / "junk.pth")
    torch.save({"model_config": {}, "model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "cnn.pth")
    with pytest.raises(WeightsImportError, match="no ViT image encoder found"):
        convert(tmp_path / "cnn.pth")


def test_weights_of_another_size_are_refused_naming_both(tmp_path):
    vit = _vit()
    _geolink_pth(tmp_path / "w.pth", vit)
    with pytest.raises(WeightsImportError, match=r"a ViT-Ti \(embed_dim 192, depth 2, heads 3.*does not fit --preset large "
                                                 r"\(ViT-L: embed_dim 1024, depth 24, heads 16") as err:
        convert(tmp_path / "w.pth", preset="large")
    assert "\n" not in str(err.value)
    torch.save({"model_config": {"architecture": "vit_base_patch16_224", "img_size": 64, "depth": 2}, "model_state_dict": vit.state_dict()},
               tmp_path / "named-wrong.pth")
    with pytest.raises(WeightsImportError, match=r"does not fit vit_base_patch16_224: cls_token is \(1, 1, 192\), vit_base_patch16_224 has "
                                                 r"\(1, 1, 768\) \(30 tensor\(s\) differ: weights of another ViT size\?\)"):
        convert(tmp_path / "named-wrong.pth")
    with pytest.raises(WeightsImportError, match="--preset tiny"):  # a preset whose sizes differ only in depth
        convert(tmp_path / "w.pth", preset="tiny")


def test_unknown_and_unsupported_architectures_are_refused(tmp_path):
    vit = _vit()
    for arch, why in (("vit_gigantic_nope", "unknown architecture 'vit_gigantic_nope'"),
                      ("resnet18", "'resnet18' is a ResNet, not a timm VisionTransformer"),
                      ("vit_base_patch16_reg4_gap_256", "register tokens"),
                      ("deit3_small_patch16_224", "ViT variant the engine's encoder cannot hold \\(layer scale")):
        _geolink_pth(tmp_path / "w.pth", vit, architecture=arch)
        with pytest.raises(WeightsImportError, match=why):
            convert(tmp_path / "w.pth")
    odd = _vit(embed_dim=96, num_heads=3)
    save_file(dict(odd.state_dict()), str(tmp_path / "odd.safetensors"))
    with pytest.raises(WeightsImportError, match="cannot tell the attention heads of a ViT with embed_dim 96.*--arch"):
        convert(tmp_path / "odd.safetensors")


def test_old_config_files_read_with_the_old_encoder():
    old = json.loads(create_config("tiny").to_json())
    for key in ("class_token", "pos_embed", "final_norm"):
        del old[key]  # a config.json written before these fields existed
    cfg = GeoLinkConfig.from_json(json.dumps(old))
    assert (cfg.class_token, cfg.pos_embed, cfg.final_norm) == (False, "sincos", False)
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        create_config("tiny", pos_embed="rope")


def test_cli_writes_a_bundle_and_prints_the_report(tmp_path):
    runner = CliRunner()
    vit = _vit()
    _geolink_pth(tmp_path / "w.pth", vit, mean=MEAN, std=STD)
    out = tmp_path / "models" / "geolink-ti"
    result = runner.invoke(app, ["import-weights", str(tmp_path / "w.pth"), "--out", str(out), "--gsd-m", "0.6", "--classes", "binary"])
    assert result.exit_code == 0, result.output
    assert "mapped 30: cls_token, pos_embed, patch_embed.proj.weight" in result.output
    assert "ignored 2: head.weight, head.bias" in result.output and "missing 0" in result.output
    bundle = ModelBundle.load(out)
    assert bundle.classes == ("other", "urban_village") and bundle.mode == "fused" and bundle.gsd_m == 0.6
    assert bundle.normalisation == (tuple(MEAN), tuple(STD)) and bundle.bands == (1, 2, 3)
    train = bundle.train
    assert train["imported_from"]["sha256"] == __import__("hashlib").sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    assert train["architecture"] == ARCH and train["model"]["class_token"] is True
    card = (out / "MODEL_CARD.md").read_text()
    assert "imported from" in card and "finetune --init-from" in card and "0.6 m" in card
    _assert_same(*_outputs(bundle.load_model(), X), *_timm_outputs(vit, X))
    again = runner.invoke(app, ["import-weights", str(tmp_path / "w.pth"), "--out", str(out)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    wrong = runner.invoke(app, ["import-weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "models" / "x"), "--preset", "large"])
    assert wrong.exit_code == 2 and "does not fit --preset large" in wrong.output and "Traceback" not in wrong.output
    assert not (tmp_path / "models" / "x").exists()


@pytest.mark.slow
def test_finetune_starts_from_an_imported_bundle(prepared_demo, tmp_path):
    """A ViT of the `test` preset's sizes at 64 px, imported, then fine-tuned on the 128 px demo tiles for one epoch
    under another --preset (ignored: the bundle's config is the model's)."""
    from engine.pipelines.train import TrainConfig, run_training
    from geolink_model.checkpoint import load_model
    from geolink_model.image_encoder import resample_pos_embed

    shared, catalog = prepared_demo
    ws = shutil.copytree(shared, tmp_path / "ws")
    vit = _vit(embed_dim=96, num_heads=3)
    _geolink_pth(tmp_path / "w.pth", vit, embed_dim=96, num_heads=3, mean=MEAN, std=STD)
    imported = import_weights(tmp_path / "w.pth", tmp_path / "imported", preset="test").out
    ft = run_training(catalog, ws, TrainConfig(task="finetune", preset="tiny", epochs=1, batch_size=8, num_workers=1, cpus_per_worker=0.5,
                                               init_from=str(imported), label_fraction=0.5, mode="fused"),
                      name="ft-imported", storage=str(tmp_path / "runs"))
    model, _ = load_model(ft)
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.img_size, cfg.class_token, cfg.pos_embed) == (96, 2, 128, True, "fixed")
    # the frozen table is the imported one, resampled to the 128 px tiles' grid
    assert torch.allclose(model.image_encoder.pos_embed, resample_pos_embed(vit.pos_embed.detach(), 8, 1))
    bundle = ModelBundle.load(ft)
    assert bundle.normalisation == (tuple(MEAN), tuple(STD))  # trained with the imported encoder's statistics, mapped with them
    card = (ft / "MODEL_CARD.md").read_text()
    assert "init imported from" in card and "val_miou" in card and "| train |" in card
