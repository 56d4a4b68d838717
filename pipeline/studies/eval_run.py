"""An evaluation run as `strm evaluate` makes it: which model, which tasks, every shot, the files.

Why here and not in the stage: which heads fit which features, what the untrained baseline starts
from and how a shot sweep reuses one per-video pass are decisions a library user needs too (the
demo and the ablation grid score models the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import evaluation as ev
from pipeline.data.episodes import TaskBatch, largest_task
from pipeline.features.cache import FeatureCache
from pipeline.features.readers import CacheError, SplitReader
from pipeline.features.recipe import FeatureRecipe
from pipeline.heads import VARIANTS
from pipeline.training.checkpoints import load_checkpoint
from pipeline.training.config import fitting_options
from pipeline.training.train import TrainError, make_config, starting_heads

BASELINES = ("proto", "untrained")
Progress = Callable[[str, int, int, int | None], None]  # (phase, done, total, shot or None while encoding)


class EvalError(ValueError):
    """A model, cache split or task file that cannot be evaluated together; the message says why."""


class RequestError(EvalError):
    """Options that do not make one evaluation (the stage exits 2 for these, as for a usage error)."""


def check_request(
    checkpoint: Path | None, baseline: str | None, variant: str | None, episodes_file: Path | None
) -> None:
    """One model per run, a known variant, files that exist: checked before anything loads."""
    if checkpoint is None and baseline is None:
        raise RequestError("give --checkpoint PATH, or --baseline proto|untrained")
    if checkpoint is not None and baseline is not None:
        raise RequestError("--checkpoint and --baseline exclude each other: evaluate one model per run")
    if variant is not None and variant not in VARIANTS:
        raise RequestError(f"--variant {variant!r} is not one of {', '.join(VARIANTS)}")
    for path in (checkpoint, episodes_file):
        if path is not None and not path.is_file():
            raise RequestError(f"{path}: no such file")


def checkpoint_label(path: Path) -> str:
    """What a checkpoint's results are named after: a run's `best.pt` / `last.pt` by its run folder
    too (runs/my-strm/best.pt -> my-strm-best), so two runs never write one file."""
    path = Path(path)
    return f"{path.parent.name}-{path.stem}" if path.stem in ("best", "last") and path.parent.name else path.stem


@dataclass
class ModelChoice:
    """The model a run scores, what to record about it, and the label its files are named after."""

    model: nn.Module
    about: dict[str, Any]
    label: str


def fit_note(trained: FeatureRecipe | None, features: FeatureRecipe | None) -> str:
    """A note when heads meet features of another backbone, weights or input than they were trained on."""
    if trained is None or features is None:
        return ""
    differ = trained.differences(features)  # the fields that change a test view's feature (recipe.FEATURE_FIELDS)
    if not differ:
        return ""
    return f"the heads were trained on other features than this cache's ({'; '.join(differ)}: trained vs cache)"


def choose_model(
    cache: FeatureCache,
    *,
    checkpoint: Path | None = None,
    baseline: str | None = None,
    variant: str | None = None,
    seed: int = 0,
) -> ModelChoice:
    """Heads from any checkpoint (pipeline.checkpoints), the proto baseline, or the untrained heads
    train-heads would start from with this seed; EvalError when they do not fit the cache's features."""
    if (checkpoint is None) == (baseline is None):
        raise EvalError("give a checkpoint or a baseline (proto, untrained): one model per run")
    if baseline == "proto":
        return ModelChoice(ev.ProtoBaseline(), {"baseline": "proto"}, "proto")
    if baseline == "untrained":
        name = variant or "strm"
        if name not in VARIANTS:
            raise EvalError(f"variant {name!r} is not one of {', '.join(VARIANTS)}")
        config = make_config("frozen", variant=name, seed=seed)
        about: dict[str, Any] = {"baseline": "untrained", "variant": name, "init_seed": seed, "preset": config.preset}
        if "train" not in cache.splits and config.standardize:  # nothing to standardise on: say so
            config = make_config("frozen", variant=name, seed=seed, standardize=False)
            about["note"] = f"{cache.path} has no train split: the untrained heads are not standardised"
        try:
            heads = starting_heads(config, cache)
        except (TrainError, CacheError) as err:
            raise EvalError(str(err)) from None
        return ModelChoice(heads, about, f"untrained-{name}")
    if baseline is not None:
        raise EvalError(f"baseline {baseline!r}: expected one of {', '.join(BASELINES)}")
    assert checkpoint is not None  # the one-model check above: no baseline, so a checkpoint
    loaded = load_checkpoint(checkpoint, variant)
    heads = loaded.heads
    shape = (heads.frames, heads.patches, heads.dim)
    if shape != (cache.frames, cache.patches, cache.dim):
        raise EvalError(
            f"{checkpoint}: heads take features of L={shape[0]} frames x P={shape[1]} patches x "
            f"D={shape[2]}, the cache {cache.path} holds {cache.frames} x {cache.patches} x {cache.dim}"
        )
    about = loaded.about()
    if loaded.contents.get("open_set"):  # heads trained with an open-set head: its score is named after the method
        about["open_set"] = str(loaded.contents["open_set"])
    note = "; ".join(n for n in (about.get("note", ""), fit_note(loaded.recipe, cache.recipe)) if n)
    if note:
        about["note"] = note
    return ModelChoice(heads, about, checkpoint_label(Path(checkpoint)))


