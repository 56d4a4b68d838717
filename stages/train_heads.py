"""`strm train-heads`: episodic training of the STRM heads on a feature cache, with a progress bar.

Options left out take the preset's value; with `--resume` they take the run's own (from its
config.json), and one given that differs from the run's is an error, so a resumed run cannot
silently become another run.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from stages.common import (
    OPEN_SET_HELP,
    OVERWRITE_HELP,
    Loading,
    OpenSet,
    Optimizer,
    fail,
    one_of_resume_overwrite,
    timing_note,
    training_progress,
)

console = Console(stderr=True)


class Preset(str, Enum):
    frozen = "frozen"
    authors = "authors"


def _heads_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs -> build_heads options; values are JSON when they parse (32, 0.5, [2,3], false), else
    text: pipeline.training.train.check_heads_options names a key or value that does not fit."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--heads-option {pair!r}: expected KEY=VALUE, e.g. trm_dim=64", 2)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


# Over 80 lines for its 26 option declarations; the body is under 80.
def train_heads(
    cache: Path = typer.Option(..., "--cache", help="Feature cache folder (from `strm extract`)."),
    variant: str | None = typer.Option(None, help="Heads variant: strm, trm, trx, ple-trm, ... \\[default: strm]"),
    heads_option: list[str] = typer.Option(
        [],
        "--heads-option",
        help="A build_heads option KEY=VALUE, repeatable (trm_dim=64, cardinalities=[2,3], tuple_keep=0.5, ple=mixer).",
    ),
    preset: Preset | None = typer.Option(
        None,
        help="frozen: AdamW, mean loss, standardised features, early stop (for cached features). "
        "authors: the released SGD recipe (summed loss / 16, a step every 16 tasks). \\[default: frozen]",
    ),
    episodes: int | None = typer.Option(None, help="Training tasks. \\[default: 10000]"),
    way: int | None = typer.Option(None, help="Classes a task. \\[default: 5]"),
    shot: int | None = typer.Option(None, help="Support videos a class. \\[default: 5]"),
    queries: int | None = typer.Option(None, help="Query videos a class in training. \\[default: 4]"),
    lr: float | None = typer.Option(
        None, help="Learning rate. \\[default: the preset's; authors: 1e-3 SSv2, 1e-4 others]"
    ),
    optimizer: Optimizer | None = typer.Option(None, help="Optimiser. \\[default: the preset's]"),
    weight_decay: float | None = typer.Option(None, help="Weight decay. \\[default: the preset's]"),
    tasks_per_step: int | None = typer.Option(None, help="Tasks accumulated a step. \\[default: frozen 1, authors 16]"),
    lambda_qc: float | None = typer.Option(
        None, "--lambda-qc", help="Weight of the QC loss and logits. \\[default: 0.1]"
    ),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="Use the cached training views at random. \\[default: on]"
    ),
    standardize: bool | None = typer.Option(
        None, "--standardize/--no-standardize", help="Per-channel feature standardisation. \\[default: the preset's]"
    ),
    seed: int | None = typer.Option(None, help="Seed of the training tasks and dropout. \\[default: 0]"),
    val_every: int | None = typer.Option(None, help="Validate every N tasks; 0 = never. \\[default: 500]"),
    val_episodes: int | None = typer.Option(None, help="Validation tasks (fixed, seed 0). \\[default: 500]"),
    val_way: int | None = typer.Option(
        None, help="Classes a validation task (a val split of fewer). \\[default: --way]"
    ),
    patience: int | None = typer.Option(
        None, help="Stop after N validations without improvement; 0 = never. \\[default: the preset's]"
    ),
    checkpoint_every: int | None = typer.Option(None, help="Write last.pt every N tasks. \\[default: 250]"),
    open_set: OpenSet | None = typer.Option(None, "--open-set", help=OPEN_SET_HELP),
    open_set_weight: float | None = typer.Option(None, help="Weight of the open-set loss term. \\[default: 1.0]"),
    unknown_classes: int | None = typer.Option(None, help="Open-set: other classes a task draws. \\[default: 5]"),
    unknown_queries: int | None = typer.Option(None, help="Open-set: queries of each. \\[default: 2]"),
    out: Path | None = typer.Option(None, help="Run folder. \\[default: runs/<variant>-<preset>-seed<seed>]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... \\[default: cuda when available]"),
    loading: Loading | None = typer.Option(
        None, help="Keep the training split on the GPU, in RAM or stream it from disk. \\[default: auto]"
    ),
    tensorboard: bool | None = typer.Option(
        None,
        "--tensorboard/--no-tensorboard",
        help="Also write the scalars to OUT/tb for TensorBoard. \\[default: off]",
    ),
) -> None:
    """Train the heads on the cache's training split; write config.json, metrics.jsonl, last.pt, best.pt and curve.png."""
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError
    from pipeline.runtime.distributed import DeviceError, init_distributed, resolve_device, teardown
    from pipeline.training.config import TrainError
    from pipeline.training.runs import RunError, saved_settings
    from pipeline.training.train import make_config, train

    one_of_resume_overwrite(resume, overwrite)
    given = dict(
        variant=variant,
        heads_options=_heads_options(heads_option) or None,
        episodes=episodes,
        way=way,
        shot=shot,
        queries=queries,
        lr=lr,
        optimizer=optimizer.value if optimizer else None,
        weight_decay=weight_decay,
        tasks_per_step=tasks_per_step,
        lambda_qc=lambda_qc,
        augment=augment,
        standardize=standardize,
        seed=seed,
        val_every=val_every,
        val_episodes=val_episodes,
        val_way=val_way,
        patience=patience,
        checkpoint_every=checkpoint_every,
        open_set=open_set.value if open_set else None,
        open_set_weight=open_set_weight,
        unknown_classes=unknown_classes,
        unknown_queries=unknown_queries,
        device=device,
        loading=loading.value if loading else None,
        tensorboard=tensorboard,
    )
    try:
        features = open_cache(cache)
        name = preset.value if preset else "frozen"
        if out is None:
            out = Path("runs") / f"{variant or 'strm'}-{name}-seed{seed or 0}"
        saved = (
            {k: v for k, v in saved_settings(out).items() if k not in ("dim", "frames", "patches")} if resume else {}
        )
        if saved:
            if "preset" not in saved:
                fail(f"{out}: not a train-heads run folder (its config.json has no preset; a finetune run?)", 2)
            if preset and preset.value != saved["preset"]:
                fail(f"{out}: the run uses preset {saved['preset']!r}, not {preset.value!r}", 2)
            name = saved.pop("preset")
        config = make_config(
            name, features.fingerprint.get("dataset"), **{**saved, **{k: v for k, v in given.items() if v is not None}}
        )
        on_cpu = resolve_device(config.device).type == "cpu"  # a device this machine lacks: one line, first
        rank, world = init_distributed(config.device)
        if rank == 0:
            console.print(
                f"training {config.variant} heads ({config.preset} preset, {config.optimizer} lr {config.lr:g}) "
                f"on {cache} -> {out}" + (f" on {world} processes" if world > 1 else "")
            )
        with training_progress(console, "train-heads", disable=rank != 0, out=out) as show:
            timed = timing_note(console) if on_cpu else None  # the speed and the whole run's time, then on
            result = train(config, features, out, resume=resume, overwrite=overwrite, progress=show, confirm=timed)
    except (TrainError, CacheError, RunError, DeviceError) as err:
        fail(str(err), 2)
    finally:
        teardown()
    if rank == 0:
        best = (
            f"best validation {result.best_val_accuracy:.2f}% at task {result.best_task} -> {result.best_checkpoint}"
            if result.best_val_accuracy is not None
            else f"no validation; best: {result.best_checkpoint}"
        )
        stop = " (stopped early)" if result.stopped_early else ""
        for note in result.notes:  # where the training split was read from, first
            console.print(note)
        console.print(f"done: {result.tasks_done} tasks{stop}; {best}; last: {result.last_checkpoint}")


def register(app: typer.Typer) -> None:
    """Add `strm train-heads` to the app."""
    app.command(
        "train-heads", help=f"Episodic training of the heads on a feature cache (presets: {', '.join(Preset)})."
    )(train_heads)
