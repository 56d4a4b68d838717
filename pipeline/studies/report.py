"""The pictures and the markdown of a report: figures from results, ablation tables, plain-worded findings.

Why it is built this way: a report is the evidence a person reads, so every sentence that states a
result is written from the numbers (whether two intervals overlap, whether a paired difference is
clear of zero), never typed in advance. Figures are functions of results (evaluation records,
training metrics) that return matplotlib figures, so `strm ablate`, `strm visualize` and
`strm demo` draw the same pictures; `save_figure` writes them. Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, never need a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.evaluation.results import (  # noqa: E402
    EvalResult,
    PairedDifference,
    compare_results,
    interval95,
)

DPI = 110
NEGLIGIBLE = 0.5  # points: a paired difference clear of 0 but smaller than this is called negligible


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Write a figure as PNG (the folder is created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _colours(labels: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


# ----------------------------------------------------------------------------------------------
# Figures


def training_curves(runs: Mapping[str, Sequence[dict]], way: int | None = 5) -> Figure:
    """Training loss and validation accuracy against tasks, one line per run.

    `runs`: label -> the records of a run's metrics.jsonl (pipeline.training.train.read_metrics): lines with
    kind "train" (task, loss, accuracy) and kind "val" (task, accuracy, ci95).
    """
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = _colours(list(runs))
    positive = True
    for label, records in runs.items():
        train = [r for r in records if r.get("kind") == "train"]
        val = [r for r in records if r.get("kind") == "val"]
        if train:
            ax_loss.plot([r["task"] for r in train], [r["loss"] for r in train], color=colours[label], label=label)
            positive &= min(r["loss"] for r in train) > 0
        if val:
            tasks = np.array([r["task"] for r in val])
            acc = np.array([r["accuracy"] for r in val])
            ci = np.array([r.get("ci95", 0.0) for r in val])
            ax_val.plot(tasks, acc, "o-", ms=3, color=colours[label], label=label)
            ax_val.fill_between(tasks, acc - ci, acc + ci, color=colours[label], alpha=0.15, lw=0)
    if positive and any(runs.values()):
        ax_loss.set_yscale("log")
    if way:
        ax_val.axhline(100 / way, color="grey", ls=":", lw=1, label="chance")
    ax_loss.set(xlabel="training tasks", ylabel="training loss", title="training loss")
    ax_val.set(xlabel="training tasks", ylabel="accuracy (%)", title="validation accuracy (95% interval)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_bars(results: Mapping[str, EvalResult], title: str = "") -> Figure:
    """Mean accuracy with its 95% interval, one horizontal bar per model, value written on each."""
    labels = list(results)
    means = np.array([results[k].mean for k in labels])
    cis = np.array([results[k].ci95 for k in labels])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.4))
    y = np.arange(len(labels))[::-1]
    colours = _colours(labels)
    ax.barh(y, means, xerr=cis, capsize=4, color=[colours[k] for k in labels], alpha=0.85)
    for yi, m, c in zip(y, means, cis, strict=False):
        ax.text(m + c + 0.8, yi, f"{m:.1f} ± {c:.1f}", va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 112)
    ax.set_xlabel("accuracy (%), 95% interval")
    first = next(iter(results.values())).settings
    ax.set_title(
        title
        or f"{first.get('way')}-way {first.get('shot')}-shot, {first.get('episodes')} tasks, seed {first.get('seed')}"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def shot_curves(sweeps: Mapping[str, Sequence[EvalResult]], title: str = "") -> Figure:
    """Accuracy (95% interval) against shots, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = _colours(list(sweeps))
    shots: set[int] = set()
    for label, results in sweeps.items():
        ordered = sorted(results, key=lambda r: r.settings["shot"])
        xs = [r.settings["shot"] for r in ordered]
        shots.update(xs)
        ax.errorbar(
            xs,
            [r.mean for r in ordered],
            yerr=[r.ci95 for r in ordered],
            marker="o",
            capsize=3,
            color=colours[label],
            label=label,
        )
    ax.set_xticks(sorted(shots))
    ax.set(xlabel="shots (support videos a class)", ylabel="accuracy (%)", title=title or "accuracy against shots")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def per_class_bars(results: Mapping[str, EvalResult], order_by: str | None = None) -> Figure:
    """Per-class accuracy of each model on the test classes, classes sorted by `order_by`'s accuracy."""
    labels = list(results)
    key = order_by if order_by is not None and order_by in results else labels[-1]
    classes = sorted(results[key].per_class, key=lambda c: results[key].per_class[c])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(classes) * max(1.0, len(labels) / 3) + 1.5))
    height = 0.8 / len(labels)
    y = np.arange(len(classes))
    colours = _colours(labels)
    for i, label in enumerate(labels):
        values = [results[label].per_class.get(c, np.nan) for c in classes]
        ax.barh(y + (i - (len(labels) - 1) / 2) * height, values, height=height, color=colours[label], label=label)
    ax.set_yticks(y, classes, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy on the class's queries (%)")
    ax.set_title(f"per-class accuracy (sorted by {key})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def ablation_figure(table: pd.DataFrame, reference: str) -> Figure:
    """Two panels from `ablation_table`: accuracy per row, and each row minus the reference (paired interval)."""
    labels = list(table["row"])
    y = np.arange(len(labels))[::-1]
    fig, (ax_acc, ax_diff) = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.6), sharey=True)
    ax_acc.barh(y, table["accuracy"], xerr=table["ci95"], capsize=3, color="tab:blue", alpha=0.8)
    for yi, m, c in zip(y, table["accuracy"], table["ci95"], strict=False):
        ax_acc.text(m + c + 0.8, yi, f"{m:.1f}", va="center", fontsize=8)
    ax_acc.set_xlim(0, 110)
    ax_acc.set_yticks(y, labels)
    ax_acc.set(xlabel="accuracy (%), 95% interval", title="accuracy")
    diff, ci = table["difference"].to_numpy(float), table["difference_ci95"].to_numpy(float)
    clear = np.abs(diff) > ci
    colours = np.where(~clear, "tab:grey", np.where(diff > 0, "tab:green", "tab:red"))
    ax_diff.barh(y, diff, xerr=ci, capsize=3, color=colours, alpha=0.85)
    ax_diff.axvline(0, color="black", lw=0.8)
    ax_diff.set(
        xlabel=f"points against {reference} (paired 95% interval)", title=f"difference to {reference}, same tasks"
    )
    for ax in (ax_acc, ax_diff):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Tables


