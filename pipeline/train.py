"""Episodic training of the heads on cached features: the loop as a function, resumable and reproducible.

Why it is built this way:
- Task i depends only on (seed, i) (pipeline/episodes.py) and its dropout masks are seeded from
  (seed, i) too, so a run killed at any moment and resumed from `last.pt` ends with the same
  weights as an uninterrupted one (on CPU), and a task's gradient does not depend on which
  DDP rank computed it.
- Two presets. `authors` is the released recipe (SGD, summed loss / 16, a step every 16 tasks),
  made for end-to-end training. `frozen` is the default for cached (frozen) features, chosen by
  measurement (see PRESETS): the authors' recipe diverges or stalls there.
- Checkpoints are the project format (pipeline/heads/checkpoint.py) plus the training state; they
  are written to a temp file and renamed (save_heads), so a kill never leaves a half-written `last.pt`.
- A split that does not fit in RAM is streamed: the next tasks' videos are read from the Zarr
  cache by background threads while the current task trains.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.cache import FeatureCache, SplitFeatures, fingerprint_diff, open_cache
from pipeline.episodes import EpisodeSampler, Task
from pipeline.evaluate import evaluate
from pipeline.heads import build_heads, load_heads, save_heads

LAST, BEST, CONFIG, METRICS, CURVE = "last.pt", "best.pt", "config.json", "metrics.jsonl", "curve.png"

# Settings a resumed run may change: they do not change the numbers.
RUNTIME_FIELDS = ("device", "loading", "read_ahead")


class TrainError(ValueError):
    """Options, cache and checkpoint that do not fit together; the message names what and where."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; written to config.json and into each checkpoint."""

    preset: str = "frozen"
    variant: str = "strm"
    heads_options: dict = field(default_factory=dict)
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
    lambda_qc: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    standardize: bool = True  # per-channel feature standardisation from the training split
    augment: bool = True  # each video in a task uses one of its cached views at random
    seed: int = 0
    val_every: int = 500  # tasks; 0 = no validation
    val_episodes: int = 500
    val_queries: int = 1
    val_seed: int = 0
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    checkpoint_every: int = 250  # tasks
    log_every: int = 50  # tasks
    amp: bool = True  # bf16 autocast + TF32 on CUDA; ignored on CPU
    device: str = "auto"
    loading: str = "auto"  # auto | ram | stream
    read_ahead: int = 8  # tasks read ahead when streaming


# Measured on frozen tf_efficientnet_lite0 features (see the closing report of issue 6 and
# docs): the authors' recipe diverges (lr 1e-3) or barely moves (1e-4) on cached features.
PRESETS: dict[str, dict] = {
    "authors": dict(
        optimizer="sgd", lr=None, momentum=0.0, weight_decay=0.0, schedule="constant", loss_reduction="sum",
        tasks_per_step=16, grad_clip=0.0, standardize=False, augment=True, patience=0,
    ),
    "frozen": dict(
        optimizer="adamw", lr=1e-3, momentum=0.0, weight_decay=1e-2, schedule="constant", loss_reduction="mean",
        tasks_per_step=1, grad_clip=0.0, standardize=True, augment=True, patience=10,
    ),
}


def authors_lr(dataset: str | None) -> float:
    """The released learning rate: 1e-3 for SSv2, 1e-4 for HMDB51, UCF101 and Kinetics."""
    return 1e-3 if dataset and dataset.lower().startswith("ssv2") else 1e-4


