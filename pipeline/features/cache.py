"""The Zarr feature cache: the one place that decides its schema, fingerprint, writes and reads.

Layout of a cache at `<root>/<dataset>/<key>/` (a Zarr v3 group):

    zarr.json            attributes: schema, fingerprint (readable), key, frames, patches, dim, versions
    <split>/             one group per split (train, val, test); attributes: video_ids, class_names, views
        features         [N, V, L, P*P, D] float16, one chunk per video
        labels           [N] int64, class index into the split's class_names
        done             [N] bool, one chunk per video; set only after the video's features are written
        failure          [N] str, one chunk per video; the reason a video could not be extracted

Why one chunk per video: a chunk is then owned by exactly one writer (Zarr loses data silently
when two processes write one chunk or shard), a crash loses at most the videos in flight, and a
rerun skips what is done. Zarr's local store writes each chunk atomically (temp file + rename).

The feature recipe (pipeline/features/recipe.py) decides what the features mean; its fingerprint
names the cache (`cache_key`) and is checked whenever a cache is opened for writing.

Reading belongs here too: `FeatureCache.split` gives one reader whatever the loading (in RAM,
resident on a GPU, or streamed from disk one chunk a video; pipeline/features/readers.py), decided by
`choose_loading`. Writing: one writer per cache (and rank), each chunk fsynced before its flag.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

import numpy as np
import torch
import zarr

from pipeline.features.readers import (
    CacheBusy,
    CacheError,
    SplitFeatures,
    SplitReader,
    StreamedSplit,
    choose_loading,
)
from pipeline.features.recipe import STORED_DTYPE, FeatureRecipe, cache_key, fingerprint_diff
from pipeline.runtime.files import sync_dir, sync_file

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
CacheMode: TypeAlias = Literal["r", "r+"]  # read, or read and write; zarr's "a"/"w" would clobber a cache


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """A split's member array; zarr types a group's members as arrays or groups."""
    return cast(zarr.Array, group[name])


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("torch", "zarr", "numpy")}


@dataclass(frozen=True)
class SplitLayout:
    """What a split of a new cache holds: its videos in order, their labels and the views each gets."""

    video_ids: list[str]
    labels: list[int]
    class_names: list[str]
    views: int


class FeatureCache:
    """Read access to a cache; `CacheWriter` adds the writes."""

    def __init__(self, path: Path | str, mode: CacheMode = "r") -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CacheError(f"{self.path}: not a feature cache (no zarr.json); build one with `strm extract`")
        self.root = zarr.open_group(str(self.path), mode=mode)
        attrs = self.root.attrs.asdict()
        if attrs.get("schema") != SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: cache schema {attrs.get('schema')!r}, this strm reads schema {SCHEMA_VERSION}"
            )
        self.attrs: dict[str, Any] = attrs

    @property
    def fingerprint(self) -> dict:
        return dict(self.attrs["fingerprint"])

    @property
    def recipe(self) -> FeatureRecipe | None:
        """How these features were made (None for caches not extracted from videos)."""
        return FeatureRecipe.from_fingerprint(self.fingerprint)

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def frames(self) -> int:
        return int(self.attrs["frames"])

    @property
    def patches(self) -> int:
        return int(self.attrs["patches"])

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.root]

    def _split(self, split: str) -> zarr.Group:
        if split not in self.root:
            raise CacheError(f"{self.path}: no split {split!r} (has {', '.join(self.splits) or 'none'})")
        return cast(zarr.Group, self.root[split])  # a cache's splits are groups

    def views(self, split: str) -> int:
        return int(cast(int, self._split(split).attrs["views"]))

    def video_ids(self, split: str) -> list[str]:
        return list(cast("list[str]", self._split(split).attrs["video_ids"]))

    def class_names(self, split: str) -> list[str]:
        return list(cast("list[str]", self._split(split).attrs["class_names"]))

    def labels(self, split: str) -> np.ndarray:
        return cast(np.ndarray, _array(self._split(split), "labels")[:])

    def done(self, split: str) -> np.ndarray:
        return cast(np.ndarray, _array(self._split(split), "done")[:])

    def features_array(self, split: str) -> zarr.Array:
        """The on-disk array, for readers that stream chunks instead of loading a split."""
        return _array(self._split(split), "features")

    def failures(self, split: str) -> list[tuple[str, str]]:
        """(video_id, reason) for every video whose extraction failed and is not done."""
        reasons = cast(np.ndarray, _array(self._split(split), "failure")[:])
        ids = self.video_ids(split)
        return [(ids[i], str(r)) for i, r in enumerate(reasons) if r]

    def split_nbytes(self, split: str, views: int | None = None) -> int:
        """Bytes a split's done videos take in RAM as float16 (with `views` views, default all)."""
        n = int(self.done(split).sum())
        v = self.views(split) if views is None else min(views, self.views(split))
        return n * v * self.frames * self.patches * self.dim * 2

    def load_split(self, split: str, views: int | None = None) -> SplitFeatures:
        """Load a split's done videos into RAM (optionally only the first `views` views)."""
        done = np.flatnonzero(self.done(split))
        v = self.views(split) if views is None else min(views, self.views(split))
        array = self.features_array(split)
        features = np.empty((len(done), v) + tuple(array.shape[2:]), dtype=np.float16)
        # Contiguous runs of done videos are read in one call: chunk-aligned and far fewer calls.
        breaks = np.flatnonzero(np.diff(done) != 1) + 1
        start = 0
        for run in np.split(done, breaks):
            if len(run):
                features[start : start + len(run)] = array[run[0] : run[-1] + 1, :v]
                start += len(run)
        ids = self.video_ids(split)
        return SplitFeatures(
            features=torch.from_numpy(features),
            labels=torch.from_numpy(self.labels(split)[done].astype(np.int64)),
            class_names=self.class_names(split),
            video_ids=[ids[i] for i in done],
        )

    def split(
        self, split: str, *, views: int | None = None, loading: str = "ram", device: torch.device | None = None
    ) -> SplitReader:
        """A split's done videos, placed by `choose_loading` (ram, pinned, device or streamed)."""
        chosen = choose_loading(self.split_nbytes(split, views), loading, device)
        if chosen == "stream":
            return StreamedSplit(self, split, views)
        data = self.load_split(split, views=views)
        if chosen == "device":
            data.features, data.loading = data.features.to(device), "device"
        elif device is not None and device.type == "cuda":
            data.loading = "pinned"  # in RAM; each task is gathered into pinned memory (SplitFeatures.read)
        return data

    def summary(self) -> dict:
        """What the cache holds, for `strm cache info`."""
        splits = {}
        for split in self.splits:
            done = self.done(split)
            failures = self.failures(split)
            splits[split] = {
                "videos": int(len(done)),
                "done": int(done.sum()),
                "failed": len(failures),
                "pending": int(len(done) - done.sum() - len(failures)),
                "views": self.views(split),
                "classes": len(self.class_names(split)),
                "failures": [{"video_id": v, "reason": r} for v, r in failures],
            }
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "path": str(self.path),
            "key": self.key,
            "shape": {"frames": self.frames, "patches": self.patches, "dim": self.dim, "dtype": STORED_DTYPE},
            "fingerprint": self.fingerprint,
            "versions": self.attrs.get("versions", {}),
            "splits": splits,
            "bytes_on_disk": size,
        }


