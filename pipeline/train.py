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

# Settings a resumed run may change: they do not change the numbers (nor does `episodes` under a
# constant schedule: a run can be extended or cut short).
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
    loss: float  # mean over the tasks since the last log line (nan before the first task)
    accuracy: float  # % on the training queries since the last log line (nan before the first task)
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
    features: torch.Tensor | _StreamedSplit, views: int | None = None, max_videos: int = 2048, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the frames and patches of the first `views` views (float64 sums).

    At most `max_videos` evenly spaced videos are read: plenty for D means and stds, and it keeps a
    streamed split (SSv2 at D=2048 is ~140 GB) from being read once just for its statistics. RAM and
    streamed splits use the same videos, so the loading mode never changes the numbers.
    """
    n = len(features.rows) if isinstance(features, _StreamedSplit) else features.shape[0]
    if n == 0:
        raise TrainError("the training split has no extracted videos")
    picks = np.unique(np.linspace(0, n - 1, min(n, max_videos)).round().astype(np.int64))
    total = squares = None
    count = 0
    for start in range(0, len(picks), block):
        chosen = picks[start : start + block]
        if isinstance(features, _StreamedSplit):
            x = torch.from_numpy(features.array.oindex[features.rows[chosen]])
        else:
            x = features[torch.from_numpy(chosen)]
        x = x[:, :views].reshape(-1, x.shape[-1]).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
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
    """The records of a run's metrics.jsonl (train and val lines), in order.

    A last line cut short by a kill is dropped: the resumed run writes it again.
    """
    path = Path(out) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise
    return records


def _truncate_metrics(out: Path, task: int) -> None:
    """Drop the lines written after the checkpoint a run resumes from (they will be written again)."""
    keep = [r for r in read_metrics(out) if r["task"] <= task]
    _write_atomic(out / METRICS, "".join(json.dumps(r) + "\n" for r in keep))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    free = RUNTIME_FIELDS + (("episodes",) if config.schedule == "constant" else ())  # a constant lr: extend or cut a run
    differ = [k for k in mine if k not in free and saved.get(k) != mine[k]]
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


class _Run:
    """One training run's model, optimiser, schedule, bookkeeping and files; `fit` is the loop."""

    def __init__(
        self, config: TrainConfig, cache: FeatureCache, out: Path, *, resume: bool,
        source: SplitFeatures | _StreamedSplit, sampler: EpisodeSampler, val_split: SplitFeatures | None,
    ) -> None:
        self.config, self.cache, self.out = config, cache, out
        self.source, self.sampler, self.val_split = source, sampler, val_split
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if config.tasks_per_step % self.world:
            raise TrainError(
                f"{self.world} processes share the {config.tasks_per_step} tasks of an optimiser step: "
                "tasks_per_step must be a multiple of the number of processes"
            )
        self.device = _device(config.device)
        amp = self.device.type == "cuda" and config.amp
        if amp:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
        self.last_path, self.best_path = out / LAST, out / BEST
        self.record = {**asdict(config), "dim": cache.dim, "frames": cache.frames, "patches": cache.patches}

        if not resume and self.last_path.exists():
            raise TrainError(f"{self.last_path}: the run folder already holds a run; resume it or choose another folder")
        ckpt = torch.load(self.last_path, map_location="cpu", weights_only=True) if resume and self.last_path.exists() else None
        if ckpt is not None:
            _check_resume(ckpt, config, cache, self.last_path)
            self.heads, _ = load_heads(ckpt)
        else:
            self.heads = self._fresh_heads()
        self.heads.to(self.device).train()
        self.model = torch.nn.parallel.DistributedDataParallel(self.heads) if self.world > 1 else self.heads
        self.params = [p for p in self.heads.parameters() if p.requires_grad]
        self.optimizer = _optimizer(config, self.params)
        steps = config.episodes // config.tasks_per_step
        factor = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if config.schedule == "cosine" else (lambda s: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.state = {"best_val": None, "best_task": None, "bad_validations": 0, "last_val": None, "stopped": False,
                      "window": _empty_window()}
        self.done = self.saved = 0  # tasks trained; tasks in last.pt
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            self.state = ckpt["state"]
            self.done = self.saved = int(ckpt["task_index"])
        if self.rank == 0:
            self._start_files(resumed=ckpt is not None)

    def _fresh_heads(self) -> torch.nn.Module:
        config, cache = self.config, self.cache
        torch.manual_seed(_torch_seed(config.seed, 0x1417))  # the initial weights, too, come from the seed
        try:
            heads = build_heads(config.variant, dim=cache.dim, frames=cache.frames, patches=cache.patches,
                                lambda_qc=config.lambda_qc, **config.heads_options)
        except (TypeError, ValueError) as e:
            raise TrainError(f"heads: {e}") from None
        if config.standardize:
            features = self.source.features if isinstance(self.source, SplitFeatures) else self.source
            heads.set_feature_stats(*feature_stats(features, None if config.augment else 1))
        return heads

    def _start_files(self, resumed: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed:
            _truncate_metrics(self.out, self.done)
        else:
            _write_atomic(self.out / METRICS, "")
            self.best_path.unlink(missing_ok=True)  # left by a run killed before its first last.pt
        cache = self.cache
        info = {"config": self.record, "cache": {"path": str(cache.path), "key": cache.key, "fingerprint": cache.fingerprint},
                "world_size": self.world, "device": str(self.device), "torch": torch.__version__,
                "resumed_from_task": self.done}
        _write_atomic(self.out / CONFIG, json.dumps(info, indent=2) + "\n")

    def _save(self, path: Path, **more) -> None:
        if path == self.last_path:
            self.saved = self.done
        save_heads(  # temp file + os.replace: a kill never leaves a half-written checkpoint
            path, self.heads, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            rng=_rng_state(), task_index=self.done, config=self.record, cache_fingerprint=self.cache.fingerprint,
            state=self.state, world_size=self.world, **more,
        )

    def _append(self, line: dict) -> None:
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _task(self, index: int, task: Task, x: torch.Tensor, sync: bool) -> None:
        """Forward and backward of one task; gradients add up until the optimiser step."""
        config, device = self.config, self.device
        n_s = config.way * config.shot
        x = x.to(device, non_blocking=True).float()
        s_lab = torch.from_numpy(task.support_labels).to(device)
        q_lab = torch.from_numpy(task.query_labels).to(device)
        torch.manual_seed(task_seed(config.seed, index))  # dropout: the same masks on any rank, after any resume
        with nullcontext() if sync or self.world == 1 else self.model.no_sync():
            with self.autocast():
                output = self.model(x[:n_s], s_lab, x[n_s:])
            loss = F.cross_entropy(output.trm_logits.float(), q_lab, reduction=config.loss_reduction)
            if output.qc_logits is not None and config.lambda_qc:
                loss = loss + config.lambda_qc * F.cross_entropy(output.qc_logits.float(), q_lab, reduction=config.loss_reduction)
            # Each task's share of the step; DDP averages over ranks, hence the factor world.
            (loss * (self.world / config.tasks_per_step)).backward()
        w = self.state["window"]
        w["loss"] += float(loss.detach())
        w["correct"] += float((output.logits.detach().argmax(-1) == q_lab).sum())
        w["queries"] += len(q_lab)
        w["tasks"] += 1

    def _log(self, rate: float) -> None:
        """A train line in metrics.jsonl: means over the tasks since the previous one, all ranks."""
        w = self.state["window"]
        sums = torch.tensor([w["loss"], w["correct"], w["queries"], w["tasks"]], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        loss, correct, queries, tasks = sums.tolist()
        self.state["window"] = _empty_window()
        if self.rank == 0:
            self._append({"kind": "train", "task": self.done, "loss": loss / max(tasks, 1),
                          "accuracy": 100 * correct / max(queries, 1), "lr": self.scheduler.get_last_lr()[0],
                          "tasks_per_s": rate})

    def _validate(self) -> None:
        """Rank 0 evaluates the fixed validation tasks; every rank learns the verdict (best? stop?)."""
        config = self.config
        verdict = torch.zeros(3, dtype=torch.float64, device=self.device)  # NCCL only moves CUDA tensors
        if self.rank == 0:
            result = evaluate(self.heads, self.val_split, episodes=config.val_episodes, way=config.way, shot=config.shot,
                              queries=config.val_queries, seed=config.val_seed, device=str(self.device))
            self.heads.train()
            best = self.state["best_val"]
            verdict[:] = torch.tensor([result.mean, result.ci95, float(best is None or result.mean > best)], dtype=torch.float64)
        if self.world > 1:
            dist.broadcast(verdict, 0)
        accuracy, ci95, improved = verdict.tolist()
        improved = bool(improved)
        state = self.state
        state["last_val"] = accuracy
        if improved:
            state["best_val"], state["best_task"], state["bad_validations"] = accuracy, self.done, 0
        else:
            state["bad_validations"] += 1
        state["stopped"] = bool(config.patience) and state["bad_validations"] >= config.patience
        if self.rank == 0:
            self._append({"kind": "val", "task": self.done, "accuracy": accuracy, "ci95": ci95, "best": improved})
            if improved:
                self._save(self.best_path, val={"accuracy": accuracy, "ci95": ci95,
                                                "episodes": config.val_episodes, "seed": config.val_seed})
            plot_curve(self.out, config.way)

    def fit(self, progress: Callable[[TrainProgress], None] | None) -> TrainResult:
        """Train from task `done` to the end (or the early stop); this rank takes its share of each step."""
        config, state = self.config, self.state
        tps, per_rank = config.tasks_per_step, config.tasks_per_step // self.world
        end = self.done if state["stopped"] else config.episodes  # a run that stopped early stays stopped
        mine = [i for s in range(self.done, end, tps) for i in range(s + self.rank, s + tps, self.world)]
        inputs = task_inputs(
            self.sampler, mine, features=self.source.features if isinstance(self.source, SplitFeatures) else None,
            streamed=self.source if isinstance(self.source, _StreamedSplit) else None, read_ahead=config.read_ahead,
        )
        window_start, window_tasks = time.perf_counter(), 0
        if progress is not None:  # where the run starts (a resumed run starts part-way)
            progress(TrainProgress(self.done, config.episodes, math.nan, math.nan, 0.0, state["last_val"], state["best_val"]))
        try:
            for step_start in range(self.done, end, tps):
                for k in range(per_rank):
                    index, task, x = next(inputs)
                    self._task(index, task, x, sync=k == per_rank - 1)
                grads = [p.grad for p in self.params if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)  # the same on every rank: DDP averaged the gradients
                if not torch.isfinite(norm):
                    kept = f"{self.last_path} holds task {self.saved}" if self.saved else "no checkpoint was written yet"
                    raise TrainError(
                        f"training diverged: the gradient of tasks {step_start}-{step_start + tps - 1} is not finite; "
                        f"{kept}; lower the learning rate (now {config.lr:g})"
                    )
                if config.grad_clip:
                    torch.nn.utils.clip_grads_with_norm_(self.params, config.grad_clip, norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.done = step_start + tps
                window_tasks += tps
                rate = window_tasks / max(time.perf_counter() - window_start, 1e-9)
                if progress is not None:
                    w = state["window"]
                    progress(TrainProgress(self.done, config.episodes, w["loss"] / max(w["tasks"], 1),
                                           100 * w["correct"] / max(w["queries"], 1), rate,
                                           state["last_val"], state["best_val"]))
                final = self.done == config.episodes
                if self.done % config.log_every == 0 or final:
                    self._log(rate)
                    window_start, window_tasks = time.perf_counter(), 0
                validate = bool(config.val_every) and (self.done % config.val_every == 0 or final)
                if validate:
                    self._validate()
                if self.rank == 0 and (validate or final or state["stopped"] or self.done % config.checkpoint_every == 0):
                    self._save(self.last_path)
                if state["stopped"]:
                    break
        finally:
            inputs.close()
        if self.rank == 0:
            plot_curve(self.out, config.way)
        return TrainResult(
            out=self.out, tasks_done=self.done, stopped_early=state["stopped"], best_val_accuracy=state["best_val"],
            best_task=state["best_task"], last_checkpoint=self.last_path,
            best_checkpoint=self.best_path if state["best_task"] is not None else None,
        )


def _empty_window() -> dict:
    return {"loss": 0.0, "correct": 0.0, "queries": 0.0, "tasks": 0.0}


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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
    ranks; rank 0 validates and writes the files.
    """
    _check(config)
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    if "train" not in cache.splits:
        raise TrainError(f"{cache.path}: no train split")
    views = None if config.augment else 1
    source = train_split if train_split is not None else _load_split(cache, "train", config.loading, views)
    n_views = source.features.shape[1] if isinstance(source, SplitFeatures) else cache.views("train")
    try:
        sampler = EpisodeSampler(source.labels.numpy(), way=config.way, shot=config.shot, queries=config.queries,
                                 seed=config.seed, views=n_views if config.augment else 1)
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
    run = _Run(config, cache, Path(out), resume=resume, source=source, sampler=sampler, val_split=val_split)
    return run.fit(progress)
