"""`strm demo` (what `make demo` runs): the whole pipeline on the embedded synthetic benchmark, with a report.

The stages are in pipeline/studies/demo.py, their sizes and why in demo_plan.py; this module draws what it reports.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from pipeline.studies.demo_plan import DemoSizes

if TYPE_CHECKING:
    from pipeline.studies.demo import DemoOutcome
    from pipeline.studies.demo_plan import DemoEvents

from stages.common import fail, progress_bar

console = Console(stderr=True)


def _events(bar) -> DemoEvents:
    from pipeline.studies.demo_plan import DemoEvents

    rows: dict[str, int] = {}

    def progress(key: str, done: int, total: int, info: str) -> None:
        if key not in rows:
            rows[key] = bar.add_task(key, total=total, info="")
        bar.update(rows[key], completed=done, total=total, info=info)

    def started(name: str) -> None:
        console.rule(f"[bold]{name}")

    def done(name: str, spent: dict) -> None:
        for row in rows.values():
            bar.remove_task(row)
        rows.clear()
        console.print(
            f"[bold green]{name}[/]: {spent['wall_s']:.1f} s (CPU {spent['cpu_s']:.1f} s)"
            + (" (outputs found, reused)" if spent["reused"] else "")
        )

    return DemoEvents(
        stage_started=started,
        stage_done=done,
        message=lambda text: console.print(text, highlight=False),
        progress=progress,
    )


def _print_summary(outcome: DemoOutcome) -> None:
    from pipeline.studies import report
    from pipeline.studies.demo_plan import MAIN, REFERENCE

    results, table = outcome.results, outcome.table
    view = Table(title="strm demo: 5-way 5-shot accuracy on the same test tasks", title_justify="left")
    for column in ("row", "accuracy", "95% interval", f"vs {REFERENCE} (paired)"):
        view.add_column(column, justify="left" if column == "row" else "right")
    for _, row in table.iterrows():
        view.add_row(
            row["row"],
            f"{row['accuracy']:.2f}",
            f"± {row['ci95']:.2f}",
            f"{row['difference']:+.2f} ± {row['difference_ci95']:.2f}",
        )
    times = Table(title="time per stage (when computed; this run)", title_justify="left")
    for column in ("stage", "wall s", "CPU s", "this run, wall s"):
        times.add_column(column, justify="left" if column == "stage" else "right")
    rows = outcome.timings
    for row in rows:
        times.add_row(
            row["stage"],
            f"{row['wall_s']:.1f}",
            f"{row['cpu_s']:.1f}",
            f"{row['this_run_wall_s']:.1f}" + (" (reused)" if row["reused_now"] else ""),
        )
    times.add_row("total", *(f"{sum(r[k] for r in rows):.1f}" for k in ("wall_s", "cpu_s", "this_run_wall_s")))
    out = Console()
    out.print(view)
    out.print(times)
    main = {k: results[k] for k in MAIN}
    out.print(report.comparison_sentence("strm", ["proto", "trm"], main), highlight=False)
    from pipeline.studies.demo_openset import summary_lines  # the library loads when the command runs

    for line in summary_lines(outcome.open_set):
        out.print(line, highlight=False)


def demo_command(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Folder for videos, manifest, runs, evaluations, figures and report.md."
    ),
    videos_per_class: int = typer.Option(
        DemoSizes.videos_per_class, "--videos-per-class", min=9, help="Synthetic videos a class (100 classes)."
    ),
    views: int = typer.Option(
        DemoSizes.views, "--views", min=1, help="Cached views of each training video (view 0 + augmented)."
    ),
    train_episodes: int = typer.Option(
        DemoSizes.train_episodes, "--train-episodes", min=1, help="Training tasks a heads variant."
    ),
    episodes: int = typer.Option(DemoSizes.episodes, "--episodes", min=1, help="Test tasks, the same for every model."),
    shot_episodes: int = typer.Option(
        DemoSizes.shot_episodes, "--shot-episodes", min=1, help="Test tasks a shot in the shot sweep."
    ),
    open_set_episodes: int = typer.Option(
        DemoSizes.open_set_episodes, "--open-set-episodes", min=1, help="Test tasks with unknown queries (open set)."
    ),
    val_every: int = typer.Option(DemoSizes.val_every, "--val-every", min=1, help="Validate every N training tasks."),
    val_episodes: int = typer.Option(DemoSizes.val_episodes, "--val-episodes", min=1, help="Validation tasks."),
    trm_dim: int = typer.Option(DemoSizes.trm_dim, "--trm-dim", min=1, help="TRM's key/value width D'."),
    workers: int = typer.Option(
        min(2, os.cpu_count() or 1), "--workers", min=1, help="Worker processes for synthesis and decoding."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the videos, views, training tasks and test tasks."),
    cache_root: Path = typer.Option(
        Path("cache"), "--cache-root", help="Feature cache root (the cache goes to ROOT/synthetic/<key>)."
    ),
) -> None:
    """The whole pipeline on the synthetic benchmark: synth, manifest, extract, train strm and trm, evaluate
    them and proto on the same tasks, ablate, train strm with an open-set method and measure it and strm on
    unknown actions, draw, predict, and write OUT/report.md. Resumable: rerun to continue."""
    from pipeline.data import synth
    from pipeline.features.readers import CacheError
    from pipeline.features.weights import WeightsUnavailable
    from pipeline.studies.demo import run_demo
    from pipeline.studies.demo_plan import DemoError
    from pipeline.training.config import TrainError

    sizes = DemoSizes(
        videos_per_class=videos_per_class,
        views=views,
        train_episodes=train_episodes,
        val_every=val_every,
        val_episodes=val_episodes,
        episodes=episodes,
        shot_episodes=shot_episodes,
        open_set_episodes=open_set_episodes,
        trm_dim=trm_dim,
        seed=seed,
    )
    start = time.perf_counter()
    try:
        with progress_bar(console, "{task.fields[info]}", transient=True) as bar:
            outcome = run_demo(out, sizes, workers, cache_root, _events(bar))
    except TrainError as err:
        fail(str(err), 2)
    except (DemoError, synth.SynthError, CacheError, WeightsUnavailable, OSError) as err:
        fail(str(err))
    _print_summary(outcome)
    console.print(f"report: {outcome.report} (demo took {time.perf_counter() - start:.0f} s)")


def register(app: typer.Typer) -> None:
    """Add `strm demo` to the app."""
    app.command("demo", help=demo_command.__doc__)(demo_command)
