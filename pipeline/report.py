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

from pipeline.evaluate import EvalResult, PairedDifference, compare_results, interval95  # noqa: E402

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

    `runs`: label -> the records of a run's metrics.jsonl (pipeline.train.read_metrics): lines with
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
    for yi, m, c in zip(y, means, cis):
        ax.text(m + c + 0.8, yi, f"{m:.1f} ± {c:.1f}", va="center", fontsize=9)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 112)
    ax.set_xlabel("accuracy (%), 95% interval")
    first = next(iter(results.values())).settings
    ax.set_title(title or f"{first.get('way')}-way {first.get('shot')}-shot, {first.get('episodes')} tasks, seed {first.get('seed')}")
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
        ax.errorbar(xs, [r.mean for r in ordered], yerr=[r.ci95 for r in ordered], marker="o", capsize=3,
                    color=colours[label], label=label)
    ax.set_xticks(sorted(shots))
    ax.set(xlabel="shots (support videos a class)", ylabel="accuracy (%)", title=title or "accuracy against shots")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def per_class_bars(results: Mapping[str, EvalResult], order_by: str | None = None) -> Figure:
    """Per-class accuracy of each model on the test classes, classes sorted by `order_by`'s accuracy."""
    labels = list(results)
    key = order_by if order_by in results else labels[-1]
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
    for yi, m, c in zip(y, table["accuracy"], table["ci95"]):
        ax_acc.text(m + c + 0.8, yi, f"{m:.1f}", va="center", fontsize=8)
    ax_acc.set_xlim(0, 110)
    ax_acc.set_yticks(y, labels)
    ax_acc.set(xlabel="accuracy (%), 95% interval", title="accuracy")
    diff, ci = table["difference"].to_numpy(float), table["difference_ci95"].to_numpy(float)
    clear = np.abs(diff) > ci
    colours = np.where(~clear, "tab:grey", np.where(diff > 0, "tab:green", "tab:red"))
    ax_diff.barh(y, diff, xerr=ci, capsize=3, color=colours, alpha=0.85)
    ax_diff.axvline(0, color="black", lw=0.8)
    ax_diff.set(xlabel=f"points against {reference} (paired 95% interval)", title=f"difference to {reference}, same tasks")
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
        rows.append({
            "row": label,
            **dict((about or {}).get(label, {})),
            "accuracy": result.mean,
            "ci95": result.ci95,
            "difference": paired.difference,
            "difference_ci95": paired.ci95,
            "tasks_better": paired.a_better,
            "tasks_worse": paired.b_better,
        })
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
        rows.append({"model": k, "tasks": int(tasks.sum()), "accuracy": float(chosen.mean()) if len(chosen) else float("nan"),
                     "ci95": interval95(chosen) if len(chosen) else float("nan")})
    return pd.DataFrame(rows)


def accuracy_table(results: Mapping[str, EvalResult]) -> pd.DataFrame:
    """model, accuracy, ci95, and the interval as text: the summary a report opens with."""
    return pd.DataFrame([
        {"model": k, "accuracy": r.mean, "ci95": r.ci95, "interval": f"{r.mean - r.ci95:.2f} - {r.mean + r.ci95:.2f}"}
        for k, r in results.items()
    ])


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


def findings(results: Mapping[str, EvalResult], contrasts: Sequence[Contrast]) -> list[tuple[Contrast, PairedDifference, str]]:
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
        verdict = "beats" if beats(w, r) else ("does NOT beat (intervals overlap)" if intervals_overlap(w, r) else "does NOT beat")
        parts.append(f"{winner} {verdict} {name}: {w.mean:.2f} ± {w.ci95:.2f} against {r.mean:.2f} ± {r.ci95:.2f}")
    return "; ".join(parts) + "."


