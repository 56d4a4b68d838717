"""Frozen ViTs (DINOv2, CLIP, SigLIP): token maps at the extraction size, local weights in every layout,
timm's preprocessing, and cache keys. Offline: random weights only, saved to files where a file is needed."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import resample_abs_pos_embed
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.data.video import SAMPLING_RULE_VERSION, ViewSpec, resize_short_side
from pipeline.features.backbones import get_backbone
from pipeline.features.cache import open_cache
from pipeline.features.extract import ExtractSettings, fingerprint, recipe
from pipeline.features.presets import PRESETS, preset_lines
from pipeline.features.recipe import cache_key
from pipeline.features.weights import WeightsUnavailable, file_sha256, state_dict_sha256

DINO = "vit_small_patch14_dinov2"
DINO_REG = "vit_small_patch14_reg4_dinov2"
MANIFEST = pd.DataFrame(
    [
        {"video_id": "a/v0", "class": "a", "split": "train", "path": "a/v0.mp4"},
        {"video_id": "b/v1", "class": "b", "split": "test", "path": "b/v1.mp4"},
    ]
)


def _released(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random state dict of the model at its default size (DINOv2: 518 px, 37 x 37 position embeddings),
    as a released file holds it; dyadic class tokens keep the layout conversions below exact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
        state["cls_token"] = torch.randint(-8, 8, state["cls_token"].shape) / 4.0
    return state


@pytest.mark.parametrize(
    ("name", "size", "shape", "prefix"),
    [
        (DINO, 224, (384, 16, 16), 1),  # class token
        (DINO_REG, 112, (384, 8, 8), 5),  # class token + 4 registers
        ("clip_vitb16", 112, (768, 7, 7), 1),
        ("siglip_vitb16", 112, (768, 7, 7), 0),  # no class token
    ],
)
def test_vits_give_their_patch_tokens_as_a_map_at_the_extraction_size(name, size, shape, prefix):
    backbone = get_backbone(name, pretrained=False, image_size=size)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        fmap = backbone(x)
        tokens = backbone.trunk.model.forward_features(x)
    assert tuple(fmap.shape) == (2, *shape) and backbone.dim == shape[0]
    assert backbone.trunk.model.num_prefix_tokens == prefix
    # Row-major patch tokens, prefix (class, register) tokens dropped.
    assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, prefix:])


@pytest.mark.parametrize(("layer", "blocks"), [("blocks.11", 12), ("blocks.2", 3)])
def test_a_vit_layer_is_that_block(layer, blocks):
    """--layer blocks.N keeps blocks 0..N (timm's features_only default lists only a ViT's last 3 blocks,
    so an index into that list picked another block)."""
    backbone = get_backbone(DINO, layer=layer, pretrained=False, image_size=56)
    kept = {m.group(1) for k in backbone.trunk.state_dict() if (m := re.search(r"blocks\.(\d+)\.attn\.qkv\.weight", k))}
    assert len(kept) == blocks and backbone.layer == layer
    with pytest.raises(ValueError, match="blocks.0"):
        get_backbone(DINO, layer="blocks.12", pretrained=False, image_size=56)


def test_without_an_image_size_a_dinov2_name_is_built_for_518_px():
    backbone = get_backbone(DINO, pretrained=False)
    with pytest.raises(AssertionError, match="518"), torch.inference_mode():
        backbone(torch.zeros(1, 3, 224, 224))
    assert get_backbone("dinov2_vits14", pretrained=False).trunk.model.patch_embed.grid_size == (16, 16)


def test_a_518px_file_in_safetensors_or_torch_format_loads_at_224_with_one_weights_id(tmp_path):
    state = _released(DINO)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(state, tmp_path / "dino.pth")
    safetensors.torch.save_file(state, tmp_path / "dino.safetensors")
    a = get_backbone(DINO, weights=tmp_path / "dino.pth", image_size=224)
    b = get_backbone(DINO, weights=tmp_path / "dino.safetensors", image_size=224)
    model = a.trunk.model
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept alive
    want = resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    assert torch.equal(model.blocks[3].attn.qkv.weight.detach(), state["blocks.3.attn.qkv.weight"])
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert tuple(a(x).shape) == (2, 384, 16, 16)
        assert torch.equal(a(x), b(x))
    # The id is the tensors' (as loaded), not a file's bytes: both formats give one id and one cache key.
    assert a.weights_id == b.weights_id == state_dict_sha256(model.state_dict())
    assert a.weights_id not in (file_sha256(tmp_path / "dino.pth"), file_sha256(tmp_path / "dino.safetensors"))
    assert a.weights_id != get_backbone(DINO, pretrained=False, image_size=224).weights_id
    settings = ExtractSettings(spec=ViewSpec(interpolation=a.interpolation))
    fp_a, fp_b = (fingerprint("toy", MANIFEST, recipe(bb, settings, "fp32")) for bb in (a, b))
    assert fp_a == fp_b and cache_key(fp_a) == cache_key(fp_b)


def test_a_file_that_does_not_fit_fails_instead_of_leaving_random_weights(tmp_path):
    state = _released(DINO)
    del state["blocks.5.mlp.fc2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"(?s)partial.pth.*do not fit vit_small_patch14_dinov2.*blocks\.5\.mlp\.fc2"):
        get_backbone(DINO, weights=tmp_path / "partial.pth", image_size=224)


def _original_dinov2_layout(state: dict[str, torch.Tensor], chunk: int) -> dict[str, torch.Tensor]:
    """timm's DINOv2 keys -> facebookresearch's (the inverse of timm's converter), chunked like their
    big models: `blocks.<i // chunk>.<i>.*`, a mask token, and for register models `register_tokens`
    with the class token's position embedding folded back into pos_embed."""
    out = {}
    for key, value in state.items():
        out[re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // chunk}.{m.group(1)}.", key)] = value
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.randn(1, dim)
    if "reg_token" in state:
        cls_pos = torch.randint(-8, 8, (1, 1, dim)) / 4.0  # dyadic: cls - pos + pos is exact
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return out


@pytest.mark.parametrize("name", [DINO, DINO_REG])
def test_facebookresearch_dinov2_files_load_as_timms_layout(tmp_path, name):
    state = _released(name)
    original = _original_dinov2_layout(state, chunk=4)
    assert "blocks.2.11.ls1.gamma" in original and "blocks.11.ls1.gamma" not in original
    torch.save(original, tmp_path / "original.pth")
    safetensors.torch.save_file(state, tmp_path / "timm.safetensors")
    ours = get_backbone(name, weights=tmp_path / "original.pth", image_size=112)
    reference = get_backbone(name, weights=tmp_path / "timm.safetensors", image_size=112)
    assert ours.weights_id == reference.weights_id
    prefix = 0 if name == DINO_REG else 1  # the register model's position embeddings skip its prefix tokens
    want = resample_abs_pos_embed(state["pos_embed"], new_size=(8, 8), num_prefix_tokens=prefix)
    torch.testing.assert_close(ours.trunk.model.pos_embed.detach(), want)
    x = torch.randn(1, 3, 112, 112)
    with torch.inference_mode():
        assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_take_timms_own_preprocessing_and_declare_their_dim(preset):
    spec = PRESETS[preset]
    backbone = get_backbone(preset, pretrained=False)
    with torch.device("meta"):  # only the config matters here
        data = resolve_model_data_config(timm.create_model(spec.timm_name, pretrained=False))
    assert (backbone.mean, backbone.std, backbone.interpolation) == (data["mean"], data["std"], data["interpolation"])
    assert (backbone.name, backbone.preset, backbone.dim) == (spec.timm_name, preset, spec.dim)
    assert backbone.trunk.model.patch_embed.img_size == (spec.image_size, spec.image_size)
    assert any(line.startswith(f"{preset}: {spec.timm_name}, D={spec.dim}") for line in preset_lines())


def test_an_unreachable_hub_names_the_model_the_file_and_the_flag(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    with pytest.raises(
        WeightsUnavailable,
        match=r"dinov2_vits14 \(vit_small_patch14_dinov2\.lvd142m\).*"
        r"model\.safetensors of timm/vit_small_patch14_dinov2\.lvd142m.*--weights PATH",
    ):
        get_backbone("dinov2_vits14")


def test_resize_uses_the_view_specs_interpolation():
    frames = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    bicubic = resize_short_side(frames, ViewSpec(short_side=32, crop=32, interpolation="bicubic"))
    assert torch.equal(bicubic, TF.resize(frames, [32], interpolation=InterpolationMode.BICUBIC, antialias=True))
    assert not torch.equal(bicubic, resize_short_side(frames, ViewSpec(short_side=32, crop=32)))
    with pytest.raises(ValueError, match="interpolation 'lanczos'"):
        ViewSpec(interpolation="lanczos")


def test_a_bilinear_cache_keeps_its_key_and_another_interpolation_gets_its_own():
    backbone = get_backbone("tiny")
    fp = fingerprint("toy", MANIFEST, recipe(backbone, ExtractSettings(), "fp32"))
    # The fingerprint exactly as caches made before interpolation existed recorded it.
    before = {
        "dataset": "toy",
        "manifest": fp["manifest"],
        "videos": 2,
        "backbone": "tiny",
        "layer": "conv3",
        "weights": backbone.weights_id,
        "short_side": 256,
        "crop": 224,
        "flip": True,
        "normalize": "mean=[0.5, 0.5, 0.5] std=[0.5, 0.5, 0.5]",
        "frames": 8,
        "patches": 4,
        "train_views": 4,
        "view_seed": 0,
        "sampling_rule": SAMPLING_RULE_VERSION,
        "precision": "fp32",
        "dtype": "float16",
    }
    assert fp == before and cache_key(fp) == cache_key(before)
    bicubic = fingerprint(
        "toy", MANIFEST, recipe(backbone, ExtractSettings(spec=ViewSpec(interpolation="bicubic")), "fp32")
    )
    assert bicubic == {**before, "interpolation": "bicubic"} and cache_key(bicubic) != cache_key(fp)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "clip_vitb16"])
def test_frozen_vits_run_extract_train_heads_and_evaluate(name, tmp_path):
    """The presets with random weights (no hub here) through extraction's and training's library calls and
    the evaluate stage, on a tiny synthetic set."""
    from typer.testing import CliRunner

    from pipeline.data.synth import write_mp4
    from pipeline.data.video import ViewSpec
    from pipeline.features.extract import ExtractSettings, RunOptions, extract
    from pipeline.training.train import make_config, train
    from stages.app import app

    crop = 56 if "patch14" in name else 64  # 4 x 4 tokens
    backbone = get_backbone(name, pretrained=False, image_size=crop)
    rng = np.random.default_rng(0)
    rows = []
    for split, classes in (("train", range(5)), ("test", range(5, 8))):
        for c in classes:
            for i in range(3 if split == "test" else 4):
                rel = f"{split}/c{c}/v{i}.mp4"
                (tmp_path / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
                frames = np.clip(rng.normal(40 * (c % 6), 20, (10, 64, 64, 3)), 0, 255).astype(np.uint8)
                write_mp4(frames, tmp_path / "videos" / rel)
                rows.append(
                    {
                        "video_id": f"c{c}/v{i}",
                        "class": f"c{c}",
                        "split": split,
                        "path": rel,
                        "n_frames": 10,
                        "status": "ok",
                    }
                )
    spec = ViewSpec(short_side=crop, crop=crop, interpolation=backbone.interpolation)
    cache = extract(
        "toy",
        pd.DataFrame(rows),
        backbone,
        tmp_path / "cache",
        ExtractSettings(views=1, spec=spec),
        RunOptions(batch_size=16, workers=0),
        videos_root=tmp_path / "videos",
    ).path
    assert open_cache(cache).dim == backbone.dim and open_cache(cache).recipe.interpolation == "bicubic"
    config = make_config(
        "frozen", episodes=2, way=2, shot=2, queries=1, val_every=0, device="cpu", heads_options={"trm_dim": 16}
    )
    heads = train(config, cache, tmp_path / "run").best_checkpoint
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--cache",
            str(cache),
            "--checkpoint",
            str(heads),
            "--episodes",
            "4",
            "--way",
            "2",
            "--shot",
            "2",
            "--json",
            str(tmp_path / "eval.json"),
        ],
    )
    assert result.exit_code == 0, result.output
