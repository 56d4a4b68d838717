"""The demo: its report says what the numbers say, and a miniature `strm demo` runs every stage and resumes."""

from __future__ import annotations

import json

import av
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.data import synth
from pipeline.evaluation.results import EvalResult
from pipeline.studies import demo, demo_openset, demo_report, report
from stages.app import app

SETTINGS = {"split": "test", "way": 5, "shot": 5, "queries": 1, "seed": 0, "episodes": 400, "episodes_digest": "abc"}


def _result(mean: float, spread: float = 20.0, seed: int = 0) -> EvalResult:
    """400 task accuracies around `mean` (each a multiple of 20, as with 5 queries)."""
    rng = np.random.default_rng(seed)
    acc = np.clip(np.round((mean + spread * rng.standard_normal(400)) / 20) * 20, 0, 100)
    acc += mean - acc.mean()  # exact mean, for readable assertions
    return EvalResult(
        task_accuracy=acc,
        per_class={"a_then_b": mean, "b_then_a": mean - 5},
        confusion=np.zeros((2, 2), int),
        class_names=["a_then_b", "b_then_a"],
        settings=dict(SETTINGS),
    )


def _facts(main: dict[str, EvalResult], ablation: dict[str, EvalResult], gamma: float = 0.004) -> demo_report.DemoFacts:
    table = report.ablation_table(ablation, "trm")
    return demo_report.DemoFacts(
        main=main,
        winner="strm",
        ablation=table,
        ablation_reference="trm",
        ablation_results=ablation,
        contrasts=demo.CONTRASTS,
        gamma=gamma,
        training={
            "strm": {"tasks_trained": 300, "best_val": 91.0, "best_task": 200, "stopped_early": False},
            "trm": {"tasks_trained": 300, "best_val": 60.0, "best_task": 300, "stopped_early": False},
        },
        sizes=demo.DemoSizes().rows(),
        timings=[
            {"stage": "synth", "wall_s": 40.0, "cpu_s": 30.0},
            {"stage": "extract", "wall_s": 120.5, "cpu_s": 200.25},
        ],
        figures={"accuracy": "figures/accuracy.png"},
        notes=["flips are off"],
    )


def test_report_says_strm_beats_when_intervals_do_not_overlap_and_names_every_row():
    main = {"proto": _result(57.0, seed=1), "trm": _result(66.0, seed=2), "strm": _result(94.0, 8, seed=3)}
    ablation = {
        **main,
        "ple-trm": _result(70.0, seed=4),
        "fle-trm": _result(84.0, seed=5),
        "ple-fle-trm": _result(93.0, seed=6),
        "strm, gamma forced to 0": _result(94.0, 8, seed=3),
        "strm, no QC": _result(93.9, 8, seed=3),
    }
    text = demo_report.demo_report(_facts(main, ablation))
    assert "**strm beats proto and trm with 95% intervals that do not overlap.**" in text
    assert "NOT" not in text.split("## Training")[0]
    for label, result in ablation.items():
        assert f"| {label} |" in text and f"{result.mean:.2f}" in text
    # Identical task accuracies: forcing gamma to 0 changed nothing, and the report says so plainly.
    assert (
        "Forcing PLE's attention gate gamma to 0 after training does not change accuracy measurably (+0.00 ± 0.00 points)"
        in text
    )
    assert "PLE's self-attention between patches contributes nothing that matters" in text
    assert "Forcing PLE's attention gate gamma to 0 after training: no measurable effect (+0.00 ± 0.00 points)." in text
    assert "ended training at +0.0040" in text
    # FLE alone (84 - 66 = 18 of 94 - 66 = 28 points) is most of the gain: the summary says where it comes from.
    assert "strm is +28.00 ± " in text and "FLE gives +18.00 ± " in text and "(64% of the whole)" in text
    assert "So the gain comes mostly from FLE." in text
    assert "Still improving at the last validation (best = last): trm." in text
    assert "| extract | 120.5 | 200.2 |" in text and "| total | 160.5 | 230.2 |" in text
    assert "![Accuracy with its 95% interval" in text and "not drawn in this run" in text  # missing figures are said