def write_markdown(path: Path | str, text: str) -> Path:
    """Write a report's text (folder created), ending with one newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# The demo's report


@dataclass
class DemoFacts:
    """Everything `demo_report` writes about, gathered by `strm demo`."""

    main: Mapping[str, EvalResult]  # proto, trm, strm on the same test tasks
    winner: str  # the model the evidence is about (strm)
    ablation: pd.DataFrame  # from ablation_table
    ablation_reference: str
    ablation_results: Mapping[str, EvalResult]
    contrasts: Sequence[Contrast]
    gamma: float | None  # PLE's learned gate in the winner's checkpoint
    training: Mapping[str, Mapping[str, object]]  # label -> tasks, best_val, best_task, stopped_early, checkpoint
    sizes: Sequence[tuple[str, str, str]]  # (setting, value, why)
    timings: Sequence[Mapping[str, object]]  # rows: stage, wall_s, cpu_s (and any other columns)
    figures: Mapping[str, str]  # figure key -> path relative to the report
    notes: Sequence[str] = ()  # anything else a reader must know (the flip, the machine, ...)
    subsets: Sequence[tuple[str, pd.DataFrame]] = ()  # (what the subset is, subset_table of the main models)
    command: str = "strm demo"
    prediction: Mapping[str, object] | None = None  # the demo's `strm predict` step (pipeline/demo.py _predict)


def _figure(facts: DemoFacts, key: str, caption: str) -> str:
    path = facts.figures.get(key)
    return f"![{caption}]({path})\n\n*{caption}*\n" if path else f"*{caption}: not drawn in this run.*\n"


def _not_beaten_reason(winner: EvalResult, other: EvalResult, name: str, wname: str) -> str:
    if winner.mean <= other.mean:
        return (f"{wname} is not better than {name} at all here ({winner.mean:.2f} against {other.mean:.2f}); "
                "the ablation below shows which part of the heads does not help on this benchmark")
    return (f"{wname} is ahead of {name} by {winner.mean - other.mean:.2f} points, but that is within the two "
            "intervals; the paired interval in the ablation table is the sharper test")


def demo_report(facts: DemoFacts) -> str:
    """The markdown of the demo's report: results and evidence, figures, ablation in words, sizes and times."""
    main, w = facts.main, facts.winner
    others = [k for k in main if k != w]
    first = main[w].settings
    lines = [
        "# strm demo: STRM on the embedded synthetic benchmark",
        "",
        f"Produced by `{facts.command}`: synthetic videos -> manifest -> frozen feature cache -> trained heads "
        f"-> evaluation of {', '.join(main)} on the same {first.get('episodes')} test tasks "
        f"({first.get('way')}-way {first.get('shot')}-shot, {first.get('queries')} query a class, seed {first.get('seed')}, "
        f"tasks digest `{first.get('episodes_digest')}`) -> ablation -> this report.",
        "",
        "## Result",
        "",
        markdown_table(accuracy_table(main), {"accuracy": ".2f", "ci95": ".2f"}),
        "",
    ]
    beaten = [k for k in others if beats(main[w], main[k])]
    if len(beaten) == len(others):
        lines.append(f"**{w} beats {' and '.join(others)} with 95% intervals that do not overlap.** "
                     + comparison_sentence(w, others, main))
    else:
        missing = [k for k in others if k not in beaten]
        lines.append(f"**{w} does NOT beat {' and '.join(missing)} with non-overlapping intervals.** "
                     + comparison_sentence(w, others, main) + " Why: "
                     + "; ".join(_not_beaten_reason(main[w], main[k], k, w) for k in missing) + ".")
    said = findings(facts.ablation_results, facts.contrasts)
    lines += [
        "",
        f"Where the gain comes from (details in the ablation below): {_ablation_summary(said, facts.gamma)}",
        "",
        "The interval is 1.96 std / sqrt(tasks) over tasks (the field's convention); it measures the task "
        "sampling only, not the finite set of test videos or the training seed.",
        "",
    ]
    for what, table in facts.subsets:
        lines += [f"On {what}:", "", markdown_table(table, {"accuracy": ".2f", "ci95": ".2f"}), ""]
    lines += [
        _figure(facts, "accuracy", "Accuracy with its 95% interval, per model, on the same test tasks"),
        "## Training",
        "",
    ]
    rows = pd.DataFrame([{"heads": k, **v} for k, v in facts.training.items()])
    if not rows.empty:
        lines += [markdown_table(rows, {"best_val": ".2f"}), ""]
        rising = [k for k, v in facts.training.items()
                  if v.get("best_task") is not None and v.get("best_task") == v.get("tasks_trained") and not v.get("stopped_early")]
        if rising:
            lines += [f"Still improving at the last validation (best = last): {', '.join(rising)}. These heads are "
                      "not trained to convergence; with more training tasks their accuracy could still rise, so "
                      "the gaps between them are measured at equal, short training, not at their best.", ""]
    lines += [
        _figure(facts, "training", "Training loss and validation accuracy against training tasks"),
        "## Accuracy against shots",
        "",
        _figure(facts, "shots", "Accuracy against the number of support videos a class"),
        "## Per-class accuracy",
        "",
        _figure(facts, "per_class", "Per-class accuracy on the test classes"),
        "## What the heads look at",
        "",
        "Activation maps (as the paper's Fig. 1 and 5): per frame, the L2 norm of each of the 4x4 patch features "
        "before PLE (the standardised backbone features PLE receives), after PLE, and of PLE's change (after minus "
        "before), over the frames of view 0. Each row is scaled by its own maximum over the video.",
        "",
    ]
    for key in sorted(k for k in facts.figures if k.startswith("activation")):
        lines.append(_figure(facts, key, f"Activation maps: {key.split(':', 1)[-1]}"))
    lines += [
        "Tuple matches (as the paper's Fig. 10): for a query video's most confident frame pairs, the support "
        "pairs of its true class that TRM attends to most, with their attention weights.",
        "",
    ]
    for key in sorted(k for k in facts.figures if k.startswith("tuples")):
        lines.append(_figure(facts, key, f"Tuple matches: {key.split(':', 1)[-1]}"))
    lines += ["## Ablation: where the gain comes from", ""]
    ref = facts.ablation_reference
    shown = facts.ablation.drop(columns=["checkpoint"], errors="ignore")
    lines += [
        f"All rows trained with the same seed and settings and evaluated on the same {first.get('episodes')} tasks; "
        f"`difference` is the row minus `{ref}`, task by task, with its paired 95% interval.",
        "",
        markdown_table(shown, {"accuracy": ".2f", "ci95": ".2f", "difference": "+.2f", "difference_ci95": ".2f",
                               "tasks_trained": ".0f"}),
        "",
        _figure(facts, "ablation", "Ablation: accuracy per row, and the paired difference to the reference"),
        "In words (each sentence is a paired comparison on identical tasks; 'measurably' means the 95% interval "
        "of the difference excludes 0):",
        "",
    ]
    lines += [f"- {sentence}" for _, _, sentence in said]
    if facts.gamma is not None:
        lines.append(f"- PLE's attention gate gamma (initialised at 0) ended training at {facts.gamma:+.4f}.")
    lines += ["", f"**Plainly:** {_ablation_summary(said, facts.gamma)} ('negligible': under {NEGLIGIBLE} points.)", ""]
    if facts.prediction:
        lines += _prediction_section(facts)
    lines += ["## What was run, and why these sizes", "", markdown_table(pd.DataFrame(facts.sizes, columns=["setting", "value", "why"])), ""]
    if facts.notes:
        lines += [f"- {n}" for n in facts.notes] + [""]
    lines += ["## Time per stage", "",
              "Wall-clock seconds, and the CPU seconds of the main process (all its threads; not the synthesis and "
              "decoding worker processes), when the stage was computed. On a shared machine the wall time includes "
              "waiting for the CPU and the CPU time does not. The report's own writing is not counted.", ""]
    table = pd.DataFrame(list(facts.timings))
    if not table.empty:
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        total = {"stage": "total", **{c: table[c].sum() for c in numeric}}
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
        lines += [markdown_table(table, {c: ".1f" for c in numeric}), ""]
    return "\n".join(lines)


