"""train-heads: the STRM heads trained episodically on cached features, through the one loop (pipeline/training/loop.py).

What is particular to cached features lives here: the `frozen` and `authors` presets, the heads'
initial weights and feature standardisation from the seed and the training split, and the task
source that gathers a task's cached views (from RAM or a GPU at once; into pinned memory or from
disk with the next tasks gathered by background threads while the current one trains).

Why two presets: `authors` is the released recipe (SGD, summed loss / 16, a step every 16 tasks),
made for end-to-end training; `frozen`, the default for cached (frozen) features, was chosen by
measurement (see PRESETS): the authors' recipe diverges or stalls there.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TypeGuard

import numpy as np
import torch

from pipeline.data.episodes import EpisodeSampler, Task
from pipeline.features.cache import FeatureCache, open_cache
from pipeline.features.readers import (
    LOADINGS,
    CacheError,
    SplitFeatures,
    SplitReader,
    channel_stats,
)
from pipeline.features.recipe import fingerprint_diff
from pipeline.heads import STRMHeads, build_heads, load_heads
from pipeline.heads.variants import DEFAULT_OPTIONS, ENRICHMENTS
from pipeline.runtime import distributed
from pipeline.training.config import (
    EpisodicConfig,
    TrainError,
    check_config,
    check_validation_split,
    derived_seed,
    round_to_steps,
    training_split_message,
    unknown_draws,
)
from pipeline.training.loop import EpisodicLoop
from pipeline.training.runs import FREE
from pipeline.training.state import Estimate, TrainProgress, TrainResult, resume_point

INIT_SEED = 0x1417  # mixed with the run's seed into the heads' initial weights


@dataclass(frozen=True)
class TrainConfig(EpisodicConfig):
    """Every setting of a train-heads run; written to config.json and into each checkpoint."""

    preset: str = "frozen"
    variant: str = "strm"
    heads_options: dict = field(default_factory=dict)
    lambda_qc: float = DEFAULT_OPTIONS["lambda_qc"]
    standardize: bool = True  # per-channel feature standardisation from the training split
    augment: bool = True  # each video in a task uses one of its cached views at random
    amp: bool = True  # autocast (bf16, else fp16 with loss scaling) + TF32 on CUDA; ignored on CPU
    loading: str = field(default="auto", metadata=FREE)  # auto | ram | device | stream
    read_ahead: int = field(default=8, metadata=FREE)  # tasks read ahead when streaming


# Measured on frozen tf_efficientnet_lite0 features (see the closing report of issue 6 and
# docs): the authors' recipe diverges (lr 1e-3) or barely moves (1e-4) on cached features.
PRESETS: dict[str, dict] = {
    "authors": dict(
        optimizer="sgd",
        lr=None,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        loss_reduction="sum",
        tasks_per_step=16,
        grad_clip=0.0,
        standardize=False,
        augment=True,
        patience=0,
    ),
    "frozen": dict(
        optimizer="adamw",
        lr=1e-3,
        momentum=0.0,
        weight_decay=1e-2,
        schedule="constant",
        loss_reduction="mean",
        tasks_per_step=1,
        grad_clip=0.0,
        standardize=True,
        augment=True,
        patience=10,
    ),
}


def _integer(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _width(value: object) -> bool:
    return _integer(value) and value >= 1


def _switch(value: object) -> bool:
    return isinstance(value, bool)


# What each heads option a run may set takes (--heads-option KEY=VALUE, values as JSON): in words, and
# its test. frames, patches, lambda_qc and open_set are not here: the cache and the run's settings give them.
HEADS_OPTIONS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "trm_dim": ("an integer >= 1, e.g. 64", _width),
    "psi_dim": ("an integer >= 1 or null (D/2)", lambda v: v is None or _width(v)),
    "qc_dim": ("an integer >= 1 or null (D/2)", lambda v: v is None or _width(v)),
    "scaled_attention": ("true or false", _switch),
    "gamma_zero": ("true or false", _switch),
    "qc": ("true or false", _switch),
    "tuple_keep": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "ple": ('"attention", "mixer" or null', lambda v: v in ENRICHMENTS),
    "fle": ('"attention", "mixer" or null', lambda v: v in ENRICHMENTS),
    "joint": ("an integer >= 1 (Jnt-ST layers) or null", lambda v: v is None or _width(v)),
    "cardinalities": (
        "a list of integers >= 1, e.g. [2,3]",
        lambda v: isinstance(v, list) and bool(v) and all(map(_width, v)),
    ),
}


def check_heads_options(options: dict) -> None:
    """TrainError naming the first heads option with an unknown key or a value of the wrong kind, what it
    takes and the keys there are: before the heads are built, whose own errors would not name the option."""
    known = f"known keys: {', '.join(HEADS_OPTIONS)}"
    for key, value in options.items():
        shown = f"--heads-option {key}={json.dumps(value)}"
        if key not in HEADS_OPTIONS:
            raise TrainError(f"{shown}: no heads option {key!r}; {known}")
        words, test = HEADS_OPTIONS[key]
        if not test(value):
            raise TrainError(f"{shown}: {key} takes {words}; {known}")


def authors_lr(dataset: str | None) -> float:
    """The released learning rate: 1e-3 for SSv2, 1e-4 for HMDB51, UCF101 and Kinetics."""
    return 1e-3 if dataset and dataset.lower().startswith("ssv2") else 1e-4


def make_config(preset: str = "frozen", dataset: str | None = None, **overrides) -> TrainConfig:
    """A preset's settings, then every override that is not None; steps are rounded to the step size."""
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TrainError(f"unknown training settings: {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    if values.get("lr") is None:
        values["lr"] = authors_lr(dataset)
    config = TrainConfig(**values)
    _check(config)
    return round_to_steps(config)


def _check(config: TrainConfig) -> None:
    check_config(config)
    if config.loading not in LOADINGS:
        raise TrainError(f"loading {config.loading!r}: expected one of {', '.join(LOADINGS)}")
    fixed = {"frames", "patches", "lambda_qc", "open_set"} & set(config.heads_options)
    if fixed:
        raise TrainError(
            f"heads options {sorted(fixed)} come from the cache (L, P) and the lambda_qc and open_set settings, "
            "not heads_options"
        )
    check_heads_options(config.heads_options or {})


def starting_heads(config: TrainConfig, cache: FeatureCache, source: SplitReader | None = None) -> STRMHeads:
    """The heads a run of `config` starts from: seeded, and standardised on the training split's channel
    statistics when the preset standardises (evaluate's "untrained" baseline is exactly this).
    `source`: the training split already opened with the run's views (else it is streamed)."""
    torch.manual_seed(derived_seed(config.seed, INIT_SEED))
    try:
        heads = build_heads(
            config.variant,
            dim=cache.dim,
            frames=cache.frames,
            patches=cache.patches,
            lambda_qc=config.lambda_qc,
            **(config.heads_options or {}),
            **({"open_set": config.open_set} if config.open_set != "none" else {}),
        )
    except (TypeError, ValueError) as e:
        raise TrainError(f"heads: {e}") from None
    if config.standardize:
        views = None if config.augment else 1
        if source is None:
            source = cache.split("train", views=views, loading="stream")
        heads.set_feature_stats(*channel_stats(source, views))
    return heads


# ---------------------------------------------------------------- task inputs


def task_inputs(
    sampler: EpisodeSampler,
    indices: list[int],
    split: SplitReader,
    read_ahead: int = 8,
    device: torch.device | None = None,
) -> Generator[tuple[int, Task, torch.Tensor], None, None]:
    """(index, task, inputs [n_s + n_q, L, P, D] float16) for the given tasks, in order.

    From RAM or a GPU the gather is immediate; into pinned memory (for a GPU) or from disk up to
    `read_ahead` tasks are gathered by background threads while the caller trains on the current
    one, so the GPU does not wait for the host's copies. Pinned inputs for a CUDA `device` are also
    copied to it one task ahead on a stream of their own, so the copy overlaps the current task's
    compute instead of queueing before it.
    """
    gathered = _gathered(sampler, indices, split, read_ahead)
    if split.loading == "pinned" and device is not None and device.type == "cuda":
        yield from _copied_ahead(gathered, device)
    else:
        yield from gathered


def _copied_ahead(
    items: Iterator[tuple[int, Task, torch.Tensor]], device: torch.device
) -> Iterator[tuple[int, Task, torch.Tensor]]:
    """Task i + 1's host-to-GPU copy is issued on a side stream before task i is handed out; the compute
    stream waits only for each task's own copy (an event), and the tensor is marked as used there so
    the caching allocator does not reuse its memory early."""
    stream = torch.cuda.Stream(device)

    def issue(item: tuple[int, Task, torch.Tensor]) -> tuple[int, Task, torch.Tensor, torch.cuda.Event]:
        i, task, x = item
        with torch.cuda.stream(stream):
            y = x.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return i, task, y, done

    def hand_out(item: tuple[int, Task, torch.Tensor, torch.cuda.Event]) -> tuple[int, Task, torch.Tensor]:
        i, task, y, done = item
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        y.record_stream(compute)
        return i, task, y

    ahead = None
    for item in items:
        issued = issue(item)
        if ahead is not None:
            yield hand_out(ahead)
        ahead = issued
    if ahead is not None:
        yield hand_out(ahead)


def _gathered(
    sampler: EpisodeSampler, indices: list[int], split: SplitReader, read_ahead: int
) -> Iterator[tuple[int, Task, torch.Tensor]]:
    """The tasks' inputs gathered from `split` (by read-ahead threads when pinned or streamed)."""

    def read(i: int) -> tuple[int, Task, torch.Tensor]:
        task = sampler.task(i)
        query, _, query_views = task.open_queries()  # the known queries, then any unknown ones
        return (
            i,
            task,
            split.read(np.concatenate([task.support, query]), np.concatenate([task.support_views, query_views])),
        )

    if split.loading not in ("pinned", "stream"):
        yield from map(read, indices)
        return
    pending: deque[Future] = deque()
    todo = iter(indices)
    with ThreadPoolExecutor(max_workers=max(1, min(read_ahead, 4)), thread_name_prefix="read-ahead") as pool:
        try:
            for i in todo:
                pending.append(pool.submit(read, i))
                if len(pending) >= max(1, read_ahead):
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(read, nxt))
                yield result
        finally:
            for f in pending:
                f.cancel()


