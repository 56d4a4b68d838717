"""Feature extraction: decode views in worker processes, run the backbone, pool to patches, fill the cache.

Why it is shaped this way:
- Decoding (CPU-bound, per video) runs in worker processes (`imap_isolated`) while the main
  process runs the backbone, so the two overlap; a video that crashes its decoder fails alone.
- Batches mix frames of several videos and always have the same shape (the last one is padded):
  a video's numbers then never depend on which videos shared its batch, so a resumed run is
  bit-identical to an uninterrupted one.
- The cache writer stores one video per chunk and sets its flag after the features, so a kill at
  any moment loses at most the videos in flight and a rerun does only what is not done.
- The cache is keyed by the recipe and a video by its id and file (pipeline/features/cache.py): a
  manifest with new clips extracts only them, and a video keeps its slot (and its features) for good.
- Under torchrun every rank owns the videos whose slot is its rank modulo the world size; a chunk
  holds one video, so no chunk ever has two writers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from pipeline.data.video import (
    FRAMES,
    SAMPLING_RULE_VERSION,
    ViewSpec,
    count_frames,
    load_views,
    load_window,
)
from pipeline.features.backbones import Backbone, patch_features
from pipeline.features.cache import CacheWriter, SplitLayout, WriterLock
from pipeline.features.layouts import resolve_path, video_layouts
from pipeline.features.readers import CacheError
from pipeline.features.recipe import FeatureRecipe, manifest_digest, store_key
from pipeline.runtime import distributed
from pipeline.runtime.workers import TIME_LIMIT_S, imap_isolated


@dataclass(frozen=True)
class ExtractSettings:
    """Everything besides the manifest and the backbone that changes the cached numbers."""

    views: int = 4  # training videos: view 0 (the test view) plus views-1 augmented ones
    spec: ViewSpec = field(default_factory=ViewSpec)
    patches: int = 4  # P: the map is max-pooled to P x P
    normalize: bool = True  # False: the authors' raw [0, 1] pixels
    seed: int = 0  # seeds the augmented views (through video.view_rng)


@dataclass(frozen=True)
class RunOptions:
    """How to run; none of it changes the numbers except `precision`, which is fingerprinted."""

    batch_size: int = 64  # frames per backbone call
    workers: int = 2  # decoding processes; 0 decodes in this process
    device: str = "auto"
    precision: str = "auto"  # auto: fp32 on CPU, bf16 (or fp16) autocast on CUDA; or fp32/bf16/fp16
    decode_time_limit_s: float | None = TIME_LIMIT_S  # per video, in a worker (workers >= 1): then it fails
    durable: bool = True  # fsync each video's chunk before its done flag; off only to measure what it costs


@dataclass(frozen=True)
class VideoJob:
    """One video to turn into features; picklable, it travels to a decoding worker.

    `window` (first frame, frame count) takes the test view of that stretch of a long recording
    instead of the whole video's views (prediction's sliding windows).
    """

    split: str
    index: int
    video_id: str
    path: str
    n_frames: int
    views: int
    seed: int
    spec: ViewSpec
    window: tuple[int, int] | None = None
    repeat_short: bool = False  # under L frames: frames repeated (extraction), or ShortVideo (predict notes it)


@dataclass
class Progress:
    """Counts of this rank's run so far, handed to the progress callback after each video."""

    total: int  # videos this rank had to do when it started
    already_done: int  # videos of this rank's share found done in the cache
    done: int = 0
    failed: int = 0
    frames: int = 0  # frames through the backbone


@dataclass
class ExtractResult:
    """What a rank did: the cache path, its counts, and the failures it recorded (video id, reason)."""

    path: Path
    progress: Progress
    failures: list[tuple[str, str]]


def recipe(backbone: Backbone, settings: ExtractSettings, precision: str) -> FeatureRecipe:
    """The feature recipe of an extraction: the backbone as built, the settings, the resolved precision."""
    spec = settings.spec
    return FeatureRecipe(
        backbone=backbone.name,
        layer=backbone.layer,
        weights=backbone.weights_id,
        short_side=spec.short_side,
        crop=spec.crop,
        flip=spec.flip,
        mean=backbone.mean if settings.normalize else None,
        std=backbone.std if settings.normalize else None,
        frames=FRAMES,
        patches=settings.patches,
        train_views=settings.views,
        view_seed=settings.seed,
        sampling_rule=SAMPLING_RULE_VERSION,
        precision=precision,
        interpolation=spec.interpolation,
    )


