"""`strm synth`: write the embedded synthetic benchmark (pipeline/data/synth.py) as MP4 files."""

from __future__ import annotations

import os
import time
from pathlib import Path

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

from pipeline.data import synth


def synth_command(
    out: Path = typer.Option(..., "--out", help="Output folder; videos go to OUT/<class>/<class>_<index>.mp4."),
    videos_per_class: int = typer.Option(30, "--videos-per-class", min=1, help="Videos per class (100 classes)."),
    seed: int = typer.Option(0, "--seed", help="Generator seed: the same seed gives the same decoded frames."),
    workers: int = typer.Option(
        min(2, os.cpu_count() or 1), "--workers", min=1, help="Worker processes rendering and encoding videos."
    ),
) -> None:
    """Generate the synthetic few-shot benchmark: 100 classes "A then B" of 10 primitives.

    Classes and their 64/12/24 train/val/test split are in data_manifests/synthetic.csv.

    Rerunning with the same settings skips the videos already written, so an interrupted run resumes.
    """
    console = Console(stderr=True)
    total = len(synth.CLASSES) * videos_per_class
    start = time.perf_counter()
    columns = (
        TextColumn("synth"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("videos", total=total)
            result = synth.generate(
                out,
                videos_per_class=videos_per_class,
                seed=seed,
                workers=workers,
                progress=lambda k: bar.advance(task, k),
            )
    except synth.SynthError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from err
    except OSError as err:
        reason = f"{err.filename or out}: {err.strerror or err}"
        console.print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from err
    elapsed = time.perf_counter() - start
    console.print(
        f"synth: {result.written} videos written, {result.skipped} already there, "
        f"{len(result.failed)} failed in {elapsed:.1f} s -> {out}",
        highlight=False,
    )
    for path, reason in result.failed[:10]:
        console.print(f"[red]failed:[/red] {path}: {reason}", highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `strm synth` to the app."""
    app.command("synth", help=synth_command.__doc__)(synth_command)
