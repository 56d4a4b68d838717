"""From a manifest to what it selects in a cache: per split its videos, labels and views, and each
video's file identity (what makes it the same video the cache may already hold).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipeline.data.protocol import SPLITS
from pipeline.features.cache import SplitLayout


def split_layouts(manifest: pd.DataFrame, views: int) -> dict[str, SplitLayout]:
    """Per split: its videos in manifest order, class indices into the split's sorted class names."""
    layouts = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            continue
        repeated = rows["video_id"][rows["video_id"].duplicated()]
        if len(repeated):
            raise ValueError(f"the manifest lists {split} video {repeated.iloc[0]!r} more than once")
        names = sorted(rows["class"].astype(str).unique())
        index = {name: i for i, name in enumerate(names)}
        layouts[split] = SplitLayout(
            video_ids=rows["video_id"].astype(str).tolist(),
            labels=[index[c] for c in rows["class"].astype(str)],
            class_names=names,
            views=views if split == "train" else 1,
        )
    if not layouts:
        raise ValueError(f"the manifest has no videos in the splits {SPLITS}")
    return layouts


def file_identity(path: Path) -> str:
    """What says a video file is the same file: its size and modification time (a stat, no read).

    Content hashing would survive a copy that resets times, but it reads every video on every run
    (a Kinetics or SSv2 resume would first read the whole dataset); any rewrite of a file (re-encoded,
    downloaded again, edited) changes its mtime, and a copy without its times only costs a re-extraction.
    """
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def video_layouts(manifest: pd.DataFrame, views: int, videos_root: Path | None) -> dict[str, SplitLayout]:
    """split_layouts plus each video's file identity; a row that is not ok, or whose file is gone, has
    nothing to extract and keeps its reason."""
    layouts = split_layouts(manifest, views)
    for split, layout in layouts.items():
        rows = manifest[manifest["split"] == split]
        status = rows["status"].astype(str).tolist() if "status" in rows else ["ok"] * len(rows)
        files: list[str | None] = []
        reasons: dict[str, str] = {}
        for video_id, path, ok in zip(layout.video_ids, rows["path"].astype(str), status, strict=True):
            try:
                files.append(file_identity(resolve_path(path, videos_root)) if ok == "ok" else None)
                if ok != "ok":
                    reasons[video_id] = f"manifest: {ok}"
            except OSError as err:
                files.append(None)
                reasons[video_id] = f"missing: {resolve_path(path, videos_root)}: {err.strerror}"
        layouts[split] = replace(layout, files=files, reasons=reasons)
    return layouts


def resolve_path(path: str, videos_root: Path | None) -> Path:
    """A manifest's path: relative ones are under the videos root."""
    resolved = Path(path)
    return videos_root / resolved if videos_root is not None and not resolved.is_absolute() else resolved