def fingerprint(dataset: str, manifest: pd.DataFrame, recipe: FeatureRecipe) -> dict:
    """Readable record of everything that changes the numbers; its hash is the cache key."""
    rows = manifest[["split", "class", "video_id", "path"]].astype(str).itertuples(index=False, name=None)
    return recipe.fingerprint(dataset, manifest_digest(rows), len(manifest))


def cache_path(cache_root: Path, dataset: str, fp: dict) -> Path:
    """`<cache_root>/<dataset>/<key>`, the key the recipe's (`store_key`): one cache for every manifest."""
    return Path(cache_root) / dataset / store_key(fp)


NOT_FINITE = (
    "features not finite (inf or NaN): the backbone's output is NaN or beyond float16's range (|x| > 65504); "
    "check the --weights file and the input normalisation"
)


def decode_job(job: VideoJob) -> torch.Tensor:
    """A video's views (or one window's test view) as uint8 [views * 8, 3, crop, crop], decoded once
    (runs in a worker process)."""
    if job.window is not None:
        return load_window(Path(job.path), *job.window, job.spec)
    n_frames = job.n_frames if job.n_frames > 0 else count_frames(Path(job.path))
    views = load_views(
        Path(job.path), n_frames, job.video_id, range(job.views), job.seed, job.spec, repeat_short=job.repeat_short
    )
    return views.flatten(0, 1)


def _open_writer(
    path: Path, fp: dict, layouts: dict[str, SplitLayout], dims: tuple[int, int, int], device: torch.device
) -> CacheWriter:
    """This rank's writer, holding its lock. Rank 0 takes its lock, then creates the cache or checks its
    recipe and selects the manifest's videos; the other ranks open it once rank 0 says it is there.
    dims: (D, P, most views a video gets)."""
    rank, _ = distributed.rank_world()
    dim, patches, views = dims
    lock = WriterLock(path, rank)
    error: CacheError | None = None
    writer = None
    if rank == 0:
        try:
            lock.acquire()
            writer = CacheWriter.create(
                path, fp, layouts, frames=FRAMES, patches=patches * patches, dim=dim, views=views
            )
        except CacheError as err:
            lock.release()
            error = err
    message = distributed.broadcast_object(None if error is None else str(error), device)
    if error is not None:
        raise error  # rank 0's own, CacheBusy included
    if message is not None:
        raise CacheError(message)
    if writer is None:
        lock.acquire()
        writer = CacheWriter(path)
    writer.lock = lock
    return writer


def _jobs(
    manifest: pd.DataFrame,
    writer: CacheWriter,
    settings: ExtractSettings,
    videos_root: Path | None,
    rank: int,
    world: int,
) -> tuple[list[VideoJob], list[tuple[VideoJob, str]], int]:
    """This rank's share: (videos to extract, videos with nothing to extract and why, videos already done).

    A video is its slot in the cache, and so is its owner: ownership depends on nothing that changes
    between runs. A slot that two splits list gets the most views either asks; rank 0 reports the
    rows that have nothing to extract.
    """
    need: dict[int, tuple[int, str, str]] = {}  # slot -> (views, split, video id)
    bad = []
    by_split = {}
    for split in writer.splits:
        rows = manifest[manifest["split"] == split]
        rows = by_split[split] = rows.set_index(rows["video_id"].astype(str))
        reasons = dict(writer.failures(split))
        views = writer.views(split)
        for slot, video_id in zip(writer.slots(split).tolist(), writer.video_ids(split), strict=True):
            if slot >= 0:
                need[slot] = (max(views, need.get(slot, (0,))[0]), split, video_id)
            elif rank == 0:
                job = VideoJob(
                    split, -1, video_id, str(rows.loc[video_id, "path"]), -1, views, settings.seed, settings.spec
                )
                bad.append((job, reasons.get(video_id, "nothing to extract")))
    mine = sorted(slot for slot in need if slot % world == rank)
    stored = writer.views_done(mine)
    todo, already = [], 0
    for slot, views_done in zip(mine, stored.tolist(), strict=True):
        views, split, video_id = need[slot]
        if views_done >= views:
            already += 1
            continue
        row = by_split[split].loc[video_id]
        n_frames = int(row["n_frames"]) if "n_frames" in row and pd.notna(row["n_frames"]) else -1
        path = resolve_path(str(row["path"]), videos_root)
        todo.append(
            VideoJob(split, slot, video_id, str(path), n_frames, views, settings.seed, settings.spec, repeat_short=True)
        )
    return todo, bad, already