def loading_note(split: SplitReader, device: torch.device, read_ahead: int) -> str:
    """Where the training features come from, in words: the one thing that decides the speed of a GPU run."""
    size = f"{split.nbytes / 1e9:.1f} GB" if split.nbytes >= 1e8 else f"{split.nbytes / 1e6:.1f} MB"
    if split.loading == "device":
        return f"training split: device ({size} on {device})"
    if split.loading == "pinned":
        return f"training split: pinned host memory ({size} in RAM, each task gathered into pinned memory, copied to {device})"
    if split.loading == "stream":
        return f"training split: streamed from disk ({size}, {read_ahead} tasks read ahead)"
    return f"training split: ram ({size})"


@dataclass
class CachedViews:
    """The task source of train-heads: each task's videos gathered from the cache's training split."""

    sampler: EpisodeSampler
    split: SplitReader
    val_split: SplitFeatures | None
    read_ahead: int
    device: torch.device | None = None  # the training device: pinned inputs are copied there ahead

    def inputs(self, indices: list[int]) -> Generator[tuple[int, Task, torch.Tensor], None, None]:
        return task_inputs(self.sampler, indices, self.split, self.read_ahead, self.device)

    def validation_split(self, device: torch.device) -> SplitFeatures:
        assert self.val_split is not None  # train() loads it whenever the run validates
        return self.val_split


