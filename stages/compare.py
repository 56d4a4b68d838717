"""`strm compare A.json B.json`: two evaluation runs on identical tasks, task by task.

The tasks of a seed are the same for every model, so the paired difference of two runs has its own
interval, which is far tighter than the two runs' intervals. Open-set records (--unknown-classes) pair
every unknown score's measures the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from stages.common import fail

console = Console(stderr=True)


def compare_command(
    run_a: Path = typer.Argument(..., help="Run record (JSON) of model A from `strm evaluate`."),
    run_b: Path = typer.Argument(..., help="Run record (JSON) of model B, evaluated on the same tasks."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the comparison as JSON."),
) -> None:
    """Paired difference A - B on identical tasks, with its 95% interval; refuses runs of different seeds or settings."""
    from pipeline import evaluation as ev
    from pipeline.studies.eval_run import model_name

    if run_a.resolve() == run_b.resolve():
        fail(f"{run_a} is compared with itself: give the records of two models", 2)
    try:
        a, b = ev.read_run(run_a), ev.read_run(run_b)
        pairs = ev.compare_runs(a, b)
    except ValueError as err:
        fail(f"{run_a} vs {run_b}: {err}")
    name_a, name_b = model_name(a), model_name(b)
    typer.echo(f"A = {name_a} ({run_a}), B = {name_b} ({run_b})")
    setting = ("way", "shot", "queries")
    paired = {tuple(p.settings[k] for k in setting) for p in pairs}
    unpaired = sorted({tuple(r[k] for k in setting) for r in a["results"] + b["results"]} - paired)
    if unpaired:
        console.print(
            f"note: (way, shot, queries) {unpaired} are in one run only and are not compared", highlight=False
        )
    for p in pairs:
        s = p.settings
        verdict = (
            "A better"
            if p.difference - p.ci95 > 0
            else "B better"
            if p.difference + p.ci95 < 0
            else "no clear difference"
        )
        typer.echo(
            f"{s['way']}-way {s['shot']}-shot, {s['episodes']} tasks, seed {s['seed']}: "
            f"A {name_a} {p.mean_a:.2f} %, B {name_b} {p.mean_b:.2f} %, "
            f"A - B = {p.difference:+.2f} ± {p.ci95:.2f} points ({verdict}; "
            f"A ahead on {p.a_better} tasks, B on {p.b_better}, tied on {p.ties})"
        )
        for line in p.open_set_lines():  # open-set records: each score's measures, paired task by task
            typer.echo(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(
            json.dumps({"a": str(run_a), "b": str(run_b), "pairs": [p.to_dict() for p in pairs]}, indent=1) + "\n"
        )
        typer.echo(f"comparison written to {json_out}")


def register(app: typer.Typer) -> None:
    """Add `strm compare` to the app."""
    app.command("compare", help=compare_command.__doc__)(compare_command)
