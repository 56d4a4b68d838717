"""What every stage shares: one-line errors on stderr, progress bars, and the options several stages take."""
from __future__ import annotations

from enum import Enum
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOADING_HELP = ("Where the split's features live: auto (on the GPU when they fit in half its free memory, "
                "else in RAM when they fit in half of it, else streamed from disk), ram, device (GPU) or stream.")


class Loading(str, Enum):
    auto = "auto"
    ram = "ram"
    device = "device"
    stream = "stream"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` as one line on stderr (no wrapping) and stop with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def progress_bar(console: Console, *fields: str, transient: bool = False, disable: bool = False) -> Progress:
    """The bars every stage draws: description, bar, n/N, any extra `{task.fields[...]}` columns, times."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=transient, disable=disable)