def _check_resume(ckpt: dict, cache: FeatureCache, path: Path) -> None:
    if ckpt.get("cache_fingerprint") != cache.fingerprint:
        diff = fingerprint_diff(ckpt.get("cache_fingerprint") or {}, cache.fingerprint)
        raise TrainError(f"{path}: trained on another cache than {cache.path}: " + "; ".join(diff))
    saved = ckpt.get("config", {})
    if saved.get("dim") != cache.dim or saved.get("frames") != cache.frames or saved.get("patches") != cache.patches:
        raise TrainError(
            f"{path}: heads for D={saved.get('dim')}, L={saved.get('frames')}, P*P={saved.get('patches')}; "
            f"{cache.path} holds D={cache.dim}, L={cache.frames}, P*P={cache.patches}"
        )


def _validation_split(config: TrainConfig, cache: FeatureCache, given: SplitFeatures | None) -> SplitFeatures | None:
    """The split the run validates on (`given`, else the cache's val split), checked before training
    starts so that a run whose validation tasks cannot be drawn fails now, not at its first validation."""
    if not config.val_every:
        return given
    if given is None:
        if "val" not in cache.splits:
            raise TrainError(
                f"{cache.path}: no val split to validate on (set val_every to 0 to train without validation)"
            )
        given = cache.load_split("val", views=1)
    check_validation_split(given.labels.numpy(), config, str(cache.path))
    return given


