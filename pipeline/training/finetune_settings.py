"""What `strm finetune` settles before and after a run: its settings from the options given, the run's
own (with --resume) and the starting checkpoint's; the default run folder and worker count; the lines
that say what is about to run; and the `strm extract` command that refreshes a feature cache with
the fine-tuned backbone.

Settings left out come from the starting checkpoint (the backbone, its layer, input size and
normalisation its heads were trained on) and otherwise from the authors' recipe
(finetune.make_finetune_config); with --resume they come from the run's own config.json, and one
given that differs is an error (raised when the run starts).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline.training.checkpoints import Checkpoint, load_checkpoint
from pipeline.training.finetune import FinetuneConfig, make_finetune_config, start_settings
from pipeline.training.runs import LAST, saved_settings
from pipeline.training.state import Estimate, TrainResult

CPU_LIMIT_S = 3600  # past this estimate a CPU run of a real backbone needs --yes
NOT_RESUMED = ("dataset", "dim", "frames", "variant", "device", "workers")  # given anew by each invocation
SETTINGS = (  # the options of `strm finetune` that are settings of the run, by their names there
    "backbone",
    "layer",
    "weights",
    "episodes",
    "way",
    "shot",
    "queries",
    "lr",
    "optimizer",
    "tasks_per_step",
    "freeze_stages",
    "bn",
    "amp",
    "normalize",
    "short_side",
    "crop",
    "seed",
    "val_every",
    "val_episodes",
    "val_way",
    "checkpoint_every",
    "log_every",
    "device",
    "tensorboard",
    "workers",
    "open_set",
)


def default_out(source: Path) -> Path:
    """runs/NAME/best.pt -> runs/NAME-ft; an authors' file x.pt -> runs/x-ft."""
    name = source.parent.name if source.stem in ("best", "last") and source.parent.name else source.stem
    return Path("runs") / f"{name}-ft"


def default_workers() -> int:
    """Decoding processes when none are asked for: the CPUs but one, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def given_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings among the stage's options (None: not given): choices as their values, paths as
    text, and the default worker count."""
    given = {}
    for name in SETTINGS:
        value = options.get(name)
        given[name] = value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value
    if given["workers"] is None:
        given["workers"] = default_workers()
    return given


def settle(
    dataset: str, source: Path, out: Path, given: dict[str, Any], *, resume: bool, note: Callable[[str], None]
) -> tuple[FinetuneConfig, Checkpoint | None]:
    """(the run's settings, the starting checkpoint unless a resume finds out/last.pt): the options given,
    then the run's own (with --resume), then those the start's heads were trained with, then the
    authors' recipe. `note` hears, before the settings are checked, of a --backbone other than the
    one the start's heads were trained on."""
    saved = {k: v for k, v in saved_settings(out).items() if k not in NOT_RESUMED} if resume else {}
    start = None
    defaults: dict = {}
    if not (resume and (out / LAST).exists()):
        start = load_checkpoint(source)
        defaults = start_settings(start)
        backbone = given["backbone"]
        if backbone and defaults.get("backbone") not in (None, backbone):
            note(f"the heads of {source} were trained on {defaults['backbone']} features, not {backbone}")
    chosen = {k: v for k, v in given.items() if v is not None}
    return make_finetune_config(dataset, **{**defaults, **saved, **chosen, "source": str(source)}), start


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def confirmation(
    config: FinetuneConfig, *, on_cpu: bool, yes: bool, tell: Callable[[str], None]
) -> Callable[[Estimate], bool] | None:
    """What finetune asks after timing the first tasks: on CPU with a real backbone, `tell` hears the estimate
    and the run goes on when `yes` or it is estimated at most CPU_LIMIT_S; elsewhere nothing is asked (None)."""
    if not on_cpu or config.backbone == "tiny":
        return None

    def confirm(estimate: Estimate) -> bool:
        tell(
            f"timed: {estimate.seconds_per_task:.1f} s a task on {estimate.device}; "
            f"{estimate.tasks_left} tasks left ≈ {hours(estimate.seconds_left)}"
        )
        return yes or estimate.seconds_left <= CPU_LIMIT_S

    return confirm


def describe_start(
    config: FinetuneConfig,
    source: Path,
    out: Path,
    *,
    world: int,
    counted: int,
    on_cpu: bool,
    start: Checkpoint | None,
) -> list[str]:
    """What is about to run, a line each: frames counted, the run, and its notes."""
    lines = []
    if counted:
        lines.append(f"counted the frames of {counted} videos (a manifest from `strm manifest` already holds them)")
    lines.append(
        f"fine-tuning {config.backbone} + heads from {source} on {config.dataset} -> {out} "
        f"({config.optimizer} lr {config.lr:g}, {config.tasks_per_step} tasks a step"
        + (f", {world} processes" if world > 1 else "")
        + ")"
    )
    if on_cpu and config.amp != "off":
        lines.append("note: mixed precision is CUDA-only; this CPU run is float32")
    lines += [f"note: {note}" for note in (start.notes if start else ())]
    return lines


def done_lines(result: TrainResult) -> list[str]:
    """The run's notes, then its tasks and its best and last checkpoints."""
    best = (
        f"best validation {result.best_val_accuracy:.2f}% at task {result.best_task}"
        if result.best_val_accuracy is not None
        else "no validation"
    )
    return [f"note: {note}" for note in result.notes] + [
        f"done: {result.tasks_done} tasks; {best}; best: {result.best_checkpoint}; last: {result.last_checkpoint}"
    ]


def refresh_command(
    dataset: str, videos: Path, manifest: Path | None, config: FinetuneConfig, checkpoint: Path | None
) -> str:
    """The `strm extract` command that refreshes the cache with the fine-tuned backbone in `checkpoint`."""
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