def _prediction_section(facts: DemoFacts) -> list[str]:
    """`strm predict` on held-out clips: the queries, the recording's segments, the unknown-score measurement."""
    p = facts.prediction
    d = p["protocol"]
    queries = pd.DataFrame(p["queries"])
    known = queries[queries["truth"] != "unknown"]
    unseen = queries[queries["truth"] == "unknown"]
    scores = pd.DataFrame([{"score": k, **v} for k, v in p["unknown"].items()]).sort_values("auroc", ascending=False)
    segments = ", ".join(f"{s['prediction']} {s['start']:.1f}-{s['end']:.1f} s" for s in p["segments"])
    best = scores.iloc[0]
    return [
        "## Using the trained heads on new clips (`strm predict`)", "",
        f"The strm heads, a support folder of {p['support_actions']} test actions x 5 clips (`{p['files']}/support`, "
        f"also saved as a support index), and clips they have not seen: {len(known)} clips of those actions and "
        f"{len(unseen)} clips of {p['unseen_actions']} actions not in the support. Probabilities are softmax(logits / T) with T = {p['temperature']:.3g} from the "
        "support's leave-one-out; `--unknown auto` labels a query `unknown` below the z-score threshold that "
        "rejects 5% of the support's own held-out clips.", "",
        markdown_table(queries, {"probability": ".3f", "score": ".2f", "threshold": ".2f"}), "",
        f"Known actions right: {int((known['predicted'] == known['truth']).sum())} of {len(known)}; unseen actions "
        f"labelled unknown: {int((unseen['predicted'] == 'unknown').sum())} of {len(unseen)}.", "",
        f"A recording of {', '.join(p['recording'])} joined (windows of 2 s, 0.5 s apart): {segments}.", "",
        _figure(facts, "timeline", "Probability of each support action over the recording's windows, segments shaded"),
        f"How well each score tells an action that is not in the support ({d['draws']} draws of {d['known']} test "
        f"actions x {d['shots']} support clips; their other clips against every clip of {d['unknown']} other test "
        "actions): AUROC, the share of unseen-action "
        "queries caught at a threshold rejecting 5% of the known queries (oracle), and with the threshold "
        "calibrated on the support alone (what `--unknown auto` does) the share caught and the false rejection it gives.", "",
        markdown_table(scores, {c: ".3f" for c in ("auroc", "catch_oracle", "catch_auto", "false_rejection_auto")}), "",
        f"The best score here is {best['score']} (AUROC {best['auroc']:.3f}); "
        + ("the goal of 0.85 is reached." if best["auroc"] >= 0.85 else
           "the goal of 0.85 is NOT reached: on these heads, actions not in the support are told apart only weakly."), "",
    ]