def _decoded(
    jobs: list[VideoJob], workers: int, time_limit_s: float | None
) -> Iterator[tuple[VideoJob, torch.Tensor | None, str | None]]:
    """Decoded videos in completion order, with the error text of those that failed (a worker past
    the time limit is stopped: its video fails, the run goes on)."""
    if workers > 0:
        yield from imap_isolated(
            decode_job, jobs, workers=workers, max_in_flight=2 * workers + 1, timeout_s=time_limit_s
        )
        return
    for job in jobs:
        try:
            yield job, decode_job(job), None
        except Exception as err:  # noqa: BLE001 - a bad video is recorded, never fatal
            yield job, None, f"{type(err).__name__}: {err}"


class _Batcher:
    """Frames of many videos queued for fixed-size backbone batches; a video is handed on once complete."""

    def __init__(
        self,
        backbone: Backbone,
        normalize: bool,
        patches: int,
        options: RunOptions,
        device: torch.device,
        precision: str,
        on_features: Callable[[VideoJob, torch.Tensor, int], None],
    ) -> None:
        self.backbone, self.normalize, self.patches, self.options = backbone, normalize, patches, options
        self.device, self.on_features = device, on_features
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.chunks: list[tuple[VideoJob, int, torch.Tensor]] = []  # (video, first frame row, frames)
        self.queued = 0
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.filled: dict[tuple[str, int], int] = {}
        self.frames = 0

    def add(self, job: VideoJob, frames: torch.Tensor) -> None:
        key = (job.split, job.index)
        self.outputs[key] = torch.empty(len(frames), self.patches**2, self.backbone.dim, dtype=torch.float16)
        self.filled[key] = 0
        self.chunks.append((job, 0, frames))
        self.queued += len(frames)
        while self.queued >= self.options.batch_size:
            self._run(self.options.batch_size)

    def flush(self) -> None:
        while self.queued:
            self._run(min(self.queued, self.options.batch_size))

    def _run(self, n: int) -> None:
        """Take n queued frames (padded to batch_size so the shape never changes), run, scatter, write."""
        parts, owners, taken = [], [], 0
        while taken < n:
            job, start, frames = self.chunks[0]
            k = min(n - taken, len(frames) - start)
            parts.append(frames[start : start + k])
            owners.append((job, start, k))
            taken += k
            if start + k == len(frames):
                self.chunks.pop(0)
            else:
                self.chunks[0] = (job, start + k, frames)
        self.queued -= n
        pad = self.options.batch_size - n
        if pad:
            parts.append(torch.zeros((pad,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype))
        feats = self._forward(torch.cat(parts))[:n]
        self.frames += n
        row = 0
        for job, start, k in owners:
            key = (job.split, job.index)
            self.outputs[key][start : start + k] = feats[row : row + k]
            row += k
            self.filled[key] += k
            if self.filled[key] == len(self.outputs[key]):
                out = self.outputs.pop(key).view(-1, FRAMES, self.patches**2, self.backbone.dim)
                del self.filled[key]
                self.on_features(job, out, self.frames)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        autocast = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with torch.inference_mode(), autocast:
            feats = patch_features(self.backbone, batch, normalize=self.normalize, patches=self.patches)
        return feats.cpu()


def run_jobs(
    jobs: list[VideoJob],
    backbone: Backbone,
    *,
    normalize: bool,
    patches: int,
    options: RunOptions,
    device: torch.device,
    precision: str,
    on_features: Callable[[VideoJob, torch.Tensor, int], None],
    on_failure: Callable[[VideoJob, str, int], None],
) -> None:
    """Videos -> patch features, decoding in worker processes while the backbone (already on `device`) runs.

    `on_features(job, [views, L, P*P, D] float16, frames so far)` gets each video once its frames are
    through, in completion order; `on_failure(job, reason, frames so far)` each video that failed,
    features that are not finite included (they would poison every task that draws the video).
    """

    def checked(job: VideoJob, features: torch.Tensor, frames: int) -> None:
        if torch.isfinite(features).all():
            on_features(job, features, frames)
        else:
            on_failure(job, NOT_FINITE, frames)

    batcher = _Batcher(backbone, normalize, patches, options, device, precision, checked)
    for job, frames, error in _decoded(jobs, options.workers, options.decode_time_limit_s):
        if error is not None:
            on_failure(job, error, batcher.frames)
        else:
            assert frames is not None  # a video without an error carries decode_job's frames
            batcher.add(job, frames)
    batcher.flush()


def extract(
    dataset: str,
    manifest: pd.DataFrame,
    backbone: Backbone,
    cache_root: Path,
    settings: ExtractSettings = ExtractSettings(),
    options: RunOptions = RunOptions(),
    *,
    videos_root: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> ExtractResult:
    """Extract every video of `manifest` that the cache for these settings does not hold yet; resumable.

    The cache is `cache_root/dataset/<recipe key>`; the manifest becomes its current selection, and
    only its videos (id and file) not stored yet are extracted. manifest: columns video_id, class,
    split, path (relative ones are under `videos_root`), optionally n_frames (-1 = count) and status
    (rows not "ok" are recorded as failures). Under an initialised torch.distributed group each rank
    does its share; call it on every rank.
    """
    device = distributed.resolve_device(options.device)
    precision = distributed.resolve_precision(options.precision, device)
    fp = fingerprint(dataset, manifest, recipe(backbone, settings, precision))
    path = cache_path(cache_root, dataset, fp)
    layouts = video_layouts(manifest, settings.views, videos_root)
    # One writer per cache (and rank): a second extraction is refused, naming this one.
    writer = _open_writer(path, fp, layouts, (backbone.dim, settings.patches, settings.views), device)
    writer.durable = options.durable
    try:
        return _extract_into(writer, manifest, backbone, settings, options, videos_root, progress, device, precision)
    finally:
        writer.release()


def _extract_into(
    writer: CacheWriter,
    manifest: pd.DataFrame,
    backbone: Backbone,
    settings: ExtractSettings,
    options: RunOptions,
    videos_root: Path | None,
    progress: Callable[[Progress], None] | None,
    device: torch.device,
    precision: str,
) -> ExtractResult:
    """extract()'s work once this process holds the cache."""
    rank, world = distributed.rank_world()
    todo, bad, already = _jobs(manifest, writer, settings, videos_root, rank, world)
    state = Progress(total=len(todo) + len(bad), already_done=already)
    failures: list[tuple[str, str]] = []

    def report(job: VideoJob, frames: int, error: str | None = None) -> None:
        if error is None:
            state.done += 1
        else:
            if job.index >= 0:  # a slot; a row with nothing to extract has its reason in the selection
                writer.fail_slot(job.index, error)
            failures.append((job.video_id, error))
            state.failed += 1
        state.frames = frames
        if progress is not None:
            progress(state)

    for job, reason in bad:
        report(job, 0, reason)

    def write(job: VideoJob, features: torch.Tensor, frames: int) -> None:
        writer.write_slot(job.index, features.numpy())
        report(job, frames)

    run_jobs(
        todo,
        backbone.place(device).eval(),
        normalize=settings.normalize,
        patches=settings.patches,
        options=options,
        device=device,
        precision=precision,
        on_features=write,
        on_failure=lambda job, error, frames: report(job, frames, error),
    )
    distributed.barrier(device)
    return ExtractResult(path=writer.path, progress=state, failures=failures)
