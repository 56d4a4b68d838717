"""`strm evaluate`: episodic accuracy of a model on a cache split, with its 95% interval.

The tasks of a seed are the same for every model, so `strm compare A.json B.json` (stages/compare.py)
reports the paired difference of two runs with its own interval.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import TaskID

from stages.common import LOADING_HELP, Loading, fail, progress_bar

console = Console(stderr=True)


class Baseline(str, Enum):
    proto = "proto"
    untrained = "untrained"


def _shots(text: str) -> list[int]:
    try:
        shots = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        fail(f"--shot takes a number or a comma-separated list such as 1,2,5 (got {text!r})", 2)
    if not shots or shots[0] < 1:
        fail(f"--shot values must be >= 1 (got {text!r})", 2)
    return shots


# Over 80 lines for its 19 option declarations (a split would take this file past test_stages' 200 lines).
def evaluate_command(
    cache: Path = typer.Option(..., "--cache", help="Feature cache folder (cache/<dataset>/<key>)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Heads checkpoint: train-heads, finetune, or an authors' STRM/TRX file (detected)."
    ),
    baseline: Baseline | None = typer.Option(
        None,
        "--baseline",
        help="Evaluate a parameter-free baseline instead: proto (nearest class mean) or the "
        "untrained heads train-heads starts from with --seed.",
    ),
    episodes: int = typer.Option(10_000, "--episodes", min=1, help="Tasks to evaluate."),
    way: int = typer.Option(5, "--way", min=2, help="Classes per task."),
    shot: str = typer.Option("5", "--shot", help="Support videos per class; a list (1,2,5,10) sweeps them in one run."),
    queries: int = typer.Option(1, "--queries", min=1, help="Query videos per class."),
    unknown_classes: int = typer.Option(
        0, "--unknown-classes", min=0, help="Open set: M other actions a task adds as unknown queries (0: closed set)."
    ),
    unknown_queries: int = typer.Option(0, "--unknown-queries", min=0, help="Open set: query videos of each of them."),
    split: str = typer.Option("test", "--split", help="Cache split to evaluate on (view 0)."),
    seed: int = typer.Option(0, "--seed", help="Episode seed: the same seed gives the same tasks to every model."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    autocast: bool = typer.Option(False, "--autocast/--no-autocast", help="Mixed precision (float16 on CUDA)."),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="Heads variant for --baseline untrained (default strm) or an authors' file \\[default: detected]",
    ),
    loading: Loading = typer.Option(Loading.auto, "--loading", help=LOADING_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="Run record (JSON). Default runs/evaluate/<name>.json."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Summary table (CSV). Default next to the JSON."),
    save_episodes: Path | None = typer.Option(
        None, "--save-episodes", help="Write the tasks (class and video ids) as JSON; with several shots one file each."
    ),
    episodes_file: Path | None = typer.Option(
        None, "--episodes-file", help="Evaluate exactly the tasks of a file written by --save-episodes."
    ),
    batch_tasks: int | None = typer.Option(None, "--batch-tasks", min=1, help="Tasks per batch \\[default: by memory]"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a record of another model at the JSON path (refused without it)."
    ),
) -> None:
    """Episodic accuracy of trained heads on a cache split: mean with the 95% interval 1.96 std / sqrt(n).

    Each video is encoded once, then tasks go through the heads' cross-video step in batches
    (equal to the per-task forward). Writes a JSON record (per-task accuracies, per-class accuracy,
    confusion matrix), a CSV summary, and with several --shot values a PNG of accuracy against shots.
    With --unknown-classes, every unknown score's AUROC, AUPR, OSCR and catch rates on the same tasks too.
    """
    import torch

    from pipeline import evaluation as ev
    from pipeline.features.cache import open_cache
    from pipeline.features.readers import CacheError
    from pipeline.runtime.distributed import DeviceError, resolve_device
    from pipeline.studies.eval_run import (
        EvalError,
        RequestError,
        check_request,
        choose_model,
        default_record,
        plan_tasks,
        run_plan,
        save_planned,
        summary_lines,
        write_results,
    )
    from pipeline.training.checkpoints import CheckpointError

    shots = _shots(shot)
    try:
        check_request(checkpoint, baseline.value if baseline else None, variant, episodes_file)
        dev = resolve_device(device)
        features = open_cache(cache)
        features.views(split)  # a missing split is an error before any model is loaded
        choice = choose_model(
            features, checkpoint=checkpoint, baseline=baseline.value if baseline else None, variant=variant, seed=seed
        )
        data = features.split(split, views=1, loading=loading.value, device=dev)
        if len(data) == 0:
            fail(f"{cache}: split {split!r} holds no finished videos")
        plan = plan_tasks(
            data,
            split,
            shots=shots,
            episodes=episodes,
            way=way,
            queries=queries,
            seed=seed,
            episodes_file=episodes_file,
            unknown_classes=unknown_classes,
            unknown_queries=unknown_queries,
        )
        saved_paths = save_planned(plan, data, split, save_episodes) if save_episodes is not None else []
    except (DeviceError, RequestError) as err:
        fail(str(err), 2)
    except (EvalError, CacheError, CheckpointError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    about = {
        **choice.about,
        "cache": str(cache),
        "cache_key": features.key,
        "device": str(dev),
        "loading": data.loading,
    }
    start = time.perf_counter()
    try:
        with progress_bar(console) as bar:
            rows: dict[int | None, TaskID] = {None: bar.add_task(f"encode {split} videos", total=len(data))}
            rows.update(
                {k: bar.add_task(f"{plan.way}-way {k}-shot tasks", total=len(t)) for k, t in plan.tasks.items()}
            )

            def show(phase: str, done: int, total: int, k: int | None) -> None:
                title = f"{plan.way}-way {k}-shot tasks"
                if phase == "qc table":  # QC's nearest-tuple table for the split, before the tasks
                    bar.update(rows[k], description=f"{title} (QC table {done}/{total} blocks)")
                elif k is None:
                    bar.update(rows[k], completed=done)
                else:
                    bar.update(rows[k], completed=done, description=title)

            results = run_plan(
                choice, data, split, plan, device=dev, autocast=autocast, batch_tasks=batch_tasks, progress=show
            )
    except EvalError as err:
        fail(f"{cache} {err}")
    except torch.cuda.OutOfMemoryError as err:
        fail(f"out of GPU memory on {dev} ({err}); try a smaller --batch-tasks")
    elapsed = time.perf_counter() - start
    json_path = json_out or default_record(choice.label, split, plan.way, plan.seed)
    try:
        about["seconds"] = round(elapsed, 2)
        written = write_results(results, about, json_path, csv_out, choice.label, split, overwrite=overwrite)
    except EvalError as err:
        fail(str(err))
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")

    if about.get("note"):
        console.print(f"note: {about['note']}", highlight=False)
    for line in summary_lines(results, choice.label, split):
        typer.echo(line)
    for line in ev.class_lines(results[-1]):  # the last (largest) shot of a sweep
        typer.echo(line)
    typer.echo(f"took {elapsed:.1f} s on {dev}; " + ", ".join(map(str, written)))
    for path in saved_paths:
        typer.echo(f"episodes saved to {path}")


def register(app: typer.Typer) -> None:
    """Add `strm evaluate` to the app."""
    app.command("evaluate", help=evaluate_command.__doc__)(evaluate_command)
