"""`strm finetune`: backbone and heads trained together on raw video, from a train-heads or authors' checkpoint.

Settings left out come from the starting checkpoint (the backbone, its layer, input size and
normalisation that its heads were trained on) and otherwise from the authors' recipe; with
`--resume` they come from the run's own config.json, and one given that differs is an error.
On CPU with a real backbone the first tasks are timed and a run estimated past an hour needs --yes.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pipeline.data.manifests import ManifestError, training_manifest
from pipeline.features.weights import WeightsUnavailable
from pipeline.runtime.distributed import (
    DeviceError,
    init_distributed,
    resolve_device,
    teardown,
)
from pipeline.training.checkpoints import CheckpointError, load_checkpoint
from pipeline.training.config import TrainError
from pipeline.training.finetune import finetune, make_finetune_config, start_settings
from pipeline.training.loop import Declined
from pipeline.training.runs import LAST, RunError, saved_settings
from pipeline.training.state import Estimate, TrainResult
from stages.common import Optimizer, fail, progress_bar, training_progress

console = Console(stderr=True)
CPU_LIMIT_S = 3600  # past this estimate a CPU run needs --yes
NOT_RESUMED = ("dataset", "dim", "frames", "variant", "device", "workers")  # given anew by each invocation


class BatchNorm(str, Enum):
    train = "train"
    frozen = "frozen"


class Amp(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


def _default_out(source: Path) -> Path:
    """runs/NAME/best.pt -> runs/NAME-ft; an authors' file x.pt -> runs/x-ft."""
    name = source.parent.name if source.stem in ("best", "last") and source.parent.name else source.stem
    return Path("runs") / f"{name}-ft"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _refresh_command(dataset: str, videos: Path, manifest: Path | None, config, checkpoint: Path | None) -> str:
    parts = ["strm extract", dataset, "--videos", str(videos)]
    if manifest is not None:
        parts += ["--manifest", str(manifest)]
    parts += [
        "--backbone",
        config.backbone,
        "--layer",
        str(config.layer),
        "--short-side",
        str(config.short_side),
        "--crop",
        str(config.crop),
        "--patches",
        str(config.patches),
    ]
    if not config.normalize:
        parts.append("--no-normalize")
    return " ".join(parts + ["--backbone-checkpoint", str(checkpoint)])


