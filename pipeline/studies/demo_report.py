"""The demo's report in words: every sentence that states a result is written from the numbers
(intervals, paired differences) that `strm demo` gathered in DemoFacts.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, never need a display
import pandas as pd  # noqa: E402

from pipeline.evaluation.results import EvalResult, PairedDifference  # noqa: E402
from pipeline.studies.demo_openset import OpenSetFacts, open_set_section  # noqa: E402
from pipeline.studies.report import (
    NEGLIGIBLE,
    Contrast,
    accuracy_table,
    beats,
    clear_of_zero,
    comparison_sentence,
    findings,
    markdown_table,
)

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
    prediction: Mapping[str, Any] | None = None  # the demo's `strm predict` step (pipeline/studies/demo_predict.py)
    open_set: OpenSetFacts | None = None  # the open-set model beside strm (pipeline/studies/demo_openset.py)


def _figure(facts: DemoFacts, key: str, caption: str) -> str:
    path = facts.figures.get(key)
    return f"![{caption}]({path})\n\n*{caption}*\n" if path else f"*{caption}: not drawn in this run.*\n"


def _not_beaten_reason(winner: EvalResult, other: EvalResult, name: str, wname: str) -> str:
    if winner.mean <= other.mean:
        return (
            f"{wname} is not better than {name} at all here ({winner.mean:.2f} against {other.mean:.2f}); "
            "the ablation below shows which part of the heads does not help on this benchmark"
        )
    return (
        f"{wname} is ahead of {name} by {winner.mean - other.mean:.2f} points, but that is within the two "
        "intervals; the paired interval in the ablation table is the sharper test"
    )


def demo_report(facts: DemoFacts) -> str:
    """The markdown of the demo's report: results and evidence, figures, ablation in words, sizes and times."""
    said = findings(facts.ablation_results, facts.contrasts)
    lines = _result_section(facts, said)
    lines += _training_section(facts)
    lines += _pictures_section(facts)
    lines += _ablation_section(facts, said)
    if facts.open_set:
        lines += open_set_section(facts.open_set)
    if facts.prediction:
        lines += _prediction_section(facts)
    lines += _sizes_and_times_section(facts)
    return "\n".join(lines)


def _result_section(facts: DemoFacts, said: Sequence[tuple[Contrast, PairedDifference, str]]) -> list[str]:
    """The title, the accuracy table, whether the winner beats the others, and where the gain comes from."""
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
        lines.append(
            f"**{w} beats {' and '.join(others)} with 95% intervals that do not overlap.** "
            + comparison_sentence(w, others, main)
        )
    else:
        missing = [k for k in others if k not in beaten]
        lines.append(
            f"**{w} does NOT beat {' and '.join(missing)} with non-overlapping intervals.** "
            + comparison_sentence(w, others, main)
            + " Why: "
            + "; ".join(_not_beaten_reason(main[w], main[k], k, w) for k in missing)
            + "."
        )
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
    ]
    return lines


def _training_section(facts: DemoFacts) -> list[str]:
    """Each heads' training summary, and which were still improving when training stopped."""
    lines = [
        "## Training",
        "",
    ]
    rows = pd.DataFrame([{"heads": k, **v} for k, v in facts.training.items()])
    if not rows.empty:
        lines += [markdown_table(rows, {"best_val": ".2f"}), ""]
        rising = [
            k
            for k, v in facts.training.items()
            if v.get("best_task") is not None
            and v.get("best_task") == v.get("tasks_trained")
            and not v.get("stopped_early")
        ]
        if rising:
            lines += [
                f"Still improving at the last validation (best = last): {', '.join(rising)}. These heads are "
                "not trained to convergence; with more training tasks their accuracy could still rise, so "
                "the gaps between them are measured at equal, short training, not at their best.",
                "",
            ]
    lines += [
        _figure(facts, "training", "Training loss and validation accuracy against training tasks"),
    ]
    return lines