@dataclass
class TaskPlan:
    """The tasks of a run: per shot, either sampled from the seed or read from an episodes file."""

    tasks: dict[int, TaskBatch]
    way: int
    queries: int
    seed: int
    notes: list[str] = field(default_factory=list)


def plan_tasks(
    split: SplitReader,
    split_name: str,
    *,
    shots: Sequence[int],
    episodes: int,
    way: int,
    queries: int,
    seed: int,
    episodes_file: Path | None = None,
    unknown_classes: int = 0,
    unknown_queries: int = 0,
) -> TaskPlan:
    """The tasks for each shot, with `unknown_queries` videos of each of `unknown_classes` other actions
    (open set); an episodes file fixes way, shot, queries, the unknown queries, seed and count."""
    if episodes_file is not None:
        if len(shots) > 1:
            raise EvalError("an episodes file fixes the shot: it cannot be combined with a shot sweep")
        try:
            loaded, saved = ev.load_episodes(episodes_file, split)
        except ValueError as err:
            raise EvalError(str(err)) from None
        held = (saved.get("unknown_classes", 0), saved.get("unknown_queries", 0))
        if unknown_classes and (unknown_classes, unknown_queries) != held:
            raise RequestError(
                f"--unknown-classes {unknown_classes} --unknown-queries {unknown_queries}: {episodes_file} fixes "
                f"the unknown queries ({held[0]} unseen actions x {held[1]}); leave the options out"
            )
        notes = []
        if saved.get("split") not in (None, split_name):
            notes.append(f"{episodes_file} was saved from split {saved['split']!r}; evaluating on {split_name!r}")
        return TaskPlan({saved["shot"]: loaded}, saved["way"], saved["queries"], saved["seed"], notes)
    if unknown_classes and unknown_queries < 1:
        raise RequestError(f"--unknown-classes {unknown_classes} needs --unknown-queries >= 1 (videos of each)")
    unknown = {"unknown_classes": unknown_classes, "unknown_queries": unknown_queries if unknown_classes else 0}
    labels = split.labels.cpu().numpy()
    tasks = {}
    for k in shots:
        try:
            tasks[k] = ev.sample_tasks(
                labels, episodes=episodes, way=way, shot=k, queries=queries, seed=seed, **unknown
            )
        except ValueError as err:
            if unknown_classes and "unknown_classes=" in str(err):  # the sampler says what the split allows
                raise RequestError(f"--unknown-classes {unknown_classes}: split {split_name!r}: {err}") from None
            if largest_task(labels, way=way, shot=k, queries=queries)[0] < way:  # too small for these options
                raise RequestError(f"split {split_name!r}: {err}; {fitting_options(labels, way, k, queries)}") from None
            raise EvalError(f"split {split_name!r}: {err}") from None
    return TaskPlan(tasks, way, queries, seed)


def save_planned(plan: TaskPlan, split: SplitReader, split_name: str, path: Path) -> list[Path]:
    """Write each shot's tasks as an episodes file (one file per shot when there are several)."""
    written = []
    for k, tasks in plan.tasks.items():
        target = path if len(plan.tasks) == 1 else path.with_name(f"{path.stem}_shot{k}{path.suffix}")
        written.append(ev.save_episodes(target, tasks, split, seed=plan.seed, split_name=split_name))
    return written


