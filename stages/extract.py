"""`strm extract`: backbone features of every video of a dataset into the resumable feature cache.

Under `torchrun --nproc-per-node N strm extract ...` each rank extracts its own share of the
videos into the same cache; rank 0 draws the progress bar and prints the summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.features.presets import OFFLINE_DEFAULT, preset_lines
from stages.common import command_line, fail, on_interrupt


class _VideosPerSecond(ProgressColumn):
    """Recent speed in videos/s (rich's own speed column shows bytes)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} videos/s" if task.speed else "- videos/s")


# Over 80 lines for its 21 option declarations; the body is under 80.
def extract_command(
    dataset: str = typer.Argument(
        ...,
        help="Dataset name: the one `strm manifest` gave (its manifest data_manifests/local/NAME.csv is used), "
        "or hmdb51, ucf101, kinetics100, ssv2, synthetic; names the cache folder CACHE_ROOT/NAME.",
    ),
    videos: Path | None = typer.Option(
        None, "--videos", help="Folder holding the videos; relative manifest paths are under it."
    ),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Manifest CSV/Parquet; default the one `strm manifest` wrote for DATASET, else built from --videos.",
    ),
    split_dir: Path | None = typer.Option(
        None, "--split-dir", help="Without --manifest: the folder of split lists (as `strm manifest`)."
    ),
    classes: Path | None = typer.Option(
        None, "--classes", help="Without --manifest: a class,split CSV (as `strm manifest`)."
    ),
    backbone_name: str = typer.Option(
        OFFLINE_DEFAULT,
        "--backbone",
        help="resnet50, vit_b_16, tf_efficientnet_lite0, tiny, "
        f"any timm model name, or a preset: {'; '.join(preset_lines())}.",
    ),
    layer: str | None = typer.Option(
        None, "--layer", help="Feature layer (tf_efficientnet_lite0: head or last_block); default: the backbone's own."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="Local weights file instead of the pretrained download."
    ),
    backbone_checkpoint: Path | None = typer.Option(
        None,
        "--backbone-checkpoint",
        help="Fine-tuned backbone from a `strm finetune` checkpoint or an authors' STRM/TRX file.",
    ),
    views: int = typer.Option(
        4, "--views", min=1, help="Views per training video: the test view plus views-1 augmented ones."
    ),
    short_side: int = typer.Option(256, "--short-side", min=1, help="Resize the shorter side to this many pixels."),
    crop: int = typer.Option(224, "--crop", min=1, help="Square crop size."),
    flip: bool = typer.Option(
        True,
        "--flip/--no-flip",
        help="Mirror training views at random (p=0.5); turn off where left/right are different classes.",
    ),
    patches: int = typer.Option(4, "--patches", min=1, help="P: max-pool each map to P x P patches."),
    no_normalize: bool = typer.Option(
        False, "--no-normalize", help="Feed raw [0, 1] pixels (the authors' input) instead of the backbone's mean/std."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmented views."),
    cache_root: Path = typer.Option(Path("cache"), "--cache-root", help="The cache goes to CACHE_ROOT/DATASET/<key>."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Frames per backbone call."),
    workers: int = typer.Option(
        2, "--workers", min=0, help="Decoding worker processes (0: decode in the main process)."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda, cuda:N."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (fp32 on CPU, bf16/fp16 autocast on CUDA), fp32, bf16 or fp16."
    ),
) -> None:
    """Extract backbone features of every video into CACHE_ROOT/DATASET/<key>; rerun to resume.

    A video that cannot be decoded is recorded in the cache's failure table and listed at the
    end; the run goes on. Settings that change the numbers (backbone, weights, input size,
    normalisation, patches, views, seed) give another cache key, so caches never mix. The same
    settings with a changed manifest (clips added, removed or re-encoded) reuse the cache and
    extract only the videos it does not hold yet.
    """
    from pipeline.data.manifests import resolve_manifest
    from pipeline.data.video import ViewSpec
    from pipeline.features.backbones import get_backbone
    from pipeline.features.extract import ExtractSettings, RunOptions, extract
    from pipeline.features.readers import CacheError
    from pipeline.features.weights import WeightsUnavailable
    from pipeline.runtime.distributed import DeviceError, init_distributed, resolve_device, teardown
    from pipeline.training.checkpoints import load_backbone_weights

    start = time.perf_counter()
    try:
        # Ranks wait for each other only at the start and the end; the end can be hours later.
        rank, world = init_distributed(device)
        device = str(resolve_device(device))
    except DeviceError as err:
        fail(str(err), 2)
    console = Console(stderr=True, quiet=rank != 0)
    try:
        backbone = get_backbone(
            backbone_name, weights=weights, layer=layer, pretrained=backbone_checkpoint is None, image_size=crop
        )
        if backbone_checkpoint is not None:
            load_backbone_weights(backbone, backbone_checkpoint)
        table, source = resolve_manifest(dataset, videos, manifest, split_dir, classes)
    except (WeightsUnavailable, FileNotFoundError, ValueError, OSError) as err:
        fail(str(err))
    console.print(f"manifest: {source} ({len(table)} videos)", highlight=False, soft_wrap=True)
    spec = ViewSpec(short_side=short_side, crop=crop, flip=flip, interpolation=backbone.interpolation)
    settings = ExtractSettings(views=views, spec=spec, patches=patches, normalize=not no_normalize, seed=seed)
    options = RunOptions(batch_size=batch_size, workers=workers, device=device, precision=precision)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _VideosPerSecond(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"extract {dataset} ({backbone.name})", total=None)

        def on_progress(state) -> None:
            failed = f", {state.failed} failed" if state.failed else ""
            rank_note = f" rank 0/{world}" if world > 1 else ""
            bar.update(
                task,
                total=state.total,
                completed=state.done + state.failed,
                description=f"extract {dataset} ({backbone.name}{rank_note}{failed})",
            )
            saved = f"{state.already_done + state.done} of {state.already_done + state.total} videos{rank_note}"
            on_interrupt(lambda: f"{saved} are saved; run `{command_line()}` again to extract the rest")

        try:
            result = extract(
                dataset, table, backbone, cache_root, settings, options, videos_root=videos, progress=on_progress
            )
        except (CacheError, ValueError) as err:
            fail(str(err))
    teardown()
    if rank != 0:
        return
    state = result.progress
    elapsed = time.perf_counter() - start
    resumed = f" ({state.already_done} were already done)" if state.already_done else ""
    console.print(
        f"this run: {state.done} videos extracted, {state.failed} failed in {elapsed:.1f} s{resumed}", highlight=False
    )
    if not _summary(console, result.path):
        fail(f"{result.path}: no video could be extracted (reasons above)")
    typer.echo(str(result.path))


def _summary(console: Console, path: Path) -> int:
    """Print per split done/total and every failure with its reason (all ranks', read from the cache); return done."""
    from pipeline.features.cache import open_cache

    cache = open_cache(path)
    total_done = 0
    for split in cache.splits:
        done, failures = cache.done(split), cache.failures(split)
        total_done += int(done.sum())
        console.print(f"{split}: {int(done.sum())}/{len(done)} videos done, {len(failures)} failed", highlight=False)
        for video_id, reason in failures:
            console.print(f"  [red]failed[/red] {video_id}: {reason}", highlight=False, soft_wrap=True)
    return total_done


def register(app: typer.Typer) -> None:
    """Add `strm extract` to the app."""
    app.command("extract", help=extract_command.__doc__)(extract_command)