def _pictures_section(facts: DemoFacts) -> list[str]:
    """Accuracy against shots, per-class accuracy, activation maps and tuple matches."""
    lines = [
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
    return lines


def _ablation_section(facts: DemoFacts, said: Sequence[tuple[Contrast, PairedDifference, str]]) -> list[str]:
    """The ablation table, its figure, each paired comparison in words and the plain summary."""
    first = facts.main[facts.winner].settings
    lines = ["## Ablation: where the gain comes from", ""]
    ref = facts.ablation_reference
    shown = facts.ablation.drop(columns=["checkpoint"], errors="ignore")
    lines += [
        f"All rows trained with the same seed and settings and evaluated on the same {first.get('episodes')} tasks; "
        f"`difference` is the row minus `{ref}`, task by task, with its paired 95% interval.",
        "",
        markdown_table(
            shown,
            {"accuracy": ".2f", "ci95": ".2f", "difference": "+.2f", "difference_ci95": ".2f", "tasks_trained": ".0f"},
        ),
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
    return lines


def _sizes_and_times_section(facts: DemoFacts) -> list[str]:
    """What was run and why these sizes, the notes, and the time per stage with its total."""
    lines = [
        "## What was run, and why these sizes",
        "",
        markdown_table(pd.DataFrame(facts.sizes, columns=["setting", "value", "why"])),
        "",
    ]
    if facts.notes:
        lines += [f"- {n}" for n in facts.notes] + [""]
    lines += [
        "## Time per stage",
        "",
        "Wall-clock seconds, and the CPU seconds of the main process (all its threads; not the synthesis and "
        "decoding worker processes), when the stage was computed. On a shared machine the wall time includes "
        "waiting for the CPU and the CPU time does not. The report's own writing is not counted.",
        "",
    ]
    table = pd.DataFrame(list(facts.timings))
    if not table.empty:
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        total = {"stage": "total", **{c: table[c].sum() for c in numeric}}
        table = pd.concat([table, pd.DataFrame([total])], ignore_index=True)
        lines += [markdown_table(table, dict.fromkeys(numeric, ".1f")), ""]
    return lines


def _prediction_section(facts: DemoFacts) -> list[str]:
    """`strm predict` on held-out clips: the queries with `--unknown auto`, the recording's segments."""
    p = facts.prediction
    assert p is not None  # demo_report adds this section only when there is a prediction
    queries = pd.DataFrame(p["queries"])
    known = queries[queries["truth"] != "unknown"]
    unseen = queries[queries["truth"] == "unknown"]
    segments = ", ".join(f"{s['prediction']} {s['start']:.1f}-{s['end']:.1f} s" for s in p["segments"])
    measured = (
        'how well the scores tell such actions apart on the test tasks is in "Actions not in the support" above'
        if facts.open_set
        else "the open-set measures were not run"
    )
    return [
        "## Using the trained heads on new clips (`strm predict`)",
        "",
        f"The `{p.get('model', 'strm')}` heads, a support folder of {p['support_actions']} test actions x 5 clips "
        f"(`{p['files']}/support`, also saved as a support index), and clips they have not seen: {len(known)} clips "
        f"of those actions and {len(unseen)} clips of {p['unseen_actions']} actions not in the support. "
        f"Probabilities are softmax(logits / T) with T = {p['temperature']:.3g} from the support's leave-one-out; "
        f"`--unknown auto` labels a query `unknown` when its score (`{p.get('score_name')}`, the heads' trained "
        "score when they have one) falls below the threshold meant to reject 5% of known clips, calibrated out of "
        f"sample on the support (each clip scored from the others); {measured}.",
        "",
        markdown_table(queries, {"probability": ".3f", "score": ".3f", "threshold": ".3f"}),
        "",
        f"Known actions right: {int((known['predicted'] == known['truth']).sum())} of {len(known)}; unseen actions "
        f"labelled unknown: {int((unseen['predicted'] == 'unknown').sum())} of {len(unseen)}.",
        "",
        f"A recording of {', '.join(p['recording'])} joined (windows of 2 s, 0.5 s apart): {segments}.",
        "",
        *_recording_truth(p),
        _figure(
            facts,
            "timeline",
            "Probability of each support action over the recording's windows, segments shaded; below, the true "
            "segments above the predicted ones",
        ),
    ]


def _recording_truth(p: Mapping[str, Any]) -> list[str]:
    """The recording's true segments (the demo joined its clips, so it knows them), where the predicted ones
    disagree, and the annotated recording."""
    if not p.get("truth"):
        return []
    truth = ", ".join(f"{s['action']} {s['start']:.1f}-{s['end']:.1f} s" for s in p["truth"])
    length = p["truth"][-1]["end"] - p["truth"][0]["start"]
    wrong = p["disagreements"]
    missed = sum(d["end"] - d["start"] for d in wrong)
    where = "; ".join(
        f"{d['start']:.2f}-{d['end']:.2f} s: {d['predicted'] or 'no prediction'} where it is {d['truth']}"
        for d in wrong
    )
    lines = [
        f"The true segments: {truth}. "
        + (
            f"Predicted and true segments disagree over {missed:.1f} of {length:.1f} s ({missed / length:.0%}): {where}."
            if wrong
            else "Predicted and true segments agree over the whole recording."
        ),
        "",
    ]
    if p.get("annotated"):
        lines += [
            f"The annotated recording, [`{p['annotated']}`]({p['annotated']}) (as `strm predict --annotate` writes it): every frame "
            "with the window prediction in effect, its probability and top actions as bars, and the timeline "
            "strip of true and predicted segments with a cursor at the frame's time.",
            "",
        ]
    return lines


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
        parts.append(
            f"{c.changed} is {_amount(p)} {'above' if p.difference >= 0 else 'below'} {c.base} on the same tasks."
        )
    alone = sorted(by_role.get("alone", []), key=lambda x: -x[1].difference)
    if alone:
        # The whole gain when it is real and positive: then each block's share of it is said.
        whole = total[1] if total is not None and total[1].difference > 0 and _weight(total[1]) == "real" else None
        parts.append(
            f"Added alone to {alone[0][0].base}, "
            + "; ".join(
                f"{c.block} gives {_amount(p)}"
                + (f" ({p.difference / whole.difference:.0%} of the whole)" if whole is not None else "")
                for c, p in alone
            )
            + "."
        )
        if whole is not None and alone[0][1].difference >= 0.5 * whole.difference and _weight(alone[0][1]) == "real":
            parts.append(f"So the gain comes mostly from {alone[0][0].block}.")
    on_top = by_role.get("on top", [])
    if on_top:
        parts.append(
            "Added on top of the other block, " + "; ".join(f"{c.block} gives {_amount(p)}" for c, p in on_top) + "."
        )
    meanings = []
    for c, p in by_role.get("", []):
        weight = _weight(p)
        verdict = {"none": "no measurable effect", "negligible": "measurable but negligible", "real": "a real effect"}[
            weight
        ]
        parts.append(f"{c.what[0].upper()}{c.what[1:]}: {verdict} ({_amount(p)}).")
        if weight != "real" and c.flat_means:
            meanings.append(c.flat_means)
    text = " ".join(parts + meanings) if parts else "The ablation rows are missing."
    if gamma is not None:
        text += f" (PLE's learned gate gamma is {gamma:+.4f}.)"
    return text