def ablation_table(
    results: Mapping[str, EvalResult], reference: str, about: Mapping[str, Mapping[str, object]] | None = None
) -> pd.DataFrame:
    """One row per result: accuracy, interval, and the paired difference to `reference` on the same tasks.

    `about` adds columns per row (variant, cardinalities, lambda, ...). Raises ValueError when a
    result was run on other tasks than the reference (compare_results checks the digest).
    """
    if reference not in results:
        raise ValueError(f"reference row {reference!r} is not among the results ({', '.join(results)})")
    rows = []
    for label, result in results.items():
        paired = compare_results(result, results[reference])
        rows.append(
            {
                "row": label,
                **dict((about or {}).get(label, {})),
                "accuracy": result.mean,
                "ci95": result.ci95,
                "difference": paired.difference,
                "difference_ci95": paired.ci95,
                "tasks_better": paired.a_better,
                "tasks_worse": paired.b_better,
            }
        )
    return pd.DataFrame(rows)


def _cell(value: object, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if fmt:
        return format(value, fmt)
    return str(value)


def markdown_table(table: pd.DataFrame, formats: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured markdown table of a DataFrame; `formats` maps a column to a format spec ('.1f')."""
    formats = formats or {}
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in table.iterrows():
        cells = [_cell(row[c], formats.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subset_table(results: Mapping[str, EvalResult], tasks: np.ndarray) -> pd.DataFrame:
    """model, tasks, accuracy, ci95 over a subset of the tasks (a boolean mask over every result's tasks)."""
    rows = []
    for k, r in results.items():
        chosen = r.task_accuracy[tasks]
        rows.append(
            {
                "model": k,
                "tasks": int(tasks.sum()),
                "accuracy": float(chosen.mean()) if len(chosen) else float("nan"),
                "ci95": interval95(chosen) if len(chosen) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def accuracy_table(results: Mapping[str, EvalResult]) -> pd.DataFrame:
    """model, accuracy, ci95, and the interval as text: the summary a report opens with."""
    return pd.DataFrame(
        [
            {
                "model": k,
                "accuracy": r.mean,
                "ci95": r.ci95,
                "interval": f"{r.mean - r.ci95:.2f} - {r.mean + r.ci95:.2f}",
            }
            for k, r in results.items()
        ]
    )


# ----------------------------------------------------------------------------------------------
# Findings in words, from the numbers


def intervals_overlap(a: EvalResult, b: EvalResult) -> bool:
    """Whether the two 95% intervals (mean +- ci95) share any point."""
    return a.mean - a.ci95 <= b.mean + b.ci95 and b.mean - b.ci95 <= a.mean + a.ci95


def beats(a: EvalResult, b: EvalResult) -> bool:
    """a's mean is higher and the two intervals do not overlap: the bar the issue sets for 'beats'."""
    return a.mean > b.mean and not intervals_overlap(a, b)


def clear_of_zero(paired: PairedDifference) -> bool:
    """Whether a paired difference's 95% interval excludes 0."""
    return abs(paired.difference) > paired.ci95


def effect(paired: PairedDifference) -> str:
    """'raises accuracy by 3.1 ± 0.4 points', 'lowers ...', or 'does not change accuracy measurably (...)'."""
    amount = f"{abs(paired.difference):.2f} ± {paired.ci95:.2f} points"
    if not clear_of_zero(paired):
        return f"does not change accuracy measurably ({paired.difference:+.2f} ± {paired.ci95:.2f} points)"
    return f"{'raises' if paired.difference > 0 else 'lowers'} accuracy by {amount}"


@dataclass(frozen=True)
class Contrast:
    """One question an ablation answers: what changing `base` into `changed` does, in words."""

    what: str  # subject of the sentence, e.g. "adding PLE to TRM"
    changed: str  # row label
    base: str  # row label
    role: str = ""  # in the summary: "total" (the whole gain), "alone" (a block added to the base), "on top"
    #                 (a block added to the other block), "" (said on its own), "detail" (listed only)
    block: str = ""  # the block's short name, for "alone" and "on top"
    flat_means: str = ""  # what it means when the difference is not measurable or negligible (said in the summary)


def findings(
    results: Mapping[str, EvalResult], contrasts: Sequence[Contrast]
) -> list[tuple[Contrast, PairedDifference, str]]:
    """For each contrast whose rows are present: its paired difference and the sentence that says it."""
    out = []
    for c in contrasts:
        if c.changed in results and c.base in results:
            paired = compare_results(results[c.changed], results[c.base])
            out.append((c, paired, f"{c.what[0].upper()}{c.what[1:]} {effect(paired)} ({c.changed} vs {c.base})."))
    return out


def comparison_sentence(winner: str, losers: Sequence[str], results: Mapping[str, EvalResult]) -> str:
    """Whether `winner` beats each of `losers` with non-overlapping 95% intervals, said plainly."""
    w = results[winner]
    parts = []
    for name in losers:
        r = results[name]
        verdict = (
            "beats"
            if beats(w, r)
            else ("does NOT beat (intervals overlap)" if intervals_overlap(w, r) else "does NOT beat")
        )
        parts.append(f"{winner} {verdict} {name}: {w.mean:.2f} ± {w.ci95:.2f} against {r.mean:.2f} ± {r.ci95:.2f}")
    return "; ".join(parts) + "."


def write_markdown(path: Path | str, text: str) -> Path:
    """Write a report's text (folder created), ending with one newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path
