"""The demo (what `make demo` runs): the whole pipeline on the embedded synthetic benchmark, with a report.

synth -> manifest -> extract (frozen tf_efficientnet_lite0, last block, D=320, 112x112, flips off)
-> train the `strm` and `trm` heads (same seed) -> evaluate proto, trm and strm on the same test
tasks -> ablation on those tasks (ple-trm, fle-trm, ple-fle-trm, gamma forced to 0, no QC)
-> strm trained with an open-set method, it and strm on those tasks with unknown queries added
-> accuracy against shots -> activation maps and tuple matches -> predict -> OUT/report.md.

The sizes are chosen so that the whole of `make demo` on a fresh clone, install included, fits in
20 minutes on a 2-core CPU (DemoSizes says why each is what it is). Every stage is resumable: synth
skips written videos, the manifest is reused when the videos are the same, extraction skips done
videos, training resumes from last.pt (a finished run is found finished), an evaluation record on
disk for the same checkpoint and tasks is reused. What happens is told through `DemoEvents`
(stages/demo.py draws it); nothing here prints.

This module runs the stages in order; the plan and sizes are in demo_plan.py, the predict step in
demo_predict.py, the report stage in demo_summary.py, the report's words in demo_report.py and the open-set stage and its
section in demo_openset.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import evaluation as ev
from pipeline.data import synth
from pipeline.data.episodes import TaskBatch
from pipeline.data.manifests import (
    build_manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from pipeline.data.video import ViewSpec
from pipeline.features.backbones import get_backbone
from pipeline.features.cache import FeatureCache, open_cache
from pipeline.features.extract import ExtractSettings, RunOptions, extract
from pipeline.features.readers import CacheError, SplitFeatures
from pipeline.heads import load_heads
from pipeline.runtime import distributed
from pipeline.studies.ablation import (
    GridPoint,
    TrainSettings,
    evaluate_point,
    parse_grid,
    train_point,
    write_table,
)
from pipeline.studies.demo_openset import OpenSetFacts, open_set_stage
from pipeline.studies.demo_plan import (
    ABLATION,
    BACKBONE,
    CROP,
    LAYER,
    MAIN,
    OPEN_SET,
    REFERENCE,
    SHORT_SIDE,
    DemoError,
    DemoEvents,
    DemoSizes,
    StageClock,
    counter,
)
from pipeline.studies.demo_predict import predict_stage
from pipeline.studies.demo_summary import CONTRASTS, reversed_pair_tasks, write_report
from pipeline.studies.visualize import FrameSource, render
from pipeline.training.state import TrainProgress

__all__ = [  # the demo's plan and its report's helpers are still reached through this module
    "BACKBONE",
    "CONTRASTS",
    "LAYER",
    "MAIN",
    "REFERENCE",
    "DemoError",
    "DemoEvents",
    "DemoOutcome",
    "DemoSizes",
    "reversed_pair_tasks",
    "run_demo",
]


def _synth(videos: Path, sizes: DemoSizes, workers: int, state: dict, events: DemoEvents) -> None:
    total = len(synth.CLASSES) * sizes.videos_per_class
    result = synth.generate(
        videos,
        videos_per_class=sizes.videos_per_class,
        seed=sizes.seed,
        workers=workers,
        progress=counter(events, "synth", total),
    )
    state["reused"] = result.written == 0
    events.message(f"{result.written} videos written, {result.skipped} already there -> {videos}")
    if result.failed:
        path, reason = result.failed[0]
        raise DemoError(f"{path}: {reason} ({len(result.failed)} videos failed)")


def _manifest(videos: Path, path: Path, sizes: DemoSizes, workers: int, state: dict, events: DemoEvents):
    """The synthetic manifest for videos 0..N-1 of each class; reused when the same videos were validated before."""
    wanted = {
        str(synth.video_path(videos, c, i).absolute()) for c in synth.CLASSES for i in range(sizes.videos_per_class)
    }
    table = build_manifest("synthetic", videos)
    table = table[table["path"].isin(wanted)].reset_index(drop=True)
    if path.exists():
        saved = read_manifest(path)
        if sorted(saved["path"].astype(str)) == sorted(table["path"].astype(str)):
            state["reused"] = True
            events.message(f"manifest: {path} ({len(saved)} videos, validated before)")
            return saved
    table = validate_manifest(table, workers=workers, progress=counter(events, "checking videos", len(table)))
    bad = table[table["status"] != "ok"]
    if len(bad):
        row = bad.iloc[0]
        raise DemoError(f"{row['path']}: {row['status']} ({len(bad)} bad videos; remove {videos} and run again)")
    write_manifest(table, path)
    events.message(f"manifest: {path} ({len(table)} videos)")
    return table


def _extract(manifest, cache_root: Path, sizes: DemoSizes, workers: int, state: dict, events: DemoEvents) -> Path:
    backbone = get_backbone(BACKBONE, layer=LAYER)
    settings = ExtractSettings(
        views=sizes.views, spec=ViewSpec(short_side=SHORT_SIDE, crop=CROP, flip=False), seed=sizes.seed
    )

    def show(p) -> None:
        events.progress("extract", p.already_done + p.done + p.failed, len(manifest), f"{p.frames} frames")

    result = extract("synthetic", manifest, backbone, cache_root, settings, RunOptions(workers=workers), progress=show)
    state["reused"] = result.progress.total == 0
    if result.failures:
        video, reason = result.failures[0]
        raise DemoError(f"{result.path}: {len(result.failures)} videos failed to extract (e.g. {video}: {reason})")
    events.message(
        f"cache: {result.path} ({result.progress.done} videos extracted now, {result.progress.already_done} already done, "
        f"{result.progress.frames} frames through the backbone)"
    )
    return result.path


def _train_progress(point: GridPoint, total: int, events: DemoEvents) -> Callable[[TrainProgress], None]:
    def show(p: TrainProgress) -> None:
        val = f", val {p.val_accuracy:.1f}%" if p.val_accuracy is not None else ""
        events.progress(f"train {point.label}", p.task, total, f"{p.tasks_per_s:.2f} tasks/s, loss {p.loss:.3g}{val}")

    return show


def _shot_sweep(label: str, checkpoint: Path | None, test, sizes: DemoSizes, record: Path) -> list[ev.EvalResult]:
    """Accuracy for shots 1..5 on `shot_episodes` tasks each, one per-video pass; reused when on disk for this checkpoint."""
    about = {
        "row": label,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_mtime": checkpoint.stat().st_mtime if checkpoint else None,
    }
    if record.exists():
        saved = ev.read_run(record)
        if all(saved.get(k) == v for k, v in about.items()) and all(
            r["episodes"] == sizes.shot_episodes for r in saved["results"]
        ):
            return [ev.EvalResult.from_dict(r) for r in saved["results"]]
    model = ev.ProtoBaseline() if checkpoint is None else load_heads(checkpoint)[0]
    embedding = ev.embed_split(model, test)
    results = [
        ev.evaluate(
            model,
            test,
            episodes=sizes.shot_episodes,
            shot=shot,
            seed=sizes.seed,
            embedding=embedding,
            split_name="test",
        )
        for shot in range(1, 6)
    ]
    ev.write_run(record, results, about)
    return results


@dataclass
class DemoOutcome:
    """What a demo run produced: the report, every row's result, the ablation table and the stage times."""

    report: Path
    results: dict[str, ev.EvalResult]
    table: pd.DataFrame  # pipeline.studies.ablation.write_table's
    timings: list[dict]
    open_set: OpenSetFacts  # the open-set model and strm on the tasks with unknown queries


