"""`make gpu-check`: every CUDA path of the project at the paper's sizes, in one short script.

Steps, each timed and each in a process of its own (a failed step is reported with a traceback
summary, a crashed or hung one with how it ended, and the next one runs):
- decode: torchcodec on the CPU through the decoding worker pool vs torchcodec's CUDA decoder;
- extract: ResNet-50 through `pipeline.features.extract.extract` in fp32, bf16 and fp16, against the
  backbone alone on tensors already on the device;
- train_heads: STRM heads at D = 2048 on a split of HMDB51's training size (9 GB of float16)
  resident on the GPU, then the same split in host RAM gathered into pinned memory;
- evaluate: 10,000 5-way 5-shot tasks at HMDB51's test size, and what autocast does to accuracy;
- finetune: ResNet-50 + heads end to end, BatchNorm trained and frozen;
- ddp: 2 NCCL ranks (2 gloo ranks on CPU at --size tiny) against one process accumulating.

Why a script of its own: a GPU is lent for minutes, so everything that can only be checked there
runs in one go, each step writing its figures to the JSON as it ends. Only the standard library and
torch are imported up front; the project's modules and zarr, PyAV and torchcodec are imported by
the steps that need them; a step whose PyAV or torchcodec fails to import is reported as skipped
with the reason (any other failed import is a failure).
Weights are random (`pretrained=False`): the same cost as ImageNet's, and nothing is downloaded.

    python3 -m benchmarks.gpu_check --device cuda --size paper    # or: make gpu-check
    python3 -m benchmarks.gpu_check --device cpu --size tiny      # every step, small, on a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks import steady_rate

REPO = Path(__file__).resolve().parents[1]
VIEWS = 4  # cached views of a training video, as extraction writes them
FRAMES, PATCHES = 8, 16  # L and P*P of every cached video
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Size:
    """How large each step runs: the paper's sizes on a GPU, or tiny ones that a CPU does in minutes."""

    name: str
    video_classes: int  # written test videos: classes x videos a class, 4 views each
    videos_per_class: int
    video_hw: tuple[int, int]  # H, W of the written videos
    video_frames: int
    backbone: str
    short_side: int
    crop: int
    batch: int  # frames a backbone call
    backbone_repeats: int
    train_videos: int  # HMDB51's training split: 4,280 videos of 31 classes
    train_classes: int
    dim: int
    heads_options: dict = field(default_factory=dict)
    warmup_tasks: int = 20
    timed_tasks: int = 200
    eval_videos: int = 1292  # HMDB51's test split
    eval_classes: int = 10
    eval_episodes: int = 10_000
    autocast_tasks: int = 50  # training tasks of the model autocast is checked on
    autocast_episodes: int = 2000
    autocast_signal: float = 0.7  # class pattern vs unit noise: about 55% accuracy after those tasks, not 100%
    ft_way: int = 5
    ft_shot: int = 5
    ft_queries: int = 4
    ft_tasks: int = 20
    ft_tasks_per_step: int = 4


SIZES = {
    "paper": Size("paper", 10, 10, (240, 320), 72, "resnet50", 256, 224, 64, 20, 4280, 31, 2048),
    "tiny": Size(
        "tiny",
        3,
        2,
        (48, 64),
        24,
        "tiny",
        40,
        32,
        32,
        5,
        300,
        10,
        64,
        {"trm_dim": 32},
        warmup_tasks=5,
        timed_tasks=40,
        eval_videos=200,
        eval_episodes=1000,
        autocast_tasks=20,
        autocast_episodes=500,
        autocast_signal=0.4,
        ft_way=2,
        ft_shot=1,
        ft_queries=1,
        ft_tasks=8,
    ),
}


class Skipped(Exception):
    """A step that cannot run here (no second GPU, a library that does not load); the message says why."""


@dataclass
class StepResult:
    """One step's outcome as runs/gpu_check.json records it."""

    ok: bool = False
    error: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    figures: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    traceback: str | None = None