def open_cache(path: Path | str) -> FeatureCache:
    """Open an existing cache for reading."""
    return FeatureCache(path, mode="r")


class CacheWriter(FeatureCache):
    """Writes one video's features at a time; one process must own each video it writes.

    `durable`: each video's chunk is on the disk (fsync) before its `done` flag is written, and the
    flag before the next video, so after a power loss a done video's features are there too.
    """

    def __init__(self, path: Path | str, durable: bool = True) -> None:
        super().__init__(path, mode="r+")
        self.durable = durable
        self._lock: int | None = None

    def lock_path(self, rank: int) -> Path:
        """Beside the Zarr group (a file inside it would be read as a broken member)."""
        return self.path.parent / f".{self.path.name}.writer{rank}.lock"

    def hold(self, rank: int = 0) -> None:
        """Become this rank's one writer of the cache, or raise CacheBusy naming the process that is.

        An flock: the kernel drops it when its holder ends in any way (kill -9 included), so a killed
        extraction never leaves the cache locked. torchrun ranks hold one lock each and write
        disjoint videos.
        """
        import fcntl
        import os
        import socket

        fd = os.open(self.lock_path(rank), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CacheBusy(
                f"{self.path}: another extraction is writing this cache ({holder}); "
                "wait for it to end (or stop it), then run the same command again: it resumes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, rank {rank}".encode(), 0)
        self._lock = fd

    def release(self) -> None:
        """Give the writer lock back (closing the file drops the flock)."""
        import os

        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _sync_chunk(self, array: zarr.Array, index: int) -> None:
        if self.durable:
            key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
            chunk = self.path / array.path / key
            sync_file(chunk)
            sync_dir(chunk.parent)

    @classmethod
    def create(
        cls,
        path: Path | str,
        fingerprint: dict,
        layouts: dict[str, SplitLayout],
        *,
        frames: int,
        patches: int,
        dim: int,
    ) -> CacheWriter:
        """Create the cache, or reopen it when one with the same fingerprint is already there.

        An existing cache built with other settings is an error naming the difference, never a
        silent mix. Only one process should call this (rank 0); others open with `CacheWriter(path)`.
        """
        path = Path(path)
        if (path / "zarr.json").exists():
            writer = cls(path)
            diff = fingerprint_diff(fingerprint, writer.fingerprint)
            if diff:
                raise CacheError(f"{path}: built with other settings: " + "; ".join(diff))
            return writer
        tmp = path.with_name(path.name + ".creating")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w")
        for split, layout in layouts.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            n = len(layout.video_ids)
            group = root.create_group(split)
            group.attrs.update(
                {"video_ids": list(layout.video_ids), "class_names": list(layout.class_names), "views": layout.views}
            )
            group.create_array(
                "features",
                shape=(n, layout.views, frames, patches, dim),
                chunks=(1, layout.views, frames, patches, dim),
                dtype=STORED_DTYPE,
                fill_value=0,
            )
            labels = group.create_array("labels", shape=(n,), chunks=(max(n, 1),), dtype="int64", fill_value=-1)
            if n:
                labels[:] = np.asarray(layout.labels, dtype=np.int64)
            group.create_array("done", shape=(n,), chunks=(1,), dtype=bool, fill_value=False)
            group.create_array("failure", shape=(n,), chunks=(1,), dtype=str)
        # Root attributes last, then an atomic rename: a half-created cache is never mistaken for one.
        root.attrs.update(
            {
                "schema": SCHEMA_VERSION,
                "fingerprint": fingerprint,
                "key": cache_key(fingerprint),
                "frames": frames,
                "patches": patches,
                "dim": dim,
                "versions": _versions(),
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
        return cls(path)

    def pending(self, split: str) -> np.ndarray:
        """Indices of the videos not yet done (failed ones are tried again)."""
        return np.flatnonzero(~self.done(split))

    def write(self, split: str, index: int, features: np.ndarray | torch.Tensor) -> None:
        """Store one video's [V, L, P*P, D] features, then mark it done (in that order)."""
        group = self._split(split)
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        expected = tuple(_array(group, "features").shape[1:])
        if tuple(features.shape) != expected:
            raise ValueError(
                f"features of {split}[{index}] have shape {tuple(features.shape)}, cache expects {expected}"
            )
        _array(group, "features")[index] = features.astype(np.float16, copy=False)  # finite: run_jobs checked
        self._sync_chunk(_array(group, "features"), index)
        _array(group, "failure")[index] = ""
        _array(group, "done")[index] = True
        self._sync_chunk(_array(group, "done"), index)

    def mark_all_done(self, split: str) -> None:
        """Every video of the split done, after its whole features array was written at once."""
        _array(self._split(split), "done")[:] = True

    def fail(self, split: str, index: int, reason: str) -> None:
        """Record why a video could not be extracted; it stays not-done."""
        _array(self._split(split), "failure")[index] = reason.replace("\n", " ")[:500]
