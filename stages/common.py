"""What every stage shares: one-line errors on stderr, progress bars, and the options several stages take."""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOADING_HELP = (
    "Where the split's features live: auto (on the GPU when they fit in half its free memory, "
    "else in RAM when they fit in half of it, else streamed from disk), ram, device (GPU) or stream."
)

OVERWRITE_HELP = (
    "Replace an earlier run's files in --out (config.json, metrics.jsonl, last.pt, best.pt, curve.png, tb/); "
    "without it a folder holding any of them is refused unless --resume."
)


class Loading(str, Enum):
    auto = "auto"
    ram = "ram"
    device = "device"
    stream = "stream"


class Optimizer(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class OpenSet(str, Enum):
    """Open-set training methods (pipeline/heads/openset.py; README "Open-set training")."""

    none = "none"
    bounded = "bounded"
    eos = "eos"
    garbage = "garbage"
    disc = "disc"


OPEN_SET_HELP = (
    "Open-set training on bounded logits: bounded alone, or with unknown queries from other training classes "
    "that the heads learn to score low (eos, garbage, disc; see the README). \\[default: none]"
)


_INTERRUPT_NOTE: list[Callable[[], str]] = []


def on_interrupt(note: Callable[[], str]) -> None:
    """What the running stage says if Ctrl-C or SIGTERM stops it: what was saved and how to go on
    (evaluated then, so it can read what is on disk). `strm` prints it as one line (stages/app.py)."""
    _INTERRUPT_NOTE[:] = [note]


def interrupted_line(command: str) -> str:
    """The one line an interrupted stage ends with; `command` is how it was started."""
    if _INTERRUPT_NOTE:
        try:
            return f"interrupted: {_INTERRUPT_NOTE[0]()}"
        except Exception as err:  # noqa: BLE001 - reading what was saved must not hide the interruption
            return f"interrupted (could not tell what was saved: {type(err).__name__}: {err})"
    return f"interrupted: what was done is kept; run `{command}` again to continue"


def command_line() -> str:
    """This process's `strm ...` command, quoted for a shell: what a message tells a person to rerun."""
    return shlex.join(["strm", *sys.argv[1:]])


def resume_command() -> str:
    """This process's command as a training run continues: with --resume, without --overwrite (which
    would replace what was saved, and excludes --resume)."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["strm", *args, *([] if "--resume" in args else ["--resume"])])


def training_interrupted(out: Path, task: int) -> str:
    """What an interrupted train-heads or finetune run says: the task it reached, the one its last.pt
    holds, and the command that continues it."""
    from pipeline.training.state import saved_task  # torch: only once a run is interrupted

    saved = saved_task(out)
    held = f"{out / 'last.pt'} holds task {saved}" if saved is not None else "no last.pt was written yet"
    return f"at task {task}, {held}; run `{resume_command()}` to continue"


def setting(flag: str, help: str, **more: Any) -> Any:
    """An option left out by default (None): the run's settings then come from elsewhere (the start's
    checkpoint, the dataset, the library's defaults), which `help` names as `\\[default: ...]`."""
    return typer.Option(None, flag, help=help, **more)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr (no wrapping) and stop with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def timing_note(console: Console) -> Callable:
    """The `confirm` of a training run that goes on at any speed (train-heads on CPU): it prints the
    speed of the first tasks and the time of the whole run (pipeline.training.state.Estimate)."""

    def note(estimate) -> bool:
        console.print(f"{estimate.line()}; --episodes N for a shorter run", highlight=False, soft_wrap=True)
        return True

    return note


def one_of_resume_overwrite(resume: bool, overwrite: bool) -> None:
    """--resume continues the run in --out and --overwrite replaces it: both at once is a usage error."""
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other: continue the run in --out or replace it", 2)


def progress_bar(console: Console, *fields: str, transient: bool = False, disable: bool = False) -> Progress:
    """The bars every stage draws: description, bar, n/N, any extra `{task.fields[...]}` columns, times."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *map(TextColumn, fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


@contextmanager
def training_progress(
    console: Console, name: str, disable: bool = False, out: Path | None = None
) -> Iterator[Callable]:
    """The bar of train-heads and finetune; yields the loop's progress callback (pipeline.training.loop.TrainProgress).
    With the run folder `out`, an interruption after the run started says what its last.pt holds."""
    with progress_bar(
        console,
        "{task.fields[rate]:.2f} tasks/s",
        "loss {task.fields[loss]:.4g}",
        "acc {task.fields[acc]:.1f}%",
        "{task.fields[memory]}",
        "{task.fields[val]}",
        disable=disable,
    ) as bar:
        rows: list = []  # the bar appears with the first report, after the run's checks passed

        def show(p) -> None:
            if not rows:
                rows.append(bar.add_task(name, total=p.total, rate=0.0, loss=math.nan, acc=math.nan, memory="", val=""))
            if out is not None:
                on_interrupt(lambda: training_interrupted(out, p.task))
            memory = f"GPU {p.gpu_memory_gib:.1f} GiB" if p.gpu_memory_gib is not None else ""
            val = f"val {p.val_accuracy:.1f}% (best {p.best_val_accuracy:.1f}%)" if p.val_accuracy is not None else ""
            bar.update(
                rows[0], completed=p.task, rate=p.tasks_per_s, loss=p.loss, acc=p.accuracy, memory=memory, val=val
            )

        yield show


@contextmanager
def counting_progress(
    console: Console, name: str, disable: bool = False
) -> Iterator[Callable[[int, int | None], None]]:
    """A transient bar for work whose total is learnt on the way; yields its progress(done, total) callback."""
    with progress_bar(console, disable=disable, transient=True) as bar:
        row = bar.add_task(name, total=None)

        def show(done: int, total: int | None) -> None:
            bar.update(row, completed=done, total=total)

        yield show
