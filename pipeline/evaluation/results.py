"""Evaluation results: accuracy with the field's 95% interval, per class and confusion, paired
comparison of two runs on identical tasks, and the files (JSON run record, CSV, shot-sweep plot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.episodes import TaskBatch

if TYPE_CHECKING:
    from pipeline.features.readers import SplitReader


Z95 = 1.96
RUN_FORMAT = "strm-eval/1"


# Settings that must agree for two runs to have seen the same tasks.
PAIRING_KEYS = (
    "split",
    "way",
    "shot",
    "queries",
    "unknown_classes",
    "unknown_queries",
    "seed",
    "episodes",
    "episodes_digest",
)
OPEN_SET_DIGITS = 4  # open-set measures are fractions: 4 decimals in the CSV and the per-task lists


def interval95(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% interval of the mean as the field reports it: 1.96 * std / sqrt(n), population std."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no values to take an interval of")
    return float(Z95 * values.std() / math.sqrt(len(values)))


# ----------------------------------------------------------------------------------------------
# Results.


@dataclass
class EvalResult:
    """One evaluation setting's outcome; accuracies in percent."""

    task_accuracy: np.ndarray  # [episodes] each task's query accuracy, %
    per_class: dict[str, float]  # split class name -> % of its queries right (classes that were queried)
    confusion: np.ndarray  # [C, C] counts: row = true split class, column = predicted
    class_names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # split, way, shot, queries, seed, episodes, digest, ...
    open_set: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # score -> measure -> [episodes]
    open_set_info: dict[str, Any] = field(default_factory=dict)  # the false rejection, `--unknown auto`'s score

    @property
    def mean(self) -> float:
        return float(self.task_accuracy.mean())

    @property
    def ci95(self) -> float:
        return interval95(self.task_accuracy)

    @property
    def seed(self) -> int:
        return int(self.settings["seed"])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (task accuracies included, for paired comparison)."""
        return {
            **self.settings,
            "mean": self.mean,
            "ci95": self.ci95,
            "per_class": self.per_class,
            "class_names": self.class_names,
            "confusion": self.confusion.tolist(),
            "task_accuracy": [round(float(a), 6) for a in self.task_accuracy],
            **({"open_set": self._open_set_dict()} if self.open_set else {}),
        }

    def _open_set_dict(self) -> dict[str, Any]:
        """The JSON's open_set block: per score and measure its mean, interval and per-task values."""
        return {
            **self.open_set_info,
            "scores": {
                name: {
                    k: {
                        "mean": float(v.mean()),
                        "ci95": interval95(v),
                        "per_task": np.round(v, OPEN_SET_DIGITS).tolist(),
                    }
                    for k, v in measures.items()
                }
                for name, measures in self.open_set.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        skip = {"mean", "ci95", "per_class", "class_names", "confusion", "task_accuracy", "open_set"}
        block = dict(d.get("open_set") or {})
        measured = block.pop("scores", {})
        return cls(
            task_accuracy=np.asarray(d["task_accuracy"], dtype=np.float64),
            per_class=dict(d["per_class"]),
            confusion=np.asarray(d["confusion"], dtype=np.int64),
            class_names=list(d["class_names"]),
            settings={k: v for k, v in d.items() if k not in skip},
            open_set={
                name: {k: np.asarray(v["per_task"], dtype=np.float64) for k, v in measures.items()}
                for name, measures in measured.items()
            },
            open_set_info=block,
        )

    def open_set_lines(self) -> list[str]:
        """The console's table: one row per score, each measure's mean ± 95% interval over tasks (fractions)."""
        if not self.open_set:
            return []
        measures = list(dict.fromkeys(k for values in self.open_set.values() for k in values))
        width = max(len(name) for name in self.open_set)
        s, rate = self.settings, self.open_set_info.get("false_rejection", 0.05)
        lines = [
            f"open set ({s.get('unknown_classes')} unseen actions x {s.get('unknown_queries')} queries a task; "
            f"catch rates at {rate:g} false rejection; --unknown auto uses {self.open_set_info['auto']['score']}):",
            f"  {'score':<{width}}  " + "  ".join(f"{k:>15}" for k in measures),
        ]
        for name, values in self.open_set.items():
            cells = [f"{values[k].mean():.3f} ± {interval95(values[k]):.3f}" if k in values else "-" for k in measures]
            lines.append(f"  {name:<{width}}  " + "  ".join(f"{c:>15}" for c in cells))
        return lines


def _score(tasks: TaskBatch, predicted: np.ndarray, split: SplitReader, settings: dict[str, Any]) -> EvalResult:
    """Per-task accuracy, per-class accuracy and the confusion matrix from predicted task labels."""
    correct = predicted == tasks.query_labels
    true_class = np.take_along_axis(tasks.classes, tasks.query_labels, axis=1)
    pred_class = np.take_along_axis(tasks.classes, predicted, axis=1)
    n_classes = len(split.class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (true_class.ravel(), pred_class.ravel()), 1)
    asked = confusion.sum(axis=1)
    per_class = {
        name: float(100.0 * confusion[c, c] / asked[c]) for c, name in enumerate(split.class_names) if asked[c] > 0
    }
    return EvalResult(
        task_accuracy=100.0 * correct.mean(axis=1),
        per_class=per_class,
        confusion=confusion,
        class_names=list(split.class_names),
        settings=settings,
    )


# ----------------------------------------------------------------------------------------------
# Paired comparison of two runs on identical tasks.


@dataclass(frozen=True)
class PairedDifference:
    """Run A minus run B on the same tasks: the mean difference in points and its 95% interval."""

    settings: dict[str, Any]
    mean_a: float
    mean_b: float
    difference: float
    ci95: float
    a_better: int  # tasks where A got more queries right
    b_better: int
    ties: int
    open_set: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # score -> measure -> a, b, diff

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.settings,
            **{k: getattr(self, k) for k in ("mean_a", "mean_b", "difference", "ci95", "a_better", "b_better", "ties")},
            **({"open_set": self.open_set} if self.open_set else {}),
        }

    def open_set_lines(self) -> list[str]:
        """One line per score both runs measured: each measure's A - B with its interval over the same tasks."""
        lines = []
        for name, measures in self.open_set.items():
            cells = [
                f"{k} {m['a']:.3f} vs {m['b']:.3f}: {m['difference']:+.3f} ± {m['ci95']:.3f}"
                for k, m in measures.items()
            ]
            lines.append(f"  open set, {name}: " + "; ".join(cells))
        return lines


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean of a - b task by task and its 95% interval (1.96 std / sqrt(n) of the differences)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths (got {a.shape} and {b.shape})")
    diff = a - b
    return float(diff.mean()), interval95(diff)


def compare_results(a: EvalResult, b: EvalResult) -> PairedDifference:
    """Paired difference of two results; ValueError naming the setting when their tasks differ."""
    for key in PAIRING_KEYS:
        if a.settings.get(key) != b.settings.get(key):
            raise ValueError(
                f"the runs did not see the same tasks: {key} is {a.settings.get(key)!r} in A and {b.settings.get(key)!r} in B"
            )
    diff, ci = paired_difference(a.task_accuracy, b.task_accuracy)
    open_set = {}
    for name in a.open_set.keys() & b.open_set.keys():
        pairs = {}
        for k in a.open_set[name].keys() & b.open_set[name].keys():
            d, half = paired_difference(a.open_set[name][k], b.open_set[name][k])
            pairs[k] = {
                "a": float(a.open_set[name][k].mean()),
                "b": float(b.open_set[name][k].mean()),
                "difference": d,
                "ci95": half,
            }
        open_set[name] = {k: pairs[k] for k in a.open_set[name] if k in pairs}  # in A's order
    return PairedDifference(
        settings={k: a.settings[k] for k in PAIRING_KEYS if k in a.settings},
        mean_a=a.mean,
        mean_b=b.mean,
        difference=diff,
        ci95=ci,
        a_better=int((a.task_accuracy > b.task_accuracy).sum()),
        b_better=int((a.task_accuracy < b.task_accuracy).sum()),
        ties=int((a.task_accuracy == b.task_accuracy).sum()),
        open_set={name: open_set[name] for name in a.open_set if name in open_set},
    )


def compare_runs(run_a: dict[str, Any], run_b: dict[str, Any]) -> list[PairedDifference]:
    """Pair the settings (way, shot, queries) two run records (`read_run`) share, e.g. one shot of a sweep.

    ValueError when they share none, or when a shared setting was run on other tasks (seed,
    episodes, split or the tasks' digest differ).
    """
    a = {_setting_order(r): r for r in map(EvalResult.from_dict, run_a["results"])}
    b = {_setting_order(r): r for r in map(EvalResult.from_dict, run_b["results"])}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"the runs share no setting: A has (way, shot, queries) {sorted(a)}, B has {sorted(b)}")
    return [compare_results(a[k], b[k]) for k in common]


