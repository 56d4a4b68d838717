"""Episode (task) sampling: the one place that decides which videos and views a task holds.

Task `index` of a sampler depends only on (seed, index): the generator is seeded with both, so a
task can be drawn again on its own (resume, another worker, another model) and two models
evaluated with the same seed see the same tasks. Classes are drawn without replacement, then
shot + queries videos a class without replacement, as the authors do (STRM_SPEC section 10).

Open-set tasks (`unknown_classes` M > 0) also hold `unknown_queries` videos of each of M other
classes of the split, labelled UNKNOWN: a person's support never covers everything a camera sees.
They are drawn after everything a closed-set task draws, from the same generator, so M = 0 gives
exactly the closed-set tasks (same arrays, same digests) and M > 0 leaves the known part unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNKNOWN = -1  # the label of a query whose class is not among the task's known classes


def largest_task(labels: np.ndarray, *, way: int, shot: int, queries: int) -> tuple[int, int]:
    """(the largest way at this shot, the largest shot at this way) that a split's labels allow with
    `queries` queries a class, 0 where none: what an error tells a person to ask for instead."""
    counts = sorted(np.unique(np.asarray(labels), return_counts=True)[1].tolist(), reverse=True)
    return _largest(counts, way, shot, queries)


def _largest(counts: list[int], way: int, shot: int, queries: int) -> tuple[int, int]:
    widest = sum(c >= shot + queries for c in counts)
    return widest, (max(counts[way - 1] - queries, 0) if len(counts) >= way else 0)


def _what_fits(counts: list[int], way: int, shot: int, queries: int) -> str:
    """The largest way at this shot and the largest shot at this way that a split's class sizes
    (`counts`, largest first) allow, as the end of a sampler error: what to ask for instead."""
    widest, deepest = _largest(counts, way, shot, queries)
    options = [f"{widest}-way at {shot} shots"] if widest >= 2 else []
    if deepest >= 1:
        options.append(f"{deepest} shots at {way}-way")
    if not options:
        return f" (its largest class has {counts[0] if counts else 0} videos)"
    return f"; with {queries} queries it allows at most " + " or ".join(options)


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


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
    unknown_classes: np.ndarray = field(default_factory=_empty)  # [M] split classes none of the task's
    unknown_query: np.ndarray = field(default_factory=_empty)  # [M * unknown_queries], grouped by class
    unknown_query_labels: np.ndarray = field(default_factory=_empty)  # [M * unknown_queries], all UNKNOWN
    unknown_query_views: np.ndarray = field(default_factory=_empty)

    def open_queries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(videos, labels, views) of the known queries then the unknown ones (label UNKNOWN)."""
        return _joined(self)


@dataclass(frozen=True)
class TaskBatch:
    """Tasks stacked along a leading dimension B, for batched evaluation; the unknown arrays are [B, 0]
    when not given (closed-set tasks, or tasks read from a file that holds none)."""

    classes: np.ndarray  # [B, way]
    support: np.ndarray  # [B, way * shot]
    support_labels: np.ndarray
    support_views: np.ndarray
    query: np.ndarray  # [B, way * queries]
    query_labels: np.ndarray
    query_views: np.ndarray
    unknown_classes: np.ndarray | None = None  # [B, M]
    unknown_query: np.ndarray | None = None  # [B, M * unknown_queries]
    unknown_query_labels: np.ndarray | None = None
    unknown_query_views: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("unknown_classes", "unknown_query", "unknown_query_labels", "unknown_query_views"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros((len(self.support), 0), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.support)

    def open_queries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(videos, labels, views) [B, known + unknown queries]: the known queries then the unknown ones."""
        return _joined(self)


def _joined(tasks: Task | TaskBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def cat(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        return np.concatenate([a, np.asarray(b, dtype=a.dtype)], axis=-1)

    return (
        cat(tasks.query, tasks.unknown_query),
        cat(tasks.query_labels, tasks.unknown_query_labels),
        cat(tasks.query_views, tasks.unknown_query_views),
    )


class EpisodeSampler:
    """Draws tasks from one split; the class index is built once, each task is a pure function of its index."""

    def __init__(
        self,
        labels: np.ndarray,
        *,
        way: int,
        shot: int,
        queries: int,
        seed: int,
        views: int = 1,
        unknown_classes: int = 0,
        unknown_queries: int = 0,
    ) -> None:
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
                + _what_fits(sorted((len(idx) for idx in self._by_class.values()), reverse=True), way, shot, queries)
            )
        self.unknown_classes, self.unknown_queries = unknown_classes, unknown_queries
        self._outsiders = self._unknown_pool(unknown_classes, unknown_queries)

    def _unknown_pool(self, m: int, q: int) -> np.ndarray:
        """The classes unknown queries may come from (those with >= q videos); ValueError when M cannot fit."""
        if m < 0 or q < 0:
            raise ValueError(f"unknown_classes and unknown_queries must be >= 0 (got {m}, {q})")
        if m == 0:
            return _empty()
        if q < 1:
            raise ValueError(f"unknown_classes={m} needs unknown_queries >= 1 (got {q})")
        pool = np.array(sorted(c for c, idx in self._by_class.items() if len(idx) >= q), dtype=np.int64)
        # At worst every known class of a task is also in the pool, so that many are not available.
        largest = len(pool) - min(self.way, len(np.intersect1d(pool, self._eligible)))
        if m > largest:
            raise ValueError(
                f"unknown_classes={m} is more than this split allows beside {self.way} known classes: "
                f"at most {max(largest, 0)} (classes with >= {q} videos: {len(pool)})"
            )
        return pool

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
        task = Task(
            classes=classes,
            support=np.concatenate(support),
            support_labels=np.repeat(np.arange(self.way), self.shot),
            support_views=views[:n_s],
            query=np.concatenate(query),
            query_labels=np.repeat(np.arange(self.way), self.queries),
            query_views=views[n_s:],
        )
        return self._with_unknowns(task, rng) if self.unknown_classes else task

    def _with_unknowns(self, task: Task, rng: np.random.Generator) -> Task:
        """The task with its unknown queries, drawn after every closed-set draw so the known part is unchanged."""
        m, q = self.unknown_classes, self.unknown_queries
        others = self._outsiders[~np.isin(self._outsiders, task.classes)]
        chosen = rng.choice(others, m, replace=False)
        videos = np.concatenate([rng.choice(self._by_class[int(c)], q, replace=False) for c in chosen])
        views = rng.integers(0, self.views, size=m * q) if self.views > 1 else np.zeros(m * q, dtype=np.int64)
        return Task(
            **{name: getattr(task, name) for name in _CLOSED},
            unknown_classes=chosen,
            unknown_query=videos,
            unknown_query_labels=np.full(m * q, UNKNOWN, dtype=np.int64),
            unknown_query_views=views,
        )

    def batch(self, start: int, count: int) -> TaskBatch:
        """Tasks start .. start+count-1 stacked, for evaluation in batches."""
        tasks = [self.task(i) for i in range(start, start + count)]
        return TaskBatch(**{name: np.stack([getattr(t, name) for t in tasks]) for name in Task.__dataclass_fields__})


_CLOSED = ("classes", "support", "support_labels", "support_views", "query", "query_labels", "query_views")
