"""The one episodic training loop, shared by train-heads (cached views) and finetune (decoded clips).

What it does, once for both: the optimiser and its schedule; steps of N tasks with gradient
accumulation (and DDP's no_sync on all but a step's last task); this rank's share of each step;
the finite-gradient check before every optimiser step; optional autocast and GradScaler; the
metric window and its log lines; validation every K tasks, rank 0's verdict broadcast; best.pt
and last.pt; early stop; resume with the same RNG states. What differs between the two stages is
where a task's inputs come from and how validation features are made: a `TaskSource` passed in.

Why task i is reproducible: its videos, views and dropout masks are functions of (seed, i) alone
(the episode sampler, and `task_seed` in pipeline/training/config.py), so a run killed at any moment and resumed from `last.pt` ends
with the weights of an uninterrupted one (on CPU), and a task's gradient does not depend on which
rank computed it. Collectives go through pipeline/runtime/distributed.py, on the training device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from contextlib import nullcontext
from dataclasses import asdict, astuple
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn

from pipeline.data.episodes import Task
from pipeline.evaluation.batched import evaluate
from pipeline.features.readers import SplitReader
from pipeline.features.weights import file_sha256
from pipeline.heads import STRMHeads, save_heads
from pipeline.runtime import distributed
from pipeline.training.config import EpisodicConfig, TrainError, task_seed, validation_way
from pipeline.training.runs import (
    BEST,
    LAST,
    RunLog,
    plot_curve,
)
from pipeline.training.state import (
    Estimate,
    MetricWindow,
    RunState,
    TrainProgress,
    TrainResult,
    newer_best,
    rng_state,
    set_rng_state,
)

PROBE_TASKS = 2  # tasks run before `confirm` is asked; the first one includes the warm-up
# fp16 steps in a row the loss scaler may skip (gradient not finite) before the run counts as diverged:
# each skip halves the scale, so by then it has fallen by 2**20 and the gradient is not an overflow.
SKIPPED_STEPS = 20


class Declined(RuntimeError):
    """`confirm` declined the run after the timed first tasks; nothing was saved."""


class TaskSource(Protocol):
    """Where a run's tasks and validation features come from (cached views, or clips through the backbone)."""

    def inputs(self, indices: list[int]) -> Generator[tuple[int, Task, torch.Tensor], None, None]:
        """(index, task, inputs [n_s + n_q, ...] support first) for the given tasks, in order; a generator."""

    def validation_split(self, device: torch.device) -> SplitReader:
        """Rank 0's validation features with the model as it is now (view 0 of the val split)."""


def _unreached_parameters(heads: STRMHeads) -> list[nn.Parameter]:
    """Parameters the loss never reaches: QC's when lambda_qc is 0 (STRMHeads.loss leaves its term out).

    Frozen before DDP is built: DDP would wait for their gradients and fail the next step.
    """
    return list(heads.qc.parameters()) if heads.qc is not None and not heads.lambda_qc else []


