"""Decoded clips for end-to-end training: a split's videos from the manifest, a task's frames decoded in
DataLoader workers (the test view or training views drawn from the task seed), and view-0 clips
encoded through the backbone for validation.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.episodes import EpisodeSampler, Task
from pipeline.data.video import (
    FRAMES,
    VideoError,
    ViewSpec,
    count_frames,
    load_view,
)
from pipeline.features.layouts import split_layouts
from pipeline.features.readers import SplitFeatures
from pipeline.training.config import TrainError

if TYPE_CHECKING:
    from pipeline.training.finetune import EndToEnd, FinetuneConfig

VIEW_DRAWS = 2**31 - 1  # training views are 1..VIEW_DRAWS: in effect a fresh augmentation per use
# What to do about a video that cannot be decoded: a resumed run must see the videos it started with.
NEW_RUN = "mark the video bad in the manifest and start again in a new run folder; a run cannot resume on other videos"


class FinetuneError(TrainError):
    """Options, checkpoint, manifest and videos that do not fit together; the message names what."""


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
        """uint8 [8, 3, crop, crop]: view 0 the test view, views >= 1 training views (pipeline.data.video.load_view)."""
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
    return SplitVideos(
        [layout.video_ids[k] for k in keep],
        paths,
        n_frames[keep].astype(np.int64),
        np.asarray(layout.labels, dtype=np.int64)[keep],
        layout.class_names,
    )


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # the worker processes are the parallelism


class TaskClips(Dataset):
    """Item k: the frames of task indices[k], uint8 [n_s + n_q, 8, 3, crop, crop] (support first).

    A video that cannot be decoded gives {"error": reason}, not an exception: the training loop
    stops with that reason instead of a worker's traceback.
    """

    def __init__(
        self, videos: SplitVideos, sampler: EpisodeSampler, indices: list[int], seed: int, spec: ViewSpec
    ) -> None:
        self.videos, self.sampler, self.indices, self.seed, self.spec = videos, sampler, indices, seed, spec

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        index = self.indices[k]
        task = self.sampler.task(index)
        query, _, query_views = task.open_queries()  # the known queries, then any unknown ones
        rows = np.concatenate([task.support, query])
        views = 1 + np.concatenate([task.support_views, query_views])  # training views only
        try:
            frames = torch.stack(
                [self.videos.load(int(r), int(v), self.seed, self.spec) for r, v in zip(rows, views, strict=False)]
            )
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
    extra: dict[str, Any] = (
        dict(prefetch_factor=2, multiprocessing_context="forkserver", worker_init_fn=_one_thread) if workers else {}
    )
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **extra)


def encode_videos(
    model: EndToEnd,
    videos: SplitVideos,
    spec: ViewSpec,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    workers: int,
) -> SplitFeatures:
    """View 0 of every video through the current backbone, stored as a cache would (float16 patches)."""
    model.eval()
    parts = []
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        for item in _loader(ViewZeroClips(videos, spec), workers, device.type == "cuda"):
            if item["error"] is not None:
                raise FinetuneError(f"validation video: {item['error']} ({NEW_RUN})")
            frames = item["frames"].to(device, non_blocking=True)
            parts.append(model.features(frames, torch.float16)[:, None].cpu())
    return SplitFeatures(torch.cat(parts), torch.from_numpy(videos.labels), videos.class_names, videos.video_ids)


@dataclass
class DecodedClips:
    """The task source of finetune: each task's clips decoded by worker processes, in task order."""

    sampler: EpisodeSampler
    videos: SplitVideos
    val_videos: SplitVideos
    model: EndToEnd
    config: FinetuneConfig
    amp: torch.dtype | None
    pin: bool  # pinned host memory for the copies to a GPU

    def inputs(self, indices: list[int]) -> Generator[tuple[int, Task, torch.Tensor], None, None]:
        config = self.config
        clips = TaskClips(self.videos, self.sampler, indices, config.seed, config.spec)
        for batch in _loader(clips, config.workers, self.pin):
            i = int(batch["index"])
            if batch["error"] is not None:
                raise FinetuneError(f"task {i}: {batch['error']} ({NEW_RUN})")
            yield i, self.sampler.task(i), batch["frames"]

    def validation_split(self, device: torch.device) -> SplitFeatures:
        return encode_videos(
            self.model, self.val_videos, self.config.spec, device=device, dtype=self.amp, workers=self.config.workers
        )
