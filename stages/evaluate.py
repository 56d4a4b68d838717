"""`strm evaluate` (episodic accuracy with its 95% interval) and `strm compare` (two runs, task by task).

The tasks of a seed are the same for every model, so `strm compare A.json B.json` reports the
paired difference of two runs with its own interval, which is far tighter than the two intervals.
"""
from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline import evaluate as ev
from pipeline.cache import CacheError, open_cache
from pipeline.heads import VARIANTS, build_heads
from stages.common import fail, load_model

console = Console(stderr=True)
# Cache fingerprint fields that decide what a feature means: heads trained on one do not fit another.
FEATURE_KEYS = ("backbone", "layer", "weights", "normalize", "short_side", "crop")


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)", 2)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine", 2)
    return device


def _default_stem(label: str, split: str, way: int, seed: int) -> Path:
    return Path("runs") / "evaluate" / f"{label}_{split}_{way}way_seed{seed}"


def evaluate_command(
    cache: Path = typer.Option(..., "--cache", help="Feature cache folder (cache/<dataset>/<key>)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Heads checkpoint: the project's format or an authors' STRM/TRX file (detected)."
    ),
    baseline: Optional[Baseline] = typer.Option(
        None, "--baseline", help="Evaluate a parameter-free baseline instead: proto (nearest class mean) or untrained heads."
    ),
    episodes: int = typer.Option(10_000, "--episodes", min=1, help="Tasks to evaluate."),
    way: int = typer.Option(5, "--way", min=2, help="Classes per task."),
    shot: str = typer.Option("5", "--shot", help="Support videos per class; a list (1,2,5,10) sweeps them in one run."),
    queries: int = typer.Option(1, "--queries", min=1, help="Query videos per class."),
    split: str = typer.Option("test", "--split", help="Cache split to evaluate on (view 0)."),
    seed: int = typer.Option(0, "--seed", help="Episode seed: the same seed gives the same tasks to every model."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
    autocast: bool = typer.Option(False, "--autocast/--no-autocast", help="Mixed precision (float16 on CUDA)."),
    variant: Optional[str] = typer.Option(
        None, "--variant", help="Heads variant for --baseline untrained (default strm) or an authors' file (default: detected)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Run record (JSON). Default runs/evaluate/<name>.json."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Summary table (CSV). Default next to the JSON."),
    save_episodes: Optional[Path] = typer.Option(
        None, "--save-episodes", help="Write the tasks (class and video ids) as JSON; with several shots one file each."
    ),
    episodes_file: Optional[Path] = typer.Option(
        None, "--episodes-file", help="Evaluate exactly the tasks of a file written by --save-episodes."
    ),
    batch_tasks: Optional[int] = typer.Option(None, "--batch-tasks", min=1, help="Tasks per batch (default: by memory)."),
) -> None:
    """Episodic accuracy of trained heads on a cache split: mean with the 95% interval 1.96 std / sqrt(n).

    Each video is encoded once, then tasks go through the heads' cross-video step in batches
    (equal to the per-task forward). Writes a JSON record (per-task accuracies, per-class accuracy,
    confusion matrix), a CSV summary, and with several --shot values a PNG of accuracy against shots.
    """
    shots = _shots(shot)
    if checkpoint is None and baseline is None:
        fail("give --checkpoint PATH, or --baseline proto|untrained", 2)
    if checkpoint is not None and baseline is not None:
        fail("--checkpoint and --baseline exclude each other: evaluate one model per run", 2)
    if episodes_file is not None and len(shots) > 1:
        fail("--episodes-file fixes the shot: it cannot be combined with a --shot sweep", 2)
    for path in (checkpoint, episodes_file):
        if path is not None and not path.is_file():
            fail(f"{path}: no such file", 2)
    dev = _device(device)
    try:
        features = open_cache(cache)
        features.views(split)  # a missing split is an error before any model is loaded
    except CacheError as err:
        fail(str(err))

    if baseline is Baseline.proto:
        model, about, label = ev.ProtoBaseline(), {"baseline": "proto"}, "proto"
    elif baseline is Baseline.untrained:
        name = variant or "strm"
        if name not in VARIANTS:
            fail(f"--variant {name!r} is not one of {', '.join(VARIANTS)}", 2)
        torch.manual_seed(seed)
        model = build_heads(name, dim=features.dim, frames=features.frames, patches=features.patches)
        about, label = {"baseline": "untrained", "variant": name, "init_seed": seed}, f"untrained-{name}"
    else:
        model, about = load_model(checkpoint, variant)
        label = checkpoint.stem
        trained = about.get("trained_on_cache") or {}
        differ = [k for k in FEATURE_KEYS if k in trained and trained[k] != features.fingerprint.get(k)]
        if differ:
            about["note"] = (
                f"the heads were trained on features of another {'/'.join(differ)} than this cache's "
                f"({', '.join(f'{k}: {trained[k]} vs {features.fingerprint.get(k)}' for k in differ)})"
            )
        shape = (model.frames, model.patches, model.dim)
        if shape != (features.frames, features.patches, features.dim):
            fail(
                f"{checkpoint}: heads take features of L={shape[0]} frames x P={shape[1]} patches x D={shape[2]}, "
                f"the cache {cache} holds {features.frames} x {features.patches} x {features.dim}"
            )
    try:
        data = features.load_split(split, views=1)
    except CacheError as err:
        fail(str(err))
    if len(data.labels) == 0:
        fail(f"{cache}: split {split!r} holds no finished videos")
    model.to(dev)
    about.update({"cache": str(cache), "cache_key": features.key, "device": str(dev)})

    tasks_for: dict[int, Any] = {}
    if episodes_file is not None:
        try:
            loaded, saved = ev.load_episodes(episodes_file, data)
        except ValueError as err:
            fail(str(err))
        if saved.get("split") not in (None, split):
            console.print(f"note: {episodes_file} was saved from split {saved['split']!r}; evaluating on {split!r}")
        way, shots, seed, episodes = saved["way"], [saved["shot"]], saved["seed"], saved["episodes"]
        queries = saved["queries"]
        tasks_for[shots[0]] = loaded
    try:
        for k in shots:
            if k not in tasks_for:
                tasks_for[k] = ev.sample_tasks(data.labels, episodes=episodes, way=way, shot=k, queries=queries, seed=seed)
    except ValueError as err:
        fail(f"{cache} split {split!r}: {err}")

    saved_paths = []
    for k in shots if save_episodes is not None else []:
        path = save_episodes if len(shots) == 1 else save_episodes.with_name(f"{save_episodes.stem}_shot{k}{save_episodes.suffix}")
        try:
            saved_paths.append(ev.save_episodes(path, tasks_for[k], data, seed=seed, split_name=split))
        except OSError as err:
            fail(f"{path}: cannot write the episodes ({err.strerror})")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    results = []
    start = time.perf_counter()
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            embed_task = bar.add_task(f"encode {split} videos", total=len(data.labels))
            embedding = ev.embed_split(
                model, data.features[:, 0], device=dev, autocast=autocast,
                progress=lambda _phase, done, total: bar.update(embed_task, completed=done),
            )
            for k in shots:
                title = f"{way}-way {k}-shot tasks"
                task_bar = bar.add_task(title, total=len(tasks_for[k]))

                def show(phase: str, done: int, total: int, t=task_bar, title=title) -> None:
                    if phase == "qc table":  # QC's nearest-tuple table for the split, before the tasks
                        bar.update(t, description=f"{title} (QC table {done}/{total} blocks)")
                    else:
                        bar.update(t, description=title, completed=done)

                results.append(
                    ev.evaluate(
                        model, data, seed=seed, device=dev, batch_tasks=batch_tasks, tasks=tasks_for[k], embedding=embedding,
                        split_name=split, autocast=autocast, progress=show,
                    )
                )
    except ValueError as err:
        fail(f"{cache} split {split!r}: {err}")
    except torch.cuda.OutOfMemoryError as err:
        fail(f"out of GPU memory on {dev} ({err}); try a smaller --batch-tasks")
    elapsed = time.perf_counter() - start

    stem = _default_stem(label, split, way, seed)
    try:
        json_path = ev.write_run(json_out or stem.with_suffix(".json"), results, {**about, "seconds": round(elapsed, 2)})
        csv_path = ev.write_csv(csv_out or json_path.with_suffix(".csv"), results)
        title = f"{label} on {split}"
        png_path = ev.plot_shot_sweep(results, json_path.with_suffix(".png"), title=title) if len(shots) > 1 else None
    except OSError as err:
        fail(f"{err.filename}: cannot write ({err.strerror})")

    if about.get("note"):
        console.print(f"note: {about['note']}", highlight=False)
    for r in results:
        s = r.settings
        typer.echo(
            f"{label}: {s['way']}-way {s['shot']}-shot, {s['queries']} quer{'y' if s['queries'] == 1 else 'ies'}/class, "
            f"{s['episodes']} tasks on {split}, seed {s['seed']}: {r.mean:.2f} ± {r.ci95:.2f} %"
        )
    typer.echo(f"took {elapsed:.1f} s on {dev}; record {json_path}, table {csv_path}" + (f", plot {png_path}" if png_path else ""))
    for path in saved_paths:
        typer.echo(f"episodes saved to {path}")


def compare_command(
    run_a: Path = typer.Argument(..., help="Run record (JSON) of model A from `strm evaluate`."),
    run_b: Path = typer.Argument(..., help="Run record (JSON) of model B, evaluated on the same tasks."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison as JSON."),
) -> None:
    """Paired difference A - B on identical tasks, with its 95% interval; refuses runs of different seeds or settings."""
    try:
        a, b = ev.read_run(run_a), ev.read_run(run_b)
        pairs = ev.compare_runs(a, b)
    except ValueError as err:
        fail(f"{run_a} vs {run_b}: {err}")
    setting = ("way", "shot", "queries")
    paired = {tuple(p.settings[k] for k in setting) for p in pairs}
    unpaired = sorted({tuple(r[k] for k in setting) for r in a["results"] + b["results"]} - paired)
    if unpaired:
        console.print(f"note: (way, shot, queries) {unpaired} are in one run only and are not compared", highlight=False)
    for p in pairs:
        s = p.settings
        verdict = "A better" if p.difference - p.ci95 > 0 else "B better" if p.difference + p.ci95 < 0 else "no clear difference"
        typer.echo(
            f"{s['way']}-way {s['shot']}-shot, {s['episodes']} tasks, seed {s['seed']}: "
            f"A {p.mean_a:.2f} %, B {p.mean_b:.2f} %, A - B = {p.difference:+.2f} ± {p.ci95:.2f} points ({verdict}; "
            f"A ahead on {p.a_better} tasks, B on {p.b_better}, tied on {p.ties})"
        )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"a": str(run_a), "b": str(run_b), "pairs": [p.to_dict() for p in pairs]}, indent=1) + "\n")
        typer.echo(f"comparison written to {json_out}")


def register(app: typer.Typer) -> None:
    """Add `strm evaluate` and `strm compare` to the app."""
    app.command("evaluate", help=evaluate_command.__doc__)(evaluate_command)
    app.command("compare", help=compare_command.__doc__)(compare_command)