class Recorder:
    """Where a step puts its figures and notes; each is printed and saved as it comes, so a later failure
    (even a crash of the step's process) keeps them."""

    def __init__(self, step: str, result: StepResult, save: Callable[[], None] = lambda: None) -> None:
        self.step, self.result, self.save = step, result, save

    def figure(self, name: str, value: float, unit: str, goal: str = "") -> None:
        self.result.figures[name] = {"value": float(value), "unit": unit, "goal": goal}
        print(f"gpu-check: {self.step}: {name}: {value:.4g} {unit}" + (f" (goal {goal})" if goal else ""), flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.result.notes.append(text)
        print(f"  {self.step}: {text}", flush=True)
        self.save()


@dataclass
class Context:
    """What the steps share: the device, the sizes, a scratch folder and the test videos (written once)."""

    device: torch.device
    size: Size
    root: Path
    workers: int
    rows: list[dict] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def video_root(self) -> Path:
        return self.root / "videos"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_figure(self, rec: Recorder, name: str) -> None:
        """Peak allocated GPU memory since `reset_peak`; nothing on CPU."""
        if self.cuda:
            rec.figure(name, torch.cuda.max_memory_allocated(self.device) / 1e9, "GB")

    def videos(self) -> list[dict]:
        """Manifest rows of the test videos (class c, video i), written in parallel on first use (by
        whichever step's process needs them first; the later ones read the rows back)."""
        listing = self.root / "videos.json"
        if self.rows is None and listing.exists():
            self.rows = json.loads(listing.read_text())
        if self.rows is None:
            try:
                import av  # noqa: F401 - write_mp4's encoder
            except ImportError as err:
                raise Skipped(f"PyAV could not be imported ({err}): it writes the test videos") from None
            from benchmarks.gpu_check import (
                write_clip,  # by its module's name, never __main__: workers import it
            )
            from pipeline.runtime.workers import imap_isolated

            s = self.size
            rows, jobs = [], []
            for c in range(s.video_classes):
                for i in range(s.videos_per_class):
                    rel = f"c{c}/v{i}.mp4"
                    (self.video_root / rel).parent.mkdir(parents=True, exist_ok=True)
                    jobs.append((str(self.video_root / rel), 1000 * c + i, *s.video_hw, s.video_frames))
                    rows.append(
                        {
                            "video_id": f"c{c}/v{i}",
                            "class": f"c{c}",
                            "split": "train",
                            "path": rel,
                            "n_frames": s.video_frames,
                            "status": "ok",
                        }
                    )
            for job, _, error in imap_isolated(write_clip, jobs, workers=min(self.workers, len(jobs))):
                if error is not None:
                    raise RuntimeError(f"writing {job[0]}: {error}")
            self.rows = rows
            listing.write_text(json.dumps(rows))
        return self.rows


def write_clip(job: tuple[str, int, int, int, int]) -> str:
    """A camera pan over a noisy blocky texture with a square crossing it (runs in a worker process).

    Real texture and motion, so the codec does real work: (path, seed, height, width, frames).
    """
    import numpy as np

    from pipeline.data.synth import write_mp4

    path, seed, height, width, n = job
    rng = np.random.default_rng(seed)
    step = 3
    coarse = rng.integers(0, 256, (height // 8 + 1, (width + step * n) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1).astype(np.int16)
    texture = (texture + rng.integers(-12, 13, texture.shape)).clip(0, 255).astype(np.uint8)
    side = max(4, height // 6)
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        frames[t] = texture[:height, step * t : step * t + width]
        x, y = (t * (width - side)) // max(n - 1, 1), height // 3
        frames[t, y : y + side, x : x + side] = (240, 60, 20)
    write_mp4(frames, Path(path))
    return path


# ---------------------------------------------------------------------------------------------- steps


def step_decode(ctx: Context, rec: Recorder) -> None:
    """Videos/s decoding each video's 4 views: CPU worker pool (decode_job) vs torchcodec's CUDA decoder."""
    rows = ctx.videos()
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as err:  # noqa: BLE001 - ImportError, or FFmpeg's libraries failing to load
        raise Skipped(
            f"torchcodec could not load FFmpeg: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    from pipeline.data.video import (
        ViewSpec,
        decoder_name,
        resize_short_side,
        sample_indices,
        view_rng,
    )
    from pipeline.features.extract import VideoJob, decode_job
    from pipeline.runtime.workers import imap_isolated

    if decoder_name() != "torchcodec":
        raise Skipped(f"the project decodes with {decoder_name()} here (STRM_DECODER)")
    spec = ViewSpec(short_side=ctx.size.short_side, crop=ctx.size.crop)
    jobs = [
        VideoJob("train", k, r["video_id"], str(ctx.video_root / r["path"]), r["n_frames"], VIEWS, 0, spec)
        for k, r in enumerate(rows)
    ]
    done: list[float] = []
    start = time.perf_counter()
    for job, _, error in imap_isolated(decode_job, jobs, workers=ctx.workers, max_in_flight=2 * ctx.workers + 1):
        if error is not None:
            raise RuntimeError(f"{job.video_id}: {error}")
        done.append(time.perf_counter())
    rec.figure("cpu_pool_videos_per_s", (len(done) - 1) / (done[-1] - done[0]), "videos/s")
    rec.figure("cpu_pool_videos_per_s_incl_startup", len(done) / (done[-1] - start), "videos/s")
    rec.note(
        f"{len(jobs)} videos {ctx.size.video_hw[1]}x{ctx.size.video_hw[0]} H.264, {ctx.size.video_frames} frames, "
        f"{VIEWS} views each, resized and cropped, {ctx.workers} worker processes"
    )
    if not ctx.cuda:
        rec.note("cuda decoding: skipped, the device is cpu")
        return

    def frames_on_gpu(row: dict) -> VideoDecoder:
        """The union of the 4 views' frames, decoded on the GPU and resized there; the decoder, to ask it how."""
        n = row["n_frames"]
        wanted = sorted(
            {i for v in range(VIEWS) for i in sample_indices(n, train=v > 0, rng=view_rng(0, row["video_id"], v))}
        )
        decoder = VideoDecoder(str(ctx.video_root / row["path"]), device=str(ctx.device))
        resize_short_side(decoder.get_frames_at(indices=wanted).data, spec)
        return decoder

    try:
        first = frames_on_gpu(rows[0])  # CUDA context and decoder start-up
    except Exception as err:  # noqa: BLE001 - a torchcodec built without CUDA says so here
        rec.note(f"cuda decoding: not available in this torchcodec build ({type(err).__name__}: {err})")
        return
    fallback = getattr(first, "cpu_fallback", None)  # torchcodec >= 0.8 says when NVDEC could not take the stream
    if fallback:
        rec.note(f"cuda decoding fell back to the CPU: {fallback}")
    ctx.sync()
    start = time.perf_counter()
    for row in rows:
        frames_on_gpu(row)
    ctx.sync()
    rec.figure("cuda_videos_per_s", len(rows) / (time.perf_counter() - start), "videos/s")


def _backbone_alone(
    backbone: torch.nn.Module, frames: torch.Tensor, precision: str, repeats: int, ctx: Context
) -> float:
    """Frames/s of patch_features on a batch already on the device (the ceiling of extraction)."""
    from pipeline.features.backbones import patch_features

    dtype = AUTOCAST.get(precision)
    with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=dtype) if dtype else nullcontext():
        patch_features(backbone, frames, normalize=True, patches=4)  # warm-up (cuDNN's choices)
        ctx.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            patch_features(backbone, frames, normalize=True, patches=4)
        ctx.sync()
    return repeats * len(frames) / (time.perf_counter() - start)


def step_extract(ctx: Context, rec: Recorder) -> None:
    """Extraction frames/s in fp32, bf16 and fp16 and its fraction of the backbone alone (goal >= 0.8)."""
    rows = ctx.videos()
    import pandas as pd

    from pipeline.data.video import ViewSpec
    from pipeline.features.backbones import get_backbone
    from pipeline.features.extract import ExtractSettings, RunOptions, extract

    s = ctx.size
    backbone = get_backbone(s.backbone, pretrained=False, image_size=s.crop)
    settings = ExtractSettings(
        views=VIEWS, spec=ViewSpec(short_side=s.short_side, crop=s.crop, interpolation=backbone.interpolation)
    )
    frames = torch.randint(0, 256, (s.batch, 3, s.crop, s.crop), dtype=torch.uint8, device=ctx.device)
    manifest = pd.DataFrame(rows)
    for precision in PRECISIONS:
        stamps: list[tuple[float, int]] = []
        result = extract(
            "gpucheck",
            manifest,
            backbone,
            ctx.root / f"extract-{precision}",
            settings,
            RunOptions(batch_size=s.batch, workers=ctx.workers, device=str(ctx.device), precision=precision),
            videos_root=ctx.video_root,
            progress=lambda p, stamps=stamps: stamps.append((time.perf_counter(), p.frames)),
        )
        if result.failures:
            raise RuntimeError(f"extraction failed on {result.failures[:3]}")
        steady = steady_rate(stamps, stamps[0][1], stamps[-1][1])
        alone = _backbone_alone(backbone.place(ctx.device), frames, precision, s.backbone_repeats, ctx)
        rec.figure(f"{precision}_frames_per_s", steady, "frames/s")
        rec.figure(f"{precision}_backbone_alone_frames_per_s", alone, "frames/s")
        rec.figure(f"{precision}_fraction", steady / alone, "x", ">= 0.8")
    rec.note(
        f"{s.backbone} (random weights) at {s.short_side}/{s.crop}, batch {s.batch}, {len(rows)} videos x {VIEWS} "
        f"views x 8 frames, {ctx.workers} decoding workers; extraction's steady state (first to last video written)"
    )


def _random_split(ctx: Context, videos: int, views: int, dim: int, classes: int, signal: float):
    """A SplitFeatures made on the device in chunks: class pattern x signal + unit noise, float16."""
    from pipeline.features.readers import SplitFeatures

    labels = torch.arange(videos) % classes
    features = torch.empty((videos, views, FRAMES, PATCHES, dim), dtype=torch.float16, device=ctx.device)
    patterns = torch.randn(classes, FRAMES, PATCHES, dim, device=ctx.device) * signal
    chunk = max(1, (256 << 20) // (views * FRAMES * PATCHES * dim * 2))  # 256 MB of noise at a time
    for start in range(0, videos, chunk):
        rows = labels[start : start + chunk].to(ctx.device)
        noise = torch.randn((len(rows), views, FRAMES, PATCHES, dim), dtype=torch.float16, device=ctx.device)
        features[start : start + len(rows)] = noise + patterns[rows][:, None].half()
    return SplitFeatures(
        features=features,
        labels=labels,
        class_names=[f"c{c}" for c in range(classes)],
        video_ids=[f"c{c}/v{i}" for i, c in enumerate(labels.tolist())],
        loading="device" if ctx.cuda else "ram",
    )


def _timed_training(ctx: Context, split, cache: Path, out: Path) -> tuple[float, tuple[str, ...]]:
    """Steady-state tasks/s of train-heads on `split` (5-way 5-shot 4 queries, bf16 autocast + TF32), and its notes."""
    from pipeline.training.train import make_config, train

    s = ctx.size
    episodes = s.warmup_tasks + s.timed_tasks
    config = make_config(
        "frozen",
        episodes=episodes,
        val_every=0,
        checkpoint_every=episodes,
        amp=True,
        device=str(ctx.device),
        heads_options=s.heads_options,
    )
    stamps: list[tuple[float, int]] = []
    result = train(
        config,
        cache,
        out,
        train_split=split,
        progress=lambda p, stamps=stamps: stamps.append((time.perf_counter(), p.task)),
    )
    return steady_rate(stamps, s.warmup_tasks, episodes), result.notes


def step_train_heads(ctx: Context, rec: Recorder) -> None:
    """tasks/s with the training split resident on the GPU (goal >= 250), then in RAM through pinned memory."""
    from pipeline.features.cache import open_cache
    from pipeline.features.copies import write_random_cache
    from pipeline.features.readers import SplitFeatures, choose_loading

    s = ctx.size
    # The cache only names the features (fingerprint, D, L, P): the split itself is made on the device.
    cache = write_random_cache(ctx.root / "train-fingerprint", splits={"train": (5, 9, 1)}, dim=s.dim)
    small = open_cache(cache).split("train", loading="auto", device=ctx.device)
    rec.note(f"FeatureCache.split(loading='auto') chose {small.loading!r} for a {small.nbytes / 1e6:.1f} MB split")
    ctx.reset_peak()
    split = _random_split(ctx, s.train_videos, VIEWS, s.dim, s.train_classes, signal=0.0)
    rec.figure("split_gb", split.nbytes / 1e9, "GB")
    rec.note(f"loading 'auto' would choose {choose_loading(split.nbytes, 'auto', ctx.device)!r} for it")
    rate, notes = _timed_training(ctx, split, cache, ctx.root / "train-resident")
    rec.note(notes[0])
    rec.figure(f"{split.loading}_tasks_per_s", rate, "tasks/s", ">= 250" if ctx.cuda else "")
    ctx.peak_figure(rec, "peak_gpu_gb")
    rec.note(
        f"{s.train_videos} videos x {VIEWS} views x 8 x 16 x {s.dim}, STRM heads {s.heads_options or ''}, "
        f"5-way 5-shot 4 queries, tasks {s.warmup_tasks}..{s.warmup_tasks + s.timed_tasks} timed"
    )
    if not ctx.cuda:
        rec.note("pinned host memory: CUDA only")
        return
    host = SplitFeatures(split.features.cpu(), split.labels, split.class_names, split.video_ids, loading="pinned")
    del split
    gc.collect()  # the 9 GB resident split is freed before the pinned run measures its own memory
    torch.cuda.empty_cache()
    pinned, notes = _timed_training(ctx, host, cache, ctx.root / "train-pinned")
    rec.note(notes[0])
    rec.figure("pinned_tasks_per_s", pinned, "tasks/s")
    rec.figure("pinned_fraction_of_resident", pinned / rate, "x", ">= 0.9")


def step_evaluate(ctx: Context, rec: Recorder) -> None:
    """10,000 tasks at HMDB51 test scale on the device (goal <= 10 s), and autocast's paired accuracy difference."""
    from pipeline import evaluation as ev
    from pipeline.features.cache import open_cache
    from pipeline.features.copies import write_random_cache
    from pipeline.heads import build_heads, load_heads
    from pipeline.training.train import make_config, train

    s = ctx.size
    split = _random_split(ctx, s.eval_videos, 1, s.dim, s.eval_classes, signal=1.0)
    torch.manual_seed(0)
    heads = build_heads("strm", dim=s.dim, **s.heads_options).to(ctx.device).eval()
    ctx.reset_peak()
    ctx.sync()
    start = time.perf_counter()
    ev.evaluate(heads, split, episodes=s.eval_episodes, way=5, shot=5, queries=1, seed=0, device=ctx.device)
    ctx.sync()
    rec.figure("seconds", time.perf_counter() - start, "s", "<= 10 s" if s.eval_episodes == 10_000 else "")
    ctx.peak_figure(rec, "peak_gpu_gb")
    rec.note(
        f"{s.eval_episodes} 5-way 5-shot tasks, 1 query, on {s.eval_videos} videos at D={s.dim}, "
        "untrained heads, per-video pass included"
    )
    del split, heads

    cache = write_random_cache(
        ctx.root / "autocast-cache",
        splits={"train": (10, 10, 1), "test": (5, 12, 1)},
        dim=s.dim,
        signal=s.autocast_signal,
    )
    config = make_config(
        "frozen",
        episodes=s.autocast_tasks,
        val_every=0,
        checkpoint_every=s.autocast_tasks,
        device=str(ctx.device),
        heads_options=s.heads_options,
    )
    run = train(config, cache, ctx.root / "autocast-run")
    trained, _ = load_heads(torch.load(run.best_checkpoint, map_location="cpu", weights_only=True))
    trained.to(ctx.device)
    test = open_cache(cache).split("test", views=1, loading="device" if ctx.cuda else "ram", device=ctx.device)
    options = dict(episodes=s.autocast_episodes, way=5, shot=5, queries=1, seed=0, device=ctx.device)
    with _without_tf32():  # train() turned TF32 on; strm evaluate in its own process runs true fp32
        plain = ev.evaluate(trained, test, **options)
    mixed = ev.evaluate(trained, test, autocast=True, **options)
    paired = ev.compare_results(mixed, plain)
    rec.figure("accuracy_fp32", plain.mean, "%")
    rec.figure("autocast_minus_fp32", paired.difference, "points", f"within +-{paired.ci95:.2g} (its 95% interval)")
    rec.figure("autocast_minus_fp32_ci95", paired.ci95, "points")
    rec.note(
        f"heads trained {s.autocast_tasks} tasks on a class-structured random cache; "
        f"{s.autocast_episodes} identical test tasks; tasks that differ: {paired.a_better + paired.b_better}"
    )


@contextmanager
def _without_tf32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full float32 for a while (CUDA's TF32 switches restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _finetune_start(ctx: Context) -> Path:
    """Heads (build_heads) and the random backbone saved as one checkpoint: finetune then downloads nothing.

    Made as sane as a real start, or the first steps diverge: the backbone's BatchNorm statistics are
    measured on the test videos' frames (as pretrained ones were on ImageNet), and the heads
    standardise its features on them (as train-heads does on the cache).
    """
    path = ctx.root / "finetune-start.pt"
    if not path.exists():
        from pipeline.data.video import ViewSpec, load_view
        from pipeline.features.backbones import get_backbone, patch_features
        from pipeline.heads import build_heads, save_heads

        s = ctx.size
        spec = ViewSpec(short_side=s.short_side, crop=s.crop)
        rows = ctx.videos()[: max(1, 2 * s.batch // FRAMES)]
        frames = torch.cat(
            [load_view(ctx.video_root / r["path"], r["n_frames"], r["video_id"], 1, 0, spec) for r in rows]
        )
        torch.manual_seed(0)
        backbone = get_backbone(s.backbone, pretrained=False, image_size=s.crop)
        for bn in backbone.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None  # a plain average over the calibration batches
        with torch.no_grad():
            backbone.train()
            for batch in frames.split(s.batch):
                patch_features(backbone, batch, normalize=True, patches=4)
            backbone.eval()
            features = patch_features(backbone, frames, normalize=True, patches=4, dtype=torch.float32)
        heads = build_heads("strm", dim=backbone.dim, **s.heads_options)
        flat = features.reshape(-1, backbone.dim)
        heads.set_feature_stats(flat.mean(0), flat.std(0))
        save_heads(path, heads, backbone=backbone.state_dict())
    return path


def _finetune_config(ctx: Context, **overrides):
    from pipeline.training.finetune import make_finetune_config

    s = ctx.size
    settings = dict(
        backbone=s.backbone,
        short_side=s.short_side,
        crop=s.crop,
        way=s.ft_way,
        shot=s.ft_shot,
        queries=s.ft_queries,
        episodes=s.ft_tasks,
        tasks_per_step=s.ft_tasks_per_step,
        val_every=0,
        checkpoint_every=s.ft_tasks,
        log_every=s.ft_tasks_per_step,
        workers=ctx.workers,
        device=str(ctx.device),
        amp="bf16",
    )
    return make_finetune_config("gpucheck", **{**settings, **overrides})


def step_finetune(ctx: Context, rec: Recorder) -> None:
    """tasks/s and peak GPU memory of backbone + heads trained end to end, BatchNorm trained and frozen."""
    rows = ctx.videos()
    import pandas as pd

    from pipeline.training.checkpoints import load_checkpoint
    from pipeline.training.finetune import finetune

    s = ctx.size
    start = _finetune_start(ctx)
    for bn in ("train", "frozen"):
        ctx.reset_peak()
        stamps: list[tuple[float, int]] = []
        # Clipped: a random ResNet-50 with frozen BatchNorm diverges at the authors' lr within steps.
        finetune(
            _finetune_config(ctx, bn=bn, grad_clip=1.0),
            pd.DataFrame(rows),
            ctx.root / f"finetune-{bn}",
            start=load_checkpoint(start),
            videos_root=ctx.video_root,
            progress=lambda p, stamps=stamps: stamps.append((time.perf_counter(), p.task)),
        )
        rec.figure(f"bn_{bn}_tasks_per_s", steady_rate(stamps, s.ft_tasks_per_step, s.ft_tasks), "tasks/s")
        ctx.peak_figure(rec, f"bn_{bn}_peak_gpu_gb")
    rec.note(
        f"{s.backbone} + STRM heads at {s.crop}, {s.ft_way}-way {s.ft_shot}-shot {s.ft_queries} queries, "
        f"{s.ft_tasks} tasks ({s.ft_tasks_per_step} a step, the first step untimed, gradients clipped to norm 1), "
        "bf16 autocast on CUDA, "
        f"{ctx.workers} decoding workers"
    )


def _torchrun(args: list[str], ctx: Context) -> None:
    """`strm ARGS` on 2 ranks under torchrun (nccl on CUDA, gloo on CPU)."""
    env = {**_child_env(), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        sys.executable,
        "-c",
        "from stages.app import main; main()",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun {args[0]} exited with {done.returncode}: {done.stderr[-2000:]}")


def _step_difference(start: dict, one: dict, ddp: dict) -> float:
    """Largest difference between the two runs' weight changes over the largest change (all tensors)."""
    worst = scale = 0.0
    moved = 0
    for key, w0 in start.items():
        if not w0.is_floating_point() or key.startswith("feature_"):
            continue
        a, b = (w0 - one[key]).double(), (w0 - ddp[key]).double()
        worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(a.abs().max()))
        moved += int(a.abs().max() > 0)
    if moved < 10:
        raise AssertionError(f"the optimiser step moved {moved} tensors: too few to compare")
    return worst / scale


def step_ddp(ctx: Context, rec: Recorder) -> None:
    """2 ranks' one optimiser step of 16 tasks equals one process accumulating them (train-heads, finetune)."""
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    if ctx.cuda and gpus < 2:
        raise Skipped(f"needs 2 GPUs (this machine has {gpus})")
    if not ctx.cuda and ctx.size.name != "tiny":
        raise Skipped("needs 2 GPUs (on CPU it runs 2 gloo ranks at --size tiny)")
    import rich  # noqa: F401 - the ranks run the command line
    import typer  # noqa: F401

    from pipeline.features.copies import write_random_cache
    from pipeline.training.train import make_config, train

    s = ctx.size
    tolerance = 1e-2 if ctx.cuda else 1e-4  # bf16 autocast on CUDA; float32 on CPU
    cache = write_random_cache(ctx.root / "ddp-cache", splits={"train": (6, 5, 2)}, dim=s.dim)
    options = [a for k, v in s.heads_options.items() for a in ("--heads-option", f"{k}={v}")]
    _torchrun(
        [
            "train-heads",
            "--cache",
            str(cache),
            "--preset",
            "authors",
            "--episodes",
            "16",
            "--shot",
            "2",
            "--queries",
            "2",
            *options,
            "--val-every",
            "0",
            "--device",
            ctx.device.type,
            "--lr",
            "1",
            "--out",
            str(ctx.root / "ddp-heads"),
        ],
        ctx,
    )

    def one_process(lr: float) -> dict:
        config = make_config(
            "authors",
            episodes=16,
            shot=2,
            queries=2,
            heads_options=s.heads_options,
            val_every=0,
            lr=lr,
            device=str(ctx.device),
        )
        train(config, cache, ctx.root / f"ddp-one-{lr}")
        return torch.load(ctx.root / f"ddp-one-{lr}" / "last.pt", map_location="cpu", weights_only=True)["model"]

    ddp = torch.load(ctx.root / "ddp-heads" / "last.pt", map_location="cpu", weights_only=True)
    if ddp["world_size"] != 2:
        raise AssertionError(f"the torchrun run had world size {ddp['world_size']}")
    difference = _step_difference(one_process(0.0), one_process(1.0), ddp["model"])
    rec.figure("train_heads_step_difference", difference, "x the largest change", f"<= {tolerance:g}")
    if difference > tolerance:
        raise AssertionError(
            f"train-heads on 2 ranks moved the weights differently from one process ({difference:.3g})"
        )
    if not ctx.cuda:
        rec.note("finetune on 2 gloo ranks: tests/test_finetune.py")
        return

    rows = ctx.videos()
    import pandas as pd

    from pipeline.data.manifests import write_manifest
    from pipeline.training.checkpoints import load_checkpoint
    from pipeline.training.finetune import finetune

    manifest = write_manifest(pd.DataFrame(rows), ctx.root / "ddp-manifest.csv")
    start = _finetune_start(ctx)
    # BatchNorm frozen: trained, SyncBatchNorm would pool the statistics of the two ranks' different tasks.
    one = ("--episodes", "16", "--tasks-per-step", "16", "--lr", "1", "--bn", "frozen")
    _torchrun(
        [
            "finetune",
            "gpucheck",
            "--from",
            str(start),
            "--videos",
            str(ctx.video_root),
            "--manifest",
            str(manifest),
            "--backbone",
            s.backbone,
            "--short-side",
            str(s.short_side),
            "--crop",
            str(s.crop),
            "--way",
            str(s.ft_way),
            "--shot",
            str(s.ft_shot),
            "--queries",
            str(s.ft_queries),
            *one,
            "--val-every",
            "0",
            "--checkpoint-every",
            "16",
            "--log-every",
            "16",
            "--workers",
            str(max(1, ctx.workers // 2)),
            "--device",
            "cuda",
            "--out",
            str(ctx.root / "ddp-finetune"),
        ],
        ctx,
    )
    finetune(
        _finetune_config(ctx, episodes=16, tasks_per_step=16, lr=1.0, bn="frozen", checkpoint_every=16, log_every=16),
        pd.DataFrame(rows),
        ctx.root / "ddp-finetune-one",
        start=load_checkpoint(start),
        videos_root=ctx.video_root,
    )
    initial = torch.load(start, map_location="cpu", weights_only=True)
    a = torch.load(ctx.root / "ddp-finetune-one" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(ctx.root / "ddp-finetune" / "last.pt", map_location="cpu", weights_only=True)
    difference = max(
        _step_difference(initial["model"], a["model"], b["model"]),
        _step_difference(initial["backbone"], a["backbone"], b["backbone"]),
    )
    rec.figure("finetune_step_difference", difference, "x the largest change", f"<= {tolerance:g}")
    if difference > tolerance:
        raise AssertionError(f"finetune on 2 ranks moved the weights differently from one process ({difference:.3g})")


STEPS: dict[str, Callable[[Context, Recorder], None]] = {
    "decode": step_decode,
    "extract": step_extract,
    "train_heads": step_train_heads,
    "evaluate": step_evaluate,
    "finetune": step_finetune,
    "ddp": step_ddp,
}


# ---------------------------------------------------------------------------------------------- running


OPTIONAL = ("av", "torchcodec")  # the video libraries a machine may lack: their steps are skipped, not failed


def run_step(name: str, ctx: Context, save: Callable[[StepResult], None] = lambda result: None) -> StepResult:
    """One step in this process, timed; its failure or skip is recorded, never raised."""
    result = StepResult()
    rec = Recorder(name, result, lambda: save(result))
    print(f"gpu-check: {name}: running", flush=True)
    start = time.perf_counter()
    try:
        STEPS[name](ctx, rec)
        result.ok = True
    except Skipped as why:
        result.skipped = str(why)
    except Exception as err:  # noqa: BLE001 - a failed step is reported and the next one runs
        if isinstance(err, ImportError) and (err.name or "").split(".")[0] in OPTIONAL:
            result.skipped = f"{err.name} could not be imported: {err}"
        else:
            result.error = f"{type(err).__name__}: {err}"
            result.traceback = "".join(traceback.format_exception(err)[-12:])
    result.seconds = time.perf_counter() - start
    gc.collect()
    if ctx.cuda:
        try:
            torch.cuda.empty_cache()
        except RuntimeError as err:  # a step that broke the CUDA context
            result.notes.append(f"after the step: {err}")
    verdict = "ok" if result.ok else f"skipped: {result.skipped}" if result.skipped else f"FAILED: {result.error}"
    if result.traceback:
        print(result.traceback, end="", file=sys.stderr, flush=True)
    print(f"gpu-check: {name}: {verdict} ({result.seconds:.1f} s)", flush=True)
    save(result)
    return result


def run_isolated(name: str, args: argparse.Namespace, scratch: Path) -> StepResult:
    """One step in a child process, so that a crash in native code (a decoder, a CUDA error that poisons
    the context) or a hang ends only that step; what the child saved before it died is kept."""
    part = scratch / f"{name}.result.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--device",
        args.device,
        "--size",
        args.size,
        "--only",
        name,
        "--in-process",
        "--scratch",
        str(scratch),
        "--out",
        str(part),
    ]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=_child_env(), start_new_session=True)  # its own group: workers and ranks too
    try:
        code = child.wait(timeout=args.step_timeout)
        ended = None if code in (0, 1) else f"its process ended with {_exit_reason(code)}"
    except subprocess.TimeoutExpired:
        ended = f"timed out after {args.step_timeout:g} s (--step-timeout)"
    finally:
        try:
            os.killpg(child.pid, 9)  # whatever the step left running (decoding workers, torchrun ranks)
        except ProcessLookupError:
            pass
        child.wait()
    saved = json.loads(part.read_text()).get(name) if part.exists() else None
    result = StepResult(**saved) if saved else StepResult()
    if ended is not None and (not saved or not (result.ok or result.error or result.skipped)):
        result.ok, result.error = False, f"the step did not finish: {ended}"
        result.seconds = time.perf_counter() - start
        print(f"gpu-check: {name}: FAILED: {result.error}", flush=True)
    return result


def _child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the carried wheels' paths kept after it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _commit() -> str:
    """The commit checked: git's, or $STRM_COMMIT on a copy of the tree without .git (a lent GPU machine)."""
    if os.environ.get("STRM_COMMIT"):
        return os.environ["STRM_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _about(device: torch.device, size: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": _commit(), "size": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default: cuda)")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="paper", help="paper: the paper's sizes; tiny: a CPU's"
    )
    parser.add_argument("--only", help="run only these steps, comma-separated (the others keep their results in --out)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    parser.add_argument("--step-timeout", type=float, default=300.0, help="seconds a step may take (default 300)")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # a step's child process
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)  # the run's folder, shared by its steps
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        print(f"gpu-check: unknown step {unknown[0]!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    from pipeline.runtime.distributed import DeviceError, resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    if args.in_process:  # one step of a run, in the child process run_isolated started
        ctx = Context(device=device, size=SIZES[args.size], root=args.scratch, workers=_workers())
        for name in names:
            run_step(name, ctx, lambda result, name=name: _write(args.out, {name: asdict(result)}))
        return 0
    record = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    record.update(_about(device, args.size))
    print(
        f"gpu-check: {record['device']}, torch {record['torch']}, CUDA {record['cuda']}, commit {record['commit'][:12]}, "
        f"size {args.size}",
        flush=True,
    )
    start = time.perf_counter()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in names:
            result = run_isolated(name, args, Path(tmp))
            failed += result.error is not None
            record[name] = asdict(result)
            _write(args.out, record)
    total = time.perf_counter() - start
    ok = sum(record[n]["ok"] for n in names)
    print(
        f"gpu-check: {ok} ok, {len(names) - ok - failed} skipped, {failed} failed in {total:.0f} s -> {args.out}",
        flush=True,
    )
    return 1 if failed else 0


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _write(path: Path, record: dict) -> None:
    from pipeline.training.runs import (
        write_atomic,  # standard library only: safe before any step's imports
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2, allow_nan=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
