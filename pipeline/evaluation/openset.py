"""Open-set measures: how well a score tells queries of the task's actions (known) from queries of other
actions (unknown), each per task with the field's 95% interval over tasks.

Every score reads "higher = more like a known action"; a query is rejected (labelled unknown) when its
score is below a threshold. Arrays are [tasks, queries] (a 1-D array is one task). The measures:
- AUROC: the probability that a known query scores above an unknown one (ties count half).
- AUPR: average precision of finding the unknown queries (unknown = positive) by ranking the lowest
  scores first; ties form one threshold (sklearn's `average_precision_score`).
- OSCR (Dhamija et al., "Reducing Network Agnostophobia", NeurIPS 2018): the area under the correct
  classification rate (known queries accepted AND classified right, over all known queries) against
  the false positive rate (unknown queries accepted, over all unknown queries), with ties as a diagonal
  step. It is at most the closed-set accuracy, and equals it when the score separates perfectly.
  FSOS-AR's code (hsp-iit/fsosar `compute_oscr`) divides false positives by (fp + unknowns) and closes
  the curve at (1, 1); we follow the paper's definition, so figures are comparable in kind, not digit.
- catch rate at a false rejection (oracle): unknown queries rejected at the highest threshold that
  rejects at most that share of the known queries (pooled over all tasks by default: with one query a
  class a task's own 5 known queries cannot reject 5%).
- at a given threshold (e.g. one calibrated on each task's support): its catch rate and the false
  rejection of known queries it really gives.
Counting is by ranks (sorting), so memory is linear in the number of scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.results import interval95


@dataclass(frozen=True)
class TaskMetric:
    """One measure: its value on each task, their mean, and the 95% half-interval over tasks."""

    per_task: np.ndarray  # [tasks]
    mean: float
    ci95: float

    @classmethod
    def of(cls, values: np.ndarray) -> TaskMetric:
        values = np.asarray(values, dtype=np.float64)
        return cls(values, float(values.mean()), interval95(values))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci95}


def _rows(scores: np.ndarray | list, name: str) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    a = a[None] if a.ndim == 1 else a
    if a.ndim != 2:
        raise ValueError(f"{name}: expected [tasks, queries] scores, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name}: scores hold NaN")
    return a


def _pair(known: np.ndarray | list, unknown: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    k, u = _rows(known, "known"), _rows(unknown, "unknown")
    if len(k) != len(u):
        raise ValueError(f"known and unknown scores cover {len(k)} and {len(u)} tasks")
    if k.shape[1] == 0 or u.shape[1] == 0:
        raise ValueError("open-set measures need known and unknown queries in every task")
    return k, u


def count_below(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each a[t, i]: how many of row t of b are below it, and how many equal it ([tasks, len a] each).

    Values become integer ranks over both arrays, keyed by row, and are counted by binary search in
    one sorted array: O(n log n) time, O(n) memory, whatever the number of tasks or queries.
    """
    if b.shape[1] == 0:
        zeros = np.zeros(a.shape, dtype=np.int64)
        return zeros, zeros
    _, inverse = np.unique(np.concatenate([a.ravel(), b.ravel()]), return_inverse=True)
    width = int(inverse.max()) + 2  # ranks 0..U-1 become keys row * width + 1 .. row * width + U
    rows = np.arange(len(a), dtype=np.int64)[:, None] * width
    keys_a = inverse[: a.size].reshape(a.shape) + 1 + rows
    keys_b = np.sort((inverse[a.size :].reshape(b.shape) + 1 + rows).ravel())
    left = np.searchsorted(keys_b, keys_a, "left")
    below = left - np.searchsorted(keys_b, np.broadcast_to(rows, a.shape), "left")
    equal = np.searchsorted(keys_b, keys_a, "right") - left
    return below, equal


