"""What an episodic run is asked to do (EpisodicConfig) and the checks that refuse what cannot work,
and the one rule that seeds a task: (seed, index) alone, so a resumed run repeats its tasks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from pipeline.data.episodes import EpisodeSampler, largest_task
from pipeline.heads.openset import METHODS as OPEN_SET_METHODS
from pipeline.runtime import distributed
from pipeline.training.runs import (
    FREE,
)


class TrainError(ValueError):
    """Options, data and checkpoint that do not fit together, or a run that diverged; the message says what to do."""


@dataclass(frozen=True)
class EpisodicConfig:
    """The settings every episodic run has; train.TrainConfig and finetune.FinetuneConfig add their own."""

    episodes: int = 10_000
    way: int = 5
    shot: int = 5
    queries: int = 4
    optimizer: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (over optimiser steps)
    loss_reduction: str = "mean"  # over a task's queries: mean | sum
    tasks_per_step: int = 1  # tasks whose gradients are accumulated before an optimiser step
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 0
    val_every: int = 500  # tasks; 0 = no validation (best.pt is then the final weights)
    val_episodes: int = 500
    val_queries: int = 1
    val_way: int | None = None  # the validation tasks' way; None: `way` (a split of few classes can validate)
    val_seed: int = 0
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 250  # tasks
    # Open-set training (pipeline/heads/openset.py): the method, its loss weight, and the unknown
    # queries each training task draws from other training classes; "none" draws none (as before).
    open_set: str = "none"  # none | bounded | eos | garbage | disc
    open_set_weight: float = 1.0
    unknown_classes: int = 5
    unknown_queries: int = 2
    log_every: int = 50  # tasks
    tensorboard: bool = field(default=False, metadata=FREE)  # scalars also to OUT/tb
    device: str = field(default="auto", metadata=FREE)


def check_config(config: EpisodicConfig) -> None:
    """Raise TrainError naming the first setting that cannot work."""
    if config.optimizer not in ("sgd", "adam", "adamw"):
        raise TrainError(f"optimizer {config.optimizer!r}: expected sgd, adam or adamw")
    if config.schedule not in ("constant", "cosine"):
        raise TrainError(f"schedule {config.schedule!r}: expected constant or cosine")
    if config.loss_reduction not in ("mean", "sum"):
        raise TrainError(f"loss reduction {config.loss_reduction!r}: expected mean or sum")
    counts = ("episodes", "tasks_per_step", "checkpoint_every", "log_every", "way", "shot", "queries", "val_queries")
    for name in counts:
        if getattr(config, name) < 1:
            raise TrainError(f"{flag(name)} {getattr(config, name)}: must be >= 1")
    if config.val_way is not None and config.val_way < 2:
        raise TrainError(f"--val-way {config.val_way}: a task tells apart >= 2 classes")
    if config.episodes % config.tasks_per_step:
        raise TrainError(
            f"--episodes {config.episodes}: must be a multiple of --tasks-per-step ({config.tasks_per_step})"
        )
    world = distributed.world_size()
    if config.tasks_per_step % world:
        raise TrainError(
            f"{world} processes share the {config.tasks_per_step} tasks of an optimiser step: "
            f"--tasks-per-step must be a multiple of {world}"
        )
    if config.val_every and config.val_episodes < 1:
        raise TrainError(f"--val-episodes {config.val_episodes}: must be >= 1 when validating (--val-every 0: never)")
    if config.open_set not in OPEN_SET_METHODS:
        raise TrainError(f"--open-set {config.open_set!r}: expected one of {', '.join(OPEN_SET_METHODS)}")
    for name in ("unknown_classes", "unknown_queries"):
        if config.open_set not in ("none", "bounded") and getattr(config, name) < 1:
            raise TrainError(f"--open-set {config.open_set} needs {name} >= 1 ({flag(name)} {getattr(config, name)})")


def flag(setting: str) -> str:
    """The command-line option of a setting (tasks_per_step -> --tasks-per-step): what an error names."""
    return "--" + setting.replace("_", "-")


def validation_way(config: EpisodicConfig) -> int:
    """The way of the validation tasks: --val-way, else the training way."""
    return config.val_way or config.way


def unknown_draws(config: EpisodicConfig) -> dict[str, int]:
    """The EpisodeSampler arguments of a run's unknown queries: none without a method that trains on them,
    so a closed-set (or `bounded`) run draws exactly the tasks it always did."""
    if config.open_set in ("none", "bounded"):
        return {}
    return {"unknown_classes": config.unknown_classes, "unknown_queries": config.unknown_queries}


def check_open_set_heads(method: str, heads_method: str, where: str) -> None:
    """Heads read from a checkpoint must carry the open-set head the run trains (or none for none)."""
    if method != heads_method:
        raise TrainError(
            f"--open-set {method}: {where} holds heads trained with open-set method {heads_method!r}; "
            f"train heads with --open-set {method} first, or pass --open-set {heads_method}"
        )


ConfigT = TypeVar("ConfigT", bound=EpisodicConfig)


def round_to_steps(config: ConfigT) -> ConfigT:
    """val_every, checkpoint_every and log_every rounded up to whole optimiser steps; a val_way equal to
    the way recorded as None (the default), so that asking for it on resume is not a changed setting."""
    tps = config.tasks_per_step
    up = lambda n: n if n == 0 else -(-n // tps) * tps  # noqa: E731
    return replace(
        config,
        val_every=up(config.val_every),
        checkpoint_every=up(config.checkpoint_every),
        log_every=up(config.log_every),
        val_way=None if config.val_way == config.way else config.val_way,
    )


def check_validation_split(labels: np.ndarray, config: EpisodicConfig, where: str) -> None:
    """A validation split must hold `val_way` classes of shot + val_queries videos; the error names the
    largest --val-way the split allows (the shot is the training one)."""
    way = validation_way(config)
    try:
        EpisodeSampler(labels, way=way, shot=config.shot, queries=config.val_queries, seed=0)
    except ValueError as err:
        widest, _ = largest_task(labels, way=way, shot=config.shot, queries=config.val_queries)
        fix = (
            f"pass --val-way {widest}"
            if widest >= 2
            else f"no 2 of its classes have the {config.shot + config.val_queries} videos a {config.shot}-shot task needs"
        )
        raise TrainError(f"{where} val split: {err}; {fix}, or train without validation (--val-every 0)") from None


def training_split_message(labels: np.ndarray, config: EpisodicConfig, err: ValueError, where: str) -> str:
    """The error of a training split too small for `config`'s tasks, with the options that would fit it."""
    return f"{where} train split: {err}; {fitting_options(labels, config.way, config.shot, config.queries)}"


