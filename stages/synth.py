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
    videos_per_class: int = typer.Option(30, "--videos-per-class", min=1, help="Videos per class."),
    classes: int = typer.Option(
        len(synth.CLASSES),
        "--classes",
        help="A smaller benchmark of this many classes (at least 3 x a task's 5 way), split about 64/12/24; "
        "their split goes to OUT/classes.csv.",
    ),
    seed: int = typer.Option(0, "--seed", help="Generator seed: the same seed gives the same decoded frames."),
    workers: int = typer.Option(
        min(2, os.cpu_count() or 1), "--workers", min=1, help="Worker processes rendering and encoding videos."
    ),
) -> None:
    """Generate the synthetic few-shot benchmark: 100 classes "A then B" of 10 primitives.

    Classes and their 64/12/24 train/val/test split are in data_manifests/synthetic.csv; with
    --classes N, the first N of them in about those shares, the same videos as the full benchmark's.

    Rerunning with the same settings skips the videos already written, so an interrupted run resumes.
    """
    from pipeline.data.manifests import write_class_splits
    from pipeline.training.config import EpisodicConfig

    console = Console(stderr=True)
    try:
        chosen = synth.class_subset(classes, EpisodicConfig().way)
    except ValueError as err:
        console.print(f"[red]error:[/red] --classes {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from err
    total = len(chosen) * videos_per_class
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
                classes=list(chosen),
                progress=lambda k: bar.advance(task, k),
            )
            if len(chosen) < len(synth.CLASSES):
                split_csv = write_class_splits(out / "classes.csv", chosen)
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
    if len(chosen) < len(synth.CLASSES):
        shares = "/".join(str(list(chosen.values()).count(s)) for s in ("train", "val", "test"))
        console.print(
            f"classes: {split_csv} ({shares} train/val/test); next: strm manifest synthetic --videos {out} "
            f"--classes {split_csv} --name synthetic{len(chosen)}",
            highlight=False,
            soft_wrap=True,
        )
    for path, reason in result.failed[:10]:
        console.print(f"[red]failed:[/red] {path}: {reason}", highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `strm synth` to the app."""
    app.command("synth", help=synth_command.__doc__)(synth_command)