def _wins(known: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """[tasks, known]: the unknown queries each known query scores above, ties counting half."""
    below, equal = count_below(known, unknown)
    return below + 0.5 * equal


def auroc(known: np.ndarray | list, unknown: np.ndarray | list) -> np.ndarray:
    """Per task: P(known score > unknown score), ties half (the Mann-Whitney AUROC)."""
    k, u = _pair(known, unknown)
    return _wins(k, u).sum(-1) / (k.shape[1] * u.shape[1])


def oscr(known: np.ndarray | list, unknown: np.ndarray | list, correct: np.ndarray | list) -> np.ndarray:
    """Per task: the area under correct classification rate against false positive rate (Dhamija et al.).

    With thresholds at every score, CCR steps up by 1/n_known at each correctly classified known query
    and FPR by 1/n_unknown at each unknown one, so the area is the share of (correct known, unknown)
    pairs in which the known query scores higher, ties half.
    """
    k, u = _pair(known, unknown)
    right = np.asarray(correct, dtype=bool).reshape(k.shape)
    return (_wins(k, u) * right).sum(-1) / (k.shape[1] * u.shape[1])


def aupr(known: np.ndarray | list, unknown: np.ndarray | list) -> np.ndarray:
    """Per task: average precision of finding the unknown queries, lowest scores first (unknown = positive).

    AP = mean over unknown queries j of the precision at j's threshold: the unknown share of every
    query scoring <= s_j (ties enter together, as in sklearn's average_precision_score).
    """
    k, u = _pair(known, unknown)
    below_u, equal_u = count_below(u, u)
    below_k, equal_k = count_below(u, k)
    unknown_at_or_below = below_u + equal_u  # includes j itself
    return (unknown_at_or_below / (unknown_at_or_below + below_k + equal_k)).mean(-1)


def oracle_threshold(known: np.ndarray | list, rate: float = 0.05, *, pooled: bool = True) -> np.ndarray:
    """The highest threshold that rejects (score < threshold) at most `rate` of the known scores: one for
    all tasks (pooled, returned once per task) or one per task."""
    if not 0 <= rate < 1:
        raise ValueError(f"false rejection rate must be in [0, 1) (got {rate})")
    k = _rows(known, "known")
    if pooled:
        flat = np.sort(k.ravel())
        return np.full(len(k), flat[math.floor(rate * len(flat) + 1e-9)])
    return np.sort(k, axis=-1)[:, math.floor(rate * k.shape[1] + 1e-9)]


def at_threshold(
    known: np.ndarray | list, unknown: np.ndarray | list, threshold: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per task, for a threshold (one, or one per task): (catch rate of unknown queries, false rejection of
    known ones), a query being rejected when its score is below the threshold."""
    k, u = _pair(known, unknown)
    cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64).reshape(-1, 1), (len(k), 1))
    return (u < cut).mean(-1), (k < cut).mean(-1)


def open_set_metrics(
    known: np.ndarray | list,
    unknown: np.ndarray | list,
    correct: np.ndarray | list,
    *,
    rate: float = 0.05,
    threshold: float | np.ndarray | None = None,
) -> dict[str, TaskMetric]:
    """Every measure of one score over tasks: auroc, aupr, oscr, catch_oracle (catch rate at `rate` false
    rejection, pooled oracle threshold) and, given a threshold (say, calibrated on each task's support),
    catch_calibrated and false_rejection_calibrated. Fractions in [0, 1]."""
    out = {
        "auroc": TaskMetric.of(auroc(known, unknown)),
        "aupr": TaskMetric.of(aupr(known, unknown)),
        "oscr": TaskMetric.of(oscr(known, unknown, correct)),
        "catch_oracle": TaskMetric.of(at_threshold(known, unknown, oracle_threshold(known, rate))[0]),
    }
    if threshold is not None:
        caught, rejected = at_threshold(known, unknown, threshold)
        out.update(catch_calibrated=TaskMetric.of(caught), false_rejection_calibrated=TaskMetric.of(rejected))
    return out
