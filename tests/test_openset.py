"""Open-set measures against small cases worked by hand (ties included), per task and over tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import openset
from pipeline.evaluation.results import interval95

# One task worked by hand: known scores 3, 2, 1 (the one scoring 2 misclassified), unknown scores 0, 2.
KNOWN, UNKNOWN, CORRECT = [3.0, 2.0, 1.0], [0.0, 2.0], [True, False, True]


def test_auroc_counts_pairs_with_ties_half():
    # pairs known > unknown: (3,0) (3,2) (2,0) (1,0) = 4, the tie (2,2) = 1/2, of 6 pairs
    assert openset.auroc(KNOWN, UNKNOWN) == pytest.approx([4.5 / 6])
    assert openset.auroc([1, 1], [1, 1]) == pytest.approx([0.5])  # all tied: chance
    assert openset.auroc([[2, 3], [0, 0]], [[1, 1], [1, 1]]) == pytest.approx([1.0, 0.0])  # per task


def test_aupr_ranks_the_unknown_queries_first():
    # Lowest first: 0 (unknown) -> precision 1 at recall 1/2; then 1 (known), then the tie at 2 (one
    # unknown, one known) enters together -> precision 2/4 at recall 1. AP = 1/2 * 1 + 1/2 * 1/2.
    assert openset.aupr(KNOWN, UNKNOWN) == pytest.approx([0.75])
    assert openset.aupr([5, 6], [1, 2]) == pytest.approx([1.0])  # perfect
    # all four tied: one threshold, precision 2/4 at recall 1
    assert openset.aupr([1, 1], [1, 1]) == pytest.approx([0.5])
    # worst: the unknowns score highest -> precisions 1/3 then 2/4
    assert openset.aupr([1, 2], [3, 4]) == pytest.approx([(1 / 3 + 2 / 4) / 2])


def test_oscr_is_the_area_under_ccr_against_fpr():
    # Thresholds from the top: 3 (known, right) -> (FPR 0, CCR 1/3); 2 (known wrong + unknown tied)
    # -> (1/2, 1/3); 1 (known, right) -> (1/2, 2/3); 0 (unknown) -> (1, 2/3). Area = 1/2 * 1/3 + 1/2 * 2/3.
    assert openset.oscr(KNOWN, UNKNOWN, CORRECT) == pytest.approx([0.5])
    # a perfectly separating score gives the closed-set accuracy, a tie a diagonal (half)
    assert openset.oscr([5, 6, 7], [1, 2], [True, True, False]) == pytest.approx([2 / 3])
    assert openset.oscr([2], [2], [True]) == pytest.approx([0.5])
    assert openset.oscr([2], [2], [False]) == pytest.approx([0.0])


def test_oscr_equals_the_curve_drawn_point_by_point():
    rng = np.random.default_rng(0)
    known, unknown = rng.integers(0, 6, 12).astype(float), rng.integers(0, 6, 9).astype(float)  # many ties
    correct = rng.random(12) < 0.7
    points = [(0.0, 0.0)]
    for cut in np.unique(np.concatenate([known, unknown]))[::-1]:
        points.append(((unknown >= cut).mean(), ((known >= cut) & correct).mean()))
    area = sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in zip(points, points[1:], strict=False))
    assert openset.oscr(known, unknown, correct) == pytest.approx([area])
    pairs = (known[:, None] > unknown[None]) + 0.5 * (known[:, None] == unknown[None])
    assert openset.auroc(known, unknown) == pytest.approx([pairs.mean()])


def test_catch_rate_at_a_false_rejection_and_at_a_given_threshold():
    known = np.arange(1, 21, dtype=float)  # 20 known scores 1..20
    unknown = np.array([0.5, 1.0, 1.5, 3.0])
    # at most 5% of 20 = 1 known rejected: the threshold is the 2nd lowest known (2), rejecting only 1
    assert openset.oracle_threshold(known, 0.05) == pytest.approx([2.0])
    caught, rejected = openset.at_threshold(known, unknown, 2.0)
    assert caught == pytest.approx([3 / 4]) and rejected == pytest.approx([1 / 20])  # 0.5, 1.0, 1.5 < 2
    # per task, 5 known queries cannot reject 5%: the threshold is their lowest, rejecting none
    tasks = np.array([[4, 5, 6, 7, 8], [1, 2, 3, 4, 5]], dtype=float)
    assert openset.oracle_threshold(tasks, 0.05, pooled=False) == pytest.approx([4, 1])
    # pooled over the two tasks (10 scores): still none may go, the lowest of all (1)
    assert openset.oracle_threshold(tasks, 0.05) == pytest.approx([1, 1])
    caught, rejected = openset.at_threshold(tasks, [[3, 9], [0, 1]], np.array([5.0, 2.0]))  # one threshold a task
    assert caught == pytest.approx([1 / 2, 1]) and rejected == pytest.approx([1 / 5, 1 / 5])


def test_every_measure_per_task_with_its_interval():
    rng = np.random.default_rng(1)
    known, unknown = rng.normal(1, 1, (40, 5)), rng.normal(0, 1, (40, 25))
    correct = rng.random((40, 5)) < 0.8
    m = openset.open_set_metrics(known, unknown, correct, threshold=np.zeros(40))
    assert set(m) == {"auroc", "aupr", "oscr", "catch_oracle", "catch_calibrated", "false_rejection_calibrated"}
    for name, metric in m.items():
        assert metric.per_task.shape == (40,), name
        assert metric.mean == pytest.approx(metric.per_task.mean()) and metric.ci95 == interval95(metric.per_task)
    for b in (0, 17):  # each task alone gives its own value
        assert m["aupr"].per_task[b] == pytest.approx(openset.aupr(known[b], unknown[b])[0])
    assert m["oscr"].mean <= correct.mean() + 1e-12 and 0.6 < m["auroc"].mean < 0.9
    assert m["false_rejection_calibrated"].per_task[3] == (known[3] < 0).mean()
    assert math.isclose(m["auroc"].to_dict()["mean"], m["auroc"].mean)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="known and unknown queries"):
        openset.auroc([1.0, 2.0], np.zeros((1, 0)))
    with pytest.raises(ValueError, match="unknown: scores hold NaN"):
        openset.auroc([1.0], [np.nan])
    with pytest.raises(ValueError, match="cover 2 and 1 tasks"):
        openset.auroc(np.zeros((2, 3)), np.zeros((1, 3)))