def run_plan(
    choice: ModelChoice,
    split: SplitReader,
    split_name: str,
    plan: TaskPlan,
    *,
    device: torch.device,
    autocast: bool = False,
    batch_tasks: int | None = None,
    progress: Progress | None = None,
) -> list[ev.EvalResult]:
    """Every shot of the plan on one per-video pass of the split."""
    show = progress or (lambda *_: None)
    choice.model.to(device)
    try:
        embedding = ev.embed_split(
            choice.model,
            split,
            device=device,
            autocast=autocast,
            progress=lambda _phase, done, total: show("embed", done, total, None),
        )
        return [
            ev.evaluate(
                choice.model,
                split,
                seed=plan.seed,
                device=device,
                batch_tasks=batch_tasks,
                tasks=tasks,
                embedding=embedding,
                split_name=split_name,
                autocast=autocast,
                progress=_for_shot(show, k),
                trained=choice.about.get("open_set") or ev.TRAINED_SCORE,
            )
            for k, tasks in plan.tasks.items()
        ]
    except ValueError as err:
        raise EvalError(f"split {split_name!r}: {err}") from None


def _for_shot(show: Progress, k: int) -> Callable[[str, int, int], None]:
    """`show` with the shot whose tasks report progress."""
    return lambda phase, done, total: show(phase, done, total, k)


def model_name(record: dict[str, Any]) -> str:
    """A run record's model as people name it: the checkpoint's label, or the baseline."""
    if record.get("checkpoint"):
        return checkpoint_label(Path(record["checkpoint"]))
    if record.get("baseline") == "untrained":
        return f"untrained-{record.get('variant', 'strm')}"
    return str(record.get("baseline", "unnamed model"))


def default_record(label: str, split: str, way: int, seed: int) -> Path:
    return Path("runs") / "evaluate" / f"{label}_{split}_{way}way_seed{seed}.json"


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two records are of one model when they name the same checkpoint file and contents, or baseline."""
    keys = ("checkpoint", "baseline", "variant", "init_seed")
    sha = ("checkpoint_sha256",) if a.get("checkpoint_sha256") and b.get("checkpoint_sha256") else ()  # older records
    return all(a.get(k) == b.get(k) for k in keys + sha)


def write_results(
    results: list[ev.EvalResult],
    about: dict,
    json_path: Path,
    csv_path: Path | None,
    label: str,
    split: str,
    overwrite: bool = False,
) -> list[Path]:
    """The run record (JSON), the summary (CSV, next to it by default) and, for a sweep, accuracy against shots.

    A record of another model at that path is refused unless `overwrite`: results are never replaced
    silently. A sweep's PNG left beside the record by an earlier run of the same name is removed, so
    every file beside the JSON belongs to it.
    """
    if json_path.exists() and not overwrite:
        try:
            earlier = ev.read_run(json_path)
        except (ValueError, KeyError, OSError):
            earlier = {}
        if not _same_model(earlier, about):
            raise EvalError(
                f"{json_path} holds the results of another model ({earlier.get('checkpoint') or earlier.get('baseline')}); "
                "write elsewhere with --json PATH, or replace it with --overwrite"
            )
    written = [ev.write_run(json_path, results, about)]
    written.append(ev.write_csv(csv_path or json_path.with_suffix(".csv"), results))
    sweep = json_path.with_suffix(".png")
    if len(results) > 1:
        written.append(ev.plot_shot_sweep(results, sweep, title=f"{label} on {split}"))
    else:
        sweep.unlink(missing_ok=True)
    return written


def summary_lines(results: Sequence[ev.EvalResult], label: str, split: str) -> list[str]:
    """One line per setting: the model's name, the task setting and the mean with its interval."""
    lines = []
    for r in results:
        s = r.settings
        queries = f"{s['queries']} quer{'y' if s['queries'] == 1 else 'ies'}/class"
        lines.append(
            f"{label}: {s['way']}-way {s['shot']}-shot, {queries}, {s['episodes']} tasks on {split}, "
            f"seed {s['seed']}: {r.mean:.2f} ± {r.ci95:.2f} %" + (" on the known queries" if r.open_set else "")
        )
        lines += r.open_set_lines()
    return lines
