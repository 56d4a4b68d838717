"""The Zarr feature cache: the one place that decides its schema, keys, writes and reads.

A cache is a store of videos keyed by the feature recipe, and a selection of them made by a manifest.
Layout of a cache at `<root>/<dataset>/<key>/` (a Zarr v3 group; key = `store_key`, the recipe's hash):

    zarr.json             attributes: schema, fingerprint (the recipe, readable), key, frames, patches,
                          dim, views, versions, selection (the current one), updated (its date)
    videos/               every video ever extracted with this recipe; attribute ids: [video_id, file] a slot
        features          [S, V, L, P*P, D] float16, one chunk per slot (video)
        views_done        [S] uint8, one chunk per slot: views stored, set only after they are written
        failure           [S] str, one chunk per slot: why the video could not be extracted
    selections/<sel>/     what one manifest selects: attributes fingerprint (dataset, manifest, videos)
        <split>/          attributes video_ids, class_names, views, reasons; arrays labels, slots [N]

Why: a video's features depend on the recipe and its file, not on which manifest or split lists it. A
slot is a video id (it seeds the augmented views) plus its file's identity (size and mtime), so adding
clips to a manifest extracts only them, removing one leaves the others, and a changed file is a new
slot. A manifest's selection maps each of its rows to a slot (-1: nothing to extract, with the reason).
Why one chunk per slot: a chunk then has exactly one writer (Zarr loses data silently when two
processes write one chunk), a crash loses at most the videos in flight, and a rerun skips what is done.

Reading: `FeatureCache.split` gives one reader whatever the loading (pipeline/features/readers.py).
Writing: one writer per cache (and rank), an flock beside it; each chunk fsynced before its flag.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

import numpy as np
import torch
import zarr

from pipeline.data.protocol import SPLITS
from pipeline.features.inventory import cache_folder
from pipeline.features.lock import WriterLock
from pipeline.features.readers import (
    CacheError,
    SplitFeatures,
    SplitReader,
    StreamedSplit,
    choose_loading,
)
from pipeline.features.recipe import STORED_DTYPE, FeatureRecipe, cache_key, fingerprint_diff, split_fingerprint
from pipeline.runtime.files import sync_dir, sync_file

SCHEMA_VERSION = 2
CacheMode: TypeAlias = Literal["r", "r+"]  # read, or read and write; zarr's "a"/"w" would clobber a cache
OLD_SCHEMA = (
    "a cache of schema 1, keyed by its manifest (every added clip re-extracted it all); this strm keys a cache "
    "by the feature recipe and extracts only new videos: run the same `strm extract` again (it writes a new "
    "cache beside this one), then remove this folder"
)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """A group's member array; zarr types a group's members as arrays or groups."""
    return cast(zarr.Array, group[name])


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("torch", "zarr", "numpy")}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SplitLayout:
    """What a manifest's split selects: its videos in order, their labels and the views each gets.

    `files`: per video what identifies its file (size and mtime), or None when there is nothing to
    extract (its reason in `reasons`, by video id); left out, a video is its id alone (random caches).
    """

    video_ids: list[str]
    labels: list[int]
    class_names: list[str]
    views: int
    files: list[str | None] | None = None
    reasons: dict[str, str] = field(default_factory=dict)


class FeatureCache:
    """Read access to a cache (its current selection); `CacheWriter` adds the writes."""

    def __init__(self, path: Path | str, mode: CacheMode = "r") -> None:
        self.path = cache_folder(Path(path))
        self.root = zarr.open_group(str(self.path), mode=mode)
        attrs = self.root.attrs.asdict()
        if attrs.get("schema") == 1:
            raise CacheError(f"{self.path}: {OLD_SCHEMA}")
        if attrs.get("schema") != SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: cache schema {attrs.get('schema')!r}, this strm reads schema {SCHEMA_VERSION}"
            )
        self.attrs: dict[str, Any] = attrs
        self.videos = cast(zarr.Group, self.root["videos"])

    def _selection(self) -> zarr.Group | None:
        name = self.attrs.get("selection")
        return None if name is None else cast(zarr.Group, self.root[f"selections/{name}"])

    @property
    def fingerprint(self) -> dict:
        """The manifest's part (dataset, manifest, videos) and the recipe's: what these features are."""
        selection = self._selection()
        chosen = dict(cast(dict, selection.attrs["fingerprint"])) if selection is not None else {}
        return {**chosen, **self.attrs["fingerprint"]}

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
        selection = self._selection()
        return [] if selection is None else [s for s in SPLITS if s in selection]

    def _split(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise CacheError(f"{self.path}: no split {split!r} (has {', '.join(self.splits) or 'none'})")
        return cast(zarr.Group, cast(zarr.Group, self._selection())[split])

    def views(self, split: str) -> int:
        return int(cast(int, self._split(split).attrs["views"]))

    def video_ids(self, split: str) -> list[str]:
        return list(cast("list[str]", self._split(split).attrs["video_ids"]))

    def class_names(self, split: str) -> list[str]:
        return list(cast("list[str]", self._split(split).attrs["class_names"]))

    def labels(self, split: str) -> np.ndarray:
        return cast(np.ndarray, _array(self._split(split), "labels")[:])

    def slots(self, split: str) -> np.ndarray:
        """Each video's slot in the store (its row of `features_array`); -1 for one with nothing to extract."""
        return cast(np.ndarray, _array(self._split(split), "slots")[:]).astype(np.int64)

    def views_done(self, slots: np.ndarray | list[int]) -> np.ndarray:
        """Views stored for each of `slots` (0: not done); reads only their chunks."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return np.zeros(0, np.int64)
        return cast(np.ndarray, _array(self.videos, "views_done").get_orthogonal_selection(slots)).astype(np.int64)

    def done(self, split: str) -> np.ndarray:
        """Per video of the split: are its views stored."""
        slots = self.slots(split)
        done = np.zeros(len(slots), dtype=bool)
        has = slots >= 0
        done[has] = self.views_done(slots[has]) >= self.views(split)
        return done

    def features_array(self, split: str) -> zarr.Array:
        """The on-disk array the split's videos are rows of (`slots`), for readers that stream chunks."""
        self._split(split)
        return _array(self.videos, "features")

    def failures(self, split: str) -> list[tuple[str, str]]:
        """(video_id, reason) for every video that is not done and failed (or had nothing to extract)."""
        ids, slots, done = self.video_ids(split), self.slots(split), self.done(split)
        reasons = dict(cast(dict, self._split(split).attrs.get("reasons", {})))
        tried = np.flatnonzero(~done & (slots >= 0))
        if len(tried):
            found = cast(np.ndarray, _array(self.videos, "failure").get_orthogonal_selection(slots[tried]))
            reasons.update({ids[i]: str(r) for i, r in zip(tried, found, strict=True) if r})
        return [(v, reasons[v]) for v in ids if v in reasons]

    def split_nbytes(self, split: str, views: int | None = None) -> int:
        """Bytes a split's done videos take in RAM as float16 (with `views` views, default all)."""
        n = int(self.done(split).sum())
        v = self.views(split) if views is None else min(views, self.views(split))
        return n * v * self.frames * self.patches * self.dim * 2

    def load_split(self, split: str, views: int | None = None) -> SplitFeatures:
        """Load a split's done videos into RAM (optionally only the first `views` views)."""
        done = np.flatnonzero(self.done(split))
        slots = self.slots(split)[done]
        v = self.views(split) if views is None else min(views, self.views(split))
        array = self.features_array(split)
        features = np.empty((len(done), v) + tuple(array.shape[2:]), dtype=np.float16)
        # Runs of consecutive slots are read in one call: chunk-aligned and far fewer calls.
        start = 0
        for run in np.split(slots, np.flatnonzero(np.diff(slots) != 1) + 1):
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
        """What the cache holds, for `strm cache info` and `strm info`."""
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
        stored = cast(np.ndarray, _array(self.videos, "views_done")[:])
        selected = {int(s) for split in self.splits for s in self.slots(split) if s >= 0}
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "path": str(self.path),
            "key": self.key,
            "updated": self.attrs.get("updated"),
            "shape": {"frames": self.frames, "patches": self.patches, "dim": self.dim, "dtype": STORED_DTYPE},
            "fingerprint": self.fingerprint,
            "versions": self.attrs.get("versions", {}),
            "store": {
                "videos": int((stored > 0).sum()),
                "not_in_this_manifest": len(set(np.flatnonzero(stored)) - selected),
            },
            "splits": splits,
            "bytes_on_disk": size,
        }