def make_config(preset: str = "frozen", dataset: str | None = None, **overrides) -> TrainConfig:
    """A preset's settings, then every override that is not None; steps are rounded to the step size."""
    if preset not in PRESETS:
        raise TrainError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TrainError(f"unknown training settings: {', '.join(sorted(unknown))}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    if values.get("lr") is None:
        values["lr"] = authors_lr(dataset)
    config = TrainConfig(**values)
    _check(config)
    tps = config.tasks_per_step
    round_up = lambda n: n if n == 0 else -(-n // tps) * tps  # noqa: E731
    return replace(
        config,
        val_every=round_up(config.val_every),
        checkpoint_every=round_up(config.checkpoint_every),
        log_every=round_up(config.log_every),
    )


def _check(config: TrainConfig) -> None:
    if config.optimizer not in ("sgd", "adam", "adamw"):
        raise TrainError(f"optimizer {config.optimizer!r}: expected sgd, adam or adamw")
    if config.schedule not in ("constant", "cosine"):
        raise TrainError(f"schedule {config.schedule!r}: expected constant or cosine")
    if config.loss_reduction not in ("mean", "sum"):
        raise TrainError(f"loss reduction {config.loss_reduction!r}: expected mean or sum")
    if config.loading not in ("auto", "ram", "stream"):
        raise TrainError(f"loading {config.loading!r}: expected auto, ram or stream")
    if config.tasks_per_step < 1 or config.episodes < 1 or config.checkpoint_every < 1 or config.log_every < 1:
        raise TrainError("episodes, tasks_per_step, checkpoint_every and log_every must be >= 1")
    if config.episodes % config.tasks_per_step:
        raise TrainError(f"episodes ({config.episodes}) must be a multiple of tasks_per_step ({config.tasks_per_step})")
    fixed = {"frames", "patches", "lambda_qc"} & set(config.heads_options)
    if fixed:
        raise TrainError(f"heads options {sorted(fixed)} come from the cache (L, P) and the lambda_qc setting, not heads_options")
    if config.val_every and config.val_episodes < 1:
        raise TrainError("val_episodes must be >= 1 when validating")


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback gets after every optimiser step."""

    task: int  # tasks done
    total: int
    loss: float  # mean over the tasks since the last log line
    accuracy: float  # % on the training queries since the last log line
    tasks_per_s: float
    val_accuracy: float | None  # the latest validation, %
    best_val_accuracy: float | None


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended and what it reached."""

    out: Path
    tasks_done: int
    stopped_early: bool
    best_val_accuracy: float | None
    best_task: int | None
    last_checkpoint: Path
    best_checkpoint: Path | None


def _torch_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def task_seed(seed: int, index: int) -> int:
    """The torch seed of task `index` (dropout masks): a function of (seed, index) alone."""
    return _torch_seed(seed, index, 0x5EED)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); -> (rank, world)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = _device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------- task inputs


class _StreamedSplit:
    """A split read from the Zarr cache on demand: labels in RAM, features one chunk (video) at a time."""

    def __init__(self, cache: FeatureCache, split: str) -> None:
        self.rows = np.flatnonzero(cache.done(split))
        self.array = cache.features_array(split)
        self.labels = torch.from_numpy(cache.labels(split)[self.rows].astype(np.int64))

    def read(self, videos: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """[n, L, P, D] float16 for videos (indices among done videos) and their views."""
        rows = self.rows[videos]
        order = np.argsort(rows, kind="stable")
        chunks = self.array.oindex[rows[order]]  # one chunk per video, read concurrently by Zarr
        out = np.empty((len(rows),) + chunks.shape[2:], dtype=np.float16)
        out[order] = chunks[np.arange(len(rows)), views[order]]
        return torch.from_numpy(out)


def _gather(features: torch.Tensor, videos: np.ndarray, views: np.ndarray) -> torch.Tensor:
    return features[torch.from_numpy(videos), torch.from_numpy(views)]


def task_inputs(
    sampler: EpisodeSampler,
    indices: list[int],
    *,
    features: torch.Tensor | None = None,
    streamed: _StreamedSplit | None = None,
    read_ahead: int = 8,
) -> Iterator[tuple[int, Task, torch.Tensor]]:
    """(index, task, inputs [n_s + n_q, L, P, D] float16) for the given tasks, in order.

    From RAM the gather is immediate; from disk up to `read_ahead` tasks are read by background
    threads while the caller trains on the current one.
    """
    if features is not None:
        for i in indices:
            task = sampler.task(i)
            yield i, task, _gather(features, np.concatenate([task.support, task.query]),
                                   np.concatenate([task.support_views, task.query_views]))
        return
    assert streamed is not None

    def read(i: int) -> tuple[int, Task, torch.Tensor]:
        task = sampler.task(i)
        videos = np.concatenate([task.support, task.query])
        return i, task, streamed.read(videos, np.concatenate([task.support_views, task.query_views]))

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


def feature_stats(
    features: torch.Tensor | _StreamedSplit, views: int | None = None, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every video, frame and patch of the first `views` views (float64 sums)."""
    if isinstance(features, _StreamedSplit):
        n, dim = len(features.rows), features.array.shape[-1]
        blocks = (torch.from_numpy(features.array.oindex[features.rows[s : s + block]]) for s in range(0, n, block))
    else:
        n, dim = features.shape[0], features.shape[-1]
        blocks = (features[s : s + block] for s in range(0, n, block))
    blocks = (x[:, :views] for x in blocks)
    total = torch.zeros(dim, dtype=torch.float64)
    squares = torch.zeros(dim, dtype=torch.float64)
    count = 0
    for x in blocks:
        x = x.reshape(-1, dim).double()
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise TrainError("the training split has no extracted videos")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


# ---------------------------------------------------------------- checkpoints and logs


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (train and val lines), in order."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(out: Path, task: int) -> None:
    """Drop the lines written after the checkpoint a run resumes from (they will be written again)."""
    keep = [r for r in read_metrics(out) if r["task"] <= task]
    tmp = out / (METRICS + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, out / METRICS)


def plot_curve(out: Path, way: int | None = None) -> Path:
    """Training loss, training and validation accuracy against tasks, as a PNG in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["task"] for r in train], [r["loss"] for r in train], color="tab:blue")
        ax_acc.plot([r["task"] for r in train], [r["accuracy"] for r in train], label="train queries", color="tab:blue", alpha=0.6)
        if min(r["loss"] for r in train) > 0:
            ax_loss.set_yscale("log")
    if val:
        ax_acc.plot([r["task"] for r in val], [r["accuracy"] for r in val], "o-", label="validation", color="tab:orange")
    if way:
        ax_acc.axhline(100 / way, color="grey", linestyle=":", label="chance")
    ax_loss.set(xlabel="tasks", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="tasks", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    path = Path(out) / CURVE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the loop


def _check_resume(ckpt: dict, config: TrainConfig, cache: FeatureCache, path: Path) -> None:
    if ckpt.get("cache_fingerprint") != cache.fingerprint:
        diff = fingerprint_diff(ckpt.get("cache_fingerprint") or {}, cache.fingerprint)
        raise TrainError(f"{path}: trained on another cache than {cache.path}: " + "; ".join(diff))
    saved = ckpt.get("config", {})
    if saved.get("dim") != cache.dim or saved.get("frames") != cache.frames or saved.get("patches") != cache.patches:
        raise TrainError(
            f"{path}: heads for D={saved.get('dim')}, L={saved.get('frames')}, P*P={saved.get('patches')}; "
            f"{cache.path} holds D={cache.dim}, L={cache.frames}, P*P={cache.patches}"
        )
    mine = asdict(config)
    differ = [k for k in mine if k not in RUNTIME_FIELDS and saved.get(k) != mine[k]]
    if differ:
        raise TrainError(
            f"{path}: the run was started with other settings: "
            + "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine[k]!r} asked" for k in differ)
        )


def _load_split(cache: FeatureCache, split: str, loading: str, views: int | None) -> SplitFeatures | _StreamedSplit:
    if loading == "auto":
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 0
        loading = "ram" if available == 0 or cache.split_nbytes(split, views) < 0.5 * available else "stream"
    return cache.load_split(split, views=views) if loading == "ram" else _StreamedSplit(cache, split)


def train(
    config: TrainConfig,
    cache: FeatureCache | Path | str,
    out: Path | str,
    *,
    resume: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
    train_split: SplitFeatures | None = None,
    val_split: SplitFeatures | None = None,
) -> TrainResult:
    """Train heads on the cache's training split; write config, metrics, checkpoints and the curve to `out`.

    `resume` continues from `out/last.pt` when there is one (and starts afresh otherwise).
    `train_split` / `val_split` skip loading those splits (tensors already in memory).
    Under torchrun (after `init_distributed`) the tasks of each optimiser step are split across
    ranks; rank 0 writes the files.
    """
    _check(config)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    out = Path(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if config.tasks_per_step % world:
        raise TrainError(
            f"{world} processes share the {config.tasks_per_step} tasks of an optimiser step: "
            "tasks_per_step must be a multiple of the number of processes"
        )
    device = _device(config.device)
    cuda = device.type == "cuda"
    if cuda and config.amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config.amp else nullcontext()

    # ---- data
    if "train" not in cache.splits:
        raise TrainError(f"{cache.path}: no train split")
    views = None if config.augment else 1
    source = train_split if train_split is not None else _load_split(cache, "train", config.loading, views)
    labels = source.labels.numpy()
    try:
        sampler = EpisodeSampler(
            labels, way=config.way, shot=config.shot, queries=config.queries, seed=config.seed,
            views=(source.features.shape[1] if isinstance(source, SplitFeatures) else cache.views("train")) if config.augment else 1,
        )
    except ValueError as e:
        raise TrainError(f"{cache.path} train split: {e}") from None
    if config.val_every:
        if val_split is None:
            if "val" not in cache.splits:
                raise TrainError(f"{cache.path}: no val split to validate on (set val_every to 0 to train without validation)")
            val_split = cache.load_split("val", views=1)
        try:
            EpisodeSampler(val_split.labels.numpy(), way=config.way, shot=config.shot, queries=config.val_queries, seed=0)
        except ValueError as e:
            raise TrainError(f"{cache.path} val split: {e}") from None

    # ---- model, optimiser, schedule: fresh or from last.pt
    last_path, best_path = out / LAST, out / BEST
    record = {**asdict(config), "dim": cache.dim, "frames": cache.frames, "patches": cache.patches}
    ckpt = torch.load(last_path, map_location="cpu", weights_only=True) if resume and last_path.exists() else None
    if not resume and last_path.exists():
        raise TrainError(f"{last_path}: the run folder already holds a run; resume it or choose another folder")
    if ckpt is not None:
        _check_resume(ckpt, config, cache, last_path)
        heads, _ = load_heads(ckpt)
    else:
        torch.manual_seed(_torch_seed(config.seed, 0x1417))  # the initial weights, too, come from the seed
        try:
            heads = build_heads(config.variant, dim=cache.dim, frames=cache.frames, patches=cache.patches,
                                lambda_qc=config.lambda_qc, **config.heads_options)
        except (TypeError, ValueError) as e:
            raise TrainError(f"heads: {e}") from None
        if config.standardize:
            heads.set_feature_stats(*feature_stats(source.features if isinstance(source, SplitFeatures) else source, views))
    heads.to(device).train()
    model = torch.nn.parallel.DistributedDataParallel(heads) if world > 1 else heads

    params = [p for p in heads.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.episodes // config.tasks_per_step
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    state = {"best_val": None, "best_task": None, "bad_validations": 0, "last_val": None, "stopped": False,
             "window": {"loss": 0.0, "correct": 0.0, "queries": 0.0, "tasks": 0.0}}
    start = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        start = int(ckpt["task_index"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            (out / METRICS).write_text("")
            best_path.unlink(missing_ok=True)  # left by a run killed before its first last.pt
        else:
            _truncate_metrics(out, start)
        info = {"config": record, "cache": {"path": str(cache.path), "key": cache.key, "fingerprint": cache.fingerprint},
                "world_size": world, "device": str(device), "torch": torch.__version__, "resumed_from_task": start}
        (out / CONFIG).write_text(json.dumps(info, indent=2) + "\n")

    def save(path: Path, **more) -> None:
        save_heads(  # temp file + os.replace: a kill never leaves a half-written checkpoint
            path, heads, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=_rng_state(),
            task_index=done, config=record, cache_fingerprint=cache.fingerprint, state=state, world_size=world, **more,
        )

    # ---- the loop: this rank's share of every step's tasks
    tps = config.tasks_per_step
    end = start if state["stopped"] else config.episodes  # a run that stopped early stays stopped
    mine = [i for s in range(start, end, tps) for i in range(s + rank, s + tps, world)]
    inputs = task_inputs(
        sampler, mine, features=source.features if isinstance(source, SplitFeatures) else None,
        streamed=None if isinstance(source, SplitFeatures) else source, read_ahead=config.read_ahead,
    )
    n_s = config.way * config.shot
    per_rank = tps // world
    done, stopped = start, state["stopped"]
    window_start = time.perf_counter()
    window_tasks = 0
    try:
        for s in range(start, end, tps):
            for k in range(per_rank):
                i, task, x = next(inputs)
                x = x.to(device, non_blocking=True).float()
                s_lab = torch.from_numpy(task.support_labels).to(device)
                q_lab = torch.from_numpy(task.query_labels).to(device)
                torch.manual_seed(task_seed(config.seed, i))
                sync = model.no_sync() if world > 1 and k < per_rank - 1 else nullcontext()
                with sync:
                    with autocast:
                        output = model(x[:n_s], s_lab, x[n_s:])
                    loss = F.cross_entropy(output.trm_logits.float(), q_lab, reduction=config.loss_reduction)
                    if output.qc_logits is not None and config.lambda_qc:
                        loss = loss + config.lambda_qc * F.cross_entropy(
                            output.qc_logits.float(), q_lab, reduction=config.loss_reduction)
                    (loss * (world / tps)).backward()
                w = state["window"]
                w["loss"] += float(loss.detach())
                w["correct"] += float((output.logits.detach().argmax(-1) == q_lab).sum())
                w["queries"] += len(q_lab)
                w["tasks"] += 1
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done = s + tps
            window_tasks += tps
            elapsed = time.perf_counter() - window_start
            rate = window_tasks / elapsed if elapsed > 0 else 0.0
            if progress is not None:
                w = state["window"]
                progress(TrainProgress(done, config.episodes, w["loss"] / max(w["tasks"], 1),
                                       100 * w["correct"] / max(w["queries"], 1), rate, state["last_val"], state["best_val"]))

            if done % config.log_every == 0 or done == config.episodes:
                w = state["window"]
                sums = torch.tensor([w["loss"], w["correct"], w["queries"], w["tasks"]], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(sums)
                line = {"kind": "train", "task": done, "loss": sums[0].item() / max(sums[3].item(), 1),
                        "accuracy": 100 * sums[1].item() / max(sums[2].item(), 1), "lr": scheduler.get_last_lr()[0],
                        "tasks_per_s": rate}
                state["window"] = {"loss": 0.0, "correct": 0.0, "queries": 0.0, "tasks": 0.0}
                window_start, window_tasks = time.perf_counter(), 0
                if rank == 0:
                    with open(out / METRICS, "a") as f:
                        f.write(json.dumps(line) + "\n")

            validated = bool(config.val_every) and (done % config.val_every == 0 or done == config.episodes)
            if validated:
                improved = False
                if rank == 0:
                    heads.eval()
                    result = evaluate(heads, val_split, episodes=config.val_episodes, way=config.way, shot=config.shot,
                                      queries=config.val_queries, seed=config.val_seed, device=str(device))
                    heads.train()
                    accuracy = float(result.mean)
                    improved = state["best_val"] is None or accuracy > state["best_val"]
                    with open(out / METRICS, "a") as f:
                        f.write(json.dumps({"kind": "val", "task": done, "accuracy": accuracy,
                                            "ci95": float(result.ci95), "best": improved}) + "\n")
                    verdict = torch.tensor([accuracy, float(improved)], dtype=torch.float64)
                else:
                    verdict = torch.zeros(2, dtype=torch.float64)
                if world > 1:
                    dist.broadcast(verdict, 0)
                accuracy, improved = verdict[0].item(), bool(verdict[1].item())
                state["last_val"] = accuracy
                if improved:
                    state["best_val"], state["best_task"], state["bad_validations"] = accuracy, done, 0
                    if rank == 0:
                        save(best_path, val={"accuracy": accuracy, "ci95": float(result.ci95),
                                             "episodes": config.val_episodes, "seed": config.val_seed})
                else:
                    state["bad_validations"] += 1
                stopped = state["stopped"] = bool(config.patience) and state["bad_validations"] >= config.patience
                if rank == 0:
                    plot_curve(out, config.way)

            if rank == 0 and (done % config.checkpoint_every == 0 or validated or done == config.episodes or stopped):
                save(last_path)
            if stopped:
                break
    finally:
        inputs.close()
    if rank == 0:
        plot_curve(out, config.way)
    return TrainResult(
        out=out, tasks_done=done, stopped_early=stopped, best_val_accuracy=state["best_val"],
        best_task=state["best_task"], last_checkpoint=last_path,
        best_checkpoint=best_path if state["best_task"] is not None else None,
    )
