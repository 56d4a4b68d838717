"""What a run carries in its checkpoints and reports (run state, metric window, progress, result) and
how a resumed run picks it up: last.pt and its settings, the RNG states, a best.pt written after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.features.weights import file_sha256
from pipeline.runtime import distributed
from pipeline.training.config import EpisodicConfig, TrainError
from pipeline.training.runs import (
    LAST,
    clear_run,
    earlier_run,
    resume_differences,
)


@dataclass
class MetricWindow:
    """Sums over the tasks since the last log line (this rank's; in a checkpoint, all ranks')."""

    loss: float = 0.0
    correct: float = 0.0
    queries: float = 0.0
    tasks: float = 0.0
    logit_scale: float = 0.0  # sum over tasks of the known queries' mean |logit| (the scale issue #23 bounds)


@dataclass
class RunState:
    """What a run knows besides its weights; saved in every checkpoint (as a plain dict)."""

    best_val: float | None = None
    best_task: int | None = None
    best_sha256: str | None = None  # of the best.pt this state vouches for (resume checks the file on disk)
    bad_validations: int = 0
    last_val: float | None = None
    stopped: bool = False
    window: MetricWindow = field(default_factory=MetricWindow)

    @classmethod
    def from_dict(cls, saved: dict) -> RunState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in known and k != "window"})
        state.window = MetricWindow(**saved.get("window", {}))
        return state


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback gets at the start and after every optimiser step."""

    task: int  # tasks done
    total: int
    loss: float  # mean per task since the last log line (nan before the first task)
    accuracy: float  # % on the training queries since the last log line (nan before the first task)
    tasks_per_s: float  # all processes together
    val_accuracy: float | None  # the latest validation, %
    best_val_accuracy: float | None
    gpu_memory_gib: float | None = None  # peak allocated on this process's GPU; None on CPU


@dataclass(frozen=True)
class Estimate:
    """Measured speed after the first tasks, handed to `confirm`."""

    seconds_per_task: float  # this process's
    tasks_left: int  # this process's
    device: str
    run_tasks: int = 0  # the whole run's, all processes
    first_task: int = 0  # where this invocation started (a resumed run starts part-way)
    world: int = 1

    @property
    def seconds_left(self) -> float:
        return self.seconds_per_task * self.tasks_left

    def line(self) -> str:
        """The speed and the whole run's time in words: 'timed: 0.52 tasks/s on cpu; 10,000 tasks ≈ 5.3 h'."""
        rate = self.world / max(self.seconds_per_task, 1e-9)
        text = (
            f"timed: {rate:.2f} tasks/s on {self.device}; {self.run_tasks:,} tasks ≈ {duration(self.run_tasks / rate)}"
        )
        if self.first_task:
            text += f" ({duration(self.seconds_left)} from task {self.first_task:,} on)"
        return text


def duration(seconds: float) -> str:
    """A time as people say it: '40 min', '5.3 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class TrainResult:
    """Where a run ended and what it reached."""

    out: Path
    tasks_done: int
    stopped_early: bool
    best_val_accuracy: float | None
    best_task: int | None
    last_checkpoint: Path
    best_checkpoint: Path | None  # None while a validating run has not validated yet
    config: Any = None  # the run's settings as resolved (e.g. a fine-tune's backbone layer)
    notes: tuple[str, ...] = ()


def resume_point(
    out: Path, resume: bool, config: EpisodicConfig, also_free: tuple[str, ...] = (), overwrite: bool = False
) -> dict | None:
    """The last.pt a run continues from (None: a new run); TrainError when the folder or settings do not fit.

    A folder that holds any earlier run's file is refused unless `resume` (continue from its last.pt;
    without one the run starts over, as after a kill before the first checkpoint) or `overwrite`
    (rank 0 removes that run's files first); nothing is lost without being asked.
    """
    last = out / LAST
    if not resume:
        earlier = earlier_run(out)
        if earlier and not overwrite:
            raise TrainError(
                f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, "
                "replace it with --overwrite, or choose another --out"
            )
        if earlier and distributed.rank_world()[0] == 0:
            clear_run(out)
        return None
    if not last.exists():
        return None
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    differ = resume_differences(config, ckpt.get("config", {}), also_free)
    if differ:
        raise TrainError(f"{last}: the run was started with other settings: " + "; ".join(differ))
    return ckpt


def saved_task(out: Path) -> int | None:
    """The task the run in `out` holds in its last.pt (None without one): what a rerun continues from.
    Memory-mapped, so reading it costs no copy of the weights."""
    last = out / LAST
    if not last.exists():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["task_index"])


def newer_best(best: Path, state: RunState) -> tuple[int, float] | None:
    """(task, validation accuracy) of a best.pt that is not the one `state` (from last.pt) vouches
    for (or vouches for none): it was written after that last.pt, by a run killed before the next."""
    if not best.exists() or (state.best_sha256 is not None and file_sha256(best) == state.best_sha256):
        return None
    saved = torch.load(best, map_location="cpu", weights_only=True)
    val = saved.get("val") or {}
    return (int(saved["task_index"]), float(val["accuracy"])) if "accuracy" in val else None


def rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