def _setting_order(r: EvalResult) -> tuple[int, int, int]:
    return (r.settings["way"], r.settings["shot"], r.settings["queries"])


# ----------------------------------------------------------------------------------------------
# Files: the run record (JSON), a summary table (CSV), accuracy against shots (PNG).


def write_run(path: Path | str, results: Sequence[EvalResult], about: dict[str, Any]) -> Path:
    """One JSON record of a run: what was evaluated (`about`: checkpoint, cache, ...) and every result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": RUN_FORMAT, **about, "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_run(path: Path | str) -> dict[str, Any]:
    """A run record written by `write_run`; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable evaluation record ({err})") from err
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or not record.get("results"):
        raise ValueError(f"{path}: not an evaluation record (expected format {RUN_FORMAT!r} with results)")
    return record


def class_lines(result: EvalResult, top: int = 5) -> list[str]:
    """What a person reads after the mean: each class's accuracy (worst first), the most frequent
    confusions (rows of the confusion matrix are the true class, columns the predicted one), and a
    note when the split has so few classes that every task holds the same ones."""
    lines = ["per class (% of its queries right, worst first):"]
    for name, acc in sorted(result.per_class.items(), key=lambda kv: (kv[1], kv[0])):
        lines.append(f"  {acc:6.2f}  {name}")
    confusion = result.confusion.copy()
    np.fill_diagonal(confusion, 0)
    order = np.argsort(-confusion, axis=None, kind="stable")[:top]
    pairs = [np.unravel_index(i, confusion.shape) for i in order if confusion.flat[i] > 0]
    if pairs:
        lines.append(
            "most confused (true -> predicted: queries; the JSON's confusion rows are true, columns predicted):"
        )
        names = result.class_names
        lines += [f"  {names[t]} -> {names[p]}: {int(confusion[t, p])}" for t, p in pairs]
    way = result.settings.get("way")
    if way is not None and len(result.class_names) <= int(way):
        lines.append(
            f"note: the split has {len(result.class_names)} classes and tasks are {way}-way, so every task holds "
            "the same classes: the interval measures the draw of videos, not of classes"
        )
    return lines