def test_report_says_plainly_when_strm_does_not_beat_a_baseline():
    main = {"proto": _result(60.0, seed=1), "trm": _result(70.0, seed=2), "strm": _result(70.5, seed=3)}
    text = demo_report.demo_report(_facts(main, dict(main)))
    assert "**strm does NOT beat trm with non-overlapping intervals.**" in text
    assert "strm beats proto" in text
    assert "Why: strm is ahead of trm by 0.50 points, but that is within the two intervals" in text
    worse = {"proto": _result(80.0, seed=1), "trm": _result(70.0, seed=2), "strm": _result(65.0, seed=3)}
    text = demo_report.demo_report(_facts(worse, dict(worse)))
    assert "**strm does NOT beat proto and trm" in text and "is not better than proto at all" in text


def test_reversed_pair_tasks_are_those_with_a_class_and_its_reverse():
    names = ["grow_then_shrink", "shrink_then_grow", "cover_then_cover", "appear_then_grow", "grow_then_cover"]
    classes = np.array([[0, 1, 2], [0, 2, 3], [2, 3, 4], [1, 4, 0]])
    tasks = type("Tasks", (), {"classes": classes})()
    assert demo.reversed_pair_tasks(tasks, names).tolist() == [True, False, False, True]
    acc = _result(70.0)
    mask = np.zeros(400, bool)
    mask[:100] = True
    table = report.subset_table({"strm": acc}, mask)
    assert table.loc[0, "tasks"] == 100 and table.loc[0, "accuracy"] == pytest.approx(acc.task_accuracy[:100].mean())


def test_ablation_table_pairs_every_row_with_the_reference():
    a, b = _result(70.0, seed=1), _result(60.0, seed=2)
    table = report.ablation_table({"trm": b, "strm": a}, "trm", {"strm": {"variant": "strm"}})
    row = table.set_index("row").loc["strm"]
    diff = a.task_accuracy - b.task_accuracy
    assert row["difference"] == pytest.approx(diff.mean())
    assert row["difference_ci95"] == pytest.approx(1.96 * diff.std() / np.sqrt(len(diff)))
    assert row["tasks_better"] == int((diff > 0).sum()) and row["variant"] == "strm"
    other = _result(50.0)
    other.settings["episodes_digest"] = "other tasks"
    with pytest.raises(ValueError, match="same tasks"):
        report.ablation_table({"trm": b, "x": other}, "trm")
    markdown = report.markdown_table(table[["row", "accuracy"]], {"accuracy": ".1f"})
    assert markdown.splitlines()[2] == "| trm | 60.0 |"


def _open_set(mean: float, seed: int, scores: dict[str, tuple[float, float]], auto: str) -> EvalResult:
    """A result on open-set tasks: per score (AUROC, calibrated false rejection), per-task values around them."""
    result = _result(mean, seed=seed)
    result.settings.update(unknown_classes=5, unknown_queries=1)
    rng = np.random.default_rng(seed)
    result.open_set = {
        name: {
            "auroc": np.clip(auroc + 0.05 * rng.standard_normal(400), 0, 1),
            "aupr": np.full(400, 0.5),
            "oscr": np.full(400, 0.5),
            "catch_oracle": np.full(400, 0.3),
            "catch_calibrated": np.full(400, 0.3),
            "false_rejection_calibrated": np.clip(rejected + 0.01 * rng.standard_normal(400), 0, 1),
        }
        for name, (auroc, rejected) in scores.items()
    }
    result.open_set_info = {"false_rejection": 0.05, "auto": {"score": auto}}
    return result


def test_open_set_section_says_plainly_which_goals_are_met():
    base = _open_set(92.0, 1, {"max_logit": (0.75, 0.05), "zscore": (0.76, 0.05)}, "zscore")
    good = _open_set(96.0, 2, {"max_logit": (0.94, 0.05), "zscore": (0.93, 0.05), "garbage": (0.94, 0.06)}, "garbage")
    facts = demo_openset.OpenSetFacts({"strm": base, "strm+garbage": good}, "figures/open_set_scores.png", 1000)
    text = "\n".join(demo_openset.open_set_section(facts))
    assert "## Actions not in the support" in text and "](figures/open_set_scores.png)" in text
    assert "| strm | **zscore** (auto) | 92.00 ± " in text and "| strm+garbage | **garbage** (auto) | 96.00 ± " in text
    assert "AUROC >= 0.85 for the trained method: **reached**" in text
    assert "not lower than softmax-trained strm (paired): **met** (96.00 against 92.00, +4.00 ± " in text
    assert "; measurably higher)" in text
    assert "within 2 points of the 5% asked: **met** (6.0% ± " in text
    assert " (vs zscore)" in text  # garbage's own score is paired with strm's auto score
    weak = _open_set(85.0, 3, {"max_logit": (0.80, 0.05), "zscore": (0.81, 0.05), "garbage": (0.84, 0.09)}, "garbage")
    text = "\n".join(
        demo_openset.open_set_section(demo_openset.OpenSetFacts({"strm": base, "strm+garbage": weak}, "f.png", 10))
    )
    assert "AUROC >= 0.85 for the trained method: **NOT reached**" in text
    assert "(paired): **NOT met** (85.00 against 92.00" in text and "measurably lower" in text
    assert "of the 5% asked: **NOT met** (9." in text


