"""What an episodic run is asked to do (EpisodicConfig) and the checks that refuse what cannot work,
and the one rule that seeds a task: (seed, index) alone, so a resumed run repeats its tasks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from pipeline.data.episodes import EpisodeSampler
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
    if (
        min(
            config.episodes,
            config.tasks_per_step,
            config.checkpoint_every,
            config.log_every,
            config.way,
            config.shot,
            config.queries,
            config.val_queries,
        )
        < 1
    ):
        raise TrainError("episodes, tasks_per_step, checkpoint_every, log_every, way, shot and queries must be >= 1")
    if config.episodes % config.tasks_per_step:
        raise TrainError(f"episodes ({config.episodes}) must be a multiple of tasks_per_step ({config.tasks_per_step})")
    world = distributed.world_size()
    if config.tasks_per_step % world:
        raise TrainError(
            f"{world} processes share the {config.tasks_per_step} tasks of an optimiser step: "
            f"--tasks-per-step must be a multiple of {world}"
        )
    if config.val_every and config.val_episodes < 1:
        raise TrainError("val_episodes must be >= 1 when validating")
    if config.open_set not in OPEN_SET_METHODS:
        raise TrainError(f"--open-set {config.open_set!r}: expected one of {', '.join(OPEN_SET_METHODS)}")
    if config.open_set not in ("none", "bounded") and min(config.unknown_classes, config.unknown_queries) < 1:
        raise TrainError(f"--open-set {config.open_set} needs unknown_classes and unknown_queries >= 1")


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
    """val_every, checkpoint_every and log_every rounded up to whole optimiser steps."""
    tps = config.tasks_per_step
    up = lambda n: n if n == 0 else -(-n // tps) * tps  # noqa: E731
    return replace(
        config,
        val_every=up(config.val_every),
        checkpoint_every=up(config.checkpoint_every),
        log_every=up(config.log_every),
    )


def check_validation_split(labels: np.ndarray, config: EpisodicConfig, where: str) -> None:
    """A validation split must hold `way` classes of shot + val_queries videos; the error says what to do."""
    try:
        EpisodeSampler(labels, way=config.way, shot=config.shot, queries=config.val_queries, seed=0)
    except ValueError as err:
        raise TrainError(
            f"{where} val split: {err}; validate with fewer classes (fewer --way) or train without "
            "validation (--val-every 0)"
        ) from None


def task_seed(seed: int, index: int) -> int:
    """The torch seed of task `index` (dropout masks): a function of (seed, index) alone."""
    return derived_seed(seed, index, 0x5EED)


def derived_seed(*entropy: int) -> int:
    """A torch seed from integers (numpy's SeedSequence: well mixed, the same on every machine)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
