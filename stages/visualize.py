"""`strm visualize`: activation maps (before/after PLE) and TRM tuple matches for any cache and checkpoint.

The frames come from the videos the cache was extracted from (a manifest, or a dataset folder whose
split definition is bundled), decoded again with the cache's own geometry; without them the same
figures are drawn with placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from stages.common import fail

if TYPE_CHECKING:
    from pipeline.features.cache import FeatureCache
    from pipeline.studies.visualize import FrameSource


def frame_source(videos: Path, cache: FeatureCache) -> FrameSource:
    """Frames for the cache's videos from a manifest file, or from a folder of the cache's dataset."""
    from pipeline.data.manifests import ManifestError, build_manifest, read_manifest
    from pipeline.studies.visualize import FrameSource

    try:
        if videos.is_file():
            return FrameSource(read_manifest(videos), cache.recipe)
        if videos.is_dir():
            dataset = str(cache.fingerprint.get("dataset", ""))
            return FrameSource(build_manifest(dataset, videos), cache.recipe, videos_root=videos)
    except (ManifestError, ValueError, OSError) as err:
        fail(
            f"{videos}: cannot map the cache's videos to files ({err}); pass the manifest the cache was extracted from"
        )
    fail(f"{videos}: no such manifest file or videos folder", 2)


def visualize_command(
    cache: Path = typer.Option(..., "--cache", help="Feature cache folder (cache/<dataset>/<key>)."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Heads checkpoint (the project's format or an authors' STRM file)."
    ),
    videos: Path | None = typer.Option(
        None,
        "--videos",
        help="The manifest the cache was extracted from, or the dataset's videos folder; "
        "without it the figures show placeholders instead of frames.",
    ),
    split: str = typer.Option("test", "--split", help="Cache split to draw from (view 0)."),
    seed: int = typer.Option(0, "--seed", help="Episode seed: the figures show task 0 of this seed."),
    way: int = typer.Option(5, "--way", min=2, help="Classes in the task."),
    shot: int = typer.Option(5, "--shot", min=1, help="Support videos a class."),
    count: int = typer.Option(
        2, "--count", min=1, help="Query videos to draw (one activation map and one tuple figure each)."
    ),
    out: Path = typer.Option(Path("runs/visualize"), "--out", help="Folder for the PNGs."),
) -> None:
    """Draw activation maps before/after PLE (paper Fig. 1, 5) and TRM tuple matches (Fig. 10) as PNGs."""
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError
    from pipeline.studies.visualize import render
    from pipeline.training.checkpoints import CheckpointError, load_checkpoint

    console = Console(stderr=True)
    if not checkpoint.is_file():
        fail(f"{checkpoint}: no such file", 2)
    try:
        features = open_cache(cache)
        data = features.load_split(split, views=1)
    except CacheError as err:
        fail(str(err))
    try:
        heads = load_checkpoint(checkpoint).heads
    except CheckpointError as err:
        fail(str(err))
    if heads.dim != features.dim:
        fail(f"{checkpoint}: heads for D={heads.dim}, but {cache} holds D={features.dim}", 2)
    frames = frame_source(videos, features) if videos is not None else None
    try:
        written = render(heads, data, out, frames=frames, seed=seed, way=way, shot=shot, count=count)
    except ValueError as err:
        fail(f"{cache} split {split}: {err}", 2)
    if frames is not None and frames.errors:
        video_id, reason = next(iter(frames.errors.items()))
        console.print(
            f"warning: {len(frames.errors)} videos drawn without frames (e.g. {video_id}: {reason})", highlight=False
        )
    for key, path in written.items():
        console.print(f"{path}  {key}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `strm visualize` to the app."""
    app.command("visualize", help=visualize_command.__doc__)(visualize_command)