def _amount(p: PairedDifference) -> str:
    return f"{p.difference:+.2f} ± {p.ci95:.2f} points"


def _weight(p: PairedDifference) -> str:
    """'none' (interval includes 0), 'negligible' (clear of 0 but under NEGLIGIBLE points) or 'real'."""
    if not clear_of_zero(p):
        return "none"
    return "negligible" if abs(p.difference) < NEGLIGIBLE else "real"


def _ablation_summary(said: Sequence[tuple[Contrast, PairedDifference, str]], gamma: float | None) -> str:
    """A plain paragraph: the whole gain, each block alone and on top of the other, then the rest, weighed."""
    by_role: dict[str, list[tuple[Contrast, PairedDifference]]] = {}
    for c, p, _ in said:
        by_role.setdefault(c.role, []).append((c, p))
    parts = []
    total = by_role.get("total", [None])[0]
    if total:
        c, p = total
        parts.append(f"{c.changed} is {_amount(p)} {'above' if p.difference >= 0 else 'below'} {c.base} on the same tasks.")
    alone = sorted(by_role.get("alone", []), key=lambda x: -x[1].difference)
    if alone:
        share = total is not None and total[1].difference > 0 and _weight(total[1]) == "real"
        parts.append(f"Added alone to {alone[0][0].base}, " + "; ".join(
            f"{c.block} gives {_amount(p)}" + (f" ({p.difference / total[1].difference:.0%} of the whole)" if share else "")
            for c, p in alone) + ".")
        if share and alone[0][1].difference >= 0.5 * total[1].difference and _weight(alone[0][1]) == "real":
            parts.append(f"So the gain comes mostly from {alone[0][0].block}.")
    on_top = by_role.get("on top", [])
    if on_top:
        parts.append("Added on top of the other block, " + "; ".join(f"{c.block} gives {_amount(p)}" for c, p in on_top) + ".")
    meanings = []
    for c, p in by_role.get("", []):
        weight = _weight(p)
        verdict = {"none": "no measurable effect", "negligible": "measurable but negligible",
                   "real": "a real effect"}[weight]
        parts.append(f"{c.what[0].upper()}{c.what[1:]}: {verdict} ({_amount(p)}).")
        if weight != "real" and c.flat_means:
            meanings.append(c.flat_means)
    text = " ".join(parts + meanings) if parts else "The ablation rows are missing."
    if gamma is not None:
        text += f" (PLE's learned gate gamma is {gamma:+.4f}.)"
    return text
