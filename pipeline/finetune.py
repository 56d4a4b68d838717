"""End-to-end fine-tuning: episodic tasks on raw video, backbone and heads trained together.

Why it is built this way:
- The frames of a task come from `pipeline.video.load_view`, the function extraction uses, so a
  fine-tuned forward sees exactly the pixels a cache would hold. Training views are views >= 1,
  and which view a video gets in task i is drawn by the episode sampler from (seed, i): task i
  (videos, views, crops, flips, dropout masks) is a function of (seed, i) alone, so a run killed at
  any moment and resumed from `last.pt` ends with the weights of an uninterrupted one (on CPU).
- The backbone is cut as for extraction (its trunk, then an adaptive max pool to P x P patches).
  Training pools in float32: the cache stores float16, but in the backward pass float16 gradients
  of this size underflow.
- The default recipe is the authors' (train.PRESETS["authors"]: SGD, the loss summed over a
  task's queries, divided by the 16 tasks of a step). The one departure is bfloat16 autocast on
  CUDA (`amp="off"` is theirs exactly). `freeze_stages` and `bn="frozen"` trade accuracy for
  memory and for small per-GPU batches.
- Checkpoints are the heads' project format plus a `backbone` state dict (the Backbone module's
  own keys), so `strm evaluate` reads them as heads and `strm extract --backbone-checkpoint`
  (backbones.load_backbone_checkpoint) reads the backbone to refresh the cache.
- Under torchrun each rank trains its share of every step's tasks (DistributedDataParallel);
  BatchNorm is synchronised across GPUs (SyncBatchNorm) unless frozen; SyncBatchNorm is CUDA-only,
  so CPU ranks (gloo, for tests) normalise their own tasks.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.backbones import Backbone, get_backbone
from pipeline.cache import SplitFeatures, manifest_digest
from pipeline.episodes import EpisodeSampler
from pipeline.evaluate import evaluate
from pipeline.extract import pool_patches, split_layouts
from pipeline.heads import STRMHeads, VARIANTS, load_authors_checkpoint, load_heads, save_heads
from pipeline.heads.checkpoint import trunk_state
from pipeline.train import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    PRESETS,
    _device,
    _rng_state,
    _set_rng_state,
    _truncate_metrics,
    authors_lr,
    plot_curve,
    task_seed,
)
from pipeline.video import FRAMES, ViewSpec, VideoError, count_frames, load_view

AMP = ("bf16", "fp16", "off")
BN_MODES = ("train", "frozen")
RUNTIME_FIELDS = ("device", "workers")  # may change on resume: they do not change the numbers
VIEW_DRAWS = 2**31 - 1  # training views are 1..VIEW_DRAWS: in effect a fresh augmentation per use
PROBE_TASKS = 2  # tasks run before `confirm` is asked; the first one includes the warm-up
# torchvision's ResNet children in order; the extraction trunk is children[:8] numbered 0..7.


class FinetuneError(ValueError):
    """Options, checkpoint, manifest and videos that do not fit together; the message names what."""


class FinetuneAborted(RuntimeError):
    """`confirm` declined the run after the timed first tasks; nothing was saved."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run; written to config.json and into each checkpoint."""

    dataset: str = ""
    source: str = ""  # the starting checkpoint (--from), for the record
    backbone: str = "resnet50"
    layer: str | None = None  # None: the backbone's default
    weights: str | None = None  # a local weights file instead of the pretrained download
    normalize: bool = True  # False: the authors' raw [0, 1] pixels
    short_side: int = 256
    crop: int = 224
    patches: int = 4  # P
    episodes: int = 10_000
    way: int = 5
    shot: int = 5
    queries: int = 4
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    tasks_per_step: int = 16
    grad_clip: float = 0.0
    freeze_stages: int = 0  # the first K stages of the backbone (ResNet: stem, layer1..layer4)
    bn: str = "train"  # train (SyncBatchNorm under DDP on CUDA) | frozen (running stats and affine fixed)
    amp: str = "bf16"  # CUDA autocast: bf16 | fp16 (with a GradScaler) | off; always float32 on CPU
    seed: int = 0
    val_every: int = 1000  # tasks; 0 = no validation
    val_episodes: int = 1000
    val_seed: int = 0
    checkpoint_every: int = 160
    log_every: int = 16
    device: str = "auto"
    workers: int = 4  # decoding processes; 0 decodes in the training process

    @property
    def spec(self) -> ViewSpec:
        return ViewSpec(short_side=self.short_side, crop=self.crop)


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
    tps = config.tasks_per_step
    if tps < 1:
        raise FinetuneError(f"tasks_per_step must be >= 1, got {tps}")
    round_up = lambda n: n if n == 0 else -(-n // tps) * tps  # noqa: E731
    config = replace(config, val_every=round_up(config.val_every), checkpoint_every=round_up(config.checkpoint_every),
                     log_every=round_up(config.log_every))
    _check(config)
    return config


def _check(config: FinetuneConfig) -> None:
    if config.optimizer not in ("sgd", "adam", "adamw"):
        raise FinetuneError(f"optimizer {config.optimizer!r}: expected sgd, adam or adamw")
    if config.amp not in AMP:
        raise FinetuneError(f"amp {config.amp!r}: expected one of {', '.join(AMP)}")
    if config.bn not in BN_MODES:
        raise FinetuneError(f"bn {config.bn!r}: expected one of {', '.join(BN_MODES)}")
    if min(config.episodes, config.tasks_per_step, config.checkpoint_every, config.log_every, config.way,
           config.shot, config.queries) < 1:
        raise FinetuneError("episodes, tasks_per_step, checkpoint_every, log_every, way, shot and queries must be >= 1")
    if config.episodes % config.tasks_per_step:
        raise FinetuneError(f"episodes ({config.episodes}) must be a multiple of tasks_per_step ({config.tasks_per_step})")
    if config.freeze_stages < 0 or config.workers < 0:
        raise FinetuneError("freeze_stages and workers must be >= 0")
    if config.val_every and config.val_episodes < 1:
        raise FinetuneError("val_episodes must be >= 1 when validating")
    ViewSpec(short_side=config.short_side, crop=config.crop)  # raises on a crop larger than the short side


# ---------------------------------------------------------------- the starting point


@dataclass
class Start:
    """What a run starts from: heads, the backbone weights (None = pretrained) and what the heads were trained on."""

    heads: STRMHeads
    kind: str  # "heads" (train-heads), "finetune" (an earlier fine-tune) or "authors"
    path: str
    backbone_state: dict[str, torch.Tensor] | None  # Backbone.state_dict() keys (trunk.*)
    settings: dict  # backbone, layer, normalize, short_side, crop, patches known from the checkpoint
    weights_id: str | None = None  # the weights the heads' features came from, when known
    notes: list[str] = field(default_factory=list)


def _settings_from_fingerprint(fp: dict) -> dict:
    """A cache fingerprint (pipeline.extract.fingerprint) -> the backbone settings its features came from."""
    settings = {k: fp[k] for k in ("backbone", "layer", "short_side", "crop", "patches") if k in fp}
    if "normalize" in fp:
        settings["normalize"] = not str(fp["normalize"]).startswith("none")
    return settings


def load_start(path: Path | str) -> Start:
    """Heads (and backbone weights when the file has them) from a train-heads, finetune or authors' checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{path}: no such checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise FinetuneError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dict")
    if "format" in raw:
        try:
            heads, ckpt = load_heads(raw)
        except (ValueError, KeyError, RuntimeError) as err:
            raise FinetuneError(f"{path}: {err}") from None
        if isinstance(ckpt.get("backbone"), dict):  # an earlier fine-tune: its config names the backbone
            config = ckpt.get("config", {})
            settings = {k: config[k] for k in ("backbone", "layer", "normalize", "short_side", "crop", "patches") if k in config}
            state = {k.removeprefix("module."): v for k, v in ckpt["backbone"].items()}
            return Start(heads, "finetune", str(path), state, settings)
        fp = ckpt.get("cache_fingerprint") or {}
        notes = [] if fp else [f"{path} does not say which features its heads were trained on"]
        return Start(heads, "heads", str(path), None, _settings_from_fingerprint(fp), fp.get("weights"), notes)
    errors = []
    for variant in VARIANTS:  # an authors' file: the first variant whose weights it holds exactly
        try:
            heads = load_authors_checkpoint(raw, variant=variant)
        except ValueError as err:
            errors.append(f"{variant}: {err}")
            continue
        notes = [] if heads.has_qc else ["the authors' file has no QC weights: the loss and logits are TRM alone"]
        # The released backbones were trained on raw [0, 1] pixels (STRM_SPEC section 1).
        settings = {"backbone": "resnet50", "layer": "layer4", "normalize": False, "patches": 4}
        state = trunk_state(heads.backbone_state_dict) if heads.backbone_state_dict else None
        if state is None:
            notes.append("the authors' file holds no backbone weights: starting from ImageNet's")
        return Start(heads, "authors", str(path), state, settings, None, notes)
    raise FinetuneError(f"{path}: not a project checkpoint and not an authors' one ({'; '.join(errors)})")


def build_backbone(config: FinetuneConfig, start: Start | None) -> Backbone:
    """The backbone of `config`, with the start's weights when it has them (no download then)."""
    state = start.backbone_state if start is not None else None
    weights = Path(config.weights) if config.weights and state is None else None
    backbone = get_backbone(config.backbone, weights=weights, layer=config.layer, pretrained=state is None)
    if state is not None:
        try:
            backbone.load_state_dict(state)
        except RuntimeError as err:
            raise FinetuneError(f"{start.path}: its backbone does not fit {config.backbone} (layer {backbone.layer}): {err}") from None
    return backbone


# ---------------------------------------------------------------- the model


def backbone_stages(backbone: Backbone) -> list[list[nn.Module]]:
    """The backbone's stages in input order, as `freeze_stages` counts them.

    ResNet-50: stem (conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4 (the paper's conv1..conv5).
    Other sequential trunks (e.g. `tiny`): each child that holds parameters.
    """
    children = list(backbone.trunk.children())
    if backbone.name == "resnet50":
        return [children[:4], *([c] for c in children[4:])]
    if isinstance(backbone.trunk, nn.Sequential):
        return [[c] for c in children if any(True for _ in c.parameters())]
    raise FinetuneError(f"freeze_stages: the stages of {backbone.name} are not defined (resnet50 and sequential trunks are)")


def pool_train(fmap: torch.Tensor, patches: int) -> torch.Tensor:
    """[B, D, h, w] -> [B, P*P, D] float32: extract.pool_patches without its float16 storage cast."""
    return F.adaptive_max_pool2d(fmap.float(), patches).flatten(2).transpose(1, 2)


class EndToEnd(nn.Module):
    """Backbone, patch pooling and heads as one module (the unit DistributedDataParallel wraps).

    Frozen stages and frozen BatchNorm layers stay in eval mode whenever the module trains, so
    their running statistics never move; their parameters do not require gradients.
    """

    def __init__(self, backbone: Backbone, heads: STRMHeads, *, patches: int, normalize: bool,
                 freeze_stages: int = 0, bn: str = "train") -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.patches, self.normalize = patches, normalize
        self.channels_last = False
        fixed: list[nn.Module] = []
        if freeze_stages:
            stages = backbone_stages(backbone)
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

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [n, L, 3, H, W] -> patch features [n, L, P*P, D] float32."""
        n, length = frames.shape[:2]
        x = self.backbone.prepare(frames.flatten(0, 1), self.normalize)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(self.backbone_trains and torch.is_grad_enabled()):
            fmap = self.backbone(x)
        return pool_train(fmap, self.patches).view(n, length, self.patches**2, -1)

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor):
        """Support and query frames go through the backbone separately, as the authors do (BatchNorm batches)."""
        return self.heads(self.features(support), support_labels, self.features(query))


# ---------------------------------------------------------------- videos


@dataclass(frozen=True)
class SplitVideos:
    """One split's usable videos (status ok, not known to be too short), labels as in the cache."""

    video_ids: list[str]
    paths: list[str]
    n_frames: np.ndarray  # -1: counted when first loaded
    labels: np.ndarray  # index into class_names (the cache's numbering: sorted names of the split)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.video_ids)

    def load(self, index: int, view: int, seed: int, spec: ViewSpec) -> torch.Tensor:
        """uint8 [8, 3, crop, crop]: view 0 the test view, views >= 1 training views (pipeline.video.load_view)."""
        path = self.paths[index]
        n = int(self.n_frames[index])
        return load_view(path, n if n > 0 else count_frames(path), self.video_ids[index], view, seed, spec)


def split_videos(manifest: pd.DataFrame, split: str, videos_root: Path | None = None) -> SplitVideos:
    """The usable videos of `split`; paths relative to `videos_root` are resolved."""
    layouts = split_layouts(manifest, 1) if len(manifest) else {}
    if split not in layouts:
        return SplitVideos([], [], np.zeros(0, np.int64), np.zeros(0, np.int64), [])
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    n_frames = rows["n_frames"].astype(int).to_numpy() if "n_frames" in rows else np.full(len(rows), -1)
    status = rows["status"].astype(str).to_numpy() if "status" in rows else np.full(len(rows), "ok")
    keep = np.flatnonzero((status == "ok") & ((n_frames < 0) | (n_frames >= FRAMES)))
    paths = []
    for p in rows["path"].astype(str).to_numpy()[keep]:
        path = Path(p)
        paths.append(str(videos_root / path if videos_root is not None and not path.is_absolute() else path))
    layout = layouts[split]
    return SplitVideos([layout.video_ids[k] for k in keep], paths, n_frames[keep].astype(np.int64),
                       np.asarray(layout.labels, dtype=np.int64)[keep], layout.class_names)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # the worker processes are the parallelism


class TaskClips(Dataset):
    """Item k: the frames of task indices[k], uint8 [n_s + n_q, 8, 3, crop, crop] (support first).

    A video that cannot be decoded gives {"error": reason}, not an exception: the training loop
    stops with that reason instead of a worker's traceback.
    """

    def __init__(self, videos: SplitVideos, sampler: EpisodeSampler, indices: list[int], seed: int, spec: ViewSpec) -> None:
        self.videos, self.sampler, self.indices, self.seed, self.spec = videos, sampler, indices, seed, spec

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        index = self.indices[k]
        task = self.sampler.task(index)
        rows = np.concatenate([task.support, task.query])
        views = 1 + np.concatenate([task.support_views, task.query_views])  # training views only
        try:
            frames = torch.stack([self.videos.load(int(r), int(v), self.seed, self.spec) for r, v in zip(rows, views)])
        except (VideoError, ValueError) as err:
            return {"index": index, "frames": None, "error": str(err)}
        return {"index": index, "frames": frames, "error": None}


class ViewZeroClips(Dataset):
    """Item k: view 0 of videos [k * chunk, (k+1) * chunk), uint8 [n, 8, 3, crop, crop]."""

    def __init__(self, videos: SplitVideos, spec: ViewSpec, chunk: int = 16) -> None:
        self.videos, self.spec, self.chunk = videos, spec, chunk

    def __len__(self) -> int:
        return -(-len(self.videos) // self.chunk)

    def __getitem__(self, k: int) -> dict:
        rows = range(k * self.chunk, min((k + 1) * self.chunk, len(self.videos)))
        try:
            return {"frames": torch.stack([self.videos.load(r, 0, 0, self.spec) for r in rows]), "error": None}
        except (VideoError, ValueError) as err:
            return {"frames": None, "error": str(err)}


def _loader(dataset: Dataset, workers: int, pin: bool) -> DataLoader:
    """Items in order, decoded `workers` at a time in forkserver processes (no decoder state is forked)."""
    extra = dict(prefetch_factor=2, multiprocessing_context="forkserver", worker_init_fn=_one_thread) if workers else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **extra)


# ---------------------------------------------------------------- progress and results


@dataclass(frozen=True)
class FinetuneProgress:
    """What the progress callback gets after every optimiser step."""

    task: int
    total: int
    loss: float  # mean per task (summed over its queries) since the last log line
    accuracy: float  # % on the training queries since the last log line
    tasks_per_s: float  # all processes together
    gpu_memory_gib: float | None  # peak allocated on this process's GPU; None on CPU
    val_accuracy: float | None
    best_val_accuracy: float | None


@dataclass(frozen=True)
class Estimate:
    """Measured speed after the first tasks, handed to `confirm`."""

    seconds_per_task: float
    tasks_left: int  # this process's
    device: str

    @property
    def seconds_left(self) -> float:
        return self.seconds_per_task * self.tasks_left


@dataclass(frozen=True)
class FinetuneResult:
    """Where a run ended and what it reached."""

    out: Path
    tasks_done: int
    best_val_accuracy: float | None
    best_task: int | None
    last_checkpoint: Path
    best_checkpoint: Path
    config: FinetuneConfig
    notes: tuple[str, ...] = ()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None on CPU or with amp 'off'."""
    if amp not in AMP:
        raise FinetuneError(f"amp {amp!r}: expected one of {', '.join(AMP)}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise FinetuneError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use amp fp16 (or off)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def encode_videos(model: EndToEnd, videos: SplitVideos, spec: ViewSpec, *, device: torch.device,
                  dtype: torch.dtype | None, workers: int) -> SplitFeatures:
    """View 0 of every video through the current backbone, stored as a cache would (float16 patches)."""
    model.eval()
    parts = []
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        for item in _loader(ViewZeroClips(videos, spec), workers, device.type == "cuda"):
            if item["error"] is not None:
                raise FinetuneError(f"validation video: {item['error']} (mark it bad in the manifest)")
            frames = item["frames"].to(device, non_blocking=True)
            n = frames.shape[0]
            x = model.backbone.prepare(frames.flatten(0, 1), model.normalize)
            if model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            parts.append(pool_patches(model.backbone(x), model.patches).view(n, 1, FRAMES, model.patches**2, -1).cpu())
    return SplitFeatures(torch.cat(parts), torch.from_numpy(videos.labels), videos.class_names, videos.video_ids)


# ---------------------------------------------------------------- the loop


def _manifest_record(train: SplitVideos, val: SplitVideos) -> str:
    rows = [(s, str(v.class_names[c]), i, p) for s, v in (("train", train), ("val", val))
            for i, p, c in zip(v.video_ids, v.paths, v.labels)]
    return manifest_digest(rows)


def _check_resume(ckpt: dict, config: FinetuneConfig, digest: str, path: Path) -> None:
    saved = ckpt.get("config", {})
    mine = asdict(config)
    differ = [k for k in mine if k not in RUNTIME_FIELDS and k != "source" and saved.get(k) != mine[k]
              and not (k in ("layer", "weights") and mine[k] is None)]
    if differ:
        raise FinetuneError(
            f"{path}: the run was started with other settings: "
            + "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine[k]!r} asked" for k in differ)
        )
    if ckpt.get("manifest") != digest:
        raise FinetuneError(f"{path}: the run was trained on other videos (the manifest's train/val rows differ)")


def finetune(
    config: FinetuneConfig,
    manifest: pd.DataFrame,
    out: Path | str,
    *,
    start: Start | None = None,
    resume: bool = False,
    videos_root: Path | None = None,
    progress: Callable[[FinetuneProgress], None] | None = None,
    confirm: Callable[[Estimate], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune backbone and heads on the manifest's training videos; files go to `out`.

    `start` is required unless `resume` finds `out/last.pt`; its heads are trained in place.
    `confirm`, when given, is asked once (rank 0) after the first PROBE_TASKS tasks with the
    measured speed; False stops the run (FinetuneAborted) before any checkpoint is written. Under torchrun (after train.init_distributed) the
    tasks of each optimiser step are split across ranks; rank 0 writes the files.
    """
    _check(config)
    out = Path(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tps = config.tasks_per_step
    if tps % world:
        raise FinetuneError(f"{world} processes share the {tps} tasks of an optimiser step: "
                            "tasks_per_step must be a multiple of the number of processes")
    device = _device(config.device)
    cuda = device.type == "cuda"
    dtype = amp_dtype(config.amp, device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # every task has the same shapes

    # ---- videos and tasks
    train_videos = split_videos(manifest, "train", videos_root)
    val_videos = split_videos(manifest, "val", videos_root)
    try:
        sampler = EpisodeSampler(train_videos.labels, way=config.way, shot=config.shot, queries=config.queries,
                                 seed=config.seed, views=VIEW_DRAWS)
    except ValueError as err:
        raise FinetuneError(f"train split: {err}") from None
    if config.val_every:
        if not len(val_videos):
            raise FinetuneError("the manifest has no usable val videos to validate on (set val_every to 0 to train without)")
        try:
            EpisodeSampler(val_videos.labels, way=config.way, shot=config.shot, queries=1, seed=config.val_seed)
        except ValueError as err:
            raise FinetuneError(f"val split: {err}") from None
    digest = _manifest_record(train_videos, val_videos)

    # ---- model: fresh from `start` or from last.pt
    last_path, best_path = out / LAST, out / BEST
    ckpt = torch.load(last_path, map_location="cpu", weights_only=True) if resume and last_path.exists() else None
    if not resume and last_path.exists():
        raise FinetuneError(f"{last_path}: the run folder already holds a run; resume it or choose another folder")
    notes: list[str] = []
    if ckpt is not None:
        _check_resume(ckpt, config, digest, last_path)
        config = replace(config, layer=ckpt["config"]["layer"], weights=ckpt["config"]["weights"])
        heads, _ = load_heads(ckpt)
        backbone = get_backbone(config.backbone, layer=config.layer, pretrained=False)
        backbone.load_state_dict(ckpt["backbone"])
    else:
        if start is None:
            raise FinetuneError(f"no starting checkpoint given and no {last_path} to resume")
        heads, notes = start.heads, list(start.notes)
        backbone = build_backbone(config, start)
        config = replace(config, layer=backbone.layer)
        if start.weights_id and start.backbone_state is None and start.weights_id != backbone.weights_id:
            notes.append(f"the heads were trained on features of other weights ({start.weights_id[:24]}) than "
                         f"this {backbone.name} ({backbone.weights_id[:24]})")
    if backbone.dim != heads.dim or heads.patches != config.patches**2 or heads.frames != FRAMES:
        raise FinetuneError(f"the heads take [L={heads.frames}, P*P={heads.patches}, D={heads.dim}] features; "
                            f"{backbone.name} (layer {backbone.layer}) with {config.patches}x{config.patches} patches "
                            f"gives [L={FRAMES}, P*P={config.patches**2}, D={backbone.dim}]")
    backbone.to(device)
    if world > 1 and cuda and config.bn == "train":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)  # keeps the Parameter objects
    model = EndToEnd(backbone, heads, patches=config.patches, normalize=config.normalize,
                     freeze_stages=config.freeze_stages, bn=config.bn).to(device)
    if cuda:
        model.backbone.to(memory_format=torch.channels_last)
        model.channels_last = True
    model.train()
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model

    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

    state = {"best_val": None, "best_task": None, "last_val": None,
             "window": {"loss": 0.0, "correct": 0.0, "queries": 0.0, "tasks": 0.0}}
    begin = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        state, begin = ckpt["state"], int(ckpt["task_index"])
    record = {**asdict(config), "dim": heads.dim, "frames": heads.frames, "variant": heads.variant}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            (out / METRICS).write_text("")
            best_path.unlink(missing_ok=True)  # left by a run killed before its first last.pt
        else:
            _truncate_metrics(out, begin)
        info = {"config": record, "manifest": digest, "videos": {"train": len(train_videos), "val": len(val_videos)},
                "start": {"path": config.source, "kind": start.kind if start else "resume"}, "notes": notes,
                "world_size": world, "device": str(device), "torch": torch.__version__, "resumed_from_task": begin}
        (out / CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    done = begin

    def save(path: Path, **more) -> None:
        save_heads(path, heads, backbone=model.backbone.state_dict(), optimizer=optimizer.state_dict(),
                   scaler=scaler.state_dict(), rng=_rng_state(), task_index=done, config=record, manifest=digest,
                   state=state, world_size=world, **more)

    # ---- the loop: this rank's share of every step's tasks
    mine = [i for s in range(begin, config.episodes, tps) for i in range(s + rank, s + tps, world)]
    loader = _loader(TaskClips(train_videos, sampler, mine, config.seed, config.spec), config.workers, cuda)
    batches: Iterator[dict] = iter(loader)
    n_s, per_rank = config.way * config.shot, tps // world
    window_start, window_tasks, seen, first_end = time.perf_counter(), 0, 0, 0.0
    for s in range(begin, config.episodes, tps):
        for k in range(per_rank):
            batch = next(batches)
            i = int(batch["index"])
            if batch["error"] is not None:
                raise FinetuneError(f"task {i}: {batch['error']} (mark the video bad in the manifest, then resume)")
            frames = batch["frames"].to(device, non_blocking=True)
            task = sampler.task(i)
            s_lab = torch.from_numpy(task.support_labels).to(device)
            q_lab = torch.from_numpy(task.query_labels).to(device)
            torch.manual_seed(task_seed(config.seed, i))  # dropout masks: a function of (seed, i)
            sync = ddp.no_sync() if world > 1 and k < per_rank - 1 else nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    output = ddp(frames[:n_s], s_lab, frames[n_s:])
                    loss = heads.loss(output, q_lab)  # summed over the queries (STRM_SPEC section 7)
                scaler.scale(loss * (world / tps)).backward()
            w = state["window"]
            w["loss"] += float(loss.detach())
            w["correct"] += float((output.logits.detach().argmax(-1) == q_lab).sum())
            w["queries"] += len(q_lab)
            w["tasks"] += 1
            seen += 1
            if seen == 1:
                first_end = time.perf_counter()
            if seen == PROBE_TASKS and confirm is not None:
                estimate = Estimate(time.perf_counter() - first_end, len(mine) - seen, str(device))
                go = torch.tensor([1.0 if rank != 0 or confirm(estimate) else 0.0])
                if world > 1:
                    dist.broadcast(go, 0)
                if not go.item():
                    raise FinetuneAborted(f"declined after {PROBE_TASKS} timed tasks "
                                          f"({estimate.seconds_per_task:.1f} s a task on {device})")
        if config.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = s + tps
        window_tasks += tps
        elapsed = time.perf_counter() - window_start
        rate = window_tasks / elapsed if elapsed > 0 else 0.0
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        if progress is not None:
            w = state["window"]
            progress(FinetuneProgress(done, config.episodes, w["loss"] / max(w["tasks"], 1),
                                      100 * w["correct"] / max(w["queries"], 1), rate * world, memory,
                                      state["last_val"], state["best_val"]))

        if done % config.log_every == 0 or done == config.episodes:
            w = state["window"]
            sums = torch.tensor([w["loss"], w["correct"], w["queries"], w["tasks"]], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(sums)
            line = {"kind": "train", "task": done, "loss": sums[0].item() / max(sums[3].item(), 1),
                    "accuracy": 100 * sums[1].item() / max(sums[2].item(), 1), "lr": optimizer.param_groups[0]["lr"],
                    "tasks_per_s": rate * world, "gpu_memory_gib": memory}
            if not math.isfinite(line["loss"]):
                raise FinetuneError(
                    f"the training loss is not finite by task {done}: lower the learning rate (now {config.lr:g}); "
                    "heads trained with feature standardisation amplify the backbone's gradients in low-variance channels")
            state["window"] = {"loss": 0.0, "correct": 0.0, "queries": 0.0, "tasks": 0.0}
            window_start, window_tasks = time.perf_counter(), 0
            if rank == 0:
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps(line) + "\n")

        validated = bool(config.val_every) and (done % config.val_every == 0 or done == config.episodes)
        if validated:
            verdict = torch.zeros(2, dtype=torch.float64)
            if rank == 0:
                features = encode_videos(model, val_videos, config.spec, device=device, dtype=dtype, workers=config.workers)
                result = evaluate(heads, features, episodes=config.val_episodes, way=config.way, shot=config.shot,
                                  queries=1, seed=config.val_seed, device=device)
                accuracy = float(result.mean)
                improved = state["best_val"] is None or accuracy > state["best_val"]
                with open(out / METRICS, "a") as f:
                    f.write(json.dumps({"kind": "val", "task": done, "accuracy": accuracy, "ci95": float(result.ci95),
                                        "best": improved}) + "\n")
                verdict = torch.tensor([accuracy, float(improved)], dtype=torch.float64)
            model.train()
            if world > 1:
                dist.broadcast(verdict, 0)
            accuracy, improved = verdict[0].item(), bool(verdict[1].item())
            state["last_val"] = accuracy
            if improved:
                state["best_val"], state["best_task"] = accuracy, done
                if rank == 0:
                    save(best_path, val={"accuracy": accuracy, "ci95": float(result.ci95),
                                         "episodes": config.val_episodes, "seed": config.val_seed})
            if rank == 0:
                plot_curve(out, config.way)

        if rank == 0 and (done % config.checkpoint_every == 0 or validated or done == config.episodes):
            save(last_path)
    if rank == 0:
        if not config.val_every and done == config.episodes:
            save(best_path, val=None)  # nothing to choose by: best.pt is the final weights
            notes.append("no validation: best.pt holds the final weights")
        plot_curve(out, config.way)
    return FinetuneResult(out, done, state["best_val"], state["best_task"], last_path, best_path, config, tuple(notes))
