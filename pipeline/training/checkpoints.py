"""The one checkpoint loader: every kind of file a stage may be given, recognised in one place.

Kinds: `heads` (train-heads: the project format with the cache fingerprint its heads were trained
on), `finetune` (the project format plus the fine-tuned backbone), `authors` (the released STRM or
TRX files: a state dict with `resnet.*`, `attn_pat.*`, `transformers.*`, read by the importer).
Each comes back with its heads, variant, the backbone state it holds (if any), the feature recipe
its heads expect (so new clips can be turned into exactly those features) and notes worth telling.

An authors' file becomes the first variant whose weights it holds exactly AND whose cardinalities it
has (a TRX file is `trx`, an STRM file `strm`), in every stage. Files are read with weights_only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from pipeline.data.protocol import FRAMES
from pipeline.data.video import SAMPLING_RULE_VERSION
from pipeline.features.backbones import Backbone
from pipeline.features.readers import CacheError
from pipeline.features.recipe import FeatureRecipe
from pipeline.features.weights import file_sha256
from pipeline.heads import (
    VARIANTS,
    ImportReport,
    STRMHeads,
    load_authors_checkpoint,
    load_heads,
)
from pipeline.heads.checkpoint import RESNET_CHILDREN


class CheckpointError(ValueError):
    """A file that is missing, unreadable, or no checkpoint this project knows; the message names it."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds, whatever its kind."""

    path: Path
    kind: str  # heads | finetune | authors
    variant: str
    heads: STRMHeads  # eval mode, on the CPU
    recipe: FeatureRecipe | None  # the features its heads were trained on; None when the file does not say
    backbone_state: dict[str, torch.Tensor] | None  # `Backbone.state_dict()` keys (trunk.*); None: not in the file
    contents: dict = field(default_factory=dict)  # the project-format dict ({} for an authors' file)
    notes: list[str] = field(default_factory=list)
    import_report: ImportReport | None = None

    @cached_property
    def sha256(self) -> str:
        """The file's sha256 (read once): the weights id of the backbone it holds."""
        return file_sha256(self.path)

    def summary(self) -> dict[str, Any]:
        """What `strm info` tells of a checkpoint: kind, variant and sizes, the features it was trained
        on, the training split's class names, tasks trained and the best validation (what the file has)."""
        c = self.contents
        state: dict[str, Any] = c["state"] if isinstance(c.get("state"), dict) else {}
        val: dict[str, Any] = c["val"] if isinstance(c.get("val"), dict) else {}
        return {
            "path": str(self.path),
            "kind": self.kind,
            "variant": self.variant,
            "dim": self.heads.dim,
            "options": dict(self.heads.options),
            "parameters": sum(p.numel() for p in self.heads.parameters()),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "class_names": c.get("class_names"),
            "tasks_trained": c.get("task_index"),
            "best_validation": val.get("accuracy", state.get("best_val")),
            "open_set": c.get("open_set"),
            "notes": list(self.notes),
        }

    def about(self) -> dict:
        """A JSON-able record of which checkpoint this is, for run records."""
        about: dict[str, Any] = {"checkpoint": str(self.path), "checkpoint_kind": self.kind, "variant": self.variant}
        about["checkpoint_sha256"] = self.sha256
        if self.heads.open_set is not None:
            about["open_set"] = self.heads.open_set_method
        if self.recipe is not None:
            about["recipe"] = self.recipe.to_dict()
        if self.notes:
            about["note"] = "; ".join(self.notes)
        return about


def authors_recipe(weights: str) -> FeatureRecipe:
    """The released models' input: ResNet-50 to layer4 on raw [0, 1] pixels, 256/224, 4x4 patches (STRM_SPEC 1, 10)."""
    return FeatureRecipe(
        backbone="resnet50",
        layer="layer4",
        weights=weights,
        short_side=256,
        crop=224,
        flip=True,
        mean=None,
        std=None,
        frames=FRAMES,
        patches=4,
        train_views=1,
        view_seed=0,
        sampling_rule=SAMPLING_RULE_VERSION,
        precision="fp32",
    )


