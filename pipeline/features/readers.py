"""Reading a cached split: whole in RAM or resident on a device (SplitFeatures), or streamed from
disk one chunk a video (StreamedSplit); `choose_loading` decides which from the split's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.features.cache import FeatureCache

LOADINGS = ("auto", "ram", "device", "stream")


class CacheError(RuntimeError):
    """A cache that is missing, malformed, or built with other settings than asked."""


class CacheBusy(CacheError):
    """Another process is writing the cache; the message names it."""


@dataclass
class SplitFeatures:
    """A split's done videos in memory (host RAM or a GPU), as training and evaluation use them.

    loading "pinned": the features stay in (pageable) host RAM and every `read` gathers into pinned
    memory, so the copy of a task to the GPU runs without blocking. Pinning the gathered task, not
    the split, keeps a split that fills half the RAM from being copied once more to be pinned.
    """

    features: torch.Tensor  # [N, V, L, P*P, D] float16
    labels: torch.Tensor  # [N] int64, 0..C-1
    class_names: list[str]
    video_ids: list[str]
    loading: str = "ram"  # ram | pinned | device: how `FeatureCache.split` placed it

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def read(self, videos: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """[n, L, P*P, D] float16: view views[k] of video videos[k] (indices among the split's videos).

        Pinned reads get a fresh block of torch's pinned-memory pool each time: the pool hands a block
        out again only after the copies that read it have finished, so a read ahead never overwrites
        a task still in flight to the GPU.
        """
        flat = self.features.flatten(0, 1)  # [N * V, L, P*P, D], a view of contiguous features
        rows = torch.as_tensor(
            np.asarray(videos) * self.views + np.asarray(views), dtype=torch.int64, device=flat.device
        )
        out = None
        if self.loading == "pinned":
            out = torch.empty((len(rows),) + tuple(flat.shape[1:]), dtype=flat.dtype, pin_memory=True)
        return torch.index_select(flat, 0, rows, out=out)

    def block(self, videos: np.ndarray, views: int | None = None) -> torch.Tensor:
        """[n, V', L, P*P, D]: the first `views` views (default all) of the given videos."""
        return self.features[torch.as_tensor(videos, device=self.features.device), :views]


class StreamedSplit:
    """A split read from the Zarr cache on demand: labels in RAM, features one chunk (video) at a time."""

    loading = "stream"

    def __init__(self, cache: FeatureCache, split: str, views: int | None = None) -> None:
        done = np.flatnonzero(cache.done(split))
        self.rows = cache.slots(split)[done]  # rows of the store's array: one chunk a video
        self.array = cache.features_array(split)
        self.labels = torch.from_numpy(cache.labels(split)[done].astype(np.int64))
        self.class_names = cache.class_names(split)
        ids = cache.video_ids(split)
        self.video_ids = [ids[i] for i in done]
        self.stored_views = cache.views(split)
        self.views = self.stored_views if views is None else min(views, self.stored_views)  # as load_split keeps

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """The done videos' float16 features, every view of the split (what `FeatureCache.split_nbytes` counts)."""
        return len(self.rows) * self.stored_views * int(np.prod(self.array.shape[2:])) * 2

    def read(self, videos: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """[n, L, P*P, D] float16 for videos (indices among done videos) and their views."""
        rows = self.rows[np.asarray(videos)]
        views = np.asarray(views)
        order = np.argsort(rows, kind="stable")
        chunks = cast(np.ndarray, self.array.oindex[rows[order]])  # one chunk per video, read concurrently by Zarr
        out = np.empty((len(rows),) + chunks.shape[2:], dtype=np.float16)
        out[order] = chunks[np.arange(len(rows)), views[order]]
        return torch.from_numpy(out)

    def block(self, videos: np.ndarray, views: int | None = None) -> torch.Tensor:
        """[n, V', L, P*P, D]: the first `views` views (default all) of the given videos."""
        chunks = cast(np.ndarray, self.array.oindex[self.rows[np.asarray(videos)]])
        return torch.from_numpy(chunks[:, : self.stored_views if views is None else min(views, self.stored_views)])


SplitReader = SplitFeatures | StreamedSplit


def choose_loading(nbytes: int, loading: str, device: torch.device | None = None) -> str:
    """ram, device or stream for a split of `nbytes` (float16 features) used on `device`.

    auto: on CUDA, resident on the GPU when the split takes at most half its free memory (and the host
    can hold it on the way); else in RAM when it takes at most half the available memory; else
    streamed from disk. On CUDA "ram"
    becomes "pinned": each task is gathered into pinned memory, so its copy to the GPU does not block.
    """
    if loading not in LOADINGS:
        raise CacheError(f"loading {loading!r}: expected one of {', '.join(LOADINGS)}")
    cuda = device is not None and device.type == "cuda"
    if loading == "device" and not cuda:
        raise CacheError("loading 'device' keeps a split on the GPU: it needs --device cuda")
    if loading != "auto":
        return loading
    available = available_ram()
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= 0.5 * free and (available == 0 or nbytes < 0.8 * available):  # it passes through RAM once
            return "device"
    return "ram" if available == 0 or nbytes < 0.5 * available else "stream"


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of memory the kernel can give without swapping (MemAvailable: free plus reclaimable page
    cache, which extraction fills); 0 when unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def channel_stats(
    split: SplitReader, views: int | None = None, max_videos: int = 2048, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the frames and patches of the first `views` views (float64 sums).

    At most `max_videos` evenly spaced videos are read: plenty for D means and stds, and it keeps a
    streamed split (SSv2 at D=2048 is ~140 GB) from being read once just for its statistics. Every
    loading reads the same videos, so the loading never changes the numbers.
    """
    n = len(split)
    if n == 0:
        raise CacheError("the split has no extracted videos")
    picks = np.unique(np.linspace(0, n - 1, min(n, max_videos)).round().astype(np.int64))
    total = squares = None
    count = 0
    for start in range(0, len(picks), block):
        x = split.block(picks[start : start + block], views)
        x = x.reshape(-1, x.shape[-1]).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        count += x.shape[0]
    assert total is not None and squares is not None  # n > 0: at least one block was read
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float().cpu(), std.float().cpu()