def train(
    config: TrainConfig,
    cache: FeatureCache | Path | str,
    out: Path | str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
    train_split: SplitReader | None = None,
    val_split: SplitFeatures | None = None,
    confirm: Callable[[Estimate], bool] | None = None,
) -> TrainResult:
    """Train heads on the cache's training split; write config, metrics, checkpoints and the curve to `out`.

    `resume` continues from `out/last.pt` when there is one (and starts afresh otherwise).
    `train_split` / `val_split` skip loading those splits (already in memory). `confirm` hears the speed
    of the first tasks (rank 0; False stops the run: loop.Declined). Under torchrun (after
    `distributed.init_distributed`) the tasks of each step are split across ranks; rank 0 validates and writes.
    """
    _check(config)
    out = Path(out)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    if "train" not in cache.splits:
        raise TrainError(f"{cache.path}: no train split")
    device = distributed.resolve_device(config.device)
    free = ("episodes",) if config.schedule == "constant" else ()  # a constant lr: a run may be extended or cut
    resumed = resume_point(out, resume, config, free, overwrite=overwrite)
    if resumed is not None:
        _check_resume(resumed, cache, out / "last.pt")
    views = None if config.augment else 1
    try:
        source = (
            train_split
            if train_split is not None
            else cache.split("train", views=views, loading=config.loading, device=device)
        )
    except CacheError as err:
        raise TrainError(str(err)) from None
    try:
        sampler = EpisodeSampler(
            source.labels.numpy(),
            way=config.way,
            shot=config.shot,
            queries=config.queries,
            seed=config.seed,
            views=source.views if config.augment else 1,
            **unknown_draws(config),
        )
    except ValueError as e:
        raise TrainError(training_split_message(source.labels.numpy(), config, e, str(cache.path))) from None
    val_split = _validation_split(config, cache, val_split)
    if resumed is not None:
        heads, _ = load_heads(resumed)
    else:
        heads = starting_heads(config, cache, source)
    notes = [loading_note(source, device, config.read_ahead)]
    amp = distributed.autocast_dtype(config.amp, device)
    if amp is torch.float16:
        notes.append(f"{device} has no bfloat16: autocast fp16 with loss scaling")
    heads.to(device)
    record = {**asdict(config), "dim": cache.dim, "frames": cache.frames, "patches": cache.patches}
    describe = {
        "cache": {"path": str(cache.path), "key": cache.key, "fingerprint": cache.fingerprint},
        "loading": source.loading,
    }
    loop = EpisodicLoop(
        config,
        CachedViews(sampler, source, val_split, config.read_ahead, device),
        out,
        heads=heads,
        module=heads,
        device=device,
        amp=amp,
        record=record,
        resumed=resumed,
        describe=describe,
        checkpoint_extra=lambda: {"cache_fingerprint": cache.fingerprint, "class_names": list(source.class_names)},
        notes=notes,
    )
    return replace(loop.fit(progress, confirm), config=config)
