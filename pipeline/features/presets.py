"""Short names for frozen backbones stronger than the paper's ResNet-50 (DINOv2, CLIP, SigLIP): the timm
model each stands for, the input side it is built for and its map's width D.
"""

from __future__ import annotations

from dataclasses import dataclass

OFFLINE_DEFAULT = "tf_efficientnet_lite0"  # the backbone whose weights ship with the environment


@dataclass(frozen=True)
class Preset:
    """A short backbone name: the timm model (architecture.pretrained_tag), the input side it is built
    for by default (the crop), and its map's width D."""

    timm_name: str
    image_size: int
    dim: int
    description: str


# Frozen ViTs stronger than the paper's ResNet-50. At 224 px a patch-14 model gives 16 x 16 tokens,
# a patch-16 one 14 x 14. OpenAI's CLIP is timm's QuickGELU variant: the activation it was trained with.
PRESETS: dict[str, Preset] = {
    "dinov2_vits14": Preset(
        "vit_small_patch14_dinov2.lvd142m", 224, 384, "DINOv2 ViT-S/14, self-supervised (LVD-142M)"
    ),
    "dinov2_vitb14": Preset("vit_base_patch14_dinov2.lvd142m", 224, 768, "DINOv2 ViT-B/14, self-supervised (LVD-142M)"),
    "dinov2_vitl14": Preset(
        "vit_large_patch14_dinov2.lvd142m", 224, 1024, "DINOv2 ViT-L/14, self-supervised (LVD-142M)"
    ),
    "dinov2_vits14_reg": Preset(
        "vit_small_patch14_reg4_dinov2.lvd142m",
        224,
        384,
        "DINOv2 ViT-S/14 with 4 register tokens (maps without artefact tokens)",
    ),
    "dinov2_vitb14_reg": Preset(
        "vit_base_patch14_reg4_dinov2.lvd142m", 224, 768, "DINOv2 ViT-B/14 with 4 register tokens"
    ),
    "dinov2_vitl14_reg": Preset(
        "vit_large_patch14_reg4_dinov2.lvd142m", 224, 1024, "DINOv2 ViT-L/14 with 4 register tokens"
    ),
    "clip_vitb16": Preset("vit_base_patch16_clip_quickgelu_224.openai", 224, 768, "OpenAI CLIP ViT-B/16 image tower"),
    "clip_vitl14": Preset("vit_large_patch14_clip_quickgelu_224.openai", 224, 1024, "OpenAI CLIP ViT-L/14 image tower"),
    "siglip_vitb16": Preset("vit_base_patch16_siglip_224.webli", 224, 768, "SigLIP ViT-B/16 image tower (WebLI)"),
    "siglip2_vitb16": Preset("vit_base_patch16_siglip_224.v2_webli", 224, 768, "SigLIP 2 ViT-B/16 image tower (WebLI)"),
}


def preset_lines() -> list[str]:
    """One line per preset (name, timm model, D, default crop, what it is), for help texts."""
    return [f"{name}: {p.timm_name}, D={p.dim}, crop {p.image_size}; {p.description}" for name, p in PRESETS.items()]