def fitting_options(labels: np.ndarray, way: int, shot: int, queries: int) -> str:
    """What to ask of a split too small for a way-shot task with `queries` queries a class, one option at a
    time: the largest --way at this shot, --shot at this way and --queries at this way and shot."""
    widest, deepest = largest_task(labels, way=way, shot=shot, queries=queries)
    _, most_queries = largest_task(labels, way=way, shot=queries, queries=shot)  # shot and queries swap roles
    options = [
        f"--{name} {n}"
        for name, n, least in (("way", widest, 2), ("shot", deepest, 1), ("queries", most_queries, 1))
        if n >= least
    ]
    if options:
        return "pass " + ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]
    for q in (queries, 1):  # none alone: the widest task at 1 shot, with these queries or 1
        wide = min(way, largest_task(labels, way=way, shot=1, queries=q)[0])
        if wide >= 2:
            deep = largest_task(labels, way=wide, shot=1, queries=q)[1]
            return f"pass --way {wide} --shot {deep}" + (f" --queries {q}" if q != queries else "")
    return "a task needs at least 2 classes of 2 videos"


def task_seed(seed: int, index: int) -> int:
    """The torch seed of task `index` (dropout masks): a function of (seed, index) alone."""
    return derived_seed(seed, index, 0x5EED)


def derived_seed(*entropy: int) -> int:
    """A torch seed from integers (numpy's SeedSequence: well mixed, the same on every machine)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