def make_optimizer(config: EpisodicConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class EpisodicLoop:
    """One run: the model being trained, its optimiser, schedule, state and files; `fit` is the loop.

    `heads` are the STRM heads (validated, saved); `module` is what a task runs (the heads, or the
    backbone and heads as one module) with forward(support, labels, query) -> HeadsOutput. `record`
    is the config as written to config.json and checkpoints; `describe` adds to config.json;
    `checkpoint_extra()` adds entries to every checkpoint (cache fingerprint, backbone weights).
    """

    def __init__(
        self,
        config: EpisodicConfig,
        source: TaskSource,
        out: Path,
        *,
        heads: STRMHeads,
        module: nn.Module,
        device: torch.device,
        amp: torch.dtype | None,
        record: dict,
        resumed: dict | None,
        describe: dict,
        checkpoint_extra: Callable[[], dict] = dict,
        notes: list[str] | None = None,
        divergence_hint: str = "",
    ) -> None:
        self.config, self.source, self.out = config, source, out
        self.rank, self.world = distributed.rank_world()  # check_config made tasks_per_step a multiple of world
        self.heads, self.module, self.device, self.amp = heads, module, device, amp
        self.record, self.extra, self.notes, self.hint = record, checkpoint_extra, list(notes or []), divergence_hint
        distributed.enable_tf32(device)
        if self.world > 1:
            self.notes.append(
                f"rank 0 validates alone; the other ranks wait for it at most {distributed.COLLECTIVE_TIMEOUT} "
                "(the collectives' timeout)"
            )
        module.train()
        for p in _unreached_parameters(heads):
            p.requires_grad_(False)
        cuda = device.type == "cuda"
        self.ddp = (
            nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
            if self.world > 1
            else module
        )
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(config, self.params)
        steps = config.episodes // config.tasks_per_step
        factor = (
            (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            if config.schedule == "cosine"
            else (lambda s: 1.0)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        self.state = RunState()
        self.done = self.saved = 0  # tasks trained; tasks in last.pt
        self.skipped = 0  # optimiser steps in a row whose gradient was not finite (fp16 loss scaling)
        if resumed is not None:
            self._restore(resumed)
        self.log = None
        self.newer_best: tuple[int, float] | None = None  # best.pt written after the last.pt resumed from
        if self.rank == 0:
            self.log = RunLog(out, config.tensorboard)
            if resumed is None:
                (out / BEST).unlink(missing_ok=True)  # left by a run killed before its first last.pt
            else:
                self.newer_best = newer_best(out / BEST, self.state)
                if self.newer_best is not None:
                    self.notes.append(
                        f"best.pt was saved after last.pt (task {self.newer_best[0]}, validation "
                        f"{self.newer_best[1]:.2f}%): a replayed validation replaces it only if it is not worse"
                    )
            self.log.start(
                {
                    "config": record,
                    **describe,
                    "notes": self.notes,
                    "world_size": self.world,
                    "device": str(device),
                    "torch": torch.__version__,
                    "resumed_from_task": self.done,
                },
                None if resumed is None else self.done,
            )

    def _restore(self, resumed: dict) -> None:
        """Optimiser, schedule, scaler, RNG and run state from the last.pt this run resumes."""
        out = self.out
        try:
            self.optimizer.load_state_dict(resumed["optimizer"])
        except ValueError as err:  # another set of trained parameters (e.g. QC, frozen at lambda_qc 0 since)
            raise TrainError(
                f"{out / LAST}: its optimiser state does not fit these heads' trained parameters "
                f"({err}); start a new run folder"
            ) from None
        if resumed.get("scheduler"):
            self.scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        set_rng_state(resumed["rng"])
        self.state = RunState.from_dict(resumed["state"])
        if self.rank != 0:  # the saved window is every rank's sum: rank 0 carries it, or _log counts it twice
            self.state.window = MetricWindow()
        self.done = self.saved = int(resumed["task_index"])

    # ------------------------------------------------------------------ one task, one step

    def _task(self, index: int, task: Task, x: torch.Tensor, sync: bool) -> None:
        """Forward and backward of one task; gradients add up until the optimiser step."""
        config, device = self.config, self.device
        n_s = config.way * config.shot
        x = x.to(device, non_blocking=True)
        s_lab = torch.from_numpy(task.support_labels).to(device)
        q_lab = torch.from_numpy(task.open_queries()[1]).to(device)  # unknown queries (if any) labelled -1
        torch.manual_seed(task_seed(config.seed, index))  # dropout: the same masks on any rank, after any resume
        # self.ddp is the DistributedDataParallel wrapper whenever world > 1.
        ddp = cast(nn.parallel.DistributedDataParallel, self.ddp)
        with nullcontext() if sync or self.world == 1 else ddp.no_sync():
            with torch.autocast(device.type, dtype=self.amp) if self.amp else nullcontext():
                output = self.ddp(x[:n_s], s_lab, x[n_s:])
                loss = self.heads.loss(
                    output, q_lab, reduction=config.loss_reduction, open_set_weight=config.open_set_weight
                )
            # Each task's share of the step; DDP averages over ranks, hence the factor world.
            self.scaler.scale(loss * (self.world / config.tasks_per_step)).backward()
        w = self.state.window
        known = q_lab >= 0
        logits = output.logits.detach()
        w.loss += float(loss.detach())
        w.correct += float((logits.argmax(-1) == q_lab)[known].sum())
        w.queries += int(known.sum())
        w.logit_scale += float(logits[known].abs().mean())  # how far the logits have grown (issue #23)
        w.tasks += 1

    def _step(self, first_task: int) -> None:
        """Check, clip and apply the step's accumulated gradient."""
        config = self.config
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)  # the same on every rank: DDP averaged the gradients
        finite = bool(torch.isfinite(norm))
        self.skipped = 0 if finite else self.skipped + 1
        # Under fp16 loss scaling a non-finite gradient is the scaler's to handle (it skips the step and lowers
        # the scale), up to SKIPPED_STEPS steps in a row.
        if not finite and (not self.scaler.is_enabled() or self.skipped == SKIPPED_STEPS):
            first = first_task - (self.skipped - 1) * config.tasks_per_step
            skips = f" ({self.skipped} steps in a row skipped by the fp16 loss scaler)" if self.skipped > 1 else ""
            kept = f"{self.out / LAST} holds task {self.saved}" if self.saved else "no checkpoint was written yet"
            raise TrainError(
                f"training diverged: the gradient of tasks {first}-{first_task + config.tasks_per_step - 1} "
                f"is not finite{skips}; {kept}; lower the learning rate (now {config.lr:g}){self.hint}"
            )
        if config.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, config.grad_clip, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ------------------------------------------------------------------ logs, validation, checkpoints

    def _memory(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def _log(self, rate: float) -> None:
        """A train line: means over the tasks since the previous one, all ranks."""
        w = self.state.window
        loss, correct, queries, scale, tasks = distributed.sum_values(
            [w.loss, w.correct, w.queries, w.logit_scale, w.tasks], self.device
        )
        self.state.window = MetricWindow()
        if self.log is not None:
            self.log.write(
                {
                    "kind": "train",
                    "task": self.done,
                    "loss": loss / max(tasks, 1),
                    "accuracy": 100 * correct / max(queries, 1),
                    "logit_scale": scale / max(tasks, 1),
                    "lr": self.scheduler.get_last_lr()[0],
                    "tasks_per_s": rate,
                    "gpu_memory_gib": self._memory(),
                }
            )

    def _validate(self) -> None:
        """Rank 0 evaluates the fixed validation tasks; every rank learns the verdict (best? stop?)."""
        config, state = self.config, self.state
        verdict = [0.0, 0.0, 0.0]
        if self.rank == 0:
            split = self.source.validation_split(self.device)
            result = evaluate(
                self.heads,
                split,
                episodes=config.val_episodes,
                way=validation_way(config),
                shot=config.shot,
                queries=config.val_queries,
                seed=config.val_seed,
                device=self.device,
            )
            verdict = [result.mean, result.ci95, float(state.best_val is None or result.mean > state.best_val)]
        self.module.train()
        accuracy, ci95, improved = distributed.broadcast_values(verdict, self.device)
        improved = bool(improved)
        state.last_val = accuracy
        if improved:
            state.best_val, state.best_task, state.bad_validations = accuracy, self.done, 0
        else:
            state.bad_validations += 1
        state.stopped = bool(config.patience) and state.bad_validations >= config.patience
        if self.log is not None:
            self.log.write({"kind": "val", "task": self.done, "accuracy": accuracy, "ci95": ci95, "best": improved})
            if not self._replay_keeps_newer_best() and improved:
                self._save_best(accuracy, ci95)
            plot_curve(self.out, config.way)

    def _replay_keeps_newer_best(self) -> bool | None:
        """At the task of a best.pt written after the last.pt this run resumed from: True when that file
        beats what the replay has found (on a GPU a replay is not bit-identical), and the state then
        follows the file; None before that task or without such a file."""
        newer, state = self.newer_best, self.state
        if newer is None or self.done < newer[0]:
            return None
        self.newer_best = None
        if state.best_val is None or newer[1] > state.best_val:
            state.best_task, state.best_val = newer
            return True
        return False

    def _save_best(self, accuracy: float, ci95: float) -> None:
        config = self.config
        self._save(
            self.out / BEST,
            val={"accuracy": accuracy, "ci95": ci95, "episodes": config.val_episodes, "seed": config.val_seed},
        )
        self.state.best_sha256 = file_sha256(self.out / BEST)

    def _save(self, path: Path, window: MetricWindow | None = None, **more) -> None:
        """`window`: the metric window to store (last.pt: every rank's sum); this rank's by default."""
        if path.name == LAST:
            self.saved = self.done
        state = {**asdict(self.state), "window": asdict(window or self.state.window)}
        save_heads(  # temp file + os.replace: a kill never leaves a half-written checkpoint
            path,
            self.heads,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_state(),
            task_index=self.done,
            config=self.record,
            state=state,
            world_size=self.world,
            **self.extra(),
            **more,
        )

    def _probe(
        self, seen: int, first_end: float, total: int, confirm: Callable[[Estimate], bool], first_task: int
    ) -> None:
        """After the first tasks, rank 0 asks `confirm` with the measured speed; every rank learns the answer."""
        estimate = Estimate(
            (time.perf_counter() - first_end) / (seen - 1),  # the first task, with the warm-up, is not timed
            total - seen,
            str(self.device),
            run_tasks=self.config.episodes,
            first_task=first_task,
            world=self.world,
        )
        go = 1.0 if self.rank != 0 or confirm(estimate) else 0.0
        if not distributed.broadcast_values([go], self.device)[0]:
            raise Declined(
                f"declined after {PROBE_TASKS} timed tasks ({estimate.seconds_per_task:.1f} s a task on {self.device})"
            )

    # ------------------------------------------------------------------ the loop

    def fit(
        self, progress: Callable[[TrainProgress], None] | None = None, confirm: Callable[[Estimate], bool] | None = None
    ) -> TrainResult:
        """Train from task `done` to the end (or the early stop); this rank takes its share of each step."""
        config, state = self.config, self.state
        tps, per_rank = config.tasks_per_step, config.tasks_per_step // self.world
        end = self.done if state.stopped else config.episodes  # a run that stopped early stays stopped
        first_task = self.done
        share = distributed.shard(range(self.done, end))  # every step's tasks s+rank, s+rank+world, ...
        inputs = self.source.inputs(share)
        window_start, window_tasks, seen, first_end = time.perf_counter(), 0, 0, 0.0
        if progress is not None:  # where the run starts (a resumed run starts part-way)
            progress(TrainProgress(self.done, config.episodes, math.nan, math.nan, 0.0, state.last_val, state.best_val))
        try:
            for step_start in range(self.done, end, tps):
                for k in range(per_rank):
                    index, task, x = next(inputs)
                    self._task(index, task, x, sync=k == per_rank - 1)
                    seen += 1
                    if seen == 1:
                        first_end = time.perf_counter()
                    elif seen == PROBE_TASKS and confirm is not None:
                        self._probe(seen, first_end, len(share), confirm, first_task)
                self._step(step_start)
                self.done = step_start + tps
                window_tasks += tps
                rate = window_tasks / max(time.perf_counter() - window_start, 1e-9)
                if progress is not None:
                    w = state.window
                    progress(
                        TrainProgress(
                            self.done,
                            config.episodes,
                            w.loss / max(w.tasks, 1),
                            100 * w.correct / max(w.queries, 1),
                            rate,
                            state.last_val,
                            state.best_val,
                            self._memory(),
                        )
                    )
                final = self.done == config.episodes
                if self.done % config.log_every == 0 or final:
                    self._log(rate)
                    window_start, window_tasks = time.perf_counter(), 0
                validate = bool(config.val_every) and (self.done % config.val_every == 0 or final)
                if validate:
                    self._validate()
                if validate or final or state.stopped or self.done % config.checkpoint_every == 0:
                    # Every rank's window since the last log line, so that a resume logs the same line.
                    window = MetricWindow(*distributed.sum_values(astuple(state.window), self.device))
                    if self.rank == 0:
                        self._save(self.out / LAST, window)
                if state.stopped:
                    break
        finally:
            inputs.close()
        best = self.out / BEST
        if self.rank == 0:
            if not config.val_every and self.done == config.episodes:
                self._save(best, val=None)  # nothing to choose by: best.pt is the final weights
                self.notes.append("no validation: best.pt holds the final weights")
            plot_curve(self.out, config.way)
            assert self.log is not None  # rank 0 always has one
            self.log.close()
        return TrainResult(
            out=self.out,
            tasks_done=self.done,
            stopped_early=state.stopped,
            best_val_accuracy=state.best_val,
            best_task=state.best_task,
            last_checkpoint=self.out / LAST,
            best_checkpoint=best if best.exists() else None,
            config=None,
            notes=tuple(self.notes),
        )