def run_demo(
    out: Path, sizes: DemoSizes, workers: int, cache_root: Path, events: DemoEvents | None = None
) -> DemoOutcome:
    """Every stage in order (resuming what is on disk); DemoError when a stage cannot go on."""
    events = events or DemoEvents()
    clock = StageClock(out / "timings.json", events)
    eval_dir, fig_dir = out / "eval", out / "figures"
    manifest, cache_path = _inputs(out, sizes, workers, cache_root, clock, events)
    cache = open_cache(cache_path)
    grid = parse_grid(ABLATION)
    points = {p.label: p for p in [*grid, *parse_grid([OPEN_SET])]}
    settings = TrainSettings(
        episodes=sizes.train_episodes,
        seed=sizes.seed,
        val_every=sizes.val_every,
        val_episodes=sizes.val_episodes,
        heads_options={"trm_dim": sizes.trm_dim},
        log_every=max(1, sizes.train_episodes // 30),
    )
    device = distributed.resolve_device(settings.device)
    splits = {
        "train": cache.load_split("train"),
        "val": cache.load_split("val", views=1),
        "test": cache.load_split("test"),
    }
    tasks = ev.sample_tasks(splits["test"].labels, episodes=sizes.episodes, way=5, shot=5, queries=1, seed=sizes.seed)
    checkpoints, results = _train_and_evaluate(
        out,
        sizes,
        clock,
        events,
        cache=cache,
        points=points,
        settings=settings,
        device=device,
        splits=splits,
        tasks=tasks,
    )
    with clock.stage("ablation table"):
        table = write_table(grid, results, REFERENCE, out, checkpoints)
    with clock.stage("evaluate open set") as state:
        open_set = open_set_stage(out, points, checkpoints, splits["test"], sizes, device, state)
    sweeps: dict[str, list[ev.EvalResult]] = {}
    with clock.stage("accuracy against shots") as state:
        reused = True
        for label in MAIN:
            record = eval_dir / f"shots_{label}.json"
            mtime = record.stat().st_mtime if record.exists() else None
            sweeps[label] = _shot_sweep(label, checkpoints.get(label), splits["test"], sizes, record)
            reused &= mtime is not None and record.stat().st_mtime == mtime
        state["reused"] = reused
    with clock.stage("visualize"):
        heads = load_heads(checkpoints["strm"])[0]
        figures = {
            key: path.relative_to(out).as_posix()
            for key, path in render(
                heads, splits["test"], fig_dir, frames=FrameSource(manifest, cache.recipe), seed=sizes.seed, count=2
            ).items()
        }
    with clock.stage("predict") as state:
        prediction = predict_stage(out, manifest, OPEN_SET, checkpoints[OPEN_SET], sizes, workers, events, state)
        figures["timeline"] = prediction["timeline"]
    with clock.stage("report"):
        path = write_report(
            out,
            sizes.rows(BACKBONE, LAYER),  # the module's names, which a test may set
            clock,
            cache_path=cache_path,
            workers=workers,
            test=splits["test"],
            tasks=tasks,
            results=results,
            checkpoints=checkpoints,
            sweeps=sweeps,
            table=table,
            figures=figures,
            prediction=prediction,
            open_set=open_set,
        )
    return DemoOutcome(path, results, table, clock.rows(), open_set)


def _inputs(
    out: Path, sizes: DemoSizes, workers: int, cache_root: Path, clock: StageClock, events: DemoEvents
) -> tuple[pd.DataFrame, Path]:
    """The stages synth, manifest and extract: (the manifest, the feature cache's folder)."""
    videos = out / "videos"
    with clock.stage("synth") as state:
        _synth(videos, sizes, workers, state, events)
    with clock.stage("manifest") as state:
        manifest = _manifest(videos, out / "manifest.csv", sizes, workers, state, events)
    with clock.stage("extract") as state:
        try:
            cache_path = _extract(manifest, cache_root, sizes, workers, state, events)
        except CacheError as err:
            raise DemoError(str(err)) from None
    return manifest, cache_path


def _train_and_evaluate(
    out: Path,
    sizes: DemoSizes,
    clock: StageClock,
    events: DemoEvents,
    *,
    cache: FeatureCache,
    points: dict[str, GridPoint],
    settings: TrainSettings,
    device: torch.device,
    splits: dict[str, SplitFeatures],
    tasks: TaskBatch,
) -> tuple[dict[str, Path], dict[str, ev.EvalResult]]:
    """The training and evaluation stages, main models first, then the ablation variants and the open-set
    model: (the checkpoint of each trained row, the result of every grid row on the test tasks)."""
    eval_dir = out / "eval"
    checkpoints: dict[str, Path] = {}
    results: dict[str, ev.EvalResult] = {}

    def trained(labels: tuple[str, ...], name: str) -> None:
        with clock.stage(name) as state:
            before = {}
            for label in labels:
                last = out / "train" / points[label].slug / "last.pt"
                before[label] = last.stat().st_mtime if last.exists() else None
                checkpoints[label] = train_point(
                    points[label],
                    cache,
                    out / "train" / points[label].slug,
                    settings,
                    train_split=splits["train"],
                    val_split=splits["val"],
                    progress=_train_progress(points[label], sizes.train_episodes, events),
                )
            state["reused"] = all(
                before[k] == (out / "train" / points[k].slug / "last.pt").stat().st_mtime for k in labels
            )

    def evaluated(labels: tuple[str, ...], name: str) -> None:
        with clock.stage(name) as state:
            reused = True
            for label in labels:
                point = points[label]
                record = eval_dir / f"{point.slug}.json"
                mtime = record.stat().st_mtime if record.exists() else None
                events.message(f"evaluating {label} on {sizes.episodes:,} tasks")
                results[label] = evaluate_point(
                    point,
                    checkpoints.get(point.trained.label),
                    splits["test"],
                    tasks,
                    record,
                    seed=sizes.seed,
                    device=device,
                )
                reused &= mtime is not None and record.stat().st_mtime == mtime
                events.message(f"  {label}: {results[label].mean:.2f} ± {results[label].ci95:.2f}")
            state["reused"] = reused

    trained(("strm", "trm"), "train strm, trm")
    evaluated(MAIN, "evaluate proto, trm, strm")
    trained(("ple-trm", "fle-trm", "ple-fle-trm", "jnt-st-1"), "train ablation variants")
    evaluated(tuple(k for k in points if k not in (*MAIN, OPEN_SET)), "evaluate ablation rows")
    trained((OPEN_SET,), f"train {OPEN_SET}")
    return checkpoints, results
