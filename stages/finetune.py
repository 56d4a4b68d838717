"""`strm finetune`: backbone and heads trained together on raw video, from a train-heads or authors' checkpoint.

Settings left out come from the starting checkpoint (backbone, input and open-set method of its heads), else the
authors' recipe; with `--resume` from the run's own config.json, and one given that differs is an error
(pipeline/training/finetune_settings.py). On CPU with a real backbone a run timed past an hour needs --yes."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from pipeline.training.state import TrainResult

from stages.common import (
    OVERWRITE_HELP,
    Optimizer,
    counting_progress,
    fail,
    one_of_resume_overwrite,
    setting,
    training_progress,
)

console = Console(stderr=True)


class BatchNorm(str, Enum):
    train = "train"
    frozen = "frozen"


class Amp(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


# Over 80 lines for its option declarations; the work is in _train and _report.
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
    manifest: Path | None = setting(
        "--manifest",
        "Manifest from `strm manifest` (frame counts known); built from --videos when not given.",
    ),
    backbone: str | None = setting(
        "--backbone", "Backbone name. \\[default: the one the heads were trained on, else resnet50]"
    ),
    layer: str | None = setting("--layer", "Feature layer. \\[default: as the heads were trained]"),
    weights: Path | None = setting("--weights", "Local backbone weights instead of the pretrained download."),
    episodes: int | None = setting("--episodes", "Training tasks. \\[default: 75000 SSv2, 10000 others]"),
    way: int | None = setting("--way", "Classes a task. \\[default: 5]"),
    shot: int | None = setting("--shot", "Support videos a class. \\[default: 5]"),
    queries: int | None = setting("--queries", "Query videos a class. \\[default: 5 Kinetics, 4 others]"),
    lr: float | None = setting("--lr", "Learning rate. \\[default: 1e-3 SSv2, 1e-4 others]"),
    optimizer: Optimizer | None = setting(
        "--optimizer", "Optimiser, without momentum or weight decay. \\[default: sgd, the authors']"
    ),
    tasks_per_step: int | None = setting("--tasks-per-step", "Tasks accumulated a step. \\[default: 16]"),
    freeze_stages: int | None = setting(
        "--freeze-stages", "Freeze the first K backbone stages (ResNet: stem, layer1..4). \\[default: 0]"
    ),
    bn: BatchNorm | None = setting("--bn", "BatchNorm: train (synchronised across GPUs) or frozen. \\[default: train]"),
    amp: Amp | None = setting(
        "--amp",
        "CUDA autocast: bf16, fp16 (loss scaling) or off (the authors'). CPU runs float32. \\[default: bf16]",
    ),
    normalize: bool | None = setting(
        "--normalize/--no-normalize",
        "Backbone mean/std on the pixels. \\[default: as the heads were trained]",
    ),
    short_side: int | None = setting(
        "--short-side", "Resize the shorter side to this. \\[default: as the heads were trained, else 256]"
    ),
    crop: int | None = setting("--crop", "Square crop. \\[default: as the heads were trained, else 224]"),
    seed: int | None = setting("--seed", "Seed of the tasks, views and dropout. \\[default: 0]"),
    val_every: int | None = setting("--val-every", "Validate every N tasks; 0 = never. \\[default: 1000]"),
    val_episodes: int | None = setting("--val-episodes", "Validation tasks (fixed seed). \\[default: 1000]"),
    val_way: int | None = setting("--val-way", "Classes a validation task. \\[default: --way]"),
    checkpoint_every: int | None = setting("--checkpoint-every", "Write last.pt every N tasks. \\[default: 160]"),
    log_every: int | None = setting("--log-every", "A metrics line every N tasks. \\[default: 16]"),
    tensorboard: bool | None = setting(
        "--tensorboard/--no-tensorboard",
        "Also write the scalars to OUT/tb for TensorBoard. \\[default: off]",
    ),
    open_set: str | None = setting("--open-set", "Open-set training (README). \\[default: the start's]"),
    workers: int | None = setting("--workers", min=0, help="Decoding processes. \\[default: CPUs - 1, at most 8]"),
    out: Path | None = setting("--out", "Run folder. \\[default: runs/NAME-ft]"),
    device: str | None = setting("--device", "cpu, cuda, cuda:1 ... \\[default: cuda when available]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    yes: bool = typer.Option(False, "--yes", help="Start even when a CPU run is estimated past an hour."),
) -> None:
    """Fine-tune backbone and heads end to end on episodic tasks decoded from the videos; write last.pt and best.pt.

    Frames are sampled and augmented exactly as `strm extract` does. best.pt holds the backbone too:
    `strm extract ... --backbone-checkpoint OUT/best.pt` refreshes the cache for `strm evaluate`.
    Under torchrun the 16 tasks of a step are split across the processes.
    """
    from pipeline.data.manifests import ManifestError
    from pipeline.features.weights import WeightsUnavailable
    from pipeline.runtime.distributed import DeviceError, teardown
    from pipeline.training import finetune_settings as fs
    from pipeline.training.checkpoints import CheckpointError
    from pipeline.training.config import TrainError
    from pipeline.training.loop import Declined
    from pipeline.training.runs import RunError

    given = fs.given_settings(locals())  # the options that are the run's settings
    one_of_resume_overwrite(resume, overwrite)
    out = out or fs.default_out(source)
    try:
        rank, result = _train(
            dataset, source, videos, manifest, out, given, resume=resume, overwrite=overwrite, yes=yes
        )
    except Declined:
        fail(
            f"this run is estimated past {fs.hours(fs.CPU_LIMIT_S)} on CPU: pass --yes to start it anyway, or use a GPU"
        )
    except (TrainError, ManifestError, RunError, DeviceError, CheckpointError) as err:
        fail(str(err), 2)
    except (WeightsUnavailable, FileNotFoundError) as err:
        fail(str(err))
    finally:
        teardown()
    if rank != 0:
        return
    for line in fs.done_lines(result):
        console.print(line, highlight=False)
    console.print("refresh the feature cache with the fine-tuned backbone:", highlight=False)
    typer.echo(fs.refresh_command(dataset, videos, manifest, result.config, result.best_checkpoint))


def _train(
    dataset: str,
    source: Path,
    videos: Path,
    manifest: Path | None,
    out: Path,
    given: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    yes: bool,
) -> tuple[int, TrainResult]:
    """(this process's rank, the run's result): settings resolved, frames counted, the run started or resumed."""
    from pipeline.data.manifests import training_manifest
    from pipeline.runtime.distributed import init_distributed, resolve_device
    from pipeline.training import finetune_settings as fs
    from pipeline.training.finetune import finetune

    resolve_device(given["device"] or "auto")  # a device this machine lacks is one line, before anything else
    rank, world = init_distributed(given["device"] or "auto")
    quiet = rank != 0

    def say(text: str) -> None:
        if not quiet:
            console.print(text, highlight=False)

    config, start = fs.settle(dataset, source, out, given, resume=resume, note=lambda text: say(f"note: {text}"))
    with counting_progress(console, "counting frames", disable=quiet) as counting:
        table, counted = training_manifest(dataset, videos, manifest, device=config.device, progress=counting)
    on_cpu = resolve_device(config.device).type == "cpu"
    for line in fs.describe_start(config, source, out, world=world, counted=counted, on_cpu=on_cpu, start=start):
        say(line)
    with training_progress(console, "finetune", disable=quiet, out=out) as show:
        result = finetune(
            config,
            table,
            out,
            start=start,
            resume=resume,
            overwrite=overwrite,
            videos_root=videos,
            progress=show,
            confirm=fs.confirmation(config, on_cpu=on_cpu, yes=yes, tell=say),
        )
    return rank, result


def register(app: typer.Typer) -> None:
    """Add `strm finetune` to the app."""
    app.command("finetune", help=finetune_command.__doc__)(finetune_command)
