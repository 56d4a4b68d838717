"""finetune: backbone and heads trained end to end on episodic tasks of raw video, through the one loop.

What is particular to raw video lives here: the run's backbone (from the starting checkpoint, with
frozen stages or BatchNorm), the task source that decodes a task's clips in worker processes, and
validation features made with the backbone as it is at that moment.

Why it is built this way:
- A task's frames come from `pipeline.data.video.load_view` and become features through
  `backbones.patch_features`, the functions extraction uses, so a fine-tuned forward sees exactly
  what a cache would hold (pooled in float32 here: in the backward pass float16 gradients of this
  size underflow). Training views are views >= 1, and which view a video gets in task i is drawn
  by the episode sampler from (seed, i), so task i is a function of (seed, i) alone.
- The default recipe is the authors' (train.PRESETS["authors"]: SGD, the loss summed over a task's
  queries, divided by the 16 tasks of a step). The one departure is bfloat16 autocast on CUDA
  (`amp="off"` is theirs exactly). `freeze_stages` and `bn="frozen"` trade accuracy for memory.
- Checkpoints are the heads' project format plus the `backbone` state dict and the feature recipe
  (pipeline/training/checkpoints.py reads them), so `strm evaluate` reads them as heads, `strm extract
  --backbone-checkpoint` refreshes a cache with the backbone and `strm predict` rebuilds the features.
- Under torchrun each rank trains its share of every step's tasks (DistributedDataParallel);
  BatchNorm is synchronised across GPUs (SyncBatchNorm) unless frozen; SyncBatchNorm is CUDA-only,
  so CPU ranks (gloo, for tests) normalise their own tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from pipeline.data.episodes import EpisodeSampler
from pipeline.data.video import (
    FRAMES,
    SAMPLING_RULE_VERSION,
    ViewSpec,
)
from pipeline.features.backbones import (
    Backbone,
    backbone_stages,
    get_backbone,
    patch_features,
)
from pipeline.features.recipe import FeatureRecipe, manifest_digest
from pipeline.heads import STRMHeads, load_heads
from pipeline.runtime import distributed
from pipeline.training.checkpoints import Checkpoint
from pipeline.training.clips import VIEW_DRAWS, DecodedClips, FinetuneError, SplitVideos, split_videos
from pipeline.training.config import (
    EpisodicConfig,
    TrainError,
    check_config,
    check_open_set_heads,
    check_validation_split,
    flag,
    round_to_steps,
    training_split_message,
    unknown_draws,
)
from pipeline.training.loop import EpisodicLoop
from pipeline.training.runs import FREE, INHERIT
from pipeline.training.state import Estimate, TrainProgress, TrainResult, resume_point
from pipeline.training.train import PRESETS, authors_lr

BN_MODES = ("train", "frozen")


@dataclass(frozen=True)
class FinetuneConfig(EpisodicConfig):
    """Every setting of a fine-tuning run; written to config.json and into each checkpoint.

    The episodic defaults are the authors' (make_finetune_config sets them per dataset).
    """

    optimizer: str = "sgd"
    lr: float = 1e-4
    loss_reduction: str = "sum"
    tasks_per_step: int = 16
    val_every: int = 1000
    val_episodes: int = 1000
    checkpoint_every: int = 160
    log_every: int = 16
    dataset: str = ""
    source: str = field(default="", metadata=FREE)  # the starting checkpoint (--from), for the record
    backbone: str = "resnet50"
    layer: str | None = field(default=None, metadata=INHERIT)  # None: the backbone's default
    weights: str | None = field(default=None, metadata=INHERIT)  # a local weights file instead of the download
    interpolation: str | None = field(default=None, metadata=INHERIT)  # None: the backbone's (timm's data config)
    normalize: bool = True  # False: the authors' raw [0, 1] pixels
    short_side: int = 256
    crop: int = 224
    patches: int = 4  # P
    freeze_stages: int = 0  # the first K stages of the backbone (ResNet: stem, layer1..layer4)
    bn: str = "train"  # train (SyncBatchNorm under DDP on CUDA) | frozen (running stats and affine fixed)
    amp: str = "bf16"  # CUDA autocast: bf16 | fp16 (with a GradScaler) | off; always float32 on CPU
    workers: int = field(default=4, metadata=FREE)  # decoding processes; 0 decodes in the training process

    @property
    def spec(self) -> ViewSpec:
        return ViewSpec(short_side=self.short_side, crop=self.crop, interpolation=self.interpolation or "bilinear")


def authors_queries(dataset: str | None) -> int:
    """Training queries per class in the released runs: 5 for Kinetics, 4 for SSv2, HMDB51 and UCF101."""
    return 5 if dataset and dataset.lower().startswith("kinetics") else 4


def authors_episodes(dataset: str | None) -> int:
    """Training tasks of the released runs: 75,000 for SSv2, about 10,000 for the others."""
    return 75_000 if dataset and dataset.lower().startswith("ssv2") else 10_000


def make_finetune_config(dataset: str, **overrides) -> FinetuneConfig:
    """The authors' recipe for `dataset` (train.PRESETS["authors"]), then every override that is not None."""
    names = {f.name for f in fields(FinetuneConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise FinetuneError(f"unknown fine-tuning settings: {', '.join(sorted(unknown))}")
    recipe = {k: v for k, v in PRESETS["authors"].items() if k in names}
    recipe.update(lr=authors_lr(dataset), queries=authors_queries(dataset), episodes=authors_episodes(dataset))
    config = FinetuneConfig(dataset=dataset, **{**recipe, **{k: v for k, v in overrides.items() if v is not None}})
    if config.tasks_per_step < 1:
        raise FinetuneError(f"tasks_per_step must be >= 1, got {config.tasks_per_step}")
    config = round_to_steps(config)
    _check(config)
    return config


def _check(config: FinetuneConfig) -> None:
    try:
        check_config(config)
    except TrainError as err:
        raise FinetuneError(str(err)) from None
    if config.amp not in distributed.AMP_MODES:
        raise FinetuneError(f"amp {config.amp!r}: expected one of {', '.join(distributed.AMP_MODES)}")
    if config.bn not in BN_MODES:
        raise FinetuneError(f"bn {config.bn!r}: expected one of {', '.join(BN_MODES)}")
    for name in ("freeze_stages", "workers"):
        if getattr(config, name) < 0:
            raise FinetuneError(f"{flag(name)} {getattr(config, name)}: must be >= 0")
    ViewSpec(short_side=config.short_side, crop=config.crop)  # raises on a crop larger than the short side


# ---------------------------------------------------------------- the starting point


def start_settings(start: Checkpoint) -> dict:
    """The backbone settings the start's heads were trained with (backbone, layer, normalize, input size, P, resize),
    and their open-set method."""
    if start.recipe is not None:
        r = start.recipe
        return {
            "open_set": start.heads.open_set_method,
            "backbone": r.backbone,
            "layer": r.layer,
            "normalize": r.normalize,
            "short_side": r.short_side,
            "crop": r.crop,
            "patches": r.patches,
            "interpolation": r.interpolation,
        }
    config = start.contents.get("config", {})
    keys = ("backbone", "layer", "normalize", "short_side", "crop", "patches")
    return {"open_set": start.heads.open_set_method, **{k: config[k] for k in keys if k in config}}


def build_backbone(config: FinetuneConfig, start: Checkpoint | None) -> Backbone:
    """The backbone of `config`, with the start's weights when it has them (no download then)."""
    state = start.backbone_state if start is not None else None
    weights = Path(config.weights) if config.weights and state is None else None
    backbone = get_backbone(
        config.backbone, weights=weights, layer=config.layer, pretrained=state is None, image_size=config.crop
    )
    if state is not None:
        assert start is not None  # the state came from it
        try:
            backbone.load_state_dict(state)
        except RuntimeError as err:
            raise FinetuneError(
                f"{start.path}: its backbone does not fit {config.backbone} (layer {backbone.layer}): {err}"
            ) from None
    return backbone


# ---------------------------------------------------------------- the model


class EndToEnd(nn.Module):
    """Backbone, patch pooling and heads as one module (the unit DistributedDataParallel wraps).

    Frozen stages and frozen BatchNorm layers stay in eval mode whenever the module trains, so
    their running statistics never move; their parameters do not require gradients.
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: STRMHeads,
        *,
        patches: int,
        normalize: bool,
        freeze_stages: int = 0,
        bn: str = "train",
    ) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.patches, self.normalize = patches, normalize
        fixed: list[nn.Module] = []
        if freeze_stages:
            try:
                stages = backbone_stages(backbone)
            except ValueError as err:
                raise FinetuneError(str(err)) from None
            if freeze_stages > len(stages):
                raise FinetuneError(f"freeze_stages {freeze_stages}: {backbone.name} has {len(stages)} stages")
            fixed += [m for stage in stages[:freeze_stages] for m in stage]
        if bn == "frozen":
            fixed += [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for module in fixed:
            module.requires_grad_(False)
        self._fixed = fixed  # a plain list: these modules are already registered under backbone
        self.backbone_trains = any(p.requires_grad for p in backbone.parameters())

    def train(self, mode: bool = True) -> EndToEnd:
        super().train(mode)
        if mode:
            for module in self._fixed:
                module.eval()
        return self

    def features(self, frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 frames [n, L, 3, H, W] -> patch features [n, L, P*P, D]."""
        n, length = frames.shape[:2]
        with torch.set_grad_enabled(self.backbone_trains and torch.is_grad_enabled()):
            x = patch_features(
                self.backbone, frames.flatten(0, 1), normalize=self.normalize, patches=self.patches, dtype=dtype
            )
        return x.view(n, length, self.patches**2, -1)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor):
        """Support and query frames go through the backbone separately, as the authors do (BatchNorm batches)."""
        return self.heads(self.features(support), support_labels, self.features(query))


# ---------------------------------------------------------------- the run


def _manifest_record(train: SplitVideos, val: SplitVideos, videos_root: Path | None) -> str:
    """The digest of the usable train/val rows; paths relative to the videos root, so that a resume
    given `--videos` absolute, relative or from another directory is the same run."""

    def name(path: str) -> str:
        return path if videos_root is None else os.path.relpath(os.path.abspath(path), os.path.abspath(videos_root))

    rows = [
        (s, str(v.class_names[c]), i, name(p))
        for s, v in (("train", train), ("val", val))
        for i, p, c in zip(v.video_ids, v.paths, v.labels, strict=False)
    ]
    return manifest_digest(rows)


def run_recipe(config: FinetuneConfig, backbone: Backbone, amp: torch.dtype | None) -> FeatureRecipe:
    """The features a fine-tuned checkpoint's heads expect; its `weights` is the checkpoint file itself
    (pipeline/training/checkpoints.py fills in the file's sha256 when it reads it)."""
    precisions: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    precision = precisions.get(amp, "fp32")
    spec = config.spec
    return FeatureRecipe(
        backbone=backbone.name,
        layer=backbone.layer,
        weights="",
        short_side=spec.short_side,
        crop=spec.crop,
        flip=spec.flip,
        mean=backbone.mean if config.normalize else None,
        std=backbone.std if config.normalize else None,
        frames=FRAMES,
        patches=config.patches,
        train_views=1,
        view_seed=0,
        sampling_rule=SAMPLING_RULE_VERSION,
        precision=precision,
        interpolation=spec.interpolation,
    )


def _training_videos(
    config: FinetuneConfig, manifest: pd.DataFrame, videos_root: Path | None
) -> tuple[SplitVideos, SplitVideos, EpisodeSampler]:
    """The usable train and val videos and the training tasks' sampler: a manifest that cannot give
    `config`'s tasks (or, when the run validates, its validation tasks) fails before any weights load."""
    train_videos = split_videos(manifest, "train", videos_root)
    val_videos = split_videos(manifest, "val", videos_root)
    try:
        sampler = EpisodeSampler(
            train_videos.labels,
            way=config.way,
            shot=config.shot,
            queries=config.queries,
            seed=config.seed,
            views=VIEW_DRAWS,
            **unknown_draws(config),
        )
    except ValueError as err:
        raise FinetuneError(training_split_message(train_videos.labels, config, err, "the manifest's")) from None
    if config.val_every:
        if not len(val_videos):
            raise FinetuneError(
                "the manifest has no usable val videos to validate on (set val_every to 0 to train without)"
            )
        check_validation_split(val_videos.labels, config, "the manifest's")
    return train_videos, val_videos, sampler


def _starting_point(
    config: FinetuneConfig, out: Path, start: Checkpoint | None, resumed: dict | None, digest: str
) -> tuple[FinetuneConfig, STRMHeads, Backbone, list[str]]:
    """(config, heads, backbone, notes) the run trains from: last.pt's when it resumes (with the run's
    own layer, weights and resize, so a resume rebuilds the same backbone), else `start`'s. Either
    way the heads must take the features this backbone and patch grid give."""
    notes: list[str] = []
    if resumed is not None:
        if resumed.get("manifest") != digest:
            raise FinetuneError(
                f"{out / 'last.pt'}: the run was trained on other videos (the manifest's train/val rows differ)"
            )
        saved = resumed["config"]
        config = replace(
            config, layer=saved["layer"], weights=saved["weights"], interpolation=saved.get("interpolation")
        )
        heads, _ = load_heads(resumed)
        backbone = get_backbone(config.backbone, layer=config.layer, pretrained=False, image_size=config.crop)
        backbone.load_state_dict(resumed["backbone"])
    else:
        if start is None:
            raise FinetuneError(f"no starting checkpoint given and no {out / 'last.pt'} to resume")
        heads, notes = start.heads, list(start.notes)
        check_open_set_heads(config.open_set, heads.open_set_method, config.source or "the starting checkpoint")
        backbone = build_backbone(config, start)
        config = replace(config, layer=backbone.layer, interpolation=config.interpolation or backbone.interpolation)
        trained_on = start.recipe.weights if start.recipe is not None and start.kind == "heads" else None
        if trained_on and start.backbone_state is None and trained_on != backbone.weights_id:
            notes.append(
                f"the heads were trained on features of other weights ({trained_on[:24]}) than "
                f"this {backbone.name} ({backbone.weights_id[:24]})"
            )
    if backbone.dim != heads.dim or heads.patches != config.patches**2 or heads.frames != FRAMES:
        raise FinetuneError(
            f"the heads take [L={heads.frames}, P*P={heads.patches}, D={heads.dim}] features; "
            f"{backbone.name} (layer {backbone.layer}) with {config.patches}x{config.patches} patches "
            f"gives [L={FRAMES}, P*P={config.patches**2}, D={backbone.dim}]"
        )
    return config, heads, backbone, notes


def finetune(
    config: FinetuneConfig,
    manifest: pd.DataFrame,
    out: Path | str,
    *,
    start: Checkpoint | None = None,
    resume: bool = False,
    overwrite: bool = False,
    videos_root: Path | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    confirm: Callable[[Estimate], bool] | None = None,
) -> TrainResult:
    """Fine-tune backbone and heads on the manifest's training videos; files go to `out`.

    `start` (pipeline.training.checkpoints.load_checkpoint) is required unless `resume` finds `out/last.pt`;
    its heads are trained in place. `confirm`, when given, is asked once (rank 0) after the first
    tasks with the measured speed; False stops the run (loop.Declined) before any checkpoint is
    written. Under torchrun the tasks of each optimiser step are split across ranks; rank 0 writes.
    """
    _check(config)
    out = Path(out)
    world = distributed.rank_world()[1]
    device = distributed.resolve_device(config.device)
    cuda = device.type == "cuda"
    amp = distributed.autocast_dtype(config.amp, device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # every task has the same shapes

    train_videos, val_videos, sampler = _training_videos(config, manifest, videos_root)
    digest = _manifest_record(train_videos, val_videos, videos_root)
    try:
        resumed = resume_point(out, resume, config, overwrite=overwrite)
    except TrainError as err:
        raise FinetuneError(str(err)) from None
    config, heads, backbone, notes = _starting_point(config, out, start, resumed, digest)
    recipe = run_recipe(config, backbone, amp)
    backbone.place(device)
    if world > 1 and cuda and config.bn == "train":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)  # keeps the Parameter objects
    model = EndToEnd(
        backbone,
        heads,
        patches=config.patches,
        normalize=config.normalize,
        freeze_stages=config.freeze_stages,
        bn=config.bn,
    ).to(device)
    record = {**asdict(config), "dim": heads.dim, "frames": heads.frames, "variant": heads.variant}
    describe = {
        "manifest": digest,
        "videos": {"train": len(train_videos), "val": len(val_videos)},
        "start": {"path": config.source, "kind": start.kind if start else "resume"},
    }
    loop = EpisodicLoop(
        config,
        DecodedClips(sampler, train_videos, val_videos, model, config, amp, cuda),
        out,
        heads=heads,
        module=model,
        device=device,
        amp=amp,
        record=record,
        resumed=resumed,
        describe=describe,
        notes=notes,
        checkpoint_extra=lambda: {
            "backbone": model.backbone.state_dict(),
            "manifest": digest,
            "recipe": recipe.to_dict(),
            "class_names": list(train_videos.class_names),
        },
        divergence_hint="; heads trained with feature standardisation amplify the backbone's gradients in "
        "low-variance channels",
    )
    return replace(loop.fit(progress, confirm), config=config)