def open_cache(path: Path | str) -> FeatureCache:
    """Open an existing cache for reading (a dataset's folder holding one cache opens that one)."""
    return FeatureCache(path, mode="r")


class CacheWriter(FeatureCache):
    """Writes one video's features at a time; one process must own each video it writes.

    `durable`: each video's chunk is on the disk (fsync) before its `views_done` flag is written, and
    the flag before the next video, so after a power loss a done video's features are there too.
    """

    def __init__(self, path: Path | str, durable: bool = True) -> None:
        super().__init__(path, mode="r+")
        self.durable = durable
        self.lock: WriterLock | None = None

    def hold(self, rank: int = 0) -> None:
        """Become this rank's one writer of the cache, or raise CacheBusy naming the process that is."""
        self.lock = WriterLock(self.path, rank).acquire()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        views: int | None = None,
    ) -> CacheWriter:
        """Select `layouts` in the store for this fingerprint's recipe, creating it when absent.

        A store of another recipe is an error naming the difference, never a silent mix. `views`: a
        video's most views (default the layouts' most). The caller is the one writer (`WriterLock`).
        """
        path = Path(path)
        recipe, selection = split_fingerprint(fingerprint)
        if (path / "zarr.json").exists():
            writer = cls(path)
            diff = fingerprint_diff(recipe, writer.attrs["fingerprint"])
            if diff:
                raise CacheError(f"{path}: built with other settings: " + "; ".join(diff))
            writer.select(selection, layouts)
            return writer
        most = views if views is not None else max((layout.views for layout in layouts.values()), default=1)
        tmp = path.with_name(path.name + ".creating")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w")
        videos = root.create_group("videos")
        videos.attrs["ids"] = []
        shape = (most, frames, patches, dim)
        videos.create_array("features", shape=(0, *shape), chunks=(1, *shape), dtype=STORED_DTYPE, fill_value=0)
        videos.create_array("views_done", shape=(0,), chunks=(1,), dtype="uint8", fill_value=0)
        videos.create_array("failure", shape=(0,), chunks=(1,), dtype=str)
        root.create_group("selections")
        root.attrs.update(
            {
                "schema": SCHEMA_VERSION,
                "fingerprint": recipe,
                "key": cache_key(recipe),
                "frames": frames,
                "patches": patches,
                "dim": dim,
                "views": most,
                "versions": _versions(),
            }
        )
        cls(tmp).select(selection, layouts)  # the first selection before the rename: a cache always has one
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
        return cls(path)

    def _register(self, layouts: dict[str, SplitLayout]) -> dict[str, list[int]]:
        """Each layout video's slot, new videos appended to the store: arrays grown first, then the ids,
        so a crash between the two leaves unused room, never an id without its row."""
        ids = [tuple(pair) for pair in cast(list, self.videos.attrs["ids"])]
        known = {pair: slot for slot, pair in enumerate(ids)}
        slots: dict[str, list[int]] = {}
        for split, layout in layouts.items():
            files = layout.files if layout.files is not None else [""] * len(layout.video_ids)
            slots[split] = []
            for video_id, file in zip(layout.video_ids, files, strict=True):
                if file is None:
                    slots[split].append(-1)
                    continue
                if (video_id, file) not in known:
                    known[(video_id, file)] = len(ids)
                    ids.append((video_id, file))
                slots[split].append(known[(video_id, file)])
        if len(ids) != len(self.videos.attrs["ids"]):  # type: ignore[arg-type]
            for name in ("features", "views_done", "failure"):
                array = _array(self.videos, name)
                array.resize((len(ids), *array.shape[1:]))
            self.videos.attrs["ids"] = [list(pair) for pair in ids]
            if self.durable:
                sync_file(self.path / "videos" / "zarr.json")
        return slots

    def select(self, selection: dict, layouts: dict[str, SplitLayout]) -> str:
        """Make what a manifest selects the cache's current selection (registering its new videos); its key."""
        for split, layout in layouts.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            if layout.views > int(self.attrs["views"]):
                raise ValueError(f"split {split} wants {layout.views} views, the cache holds {self.attrs['views']}")
        slots = self._register(layouts)
        # Keyed without the rows' order: a reordered manifest finds its selection, whose order it keeps.
        record = {
            s: [
                sorted(zip(lay.video_ids, lay.labels, slots[s], strict=True)),
                sorted(lay.reasons.items()),
                lay.class_names,
                lay.views,
            ]
            for s, lay in layouts.items()
        }
        name = cache_key({"fingerprint": selection, "splits": record})
        if f"selections/{name}" not in self.root:
            self._write_selection(name, selection, layouts, slots)
        self.root.attrs.update({"selection": name, "updated": _now()})
        if self.durable:
            sync_file(self.path / "zarr.json")
        self.attrs = self.root.attrs.asdict()
        return name

    def _write_selection(
        self, name: str, selection: dict, layouts: dict[str, SplitLayout], slots: dict[str, list[int]]
    ) -> None:
        """Written beside the store and renamed into it: a selection on disk is always whole."""
        tmp = self.path / f".{name}.creating"
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(str(tmp), mode="w")
        group.attrs.update({"fingerprint": selection, "created": _now()})
        for split, layout in layouts.items():
            n = len(layout.video_ids)
            member = group.create_group(split)
            member.attrs.update(
                {
                    "video_ids": list(layout.video_ids),
                    "class_names": list(layout.class_names),
                    "views": layout.views,
                    "reasons": dict(layout.reasons),
                }
            )
            for array_name, values in (("labels", layout.labels), ("slots", slots[split])):
                array = member.create_array(array_name, shape=(n,), chunks=(max(n, 1),), dtype="int64", fill_value=-1)
                if n:
                    array[:] = np.asarray(values, dtype=np.int64)
        tmp.rename(self.path / "selections" / name)
        if self.durable:
            sync_dir(self.path / "selections")

    def write_slot(self, slot: int, features: np.ndarray | torch.Tensor) -> None:
        """Store one video's [V', L, P*P, D] features (its first V' views), then its flag (in that order)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        array = _array(self.videos, "features")
        expected = tuple(array.shape[2:])
        if tuple(features.shape[1:]) != expected or not 1 <= len(features) <= array.shape[1]:
            raise ValueError(
                f"features of slot {slot} have shape {tuple(features.shape)}, cache expects "
                f"(1..{array.shape[1]}, {', '.join(map(str, expected))})"
            )
        block = np.zeros(array.shape[1:], dtype=np.float16)  # a chunk written whole, views not asked stay zero
        block[: len(features)] = features  # finite: run_jobs checked
        array[slot] = block
        self._sync_chunk(array, slot)
        _array(self.videos, "failure")[slot] = ""
        _array(self.videos, "views_done")[slot] = len(features)
        self._sync_chunk(_array(self.videos, "views_done"), slot)

    def write(self, split: str, index: int, features: np.ndarray | torch.Tensor) -> None:
        """Store the features of video `index` of a split (its views, exactly)."""
        if len(features) != self.views(split):
            raise ValueError(
                f"features of {split}[{index}] have {len(features)} views, cache expects {self.views(split)}"
            )
        self.write_slot(int(self.slots(split)[index]), features)

    def write_split(self, split: str, features: np.ndarray) -> None:
        """Every video of a split at once ([N, V, L, P*P, D]; random caches), without a flush per video."""
        slots = self.slots(split)
        array = _array(self.videos, "features")
        full = np.zeros((len(slots), *array.shape[1:]), dtype=np.float16)
        full[:, : features.shape[1]] = features
        array.set_orthogonal_selection(slots, full)
        _array(self.videos, "views_done").set_orthogonal_selection(slots, np.full(len(slots), features.shape[1]))

    def pending(self, split: str) -> np.ndarray:
        """Indices of the split's videos not yet done (failed ones are tried again)."""
        return np.flatnonzero(~self.done(split))

    def fail_slot(self, slot: int, reason: str) -> None:
        """Record why a video could not be extracted; it stays not done."""
        _array(self.videos, "failure")[slot] = reason.replace("\n", " ")[:500]

    def fail(self, split: str, index: int, reason: str) -> None:
        """Record why video `index` of a split failed (one with nothing to extract has its reason already)."""
        slot = int(self.slots(split)[index])
        if slot >= 0:
            self.fail_slot(slot, reason)