# Over 80 lines for its option declarations and their mapping to settings; the work is in _train and _report.
def finetune_command(
    dataset: str = typer.Argument(
        ...,
        help="Dataset name (hmdb51, ucf101, kinetics100, ssv2, synthetic, folder); sets the authors' lr and queries.",
    ),
    source: Path = typer.Option(
        ...,
        "--from",
        help="Starting point: a train-heads checkpoint (runs/NAME/best.pt), an earlier fine-tune, or an authors' STRM/TRX file (backbone + heads).",
    ),
    videos: Path = typer.Option(
        ..., "--videos", help="Folder holding the videos; relative manifest paths are under it."
    ),
    manifest: Path | None = typer.Option(
        None,
        "--manifest",
        help="Manifest from `strm manifest` (frame counts known); built from --videos when not given.",
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Backbone name. (default: the one the heads were trained on, else resnet50)"
    ),
    layer: str | None = typer.Option(None, "--layer", help="Feature layer. (default: as the heads were trained)"),
    weights: Path | None = typer.Option(
        None, "--weights", help="Local backbone weights instead of the pretrained download."
    ),
    episodes: int | None = typer.Option(None, "--episodes", help="Training tasks. (default: 75000 SSv2, 10000 others)"),
    way: int | None = typer.Option(None, "--way", help="Classes a task. (default: 5)"),
    shot: int | None = typer.Option(None, "--shot", help="Support videos a class. (default: 5)"),
    queries: int | None = typer.Option(None, "--queries", help="Query videos a class. (default: 5 Kinetics, 4 others)"),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate. (default: 1e-3 SSv2, 1e-4 others)"),
    optimizer: Optimizer | None = typer.Option(
        None, "--optimizer", help="Optimiser, without momentum or weight decay. (default: sgd, the authors')"
    ),
    tasks_per_step: int | None = typer.Option(None, "--tasks-per-step", help="Tasks accumulated a step. (default: 16)"),
    freeze_stages: int | None = typer.Option(
        None, "--freeze-stages", help="Freeze the first K backbone stages (ResNet: stem, layer1..4). (default: 0)"
    ),
    bn: BatchNorm | None = typer.Option(
        None, "--bn", help="BatchNorm: train (synchronised across GPUs) or frozen. (default: train)"
    ),
    amp: Amp | None = typer.Option(
        None,
        "--amp",
        help="CUDA autocast: bf16, fp16 (loss scaling) or off (the authors'). CPU runs float32. (default: bf16)",
    ),
    normalize: bool | None = typer.Option(
        None, "--normalize/--no-normalize", help="Backbone mean/std on the pixels. (default: as the heads were trained)"
    ),
    short_side: int | None = typer.Option(
        None, "--short-side", help="Resize the shorter side to this. (default: as the heads were trained, else 256)"
    ),
    crop: int | None = typer.Option(None, "--crop", help="Square crop. (default: as the heads were trained, else 224)"),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the tasks, views and dropout. (default: 0)"),
    val_every: int | None = typer.Option(
        None, "--val-every", help="Validate every N tasks; 0 = never. (default: 1000)"
    ),
    val_episodes: int | None = typer.Option(
        None, "--val-episodes", help="Validation tasks (fixed seed). (default: 1000)"
    ),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Write last.pt every N tasks. (default: 160)"
    ),
    log_every: int | None = typer.Option(None, "--log-every", help="A metrics line every N tasks. (default: 16)"),
    tensorboard: bool | None = typer.Option(
        None, "--tensorboard/--no-tensorboard", help="Also write the scalars to OUT/tb for TensorBoard. (default: off)"
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="Decoding processes. (default: CPUs - 1, at most 8)"
    ),
    out: Path | None = typer.Option(None, "--out", help="Run folder. (default: runs/NAME-ft)"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    yes: bool = typer.Option(False, "--yes", help="Start even when a CPU run is estimated past an hour."),
) -> None:
    """Fine-tune backbone and heads end to end on episodic tasks decoded from the videos; write last.pt and best.pt.

    Frames are sampled and augmented exactly as `strm extract` does. best.pt holds the backbone too:
    `strm extract ... --backbone-checkpoint OUT/best.pt` refreshes the cache for `strm evaluate`.
    Under torchrun the 16 tasks of a step are split across the processes.
    """
    given = dict(
        backbone=backbone,
        layer=layer,
        weights=str(weights) if weights else None,
        episodes=episodes,
        way=way,
        shot=shot,
        queries=queries,
        lr=lr,
        optimizer=optimizer.value if optimizer else None,
        tasks_per_step=tasks_per_step,
        freeze_stages=freeze_stages,
        bn=bn.value if bn else None,
        amp=amp.value if amp else None,
        normalize=normalize,
        short_side=short_side,
        crop=crop,
        seed=seed,
        val_every=val_every,
        val_episodes=val_episodes,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        device=device,
        tensorboard=tensorboard,
        workers=workers if workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1)),
    )
    out = out or _default_out(source)
    rank = 0
    try:
        rank, result = _train(dataset, source, videos, manifest, out, given, resume=resume, yes=yes)
    except Declined:
        fail(f"this run is estimated past {_hours(CPU_LIMIT_S)} on CPU: pass --yes to start it anyway, or use a GPU")
    except (TrainError, ManifestError, RunError, DeviceError, CheckpointError) as err:
        fail(str(err), 2)
    except (WeightsUnavailable, FileNotFoundError) as err:
        fail(str(err))
    finally:
        teardown()
    if rank != 0:
        return
    _report(result, dataset, videos, manifest)