def write_csv(path: Path | str, results: Sequence[EvalResult]) -> Path:
    """Summary table: one row per setting for all classes (with the interval), then one per class, then (open
    set) one per unknown score with each measure and its interval; percentages to 2 decimals, as printed, and
    open-set fractions to 4 (the JSON keeps every digit)."""
    import pandas as pd

    rows = []
    for r in results:
        base = {k: r.settings.get(k) for k in ("split", "way", "shot", "queries", "seed", "episodes")}
        rows.append({**base, "scope": "all", "accuracy": round(r.mean, 2), "ci95": round(r.ci95, 2)})
        rows += [{**base, "scope": name, "accuracy": round(acc, 2), "ci95": None} for name, acc in r.per_class.items()]
        for name, measures in r.open_set.items():  # one row per unknown score: each measure and its interval
            row = {**base, "scope": f"open set: {name}"}
            for k, v in measures.items():
                row.update(
                    {k: round(float(v.mean()), OPEN_SET_DIGITS), f"{k}_ci95": round(interval95(v), OPEN_SET_DIGITS)}
                )
            rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def plot_shot_sweep(results: Sequence[EvalResult], path: Path | str, title: str = "") -> Path:
    """Accuracy (with its 95% interval) against shots, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r.settings["shot"])
    shots = [r.settings["shot"] for r in results]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.errorbar(shots, [r.mean for r in results], yerr=[r.ci95 for r in results], marker="o", capsize=3)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(shots)
    ax.grid(alpha=0.3)
    first = results[0].settings
    ax.set_title(title or f"{first['way']}-way, {first['episodes']} tasks, seed {first['seed']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
