"""Episode (task) sampling: the one place that decides which videos and views a task holds.

Task `index` of a sampler depends only on (seed, index): the generator is seeded with both, so a
task can be drawn again on its own (resume, another worker, another model) and two models
evaluated with the same seed see the same tasks. Classes are drawn without replacement, then
shot + queries videos a class without replacement, as the authors do (STRM_SPEC section 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    """One C-way K-shot task as indices into a split; labels are 0..way-1 in class-draw order."""

    classes: np.ndarray  # [way] split class indices; task label i is classes[i]
    support: np.ndarray  # [way * shot] video indices, grouped by task label
    support_labels: np.ndarray  # [way * shot]
    support_views: np.ndarray  # [way * shot] which cached view each support video uses
    query: np.ndarray  # [way * queries]
    query_labels: np.ndarray  # [way * queries]
    query_views: np.ndarray  # [way * queries]


@dataclass(frozen=True)
class TaskBatch:
    """Tasks stacked along a leading dimension B, for batched evaluation."""

    classes: np.ndarray  # [B, way]
    support: np.ndarray  # [B, way * shot]
    support_labels: np.ndarray
    support_views: np.ndarray
    query: np.ndarray  # [B, way * queries]
    query_labels: np.ndarray
    query_views: np.ndarray

    def __len__(self) -> int:
        return len(self.support)


class EpisodeSampler:
    """Draws tasks from one split; the class index is built once, each task is a pure function of its index."""

    def __init__(self, labels: np.ndarray, *, way: int, shot: int, queries: int, seed: int, views: int = 1) -> None:
        labels = np.asarray(labels)
        if min(way, shot, queries, views) < 1:
            raise ValueError(f"way, shot, queries and views must be >= 1 (got {way}, {shot}, {queries}, {views})")
        self.way, self.shot, self.queries, self.seed, self.views = way, shot, queries, seed, views
        need = shot + queries
        self._by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self._eligible = np.array(sorted(c for c, idx in self._by_class.items() if len(idx) >= need))
        if len(self._eligible) < way:
            raise ValueError(
                f"a {way}-way {shot}-shot task with {queries} queries needs {way} classes with >= {need} videos; "
                f"this split has {len(self._eligible)} such classes out of {len(self._by_class)}"
            )

    def task(self, index: int) -> Task:
        """Task number `index` of this sampler's stream."""
        rng = np.random.default_rng([self.seed, index])
        classes = rng.choice(self._eligible, self.way, replace=False)
        support, query = [], []
        for c in classes:
            picks = rng.choice(self._by_class[int(c)], self.shot + self.queries, replace=False)
            support.append(picks[: self.shot])
            query.append(picks[self.shot :])
        n_s, n_q = self.way * self.shot, self.way * self.queries
        views = rng.integers(0, self.views, size=n_s + n_q) if self.views > 1 else np.zeros(n_s + n_q, dtype=np.int64)
        return Task(
            classes=classes,
            support=np.concatenate(support),
            support_labels=np.repeat(np.arange(self.way), self.shot),
            support_views=views[:n_s],
            query=np.concatenate(query),
            query_labels=np.repeat(np.arange(self.way), self.queries),
            query_views=views[n_s:],
        )

    def batch(self, start: int, count: int) -> TaskBatch:
        """Tasks start .. start+count-1 stacked, for evaluation in batches."""
        tasks = [self.task(i) for i in range(start, start + count)]
        return TaskBatch(**{name: np.stack([getattr(t, name) for t in tasks]) for name in Task.__dataclass_fields__})