@pytest.fixture
def small_benchmark(monkeypatch):
    """Ten classes in training and test (5 known and 5 unknown actions a task in the open set), five in
    validation, and the tiny random backbone: the whole demo in about a minute of CPU."""
    split = synth.class_split()
    counts = {"train": 10, "val": 5, "test": 10}
    classes = tuple(c for s, n in counts.items() for c in [c for c in synth.CLASSES if split[c] == s][:n])
    monkeypatch.setattr(synth, "CLASSES", classes)
    monkeypatch.setattr(demo, "BACKBONE", "tiny")
    monkeypatch.setattr(demo, "LAYER", None)
    return classes


def test_mini_demo_runs_every_stage_and_resumes(small_benchmark, tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--cache-root",
        str(tmp_path / "cache"),
        "--videos-per-class",
        "9",
        "--views",
        "2",
        "--train-episodes",
        "4",
        "--val-every",
        "2",
        "--val-episodes",
        "5",
        "--episodes",
        "60",
        "--shot-episodes",
        "10",
        "--trm-dim",
        "16",
        "--workers",
        "2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    table = pd.read_csv(out / "ablation.csv")
    assert list(table["row"]) == [
        "proto",
        "trm",
        "strm",
        "ple-trm",
        "fle-trm",
        "ple-fle-trm",
        "jnt-st-1",
        "strm, gamma forced to 0",
        "strm, no QC",
    ]
    for _, row in table.iterrows():
        assert f"| {row['row']} |" in text and f"{row['accuracy']:.2f}" in text
    assert "strm beats" in text or "strm does NOT beat" in text
    assert "Flips are off" in text
    assert "## Using the trained heads on new clips (`strm predict`)" in text
    assert "The `strm+garbage` heads" in text and "its score (`trained`, the heads' trained score" in text
    assert "## Actions not in the support" in text and "AUROC >= 0.85 for the trained method: **" in text
    for model, score in (("strm", "zscore"), ("strm+garbage", "garbage")):
        assert f"| {model} | **{score}** (auto) |" in text  # every measure of every score, per model
        saved = json.loads((out / "eval" / f"open_{model}.json").read_text())["results"][0]
        assert saved["unknown_classes"] == 5 and saved["open_set"]["auto"]["score"] == score
    assert "| strm+garbage | max_logit |" in text and "closed-set accuracy (points)" in text
    assert "| strm+garbage | 4 |" in text  # trained beside the others, in the training table
    predictions = json.loads((out / "predict" / "predictions.json").read_text())
    assert len(predictions["support"]["used"]) == 25 and predictions["queries"][-1]["segments"]
    recording = predictions["queries"][-1]["path"]
    with av.open(str(out / "predict" / "recording_annotated.mp4")) as annotated, av.open(recording) as source:
        assert annotated.streams.video[0].frames == source.streams.video[0].frames > 0
    assert "](predict/recording_annotated.mp4)" in text and ("disagree over" in text or "agree over" in text)
    for name in (
        "figures/accuracy",
        "figures/training",
        "figures/shots",
        "figures/per_class",
        "ablation",
        "figures/activation_0",
        "figures/tuples_0",
        "figures/timeline",
        "figures/open_set_scores",
    ):
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000 and mpimg.imread(path).std() > 0.02
        assert f"]({name}.png)" in text
    first = json.loads((out / "timings.json").read_text())
    assert not any(stage["reused"] for stage in first["this_run"].values())

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    second = json.loads((out / "timings.json").read_text())
    for stage in (
        "synth",
        "manifest",
        "extract",
        "train strm, trm",
        "evaluate proto, trm, strm",
        "train ablation variants",
        "evaluate ablation rows",
        "train strm+garbage",
        "evaluate open set",
        "accuracy against shots",
        "predict",
    ):
        assert second["this_run"][stage]["reused"], stage
        assert second["computed"][stage] == first["computed"][stage]  # the report keeps what the stage cost
    assert pd.read_csv(out / "ablation.csv")["accuracy"].tolist() == table["accuracy"].tolist()