def _train(
    dataset: str,
    source: Path,
    videos: Path,
    manifest: Path | None,
    out: Path,
    given: dict[str, Any],
    *,
    resume: bool,
    yes: bool,
) -> tuple[int, TrainResult]:
    """(this process's rank, the run's result): settings resolved, frames counted, the run started or resumed."""
    device = given["device"]
    backbone = given["backbone"]
    resolve_device(device or "auto")  # a device this machine lacks is one line, before anything else
    rank, world = init_distributed(device or "auto")
    quiet = rank != 0
    saved = {k: v for k, v in saved_settings(out).items() if k not in NOT_RESUMED} if resume else {}
    start = None
    defaults: dict = {}
    if not (resume and (out / LAST).exists()):
        start = load_checkpoint(source)
        defaults = start_settings(start)
        if backbone and defaults.get("backbone") not in (None, backbone) and not quiet:
            console.print(
                f"note: the heads of {source} were trained on {defaults['backbone']} features, not {backbone}",
                highlight=False,
            )
    config = make_finetune_config(
        dataset, **{**defaults, **saved, **{k: v for k, v in given.items() if v is not None}, "source": str(source)}
    )
    with progress_bar(console, disable=quiet, transient=True) as bar:
        count = bar.add_task("counting frames", total=None)
        table, counted = training_manifest(
            dataset,
            videos,
            manifest,
            device=config.device,
            progress=lambda done, total: bar.update(count, completed=done, total=total),
        )
    on_cpu = resolve_device(config.device).type == "cpu"
    if not quiet:
        if counted:
            console.print(
                f"counted the frames of {counted} videos (a manifest from `strm manifest` already holds them)",
                highlight=False,
            )
        console.print(
            f"fine-tuning {config.backbone} + heads from {source} on {dataset} -> {out} "
            f"({config.optimizer} lr {config.lr:g}, {config.tasks_per_step} tasks a step"
            + (f", {world} processes" if world > 1 else "")
            + ")",
            highlight=False,
        )
        if on_cpu and config.amp != "off":
            console.print("note: mixed precision is CUDA-only; this CPU run is float32", highlight=False)
        for note in start.notes if start else ():
            console.print(f"note: {note}", highlight=False)

    def confirm(estimate: Estimate) -> bool:
        console.print(
            f"timed: {estimate.seconds_per_task:.1f} s a task on {estimate.device}; "
            f"{estimate.tasks_left} tasks left ≈ {_hours(estimate.seconds_left)}",
            highlight=False,
        )
        return yes or estimate.seconds_left <= CPU_LIMIT_S

    with training_progress(console, "finetune", disable=quiet) as show:
        real_cpu_run = on_cpu and config.backbone != "tiny"
        result = finetune(
            config,
            table,
            out,
            start=start,
            resume=resume,
            videos_root=videos,
            progress=show,
            confirm=confirm if real_cpu_run else None,
        )
    return rank, result


def _report(result: TrainResult, dataset: str, videos: Path, manifest: Path | None) -> None:
    """The run's notes, its best and last checkpoints, and the command that refreshes the cache with it."""
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    best = (
        f"best validation {result.best_val_accuracy:.2f}% at task {result.best_task}"
        if result.best_val_accuracy is not None
        else "no validation"
    )
    console.print(
        f"done: {result.tasks_done} tasks; {best}; best: {result.best_checkpoint}; last: {result.last_checkpoint}",
        highlight=False,
    )
    console.print("refresh the feature cache with the fine-tuned backbone:", highlight=False)
    typer.echo(_refresh_command(dataset, videos, manifest, result.config, result.best_checkpoint))


def register(app: typer.Typer) -> None:
    """Add `strm finetune` to the app."""
    app.command("finetune", help=finetune_command.__doc__)(finetune_command)