def _read(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dict")
    return raw


def _authors(raw: dict, path: Path, variant: str | None) -> tuple[str, STRMHeads]:
    """The variant an authors' file is and its heads (see the module docstring for the rule)."""
    errors, loaded = [], []
    for name in [variant] if variant else list(VARIANTS):
        try:
            heads = load_authors_checkpoint(raw, variant=name)
        except (ValueError, RuntimeError) as err:
            errors.append(f"{name}: {err}")
            continue
        if variant or tuple(VARIANTS[name]["cardinalities"]) == tuple(heads.cardinalities):
            return name, heads
        loaded.append((name, heads))
    if loaded:
        return loaded[0]
    raise CheckpointError(f"{path}: not a project checkpoint and not an authors' one ({'; '.join(errors)})")


def load_checkpoint(path: Path | str, variant: str | None = None) -> Checkpoint:
    """Recognise and load any checkpoint kind; `variant` forces the variant of an authors' file."""
    path = Path(path)
    raw = _read(path)
    if "format" not in raw:
        name, heads = _authors(raw, path, variant)
        notes = [] if heads.has_qc else ["the authors' file has no QC weights: logits are the TRM logits alone"]
        state = resnet_trunk_state(heads.backbone_state_dict) if heads.backbone_state_dict else None
        if state is None:
            notes.append("the authors' file holds no backbone weights")
        found = Checkpoint(path, "authors", name, heads, None, state, {}, notes, heads.import_report)
        found.recipe = authors_recipe(found.sha256)
        return found
    try:
        heads, contents = load_heads(raw)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    if isinstance(contents.get("backbone"), dict):
        state = {k.removeprefix("module."): v for k, v in contents["backbone"].items()}
        found = Checkpoint(path, "finetune", heads.variant, heads, None, state, contents)
        if isinstance(contents.get("recipe"), dict):  # the fine-tuned backbone is this very file
            found.recipe = FeatureRecipe.from_dict({**contents["recipe"], "weights": found.sha256})
        else:
            found.notes.append(f"{path} does not record its feature recipe (written before recipes were saved)")
        return found
    try:
        recipe = FeatureRecipe.from_fingerprint(contents.get("cache_fingerprint") or {})
    except CacheError as err:
        raise CheckpointError(f"{path}: {err}") from None
    notes = (
        [] if contents.get("cache_fingerprint") else [f"{path} does not say which features its heads were trained on"]
    )
    return Checkpoint(path, "heads", heads.variant, heads, recipe, None, contents, notes)


def load_backbone_weights(backbone: Backbone, path: Path | str) -> Backbone:
    """The backbone a fine-tune or authors' checkpoint holds, loaded into `backbone` (built for its recipe).

    The checkpoint file's sha256 becomes `weights_id`, so features of a fine-tuned backbone never share
    a cache with the pretrained one's, and match the recipe `load_checkpoint` gives the same file.
    """
    loaded = load_checkpoint(path)
    if loaded.backbone_state is None:
        raise CheckpointError(f"{loaded.path}: a {loaded.kind} checkpoint without backbone weights")
    try:
        backbone.load_state_dict(loaded.backbone_state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{loaded.path}: its backbone does not fit {backbone.name} (layer {backbone.layer}): {first}"
        ) from None
    backbone.weights_id = loaded.sha256
    return backbone


def resnet_trunk_state(torchvision_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet names (`layer4.2.conv3.weight`) -> the `resnet50` Backbone's (`trunk.7.2.conv3.weight`).

    Children past layer4 (avgpool, the fc classifier) are not part of the trunk and are dropped.
    """
    trunk = RESNET_CHILDREN[: RESNET_CHILDREN.index("layer4") + 1]
    out = {}
    for key, value in torchvision_state.items():
        name, rest = key.split(".", 1)
        if name in trunk:
            out[f"trunk.{trunk.index(name)}.{rest}"] = value
    return out
